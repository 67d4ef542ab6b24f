"""Tests for stn_numpy.gradcheck against functions with known derivatives."""

import numpy as np
import pytest

from stn_numpy.gradcheck import (
    check_double_backward,
    check_gradient,
    numerical_double_backward,
    numerical_gradient,
    rel_error,
)


def test_numerical_gradient_of_known_functions(rng):
    x = rng.standard_normal((3, 4))
    np.testing.assert_allclose(numerical_gradient(lambda v: np.sum(v**3), x.copy()), 3 * x**2,
                               rtol=1e-8, atol=1e-9)
    df = rng.standard_normal((3, 4))
    np.testing.assert_allclose(numerical_gradient(np.sin, x.copy(), df), np.cos(x) * df,
                               rtol=1e-8, atol=1e-10)


def test_numerical_gradient_of_a_function_returning_a_view(rng):
    x = rng.standard_normal((2, 3))
    df = rng.standard_normal(6)
    np.testing.assert_allclose(numerical_gradient(lambda v: v.reshape(-1), x, df),
                               df.reshape(2, 3), rtol=1e-8)


def test_numerical_gradient_restores_x(rng):
    x = rng.standard_normal(5)
    x0 = x.copy()
    numerical_gradient(np.exp, x)
    np.testing.assert_array_equal(x, x0)


def test_check_gradient_reports_agreement_and_disagreement(rng):
    x = rng.standard_normal(6)
    good = check_gradient(lambda v: v**2, x, 2 * x)
    assert good.max_rel_error < 1e-9 and good.max_abs_error < 1e-8
    bad = check_gradient(lambda v: v**2, x, 2 * x + 0.1)
    assert bad.max_abs_error == pytest.approx(0.1, rel=1e-6)
    assert "max rel error" in str(bad)
    with pytest.raises(ValueError, match="shape"):
        check_gradient(lambda v: v**2, x, np.zeros(5))


def test_rel_error():
    assert rel_error(np.zeros(3), np.zeros(3)) == 0
    assert rel_error([1.0, 2.0], [1.0, 2.0]) == 0
    assert rel_error([1.0], [3.0]) == pytest.approx(0.5)


@pytest.mark.parametrize("x", [np.arange(3), np.arange(3, dtype=np.float32), [0.0, 1.0]],
                         ids=["int64", "float32", "list"])
def test_numerical_gradient_requires_float64_ndarray(x):
    for check in (lambda: numerical_gradient(lambda v: v, x),
                  lambda: check_gradient(lambda v: v, x, np.zeros(np.shape(x)))):
        with pytest.raises(TypeError, match="x must be a float64 ndarray.*round-off"):
            check()


def test_df_must_have_the_shape_of_f_x(rng):
    x = rng.standard_normal((2, 3))
    x0 = x.copy()
    with pytest.raises(ValueError, match=r"df must have the shape of f\(x\), \(2, 3\), "
                                         r"got \(3,\)"):
        numerical_gradient(np.sin, x, df=np.ones(3))  # would broadcast silently
    np.testing.assert_array_equal(x, x0)  # restored on the way out
    with pytest.raises(ValueError, match=r"\(6,\), got \(2, 3\)"):
        check_gradient(lambda v: v.reshape(-1), x, np.zeros((2, 3)), df=np.ones((2, 3)))


def test_x_is_restored_when_f_raises(rng):
    x = rng.standard_normal(4)
    x0 = x.copy()
    calls = {"n": 0}

    def fails_on_the_third_call(v):
        calls["n"] += 1
        if calls["n"] == 3:  # x[1] + h is in place at this moment
            raise RuntimeError("boom")
        return v**2

    with pytest.raises(RuntimeError, match="boom"):
        numerical_gradient(fails_on_the_third_call, x)
    np.testing.assert_array_equal(x, x0)


def test_read_only_x_is_named():
    x = np.arange(3.0)
    x.setflags(write=False)
    for check in (lambda: numerical_gradient(np.sin, x),
                  lambda: check_gradient(np.sin, x, np.cos(x))):
        with pytest.raises(ValueError, match=r"x is read-only.*x\.copy\(\)"):
            check()


def test_double_backward_of_a_known_backward(rng):
    # f(x, y) = sum(x^2 y): backward (2 x y, x^2); its double backward along (a, b) is
    # (2 y a + 2 x b, 2 x a).
    x, y, a, b = (rng.standard_normal(4) for _ in range(4))

    def backward(x, y):
        return 2 * x * y, x**2

    numeric = numerical_double_backward(backward, [x.copy(), y.copy()], [a, b])
    np.testing.assert_allclose(numeric[0], 2 * y * a + 2 * x * b, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(numeric[1], 2 * x * a, rtol=1e-7, atol=1e-9)
    good = check_double_backward(backward, [x, y], [a, b], [2 * y * a + 2 * x * b, 2 * x * a])
    assert good.max_rel_error < 1e-8
    # The second output's upstream gradient is None (zero): its term drops out.
    assert check_double_backward(backward, [x, y], [a, None], [2 * y * a, 2 * x * a]) \
        .max_rel_error < 1e-8
    bad = check_double_backward(backward, [x, y], [a, b], [2 * y * a, 2 * x * a])
    assert bad.max_rel_error > 1e-2


def test_check_double_backward_rejects_mismatched_gradients(rng):
    x = rng.standard_normal(3)
    with pytest.raises(ValueError, match="one gradient per argument"):
        check_double_backward(lambda x: (x,), [x], [x], [x, x])
    with pytest.raises(ValueError, match="one gradient per output"):
        numerical_double_backward(lambda x: (x, x), [x], [x])
    with pytest.raises(TypeError, match="float64"):
        check_double_backward(lambda x: (x,), [x.astype(np.float32)], [x], [x])


def test_step_must_be_positive_and_finite_and_an_empty_x_has_an_empty_gradient():
    x = np.ones(3)
    for h in (0, -1e-6, float("nan"), float("inf"), "1e-6", True):
        with pytest.raises(ValueError, match="h must be a finite number > 0"):
            numerical_gradient(lambda v: v.sum(), x, h=h)
    empty = np.zeros((0, 2))
    assert numerical_gradient(lambda v: v.sum(), empty).shape == (0, 2)
    assert check_gradient(lambda v: v * 2, empty, np.zeros((0, 2))).max_abs_error == 0.0
