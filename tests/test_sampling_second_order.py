"""Tests for stn_numpy.sampling.second_order: finite differences of the backward, PyTorch's
double backward at generic points and at kinks, the terms that vanish, bad input; images
and volumes."""

import itertools

import numpy as np
import pytest
from conftest import assert_same_bits, smooth_grid, smooth_volume_grid

from stn_numpy import grid_sample, grid_sample_backward, grid_sample_double_backward
from stn_numpy.gradcheck import check_double_backward, rel_error
from stn_numpy.sampling import MODES, PADDING_MODES
from stn_numpy.verify import make_grid
from stn_numpy.verify.volumes import COMBOS_3D, make_volume_grid

ALL_COMBOS = list(itertools.product(MODES, PADDING_MODES, [True, False]))


def random_case(rng, grid, C=2, H=4, W=5):
    N, Ho, Wo, _ = grid.shape
    U = rng.standard_normal((N, C, H, W))
    dV = rng.standard_normal((N, C, Ho, Wo))
    return U, dV, rng.standard_normal(U.shape), rng.standard_normal(grid.shape)


@pytest.mark.parametrize("mode,padding_mode,align_corners", ALL_COMBOS)
def test_matches_finite_differences_of_the_backward(rng, mode, padding_mode, align_corners):
    grid = smooth_grid(rng, 2, 3, 4, 4, 5, align_corners)
    assert_matches_finite_differences(grid, *random_case(rng, grid), mode, padding_mode,
                                      align_corners)


def assert_matches_finite_differences(grid, U, dV, ddU, ddgrid, *opts):
    analytic = grid_sample_double_backward(ddU, ddgrid, dV, U, grid, *opts)
    report = check_double_backward(lambda dv, u, g: grid_sample_backward(dv, u, g, *opts),
                                   [dV, U, grid], [ddU, ddgrid], analytic)
    # Linear in dV and U (exact up to round-off); smooth in the grid away from kinks, O(h^2).
    assert report.max_rel_error < 1e-7, report


def torch_double_backward(ddU, ddgrid, dV, U, grid, mode, padding_mode, align_corners):
    """PyTorch's double backward: autograd.grad twice, the first with create_graph."""
    torch = pytest.importorskip("torch", reason="PyTorch not installed: pip install torch==2.13.0")
    dV_t, U_t, grid_t = (torch.tensor(a, requires_grad=True) for a in (dV, U, grid))
    V = torch.nn.functional.grid_sample(U_t, grid_t, mode=mode, padding_mode=padding_mode,
                                        align_corners=align_corners)
    dU, dgrid = torch.autograd.grad(V, (U_t, grid_t), dV_t, create_graph=True)
    outs = torch.autograd.grad((dU, dgrid), (dV_t, U_t, grid_t),
                               (torch.tensor(ddU), torch.tensor(ddgrid)), allow_unused=True)
    # An input PyTorch's graph does not reach (U for nearest) comes back as None: zero.
    return [np.zeros_like(a) if o is None else o.numpy() for o, a in zip(outs, (dV, U, grid),
                                                                          strict=True)]


@pytest.mark.parametrize("mode,padding_mode,align_corners", ALL_COMBOS)
@pytest.mark.parametrize("points", ["generic", "kinks"])
def test_matches_torch_double_backward(rng, mode, padding_mode, align_corners, points):
    N, H, W, Ho, Wo = 3, 5, 6, 8, 9
    if points == "generic":
        grid = rng.uniform(-1.4, 1.4, (N, Ho, Wo, 2))
    else:  # half the points exactly on integers, half-integers, borders, reflection lines
        grid = make_grid(N, Ho, Wo, H, W, align_corners, rng=rng)
    assert_matches_torch(grid, *random_case(rng, grid, C=3, H=H, W=W), mode, padding_mode,
                         align_corners)


def assert_matches_torch(grid, U, dV, ddU, ddgrid, *opts):
    ours = grid_sample_double_backward(ddU, ddgrid, dV, U, grid, *opts)
    theirs = torch_double_backward(ddU, ddgrid, dV, U, grid, *opts)
    for name, a, b in zip(("d_dV", "d_U", "d_grid"), ours, theirs, strict=True):
        assert a.shape == b.shape
        assert rel_error(a, b) <= 1e-10, name


@pytest.mark.parametrize("mode", MODES)
def test_none_upstream_gradients_are_zeros(rng, mode):
    grid = rng.uniform(-1.2, 1.2, (2, 3, 4, 2))
    U, dV, ddU, ddgrid = random_case(rng, grid)
    for ddU_, ddgrid_ in [(ddU, None), (None, ddgrid), (None, None)]:
        got = grid_sample_double_backward(ddU_, ddgrid_, dV, U, grid, mode)
        want = grid_sample_double_backward(
            np.zeros_like(U) if ddU_ is None else ddU_,
            np.zeros_like(grid) if ddgrid_ is None else ddgrid_, dV, U, grid, mode)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-15)


@pytest.mark.parametrize("mode", MODES)
def test_d_dV_from_ddU_is_the_forward_of_ddU(rng, mode):
    # <ddU, dU> = <ddU, S^T dV> = <S ddU, dV>: its gradient in dV samples ddU.
    grid = rng.uniform(-1.2, 1.2, (2, 3, 4, 2))
    U, dV, ddU, _ = random_case(rng, grid)
    d_dV, d_U, _ = grid_sample_double_backward(ddU, None, dV, U, grid, mode)
    assert rel_error(d_dV, grid_sample(ddU, grid, mode)) < 1e-14
    assert np.all(d_U == 0)  # dU does not depend on U


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_bilinear_has_no_second_derivative_along_one_axis_but_a_mixed_one(rng, padding_mode):
    grid = smooth_grid(rng, 2, 3, 4, 4, 5, False)
    U, dV, _, ddgrid = random_case(rng, grid)
    ddgrid[..., 1] = 0  # only the x-component of dgrid is differentiated
    _, _, d_grid = grid_sample_double_backward(None, ddgrid, dV, U, grid, "bilinear",
                                               padding_mode)
    assert np.all(d_grid[..., 0] == 0)  # d^2 k / dx^2 = 0: the x-x term vanishes
    assert np.abs(d_grid[..., 1]).max() > 1e-3  # the x-y twist does not
    _, _, d_grid = grid_sample_double_backward(None, ddgrid, dV, U, grid, "bicubic",
                                               padding_mode)
    assert np.abs(d_grid[..., 0]).max() > 1e-3  # bicubic: k'' != 0


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_nearest_reaches_dV_alone(rng, padding_mode):
    grid = rng.uniform(-1.2, 1.2, (2, 3, 4, 2))
    U, dV, ddU, ddgrid = random_case(rng, grid)
    d_dV, d_U, d_grid = grid_sample_double_backward(ddU, ddgrid, dV, U, grid, "nearest",
                                                    padding_mode)
    assert np.all(d_U == 0) and np.all(d_grid == 0)
    np.testing.assert_array_equal(d_dV, grid_sample(ddU, grid, "nearest", padding_mode))


@pytest.mark.parametrize("align_corners", [True, False])
def test_border_clipped_coordinates_carry_nothing_from_ddgrid(rng, align_corners):
    grid = rng.uniform(1.5, 2.0, (1, 2, 3, 2))  # beyond the right and bottom border
    U, dV, _, ddgrid = random_case(rng, grid)
    d_dV, d_U, d_grid = grid_sample_double_backward(None, ddgrid, dV, U, grid, "bilinear",
                                                    "border", align_corners)
    assert not d_dV.any() and not d_U.any() and not d_grid.any()


def test_float32_follows_float64(rng):
    grid = rng.uniform(-1.2, 1.2, (2, 3, 4, 2))
    args = random_case(rng, grid)
    U, dV, ddU, ddgrid = args
    ours64 = grid_sample_double_backward(ddU, ddgrid, dV, U, grid, "bicubic")
    ours32 = grid_sample_double_backward(*(a.astype(np.float32) for a in (ddU, ddgrid, dV, U,
                                                                          grid)), "bicubic")
    for a, b in zip(ours32, ours64, strict=True):
        assert a.dtype == np.float32 and rel_error(a, b) < 1e-5


def test_rejects_bad_arguments(rng):
    grid = rng.uniform(-1, 1, (2, 3, 4, 2))
    U, dV, ddU, ddgrid = random_case(rng, grid)
    with pytest.raises(ValueError, match="ddU"):
        grid_sample_double_backward(ddU[:1], ddgrid, dV, U, grid)
    with pytest.raises(ValueError, match="ddgrid"):
        grid_sample_double_backward(ddU, ddgrid[..., :1], dV, U, grid)
    with pytest.raises(ValueError, match="dV"):
        grid_sample_double_backward(ddU, ddgrid, dV[:, :1], U, grid)
    with pytest.raises(TypeError, match="ddgrid"):
        grid_sample_double_backward(ddU, ddgrid.astype(np.float32), dV, U, grid)
    with pytest.raises(ValueError, match="mode"):
        grid_sample_double_backward(ddU, ddgrid, dV, U, grid, "linear")
    with pytest.raises(ValueError, match="grid"):
        grid_sample_double_backward(ddU, ddgrid, dV, U, np.full_like(grid, np.inf))


@pytest.mark.parametrize("mode,dims", [(m, 2) for m in MODES] + [("bilinear", 3),
                                                                   ("nearest", 3)])
def test_results_do_not_depend_on_blocks_or_threads(rng, mode, dims):
    from stn_numpy import _parallel, sampling

    if dims == 2:
        grid = rng.uniform(-1.5, 1.5, (5, 4, 3, 2))
        U, dV, ddU, ddgrid = random_case(rng, grid, H=6, W=7)
    else:  # as many output points per volume as per image: the same blocks
        grid = rng.uniform(-1.5, 1.5, (5, 2, 3, 2, 3))
        U, dV, ddU, ddgrid = random_volume_case(rng, grid)
    results = []
    original = sampling._BLOCK
    try:
        for block, threads in ((4 * 3 * (2 + 4), 1), (10**9, 2), (2 * 4 * 3 * (2 + 4), 2)):
            sampling._BLOCK = block
            _parallel.set_num_threads(threads)
            results.append(grid_sample_double_backward(ddU, ddgrid, dV, U, grid, mode,
                                                       "reflection"))
    finally:
        sampling._BLOCK = original
        _parallel.set_num_threads(None)
    assert_same_bits(results)


EMPTY_AND_ONE_PIXEL = [
    ((0, 2, 3, 4), (2, 2)), ((1, 2, 3, 4), (0, 2)), ((1, 0, 3, 4), (2, 2)),
    ((1, 1, 1, 1), (2, 2)),
    ((0, 2, 2, 3, 4), (2, 2, 2)), ((1, 2, 2, 3, 4), (2, 0, 2)), ((1, 0, 2, 3, 4), (2, 2, 2)),
    ((1, 1, 1, 1, 1), (2, 2, 2))]


@pytest.mark.parametrize("U_shape,out,mode", [
    (U_shape, out, mode) for U_shape, out in EMPTY_AND_ONE_PIXEL for mode in MODES
    if len(U_shape) == 4 or mode != "bicubic"])
def test_empty_and_one_pixel_inputs_give_the_documented_shapes(U_shape, out, mode):
    U = np.ones(U_shape)
    grid = np.zeros((U_shape[0], *out, len(out)))
    dV = np.ones(U_shape[:2] + out)
    result = grid_sample_double_backward(np.ones(U_shape), np.ones(grid.shape), dV, U, grid,
                                         mode, "border")
    assert [a.shape for a in result] == [dV.shape, U.shape, grid.shape]
    assert all(np.isfinite(a).all() for a in result)


# --------------------------------------------------------------------------------------
# Volumes: trilinear and nearest on 5-D U
# --------------------------------------------------------------------------------------

def random_volume_case(rng, grid, C=2, D=3, H=4, W=5):
    N, *out, _ = grid.shape
    U = rng.standard_normal((N, C, D, H, W))
    dV = rng.standard_normal((N, C, *out))
    return U, dV, rng.standard_normal(U.shape), rng.standard_normal(grid.shape)


@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS_3D)
def test_volumes_match_finite_differences_of_the_backward(rng, mode, padding_mode,
                                                          align_corners):
    grid = smooth_volume_grid(rng, 1, (2, 3, 3), 3, 4, 5, align_corners)
    assert_matches_finite_differences(grid, *random_volume_case(rng, grid), mode, padding_mode,
                                      align_corners)


@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS_3D)
@pytest.mark.parametrize("points", ["generic", "kinks"])
def test_volumes_match_torch_double_backward(rng, mode, padding_mode, align_corners, points):
    N, D, H, W, out = 2, 4, 5, 6, (3, 4, 5)
    if points == "generic":
        grid = rng.uniform(-1.4, 1.4, (N, *out, 3))
    else:  # integers, half-integers, borders and reflection lines along every axis
        grid = make_volume_grid(N, *out, D, H, W, align_corners, rng=rng)
    assert_matches_torch(grid, *random_volume_case(rng, grid, C=3, D=D, H=H, W=W), mode,
                         padding_mode, align_corners)


def test_trilinear_grid_term_is_the_twists_of_the_cube_faces(rng):
    # The docstring's closed form, from the eight corners of one cube: d_grid_x
    # = g_x (a_y sum_k h_k(t_z) T_xy[k] + a_z sum_j h_j(t_y) T_xz[j]), and so on.
    D, H, W = 3, 4, 5
    grid = smooth_volume_grid(rng, 1, (1, 1, 1), D, H, W, True, margin=0)
    x, y, z = ((grid[0, 0, 0, 0, a] + 1) / 2 * (s - 1) for a, s in enumerate((W, H, D)))
    x0, y0, z0 = (int(np.floor(c)) for c in (x, y, z))  # margin 0: the cube is inside
    U, dV, _, ddgrid = random_volume_case(rng, grid, C=1, D=D, H=H, W=W)
    G = dV[0, 0, 0, 0, 0] * U[0, 0, z0:z0 + 2, y0:y0 + 2, x0:x0 + 2]  # G[k, j, i]
    hx, hy, hz = ([1 - (c - c0), c - c0] for c, c0 in ((x, x0), (y, y0), (z, z0)))
    g = [(s - 1) / 2 for s in (W, H, D)]
    a = [ddgrid[0, 0, 0, 0, d] * g[d] for d in range(3)]
    T_xy = [G[k, 1, 1] - G[k, 1, 0] - G[k, 0, 1] + G[k, 0, 0] for k in range(2)]
    T_xz = [G[1, j, 1] - G[1, j, 0] - G[0, j, 1] + G[0, j, 0] for j in range(2)]
    T_yz = [G[1, 1, i] - G[1, 0, i] - G[0, 1, i] + G[0, 0, i] for i in range(2)]
    xy, xz, yz = (sum(h[m] * T[m] for m in range(2))
                  for h, T in ((hz, T_xy), (hy, T_xz), (hx, T_yz)))
    want = [g[0] * (a[1] * xy + a[2] * xz), g[1] * (a[0] * xy + a[2] * yz),
            g[2] * (a[0] * xz + a[1] * yz)]
    _, _, d_grid = grid_sample_double_backward(None, ddgrid, dV, U, grid, "bilinear",
                                               "zeros", True)
    assert rel_error(d_grid.reshape(3), np.array(want)) < 1e-13


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_trilinear_has_no_pure_second_derivative_but_three_mixed_ones(rng, padding_mode):
    grid = smooth_volume_grid(rng, 2, (2, 3, 3), 3, 4, 5, False)
    U, dV, _, ddgrid = random_volume_case(rng, grid)
    for d in range(3):
        only_d = np.zeros_like(ddgrid)
        only_d[..., d] = ddgrid[..., d]  # only the d-component of dgrid is differentiated
        _, _, d_grid = grid_sample_double_backward(None, only_d, dV, U, grid, "bilinear",
                                                   padding_mode)
        for e in range(3):
            if e == d:
                assert np.all(d_grid[..., e] == 0)  # h'' = 0: the d-d term vanishes
            else:
                assert np.abs(d_grid[..., e]).max() > 1e-3  # the d-e twist does not


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_volume_nearest_reaches_dV_alone(rng, padding_mode):
    grid = rng.uniform(-1.2, 1.2, (2, 2, 3, 4, 3))
    U, dV, ddU, ddgrid = random_volume_case(rng, grid)
    d_dV, d_U, d_grid = grid_sample_double_backward(ddU, ddgrid, dV, U, grid, "nearest",
                                                    padding_mode)
    assert np.all(d_U == 0) and np.all(d_grid == 0)
    np.testing.assert_array_equal(d_dV, grid_sample(ddU, grid, "nearest", padding_mode))


def test_volumes_refuse_bicubic_and_mismatched_shapes(rng):
    grid = rng.uniform(-1, 1, (1, 2, 3, 4, 3))
    U, dV, ddU, ddgrid = random_volume_case(rng, grid)
    with pytest.raises(ValueError, match="bicubic"):
        grid_sample_double_backward(ddU, ddgrid, dV, U, grid, "bicubic")
    with pytest.raises(ValueError, match="ddU"):
        grid_sample_double_backward(ddU[..., :1], ddgrid, dV, U, grid)
    with pytest.raises(ValueError, match="ddgrid"):
        grid_sample_double_backward(ddU, ddgrid[..., :2], dV, U, grid)
    with pytest.raises(ValueError, match="dV"):
        grid_sample_double_backward(ddU, ddgrid, dV[..., :1], U, grid)
    with pytest.raises(ValueError, match="grid"):
        grid_sample_double_backward(ddU, ddgrid, dV, U, grid[..., :2])
