"""Tests for volumes in stn_numpy.sampling (and grids' 3-D affine_grid): the plain
reference, finite differences, PyTorch parity at the kinks of every axis, the axis order,
bit-identity for any split, sizes and bad input."""

import itertools

import numpy as np
import pytest
from conftest import assert_same_bits, normalize, smooth_volume_grid

from stn_numpy import (
    NonFiniteError,
    affine_grid,
    affine_grid_backward,
    grid_sample,
    grid_sample_backward,
    grid_sample_backward_from_cache,
    grid_sample_forward,
    reference,
)
from stn_numpy.gradcheck import numerical_gradient, rel_error
from stn_numpy.sampling import PADDING_MODES, volumes
from stn_numpy.verify.volumes import COMBOS_3D, make_volume_grid

# (N, C, D, H, W) of U and (Do, Ho, Wo) of the grid: a plain case, 1-voxel axes and
# elongated ones.
SHAPES = [
    ((2, 3, 4, 5, 6), (5, 6, 7)),
    ((1, 2, 1, 1, 1), (6, 5, 7)),
    ((2, 1, 1, 9, 2), (4, 5, 9)),
    ((1, 2, 7, 1, 3), (7, 2, 9)),
    ((1, 1, 13, 2, 1), (9, 4, 5)),
]


def torch_sample(U, grid, dV, mode, padding_mode, align_corners):
    torch = pytest.importorskip("torch", reason="PyTorch not installed: pip install torch==2.13.0")
    U_t = torch.tensor(U, requires_grad=True)
    grid_t = torch.tensor(grid, requires_grad=True)
    V_t = torch.nn.functional.grid_sample(U_t, grid_t, mode=mode, padding_mode=padding_mode,
                                          align_corners=align_corners)
    V_t.backward(torch.tensor(dV))
    dgrid = np.zeros_like(grid) if grid_t.grad is None else grid_t.grad.numpy()
    return V_t.detach().numpy(), U_t.grad.numpy(), dgrid


# ---------------------------------------------------------------------------------------
# Closed forms and the axis order
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS_3D)
def test_identity_grid_reproduces_a_ramp_along_every_axis(mode, padding_mode, align_corners):
    # U[z, y, x] = 100 z + 10 y + x: a grid with x, y, z swapped (kornia's (d, x, y)
    # mistake) would read other voxels and differ by up to 45 on a 4x4x4 ramp.
    D, H, W = 3, 4, 5
    z, y, x = np.meshgrid(np.arange(D), np.arange(H), np.arange(W), indexing="ij")
    U = (100.0 * z + 10 * y + x)[None, None]
    theta = np.eye(3, 4)[None]
    grid = affine_grid(theta, (1, 1, D, H, W), align_corners)
    assert grid.shape == (1, D, H, W, 3)
    np.testing.assert_allclose(grid_sample(U, grid, mode, padding_mode, align_corners), U,
                               atol=1e-12)


@pytest.mark.parametrize("axis,step", [(0, (0, 0, 1)), (1, (0, 1, 0)), (2, (1, 0, 0))])
def test_grid_coordinate_a_moves_along_tensor_axis_minus_a(axis, step):
    # grid[..., 0] = x moves along W (the last tensor axis), y along H, z along D.
    D, H, W = 4, 5, 6
    U = np.random.default_rng(0).standard_normal((1, 1, D, H, W))
    theta = np.eye(3, 4)[None]
    theta[0, axis, 3] = 2.0 / (W, H, D)[axis]  # one voxel, align_corners=False
    V = grid_sample(U, affine_grid(theta, (1, 1, D, H, W)), "nearest")
    dz, dy, dx = step
    np.testing.assert_array_equal(V[0, 0, :D - dz, :H - dy, :W - dx], U[0, 0, dz:, dy:, dx:])


def test_bilinear_is_a_product_of_three_hat_functions(rng):
    # Eq. (5) in three axes summed over every voxel: independent of corners and floors.
    N, C, D, H, W = 2, 2, 3, 4, 5
    U = rng.standard_normal((N, C, D, H, W))
    grid = rng.uniform(-1.3, 1.3, (N, 2, 3, 4, 3))
    x, y, z = (((grid[..., a] + 1) * size - 1) / 2 for a, size in enumerate((W, H, D)))
    kx, ky, kz = (np.maximum(0, 1 - np.abs(c[..., None] - np.arange(size)))
                  for c, size in ((x, W), (y, H), (z, D)))
    expected = np.einsum("ncdhw,nijkd,nijkh,nijkw->ncijk", U, kz, ky, kx)
    assert rel_error(grid_sample(U, grid), expected) < 1e-14


def test_bilinear_gradient_at_an_integer_is_the_right_hand_derivative():
    # U = x + 10 y + 100 z^2 along the axes; at z = 1 exactly, dV/dz uses voxels 1 and 2.
    D, H, W = 4, 3, 3
    z = np.arange(D, dtype=float)
    U = np.broadcast_to((100 * z**2)[:, None, None], (D, H, W))[None, None].copy()
    grid = np.array([[[[[0.0, 0.0, normalize(1.0, D, True)]]]]])
    _, dgrid = grid_sample_backward(np.ones((1, 1, 1, 1, 1)), U, grid, "bilinear", "zeros",
                                    True)
    assert dgrid[0, 0, 0, 0, 2] == pytest.approx((400 - 100) * (D - 1) / 2)


# ---------------------------------------------------------------------------------------
# The plain reference and finite differences
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,out", SHAPES[:3])
@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS_3D)
def test_fast_path_matches_the_plain_reference(rng, shape, out, mode, padding_mode,
                                               align_corners):
    U = rng.standard_normal(shape)
    grid = make_volume_grid(shape[0], *out, *shape[2:], align_corners, rng=rng)
    dV = rng.standard_normal((*shape[:2], *out))
    opts = (mode, padding_mode, align_corners)
    ours = (grid_sample(U, grid, *opts), *grid_sample_backward(dV, U, grid, *opts))
    plain = (reference.grid_sample(U, grid, *opts),
             *reference.grid_sample_backward(dV, U, grid, *opts))
    for a, b in zip(ours, plain, strict=True):
        assert a.shape == b.shape
        assert rel_error(a, b) < 1e-14


@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS_3D)
def test_gradients_match_finite_differences(rng, mode, padding_mode, align_corners):
    N, C, D, H, W, out = 2, 2, 3, 4, 5, (2, 3, 2)
    U = rng.standard_normal((N, C, D, H, W))
    grid = smooth_volume_grid(rng, N, out, D, H, W, align_corners)
    dV = rng.standard_normal((N, C, *out))
    opts = (mode, padding_mode, align_corners)
    dU, dgrid = grid_sample_backward(dV, U, grid, *opts)
    # V is linear in U: central differences are exact up to round-off.
    assert rel_error(dU, numerical_gradient(lambda u: grid_sample(u, grid, *opts), U.copy(),
                                            dV)) < 1e-8
    num_dgrid = numerical_gradient(lambda g: grid_sample(U, g, *opts), grid.copy(), dV)
    if mode == "nearest":
        assert not dgrid.any() and not num_dgrid.any()
    else:
        assert rel_error(dgrid, num_dgrid) < 1e-7


@pytest.mark.parametrize("align_corners", [True, False])
def test_theta_gradient_through_the_sampler_matches_finite_differences(rng, align_corners):
    N, C, D, H, W = 2, 2, 4, 5, 6
    size = (N, C, 3, 4, 5)
    U = rng.standard_normal((N, C, D, H, W))
    theta = np.eye(3, 4) + 0.1 * rng.standard_normal((N, 3, 4))
    dV = rng.standard_normal((N, C, 3, 4, 5))

    def loss_input(t):
        return grid_sample(U, affine_grid(t, size, align_corners), "bilinear", "border",
                           align_corners)

    grid = affine_grid(theta, size, align_corners)
    _, dgrid = grid_sample_backward(dV, U, grid, "bilinear", "border", align_corners)
    dtheta = affine_grid_backward(dgrid, theta, size, align_corners)
    assert rel_error(dtheta, numerical_gradient(loss_input, theta.copy(), dV)) < 1e-6
    # affine_grid alone is linear in theta: exact differences.
    dg = rng.standard_normal(grid.shape)
    num = numerical_gradient(lambda t: affine_grid(t, size, align_corners), theta.copy(), dg)
    assert rel_error(affine_grid_backward(dg, theta, size, align_corners), num) < 1e-8


# ---------------------------------------------------------------------------------------
# PyTorch parity at the kinks of every axis
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,out", SHAPES)
@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS_3D)
def test_matches_torch_at_the_special_points(rng, shape, out, mode, padding_mode,
                                             align_corners):
    U = rng.standard_normal(shape)
    grid = make_volume_grid(shape[0], *out, *shape[2:], align_corners, rng=rng)
    dV = rng.standard_normal((*shape[:2], *out))
    opts = (mode, padding_mode, align_corners)
    theirs = torch_sample(U, grid, dV, *opts)
    V, cache = grid_sample_forward(U, grid, *opts)
    ours = (V, *grid_sample_backward_from_cache(dV, cache))
    for name, a, b in zip(("V", "dU", "dgrid"), ours, theirs, strict=True):
        assert rel_error(a, b) <= 1e-10, name


@pytest.mark.parametrize("shape,out", SHAPES[:3])
@pytest.mark.parametrize("align_corners", [True, False])
def test_affine_grid_and_theta_gradient_match_torch(rng, shape, out, align_corners):
    torch = pytest.importorskip("torch", reason="PyTorch not installed: pip install torch==2.13.0")
    N, C = shape[:2]
    size = (N, C, *out)
    U = rng.standard_normal(shape)
    theta = np.eye(3, 4) + 0.3 * rng.standard_normal((N, 3, 4))
    dV = rng.standard_normal((N, C, *out))
    grid = affine_grid(theta, size, align_corners)
    V, cache = grid_sample_forward(U, grid, "bilinear", "reflection", align_corners)
    _, dgrid = grid_sample_backward_from_cache(dV, cache, input_grad=False)
    dtheta = affine_grid_backward(dgrid, theta, size, align_corners)

    theta_t = torch.tensor(theta, requires_grad=True)
    with pytest.warns(UserWarning) if 1 in out and align_corners else _nothing():
        grid_t = torch.nn.functional.affine_grid(theta_t, size, align_corners=align_corners)
    V_t = torch.nn.functional.grid_sample(torch.tensor(U), grid_t, "bilinear", "reflection",
                                          align_corners)
    V_t.backward(torch.tensor(dV))
    assert rel_error(grid, grid_t.detach().numpy()) <= 1e-10
    assert rel_error(V, V_t.detach().numpy()) <= 1e-10
    assert rel_error(dtheta, theta_t.grad.numpy()) <= 1e-10


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_float32_matches_torch(rng, mode):
    U = rng.standard_normal((2, 3, 5, 6, 7)).astype(np.float32)
    grid = rng.uniform(-1.2, 1.2, (2, 4, 3, 5, 3)).astype(np.float32)
    dV = rng.standard_normal((2, 3, 4, 3, 5)).astype(np.float32)
    theirs = torch_sample(U, grid, dV, mode, "zeros", False)
    ours = (grid_sample(U, grid, mode), *grid_sample_backward(dV, U, grid, mode))
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == np.float32
        assert rel_error(a, b) <= 1e-5


# ---------------------------------------------------------------------------------------
# Chunks and threads
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [1, 5])
@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS_3D)
def test_results_do_not_depend_on_chunks_or_threads(rng, dtype, C, mode, padding_mode,
                                                    align_corners):
    # Whole batch in one chunk on one thread, against chunks of a few points (parts of a
    # volume, several chunks per volume) and of whole volumes on 2 and 3 threads: every
    # bit of V, dU and dgrid must agree, dU being summed across chunks.
    from stn_numpy import _parallel

    U = rng.standard_normal((3, C, 4, 5, 3)).astype(dtype)
    grid = rng.uniform(-1.5, 1.5, (3, 4, 3, 5, 3)).astype(dtype)
    grid[0, 0, 0, 0] = [0.0, -1.0, 1.0]  # exact kinks
    dV = rng.standard_normal((3, C, 4, 3, 5)).astype(dtype)
    opts = (mode, padding_mode, align_corners)
    results = []
    original = volumes._CHUNK
    try:
        for chunk, threads in ((10**9, 1), (7 * (C + 8), 2), (60 * (C + 8), 3),
                               (100 * (C + 8), 2), (7 * (C + 8), 1)):
            volumes._CHUNK = chunk
            _parallel.set_num_threads(threads)
            V, cache = grid_sample_forward(*(U, grid), *opts)
            results.append((V, grid_sample(U, grid, *opts),
                            *grid_sample_backward_from_cache(dV, cache),
                            *grid_sample_backward(dV, U, grid, *opts)))
    finally:
        volumes._CHUNK = original
        _parallel.set_num_threads(None)
    assert_same_bits(results)


def test_chunks_cover_every_point_once():
    from stn_numpy import _parallel

    original = volumes._CHUNK
    try:
        volumes._CHUNK = 10 * (1 + 8)  # 10 points per chunk
        for threads, N, P in itertools.product((1, 2, 3), (1, 2, 5), (1, 7, 10, 64)):
            _parallel.set_num_threads(threads)
            covered = np.zeros((N, P), dtype=int)
            for n0, n1, p0, p1 in volumes._chunks(N, P, 1):
                assert (n1 - n0 == 1) or (p0, p1) == (0, P)
                covered[n0:n1, p0:p1] += 1
            assert (covered == 1).all()
    finally:
        volumes._CHUNK = original
        _parallel.set_num_threads(None)


def test_without_input_grad_dgrid_is_the_same(rng):
    U = rng.standard_normal((2, 2, 4, 5, 6))
    grid = rng.uniform(-1.2, 1.2, (2, 3, 4, 5, 3))
    dV = rng.standard_normal((2, 2, 3, 4, 5))
    _, cache = grid_sample_forward(U, grid)
    dU, dgrid = grid_sample_backward_from_cache(dV, cache, input_grad=False)
    assert dU is None
    np.testing.assert_array_equal(dgrid, grid_sample_backward(dV, U, grid)[1])


# ---------------------------------------------------------------------------------------
# Sizes and bad input
# ---------------------------------------------------------------------------------------


EMPTY_SHAPES = [  # (N, C, D, H, W) of U, (Do, Ho, Wo) of the grid: each empty somewhere
    ((0, 2, 3, 4, 4), (2, 2, 2)),
    ((2, 0, 3, 4, 5), (3, 3, 2)),
    ((2, 1, 3, 4, 5), (0, 3, 2)),
    ((2, 3, 3, 4, 5), (3, 2, 0)),
    ((0, 0, 1, 1, 1), (0, 0, 0)),
]


@pytest.mark.parametrize("U_shape,out", EMPTY_SHAPES)
@pytest.mark.parametrize("mode,padding_mode", itertools.product(["bilinear", "nearest"],
                                                                PADDING_MODES))
def test_empty_dimensions_work_as_in_torch(U_shape, out, mode, padding_mode):
    N, C = U_shape[:2]
    U = np.ones(U_shape)
    grid = np.zeros((N, *out, 3))
    dV = np.ones((N, C, *out))
    V = grid_sample(U, grid, mode, padding_mode)
    assert V.shape == dV.shape
    for dU, dgrid in (grid_sample_backward(dV, U, grid, mode, padding_mode),
                      grid_sample_backward_from_cache(
                          dV, grid_sample_forward(U, grid, mode, padding_mode)[1])):
        assert dU.shape == U.shape and dgrid.shape == grid.shape
        assert dU.sum() == pytest.approx(dV.size)  # weights summing to 1 per point
        assert not dgrid.any()
    try:
        import torch
    except ImportError:
        return
    V_t = torch.nn.functional.grid_sample(torch.tensor(U), torch.tensor(grid), mode,
                                          padding_mode, False)
    assert tuple(V_t.shape) == V.shape


def test_empty_volume_axis_is_refused_as_in_torch():
    with pytest.raises(ValueError, match=r"U must have D, H, W >= 1"):
        grid_sample(np.ones((1, 1, 0, 2, 2)), np.zeros((1, 2, 2, 2, 3)))


@pytest.mark.parametrize("U_shape,grid_shape", [
    ((1, 1, 4, 4), (1, 2, 2, 2, 3)),
    ((1, 1, 4, 4, 4), (1, 2, 2, 2)),
])
def test_an_image_with_a_volume_grid_names_both(U_shape, grid_shape):
    with pytest.raises(ValueError, match=r"U and grid must both be .*got U of shape .* and "
                                         r"grid of shape"):
        grid_sample(np.ones(U_shape), np.zeros(grid_shape))


def test_rejects_bad_volume_shapes_and_bicubic():
    U = np.ones((2, 1, 3, 4, 5))
    with pytest.raises(ValueError, match=r"grid must have shape \(\*, \*, \*, \*, 3\), got "
                                         r"\(2, 2, 2, 2, 2\): .* U, of shape \(2, 1, 3, 4, 5\)"):
        grid_sample(U, np.zeros((2, 2, 2, 2, 2)))
    with pytest.raises(ValueError, match=r"grid must have shape \(\*, \*, \*, 2\), got "
                                         r"\(2, 2, 2, 3\): .* U, of shape \(2, 1, 4, 5\)"):
        grid_sample(U[:, :, 0], np.zeros((2, 2, 2, 3)))
    with pytest.raises(ValueError, match="grid batch size must equal U's"):
        grid_sample(U, np.zeros((1, 2, 2, 2, 3)))
    with pytest.raises(ValueError, match="bicubic.*images .4-D U. only"):
        grid_sample(U, np.zeros((2, 2, 2, 2, 3)), "bicubic")
    with pytest.raises(ValueError, match=r"dV must have shape \(2, 1, 2, 2, 2\)"):
        grid_sample_backward(np.ones((2, 1, 2, 2)), U, np.zeros((2, 2, 2, 2, 3)))
    with pytest.raises(NonFiniteError):
        grid_sample(U, np.full((2, 1, 1, 1, 3), np.nan))


def test_affine_grid_shapes_must_agree():
    with pytest.raises(ValueError, match=r"theta must have shape \(\*, 3, 4\), got \(1, 2, 3\)"
                                         r": size \(1, 1, 2, 3, 4\)"):
        affine_grid(np.zeros((1, 2, 3)), (1, 1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"theta must have shape \(\*, 2, 3\), got \(1, 3, 4\)"
                                         r": size \(1, 1, 3, 4\)"):
        affine_grid(np.zeros((1, 3, 4)), (1, 1, 3, 4))
    with pytest.raises(ValueError, match=r"dgrid must have shape \(1, 2, 3, 4, 3\)"):
        affine_grid_backward(np.zeros((1, 2, 3, 4, 2)), np.zeros((1, 3, 4)), (1, 1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"N >= 0 and C, D, H, W >= 1"):
        affine_grid(np.zeros((1, 3, 4)), (1, 1, 0, 3, 4))
    assert affine_grid(np.zeros((0, 3, 4)), (0, 1, 2, 3, 4)).shape == (0, 2, 3, 4, 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS_3D)
def test_extreme_coordinates_stay_in_range_and_beyond_raise(dtype, mode, padding_mode,
                                                            align_corners):
    U = np.ones((1, 2, 3, 4, 5), dtype=dtype)
    limit = np.finfo(dtype).max / 5
    values = np.array([limit, -limit, 1e9, -1e9, 0.3], dtype=dtype)
    grid = np.stack(np.meshgrid(values, values, values, indexing="ij"), axis=-1)[None]
    opts = (mode, padding_mode, align_corners)
    V = grid_sample(U, grid, *opts)
    dU, dgrid = grid_sample_backward(np.ones_like(V), U, grid, *opts)
    assert np.isfinite(V).all() and np.isfinite(dU).all() and np.isfinite(dgrid).all()
    if padding_mode != "zeros":  # every point reads the volume of ones
        np.testing.assert_allclose(V, 1, rtol=1e-6)
    with pytest.raises(NonFiniteError, match=r"\d+ value.s. beyond .* overflows"):
        grid_sample(U, grid * dtype(1.01), *opts)


@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS_3D[::3])
def test_results_do_not_depend_on_the_grid_layout(rng, mode, padding_mode, align_corners):
    # affine_grid's (N, 3, D, H, W) planes, interleaved (x, y, z) triples, and a layout no
    # (N, P) view can read (copied once, not once per chunk): the same bits.
    U = rng.standard_normal((2, 2, 4, 5, 6))
    dV = rng.standard_normal((2, 2, 3, 4, 5))
    planes = rng.uniform(-1.2, 1.2, (2, 3, 3, 4, 5))
    layouts = [np.moveaxis(planes, 1, -1), np.ascontiguousarray(np.moveaxis(planes, 1, -1)),
               np.ascontiguousarray(np.moveaxis(planes, 1, -1).transpose(0, 3, 2, 1, 4))
               .transpose(0, 3, 2, 1, 4)]
    assert not np.shares_memory(layouts[2][..., 0].reshape(2, -1), layouts[2])
    opts = (mode, padding_mode, align_corners)
    original = volumes._CHUNK
    try:
        volumes._CHUNK = 9 * (2 + 8)  # several chunks per volume
        results = [(grid_sample(U, g, *opts), *grid_sample_backward(dV, U, g, *opts))
                   for g in layouts]
    finally:
        volumes._CHUNK = original
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


def test_peak_memory_of_forward_and_backward_stays_within_four_times_input_and_output():
    # The target at N=1, C=1, 128^3 float32: what the sampler's forward and backward
    # allocate at their peak (V, the padded copy of U, dU, dgrid and the chunks'
    # temporaries), the grid given, at most 4 x (U + V). Two threads: two chunks' worth of
    # temporaries at once.
    import tracemalloc

    from stn_numpy import _parallel

    size = (1, 1, 128, 128, 128)
    rng = np.random.default_rng(0)
    U = rng.standard_normal(size, dtype=np.float32)
    dV = rng.standard_normal(size, dtype=np.float32)
    theta = (np.eye(3, 4) + 0.05 * rng.standard_normal((1, 3, 4))).astype(np.float32)
    grid = affine_grid(theta, size)
    _parallel.set_num_threads(2)
    tracemalloc.start()
    try:
        V, cache = grid_sample_forward(U, grid)
        grid_sample_backward_from_cache(dV, cache)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        _parallel.set_num_threads(None)
    assert peak <= 4 * (U.nbytes + V.nbytes), peak / (U.nbytes + V.nbytes)
