"""Tests for stn_numpy.optim: closed forms, PyTorch parity and exact resumption."""

import math

import numpy as np
import pytest

from stn_numpy.optim import SGD, Adam

TORCH_REASON = "PyTorch is not installed; the parity tests need it"


def make_params(rng, dtype=np.float64):
    return {"0.weight": rng.standard_normal((3, 4)).astype(dtype),
            "0.bias": rng.standard_normal(3).astype(dtype)}


def grad_sequence(rng, params, steps, dtype=np.float64):
    return [{k: rng.standard_normal(p.shape).astype(dtype) for k, p in params.items()}
            for _ in range(steps)]


# --------------------------------------------------------------------------------------
# Closed forms of the first steps
# --------------------------------------------------------------------------------------


def test_sgd_first_two_steps_closed_form():
    rng = np.random.default_rng(0)
    params = make_params(rng)
    p0 = {k: p.copy() for k, p in params.items()}
    g1, g2 = grad_sequence(rng, params, 2)
    lr, mu, wd = 0.1, 0.9, 0.01
    opt = SGD(params, lr=lr, momentum=mu, weight_decay=wd)
    opt.step(g1)
    p1 = {k: p0[k] - lr * (g1[k] + wd * p0[k]) for k in p0}  # buf = d_p on the first step
    for k in p0:
        np.testing.assert_allclose(params[k], p1[k], rtol=1e-14, atol=1e-15)
    opt.step(g2)
    for k in p0:
        buf = mu * (g1[k] + wd * p0[k]) + (g2[k] + wd * p1[k])
        np.testing.assert_allclose(params[k], p1[k] - lr * buf, rtol=1e-14, atol=1e-15)


def test_sgd_without_momentum_keeps_no_buffer():
    params = {"w": np.array([1.0, -2.0])}
    opt = SGD(params, lr=0.5)
    opt.step({"w": np.array([2.0, 2.0])})
    np.testing.assert_array_equal(params["w"], [0.0, -3.0])
    assert opt.state_dict() == {"step": 1, "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0}


def test_adam_first_step_closed_form():
    """After one step m_hat = g and v_hat = g**2, so p moves by lr * g / (|g| + eps)."""
    rng = np.random.default_rng(1)
    params = make_params(rng)
    p0 = {k: p.copy() for k, p in params.items()}
    (g,) = grad_sequence(rng, params, 1)
    lr, wd, eps = 0.01, 0.1, 1e-8
    Adam(params, lr=lr, eps=eps, weight_decay=wd).step(g)
    for k in p0:
        d = g[k] + wd * p0[k]
        np.testing.assert_allclose(params[k], p0[k] - lr * d / (np.abs(d) + eps), rtol=1e-13)


# --------------------------------------------------------------------------------------
# PyTorch parity
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kwargs", [
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("SGD", dict(lr=0.05)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)),
    ("Adam", dict(lr=1e-3)),
])
def test_matches_torch_optim(name, kwargs):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    rng = np.random.default_rng(2)
    params = make_params(rng)
    tensors = {k: torch.nn.Parameter(torch.tensor(p)) for k, p in params.items()}
    ours = {"SGD": SGD, "Adam": Adam}[name](params, **kwargs)
    theirs = getattr(torch.optim, name)(list(tensors.values()), **kwargs)
    for grads in grad_sequence(rng, params, 6):
        ours.step(grads)
        for k, t in tensors.items():
            t.grad = torch.tensor(grads[k])
        theirs.step()
        for k, t in tensors.items():
            # float64, same operations in the same order: agreement to a few ulps.
            np.testing.assert_allclose(params[k], t.detach().numpy(), rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------------------
# In-place updates, dtypes, resumption
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SGD, Adam])
def test_step_updates_in_place_and_keeps_dtype(cls):
    rng = np.random.default_rng(3)
    params = make_params(rng, np.float32)
    arrays = {k: p for k, p in params.items()}
    before = {k: p.copy() for k, p in params.items()}
    opt = cls(params, lr=0.1, weight_decay=0.01)
    opt.step(grad_sequence(rng, params, 1, np.float32)[0])
    for k, p in params.items():
        assert p is arrays[k] and p.dtype == np.float32
        assert not np.array_equal(p, before[k])


@pytest.mark.parametrize("cls, kwargs", [
    (SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    (Adam, dict(lr=0.01, weight_decay=1e-3)),
])
def test_state_dict_round_trip_is_bit_identical(cls, kwargs, tmp_path):
    rng = np.random.default_rng(4)
    params = make_params(rng, np.float32)
    grads = grad_sequence(rng, params, 6, np.float32)
    opt = cls(params, **kwargs)
    for g in grads[:3]:
        opt.step(g)
    np.savez(tmp_path / "opt.npz", **opt.state_dict())
    saved = {k: p.copy() for k, p in params.items()}
    for g in grads[3:]:
        opt.step(g)

    resumed_params = {k: p.copy() for k, p in saved.items()}
    resumed = cls(resumed_params, lr=123.0)  # hyper-parameters come from the state
    with np.load(tmp_path / "opt.npz") as state:
        resumed.load_state_dict(state)
    assert resumed.step_count == 3
    for g in grads[3:]:
        resumed.step(g)
    for k in params:
        np.testing.assert_array_equal(resumed_params[k], params[k])
    assert resumed.state_dict().keys() == opt.state_dict().keys()


def test_state_dict_keys_and_copies():
    params = {"0.weight": np.ones((2, 2)), "1.bias": np.ones(2)}
    opt = Adam(params)
    opt.step({k: np.ones_like(p) for k, p in params.items()})
    state = opt.state_dict()
    assert set(state) == {"step", "lr", "beta1", "beta2", "eps", "weight_decay",
                          "exp_avg.0.weight", "exp_avg.1.bias",
                          "exp_avg_sq.0.weight", "exp_avg_sq.1.bias"}
    state["exp_avg.0.weight"][:] = 7.0
    assert not (opt.exp_avg["0.weight"] == 7.0).any()


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, pattern", [
    (lambda p: SGD(p, lr=-0.1), "lr must be a number >= 0"),
    (lambda p: SGD(p, momentum=-0.5), "momentum must be a number >= 0"),
    (lambda p: SGD(p, weight_decay=-1.0), "weight_decay must be a number >= 0"),
    (lambda p: Adam(p, lr=float("nan")), "lr must be a number >= 0"),
    (lambda p: Adam(p, betas=(1.0, 0.999)), r"betas\[0\] must be in \[0, 1\)"),
    (lambda p: Adam(p, betas=(0.9, -0.1)), r"betas\[1\] must be in \[0, 1\)"),
    (lambda p: Adam(p, betas=0.9), "betas must be a pair"),
    (lambda p: Adam(p, eps=-1e-8), "eps must be a number >= 0"),
    (lambda p: SGD({}), "params must be a non-empty dict"),
    (lambda p: SGD(list(p.values())), "params must be a non-empty dict"),
])
def test_constructor_rejects_bad_arguments(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make({"w": np.zeros(2)})


def test_constructor_rejects_non_float_params():
    with pytest.raises(TypeError, match=r"params\['w'\] must be a float numpy array"):
        SGD({"w": np.zeros(2, dtype=int)})


@pytest.mark.parametrize("cls", [SGD, Adam])
def test_step_rejects_mismatched_grads(cls):
    params = {"a": np.zeros(2), "b": np.zeros((2, 3))}
    opt = cls(params)
    with pytest.raises(ValueError, match=r"missing \['b'\], unexpected \[\]"):
        opt.step({"a": np.zeros(2)})
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['c'\]"):
        opt.step({"a": np.zeros(2), "b": np.zeros((2, 3)), "c": np.zeros(1)})
    with pytest.raises(ValueError, match=r"grads\['b'\] must have shape \(2, 3\).*got \(3, 2\)"):
        opt.step({"a": np.zeros(2), "b": np.zeros((3, 2))})
    assert opt.step_count == 0  # a rejected step changes nothing


@pytest.mark.parametrize("cls", [SGD, Adam])
@pytest.mark.parametrize("bad", [np.ones((2, 3), dtype=int), [[1.0] * 3] * 2, None],
                         ids=["int array", "list", "None"])
def test_step_rejects_non_float_grads(cls, bad):
    params = {"a": np.ones(2), "b": np.ones((2, 3))}
    opt = cls(params, lr=0.1)
    with pytest.raises(TypeError, match=r"grads\['b'\] must be a float numpy array"):
        opt.step({"a": np.ones(2), "b": bad})
    # Checked before any update: "a" is not stepped when "b" is refused.
    assert opt.step_count == 0 and np.all(params["a"] == 1) and np.all(params["b"] == 1)


def test_load_state_dict_rejects_foreign_state():
    params = {"a": np.zeros(2), "b": np.zeros(3)}
    opt = SGD(params, momentum=0.9)
    opt.step({"a": np.ones(2), "b": np.ones(3)})
    good = opt.state_dict()
    with pytest.raises(ValueError, match=r"missing the entries \['lr'\]"):
        opt.load_state_dict({k: v for k, v in good.items() if k != "lr"})
    with pytest.raises(ValueError, match="unexpected entry 'momentum_buffer.c'"):
        opt.load_state_dict({**good, "momentum_buffer.c": np.zeros(1)})
    with pytest.raises(ValueError, match=r"state\['momentum_buffer.a'\] must have shape \(2,\)"):
        opt.load_state_dict({**good, "momentum_buffer.a": np.zeros(5)})
    with pytest.raises(ValueError, match=r"momentum_buffer for some parameters but not \['b'\]"):
        opt.load_state_dict({k: v for k, v in good.items() if k != "momentum_buffer.b"})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_in_place_update_rounds_as_the_written_formula(dtype):
    # The update reuses a scratch array; every bit must match the formula of the docstring
    # evaluated with fresh temporaries in PyTorch's order of operations.
    rng = np.random.default_rng(3)
    p = rng.standard_normal((4, 6)).astype(dtype)
    ref, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
    beta1, beta2, lr, eps, wd = 0.9, 0.999, 0.01, 1e-8, 0.1
    opt = Adam({"w": p}, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)
    for t in range(1, 6):
        g = rng.standard_normal(p.shape).astype(dtype)
        opt.step({"w": g})
        g = g + wd * ref
        m += (1.0 - beta1) * (g - m)
        v *= beta2
        v += (1.0 - beta2) * (g * g)
        denom = np.sqrt(v) / math.sqrt(1.0 - beta2 ** t) + eps
        ref -= lr / (1.0 - beta1 ** t) * (m / denom)
        np.testing.assert_array_equal(p, ref)
    assert "_scratch" not in " ".join(opt.state_dict())


@pytest.mark.parametrize("cls", [SGD, Adam])
def test_lr_scale_equals_a_separate_optimizer_at_the_scaled_rate(cls):
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(5), rng.standard_normal((2, 3))
    together = {"a": a.copy(), "b": b.copy()}
    alone_a, alone_b = {"a": a.copy()}, {"b": b.copy()}
    kw = {"momentum": 0.9} if cls is SGD else {}
    opt = cls(together, lr=0.1, lr_scale={"a": 0.25}, **kw)
    opt_a, opt_b = cls(alone_a, lr=0.025, **kw), cls(alone_b, lr=0.1, **kw)
    for _ in range(3):
        ga, gb = rng.standard_normal(5), rng.standard_normal((2, 3))
        opt.step({"a": ga, "b": gb})
        opt_a.step({"a": ga})
        opt_b.step({"b": gb})
    np.testing.assert_array_equal(together["a"], alone_a["a"])
    np.testing.assert_array_equal(together["b"], alone_b["b"])
    with pytest.raises(ValueError, match="not in params"):
        cls({"a": a.copy()}, lr_scale={"c": 1.0})
    with pytest.raises(ValueError, match=r"lr_scale\['a'\] must be a number >= 0"):
        cls({"a": a.copy()}, lr_scale={"a": -1.0})
