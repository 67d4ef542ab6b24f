"""Tests for stn_numpy.reference: the plain sampler against the fast one, and on its own."""

import itertools
import warnings

import numpy as np
import pytest
from conftest import assert_sampler_gradients, normalize

from stn_numpy import affine_grid, grid_sample, grid_sample_backward, reference
from stn_numpy.sampling import PADDING_MODES

COMBOS = list(itertools.product(reference.MODES, PADDING_MODES, [True, False]))


def kinky_grid(rng, N, Ho, Wo, H, W, align_corners):
    """Points inside, outside, exactly on pixel centres, on the borders and half-pixels.

    Integer and half-integer pixel coordinates are where bilinear switches pixels, nearest
    rounds, border clips and reflection folds; both samplers must take the same side there.
    """
    grid = rng.uniform(-1.6, 1.6, size=(N, Ho, Wo, 2))
    x = rng.integers(-3, 2 * W + 3, size=(N, Ho, Wo)) / 2  # integers and half-integers
    y = rng.integers(-3, 2 * H + 3, size=(N, Ho, Wo)) / 2
    on_kink = rng.random((N, Ho, Wo)) < 0.5
    grid[..., 0] = np.where(on_kink, normalize(x, W, align_corners), grid[..., 0])
    grid[..., 1] = np.where(on_kink, normalize(y, H, align_corners), grid[..., 1])
    return grid


@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS)
@pytest.mark.parametrize("grid_kind", ["random", "kinks", "identity"])
def test_matches_fast_sampler(rng, mode, padding_mode, align_corners, grid_kind):
    N, C, H, W, Ho, Wo = 2, 3, 5, 6, 7, 8
    U = rng.standard_normal((N, C, H, W))
    if grid_kind == "random":
        grid = rng.uniform(-1.6, 1.6, size=(N, Ho, Wo, 2))
    elif grid_kind == "kinks":
        grid = kinky_grid(rng, N, Ho, Wo, H, W, align_corners)
    else:  # every point on a pixel centre, the transformer's starting point
        identity = np.tile(np.array([[[1.0, 0, 0], [0, 1, 0]]]), (N, 1, 1))
        grid = affine_grid(identity, U.shape, align_corners)
    dV = rng.standard_normal((N, C) + grid.shape[1:3])
    opts = (mode, padding_mode, align_corners)

    V = reference.grid_sample(U, grid, *opts)
    dU, dgrid = reference.grid_sample_backward(dV, U, grid, *opts)
    V_fast = grid_sample(U, grid, *opts)
    dU_fast, dgrid_fast = grid_sample_backward(dV, U, grid, *opts)
    # Same formulas, different order of roundings: agreement to float64 round-off.
    np.testing.assert_allclose(V, V_fast, rtol=0, atol=1e-13)
    np.testing.assert_allclose(dU, dU_fast, rtol=0, atol=1e-13)
    np.testing.assert_allclose(dgrid, dgrid_fast, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS)
def test_gradients_match_finite_differences(rng, mode, padding_mode, align_corners):
    # An oracle of its own: not only equal to the fast sampler, but right.
    assert_sampler_gradients(reference.grid_sample, reference.grid_sample_backward, rng, mode,
                             padding_mode, align_corners)


def test_scatter_adds_repeated_reads():
    # Every output point reads pixel (0, 0) alone: dU there is the sum of all of dV.
    U = np.arange(6.0).reshape(1, 1, 2, 3)
    grid = np.full((1, 4, 5, 2), -1.0)  # align_corners=True: -1 is the top-left centre
    dV = np.arange(20.0).reshape(1, 1, 4, 5)
    dU, _ = reference.grid_sample_backward(dV, U, grid, align_corners=True)
    expected = np.zeros_like(U)
    expected[0, 0, 0, 0] = dV.sum()
    np.testing.assert_array_equal(dU, expected)


def test_integer_coordinate_takes_right_hand_derivative():
    # Floor form of eq. (7): at x = 2 the pixels 2 and 3 are used, U[3] - U[2] = 5.
    U = np.array([0.0, 1.0, 3.0, 8.0, 9.0]).reshape(1, 1, 1, 5)
    grid = np.array([[[[0.0, 0.0]]]])  # align_corners=True: x = 2
    _, dgrid = reference.grid_sample_backward(np.ones((1, 1, 1, 1)), U, grid,
                                              align_corners=True)
    assert dgrid[0, 0, 0, 0] == pytest.approx(5.0 * 2)  # times dx/dx_s = (W - 1) / 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_keeps_dtype(rng, dtype):
    U = rng.standard_normal((1, 2, 4, 4)).astype(dtype)
    grid = rng.uniform(-1, 1, (1, 3, 3, 2)).astype(dtype)
    V = reference.grid_sample(U, grid)
    dU, dgrid = reference.grid_sample_backward(np.ones_like(V), U, grid)
    assert V.dtype == dU.dtype == dgrid.dtype == dtype


def test_rejects_bicubic_and_bad_dV(rng):
    U = rng.standard_normal((1, 1, 4, 4))
    grid = rng.uniform(-1, 1, (1, 3, 3, 2))
    with pytest.raises(ValueError, match="mode"):
        reference.grid_sample(U, grid, mode="bicubic")
    with pytest.raises(ValueError, match="dV"):
        reference.grid_sample_backward(np.ones((1, 1, 4, 4)), U, grid)
    with pytest.raises(TypeError, match="dV"):
        reference.grid_sample_backward(np.ones((1, 1, 3, 3), np.float32), U, grid)


@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS)
@pytest.mark.parametrize("dtype, far", [(np.float64, 1e300), (np.float32, 1e30)])
def test_far_coordinates_agree_with_the_fast_sampler_without_warnings(
        rng, mode, padding_mode, align_corners, dtype, far):
    # Pixel coordinates this far out do not fit an int64; the indices must still come out
    # outside the image (zeros) or on its edge (border, reflection), silently.
    U = rng.standard_normal((1, 2, 4, 5)).astype(dtype)
    grid = np.array([[[[far, 0.1], [-far, -far], [0.2, far], [0.3, -0.4]]]], dtype=dtype)
    dV = rng.standard_normal((1, 2, 1, 4)).astype(dtype)
    args = mode, padding_mode, align_corners
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        V = reference.grid_sample(U, grid, *args)
        dU, dgrid = reference.grid_sample_backward(dV, U, grid, *args)
    np.testing.assert_allclose(V, grid_sample(U, grid, *args), rtol=0, atol=1e-6)
    fast_dU, fast_dgrid = grid_sample_backward(dV, U, grid, *args)
    np.testing.assert_allclose(dU, fast_dU, rtol=0, atol=1e-6)
    np.testing.assert_allclose(dgrid, fast_dgrid, rtol=0, atol=1e-6)
