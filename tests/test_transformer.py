"""Tests for the SpatialTransformer layer: identity start, gradients along both paths."""

import numpy as np
import pytest

from stn_numpy import transformer
from stn_numpy.gradcheck import numerical_gradient, rel_error
from stn_numpy.layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential
from stn_numpy.transformer import TRANSFORMS, SpatialTransformer, identity_parameters


def small_stn(transform, rng, **kw):
    n_params = identity_parameters(transform, kw.get("lattice", (4, 4))).size
    loc = Sequential(Conv2d(2, 3, 3, rng, np.float64), MaxPool2d(2), ReLU(), Flatten(),
                     Linear(3 * 3 * 3, 8, rng, np.float64), ReLU(),
                     Linear(8, n_params, rng, np.float64))
    return SpatialTransformer(loc, transform, **kw)


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_starts_as_identity(rng, transform):
    stn = small_stn(transform, rng, align_corners=True)
    U = rng.standard_normal((2, 2, 8, 8))
    np.testing.assert_allclose(stn.forward(U), U, atol=1e-12)
    head = stn.localization[-1].params
    assert np.all(head["weight"] == 0)
    np.testing.assert_array_equal(head["bias"], identity_parameters(transform))


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_gradients_match_finite_differences(rng, transform, mode):
    stn = small_stn(transform, rng, mode=mode, padding_mode="border", out_size=(5, 6))
    # Move the head off its zero start so every localisation weight receives gradient and
    # the grid leaves the pixel centres (an exact identity lands on the sampler's kinks).
    head = stn.localization[-1].params
    head["weight"][...] = 0.05 * rng.standard_normal(head["weight"].shape)
    head["bias"][...] += 0.05 * rng.standard_normal(head["bias"].shape)
    U = rng.standard_normal((2, 2, 8, 8))
    dV = rng.standard_normal((2, 2, 5, 6))
    stn.forward(U)
    dU = stn.backward(dV)
    assert rel_error(dU, numerical_gradient(lambda x: stn.forward(x), U.copy(), dV)) < 1e-6
    for name, p in stn.params.items():
        num = numerical_gradient(lambda _: stn.forward(U), p, dV)
        assert rel_error(stn.grads[name], num) < 1e-6, name


def test_rejects_bad_localization(rng):
    loc = Sequential(Flatten(), Linear(4, 5, rng))
    with pytest.raises(ValueError, match="must end in 6 outputs"):
        SpatialTransformer(loc, "affine")
    with pytest.raises(TypeError, match="last layer is a Linear"):
        SpatialTransformer(Sequential(Flatten()), "affine")
    with pytest.raises(ValueError, match="transform must be one of"):
        SpatialTransformer(loc, "rigid")


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_eval_forward_builds_no_gradient_matrices(rng, transform, monkeypatch):
    stn = small_stn(transform, rng, mode="bicubic")
    head = stn.localization[-1].params
    head["bias"][...] += 0.05 * rng.standard_normal(head["bias"].shape)
    U = rng.standard_normal((2, 2, 8, 8))
    V_train = stn.forward(U, train=True)

    def refuse(*args, **kwargs):
        raise AssertionError("grid_sample_forward builds the gradient matrices")

    monkeypatch.setattr(transformer, "grid_sample_forward", refuse)
    np.testing.assert_array_equal(stn.forward(U, train=False), V_train)


def test_backward_after_eval_forward_is_a_clear_error(rng):
    stn = small_stn("affine", rng)
    U = rng.standard_normal((2, 2, 8, 8))
    stn.forward(U, train=True)
    stn.forward(U, train=False)  # the newest forward decides, as for every layer
    with pytest.raises(RuntimeError, match="backward needs a forward pass with train=True"):
        stn.backward(np.zeros((2, 2, 8, 8)))
    stn.forward(U, train=True)
    assert stn.backward(np.zeros((2, 2, 8, 8))).shape == U.shape


@pytest.mark.parametrize("kwargs, pattern", [
    ({"out_size": (5.7, 6)}, r"out_size\[0\] must be a positive int, got 5.7"),
    ({"out_size": (5, -6)}, r"out_size\[1\] must be a positive int, got -6"),
    ({"out_size": (5, 0)}, r"out_size\[1\] must be a positive int, got 0"),
    ({"out_size": 5}, "out_size must be a pair of ints"),
    ({"lattice": (4.5, 4)}, r"lattice\[0\] must be an int >= 2, got 4.5"),
    ({"lattice": (4, 1)}, r"lattice\[1\] must be an int >= 2, got 1"),
])
def test_size_arguments_are_ints_never_truncated(rng, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        small_stn("tps", rng, **kwargs)


# ---------------------------------------------------------------------------------------
# Second order: an R1-style penalty |dL/dU|^2 through a small transformer
# ---------------------------------------------------------------------------------------


def r1_penalty(stn, U, w):
    """``R = |dL/dU|^2`` for ``L = <w, V>`` through ``stn`` (localisation net Flatten +
    Linear), and ``dR/dtheta`` (theta held free of U), ``dR/dweight``, ``dR/dbias``.

    dL/dU sums the sampler path ``S^T w`` and the localisation path ``dtheta W``; its
    upstream gradient ``2 dL/dU`` goes back through each backward's double backward.
    """
    from stn_numpy import grids
    from stn_numpy.sampling import grid_sample_backward, grid_sample_double_backward

    stn.forward(U)
    g = stn.backward(w)
    theta, size, kw = stn.theta, stn._size, stn._grid_kwargs()
    opts = (stn.mode, stn.padding_mode, stn.align_corners)
    generator, generator_backward, _ = TRANSFORMS[stn.transform]
    double_backward = getattr(grids, f"{stn.transform}_grid_double_backward")
    grid = generator(theta, size, **kw)
    _, dgrid = grid_sample_backward(w, U, grid, *opts)
    dtheta = generator_backward(dgrid, theta, size, **kw).reshape(len(U), -1)
    weight = stn.localization[-1].params["weight"]
    gg = (2 * g).reshape(len(U), -1)
    # Linear's backward dU_loc = dtheta W, bilinear in dtheta and W.
    d_dtheta, d_weight = gg @ weight.T, dtheta.T @ gg
    d_dgrid, d_theta = double_backward(d_dtheta.reshape(theta.shape), dgrid, theta, size, **kw)
    _, _, d_grid = grid_sample_double_backward(2 * g, d_dgrid, w, U, grid, *opts)
    d_theta = d_theta + generator_backward(d_grid, theta, size, **kw)
    flat = d_theta.reshape(len(U), -1)
    return float(np.sum(g * g)), d_theta, d_weight + flat.T @ U.reshape(len(U), -1), flat.sum(0)


@pytest.mark.parametrize("transform,mode", [(t, "bilinear") for t in TRANSFORMS]
                         + [("similarity", "bicubic")])
def test_r1_penalty_gradients_match_finite_differences(rng, transform, mode):
    lattice = (2, 3)
    n_params = identity_parameters(transform, lattice).size
    stn = SpatialTransformer(Sequential(Flatten(), Linear(20, n_params, rng, np.float64)),
                             transform, mode=mode, padding_mode="reflection", lattice=lattice)
    head = stn.localization[-1].params
    head["weight"][...] = 0.02 * rng.standard_normal(head["weight"].shape)
    head["bias"][...] += 0.1 * rng.standard_normal(head["bias"].shape)
    U = rng.standard_normal((2, 1, 4, 5))
    w = rng.standard_normal(U.shape)
    R, d_theta, d_weight, d_bias = r1_penalty(stn, U, w)
    theta = stn.theta.copy()

    def penalty():
        return r1_penalty(stn, U, w)[0]

    for name, analytic in (("weight", d_weight), ("bias", d_bias)):
        num = numerical_gradient(lambda _: penalty(), head[name])
        assert rel_error(analytic, num) < 1e-6, name

    # dR/dtheta: theta as a free variable (the localisation net's output held aside).
    from stn_numpy.sampling import grid_sample_backward
    generator, generator_backward, _ = TRANSFORMS[transform]
    kw = stn._grid_kwargs()
    weight = head["weight"]

    def penalty_of_theta(t):
        grid = generator(t, stn._size, **kw)
        dU, dgrid = grid_sample_backward(w, U, grid, mode, "reflection", False)
        dtheta = generator_backward(dgrid, t, stn._size, **kw).reshape(len(U), -1)
        g = dU + (dtheta @ weight).reshape(U.shape)
        return np.sum(g * g)

    assert penalty_of_theta(theta) == pytest.approx(R, rel=1e-12)
    assert rel_error(d_theta, numerical_gradient(penalty_of_theta, theta)) < 1e-6


def test_backward_names_its_own_arguments():
    st = SpatialTransformer(Sequential(Flatten(), Linear(16, 6, rng=0)), "affine")
    st.forward(np.random.default_rng(0).random((2, 1, 4, 4)), train=True)
    with pytest.raises(TypeError, match="dout must have the dtype of the forward's output"):
        st.backward(np.ones((2, 1, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="input_grad must be True or False"):
        st.backward(np.ones((2, 1, 4, 4)), input_grad="no")
