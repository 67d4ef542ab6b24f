"""Tests for stn_numpy.layers: finite differences, closed forms and PyTorch parity.

Every gradient check runs in float64 with central differences (h = 1e-6), whose error on
these piecewise-polynomial layers is round-off of about 1e-10 relative, so 1e-7 leaves
three orders of margin while still catching any wrong term.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from stn_numpy.gradcheck import numerical_gradient, rel_error
from stn_numpy.layers import (
    Conv2d,
    Dropout,
    Dropout2d,
    Flatten,
    Linear,
    MaxPool2d,
    ReLU,
    Sequential,
    cross_entropy,
    log_softmax,
)

TORCH_REASON = "PyTorch is not installed; the parity tests need it"


def gradient_errors(layer, x, rng):
    """Relative errors of the analytic against numerical gradients of every input.

    Returns a dict with the key "x" and one key per parameter name.
    """
    out = layer.forward(x)
    dout = rng.standard_normal(out.shape)
    dx = layer.backward(dout)
    grads = {name: g.copy() for name, g in layer.grads.items()}
    errors = {"x": rel_error(dx, numerical_gradient(lambda x_: layer.forward(x_), x, dout))}
    for name, p in layer.params.items():
        # numerical_gradient perturbs p in place, and the layer reads that same array.
        numeric = numerical_gradient(lambda _: layer.forward(x), p, dout)
        errors[name] = rel_error(grads[name], numeric)
    return errors


def distinct_values(rng, shape):
    """Entries 0.01 apart in random order: no window of a max-pool has a (near) tie."""
    return rng.permutation(math.prod(shape)).reshape(shape) * 0.01 - 1.0


# --------------------------------------------------------------------------------------
# Conv2d
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, out_channels, k", [
    ((2, 3, 7, 6), 4, 3),
    ((1, 1, 5, 5), 2, 5),   # kernel as large as the image: a 1x1 output
    ((3, 2, 4, 6), 3, 1),   # 1x1 kernel: a per-pixel linear map
])
def test_conv2d_gradients(shape, out_channels, k):
    rng = np.random.default_rng(0)
    conv = Conv2d(shape[1], out_channels, k, rng=rng).astype(np.float64)
    errors = gradient_errors(conv, rng.standard_normal(shape), rng)
    assert max(errors.values()) < 1e-7, errors  # float64 central differences, see module doc


@settings(max_examples=15, deadline=None)
@given(N=st.integers(1, 2), C=st.integers(1, 3), F=st.integers(1, 3), k=st.integers(1, 4),
       extra_h=st.integers(0, 3), extra_w=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_conv2d_gradients_law(N, C, F, k, extra_h, extra_w, seed):
    """For any small shape, the backward pass is the gradient of the forward."""
    rng = np.random.default_rng(seed)
    conv = Conv2d(C, F, k, rng=rng, dtype=np.float64)
    errors = gradient_errors(conv, rng.standard_normal((N, C, k + extra_h, k + extra_w)), rng)
    assert max(errors.values()) < 1e-7, errors


def test_conv2d_matches_direct_sum():
    """The im2col forward equals the defining sum out = b + sum w x, written as loops."""
    rng = np.random.default_rng(1)
    conv = Conv2d(2, 3, 3, rng=rng, dtype=np.float64)
    x = rng.standard_normal((2, 2, 5, 4))
    w, b = conv.params["weight"], conv.params["bias"]
    expected = np.zeros((2, 3, 3, 2))
    for n in range(2):
        for o in range(3):
            for i in range(3):
                for j in range(2):
                    expected[n, o, i, j] = b[o] + np.sum(w[o] * x[n, :, i:i + 3, j:j + 3])
    np.testing.assert_allclose(conv.forward(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k, H", [(3, 7), (5, 5), (2, 9)])
def test_conv2d_is_bit_identical_for_any_worker_count(monkeypatch, k, H):
    """im2col and col2im split into row bands on worker threads: the split must change
    nothing, bands of one row and empty overlaps included, and the banded dx must equal
    the unsplit one (one band, the path the gradient tests above check)."""
    from stn_numpy import _parallel, layers

    monkeypatch.setattr(layers, "_PARALLEL_MIN_VALUES", 1)  # bands even for tiny inputs
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2, H, H + 1))
    results = []
    try:
        for threads in (1, 2, 3, 8):
            _parallel.set_num_threads(threads)
            conv = Conv2d(2, 4, k, rng=np.random.default_rng(5), dtype=np.float64)
            out = conv.forward(x)
            dout = np.random.default_rng(6).standard_normal(out.shape)
            results.append((out, conv.backward(dout), conv.grads["weight"]))
    finally:
        _parallel.set_num_threads(None)
    for result in results[1:]:
        for a, b in zip(results[0], result, strict=True):
            np.testing.assert_array_equal(a, b)
    monkeypatch.setattr(layers, "_PARALLEL_MIN_VALUES", 2**62)  # one band
    conv = Conv2d(2, 4, k, rng=np.random.default_rng(5), dtype=np.float64)
    conv.forward(x)
    np.testing.assert_allclose(conv.backward(dout), results[0][1], rtol=1e-12, atol=1e-12)


def test_conv2d_keeps_float32():
    rng = np.random.default_rng(2)
    conv = Conv2d(3, 4, 3, rng=rng)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    out = conv.forward(x)
    dx = conv.backward(np.ones_like(out))
    assert out.dtype == dx.dtype == np.float32
    assert conv.grads["weight"].dtype == conv.grads["bias"].dtype == np.float32
    reference = Conv2d(3, 4, 3, rng=np.random.default_rng(2), dtype=np.float64)
    np.testing.assert_allclose(out, reference.forward(x.astype(np.float64)), rtol=1e-5, atol=1e-5)


def test_conv2d_backward_follows_latest_forward():
    """The reused work buffers must not leak one call's data into another's gradients."""
    rng = np.random.default_rng(3)
    conv = Conv2d(2, 3, 3, rng=rng, dtype=np.float64)
    fresh = Conv2d(2, 3, 3, rng=np.random.default_rng(3), dtype=np.float64)
    x1, x2 = rng.standard_normal((4, 2, 6, 6)), rng.standard_normal((2, 2, 5, 7))
    for x in (x1, x2, x1):
        out = conv.forward(x)
    dout = rng.standard_normal(out.shape)
    dx = conv.backward(dout)
    fresh.forward(x1)
    np.testing.assert_array_equal(dx, fresh.backward(dout))
    np.testing.assert_array_equal(conv.grads["weight"], fresh.grads["weight"])


def test_conv2d_matches_torch():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    rng = np.random.default_rng(4)
    conv = Conv2d(3, 5, 4, rng=rng, dtype=np.float64)
    x = rng.standard_normal((3, 3, 9, 8))
    out = conv.forward(x)
    dout = rng.standard_normal(out.shape)
    dx = conv.backward(dout)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(conv.params["weight"], requires_grad=True)
    bt = torch.tensor(conv.params["bias"], requires_grad=True)
    out_t = torch.nn.functional.conv2d(xt, wt, bt)
    out_t.backward(torch.tensor(dout))
    # Both sides sum the same float64 products in different orders.
    assert rel_error(out, out_t.detach().numpy()) < 1e-13
    assert rel_error(dx, xt.grad.numpy()) < 1e-13
    assert rel_error(conv.grads["weight"], wt.grad.numpy()) < 1e-13
    assert rel_error(conv.grads["bias"], bt.grad.numpy()) < 1e-13


# --------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, fan_in", [
    (lambda rng: Conv2d(16, 64, 5, rng=rng), 16 * 25),
    (lambda rng: Linear(320, 200, rng=rng), 320),
])
def test_init_is_pytorch_default_uniform(make, fan_in):
    layer = make(np.random.default_rng(5))
    bound = 1 / math.sqrt(fan_in)
    w, b = layer.params["weight"], layer.params["bias"]
    assert w.dtype == b.dtype == np.float32
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    assert np.abs(w).max() > 0.99 * bound  # the bound is b itself, not a smaller one
    # Seeded, so deterministic; for U(-b, b) the p-value is uniform, and 1e-3 is a wide margin.
    assert stats.kstest(w.ravel(), stats.uniform(-bound, 2 * bound).cdf).pvalue > 1e-3
    assert stats.kstest(b, stats.uniform(-bound, 2 * bound).cdf).pvalue > 1e-3


def test_init_is_reproducible_and_astype_converts():
    a = Conv2d(2, 3, 3, rng=np.random.default_rng(6))
    b = Conv2d(2, 3, 3, rng=np.random.default_rng(6), dtype=np.float64)
    np.testing.assert_array_equal(a.params["weight"], b.params["weight"].astype(np.float32))
    assert a.astype(np.float64) is a
    assert a.params["weight"].dtype == a.params["bias"].dtype == np.float64


# --------------------------------------------------------------------------------------
# MaxPool2d
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, k", [((2, 3, 6, 8), 2), ((2, 2, 7, 9), 2), ((1, 2, 8, 7), 3)])
def test_maxpool_gradients(shape, k):
    rng = np.random.default_rng(7)
    # Distinct values: at a tie (or two values closer than h) the central difference
    # straddles the kink of max, where no derivative exists.
    x = distinct_values(rng, shape)
    errors = gradient_errors(MaxPool2d(k), x, rng)
    assert errors["x"] < 1e-7, errors  # float64 central differences


def test_maxpool_drops_trailing_rows_and_columns():
    x = distinct_values(np.random.default_rng(8), (1, 1, 5, 7))
    pool = MaxPool2d(2)
    out = pool.forward(x)
    assert out.shape == (1, 1, 2, 3)
    np.testing.assert_array_equal(out, x[:, :, :4, :6].reshape(1, 1, 2, 2, 3, 2).max(axis=(3, 5)))
    dx = pool.backward(np.ones_like(out))
    assert not dx[:, :, 4:, :].any() and not dx[:, :, :, 6:].any()


def test_maxpool_routes_ties_to_first_maximum():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 2:, 2:] = [[1.0, 3.0], [3.0, 3.0]]  # three-way tie: the first in row order wins
    pool = MaxPool2d(2)
    dx = pool.backward(np.full_like(pool.forward(x), 5.0))
    expected = np.zeros((4, 4))
    expected[0, 0] = expected[0, 2] = expected[2, 0] = expected[2, 3] = 5.0
    np.testing.assert_array_equal(dx[0, 0], expected)


@pytest.mark.parametrize("shape, k, ties", [((2, 3, 7, 9), 2, False), ((2, 3, 6, 6), 2, True),
                                             ((1, 2, 10, 8), 3, True)])
def test_maxpool_matches_torch(shape, k, ties):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    rng = np.random.default_rng(9)
    x = rng.integers(0, 3, shape).astype(np.float64) if ties else rng.standard_normal(shape)
    pool = MaxPool2d(k)
    out = pool.forward(x)
    dout = rng.standard_normal(out.shape)
    dx = pool.backward(dout)
    xt = torch.tensor(x, requires_grad=True)
    out_t = torch.nn.functional.max_pool2d(xt, k)
    out_t.backward(torch.tensor(dout))
    np.testing.assert_array_equal(out, out_t.detach().numpy())
    np.testing.assert_array_equal(dx, xt.grad.numpy())


@pytest.mark.parametrize("x_layout, dout_layout", [((1, 2, 3, 0), (0, 1, 2, 3)),
                                                    ((1, 2, 3, 0), (1, 2, 3, 0)),
                                                    ((0, 1, 2, 3), (3, 2, 1, 0))])
def test_maxpool_gives_the_same_result_in_any_memory_layout(x_layout, dout_layout):
    """A convolution hands over its output with the batch innermost, the layers after a
    flatten hand back C-ordered gradients: both must route ties and values unchanged."""
    rng = np.random.default_rng(13)
    x = rng.integers(0, 3, (4, 3, 6, 8)).astype(np.float32)  # many ties

    def in_layout(a, axes):  # the same values, stored with the axes in this order
        return np.ascontiguousarray(a.transpose(axes)).transpose(np.argsort(axes))

    expected_pool = MaxPool2d(2)
    expected_out = expected_pool.forward(x)
    dout = rng.standard_normal(expected_out.shape).astype(np.float32)
    expected_dx = expected_pool.backward(dout)
    pool = MaxPool2d(2)
    np.testing.assert_array_equal(pool.forward(in_layout(x, x_layout)), expected_out)
    np.testing.assert_array_equal(pool.backward(in_layout(dout, dout_layout)), expected_dx)


def _nan_windows():
    """2x2 windows with one NaN, two NaNs, NaN beside a larger value, and no NaN at all."""
    nan = np.nan
    return np.array([[[[1.0, nan, 2.0, nan, nan, 4.0, 1.0, 2.0],
                       [0.0, -1.0, nan, 5.0, 9.0, nan, 3.0, 0.0]]]])


def test_maxpool_routes_nan_to_the_last_nan_of_its_window():
    pool = MaxPool2d(2)
    out = pool.forward(_nan_windows())
    np.testing.assert_array_equal(out, [[[[np.nan, np.nan, np.nan, 3.0]]]])
    dx = pool.backward(np.array([[[[1.0, 2.0, 3.0, 4.0]]]]))
    # Row-major scan of each window: the NaN visited last receives the gradient.
    np.testing.assert_array_equal(dx[0, 0], [[0, 1, 0, 0, 0, 0, 0, 0],
                                             [0, 0, 2, 0, 0, 3, 4, 0]])


def test_maxpool_nan_routing_matches_torch():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    rng = np.random.default_rng(12)
    x = rng.integers(0, 3, (2, 3, 8, 8)).astype(np.float64)
    x[rng.random(x.shape) < 0.3] = np.nan
    pool = MaxPool2d(2)
    out = pool.forward(x)
    dout = rng.standard_normal(out.shape)
    xt = torch.tensor(x, requires_grad=True)
    out_t = torch.nn.functional.max_pool2d(xt, 2)
    out_t.backward(torch.tensor(dout))
    np.testing.assert_array_equal(out, out_t.detach().numpy())
    np.testing.assert_array_equal(pool.backward(dout), xt.grad.numpy())


@pytest.mark.parametrize("layer, shape", [
    (lambda: Conv2d(2, 3, 3, rng=0), (0, 2, 5, 5)),
    (lambda: MaxPool2d(2), (0, 2, 4, 4)),
    (lambda: MaxPool2d(2), (2, 0, 4, 4)),
    (lambda: ReLU(), (0, 3)),
    (lambda: Linear(3, 2, rng=0), (0, 3)),
    (lambda: Dropout(0.5, rng=0), (0, 3)),
    (lambda: Dropout2d(0.5, rng=0), (0, 2, 4, 4)),
])
def test_layers_pass_empty_batches_both_ways(layer, shape):
    layer = layer()
    out = layer.forward(np.zeros(shape))
    assert out.size == 0
    assert layer.backward(np.zeros(out.shape)).shape == shape
    for name, p in layer.params.items():
        np.testing.assert_array_equal(layer.grads[name], np.zeros_like(p))


# --------------------------------------------------------------------------------------
# ReLU, Flatten, Linear
# --------------------------------------------------------------------------------------


def test_relu_gradient():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, 4, 5))
    x[np.abs(x) < 1e-3] = 0.5  # keep the central difference off the kink at 0
    assert gradient_errors(ReLU(), x, rng)["x"] < 1e-7  # float64 central differences


def test_relu_derivative_at_zero_is_zero():
    relu = ReLU()
    relu.forward(np.array([-1.0, 0.0, 2.0]))
    np.testing.assert_array_equal(relu.backward(np.ones(3)), [0.0, 0.0, 1.0])


def test_flatten_round_trip():
    rng = np.random.default_rng(11)
    flatten = Flatten()
    x = rng.standard_normal((2, 3, 4, 5))
    out = flatten.forward(x)
    assert out.shape == (2, 60)
    np.testing.assert_array_equal(out[1], x[1].ravel())
    dout = rng.standard_normal(out.shape)
    # The output is a view of x: copy it, or the in-place perturbation of x moves it too.
    numeric = numerical_gradient(lambda x_: flatten.forward(x_).copy(), x, dout)
    assert rel_error(flatten.backward(dout), numeric) < 1e-7  # float64 central differences


def test_flatten_empty_batch():
    flatten = Flatten()
    out = flatten.forward(np.zeros((0, 3, 4, 5)))
    assert out.shape == (0, 60)
    assert flatten.backward(np.zeros((0, 60))).shape == (0, 3, 4, 5)


def test_linear_gradients():
    rng = np.random.default_rng(12)
    linear = Linear(6, 4, rng=rng, dtype=np.float64)
    errors = gradient_errors(linear, rng.standard_normal((5, 6)), rng)
    assert set(errors) == {"x", "weight", "bias"}
    assert max(errors.values()) < 1e-7, errors  # float64 central differences


def test_linear_matches_torch():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    rng = np.random.default_rng(13)
    linear = Linear(7, 3, rng=rng, dtype=np.float64)
    x = rng.standard_normal((4, 7))
    out = linear.forward(x)
    dout = rng.standard_normal(out.shape)
    dx = linear.backward(dout)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(linear.params["weight"], requires_grad=True)
    bt = torch.tensor(linear.params["bias"], requires_grad=True)
    out_t = torch.nn.functional.linear(xt, wt, bt)
    out_t.backward(torch.tensor(dout))
    assert rel_error(out, out_t.detach().numpy()) < 1e-13  # same sums, other order
    assert rel_error(dx, xt.grad.numpy()) < 1e-13
    assert rel_error(linear.grads["weight"], wt.grad.numpy()) < 1e-13
    assert rel_error(linear.grads["bias"], bt.grad.numpy()) < 1e-13


# --------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, shape", [(Dropout, (4, 6)), (Dropout2d, (3, 4, 2, 3))])
def test_dropout_gradient_with_fixed_mask(cls, shape):
    rng = np.random.default_rng(14)
    x = rng.standard_normal(shape)
    dout = rng.standard_normal(shape)
    layer = cls(p=0.4, rng=15)
    out = layer.forward(x)
    dx = layer.backward(dout)
    # A new layer with the same seed draws the same mask on every call.
    numeric = numerical_gradient(lambda x_: cls(p=0.4, rng=15).forward(x_), x, dout)
    assert rel_error(dx, numeric) < 1e-7  # float64 central differences
    assert (out == 0).any() and (out != 0).any()  # the check covers dropped and kept entries


@pytest.mark.parametrize("cls", [Dropout, Dropout2d])
def test_dropout_eval_is_identity(cls):
    x = np.random.default_rng(16).standard_normal((2, 3, 4, 4))
    layer = cls(p=0.5, rng=0)
    np.testing.assert_array_equal(layer.forward(x, train=False), x)
    np.testing.assert_array_equal(layer.backward(2 * x), 2 * x)


def test_dropout_scaling_keeps_expectation():
    p = 0.3
    x = np.ones((400, 500))
    out = Dropout(p, rng=17).forward(x)
    kept = out != 0
    np.testing.assert_allclose(out[kept], 1 / (1 - p), rtol=1e-15)
    # 200 000 Bernoulli draws: the standard error of the kept fraction is 1e-3.
    assert abs(kept.mean() - (1 - p)) < 5e-3
    assert abs(out.mean() - 1.0) < 1e-2


def test_dropout2d_drops_whole_channels():
    x = np.random.default_rng(18).standard_normal((8, 16, 3, 3)) + 10.0  # no zero entries
    out = Dropout2d(0.5, rng=19).forward(x)
    zero_maps = (out == 0).all(axis=(2, 3))
    assert ((out != 0).all(axis=(2, 3)) | zero_maps).all()
    assert zero_maps.any() and not zero_maps.all()
    np.testing.assert_allclose(out[~zero_maps], 2 * x[~zero_maps], rtol=1e-15)


def test_dropout_is_deterministic_and_resumable():
    x = np.ones((10, 10))
    a, b = Dropout(0.5, rng=20), Dropout(0.5, rng=20)
    np.testing.assert_array_equal(a.forward(x), b.forward(x))
    state = a.rng.bit_generator.state
    first = a.forward(x)
    a.rng.bit_generator.state = state
    np.testing.assert_array_equal(a.forward(x), first)
    assert Dropout(0.5, rng=21).forward(x.astype(np.float32)).dtype == np.float32


def test_dropout_p_edges():
    x = np.ones((3, 4))
    np.testing.assert_array_equal(Dropout(1.0, rng=0).forward(x), 0 * x)
    np.testing.assert_array_equal(Dropout(0.0, rng=0).forward(x), x)
    with pytest.raises(ValueError, match="p must be in"):
        Dropout(1.5)
    with pytest.raises(ValueError, match="p must be in"):
        Dropout(float("nan"))


@pytest.mark.parametrize("p", ["0.5", None, [0.5], True])
@pytest.mark.parametrize("cls", [Dropout, Dropout2d])
def test_dropout_p_must_be_a_number(cls, p):
    with pytest.raises(TypeError, match="p must be a number in"):
        cls(p)


# --------------------------------------------------------------------------------------
# Sequential
# --------------------------------------------------------------------------------------


def small_net(rng, dtype=np.float32):
    return Sequential(
        Conv2d(1, 3, 3, rng=rng, dtype=dtype), MaxPool2d(2), ReLU(), Flatten(),
        Linear(12, 5, rng=rng, dtype=dtype), ReLU(), Linear(5, 3, rng=rng, dtype=dtype),
    )


def test_sequential_names_and_gradients():
    rng = np.random.default_rng(22)
    net = small_net(rng).astype(np.float64)
    assert list(net.params) == ["0.weight", "0.bias", "4.weight", "4.bias", "6.weight", "6.bias"]
    assert net.params["4.weight"] is net[4].params["weight"]
    x = distinct_values(rng, (2, 1, 6, 6))  # no pooling ties, see test_maxpool_gradients
    errors = gradient_errors(net, x, rng)
    assert set(errors) == {"x", *net.params}
    assert list(net.grads) == list(net.params)
    assert max(errors.values()) < 1e-7, errors  # float64 central differences


def test_sequential_rejects_non_layers():
    with pytest.raises(TypeError, match=r"layers\[1\]"):
        Sequential(ReLU(), lambda x: x)


# --------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------


def test_cross_entropy_gradient():
    rng = np.random.default_rng(23)
    logits = rng.standard_normal((6, 10)) * 3
    y = rng.integers(0, 10, 6)
    _, dlogits = cross_entropy(logits, y)
    numeric = numerical_gradient(lambda z: cross_entropy(z, y)[0], logits)
    assert rel_error(dlogits, numeric) < 1e-7  # float64 central differences


def test_cross_entropy_closed_forms():
    loss, dlogits = cross_entropy(np.zeros((4, 10)), np.array([0, 3, 9, 3]))
    assert loss == pytest.approx(math.log(10), rel=1e-15)
    np.testing.assert_allclose(dlogits.sum(axis=1), 0.0, atol=1e-16)  # softmax - onehot
    # Logits of 1000 overflow a naive exp; shifting all logits of a row leaves the loss alone.
    logits = np.array([[1000.0, 0.0, -1000.0]])
    loss, dlogits = cross_entropy(logits, np.array([0]))
    assert loss == 0.0 and np.isfinite(dlogits).all()
    loss_big, _ = cross_entropy(logits + np.array([[0.0, 999.0, 0.0]]), np.array([0]))
    assert loss_big == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-12)
    np.testing.assert_allclose(np.exp(log_softmax(np.array([[1.0, 2.0, 3.0]]))).sum(), 1.0)


def test_cross_entropy_matches_torch():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    rng = np.random.default_rng(24)
    logits = rng.standard_normal((8, 10)) * 4
    y = rng.integers(0, 10, 8)
    loss, dlogits = cross_entropy(logits, y)
    zt = torch.tensor(logits, requires_grad=True)
    loss_t = torch.nn.functional.cross_entropy(zt, torch.tensor(y))
    loss_t.backward()
    assert loss == pytest.approx(loss_t.item(), rel=1e-13)
    assert rel_error(dlogits, zt.grad.numpy()) < 1e-13
    np.testing.assert_allclose(log_softmax(logits), torch.log_softmax(zt, 1).detach().numpy(),
                               rtol=1e-13, atol=1e-13)


def test_cross_entropy_rejects_bad_labels():
    logits = np.zeros((2, 3))
    with pytest.raises(TypeError, match="y must hold integer"):
        cross_entropy(logits, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"y must be in \[0, 3\)"):
        cross_entropy(logits, np.array([0, 3]))
    with pytest.raises(ValueError, match=r"y must have shape \(2,\)"):
        cross_entropy(logits, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="logits must have shape"):
        cross_entropy(np.zeros(3), np.array([0]))
    with pytest.raises(TypeError, match="logits must have dtype float"):
        cross_entropy(np.zeros((2, 3), dtype=int), np.array([0, 1]))


# --------------------------------------------------------------------------------------
# Validation at the boundary
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer, x, error, pattern", [
    (Conv2d(3, 2, 3), np.zeros((3, 5, 5), np.float32), ValueError,
     r"x must have shape \(\*, 3, \*, \*\), got \(3, 5, 5\)"),
    (Conv2d(3, 2, 3), np.zeros((1, 1, 5, 5), np.float32), ValueError,
     r"x must have shape \(\*, 3, \*, \*\), got \(1, 1, 5, 5\)"),
    (Conv2d(3, 2, 3), np.zeros((1, 3, 2, 5), np.float32), ValueError, "H, W >= kernel_size=3"),
    (Conv2d(3, 2, 3), np.zeros((1, 3, 5, 5), np.int64), TypeError, "x must have dtype float"),
    (MaxPool2d(2), np.zeros((4, 4), np.float32), ValueError, "x must have shape"),
    (MaxPool2d(2), np.zeros((1, 1, 4, 4), np.int32), TypeError, "x must have dtype float"),
    (Linear(4, 2), np.zeros((3, 5), np.float32), ValueError,
     r"x must have shape \(\*, 4\), got \(3, 5\)"),
    (Linear(4, 2), np.zeros((3, 4), np.int64), TypeError, "x must have dtype float"),
    (ReLU(), np.zeros(3, bool), TypeError, "x must have dtype float"),
    (Dropout2d(), np.zeros((3, 4), np.float32), ValueError, "x must have shape"),
])
def test_forward_rejects_bad_input(layer, x, error, pattern):
    with pytest.raises(error, match=pattern):
        layer.forward(x)


def test_backward_checks_order_and_shape():
    conv = Conv2d(1, 2, 3)
    with pytest.raises(RuntimeError, match="before forward"):
        conv.backward(np.zeros((1, 2, 3, 3), np.float32))
    conv.forward(np.zeros((1, 1, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"dout must have shape \(1, 2, 3, 3\), got"):
        conv.backward(np.zeros((1, 2, 4, 4), np.float32))


@pytest.mark.parametrize("make", [lambda: Conv2d(0, 2, 3), lambda: Conv2d(1, 2, 2.5),
                                  lambda: Linear(3, 0), lambda: MaxPool2d(0)])
def test_constructors_reject_bad_sizes(make):
    with pytest.raises(ValueError, match="must be a positive int"):
        make()
