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
    "similarity_affine",
    "similarity_affine_backward",
    "similarity_grid",
    "similarity_grid_backward",
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


def _check_output_size(size, N: int, align_corners, lengths=(4,)) -> tuple[int, ...]:
    size = check_size(size, lengths=lengths)
    if size[0] != N:
        raise ValueError(f"size[0] (batch) must equal the batch of the parameters, {N}, got {size}")
    check_choice("align_corners", align_corners, (True, False))
    return size


def _check_dgrid(dgrid, N: int, H: int, W: int, dtype) -> np.ndarray:
    return _check_dgrid_of(dgrid, N, (H, W), dtype)


def _check_dgrid_of(dgrid, N: int, spatial, dtype) -> np.ndarray:
    """``dgrid`` of shape ``(N, *spatial, len(spatial))`` and dtype ``dtype``."""
    dgrid = check_float_array("dgrid", dgrid, shape=(N, *spatial, len(spatial)))
    if dgrid.dtype != dtype:
        raise TypeError(f"dgrid must have the parameters' dtype {dtype}, got {dgrid.dtype}")
    return dgrid


# --------------------------------------------------------------------------------------
# Affine: the paper's eq. (1), 6 parameters.
# --------------------------------------------------------------------------------------


def affine_grid(theta: np.ndarray, size, align_corners: bool = False) -> np.ndarray:
    """Affine sampling grid, as PyTorch's ``F.affine_grid``, for images and for volumes.

    ``(x_s, y_s)^T = theta @ (x_t, y_t, 1)^T`` for every target point (paper eq. 1); for a
    volume (a 5-entry ``size``) ``(x_s, y_s, z_s)^T = theta @ (x_t, y_t, z_t, 1)^T``. As in
    PyTorch, the length of ``size`` selects the case.

    Parameters
    ----------
    theta : ndarray, shape (N, 2, 3) or, for volumes, (N, 3, 4); float32 or float64
        Affine matrices; the identity is ``[[1, 0, 0], [0, 1, 0]]`` (``[I_3 | 0]`` in 3-D).
    size : sequence of 4 ints ``(N, C, H, W)`` or 5 ints ``(N, C, D, H, W)``
        Output size; ``C`` is not used.
    align_corners : bool
        Coordinate convention, see the module docstring (the same along every axis).

    Returns
    -------
    grid : ndarray, shape (N, H, W, 2), or (N, D, H, W, 3) for volumes; dtype of ``theta``
        The last axis holds ``(x_s, y_s)``, resp. ``(x_s, y_s, z_s)``: x runs along W, y
        along H, z along D, the reverse of the tensor's axis order ``(D, H, W)``. A view of
        ``(N, 2, H, W)`` (``(N, 3, D, H, W)``) planes: each coordinate contiguous per
        image, the layout the sampler reads fastest (and writes its ``dgrid`` in).

    Raises
    ------
    ValueError
        ``theta`` of the other case's shape than ``size`` asks for (the message names both).
    """
    theta, size = _check_affine(theta, size, align_corners)
    N, spatial = size[0], size[2:]
    if len(spatial) == 3:
        return np.moveaxis(_affine_volume(theta, *spatial, align_corners), 1, -1)
    H, W = spatial
    # planes[n] = theta[n] @ base^T, one (2, 3) @ (3, P) product per image, so an image's
    # grid never depends on the batch around it (products of several images round
    # differently), and bands of images on worker threads give the same values as one call.
    planes = _per_image_products(theta, _base_planes(H, W, align_corners, theta.dtype),
                                 (N, 2, H * W))
    return np.moveaxis(planes.reshape(N, 2, H, W), 1, -1)


def _check_affine(theta, size, align_corners):
    """``(theta, size)`` checked together: ``theta (N, 2, 3)`` with a 4-entry ``size``,
    ``(N, 3, 4)`` with a 5-entry one; a mismatch names both."""
    size = check_size(size, lengths=(4, 5))
    dims = len(size) - 2
    theta = check_float_array("theta", theta)
    if theta.ndim != 3 or theta.shape[1:] != (dims, dims + 1):
        axes = "(N, C, D, H, W)" if dims == 3 else "(N, C, H, W)"
        raise ValueError(f"theta must have shape (*, {dims}, {dims + 1}), got {theta.shape}: "
                         f"size {size} has {len(size)} entries {axes}")
    check_finite("theta", theta)
    return theta, _check_output_size(size, theta.shape[0], align_corners, (len(size),))


def affine_grid_backward(dgrid: np.ndarray, theta: np.ndarray, size, align_corners=False):
    """Gradient of :func:`affine_grid` with respect to ``theta``, for images and volumes.

    The grid is linear in theta, so ``dtheta[n, i, j] = sum_p dgrid[n, p, i] * base[p, j]``
    over the target points ``p``, with ``base = (x_t, y_t, 1)`` (``(x_t, y_t, z_t, 1)`` for
    volumes): each row of theta collects the upstream gradient of its coordinate weighted
    by the target coordinates and 1.

    Parameters
    ----------
    dgrid : ndarray, shape (N, H, W, 2) or (N, D, H, W, 3)
        Upstream gradient, same dtype as ``theta``; the last axis is ``(x, y[, z])``.
    theta, size, align_corners
        As in :func:`affine_grid`.

    Returns
    -------
    dtheta : ndarray, shape (N, 2, 3) or (N, 3, 4)
    """
    theta, size = _check_affine(theta, size, align_corners)
    N, spatial = size[0], size[2:]
    dgrid = _check_dgrid_of(dgrid, N, spatial, theta.dtype)
    # dgrid's (N, rows, ...) planes: a view for the sampler's dgrid, a copy for an
    # interleaved one.
    planes = np.ascontiguousarray(np.moveaxis(dgrid, -1, 1))
    if len(spatial) == 3:
        return _affine_volume_backward(planes, align_corners)
    H, W = spatial
    # dtheta[n] = planes[n] @ base, one product per image as in affine_grid. The base as
    # the transposed view of its planes: OpenBLAS runs (2, P) @ (P, 3) 2.8x faster so than
    # from the (P, 3) grid itself (N=256 60x60; see _base_planes for bits).
    return _per_image_products(planes.reshape(N, 2, H * W),
                               _base_planes(H, W, align_corners, theta.dtype).T, (N, 2, 3))


def _volume_lines(D: int, H: int, W: int, align_corners: bool, dtype):
    """The target coordinates of a volume as three broadcastable lines: ``x_t`` of shape
    ``(1, 1, W)``, ``y_t`` ``(1, H, 1)``, ``z_t`` ``(D, 1, 1)``."""
    return (_linspace_from_neg_one(W, align_corners, dtype)[None, None, :],
            _linspace_from_neg_one(H, align_corners, dtype)[None, :, None],
            _linspace_from_neg_one(D, align_corners, dtype)[:, None, None])


def _affine_volume(theta: np.ndarray, D: int, H: int, W: int, align_corners: bool):
    """The 3-D affine grid as ``(N, 3, D, H, W)`` planes, bands of volumes on the threads.

    ``planes[n, r] = (theta[n, r, 0] x_t + theta[n, r, 1] y_t) + (theta[n, r, 2] z_t
    + theta[n, r, 3])``: an ``(H, W)`` slab plus a value per depth, one broadcast sum, a
    single pass over the plane. The ``(4, D H W)`` base that a matrix product would read is
    never built (32 MB at 128^3 in float32, more than the grid's own rows), and each
    volume's values depend on it alone.
    """
    x_t, y_t, z_t = _volume_lines(D, H, W, align_corners, theta.dtype)
    planes = np.empty((len(theta), 3, D, H, W), dtype=theta.dtype)

    def band(part):
        for n in range(*part):
            for r, (a, b, c, d) in enumerate(theta[n]):
                np.add(x_t * a + y_t * b, z_t * c + d, out=planes[n, r])

    parallel_map(band, bands(len(theta), planes.size, _PARALLEL_MIN_VALUES))
    return planes


def _affine_volume_backward(planes: np.ndarray, align_corners: bool) -> np.ndarray:
    """``dtheta (N, 3, 4)`` from dgrid's ``(N, 3, D, H, W)`` planes: with ``g`` one plane,
    ``dtheta[n, r] = (sum_w x_t[w] sum_{d,h} g, sum_h y_t[h] sum_{d,w} g,
    sum_d z_t[d] sum_{h,w} g, sum g)``, the sums over the target points of
    :func:`affine_grid_backward` taken along the lines the coordinates are constant on."""
    N, _, D, H, W = planes.shape
    x_t, y_t, z_t = (line.ravel() for line in _volume_lines(D, H, W, align_corners,
                                                            planes.dtype))
    dtheta = np.empty((N, 3, 4), dtype=planes.dtype)

    def band(part):
        for n in range(*part):
            for r in range(3):
                g = planes[n, r]
                # Two passes over the plane: sums over H W per depth, and over D per (h, w).
                per_depth = g.reshape(D, H * W).sum(axis=1)
                over_depth = g.sum(axis=0)
                dtheta[n, r] = (x_t @ over_depth.sum(axis=0), y_t @ over_depth.sum(axis=1),
                                z_t @ per_depth, per_depth.sum())

    parallel_map(band, bands(N, planes.size, _PARALLEL_MIN_VALUES))
    return dtheta


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
# Similarity: rotation, isotropic scale and translation, 4 parameters.
# --------------------------------------------------------------------------------------


def similarity_affine(theta: np.ndarray) -> np.ndarray:
    """The affine matrix of similarity parameters: ``A = s R(a)`` beside ``(t_x, t_y)``.

    ``theta = (a, log s, t_x, t_y)`` gives::

        [[s cos a, -s sin a, t_x],
         [s sin a,  s cos a, t_y]],   s = exp(log s).

    In the image's coordinates (x right, y down) a positive ``a`` turns the sampling grid
    clockwise on screen, so V shows U's content turned counter-clockwise by ``a``; the
    angle ``a`` is what :func:`stn_numpy.measures.rotation_angle` reads from ``A``.

    Parameters
    ----------
    theta : ndarray, shape (N, 4), float32 or float64
        ``(angle in radians, log scale, t_x, t_y)``; the identity is all zeros.

    Returns
    -------
    A : ndarray, shape (N, 2, 3), dtype of ``theta``

    Raises
    ------
    NonFiniteError
        ``exp(log s)`` overflows the dtype.
    """
    theta = _check_params("theta", theta, (None, 4))
    angle, log_s, tx, ty = theta.T
    with np.errstate(over="ignore"):
        s = np.exp(log_s)
    if not np.isfinite(s).all():
        raise NonFiniteError(f"theta's log scale (column 1) must give a finite scale "
                             f"exp(log s) in {theta.dtype}, got log s up to {log_s.max()!r}")
    c, si = s * np.cos(angle), s * np.sin(angle)
    return np.stack([np.stack([c, -si, tx], -1), np.stack([si, c, ty], -1)], axis=1)


def similarity_affine_backward(dA: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Gradient of :func:`similarity_affine` with respect to ``theta = (a, log s, t_x, t_y)``.

    With ``A = s R(a)``, ``dA/da = s R(a + pi/2)`` and ``dA/d(log s) = A``, so
    ``da = sum_ij dA_ij (s R'(a))_ij = s (cos a (dA_10 - dA_01) - sin a (dA_00 + dA_11))``,
    ``d(log s) = sum_ij dA_ij A_ij`` over the 2 x 2 part, ``dt = dA[:, :, 2]``.

    Parameters
    ----------
    dA : ndarray, shape (N, 2, 3)
        Upstream gradient of the affine matrix, same dtype as ``theta``.
    theta : ndarray, shape (N, 4)
        As in :func:`similarity_affine`.

    Returns
    -------
    dtheta : ndarray, shape (N, 4)
    """
    A = similarity_affine(theta)
    dA = check_float_array("dA", dA, shape=A.shape)
    if dA.dtype != A.dtype:
        raise TypeError(f"dA must have theta's dtype {A.dtype}, got {dA.dtype}")
    dtheta = np.empty_like(A[:, 0, :2], shape=(len(A), 4))
    c, si = A[:, 0, 0], A[:, 1, 0]  # s cos a, s sin a
    dtheta[:, 0] = c * (dA[:, 1, 0] - dA[:, 0, 1]) - si * (dA[:, 0, 0] + dA[:, 1, 1])
    dtheta[:, 1] = np.einsum("nij,nij->n", dA[:, :, :2], A[:, :, :2])
    dtheta[:, 2:] = dA[:, :, 2]
    return dtheta


def similarity_grid(theta: np.ndarray, size, align_corners: bool = False) -> np.ndarray:
    """Similarity grid: ``(x_s, y_s) = s R(a) (x_t, y_t) + (t_x, t_y)``.

    The affine grid (paper eq. 1) of ``A =`` :func:`similarity_affine` ``(theta)``: a
    rotation by ``a``, an isotropic scale ``s = exp(log s)`` and a translation, with no
    shear. A head that predicts the angle itself learns to undo rotations far sooner than
    one that predicts the six entries of A, which must learn to move together.

    Parameters
    ----------
    theta : ndarray, shape (N, 4)
        ``(a, log s, t_x, t_y)`` per sample, angle in radians; the identity is all zeros.
    size, align_corners
        As in :func:`affine_grid`.

    Returns
    -------
    grid : ndarray, shape (N, H, W, 2)
    """
    return affine_grid(similarity_affine(theta), size, align_corners)


def similarity_grid_backward(dgrid: np.ndarray, theta: np.ndarray, size, align_corners=False):
    """Gradient of :func:`similarity_grid` with respect to ``theta = (a, log s, t_x, t_y)``.

    The chain rule through A: ``dA =`` :func:`affine_grid_backward` ``(dgrid, A)``, then
    :func:`similarity_affine_backward` ``(dA, theta)``.

    Parameters
    ----------
    dgrid : ndarray, shape (N, H, W, 2)
        Upstream gradient ``dL/dgrid``, same dtype as ``theta``.
    theta, size, align_corners
        As in :func:`similarity_grid`.

    Returns
    -------
    dtheta : ndarray, shape (N, 4)
    """
    A = similarity_affine(theta)
    return similarity_affine_backward(affine_grid_backward(dgrid, A, size, align_corners), theta)


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


# --------------------------------------------------------------------------------------
# Double backward: the backward of each *_grid_backward.
#
# A backward ``dtheta = J(theta)^T dgrid`` is linear in dgrid. For an upstream gradient
# ``ddtheta`` of its output, the scalar ``<ddtheta, J(theta)^T dgrid> = <J(theta) ddtheta,
# dgrid>`` has the gradients
#     d_dgrid = J(theta) ddtheta        (the grid's directional derivative along ddtheta)
#     d_theta = sum_g dgrid_g (d^2 grid_g / dtheta^2) ddtheta    (a Hessian-vector product).
# The affine, attention and TPS grids are linear in theta without a constant term, so
# d_dgrid is the grid of ddtheta itself and d_theta is zero; the similarity and projective
# grids are not, and have both.
# --------------------------------------------------------------------------------------

__all__ += [
    "affine_grid_double_backward",
    "attention_grid_double_backward",
    "similarity_affine_double_backward",
    "similarity_grid_double_backward",
    "projective_grid_double_backward",
    "tps_grid_double_backward",
]


def _check_ddtheta(ddtheta, theta: np.ndarray) -> np.ndarray:
    ddtheta = _check_params("ddtheta", ddtheta, theta.shape)
    if ddtheta.dtype != theta.dtype:
        raise TypeError(f"ddtheta must have theta's dtype {theta.dtype}, got {ddtheta.dtype}")
    return ddtheta


def affine_grid_double_backward(ddtheta: np.ndarray, dgrid: np.ndarray, theta: np.ndarray,
                                size, align_corners=False):
    """Gradients of ``<ddtheta, affine_grid_backward(dgrid, theta, ...)>`` with respect to
    ``dgrid`` and ``theta``.

    The backward ``dtheta[n] = dgrid[n]^T base`` is bilinear in nothing but dgrid: it does
    not read theta at all. So ``d_dgrid = affine_grid(ddtheta)`` (the grid is linear in
    theta, eq. 1, with no constant term: its derivative along ddtheta is the grid of
    ddtheta) and ``d_theta = 0``: an affine grid has no curvature, every second-order
    effect of a spatial transformer with an affine head comes from the sampler.

    Parameters
    ----------
    ddtheta : ndarray, shape (N, 2, 3) or, for volumes, (N, 3, 4)
        Upstream gradient of the backward's ``dtheta``, dtype of ``theta``.
    dgrid, theta, size, align_corners
        Exactly the arguments of :func:`affine_grid_backward` (a 5-entry ``size`` for
        volumes, where the same holds along the third axis).

    Returns
    -------
    d_dgrid : ndarray, shape (N, H, W, 2) or (N, D, H, W, 3)
    d_theta : ndarray, shape of ``theta``
        Zero.
    """
    theta, size = _check_affine(theta, size, align_corners)
    _check_dgrid_of(dgrid, size[0], size[2:], theta.dtype)
    return affine_grid(_check_ddtheta(ddtheta, theta), size, align_corners), np.zeros_like(theta)


def attention_grid_double_backward(ddtheta: np.ndarray, dgrid: np.ndarray, theta: np.ndarray,
                                   size, align_corners=False):
    """Gradients of ``<ddtheta, attention_grid_backward(dgrid, theta, ...)>`` with
    respect to ``dgrid`` and ``theta``.

    Linear in theta without a constant term, like the affine grid:
    ``d_dgrid = attention_grid(ddtheta)``, i.e. ``(ds x_t + dt_x, ds y_t + dt_y)``, and
    ``d_theta = 0``.

    Parameters
    ----------
    ddtheta : ndarray, shape (N, 3)
        Upstream gradient of the backward's ``dtheta``.
    dgrid, theta, size, align_corners
        Exactly the arguments of :func:`attention_grid_backward`.

    Returns
    -------
    d_dgrid : ndarray, shape (N, H, W, 2)
    d_theta : ndarray, shape (N, 3)
        Zero.
    """
    theta = _check_params("theta", theta, (None, 3))
    N, _, H, W = _check_output_size(size, theta.shape[0], align_corners)
    _check_dgrid(dgrid, N, H, W, theta.dtype)
    return (attention_grid(_check_ddtheta(ddtheta, theta), size, align_corners),
            np.zeros_like(theta))


def similarity_affine_double_backward(ddtheta: np.ndarray, dA: np.ndarray, theta: np.ndarray):
    """Gradients of ``<ddtheta, similarity_affine_backward(dA, theta)>`` with respect to
    ``dA`` and ``theta``.

    With ``A = s R(a)``, ``s = exp(l)``, and ``ddtheta = (da', dl', dt')``:
    ``d_dA = da' s R'(a) + dl' s R(a)`` beside ``dt'`` (A's derivative along ddtheta).
    The backward's angle and log-scale entries are ``Q = <dA, s R'(a)>`` and
    ``P = <dA, s R(a)>`` (2 x 2 parts); since ``R'' = -R`` and ``d s / d l = s``,
    ``d_theta_a = -da' P + dl' Q``, ``d_theta_l = da' Q + dl' P``, and zero for the
    translation, on which the backward does not depend.

    Parameters
    ----------
    ddtheta : ndarray, shape (N, 4)
        Upstream gradient of the backward's ``dtheta``.
    dA, theta
        Exactly the arguments of :func:`similarity_affine_backward`.

    Returns
    -------
    d_dA : ndarray, shape (N, 2, 3)
    d_theta : ndarray, shape (N, 4)
    """
    A = similarity_affine(theta)
    ddtheta = _check_ddtheta(ddtheta, theta)
    Q, P = similarity_affine_backward(dA, theta)[:, :2].T
    da, dl = ddtheta[:, 0], ddtheta[:, 1]
    c, si = A[:, 0, 0], A[:, 1, 0]  # s cos a, s sin a
    diag, off = dl * c - da * si, dl * si + da * c  # s (dl' cos a - da' sin a), ...
    d_dA = np.stack([np.stack([diag, -off, ddtheta[:, 2]], -1),
                     np.stack([off, diag, ddtheta[:, 3]], -1)], axis=1)
    d_theta = np.zeros_like(A[:, 0, :2], shape=(len(A), 4))
    d_theta[:, 0] = dl * Q - da * P
    d_theta[:, 1] = da * Q + dl * P
    return d_dA, d_theta


def similarity_grid_double_backward(ddtheta: np.ndarray, dgrid: np.ndarray, theta: np.ndarray,
                                    size, align_corners=False):
    """Gradients of ``<ddtheta, similarity_grid_backward(dgrid, theta, ...)>`` with
    respect to ``dgrid`` and ``theta``.

    The chain of the backward, undone link by link: with ``dA =
    affine_grid_backward(dgrid, A)``, :func:`similarity_affine_double_backward` gives
    ``(d_dA, d_theta)``, and :func:`affine_grid_double_backward` carries ``d_dA`` to
    ``d_dgrid = affine_grid(d_dA)`` (adding nothing to theta: the affine backward does
    not read A).

    Parameters
    ----------
    ddtheta : ndarray, shape (N, 4)
        Upstream gradient of the backward's ``dtheta``.
    dgrid, theta, size, align_corners
        Exactly the arguments of :func:`similarity_grid_backward`.

    Returns
    -------
    d_dgrid : ndarray, shape (N, H, W, 2)
    d_theta : ndarray, shape (N, 4)
    """
    A = similarity_affine(theta)
    dA = affine_grid_backward(dgrid, A, size, align_corners)
    d_dA, d_theta = similarity_affine_double_backward(ddtheta, dA, theta)
    return affine_grid(d_dA, size, align_corners), d_theta


def projective_grid_double_backward(ddtheta: np.ndarray, dgrid: np.ndarray, theta: np.ndarray,
                                    size, align_corners=False):
    """Gradients of ``<ddtheta, projective_grid_backward(dgrid, theta, ...)>`` with
    respect to ``dgrid`` and ``theta``.

    With ``p = (x_t, y_t, 1)``, ``(a, b, w) = h p`` and the directions ``a' = ddh[0:3] p``,
    ``b' = ddh[3:6] p``, ``w' = ddh[6:8] (x_t, y_t)``, the scalar is, per target point,
    ``dgrid_x (a' - x_s w') / w + dgrid_y (b' - y_s w') / w``. Hence
    ``d_dgrid = ((a' - x_s w') / w, (b' - y_s w') / w)``, the grid's derivative along
    ddtheta, and, differentiating ``a'/w - a w'/w^2`` (and the same in b) by a, b and w:

        dS/da = -dgrid_x w' / w^2,     dS/db = -dgrid_y w' / w^2,
        dS/dw = (2 w' (dgrid_x x_s + dgrid_y y_s) - dgrid_x a' - dgrid_y b') / w^2,

    which ``a, b, w`` (linear in h) carry to ``d_theta[0:3] = sum dS/da p``,
    ``d_theta[3:6] = sum dS/db p``, ``d_theta[6:8] = sum dS/dw (x_t, y_t)``.

    Parameters
    ----------
    ddtheta : ndarray, shape (N, 8)
        Upstream gradient of the backward's ``dtheta``.
    dgrid, theta, size, align_corners
        Exactly the arguments of :func:`projective_grid_backward`.

    Returns
    -------
    d_dgrid : ndarray, shape (N, H, W, 2)
    d_theta : ndarray, shape (N, 8)

    Raises
    ------
    NonFiniteError
        The denominator vanishes at some target point, as in :func:`projective_grid`.
    """
    theta = _check_params("theta", theta, (None, 8))
    N, _, H, W = _check_output_size(size, theta.shape[0], align_corners)
    dgrid = _check_dgrid(dgrid, N, H, W, theta.dtype)
    ddtheta = _check_ddtheta(ddtheta, theta)
    base, abw, xy_s = _homography_terms(theta, H, W, align_corners)
    w = abw[..., 2]
    a_ = np.einsum("nj,hwj->nhw", ddtheta[:, 0:3], base)
    b_ = np.einsum("nj,hwj->nhw", ddtheta[:, 3:6], base)
    w_ = np.einsum("nj,hwj->nhw", ddtheta[:, 6:8], base[..., :2])
    d_dgrid = np.stack([a_ - xy_s[..., 0] * w_, b_ - xy_s[..., 1] * w_], axis=-1) / w[..., None]
    g = dgrid / (w * w)[..., None]
    dS_dw = 2 * w_ * (g * xy_s).sum(-1) - g[..., 0] * a_ - g[..., 1] * b_
    d_theta = np.empty_like(theta)
    d_theta[:, 0:3] = -np.einsum("nhw,hwj->nj", g[..., 0] * w_, base)
    d_theta[:, 3:6] = -np.einsum("nhw,hwj->nj", g[..., 1] * w_, base)
    d_theta[:, 6:8] = np.einsum("nhw,hwj->nj", dS_dw, base[..., :2])
    return d_dgrid, d_theta


def tps_grid_double_backward(ddtheta: np.ndarray, dgrid: np.ndarray, theta: np.ndarray, size,
                             *, lattice=(4, 4), align_corners: bool = False):
    """Gradients of ``<ddtheta, tps_grid_backward(dgrid, theta, ...)>`` with respect to
    ``dgrid`` and ``theta``.

    The grid ``M theta[n]`` is linear in the control points, so ``d_dgrid =
    tps_grid(ddtheta) = M ddtheta[n]`` and ``d_theta = 0``.

    Parameters
    ----------
    ddtheta : ndarray, shape (N, K, 2)
        Upstream gradient of the backward's ``dtheta``.
    dgrid, theta, size, lattice, align_corners
        Exactly the arguments of :func:`tps_grid_backward`.

    Returns
    -------
    d_dgrid : ndarray, shape (N, H, W, 2)
    d_theta : ndarray, shape (N, K, 2)
        Zero.
    """
    rows, cols = _check_lattice(lattice)
    theta = _check_params("theta", theta, (None, rows * cols, 2))
    N, _, H, W = _check_output_size(size, theta.shape[0], align_corners)
    _check_dgrid(dgrid, N, H, W, theta.dtype)
    ddtheta = _check_ddtheta(ddtheta, theta)
    return (tps_grid(ddtheta, size, lattice=lattice, align_corners=align_corners),
            np.zeros_like(theta))
