"""Tests for stn_numpy.grids: closed forms, finite differences, PyTorch parity, bad input."""

import warnings

import numpy as np
import pytest

from stn_numpy import (
    NonFiniteError,
    affine_grid,
    affine_grid_backward,
    affine_grid_double_backward,
    attention_grid,
    attention_grid_backward,
    attention_grid_double_backward,
    projective_grid,
    projective_grid_backward,
    projective_grid_double_backward,
    similarity_affine,
    similarity_affine_backward,
    similarity_grid,
    similarity_grid_backward,
    similarity_grid_double_backward,
    target_coordinates,
    tps_grid,
    tps_grid_backward,
    tps_grid_double_backward,
    tps_lattice,
)
from stn_numpy.gradcheck import check_double_backward, numerical_gradient, rel_error


def random_params(rng, kind, N):
    if kind == "affine":
        return np.array([[1.0, 0, 0], [0, 1, 0]]) + 0.3 * rng.standard_normal((N, 2, 3))
    if kind == "attention":
        return np.array([1.0, 0, 0]) + 0.3 * rng.standard_normal((N, 3))
    if kind == "similarity":
        return rng.standard_normal((N, 4)) * np.array([2.0, 0.3, 0.3, 0.3])
    if kind == "projective":
        theta = np.array([1.0, 0, 0, 0, 1, 0, 0, 0]) + 0.2 * rng.standard_normal((N, 8))
        theta[:, 6:] = rng.uniform(-0.3, 0.3, (N, 2))  # keeps the denominator w > 0.4
        return theta
    return tps_lattice((3, 4)) + 0.2 * rng.standard_normal((N, 12, 2))


GENERATORS = {
    "affine": (affine_grid, affine_grid_backward, {}),
    "attention": (attention_grid, attention_grid_backward, {}),
    "similarity": (similarity_grid, similarity_grid_backward, {}),
    "projective": (projective_grid, projective_grid_backward, {}),
    "tps": (tps_grid, tps_grid_backward, {"lattice": (3, 4)}),
}


@pytest.mark.parametrize("kind", list(GENERATORS))
@pytest.mark.parametrize("align_corners", [True, False])
def test_gradient_matches_finite_differences(rng, kind, align_corners):
    forward, backward, kw = GENERATORS[kind]
    N, H, W = 2, 4, 5
    theta = random_params(rng, kind, N)
    size = (N, 3, H, W)
    dgrid = rng.standard_normal((N, H, W, 2))
    dtheta = backward(dgrid, theta, size, align_corners=align_corners, **kw)
    num = numerical_gradient(lambda t: forward(t, size, align_corners=align_corners, **kw),
                             theta.copy(), dgrid)
    assert dtheta.shape == theta.shape
    # Affine, attention and TPS grids are linear in theta (exact up to round-off);
    # the homography's quotient and the similarity's sine, cosine and exponential leave
    # O(h^2) truncation, still far below 1e-7.
    assert rel_error(dtheta, num) < 1e-7


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("H,W", [(5, 7), (1, 4), (3, 1), (8, 8)])
def test_affine_matches_torch(rng, align_corners, H, W):
    torch = pytest.importorskip("torch", reason="PyTorch not installed: pip install torch==2.13.0")
    theta = random_params(rng, "affine", 3)
    size = (3, 2, H, W)
    dgrid = rng.standard_normal((3, H, W, 2))
    theta_t = torch.tensor(theta, requires_grad=True)
    with pytest.warns(UserWarning) if (align_corners and min(H, W) == 1) else _no_warning():
        grid_t = torch.nn.functional.affine_grid(theta_t, size, align_corners=align_corners)
    grid_t.backward(torch.tensor(dgrid))
    assert rel_error(affine_grid(theta, size, align_corners), grid_t.detach().numpy()) <= 1e-10
    dtheta = affine_grid_backward(dgrid, theta, size, align_corners)
    assert rel_error(dtheta, theta_t.grad.numpy()) <= 1e-10


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("align_corners", [True, False])
def test_target_coordinates_convention(align_corners):
    x_t = target_coordinates(1, 4, align_corners)[0, :, 0]
    expected = [-1, -1 / 3, 1 / 3, 1] if align_corners else [-0.75, -0.25, 0.25, 0.75]
    np.testing.assert_allclose(x_t, expected, atol=1e-15)
    assert target_coordinates(1, 1, align_corners)[0, 0, 0] == 0


def test_special_cases_agree_with_affine(rng):
    size = (2, 1, 6, 5)
    s, tx, ty = 0.7, 0.2, -0.1
    affine = np.tile(np.array([[[s, 0, tx], [0, s, ty]]]), (2, 1, 1))
    np.testing.assert_allclose(attention_grid(np.tile([s, tx, ty], (2, 1)), size),
                               affine_grid(affine, size), atol=1e-15)
    theta = random_params(rng, "affine", 2)
    homography = np.concatenate([theta.reshape(2, 6), np.zeros((2, 2))], axis=1)
    np.testing.assert_allclose(projective_grid(homography, size), affine_grid(theta, size),
                               atol=1e-14)


def test_tps_reproduces_affine_maps_and_interpolates(rng):
    # A TPS contains the affine maps: control points moved by an affine map give that map.
    lattice = tps_lattice((4, 4))
    theta = random_params(rng, "affine", 2)
    points = lattice @ theta[:, :, :2].transpose(0, 2, 1) + theta[:, None, :, 2]
    size = (2, 1, 7, 9)
    np.testing.assert_allclose(tps_grid(points, size), affine_grid(theta, size), atol=1e-12)
    # With align_corners=True a 4x4 output lands exactly on the lattice: f(c_k) = theta_k.
    warped = lattice + 0.2 * rng.standard_normal((1, 16, 2))
    grid = tps_grid(warped, (1, 1, 4, 4), align_corners=True)
    np.testing.assert_allclose(grid.reshape(1, 16, 2), warped, atol=1e-12)


def test_projective_is_a_homography(rng):
    theta = random_params(rng, "projective", 1)
    grid = projective_grid(theta, (1, 1, 3, 4), align_corners=True)
    h = np.append(theta[0], 1.0).reshape(3, 3)
    p = np.concatenate([target_coordinates(3, 4, True), np.ones((3, 4, 1))], -1)
    q = p @ h.T
    np.testing.assert_allclose(grid[0], q[..., :2] / q[..., 2:], atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", list(GENERATORS))
def test_keeps_dtype_and_leaves_theta_alone(rng, kind, dtype):
    forward, backward, kw = GENERATORS[kind]
    theta = random_params(rng, kind, 2).astype(dtype)
    theta0 = theta.copy()
    grid = forward(theta, (2, 1, 3, 4), **kw)
    dtheta = backward(np.ones_like(grid), theta, (2, 1, 3, 4), **kw)
    assert grid.dtype == dtheta.dtype == dtype
    assert grid.shape == (2, 3, 4, 2)
    np.testing.assert_array_equal(theta, theta0)


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_empty_batch(rng, kind):
    forward, backward, kw = GENERATORS[kind]
    theta = random_params(rng, kind, 1)[:0]
    grid = forward(theta, (0, 1, 3, 4), **kw)
    assert grid.shape == (0, 3, 4, 2)
    assert backward(grid, theta, (0, 1, 3, 4), **kw).shape == theta.shape


def test_rejects_bad_input():
    theta = np.zeros((2, 2, 3))
    with pytest.raises(ValueError, match=r"theta must have shape \(\*, 2, 3\), got \(2, 3\)"):
        affine_grid(np.zeros((2, 3)), (2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"theta must have shape \(\*, 2, 3\), got \(2, 3, 3\)"):
        affine_grid(np.zeros((2, 3, 3)), (2, 1, 4, 4))
    with pytest.raises(ValueError, match="size\\[0\\] \\(batch\\) must equal"):
        affine_grid(theta, (3, 1, 4, 4))
    with pytest.raises(ValueError, match="size must have 4 or 5 entries"):
        affine_grid(theta, (2, 4, 4))
    with pytest.raises(TypeError, match="theta must have dtype float32 or float64, got int64"):
        affine_grid(theta.astype(np.int64), (2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"dgrid must have shape \(2, 4, 4, 2\)"):
        affine_grid_backward(np.zeros((2, 4, 4, 3)), theta, (2, 1, 4, 4))
    with pytest.raises(TypeError, match="dgrid must have the parameters' dtype"):
        affine_grid_backward(np.zeros((2, 4, 4, 2), np.float32), theta, (2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"theta must have shape \(\*, 16, 2\)"):
        tps_grid(np.zeros((1, 9, 2)), (1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"lattice\[0\] must be an int >= 2, got 1"):
        tps_lattice((1, 4))
    with pytest.raises(ValueError, match=r"lattice\[1\] must be an int >= 2, got 3.9"):
        tps_lattice((4, 3.9))  # once truncated to 3
    with pytest.raises(ValueError, match="lattice must be a pair of ints, got '444'"):
        tps_lattice("444")
    with pytest.raises(ValueError, match="align_corners must be one of"):
        affine_grid(theta, (2, 1, 4, 4), align_corners="yes")


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_non_finite_theta_raises(rng, kind):
    forward, _, kw = GENERATORS[kind]
    theta = random_params(rng, kind, 2)
    theta.reshape(-1)[1] = np.nan
    with pytest.raises(NonFiniteError, match="theta contains 1 non-finite"):
        forward(theta, (2, 1, 3, 3), **kw)


@pytest.mark.parametrize("H, W", [(0, 3), (3, 0), (-1, 2)])
def test_target_coordinates_rejects_empty_sizes(H, W):
    with pytest.raises(ValueError, match=f"H and W must be >= 1, got H={H}, W={W}"):
        target_coordinates(H, W)


def test_target_coordinates_rejects_non_int_sizes():
    with pytest.raises(TypeError, match="H and W must be ints"):
        target_coordinates(2.5, 3)


@pytest.mark.parametrize("size", [(2, 1, 4.7, 4), (2, 1, "4", 4), "abcd", 4])
def test_size_must_hold_ints(size):
    # int() would have truncated 4.7 to 4 (and raised a ValueError for "a").
    with pytest.raises(TypeError, match=r"size must be a sequence \(N, C, H, W\) of ints"):
        affine_grid(np.zeros((2, 2, 3)), size)


@pytest.mark.parametrize("align_corners", [True, False])
def test_projective_vanishing_denominator_is_an_error_not_a_warning(align_corners):
    # h6 = 1, h7 = 0: w = x_t + 1, zero on the left edge where x_t = -1 (align_corners=True);
    # with h6 = W / (W - 1) it vanishes on the first column's x_t = -(W - 1) / W instead.
    W = 5
    theta = np.array([[1.0, 0, 0, 0, 1, 0, 1.0 if align_corners else W / (W - 1), 0]])
    size = (1, 1, 3, W)
    dgrid = np.ones((1, 3, W, 2))
    message = r"denominator h6 x \+ h7 y \+ 1 is zero"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning would fail the test
        with pytest.raises(NonFiniteError, match=message):
            projective_grid(theta, size, align_corners=align_corners)
        with pytest.raises(NonFiniteError, match=message):
            projective_grid_backward(dgrid, theta, size, align_corners=align_corners)


def test_tps_lattice_and_align_corners_are_keyword_only(rng):
    theta = tps_lattice((3, 4))[None]
    with pytest.raises(TypeError):
        tps_grid(theta, (1, 1, 4, 4), (3, 4))
    with pytest.raises(TypeError):
        tps_grid_backward(np.zeros((1, 4, 4, 2)), theta, (1, 1, 4, 4), (3, 4), True)
    grid = tps_grid(theta, (1, 1, 4, 4), lattice=(3, 4), align_corners=True)
    np.testing.assert_allclose(grid[0], target_coordinates(4, 4, align_corners=True),
                               atol=1e-12)


def test_shape_keyed_caches_stay_within_their_byte_budget():
    from stn_numpy import grids

    theta = np.tile(tps_lattice(), (1, 1, 1))
    # Each TPS matrix of 400 x 400 points is 20 MB, each base grid 3.8 MB: a sweep of
    # sizes like this one kept every result alive under a bound on entries alone.
    for side in range(400, 410):
        tps_grid(theta, (1, 1, side, side))
        affine_grid(np.eye(2, 3)[None], (1, 1, side, side))
    for cached in (grids._base_grid, grids._base_planes, grids._tps_matrix):
        assert 0 < cached.cache_nbytes() <= cached.max_bytes
    # A hit still returns the value of a fresh computation.
    np.testing.assert_array_equal(
        tps_grid(theta, (1, 1, 409, 409)),
        (grids._tps_matrix.__wrapped__((4, 4), 409, 409, False) @ theta[0])[None].reshape(
            1, 409, 409, 2))


@pytest.mark.parametrize("transform", ["affine", "attention", "similarity", "projective", "tps"])
def test_empty_batch_through_every_generator_and_its_backward(transform):
    from stn_numpy.transformer import TRANSFORMS

    make, make_backward, shape = TRANSFORMS[transform]
    theta = np.zeros((0,) + (shape or (16, 2)))
    grid = make(theta, (0, 1, 5, 6))
    assert grid.shape == (0, 5, 6, 2)
    assert make_backward(grid, theta, (0, 1, 5, 6)).shape == theta.shape


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_affine_grid_is_the_defining_sums_in_planes(dtype):
    """The defining per-image sums, with x_s and y_s each contiguous per image; the
    backward takes an interleaved dgrid as well as planes."""
    rng = np.random.default_rng(31)
    theta = rng.standard_normal((5, 2, 3)).astype(dtype)
    dgrid = rng.standard_normal((5, 4, 6, 2)).astype(dtype)
    size = (5, 1, 4, 6)
    grid = affine_grid(theta, size)
    assert grid.shape == (5, 4, 6, 2) and grid.dtype == dtype
    assert np.moveaxis(grid, -1, 1).flags.c_contiguous
    base = target_coordinates(4, 6).reshape(24, 2)
    base = np.concatenate([base, np.ones((24, 1))], axis=1)
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(grid.reshape(5, 24, 2),
                               base @ theta.transpose(0, 2, 1).astype(np.float64), atol=tol)
    expected = dgrid.reshape(5, 24, 2).transpose(0, 2, 1).astype(np.float64) @ base
    planar = np.moveaxis(np.ascontiguousarray(np.moveaxis(dgrid, -1, 1)), 1, -1)
    for layout in (dgrid, planar):
        dtheta = affine_grid_backward(layout, theta, size)
        assert dtheta.shape == (5, 2, 3) and dtheta.dtype == dtype
        np.testing.assert_allclose(dtheta, expected, rtol=10 * tol, atol=10 * tol)


def test_affine_grid_is_bit_identical_for_any_worker_count_and_batch(monkeypatch):
    """One product per image, in bands of images on worker threads: neither the split nor
    the other images of the batch change an image's bits."""
    from stn_numpy import _parallel, grids

    monkeypatch.setattr(grids, "_PARALLEL_MIN_VALUES", 1)  # bands even for tiny inputs
    rng = np.random.default_rng(32)
    theta = rng.standard_normal((7, 2, 3)).astype(np.float32)
    dgrid = rng.standard_normal((7, 9, 11, 2)).astype(np.float32)
    size = (7, 1, 9, 11)
    results = []
    try:
        for threads in (1, 2, 3, 8):
            _parallel.set_num_threads(threads)
            results.append((affine_grid(theta, size), affine_grid_backward(dgrid, theta, size)))
    finally:
        _parallel.set_num_threads(None)
    for grid, dtheta in results[1:]:
        np.testing.assert_array_equal(grid, results[0][0])
        np.testing.assert_array_equal(dtheta, results[0][1])
    for n in (0, 3, 6):
        alone = (1, 1, 9, 11)
        np.testing.assert_array_equal(affine_grid(theta[n:n + 1], alone)[0], results[0][0][n])
        np.testing.assert_array_equal(
            affine_grid_backward(dgrid[n:n + 1], theta[n:n + 1], alone)[0], results[0][1][n])


def test_similarity_is_a_scaled_rotation_whose_identity_is_zero(rng):
    size = (3, 1, 5, 6)
    np.testing.assert_array_equal(similarity_grid(np.zeros((3, 4)), size),
                                  affine_grid(np.tile(np.eye(2, 3), (3, 1, 1)), size))
    theta = random_params(rng, "similarity", 3)
    A = similarity_affine(theta)
    s = np.exp(theta[:, 1])
    # A = s R(a): columns orthogonal, each of length s, det = s^2, and A's angle is a.
    np.testing.assert_allclose(np.einsum("nij,nik->njk", A[:, :, :2], A[:, :, :2]),
                               s[:, None, None] ** 2 * np.eye(2), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(np.arctan2(A[:, 1, 0], A[:, 0, 0]),
                               np.angle(np.exp(1j * theta[:, 0])), atol=1e-14)
    np.testing.assert_array_equal(A[:, :, 2], theta[:, 2:])
    # (1, 0) turns to (cos a, sin a): with y pointing down, clockwise on screen for a > 0.
    quarter = similarity_affine(np.array([[np.pi / 2, 0.0, 0, 0]]))
    np.testing.assert_allclose(quarter[0, :, :2] @ [1, 0], [0, 1], atol=1e-15)


def test_similarity_affine_backward_matches_finite_differences(rng):
    theta = random_params(rng, "similarity", 4)
    dA = rng.standard_normal((4, 2, 3))
    num = numerical_gradient(similarity_affine, theta.copy(), dA)
    assert rel_error(similarity_affine_backward(dA, theta), num) < 1e-8


@pytest.mark.parametrize("align_corners", [True, False])
def test_similarity_matches_torch_autograd_through_affine_grid(rng, align_corners):
    torch = pytest.importorskip("torch", reason="PyTorch parity needs torch==2.13.0")
    theta = random_params(rng, "similarity", 3)
    size = (3, 2, 5, 7)
    dgrid = rng.standard_normal((3, 5, 7, 2))
    theta_t = torch.tensor(theta, requires_grad=True)
    a, log_s, tx, ty = theta_t.unbind(1)
    s = torch.exp(log_s)
    A = torch.stack([torch.stack([s * torch.cos(a), -s * torch.sin(a), tx], -1),
                     torch.stack([s * torch.sin(a), s * torch.cos(a), ty], -1)], 1)
    grid_t = torch.nn.functional.affine_grid(A, size, align_corners=align_corners)
    grid_t.backward(torch.tensor(dgrid))
    assert rel_error(similarity_grid(theta, size, align_corners),
                     grid_t.detach().numpy()) <= 1e-10
    assert rel_error(similarity_grid_backward(dgrid, theta, size, align_corners),
                     theta_t.grad.numpy()) <= 1e-10


def test_similarity_refuses_bad_parameters():
    with pytest.raises(ValueError, match="theta"):
        similarity_grid(np.zeros((2, 3)), (2, 1, 4, 4))
    with pytest.raises(NonFiniteError, match="log scale"):
        similarity_grid(np.array([[0.0, 1e4, 0, 0]]), (1, 1, 4, 4))
    with pytest.raises(ValueError, match="dA"):
        similarity_affine_backward(np.zeros((2, 2, 2)), np.zeros((2, 4)))
    with pytest.raises(TypeError, match="dA"):
        similarity_affine_backward(np.zeros((2, 2, 3), np.float32), np.zeros((2, 4)))


# ---------------------------------------------------------------------------------------
# Second order: the double backward of every generator
# ---------------------------------------------------------------------------------------

DOUBLE_BACKWARDS = {
    "affine": affine_grid_double_backward,
    "attention": attention_grid_double_backward,
    "similarity": similarity_grid_double_backward,
    "projective": projective_grid_double_backward,
    "tps": tps_grid_double_backward,
}


@pytest.mark.parametrize("kind", list(GENERATORS))
@pytest.mark.parametrize("align_corners", [True, False])
def test_double_backward_matches_finite_differences_of_the_backward(rng, kind, align_corners):
    _, backward, kw = GENERATORS[kind]
    N, H, W = 2, 3, 4
    theta = random_params(rng, kind, N)
    size = (N, 3, H, W)
    dgrid = rng.standard_normal((N, H, W, 2))
    ddtheta = rng.standard_normal(theta.shape)
    d_dgrid, d_theta = DOUBLE_BACKWARDS[kind](ddtheta, dgrid, theta, size,
                                              align_corners=align_corners, **kw)
    report = check_double_backward(
        lambda g, t: (backward(g, t, size, align_corners=align_corners, **kw),),
        [dgrid.copy(), theta.copy()], [ddtheta], [d_dgrid, d_theta])
    assert report.max_rel_error < 1e-7, report
    if kind in ("affine", "attention", "tps"):  # linear in theta: no curvature
        assert np.all(d_theta == 0)
    else:
        assert np.abs(d_theta).max() > 1e-3


def test_double_backward_of_a_linear_generator_is_its_grid_of_ddtheta(rng):
    theta = random_params(rng, "affine", 2)
    dd = rng.standard_normal(theta.shape)
    d_dgrid, _ = affine_grid_double_backward(dd, np.ones((2, 3, 4, 2)), theta, (2, 1, 3, 4))
    assert np.array_equal(d_dgrid, affine_grid(dd, (2, 1, 3, 4)))


@pytest.mark.parametrize("align_corners", [True, False])
def test_volume_affine_double_backward_is_the_grid_of_ddtheta(rng, align_corners):
    N, size = 2, (2, 1, 3, 4, 5)
    theta = rng.standard_normal((N, 3, 4))
    dgrid, ddtheta = rng.standard_normal((N, 3, 4, 5, 3)), rng.standard_normal(theta.shape)
    d_dgrid, d_theta = affine_grid_double_backward(ddtheta, dgrid, theta, size, align_corners)
    assert np.array_equal(d_dgrid, affine_grid(ddtheta, size, align_corners))
    assert d_theta.shape == theta.shape and not d_theta.any()
    report = check_double_backward(
        lambda g, t: (affine_grid_backward(g, t, size, align_corners),),
        [dgrid, theta], [ddtheta], [d_dgrid, d_theta])
    assert report.max_rel_error < 1e-8, report  # bilinear in (dgrid, base): exact
    with pytest.raises(ValueError, match="theta"):  # an image's theta with a volume's size
        affine_grid_double_backward(ddtheta[:, :2, :3], dgrid, theta[:, :2, :3], size)
    with pytest.raises(ValueError, match="dgrid"):
        affine_grid_double_backward(ddtheta, dgrid[..., :2], theta, size)
    with pytest.raises(ValueError, match="ddtheta"):
        affine_grid_double_backward(ddtheta[:, :2], dgrid, theta, size)


@pytest.mark.parametrize("kind", ["similarity", "projective"])
def test_curved_generators_double_backward_matches_torch(rng, kind):
    torch = pytest.importorskip("torch", reason="PyTorch not installed: pip install torch==2.13.0")
    N, H, W = 2, 3, 5
    theta = random_params(rng, kind, N)
    size = (N, 1, H, W)
    dgrid, ddtheta = rng.standard_normal((N, H, W, 2)), rng.standard_normal(theta.shape)
    base = torch.tensor(target_coordinates(H, W))
    t = torch.tensor(theta, requires_grad=True)
    dg = torch.tensor(dgrid, requires_grad=True)
    if kind == "similarity":
        a, log_s, tx, ty = t.T
        s = torch.exp(log_s)
        x_s = s[:, None, None] * (torch.cos(a)[:, None, None] * base[..., 0]
                                  - torch.sin(a)[:, None, None] * base[..., 1])
        y_s = s[:, None, None] * (torch.sin(a)[:, None, None] * base[..., 0]
                                  + torch.cos(a)[:, None, None] * base[..., 1])
        grid = torch.stack([x_s + tx[:, None, None], y_s + ty[:, None, None]], -1)
    else:
        p = torch.cat([base, torch.ones(H, W, 1, dtype=base.dtype)], -1)
        h = torch.cat([t, torch.ones(N, 1, dtype=t.dtype)], 1).reshape(N, 3, 3)
        abw = torch.einsum("hwj,nij->nhwi", p, h)
        grid = abw[..., :2] / abw[..., 2:]
    (dt,) = torch.autograd.grad(grid, t, dg, create_graph=True)
    ours = DOUBLE_BACKWARDS[kind](ddtheta, dgrid, theta, size)
    theirs = torch.autograd.grad(dt, (dg, t), torch.tensor(ddtheta))
    for a, b in zip(ours, theirs, strict=True):
        assert rel_error(a, b.detach().numpy()) <= 1e-12


def test_double_backward_rejects_a_ddtheta_of_another_shape_or_dtype(rng):
    theta = random_params(rng, "projective", 2)
    dgrid = np.zeros((2, 3, 4, 2))
    with pytest.raises(ValueError, match="ddtheta"):
        projective_grid_double_backward(np.zeros((2, 7)), dgrid, theta, (2, 1, 3, 4))
    with pytest.raises(TypeError, match="ddtheta"):
        projective_grid_double_backward(np.zeros((2, 8), np.float32), dgrid, theta, (2, 1, 3, 4))
    with pytest.raises(ValueError, match="dgrid"):
        tps_grid_double_backward(np.zeros((2, 16, 2)), dgrid[:, :2], tps_lattice()[None]
                                 .repeat(2, 0), (2, 1, 3, 4))


def _linspace_by_fractions(steps, align_corners, dtype):
    """The target line computed exactly with fractions, one point at a time (the oracle)."""
    from fractions import Fraction

    dtype = np.dtype(dtype)
    if steps <= 1:
        return np.zeros(max(steps, 0), dtype=dtype)
    step = Fraction(float(dtype.type(2) / dtype.type(steps - 1)))
    exact = [-1 + step * i if i < steps // 2 else 1 - step * (steps - 1 - i)
             for i in range(steps)]
    line = np.array([float(v) for v in exact]).astype(dtype)
    if not align_corners:
        line = line * dtype.type(steps - 1) / dtype.type(steps)
    return line


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vectorised_target_line_is_the_exact_rounding(dtype):
    from stn_numpy.grids import _linspace_from_neg_one

    sizes = [*range(0, 200), 1025, 4097, 12289]
    for steps in sizes:
        for align_corners in (True, False):
            ours = _linspace_from_neg_one(int(steps), align_corners, dtype)
            exact = _linspace_by_fractions(int(steps), align_corners, dtype)
            assert ours.dtype == exact.dtype and ours.tobytes() == exact.tobytes(), steps


def test_a_long_target_line_is_fast():
    # Built one Python object per point, 2 million points took 18 s and 0.4 GB.
    import time

    start = time.perf_counter()
    grid = affine_grid(np.eye(2, 3)[None], (1, 1, 1, 2 * 10**6))
    assert grid.shape == (1, 1, 2 * 10**6, 2) and time.perf_counter() - start < 6


def test_tps_sizes_are_bounded_before_anything_is_allocated():
    import time

    start = time.perf_counter()
    with pytest.raises(ValueError, match="lattice must have at most 1024 points"):
        tps_grid(np.zeros((0, 40000, 2)), (0, 1, 8, 8), lattice=(200, 200))
    with pytest.raises(ValueError, match="the TPS matrix .* would take"):
        tps_grid(np.zeros((0, 1024, 2)), (0, 1, 1000, 1000), lattice=(32, 32))
    assert time.perf_counter() - start < 1
    # An empty batch needs no matrix at all.
    assert tps_grid(np.zeros((0, 16, 2)), (0, 1, 5, 6)).shape == (0, 5, 6, 2)
    assert tps_grid_backward(np.zeros((0, 5, 6, 2)), np.zeros((0, 16, 2)),
                             (0, 1, 5, 6)).shape == (0, 16, 2)


def test_projective_grid_refuses_a_pole_within_round_off():
    # w = 1 + h6 x is zero at x = -7/9 for h6 = 9/7, but rounds to 1e-16 (a grid of 7e15).
    theta = np.array([[1, 0, 0, 0, 1, 0, 9 / 7, 0]])
    with pytest.raises(NonFiniteError, match="denominator"):
        projective_grid(theta, (1, 1, 3, 10), align_corners=True)
    theta[0, 6] = 9 / 7 * (1 - 2**-40)  # a pole just outside: large but honest values
    grid = projective_grid(theta, (1, 1, 3, 10), align_corners=True)
    assert np.isfinite(grid).all() and np.abs(grid).max() > 1e10


@pytest.mark.parametrize("call", [
    lambda: target_coordinates(3, 4, align_corners="False"),
    lambda: target_coordinates(3, 4, align_corners=np.array([True])),
    lambda: target_coordinates(3, 4, dtype=np.int64),
    lambda: target_coordinates(3, 4, dtype="str"),
    lambda: tps_lattice((3, 3), dtype=np.int32),
    lambda: tps_lattice((3, 3), dtype="not a dtype"),
    lambda: affine_grid(np.ma.masked_array(np.eye(2, 3)[None]), (1, 1, 2, 2)),
    lambda: affine_grid(np.eye(2, 3)[None], (1, 1, 2, 2), align_corners=np.array([1, 0])),
])
def test_odd_options_are_refused_naming_the_argument(call):
    with pytest.raises((TypeError, ValueError), match="align_corners|dtype|theta"):
        call()


@pytest.mark.parametrize("size", [(1, 1, 10**6, 10**6), (2, 1, 10**5, 10**5),
                                  (0, 1, 10**7, 10**7),
                                  (1, 10**12, 1, 1)])
def test_huge_sizes_are_a_value_error_naming_size(size):
    with pytest.raises(ValueError, match=r"size .* asks for \d+ values"):
        affine_grid(np.zeros((size[0], 2, 3)), size)


# Kept from a hostile round: sizes, lattices, options and dtypes a user can get wrong;
# every generator returns a finite grid of the documented shape or raises an error
# naming an argument, and never changes theta.
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SIZES = st.one_of(
    st.tuples(st.integers(0, 2), st.integers(-1, 3), st.integers(0, 6), st.integers(0, 6)),
    st.sampled_from([(1, 1, 10**7, 10**7), (0, 1, 2**40, 1), (1, 1.0, 3, 3), "abcd", (1, 1, 3),
                     (1, True, 3, 3)]))


@settings(max_examples=80, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["affine", "attention", "projective", "tps"]), size=_SIZES,
       align_corners=st.sampled_from([True, False, "False", 1, None]),
       lattice=st.sampled_from([(4, 4), (2, 3), (1, 4), (40, 40), (4.0, 4)]),
       dtype=st.sampled_from([np.float32, np.float64, np.float16, np.int64, object]),
       spread=st.sampled_from([0.0, 0.3, 3.0, 1e200]), seed=st.integers(0, 2**16))
def test_hostile_grid_arguments_give_grids_or_errors_naming_an_argument(
        kind, size, align_corners, lattice, dtype, spread, seed):
    import stn_numpy

    N = size[0] if isinstance(size, tuple) and isinstance(size[0], int) else 1
    K = 16 if not all(isinstance(v, int) for v in lattice) else min(lattice[0] * lattice[1], 64)
    shape = {"affine": (N, 2, 3), "attention": (N, 3), "projective": (N, 8), "tps": (N, K, 2)}
    identity = {"affine": np.eye(2, 3), "attention": np.array([1.0, 0, 0]),
                "projective": np.array([1.0, 0, 0, 0, 1, 0, 0, 0]), "tps": tps_lattice((4, 4))}
    theta = np.random.default_rng(seed).standard_normal(shape[kind]) * spread
    if identity[kind].shape == theta.shape[1:]:
        theta = theta + identity[kind]
    with np.errstate(all="ignore"):
        theta = theta.astype(dtype)
    before = theta.copy()
    kwargs = {"lattice": lattice} if kind == "tps" else {}
    forward = getattr(stn_numpy, f"{kind}_grid")
    backward = getattr(stn_numpy, f"{kind}_grid_backward")
    names = ("theta", "size", "align_corners", "lattice", "dgrid", "denominator")
    try:
        grid = forward(theta, size, align_corners=align_corners, **kwargs)
        assert grid.shape == (N, size[2], size[3], 2) and np.isfinite(grid).all()
        dtheta = backward(np.ones_like(grid), theta, size, align_corners=align_corners,
                          **kwargs)
        assert dtheta.shape == theta.shape
    except (TypeError, ValueError) as exc:
        assert any(name in str(exc) for name in names), exc
    assert theta.dtype == object or theta.tobytes() == before.tobytes()
