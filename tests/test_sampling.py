"""Tests for stn_numpy.sampling: closed forms, finite differences, PyTorch parity, bad input."""

import itertools

import numpy as np
import pytest
from conftest import assert_same_bits, assert_sampler_gradients, normalize

from stn_numpy import (
    NonFiniteError,
    affine_grid,
    grid_sample,
    grid_sample_backward,
    grid_sample_backward_from_cache,
    grid_sample_forward,
    sampling,
)
from stn_numpy.gradcheck import rel_error
from stn_numpy.sampling import MODES, PADDING_MODES

ALL_COMBOS = list(itertools.product(MODES, PADDING_MODES, [True, False]))


def dense_bilinear_zeros(U, grid, align_corners):
    """Paper eq. (5) summed over every input pixel: an independent, loop-free reference."""
    N, C, H, W = U.shape
    x = grid[..., 0]
    y = grid[..., 1]
    if align_corners:
        x, y = (x + 1) / 2 * (W - 1), (y + 1) / 2 * (H - 1)
    else:
        x, y = ((x + 1) * W - 1) / 2, ((y + 1) * H - 1) / 2
    kx = np.maximum(0, 1 - np.abs(x[..., None] - np.arange(W)))  # (N, Ho, Wo, W)
    ky = np.maximum(0, 1 - np.abs(y[..., None] - np.arange(H)))  # (N, Ho, Wo, H)
    return np.einsum("nchw,nijh,nijw->ncij", U, ky, kx)


# ---------------------------------------------------------------------------------------
# Closed forms, no PyTorch needed
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("align_corners", [True, False])
def test_bilinear_zeros_matches_paper_formula(rng, align_corners):
    U = rng.standard_normal((2, 3, 5, 7))
    grid = rng.uniform(-1.3, 1.3, size=(2, 4, 6, 2))
    V = grid_sample(U, grid, "bilinear", "zeros", align_corners)
    np.testing.assert_allclose(V, dense_bilinear_zeros(U, grid, align_corners), atol=1e-13)


@pytest.mark.parametrize("mode,padding_mode,align_corners", ALL_COMBOS)
def test_identity_grid_reproduces_input(rng, mode, padding_mode, align_corners):
    U = rng.standard_normal((2, 3, 6, 5))
    identity = np.tile(np.array([[[1.0, 0, 0], [0, 1, 0]]]), (2, 1, 1))
    grid = affine_grid(identity, U.shape, align_corners)
    V = grid_sample(U, grid, mode, padding_mode, align_corners)
    np.testing.assert_allclose(V, U, atol=1e-12)


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
def test_integer_shift_moves_pixels(rng, mode):
    # Sampling at x + 1 pixel reads the right neighbour; the last column reads zero padding.
    U = rng.standard_normal((1, 2, 4, 6))
    H, W = 4, 6
    ys, xs = np.meshgrid(np.arange(H), np.arange(W) + 1.0, indexing="ij")
    grid = np.stack([normalize(xs, W, True), normalize(ys, H, True)], -1)[None]
    V = grid_sample(U, grid, mode, "zeros", align_corners=True)
    np.testing.assert_allclose(V[..., :-1], U[..., 1:], atol=1e-12)
    if mode != "bicubic":  # bicubic's last column still mixes in the pixel to the left
        np.testing.assert_allclose(V[..., -1], 0.0, atol=1e-12)


def test_bilinear_gradient_at_integer_is_right_hand_derivative():
    # At an exact integer x the sampler uses pixels x and x + 1, so dV/dx = U[x+1] - U[x],
    # times dx/dx_s = (W - 1) / 2 for align_corners=True.
    U = np.arange(5.0).reshape(1, 1, 1, 5) ** 2  # values 0, 1, 4, 9, 16
    W = 5
    grid = np.array([[[[normalize(2.0, W, True), 0.0]]]])
    _, dgrid = grid_sample_backward(np.ones((1, 1, 1, 1)), U, grid, "bilinear", "zeros", True)
    assert dgrid[0, 0, 0, 0] == pytest.approx((9 - 4) * (W - 1) / 2)


@pytest.mark.parametrize("align_corners", [True, False])
def test_border_clipped_coordinates_have_zero_gradient(align_corners):
    U = np.random.default_rng(0).standard_normal((1, 1, 4, 4))
    grid = np.array([[[[-3.0, 0.1], [3.0, 0.1], [0.1, -3.0], [0.1, 3.0]]]])
    _, dgrid = grid_sample_backward(np.ones((1, 1, 1, 4)), U, grid, "bilinear", "border",
                                    align_corners)
    assert dgrid[0, 0, 0, 0] == 0 and dgrid[0, 0, 1, 0] == 0
    assert dgrid[0, 0, 2, 1] == 0 and dgrid[0, 0, 3, 1] == 0


# ---------------------------------------------------------------------------------------
# Finite differences (float64, away from kinks: see conftest.smooth_pixel_coords)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,padding_mode,align_corners", ALL_COMBOS)
def test_gradients_match_finite_differences(rng, mode, padding_mode, align_corners):
    assert_sampler_gradients(grid_sample, grid_sample_backward, rng, mode, padding_mode,
                             align_corners)


# ---------------------------------------------------------------------------------------
# PyTorch parity: forward and both gradients, points inside, on the border and outside
# ---------------------------------------------------------------------------------------


def parity_grid(rng, N, Ho, Wo, H, W, align_corners):
    """Random points inside and outside plus points exactly on pixel centres, on the
    image border, on the reflection lines and on the normalized edges +-1."""
    grid = rng.uniform(-1.6, 1.6, size=(N, Ho, Wo, 2))
    special_x = [normalize(u, W, align_corners) for u in (-1.0, -0.5, 0.0, 0.5, W - 1.5, W - 1,
                                                           W - 0.5, W, 1.0, 2.5)]
    special_y = [normalize(u, H, align_corners) for u in (-0.5, 0.0, 1.0, H - 1, H - 0.5)]
    special_x += [-1.0, 1.0]
    special_y += [-1.0, 1.0]
    for k, (sx, sy) in enumerate(itertools.product(special_x, special_y)):
        n, i = divmod(k, Ho * Wo)
        if n >= N:
            break
        grid[n, i // Wo, i % Wo] = sx, sy
    return grid


@pytest.mark.parametrize("mode,padding_mode,align_corners", ALL_COMBOS)
def test_matches_torch_forward_and_backward(rng, mode, padding_mode, align_corners):
    torch = pytest.importorskip("torch", reason="PyTorch not installed: pip install torch==2.13.0")
    F = torch.nn.functional
    N, C, H, W, Ho, Wo = 3, 2, 5, 6, 7, 8
    U = rng.standard_normal((N, C, H, W))
    grid = parity_grid(rng, N, Ho, Wo, H, W, align_corners)
    dV = rng.standard_normal((N, C, Ho, Wo))
    V = grid_sample(U, grid, mode, padding_mode, align_corners)
    dU, dgrid = grid_sample_backward(dV, U, grid, mode, padding_mode, align_corners)

    U_t = torch.tensor(U, requires_grad=True)
    grid_t = torch.tensor(grid, requires_grad=True)
    V_t = F.grid_sample(U_t, grid_t, mode=mode, padding_mode=padding_mode,
                        align_corners=align_corners)
    V_t.backward(torch.tensor(dV))
    assert rel_error(V, V_t.detach().numpy()) <= 1e-10
    assert rel_error(dU, U_t.grad.numpy()) <= 1e-10
    assert rel_error(dgrid, grid_t.grad.numpy()) <= 1e-10
    if mode == "nearest":
        assert np.all(dgrid == 0)


@pytest.mark.parametrize("mode", MODES)
def test_float32_matches_torch(rng, mode):
    torch = pytest.importorskip("torch", reason="PyTorch not installed: pip install torch==2.13.0")
    U = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    grid = rng.uniform(-1.2, 1.2, size=(2, 5, 5, 2)).astype(np.float32)
    V = grid_sample(U, grid, mode)
    V_t = torch.nn.functional.grid_sample(torch.tensor(U), torch.tensor(grid), mode=mode,
                                          align_corners=False)
    assert V.dtype == np.float32
    np.testing.assert_allclose(V, V_t.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------
# dtype, shapes, bad input
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_keeps_dtype_and_leaves_inputs_alone(rng, dtype):
    U = rng.standard_normal((2, 3, 4, 5)).astype(dtype)
    grid = rng.uniform(-1, 1, (2, 3, 3, 2)).astype(dtype)
    dV = rng.standard_normal((2, 3, 3, 3)).astype(dtype)
    U0, grid0, dV0 = U.copy(), grid.copy(), dV.copy()
    V = grid_sample(U, grid)
    dU, dgrid = grid_sample_backward(dV, U, grid)
    assert V.dtype == dU.dtype == dgrid.dtype == dtype
    assert V.shape == (2, 3, 3, 3) and dU.shape == U.shape and dgrid.shape == grid.shape
    np.testing.assert_array_equal(U, U0)
    np.testing.assert_array_equal(grid, grid0)
    np.testing.assert_array_equal(dV, dV0)


EMPTY_SHAPES = [  # (N, C, H, W) of U, (Ho, Wo) of the grid: each one empty somewhere
    ((0, 3, 4, 4), (2, 2)),
    ((0, 1, 4, 4), (2, 2)),
    ((2, 0, 4, 5), (3, 3)),
    ((2, 1, 4, 5), (0, 3)),
    ((2, 3, 4, 5), (3, 0)),
    ((0, 0, 4, 5), (0, 0)),
]


@pytest.mark.parametrize("U_shape,out_hw", EMPTY_SHAPES)
@pytest.mark.parametrize("mode,padding_mode", itertools.product(MODES, PADDING_MODES))
def test_empty_dimensions_give_empty_or_zero_results(U_shape, out_hw, mode, padding_mode):
    # PyTorch accepts all of these (only an empty H or W of U is an error there too).
    N, C = U_shape[:2]
    U = np.ones(U_shape)
    grid = np.zeros((N,) + out_hw + (2,))
    dV = np.ones((N, C) + out_hw)
    V = grid_sample(U, grid, mode, padding_mode)
    assert V.shape == dV.shape
    for dU, dgrid in (grid_sample_backward(dV, U, grid, mode, padding_mode),
                      grid_sample_backward_from_cache(
                          dV, grid_sample_forward(U, grid, mode, padding_mode)[1])):
        assert dU.shape == U.shape and dgrid.shape == grid.shape
        # Each output point spreads its upstream 1 over weights summing to 1.
        assert dU.sum() == pytest.approx(dV.size)
        assert not dgrid.any()


def _extreme_grid(dtype, size, scale):
    """Coordinates at +-scale times the largest value the sampler accepts, and beside it."""
    limit = np.finfo(dtype).max / size
    values = np.array([limit, -limit, 1e9, -1e9, 0.3], dtype=dtype) * dtype(scale)
    x, y = np.meshgrid(values, values, indexing="ij")
    return np.stack([x, y], axis=-1)[None].astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("mode,padding_mode,align_corners", ALL_COMBOS)
def test_extreme_finite_coordinates_stay_in_range(rng, dtype, C, mode, padding_mode,
                                                  align_corners):
    U = rng.uniform(1, 2, (1, C, 5, 6)).astype(dtype)
    grid = _extreme_grid(dtype, 6, 1)
    opts = (mode, padding_mode, align_corners)
    V, cache = grid_sample_forward(U, grid, *opts)
    # take(mode="clip") would silently move an out-of-range row back into U.
    ring = sampling._RING[mode]
    for _, _, rows, offset in sampling._block_taps(grid, U.shape[2:], *opts)[0]:
        assert 0 <= rows.min() and rows.max() + offset < (5 + 2 * ring) * (6 + 2 * ring)
    np.testing.assert_array_equal(grid_sample(U, grid, *opts), V)
    dU, dgrid = grid_sample_backward(np.ones_like(V), U, grid, *opts)
    assert np.isfinite(V).all() and np.isfinite(dU).all() and np.isfinite(dgrid).all()
    far = np.abs(grid[0]) > 1e8
    if padding_mode == "zeros":
        assert not V[0][:, far.any(axis=-1)].any()
    elif padding_mode == "border" and mode != "bicubic":
        corners = U[0, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
        assert set(V[0, 0][far.all(axis=-1)]) <= set(corners)
    else:
        assert (V[0][:, far.any(axis=-1)] > 0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode,padding_mode,align_corners", ALL_COMBOS)
def test_coordinates_whose_pixel_position_overflows_raise(dtype, mode, padding_mode,
                                                          align_corners):
    # Decision: such a point has no pixel position (PyTorch returns NaN or crashes there);
    # it is refused like an infinite one, so a diverging trainer stops cleanly.
    U = np.ones((1, 3, 5, 6), dtype=dtype)
    grid = _extreme_grid(dtype, 6, 1.01)
    for call in (lambda C: grid_sample(U[:, :C], grid, mode, padding_mode, align_corners),
                 lambda C: grid_sample_backward(np.ones((1, C, 5, 5), dtype), U[:, :C], grid,
                                                mode, padding_mode, align_corners)):
        for C in (1, 3):
            with pytest.raises(NonFiniteError, match="20 value.s. beyond .* overflows"):
                call(C)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_affine_theta_never_crashes_the_sampler(dtype):
    U = np.ones((1, 3, 5, 6), dtype=dtype)
    for value in (np.finfo(dtype).max / 2, np.finfo(dtype).max / 8, 1e37, 1e30):
        theta = np.full((1, 2, 3), value, dtype=dtype)
        with np.errstate(over="ignore"):
            grid = affine_grid(theta, U.shape)
        try:
            V = grid_sample(U, grid, padding_mode="reflection")
        except NonFiniteError:
            assert np.abs(grid).max() > np.finfo(dtype).max / 6
        else:
            assert np.isfinite(V).all()


@pytest.mark.parametrize(
    "U_shape,grid_shape,error,match",
    [
        ((3, 4, 4), (1, 2, 2, 2), ValueError, "U must have shape"),
        ((1, 1, 4, 4), (1, 2, 2), ValueError, "grid must have shape"),
        ((1, 1, 4, 4), (1, 2, 2, 3), ValueError, r"grid must have shape \(\*, \*, \*, 2\)"),
        ((2, 1, 4, 4), (3, 2, 2, 2), ValueError, "batch size"),
        ((1, 1, 0, 4), (1, 2, 2, 2), ValueError, "H, W >= 1"),
    ],
)
def test_rejects_bad_shapes(U_shape, grid_shape, error, match):
    with pytest.raises(error, match=match):
        grid_sample(np.zeros(U_shape), np.zeros(grid_shape))


def test_rejects_bad_dtypes_and_options():
    U = np.zeros((1, 1, 4, 4))
    grid = np.zeros((1, 2, 2, 2))
    with pytest.raises(TypeError, match="U must have dtype float32 or float64, got int64"):
        grid_sample(np.zeros((1, 1, 4, 4), dtype=np.int64), grid)
    with pytest.raises(TypeError, match="grid must have the dtype of U"):
        grid_sample(U, grid.astype(np.float32))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        grid_sample(U.tolist(), grid)
    with pytest.raises(ValueError, match="mode must be one of"):
        grid_sample(U, grid, mode="area")
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        grid_sample(U, grid, padding_mode="wrap")
    with pytest.raises(ValueError, match="dV must have shape"):
        grid_sample_backward(np.zeros((1, 1, 3, 3)), U, grid)


@pytest.mark.parametrize("cache", [None, ("S", "S_x"), {"U_shape": (1, 1, 4, 4)}])
def test_backward_from_cache_rejects_other_objects(cache):
    with pytest.raises(TypeError, match="cache must be the cache grid_sample_forward returned"):
        grid_sample_backward_from_cache(np.zeros((1, 1, 2, 2)), cache)


def test_backward_from_cache_returns_the_documented_shapes(rng):
    U = rng.standard_normal((2, 3, 5, 6))
    grid = rng.uniform(-1, 1, (2, 4, 7, 2))
    _, cache = grid_sample_forward(U, grid)
    dU, dgrid = grid_sample_backward_from_cache(rng.standard_normal((2, 3, 4, 7)), cache)
    assert dU.shape == (2, 3, 5, 6) and dgrid.shape == (2, 4, 7, 2)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_grid_raises(bad):
    # Decision: a NaN/inf coordinate points nowhere, so we raise instead of guessing.
    grid = np.zeros((1, 2, 2, 2))
    grid[0, 1, 0, 1] = bad
    with pytest.raises(NonFiniteError, match="grid contains 1 non-finite"):
        grid_sample(np.zeros((1, 1, 4, 4)), grid)
    assert issubclass(NonFiniteError, ValueError)


@pytest.mark.parametrize("C", [1, 4])
def test_backward_with_the_forwards_rows_or_without_gives_the_same_bits(rng, C):
    # The cache keeps the forward's padded rows of U per block (and whether it took the
    # factored form); a backward whose blocks differ (another thread count) rebuilds the
    # rows, and so does the uncached backward.
    from stn_numpy import _parallel

    U = rng.standard_normal((6, C, 5, 7)).astype(np.float32)
    grid = rng.uniform(-1.3, 1.3, (6, 4, 3, 2)).astype(np.float32)
    dV = rng.standard_normal((6, C, 4, 3)).astype(np.float32)
    original, padded_rows = sampling._BLOCK, sampling._padded_rows
    factored_bilinear = sampling._factored_bilinear
    try:
        sampling._BLOCK = 4 * 3 * (C + 4) * 2  # two images per block
        _parallel.set_num_threads(1)
        _, cache = grid_sample_forward(U, grid)
        assert sorted(cache.rows) == [(0, 2), (2, 4), (4, 6)]
        built = []

        def counting(U_block, ring):
            built.append(len(U_block))
            return padded_rows(U_block, ring)

        sampling._padded_rows = counting
        sampling._factored_bilinear = None  # the cache's answer is used, not recomputed
        kept = grid_sample_backward_from_cache(dV, cache)
        sampling._factored_bilinear = factored_bilinear
        assert built == []  # every block read the forward's rows
        _parallel.set_num_threads(2)  # blocks (0,1) (1,3) (3,4) (4,6): one is the forward's
        assert [(b.start, b.stop) for b in sampling._blocks(6, 12, C)] == [
            (0, 1), (1, 3), (3, 4), (4, 6)]
        rebuilt = grid_sample_backward_from_cache(dV, cache)
        assert sorted(built) == [1, 1, 2]  # the three others rebuilt theirs
    finally:
        sampling._padded_rows = padded_rows
        sampling._factored_bilinear = factored_bilinear
        sampling._BLOCK = original
        _parallel.set_num_threads(None)
    for a, b in zip(kept, rebuilt, strict=True):
        assert np.array_equal(a, b)
    for a, b in zip(kept, grid_sample_backward(dV, U, grid), strict=True):
        assert np.array_equal(a, b)
    assert grid_sample_forward(U, grid, mode="nearest")[1].rows == {}  # never read again


@pytest.mark.parametrize("threads", [1, 2])
def test_bad_grid_values_in_any_block_raise_with_the_whole_grids_count(threads):
    # The forward checks the grid block by block on the worker threads; a bad value in a
    # late block must still raise before V is returned, and name every bad value.
    from stn_numpy import _parallel

    U = np.zeros((6, 1, 4, 4))
    grid = np.zeros((6, 2, 2, 2))
    grid[5, 1, 1, 0] = np.inf
    grid[2, 0, 0, 1] = np.nan
    original = sampling._BLOCK
    try:
        sampling._BLOCK = 2 * 2 * (1 + 4)  # one image per block
        _parallel.set_num_threads(threads)
        assert len(sampling._blocks(6, 4, 1)) == 6
        for call in (grid_sample, grid_sample_forward):
            with pytest.raises(NonFiniteError, match="grid contains 2 non-finite") as error:
                call(U, grid)
            assert error.value.__context__ is None  # no internal exception chained to it
        grid[2, 0, 0, 1] = grid[5, 1, 1, 0] = 0.0
        grid[4, 0, 1, 0] = np.finfo(np.float64).max / 3
        with pytest.raises(NonFiniteError, match="1 value.s. beyond"):
            grid_sample(U, grid)
    finally:
        sampling._BLOCK = original
        _parallel.set_num_threads(None)


@pytest.mark.parametrize("C", [1, 2, 5])
def test_V_and_dU_are_views_of_channels_last_rows(rng, C):
    # Documented layout: V's memory is (N, H_o, W_o, C), the sampler's own rows, and a
    # channels-last V fed back in samples as its channel-first copy does.
    U = rng.standard_normal((2, C, 4, 5))
    grid = rng.uniform(-1.2, 1.2, (2, 3, 6, 2))
    from stn_numpy import reference

    for V in (grid_sample(U, grid), grid_sample_forward(U, grid)[0]):
        assert V.shape == (2, C, 3, 6)
        assert V.transpose(0, 2, 3, 1).flags.c_contiguous
        np.testing.assert_allclose(V, reference.grid_sample(U, grid), rtol=1e-12, atol=1e-12)
    dU, _ = grid_sample_backward(rng.standard_normal((2, C, 3, 6)), U, grid)
    assert dU.transpose(0, 2, 3, 1).flags.c_contiguous
    V = grid_sample(U, grid)
    again = grid_sample(V, grid[:, :2, :3])
    np.testing.assert_array_equal(again, grid_sample(np.ascontiguousarray(V), grid[:, :2, :3]))


def test_nan_in_input_propagates():
    U = np.zeros((1, 1, 4, 4))
    U[0, 0, 1, 1] = np.nan
    V = grid_sample(U, np.zeros((1, 1, 1, 2)), align_corners=True)  # centre mixes pixel (1,1)
    assert np.isnan(V).all()


@pytest.mark.parametrize("value", [np.inf, -np.inf, 3e38, -3e38])
def test_extreme_pixels_give_the_four_tap_sum_on_one_channel(value):
    """One channel takes a factored bilinear form whose differences of neighbours would
    turn inf into NaN and overflow near the dtype's limit; such inputs must give what the
    plain four-tap sum of the reference sampler (PyTorch's formula) gives."""
    from stn_numpy import reference

    U = np.zeros((1, 1, 3, 3), dtype=np.float32)
    U[0, 0, 1, 1] = value
    U[0, 0, 1, 2] = -value if np.isfinite(value) else 0
    grid = np.array([[[[0.1, 0.0], [0.4, 0.05], [2.0, 2.0]]]], dtype=np.float32)
    dV = np.ones((1, 1, 1, 3), dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        V, (_, dgrid) = grid_sample(U, grid), grid_sample_backward(dV, U, grid)
        V_ref = reference.grid_sample(U, grid)
        _, dgrid_ref = reference.grid_sample_backward(dV, U, grid)
    np.testing.assert_array_equal(V, V_ref)
    np.testing.assert_array_equal(np.isnan(dgrid), np.isnan(dgrid_ref))
    assert not np.isnan(V).any()  # inf stays inf, +-3e38 neighbours stay finite


def test_blocks_are_a_multiple_of_the_workers_and_cover_the_batch():
    from stn_numpy import _parallel

    try:
        for threads in (1, 2, 3):
            _parallel.set_num_threads(threads)
            for N in (1, 6, 10, 14, 256):
                blocks = sampling._blocks(N, 60 * 60, 1)
                assert [n for b in blocks for n in range(b.start, b.stop)] == list(range(N))
                assert len(blocks) == 1 or len(blocks) % threads == 0 or len(blocks) == N
    finally:
        _parallel.set_num_threads(None)


@pytest.mark.parametrize("mode,padding_mode,align_corners", ALL_COMBOS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_identity_transform_gradients_match_torch(rng, mode, padding_mode, align_corners, dtype):
    # The identity puts every sample on a pixel centre, where the sampler's gradient jumps:
    # the theta gradient agrees only because affine_grid reproduces PyTorch's identity grid
    # bit for bit.
    torch = pytest.importorskip("torch", reason="PyTorch not installed: pip install torch==2.13.0")
    F = torch.nn.functional
    from stn_numpy import affine_grid_backward

    N, C, H, W = 2, 2, 8, 9
    theta = np.tile(np.array([[[1.0, 0, 0], [0, 1, 0]]], dtype=dtype), (N, 1, 1))
    U = rng.standard_normal((N, C, H, W)).astype(dtype)
    dV = rng.standard_normal((N, C, H, W)).astype(dtype)
    grid = affine_grid(theta, U.shape, align_corners)
    _, dgrid = grid_sample_backward(dV, U, grid, mode, padding_mode, align_corners)
    dtheta = affine_grid_backward(dgrid, theta, U.shape, align_corners)

    theta_t = torch.tensor(theta, requires_grad=True)
    grid_t = F.affine_grid(theta_t, U.shape, align_corners=align_corners)
    np.testing.assert_array_equal(grid, grid_t.detach().numpy())
    F.grid_sample(torch.tensor(U), grid_t, mode=mode, padding_mode=padding_mode,
                  align_corners=align_corners).backward(torch.tensor(dV))
    tol = 1e-10 if dtype == np.float64 else 1e-4
    assert rel_error(dtheta, theta_t.grad.numpy()) <= tol


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode,padding_mode,align_corners", ALL_COMBOS)
def test_results_do_not_depend_on_blocks_or_threads(rng, dtype, mode, padding_mode,
                                                    align_corners):
    # One image per block on one thread against the whole batch in one block on two
    # threads: every bit of V, dU and dgrid must agree. Points lie outside too.
    from stn_numpy import _parallel

    U = rng.standard_normal((5, 2, 6, 7)).astype(dtype)
    grid = rng.uniform(-1.5, 1.5, (5, 4, 3, 2)).astype(dtype)
    grid[0, 0, 0] = [0.0, -1.0]  # exact kinks
    dV = rng.standard_normal((5, 2, 4, 3)).astype(dtype)
    kw = {"mode": mode, "padding_mode": padding_mode, "align_corners": align_corners}
    results = []
    original = sampling._BLOCK
    try:
        for block, threads in ((4 * 3 * (2 + 4), 1), (10**9, 2), (2 * 4 * 3 * (2 + 4), 2)):
            sampling._BLOCK = block
            _parallel.set_num_threads(threads)
            V, cache = grid_sample_forward(U, grid, **kw)
            results.append((V, grid_sample(U, grid, **kw),
                            *grid_sample_backward_from_cache(dV, cache)))
    finally:
        sampling._BLOCK = original
        _parallel.set_num_threads(None)
    assert_same_bits(results)


@pytest.mark.parametrize("mode,padding_mode,align_corners", ALL_COMBOS)
def test_results_do_not_depend_on_the_grid_layout(rng, mode, padding_mode, align_corners):
    # affine_grid hands over (N, 2, H, W) planes; users pass interleaved (x, y) pairs or
    # any strided view. The sampler must read every one of them to the same bits, and
    # return dgrid in planes whatever it was given.
    U = rng.standard_normal((3, 2, 6, 7))
    dV = rng.standard_normal((3, 2, 4, 5))
    interleaved = rng.uniform(-1.5, 1.5, (3, 4, 5, 2))
    planes = np.moveaxis(np.ascontiguousarray(np.moveaxis(interleaved, -1, 1)), 1, -1)
    strided = np.zeros((3, 8, 5, 4))[:, ::2, :, 1::2]
    strided[...] = interleaved
    kw = {"mode": mode, "padding_mode": padding_mode, "align_corners": align_corners}
    results = []
    for grid in (interleaved, planes, strided):
        V, cache = grid_sample_forward(U, grid, **kw)
        dU, dgrid = grid_sample_backward_from_cache(dV, cache)
        assert np.moveaxis(dgrid, -1, 1).flags.c_contiguous
        results.append((V, dU, dgrid))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_backward_without_input_grad_skips_only_dU(rng, mode):
    U = rng.standard_normal((3, 2, 6, 7))
    grid = rng.uniform(-1.2, 1.2, (3, 4, 5, 2))
    dV = rng.standard_normal((3, 2, 4, 5))
    _, cache = grid_sample_forward(U, grid, mode)
    dU, dgrid = grid_sample_backward_from_cache(dV, cache)
    none, dgrid_only = grid_sample_backward_from_cache(dV, cache, input_grad=False)
    assert none is None and dU.shape == U.shape
    np.testing.assert_array_equal(dgrid_only, dgrid)


def test_bilinear_dgrid_of_an_infinite_dV_is_the_references_not_nan():
    from stn_numpy import reference

    rng = np.random.default_rng(0)
    for C in (1, 3):
        for padding_mode in PADDING_MODES:
            U = rng.standard_normal((1, C, 4, 5))
            grid = rng.uniform(-1.3, 1.3, (1, 3, 3, 2))
            dV = rng.standard_normal((1, C, 3, 3))
            dV[0, 0, 1, 1], dV[0, 0, 0, 0] = np.inf, -np.inf
            with np.errstate(all="ignore"):
                _, dgrid = grid_sample_backward(dV, U, grid, "bilinear", padding_mode)
                _, expected = reference.grid_sample_backward(dV, U, grid, "bilinear",
                                                             padding_mode)
            assert (np.isnan(dgrid) == np.isnan(expected)).all()
            assert (np.isinf(dgrid) == np.isinf(expected)).all()
            assert (np.sign(dgrid) == np.sign(expected))[np.isinf(expected)].all()


def test_sparse_indices_widen_to_int64_beyond_int32(monkeypatch):
    import stn_numpy.sampling as sampling

    rng = np.random.default_rng(1)
    U = rng.standard_normal((2, 2, 5, 6))
    grid = rng.uniform(-1.1, 1.1, (2, 4, 3, 2))
    dV = rng.standard_normal((2, 2, 4, 3))
    expected = grid_sample_backward(dV, U, grid, "bicubic")[0]
    import types

    seen = []
    real = sampling.sp.csr_matrix

    def csr_matrix(arg, shape):
        seen.append((arg[1].dtype, arg[2].dtype))
        return real(arg, shape=shape)

    monkeypatch.setattr(sampling, "_INT32_MAX", 100)  # as if 134M points were few
    monkeypatch.setattr(sampling, "sp", types.SimpleNamespace(csr_matrix=csr_matrix))
    dU = grid_sample_backward(dV, U, grid, "bicubic")[0]
    # scipy keeps int64 where the values need it (and narrows them where they fit).
    assert seen and set(seen) == {(np.dtype(np.int64), np.dtype(np.int64))}
    np.testing.assert_array_equal(dU, expected)


# A law over generated inputs, kept from a hostile round: every dtype, layout, option and
# shape mistake, 1-pixel and elongated images, extreme values; the sampler returns or
# raises TypeError/ValueError naming an argument, never changes its inputs, and on valid
# float64 input agrees with the plain reference.
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _hostile_sampler_inputs(draw):
    def mostly(good, bad):
        return draw(st.sampled_from(good) if draw(st.integers(0, 5)) else st.sampled_from(bad))

    N, C = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    H, W = draw(st.sampled_from([(1, 1), (1, 17), (17, 1), (3, 4), (5, 2)]))
    Ho, Wo = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    dtype = mostly([np.float32, np.float64], [np.float16, np.int32, np.complex128, bool, object])
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = draw(st.sampled_from(["normal", "special", "wide"]))

    def make(shape, spread=1.0):
        if values == "special":
            a = rng.choice([0.0, -0.0, 1.0, -1.0, 0.5, 1e-320, 1e308, np.inf, np.nan], shape)
        else:
            a = rng.standard_normal(shape) * spread
            if values == "wide":
                a *= 10.0 ** rng.integers(-30, 30, shape)
        with np.errstate(all="ignore"):
            return a.astype(dtype)

    grid = make((N, Ho, Wo, 2), 1.3)
    if draw(st.integers(0, 9)) == 0:
        grid = np.moveaxis(grid, -1, 1)  # a channels-first grid: a layout mistake
    return (make((N, C, H, W)), grid, make((N, C, Ho, Wo)),
            mostly(list(MODES), ["Bilinear", None, np.array(["bilinear"])]),
            mostly(list(PADDING_MODES), ["wrap", ["zeros"]]),
            mostly([True, False], ["False", 1, np.array([True])]))


@settings(max_examples=80, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(_hostile_sampler_inputs())
def test_hostile_inputs_give_results_or_errors_naming_an_argument(case):
    from stn_numpy import reference

    U, grid, dV, mode, padding_mode, align_corners = case
    before = [a.copy() for a in (U, grid, dV)]
    results = []
    for call in (lambda: grid_sample(U, grid, mode, padding_mode, align_corners),
                 lambda: grid_sample_backward(dV, U, grid, mode, padding_mode, align_corners)):
        try:
            with np.errstate(all="ignore"):
                results.append(call())
        except (TypeError, ValueError) as exc:
            assert any(name in str(exc) for name in ("U", "grid", "dV", "mode", "padding_mode",
                                                     "align_corners")), exc
    for a, b in zip((U, grid, dV), before, strict=True):
        assert a.dtype == object or a.tobytes() == b.tobytes()
    if (len(results) == 2 and mode in ("bilinear", "nearest") and U.dtype == np.float64
            and np.isfinite(U).all() and np.isfinite(dV).all()):
        with np.errstate(all="ignore"):
            expected = (reference.grid_sample(U, grid, mode, padding_mode, align_corners),
                        *reference.grid_sample_backward(dV, U, grid, mode, padding_mode,
                                                        align_corners))
        for ours, theirs in zip((results[0], *results[1]), expected, strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9 * max(
                1.0, float(np.max(np.abs(theirs), initial=0))))
