"""Grid generators: transformation parameters -> sampling grids, each with its backward.

Notation follows Jaderberg et al., "Spatial Transformer Networks" (2015), Sec. 3.2. The
output V is a regular grid of *target* points ``(x_t, y_t)``; a transform ``T_theta`` maps
each to the *source* point ``(x_s, y_s)`` where the input U is sampled. Coordinates are
normalized so that -1 and +1 are the left/top and right/bottom of the image; what exactly
sits at +-1 is decided by ``align_corners`` (the convention of PyTorch's ``affine_grid``):

* ``align_corners=True``: +-1 are the *centres* of the corner pixels,
  ``x_t[j] = -1 + 2 j / (W - 1)``;
* ``align_corners=False``: +-1 are the outer *edges* of the corner pixels,
  ``x_t[j] = (-1 + 2 j / (W - 1)) * (W - 1) / W = (2 j + 1) / W - 1``.

A size of 1 gives the single coordinate 0 in both conventions.

Every generator returns ``grid`` of shape ``(N, H, W, 2)`` with ``grid[..., 0] = x_s`` and
``grid[..., 1] = y_s``, the layout :func:`stn_numpy.grid_sample` reads. Each ``*_grid``
has a ``*_grid_backward(dgrid, <the same arguments>)`` right below it returning the
gradient with respect to the transform parameters; ``size`` and ``align_corners`` are not
differentiable.
"""

from __future__ import annotations

import functools
import operator
from collections import OrderedDict

import numpy as np

from ._checks import (
    NonFiniteError,
    check_bool,
    check_choice,
    check_finite,
    check_float_array,
    check_float_dtype,
    check_int_pair,
    check_size,
)
from ._parallel import bands, even_split, parallel_map

_FLOAT64 = np.dtype(np.float64)

__all__ = [
    "target_coordinates",
    "affine_grid",
    "affine_grid_backward",
    "attention_grid",
    "attention_grid_backward",
    "projective_grid",
    "projective_grid_backward",
    "tps_grid",
    "tps_grid_backward",
    "tps_lattice",
]

# The affine products go to worker threads from this many grid values on: below it a
# hand-off to a thread costs more than it saves (measured on a 2-core Xeon, products from
# the contiguous base planes: two bands 1.4x faster forward and 2x backward at 1.8M
# values, N=256 60x60; about even at 0.9M, the forward faster and the backward slower;
# slower at 0.46M values and below).
_PARALLEL_MIN_VALUES = 2**20


def _per_image_products(a: np.ndarray, b: np.ndarray, shape) -> np.ndarray:
    """``out[n] = a[n] @ b`` for every image ``n``, ``out`` of ``shape``, in bands of images
    on worker threads.

    Each product is computed alone (a stacked matmul), so its bits depend neither on the
    other images nor on the worker count. In the planes' orientation, ``(2, 3) @ (3, P)``
    and ``(2, P) @ (P, 3)``, the products are 2-2.5x faster than the interleaved grid's
    ``(P, 3) @ (3, 2)`` on one thread (N=256 60x60).
    """
    out = np.empty(shape, dtype=np.result_type(a, b))
    parallel_map(lambda band: np.matmul(a[band[0]:band[1]], b, out=out[band[0]:band[1]]),
                 bands(shape[0], max(a.size, out.size), _PARALLEL_MIN_VALUES))
    return out


def _linspace_from_neg_one(steps: int, align_corners: bool, dtype) -> np.ndarray:
    """``steps`` points from -1 to 1 (scaled by ``(steps - 1) / steps`` without corners).

    The values are PyTorch's, bit for bit: ``step = 2 / (steps - 1)`` in ``dtype``; the
    first half is ``-1 + step * i`` and the second half ``1 - step * (steps - 1 - i)``,
    each rounded once (a fused multiply-add); the scaling multiplies by ``steps - 1``,
    rounds, then divides by ``steps``. This matters because an identity transform puts
    the points on pixel centres, exactly where the sampler's gradient jumps: a grid one
    rounding step off would take the gradient from the other side of the jump.

    The fused multiply-add is computed exactly in float64, vectorised (one pass per
    operation, not a Python object per point): with ``k`` the distance from the nearer
    end, ``k * step = p + e`` exactly (Dekker's product), ``p - 1 = s + t`` exactly
    (Knuth's sum), and ``t + e`` is exact too (both are multiples of ``ulp(step)`` below
    ``2^-52``, which takes fewer than 53 bits while ``steps < 2^50``), so ``s + (t + e)``
    is the one correct rounding of ``-1 + k * step``. In float32 that value is exact in
    float64 (a 24-bit step times ``k`` spans fewer than 53 bits), so the cast rounds once.
    """
    dtype = np.dtype(dtype)
    if steps <= 1:
        return np.zeros(max(steps, 0), dtype=dtype)
    step = float(dtype.type(2) / dtype.type(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    first = i < steps // 2
    k = np.where(first, i, (steps - 1) - i)
    p = k * step
    (k_hi, k_lo), (step_hi, step_lo) = _veltkamp_split(k), _veltkamp_split(step)
    e = ((k_hi * step_hi - p) + k_hi * step_lo + k_lo * step_hi) + k_lo * step_lo
    s = p - 1.0
    p_part = s + 1.0
    t = (p - p_part) + (-1.0 - (s - p_part))
    line = s + (t + e)
    # 1 - k step = -(-1 + k step) with a rounding symmetric about 0; 0 - x, not -x,
    # keeps a middle point's 0 positive.
    line = np.where(first, line, 0.0 - line).astype(dtype)
    if not align_corners:
        line = line * dtype.type(steps - 1) / dtype.type(steps)
    return line


def _veltkamp_split(x):
    """``(hi, lo)`` with ``hi + lo = x`` exactly and each of at most 26 significant bits,
    so that products of two halves are exact in float64."""
    c = 134217729.0 * x  # 2^27 + 1
    hi = c - (c - x)
    return hi, x - hi


def _cache_by_bytes(max_bytes: int, max_entries: int = 256):
    """Memoize a function returning read-only arrays, keeping at most ``max_bytes`` of them.

    Least recently used results go first; a result larger than the whole budget is
    returned uncached. A count of entries alone (still bounded, for the small ones) would
    let a sweep over large sizes keep gigabytes alive long after every caller dropped them.
    """

    def decorate(fn):
        cache: OrderedDict = OrderedDict()
        held = [0]  # bytes in cache

        @functools.wraps(fn)
        def cached(*args):
            if args in cache:
                cache.move_to_end(args)
                return cache[args]
            value = fn(*args)
            if value.nbytes <= max_bytes:
                cache[args] = value
                held[0] += value.nbytes
                while held[0] > max_bytes or len(cache) > max_entries:
                    held[0] -= cache.popitem(last=False)[1].nbytes
            return value

        cached.cache_nbytes = lambda: held[0]
        cached.max_bytes = max_bytes
        return cached

    return decorate


@_cache_by_bytes(32 * 2**20)
def _base_grid(H: int, W: int, align_corners: bool, dtype=_FLOAT64) -> np.ndarray:
    """Homogeneous target coordinates ``[x_t, y_t, 1]``, shape ``(H, W, 3)``, read-only."""
    base = np.ones((H, W, 3), dtype=dtype)
    base[..., 0] = _linspace_from_neg_one(W, align_corners, dtype)[None, :]
    base[..., 1] = _linspace_from_neg_one(H, align_corners, dtype)[:, None]
    base.setflags(write=False)
    return base


@_cache_by_bytes(32 * 2**20)
def _base_planes(H: int, W: int, align_corners: bool, dtype=_FLOAT64) -> np.ndarray:
    """:func:`_base_grid` as contiguous ``(3, H W)`` planes ``x_t, y_t, 1``, read-only.

    The right operand of ``affine_grid``'s products (and, transposed, of its backward's):
    OpenBLAS runs ``(2, 3) @ (3, P)`` 5x faster from these planes than from a transposed
    view of the ``(P, 3)`` grid (N=256 60x60, float32, one thread). The forward's bits are
    the same as from the grid; the backward's too in float32, while in float64 OpenBLAS
    rounds some sums of 16 to 31 points differently in the two orientations (by an ulp).
    """
    planes = np.ascontiguousarray(_base_grid(H, W, align_corners, dtype).reshape(H * W, 3).T)
    planes.setflags(write=False)
    return planes


def target_coordinates(H: int, W: int, align_corners: bool = False, dtype=np.float64):
    """The regular target grid ``G`` of the output, shape ``(H, W, 2)`` holding ``(x_t, y_t)``.

    ``H`` and ``W`` are ints >= 1 (``TypeError`` for a non-int, ``ValueError`` below 1).
    """
    try:
        H, W = operator.index(H), operator.index(W)
    except TypeError:
        raise TypeError(f"H and W must be ints, got H={H!r}, W={W!r}") from None
    if H < 1 or W < 1:
        raise ValueError(f"H and W must be >= 1, got H={H}, W={W}")
    check_bool("align_corners", align_corners)
    return _base_grid(H, W, bool(align_corners), check_float_dtype("dtype", dtype))[..., :2].copy()


def _check_params(name: str, theta, shape) -> np.ndarray:
    theta = check_float_array(name, theta, shape=shape)
    check_finite(name, theta)
    return theta


def _check_output_size(size, N: int, align_corners) -> tuple[int, int, int, int]:
    size = check_size(size)
    if size[0] != N:
        raise ValueError(f"size[0] (batch) must equal the batch of the parameters, {N}, got {size}")
    check_choice("align_corners", align_corners, (True, False))
    return size


def _check_dgrid(dgrid, N: int, H: int, W: int, dtype) -> np.ndarray:
    dgrid = check_float_array("dgrid", dgrid, shape=(N, H, W, 2))
    if dgrid.dtype != dtype:
        raise TypeError(f"dgrid must have the parameters' dtype {dtype}, got {dgrid.dtype}")
    return dgrid


# --------------------------------------------------------------------------------------
# Affine: the paper's eq. (1), 6 parameters.
# --------------------------------------------------------------------------------------


def affine_grid(theta: np.ndarray, size, align_corners: bool = False) -> np.ndarray:
    """Affine sampling grid, as PyTorch's ``F.affine_grid``.

    ``(x_s, y_s)^T = theta @ (x_t, y_t, 1)^T`` for every target point (paper eq. 1).

    Parameters
    ----------
    theta : ndarray, shape (N, 2, 3), float32 or float64
        Affine matrices; the identity is ``[[1, 0, 0], [0, 1, 0]]``.
    size : sequence of 4 ints
        Output size ``(N, C, H, W)``; only ``N``, ``H``, ``W`` are used.
    align_corners : bool
        Coordinate convention, see the module docstring.

    Returns
    -------
    grid : ndarray, shape (N, H, W, 2), dtype of ``theta``
        A view of ``(N, 2, H, W)`` planes: ``x_s`` and ``y_s`` each contiguous per image,
        the layout the sampler reads fastest (and writes its ``dgrid`` in).
    """
    theta = _check_params("theta", theta, (None, 2, 3))
    N, _, H, W = _check_output_size(size, theta.shape[0], align_corners)
    # planes[n] = theta[n] @ base^T, one (2, 3) @ (3, P) product per image, so an image's
    # grid never depends on the batch around it (products of several images round
    # differently), and bands of images on worker threads give the same values as one call.
    planes = _per_image_products(theta, _base_planes(H, W, align_corners, theta.dtype),
                                 (N, 2, H * W))
    return np.moveaxis(planes.reshape(N, 2, H, W), 1, -1)


def affine_grid_backward(dgrid: np.ndarray, theta: np.ndarray, size, align_corners=False):
    """Gradient of :func:`affine_grid` with respect to ``theta``.

    The grid is linear in theta, so ``dtheta[n, i, j] = sum_{h,w} dgrid[n, h, w, i] *
    base[h, w, j]`` with ``base = (x_t, y_t, 1)``: each row of theta collects the upstream
    gradient of its coordinate weighted by ``x_t``, ``y_t`` and 1.

    Parameters
    ----------
    dgrid : ndarray, shape (N, H, W, 2)
        Upstream gradient, same dtype as ``theta``.
    theta, size, align_corners
        As in :func:`affine_grid`.

    Returns
    -------
    dtheta : ndarray, shape (N, 2, 3)
    """
    theta = _check_params("theta", theta, (None, 2, 3))
    N, _, H, W = _check_output_size(size, theta.shape[0], align_corners)
    dgrid = _check_dgrid(dgrid, N, H, W, theta.dtype)
    # dtheta[n] = planes[n] @ base, one product per image as in affine_grid, over dgrid's
    # (N, 2, H, W) planes: a view for the sampler's dgrid, a copy for an interleaved one.
    # The base as the transposed view of its planes: OpenBLAS runs (2, P) @ (P, 3) 2.8x
    # faster so than from the (P, 3) grid itself (N=256 60x60; see _base_planes for bits).
    planes = np.ascontiguousarray(np.moveaxis(dgrid, -1, 1)).reshape(N, 2, H * W)
    return _per_image_products(planes, _base_planes(H, W, align_corners, theta.dtype).T,
                               (N, 2, 3))


# --------------------------------------------------------------------------------------
# Attention: isotropic scale and translation, 3 parameters (paper Sec. 3.2).
# --------------------------------------------------------------------------------------


def attention_grid(theta: np.ndarray, size, align_corners: bool = False) -> np.ndarray:
    """Attention grid: ``x_s = s x_t + t_x``, ``y_s = s y_t + t_y``.

    The paper's attention transform ``A_theta = [[s, 0, t_x], [0, s, t_y]]``: crop and
    isotropic zoom, no rotation or shear.

    Parameters
    ----------
    theta : ndarray, shape (N, 3)
        ``(s, t_x, t_y)`` per sample; the identity is ``(1, 0, 0)``.
    size, align_corners
        As in :func:`affine_grid`.

    Returns
    -------
    grid : ndarray, shape (N, H, W, 2)
    """
    theta = _check_params("theta", theta, (None, 3))
    N, _, H, W = _check_output_size(size, theta.shape[0], align_corners)
    xy_t = _base_grid(H, W, align_corners, theta.dtype)[..., :2]
    s = theta[:, 0, None, None, None]
    t = theta[:, None, None, 1:]
    return s * xy_t + t


def attention_grid_backward(dgrid: np.ndarray, theta: np.ndarray, size, align_corners=False):
    """Gradient of :func:`attention_grid` with respect to ``theta = (s, t_x, t_y)``.

    ``ds = sum(dgrid_x * x_t + dgrid_y * y_t)``, ``dt_x = sum(dgrid_x)``,
    ``dt_y = sum(dgrid_y)``, sums over the H x W target points of each sample.

    Parameters
    ----------
    dgrid : ndarray, shape (N, H, W, 2)
        Upstream gradient ``dL/dgrid``, same dtype as ``theta``.
    theta, size, align_corners
        As in :func:`attention_grid`.

    Returns
    -------
    dtheta : ndarray, shape (N, 3)
    """
    theta = _check_params("theta", theta, (None, 3))
    N, _, H, W = _check_output_size(size, theta.shape[0], align_corners)
    dgrid = _check_dgrid(dgrid, N, H, W, theta.dtype)
    xy_t = _base_grid(H, W, align_corners, theta.dtype)[..., :2]
    dtheta = np.empty_like(theta)
    dtheta[:, 0] = np.einsum("nhwi,hwi->n", dgrid, xy_t)
    dtheta[:, 1:] = dgrid.sum(axis=(1, 2))
    return dtheta


# --------------------------------------------------------------------------------------
# Projective: a homography with 8 free parameters (h_33 fixed to 1).
# --------------------------------------------------------------------------------------


def _homography_terms(theta: np.ndarray, H: int, W: int, align_corners: bool):
    """``(base, abw, xy_s)``: target points, ``(a, b, w) = h (x_t, y_t, 1)``, ``(a, b) / w``."""
    base = _base_grid(H, W, align_corners, theta.dtype)
    h = np.concatenate([theta, np.ones_like(theta[:, :1])], axis=1).reshape(-1, 3, 3)
    # abw[n, i, j] = (a, b, w) = h @ (x_t, y_t, 1)
    abw = (base.reshape(1, H * W, 3) @ h.transpose(0, 2, 1)).reshape(-1, H, W, 3)
    # w = h6 x + h7 y + 1 carries a rounding error of a few ulps of |h6 x| + |h7 y| + 1; a
    # w within it of zero is a pole whose side (and so the sign of x_s) is round-off.
    w_scale = (np.abs(base).reshape(1, H * W, 3) @ np.abs(h[:, 2:, :]).transpose(0, 2, 1))
    at_pole = np.abs(abw[..., 2]) <= 4 * np.finfo(theta.dtype).eps * w_scale.reshape(-1, H, W)
    # A vanishing w is reported below as an error; numpy's warnings would only add noise.
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        xy_s = abw[..., :2] / abw[..., 2:]
    if at_pole.any() or not np.isfinite(xy_s).all():
        raise NonFiniteError(
            "the homography's denominator h6 x + h7 y + 1 is zero (or too close to zero) at "
            "some target point (x, y), so the grid would be infinite there; keep h6, h7 "
            "small (|h6| + |h7| < 1 keeps it positive on [-1, 1]^2)"
        )
    return base, abw, xy_s


def projective_grid(theta: np.ndarray, size, align_corners: bool = False) -> np.ndarray:
    """Projective (homography) grid.

    With ``h = [[h0, h1, h2], [h3, h4, h5], [h6, h7, 1]]`` and ``(a, b, w) = h (x_t, y_t, 1)``:
    ``x_s = a / w`` and ``y_s = b / w``.

    Parameters
    ----------
    theta : ndarray, shape (N, 8)
        ``(h0, ..., h7)``; the identity is ``(1, 0, 0, 0, 1, 0, 0, 0)``.
    size, align_corners
        As in :func:`affine_grid`.

    Returns
    -------
    grid : ndarray, shape (N, H, W, 2)

    Raises
    ------
    NonFiniteError
        The denominator ``w`` vanishes at some target point, where the grid would be
        infinite: keep ``h6``, ``h7`` small (``|h6| + |h7| < 1`` guarantees ``w > 0`` on
        ``[-1, 1]^2``).
    """
    theta = _check_params("theta", theta, (None, 8))
    _, _, H, W = _check_output_size(size, theta.shape[0], align_corners)
    return _homography_terms(theta, H, W, align_corners)[2]


def projective_grid_backward(dgrid: np.ndarray, theta: np.ndarray, size, align_corners=False):
    """Gradient of :func:`projective_grid` with respect to ``theta = (h0, ..., h7)``.

    By the quotient rule, with ``p = (x_t, y_t, 1)``:
    ``d x_s / d(h0, h1, h2) = p / w``, ``d y_s / d(h3, h4, h5) = p / w`` and
    ``d(x_s, y_s) / d(h6, h7) = -(x_s, y_s) (x_t, y_t) / w``. So with
    ``g = (dgrid_x, dgrid_y) / w``:
    ``dh[0:3] = sum g_x p``, ``dh[3:6] = sum g_y p``,
    ``dh[6:8] = -sum (g_x x_s + g_y y_s) (x_t, y_t)``.

    Parameters
    ----------
    dgrid : ndarray, shape (N, H, W, 2)
        Upstream gradient ``dL/dgrid``, same dtype as ``theta``.
    theta, size, align_corners
        As in :func:`projective_grid`.

    Returns
    -------
    dtheta : ndarray, shape (N, 8)

    Raises
    ------
    NonFiniteError
        The denominator vanishes at some target point, as in :func:`projective_grid`.
    """
    theta = _check_params("theta", theta, (None, 8))
    N, _, H, W = _check_output_size(size, theta.shape[0], align_corners)
    dgrid = _check_dgrid(dgrid, N, H, W, theta.dtype)
    base, abw, xy_s = _homography_terms(theta, H, W, align_corners)
    g = dgrid / abw[..., 2:]
    dtheta = np.empty_like(theta)
    dtheta[:, 0:3] = np.einsum("nhw,hwj->nj", g[..., 0], base)
    dtheta[:, 3:6] = np.einsum("nhw,hwj->nj", g[..., 1], base)
    dtheta[:, 6:8] = -np.einsum("nhw,hwj->nj", (g * xy_s).sum(-1), base[..., :2])
    return dtheta


# --------------------------------------------------------------------------------------
# Thin-plate spline: K control points on a regular target lattice (paper Sec. 3.2, 4.1).
# --------------------------------------------------------------------------------------


def tps_lattice(lattice=(4, 4), dtype=np.float64) -> np.ndarray:
    """The regular target lattice of control points, shape ``(K, 2)``, ``K = rows * cols``.

    Points ``(x, y)`` span ``[-1, 1]^2``, row-major (y outer, x inner). Passing the lattice
    itself as ``theta`` to :func:`tps_grid` gives the identity transform.
    """
    rows, cols = _check_lattice(lattice)
    dtype = check_float_dtype("dtype", dtype)
    y, x = np.meshgrid(np.linspace(-1, 1, rows), np.linspace(-1, 1, cols), indexing="ij")
    return np.stack([x.ravel(), y.ravel()], axis=1).astype(dtype)


#: The most control points a TPS lattice may have: its matrix solve takes O(K^3) time
#: and its matrix K + 3 squared values (1024: 8 MB and well under a second).
MAX_TPS_POINTS = 1024
#: The most bytes the fixed TPS matrix ``M`` (H*W x K float64) may take.
MAX_TPS_MATRIX_BYTES = 2**31


def _check_lattice(lattice) -> tuple[int, int]:
    """``(rows, cols)``: a spline needs at least 2 x 2 control points, and at most
    ``MAX_TPS_POINTS`` in all."""
    rows, cols = check_int_pair("lattice", lattice, 2)
    if rows * cols > MAX_TPS_POINTS:
        raise ValueError(f"lattice must have at most {MAX_TPS_POINTS} points (rows * cols), "
                         f"got {rows} x {cols} = {rows * cols}")
    return rows, cols


def _check_tps_matrix(lattice: tuple[int, int], H: int, W: int) -> None:
    nbytes = H * W * lattice[0] * lattice[1] * 8
    if nbytes > MAX_TPS_MATRIX_BYTES:
        raise ValueError(f"size and lattice: the TPS matrix for {H}x{W} points and "
                         f"{lattice[0]}x{lattice[1]} control points would take {nbytes} bytes, "
                         f"more than {MAX_TPS_MATRIX_BYTES}")


def _tps_radial(r2: np.ndarray) -> np.ndarray:
    """The TPS kernel ``phi(r) = r^2 log r^2`` as a function of ``r^2`` (0 at r = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r2 > 0, r2 * np.log(np.where(r2 > 0, r2, 1.0)), 0.0)


# The largest size the stn model meets (60 x 60, a 4 x 4 lattice) needs 0.5 MB.
@_cache_by_bytes(64 * 2**20)
def _tps_matrix(lattice: tuple[int, int], H: int, W: int, align_corners: bool) -> np.ndarray:
    """The fixed linear map from source control points to the grid, shape ``(H*W, K)``.

    A TPS ``f(p) = a_0 + a_1 x + a_2 y + sum_k w_k phi(|p - c_k|)`` through the target
    lattice ``c`` solves ``L [w; a] = [P'; 0]`` with ``L = [[Phi, C], [C^T, 0]]``,
    ``Phi_ij = phi(|c_i - c_j|)`` and ``C = [1, c]`` (K x 3). Evaluating at the target
    points gives ``grid = B L^{-1}[:, :K] P'`` with ``B = [phi(|p - c_k|), 1, x_t, y_t]``:
    linear in the control points ``P'``, so the solve happens once per lattice and size.
    """
    c = tps_lattice(lattice)
    K = c.shape[0]
    Phi = _tps_radial(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1))
    C = np.concatenate([np.ones((K, 1)), c], axis=1)
    L = np.zeros((K + 3, K + 3))
    L[:K, :K] = Phi
    L[:K, K:] = C
    L[K:, :K] = C.T
    L_inv_top = np.linalg.solve(L, np.eye(K + 3)[:, :K])  # (K+3, K): [w; a] per unit P'
    p = _base_grid(H, W, align_corners, _FLOAT64)[..., :2].reshape(H * W, 2)
    M = np.empty((H * W, K))
    # In bands of points, so that the (points, K, 2) differences stay small.
    for start, stop in even_split(H * W, -(-H * W * K // 2**20)):
        q = p[start:stop]
        B = np.concatenate([_tps_radial(((q[:, None, :] - c[None, :, :]) ** 2).sum(-1)),
                            np.ones((len(q), 1)), q], axis=1)
        M[start:stop] = B @ L_inv_top
    M.setflags(write=False)
    return M


def tps_grid(theta: np.ndarray, size, *, lattice=(4, 4), align_corners: bool = False):
    """Thin-plate-spline grid through K source control points.

    The spline maps each point ``c_k`` of the regular target lattice (see
    :func:`tps_lattice`) to the source point ``theta[n, k]`` and interpolates in between
    with minimal bending energy: ``grid[n] = M theta[n]`` with a fixed ``M`` of shape
    ``(H * W, K)`` (see ``_tps_matrix``).

    Parameters
    ----------
    theta : ndarray, shape (N, K, 2)
        Source control points ``(x, y)``, ``K = lattice[0] * lattice[1]``.
    size : sequence of 4 ints
        Output size ``(N, C, H, W)``.
    lattice : (rows, cols), keyword-only
        Shape of the target control-point lattice; the paper uses 4 x 4.
    align_corners : bool, keyword-only
        Convention of the target points, as in :func:`affine_grid`.

    Returns
    -------
    grid : ndarray, shape (N, H, W, 2)
    """
    rows, cols = _check_lattice(lattice)
    theta = _check_params("theta", theta, (None, rows * cols, 2))
    N, _, H, W = _check_output_size(size, theta.shape[0], align_corners)
    _check_tps_matrix((rows, cols), H, W)
    if not N:  # no image needs the matrix
        return np.empty((0, H, W, 2), dtype=theta.dtype)
    M = _tps_matrix((rows, cols), H, W, align_corners).astype(theta.dtype, copy=False)
    return (M @ theta).reshape(N, H, W, 2)


def tps_grid_backward(dgrid: np.ndarray, theta: np.ndarray, size, *, lattice=(4, 4),
                      align_corners: bool = False):
    """Gradient of :func:`tps_grid` with respect to the control points: ``M^T dgrid[n]``.

    Parameters
    ----------
    dgrid : ndarray, shape (N, H, W, 2)
        Upstream gradient ``dL/dgrid``, same dtype as ``theta``.
    theta, size, lattice, align_corners
        As in :func:`tps_grid` (``lattice`` and ``align_corners`` keyword-only).

    Returns
    -------
    dtheta : ndarray, shape (N, K, 2)
    """
    rows, cols = _check_lattice(lattice)
    theta = _check_params("theta", theta, (None, rows * cols, 2))
    N, _, H, W = _check_output_size(size, theta.shape[0], align_corners)
    dgrid = _check_dgrid(dgrid, N, H, W, theta.dtype)
    _check_tps_matrix((rows, cols), H, W)
    if not N:
        return np.empty((0, rows * cols, 2), dtype=theta.dtype)
    M = _tps_matrix((rows, cols), H, W, align_corners).astype(theta.dtype, copy=False)
    return M.T @ dgrid.reshape(N, H * W, 2)
