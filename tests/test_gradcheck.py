"""Tests for stn_numpy.gradcheck against functions with known derivatives."""

import numpy as np
import pytest

from stn_numpy.gradcheck import check_gradient, numerical_gradient, rel_error


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


def test_step_must_be_positive_and_finite_and_an_empty_x_has_an_empty_gradient():
    x = np.ones(3)
    for h in (0, -1e-6, float("nan"), float("inf"), "1e-6", True):
        with pytest.raises(ValueError, match="h must be a finite number > 0"):
            numerical_gradient(lambda v: v.sum(), x, h=h)
    empty = np.zeros((0, 2))
    assert numerical_gradient(lambda v: v.sum(), empty).shape == (0, 2)
    assert check_gradient(lambda v: v * 2, empty, np.zeros((0, 2))).max_abs_error == 0.0
