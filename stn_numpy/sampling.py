"""The differentiable image sampler: ``grid_sample`` and its backward.

Notation of Jaderberg et al. (2015), Sec. 3.3: the input U has shape ``(N, C, H, W)``,
the output V has shape ``(N, C, H_o, W_o)``, and the grid holds for every output point the
normalized source coordinates ``(x_s, y_s)`` (see :mod:`stn_numpy.grids`). Each output
value is a weighted sum of input pixels (paper eq. 3)::

    V[n, c, i] = sum_{h, w} U[n, c, h, w] k(x_s[n, i] - w) k(y_s[n, i] - h)

with the kernel ``k`` set by ``mode``:

* ``"bilinear"``: ``k(d) = max(0, 1 - |d|)`` (paper eq. 5), 4 pixels per point;
* ``"nearest"``: the paper's integer kernel ``delta(round(x_s) - w)`` (eq. 4), 1 pixel;
  its gradient with respect to the grid is zero everywhere (as in PyTorch);
* ``"bicubic"``: Keys' cubic convolution with ``a = -0.75``, 16 pixels per point.

Conventions are exactly those of PyTorch's ``F.grid_sample`` on the CPU:

* unnormalization: ``x = (x_s + 1) / 2 * (W - 1)`` with ``align_corners=True``, and
  ``x = (x_s + 1) * W / 2 - 1/2`` with ``align_corners=False``, in pixel units;
* ``padding_mode="zeros"`` reads 0 outside the image; ``"border"`` clips ``x`` to
  ``[0, W - 1]``; ``"reflection"`` reflects ``x`` about the image borders (the pixel
  centres ``0`` and ``W - 1`` with ``align_corners=True``, the pixel edges ``-1/2`` and
  ``W - 1/2`` otherwise) and then clips. Bilinear and nearest apply the padding to the
  coordinate; bicubic applies it to each of its 16 integer taps.
* ``round`` for nearest is round-half-to-even.
* At a kink of these piecewise maps the gradient is the one PyTorch takes: at an exact
  integer ``x`` bilinear uses the pixels ``x`` and ``x + 1`` (the right-hand derivative),
  and a coordinate clipped to, or lying exactly on, ``0`` or ``W - 1`` in border or
  reflection mode gets zero gradient.
* Unnormalization rounds twice (multiply, then subtract), as PyTorch's scalar CPU kernel
  does. Its AVX2/AVX512 kernels fuse the two into one multiply-add, which can move a
  coordinate that lies within one rounding step of a kink to the other side of it; only
  such points can differ, and :func:`stn_numpy.verify.make_grid` avoids them.

For a fixed grid the sampler is linear in U: ``V = S U`` with a sparse matrix ``S`` of
4, 1 or 16 weights per output point. The backward pass therefore is ``dU = S^T dV``, and
the grid gradient is ``dx_s = sum_c dV * (S_x U) * dx/dx_s`` where ``S_x`` holds the
derivatives of the weights with respect to ``x`` (likewise for ``y``). All three products
run through ``scipy.sparse`` on a copy of U padded with one ring of zeros: every tap
outside the image, whatever the mode, is redirected to that ring. A forward pass without
gradients and with one or two channels skips building ``S``: it sums one weighted gather
of the padded U per tap, in the order of ``S``'s entries, so V is bit-for-bit the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ._checks import NonFiniteError, check_choice, check_finite, check_float_array

__all__ = [
    "grid_sample",
    "grid_sample_backward",
    "grid_sample_forward",
    "grid_sample_backward_from_cache",
    "MODES",
    "PADDING_MODES",
]

MODES = ("bilinear", "nearest", "bicubic")
PADDING_MODES = ("zeros", "border", "reflection")
_CUBIC_A = -0.75
# Forward-only calls with at most this many channels skip the sparse matrix (see
# _sample_by_gathers). Measured: about 2x faster at C=1, even at C=3, and slower from C=4
# on, where scipy's product over all channels at once beats one gather per tap.
_GATHER_MAX_CHANNELS = 2
# Output points per block of _sample_by_gathers: temporaries of 128 KB (float32).
_GATHER_BLOCK = 32768


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def grid_sample(U, grid, mode="bilinear", padding_mode="zeros", align_corners=False):
    """Sample U at the grid's source coordinates, as PyTorch's ``F.grid_sample``.

    Parameters
    ----------
    U : ndarray, shape (N, C, H, W), float32 or float64
        Input feature map.
    grid : ndarray, shape (N, H_o, W_o, 2), dtype of ``U``
        Normalized source coordinates ``(x_s, y_s)``; finite, and at most
        ``finfo(dtype).max / max(H, W)`` in magnitude, so that pixel coordinates cannot
        overflow (any larger value lies far outside the image anyway).
    mode : {"bilinear", "nearest", "bicubic"}
    padding_mode : {"zeros", "border", "reflection"}
    align_corners : bool

    Returns
    -------
    V : ndarray, shape (N, C, H_o, W_o), dtype of ``U``

    Raises
    ------
    TypeError
        Non-float arrays or mismatched dtypes.
    ValueError
        Wrong shapes, unknown modes; :class:`~stn_numpy.NonFiniteError` (a ValueError)
        for NaN, inf or a value beyond that bound in ``grid``. NaN or inf in ``U``
        propagate.
    """
    _check_inputs(U, grid, mode, padding_mode, align_corners)
    if U.shape[1] <= _GATHER_MAX_CHANNELS:
        return _sample_by_gathers(U, grid, mode, padding_mode, align_corners)
    return _apply(_build(U, grid, mode, padding_mode, align_corners, with_grad=False))


def grid_sample_backward(dV, U, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False):
    """Gradients of :func:`grid_sample` with respect to U and grid.

    ``dU = S^T dV`` and ``dgrid[..., 0] = sum_c dV (S_x U) dx/dx_s`` (likewise for y),
    see the module docstring. For ``mode="nearest"`` ``dgrid`` is zero.

    Parameters
    ----------
    dV : ndarray, shape (N, C, H_o, W_o)
        Upstream gradient, dtype of ``U``.
    U, grid, mode, padding_mode, align_corners
        Exactly the arguments of the forward call.

    Returns
    -------
    dU : ndarray, shape (N, C, H, W)
    dgrid : ndarray, shape (N, H_o, W_o, 2)
    """
    _check_inputs(U, grid, mode, padding_mode, align_corners)
    cache = _build(U, grid, mode, padding_mode, align_corners, with_grad=True)
    return grid_sample_backward_from_cache(dV, cache)


def grid_sample_forward(U, grid, mode="bilinear", padding_mode="zeros", align_corners=False):
    """:func:`grid_sample` that also returns the cache its backward needs.

    Returns
    -------
    V : ndarray, shape (N, C, H_o, W_o)
    cache : object
        Pass to :func:`grid_sample_backward_from_cache`; it holds the sparse sampling
        matrices, so the backward pass does not rebuild them.
    """
    _check_inputs(U, grid, mode, padding_mode, align_corners)
    cache = _build(U, grid, mode, padding_mode, align_corners, with_grad=True)
    return _apply(cache), cache


def grid_sample_backward_from_cache(dV, cache):
    """Gradients of the :func:`grid_sample_forward` call that produced ``cache``.

    Parameters
    ----------
    dV : ndarray, shape (N, C, H_o, W_o)
        Upstream gradient, the shape and dtype of the forward's V.
    cache : object
        The second value :func:`grid_sample_forward` returned.

    Returns
    -------
    dU : ndarray, shape (N, C, H, W)
    dgrid : ndarray, shape (N, H_o, W_o, 2)
        Zero for ``mode="nearest"``.
    """
    if not isinstance(cache, _SamplingCache):
        raise TypeError(f"cache must be the cache grid_sample_forward returned, "
                        f"got {type(cache).__name__}")
    N, C, H, W = cache.U_shape
    Ho, Wo = cache.out_hw
    dV = check_float_array("dV", dV, shape=(N, C, Ho, Wo))
    if dV.dtype != cache.dtype:
        raise TypeError(f"dV must have the dtype of U, {cache.dtype}, got {dV.dtype}")
    Hp, Wp = H + 2, W + 2
    dV_rows = dV.reshape(N, C, Ho * Wo).transpose(0, 2, 1).reshape(N * Ho * Wo, C)
    dU_pad = _matmul(cache.S.T, dV_rows).reshape(N, Hp, Wp, C)
    dU = np.ascontiguousarray(dU_pad[:, 1:-1, 1:-1, :].transpose(0, 3, 1, 2))
    dgrid = np.zeros((N, Ho, Wo, 2), dtype=cache.dtype)
    if cache.S_x is not None:
        flat = dgrid.reshape(N * Ho * Wo, 2)
        for axis, S_axis in enumerate((cache.S_x, cache.S_y)):
            d = np.einsum("mc,mc->m", dV_rows, _matmul(S_axis, cache.U_rows))
            # Scaled before it is stored: ``flat *= coord_grad`` with a (1, 2) coord_grad
            # runs inner loops of length 2 and costs more than both products.
            d *= cache.coord_grad[:, axis]
            flat[:, axis] = d
    return dU, dgrid


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _check_inputs(U, grid, mode, padding_mode, align_corners) -> None:
    check_float_array("U", U, shape=(None, None, None, None))
    check_float_array("grid", grid, shape=(None, None, None, 2))
    if grid.dtype != U.dtype:
        raise TypeError(f"grid must have the dtype of U, {U.dtype}, got {grid.dtype}")
    if grid.shape[0] != U.shape[0]:
        raise ValueError(
            f"grid batch size must equal U's, {U.shape[0]}, got grid of shape {grid.shape}"
        )
    if U.shape[2] < 1 or U.shape[3] < 1:
        raise ValueError(f"U must have H, W >= 1, got shape {U.shape}")
    check_choice("mode", mode, MODES)
    check_choice("padding_mode", padding_mode, PADDING_MODES)
    check_choice("align_corners", align_corners, (True, False))
    _check_grid_range(grid, max(U.shape[2], U.shape[3]))


def _check_grid_range(grid: np.ndarray, size: int) -> None:
    """Raise :class:`NonFiniteError` unless ``|grid| <= finfo.max / size`` everywhere.

    The bound is what keeps every index computation in range: with ``size = max(H, W)``
    every pixel coordinate obeys ``|x| <= (max / W + 1) W / 2 + 1/2 < max``, so it, its
    bicubic taps and its reflections are finite, and clipping a finite value yields an
    in-range index. A larger finite ``x_s`` would overflow to inf, which reflection turns
    into NaN and no index can represent; PyTorch returns NaN (or crashes) there, we
    refuse it as we refuse inf itself.
    """
    limit = np.finfo(grid.dtype).max / size
    # Two reductions without temporaries; NaN fails both comparisons.
    if grid.size == 0 or (-limit <= grid.min() and grid.max() <= limit):
        return
    check_finite("grid", grid)
    bad = int(np.count_nonzero(np.abs(grid) > limit))
    raise NonFiniteError(
        f"grid contains {bad} value(s) beyond +-{limit:.4g}, where the pixel coordinate "
        f"for an input of height or width {size} overflows {grid.dtype}"
    )


# --------------------------------------------------------------------------------------
# Coordinate maps: unnormalize, clip, reflect (each returns its derivative too)
# --------------------------------------------------------------------------------------


def _unnormalize(coord: np.ndarray, size: int, align_corners: bool):
    """Normalized -> pixel coordinate; returns ``(x, dx/dcoord)``, ``x`` a fresh array."""
    # One new array, then in place: the same roundings as ``(coord + 1) * scale - 0.5``
    # without a temporary per operation (fresh multi-MB arrays cost page faults).
    x = np.add(coord, 1)
    if align_corners:
        scale = (size - 1) / 2
        x *= scale
        return x, scale
    scale = size / 2
    x *= scale
    x -= 0.5
    return x, scale


def _clip(x: np.ndarray, size: int):
    """Clip to ``[0, size - 1]``; the derivative is 0 on *and* beyond both ends."""
    grad = (x > 0) & (x < size - 1)
    return np.clip(x, 0, size - 1), grad


def _reflect(x: np.ndarray, twice_low: int, twice_high: int):
    """Reflect about ``low`` and ``high`` until inside ``[low, high]``; returns ``(x, +-1)``."""
    if twice_low == twice_high:
        return np.zeros_like(x), np.zeros_like(x)
    low = twice_low / 2
    span = (twice_high - twice_low) / 2
    d = x - low
    sign = np.where(d < 0, -1.0, 1.0)
    d = np.abs(d)
    extra = np.fmod(d, span)
    odd = np.floor(d / span) % 2 == 1
    return np.where(odd, span - extra + low, extra + low), np.where(odd, -sign, sign)


def _pad_coordinate(x: np.ndarray, size: int, padding_mode: str, align_corners: bool):
    """Apply the padding mode to pixel coordinates; returns ``(x, dx_out/dx_in)``."""
    if padding_mode == "zeros":
        return x, None
    if padding_mode == "border":
        return _clip(x, size)
    if align_corners:
        x, sign = _reflect(x, 0, 2 * (size - 1))
    else:
        x, sign = _reflect(x, -1, 2 * size - 1)
    x, grad = _clip(x, size)
    return x, sign * grad


def _padded_index(i: np.ndarray, size: int, shift: int = 0, out=None) -> np.ndarray:
    """Integer pixel index ``i + shift`` -> index into the zero-ringed axis of ``size + 2``.

    ``i`` holds integer-valued floats. Everything left of the image lands on the ring's 0,
    everything right on ``size + 1``. int32 suffices (the axis is short) and halves the
    memory traffic of the index maths. The clip writes int32 directly (clip and cast in
    one pass), and ``shift`` moves the clip bounds instead of adding to ``i``: the tap
    ``i + shift`` then needs no float temporary. (Exact: ``i + shift`` only rounds where
    ``|i| >= 2**24``, far outside the clip range either way.)
    """
    if out is None:
        out = np.empty(i.shape, dtype=np.int32)
    np.clip(i, -1 - shift, size - shift, out=out, casting="unsafe")
    out += 1 + shift
    return out


# --------------------------------------------------------------------------------------
# Kernels: per axis, the pixel indices, weights and weight derivatives of each tap
# --------------------------------------------------------------------------------------


def _axis_taps(coord, size, mode, padding_mode, align_corners):
    """Taps along one axis for every output point, tap-major so each tap is contiguous.

    Returns
    -------
    index : (k, M) int32, indices into the zero-ringed axis
    weight : (k, M) float, kernel weights
    dweight : (k, M) float or None, derivative of the weights w.r.t. the pixel coordinate
    coord_grad : (M,) float, d(pixel coordinate fed to the kernel) / d(normalized coord)

    Constant entries are returned unmaterialised, as arrays or scalars that broadcast to
    these shapes: nearest's weights (all 1), bilinear's ``dweight`` (-1 and 1) and, with
    ``padding_mode="zeros"`` or bicubic, ``coord_grad`` (the scale).
    """
    x, scale = _unnormalize(coord, size, align_corners)
    if mode == "bicubic":
        x0 = np.floor(x)
        t = np.subtract(x, x0, out=x)
        if padding_mode == "zeros":
            index = np.empty((4,) + x.shape, dtype=np.int32)
            for k in range(4):
                _padded_index(x0, size, shift=k - 1, out=index[k])
        else:
            taps = x0[None, :] + np.arange(-1, 3, dtype=x.dtype)[:, None]
            taps, _ = _pad_coordinate(taps, size, padding_mode, align_corners)
            index = _padded_index(np.rint(taps), size)
        weight, dweight = _cubic_weights(t)
        return index, weight, dweight, scale

    x, pad_grad = _pad_coordinate(x, size, padding_mode, align_corners)
    coord_grad = scale if pad_grad is None else scale * pad_grad
    if mode == "nearest":
        index = _padded_index(np.rint(x, out=x), size)[None]
        return index, np.ones((1, 1), dtype=x.dtype), None, coord_grad
    x0 = np.floor(x)
    weight = np.empty((2,) + x.shape, dtype=x.dtype)
    t = np.subtract(x, x0, out=weight[1])
    np.subtract(1, t, out=weight[0])
    index = np.empty((2,) + x.shape, dtype=np.int32)
    _padded_index(x0, size, out=index[0])
    _padded_index(x0, size, shift=1, out=index[1])
    dweight = np.array([[-1], [1]], dtype=x.dtype)
    return index, weight, dweight, coord_grad


def _cubic_weights(t: np.ndarray):
    """Keys' cubic-convolution weights for taps at distances ``1 + t, t, 1 - t, 2 - t``.

    ``k(d) = (a + 2)|d|^3 - (a + 3)|d|^2 + 1`` for ``|d| <= 1`` and
    ``k(d) = a|d|^3 - 5a|d|^2 + 8a|d| - 4a`` for ``1 < |d| < 2``, ``a = -0.75``.
    Returns the weights and their derivatives with respect to ``t``, each ``(4, M)``.
    """
    a = _CUBIC_A

    def near(d):
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def near_grad(d):
        return (3 * (a + 2) * d - 2 * (a + 3)) * d

    def far(d):
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    def far_grad(d):
        return (3 * a * d - 10 * a) * d + 8 * a

    weight = np.stack([far(1 + t), near(t), near(1 - t), far(2 - t)])
    # d/dt of k(1 + t), k(t), k(1 - t), k(2 - t): the chain rule flips the last two.
    dweight = np.stack([far_grad(1 + t), near_grad(t), -near_grad(1 - t), -far_grad(2 - t)])
    return weight, dweight


# --------------------------------------------------------------------------------------
# The sparse sampling matrices
# --------------------------------------------------------------------------------------


@dataclass
class _SamplingCache:
    S: sp.csr_matrix  # (N*Ho*Wo, N*Hp*Wp): V_rows = S @ U_rows
    S_x: sp.csr_matrix | None  # dS/dx, None for nearest
    S_y: sp.csr_matrix | None
    coord_grad: np.ndarray | None  # (N*Ho*Wo or 1, 2): d(pixel coords)/d(normalized coords)
    U_rows: np.ndarray  # (N*Hp*Wp, C): U padded with zeros, one row per pixel
    U_shape: tuple
    out_hw: tuple
    dtype: np.dtype


def _build(U, grid, mode, padding_mode, align_corners, with_grad):
    N, C, H, W = U.shape
    _, Ho, Wo, _ = grid.shape
    Hp, Wp = H + 2, W + 2
    M = N * Ho * Wo
    dtype = U.dtype
    coords = grid.reshape(M, 2)
    ix, wx, dwx, gx = _axis_taps(coords[:, 0], W, mode, padding_mode, align_corners)
    iy, wy, dwy, gy = _axis_taps(coords[:, 1], H, mode, padding_mode, align_corners)
    kx, ky = len(ix), len(iy)

    index_dtype = np.int32 if max(N * Hp * Wp, M * kx * ky) < 2**31 - 1 else np.int64
    # First row of each batch element in U_rows, broadcast over its Ho * Wo points.
    batch_start = (np.arange(N, dtype=index_dtype) * (Hp * Wp))[:, None]
    # Entries of row m are the ky * kx taps (j, i); filling one tap at a time keeps every
    # operation a long contiguous loop, several times faster than a (M, ky, kx) broadcast.
    cols = np.empty((M, ky, kx), dtype=index_dtype)
    cols_nb = cols.reshape(N, Ho * Wo, ky, kx)
    row_start = np.empty((N, Ho * Wo), dtype=index_dtype)
    for j in range(ky):
        np.multiply(iy[j].reshape(N, Ho * Wo), Wp, out=row_start, dtype=index_dtype)
        row_start += batch_start
        for i in range(kx):
            np.add(row_start, ix[i].reshape(N, Ho * Wo), out=cols_nb[:, :, j, i])
    cols = cols.reshape(M * ky * kx)
    indptr = np.arange(0, M * ky * kx + 1, ky * kx, dtype=index_dtype)

    def matrix(weights_y, weights_x):
        data = np.empty((M, ky, kx), dtype=dtype)
        for j in range(ky):
            for i in range(kx):
                np.multiply(weights_y[j], weights_x[i], out=data[:, j, i])
        return sp.csr_matrix((data.reshape(-1), cols, indptr), shape=(M, N * Hp * Wp))

    S = matrix(wy, wx)
    S_x = S_y = coord_grad = None
    if with_grad and dwx is not None:
        S_x = matrix(wy, dwx)
        S_y = matrix(dwy, wx)
        # Scalars (a constant scale) stay a broadcastable (1, 2) row.
        rows = 1 if np.ndim(gx) == np.ndim(gy) == 0 else M
        coord_grad = np.empty((rows, 2), dtype=dtype)
        coord_grad[:, 0], coord_grad[:, 1] = gx, gy

    U_rows = _padded_rows(U)
    return _SamplingCache(S, S_x, S_y, coord_grad, U_rows, (N, C, H, W), (Ho, Wo), dtype)


def _padded_rows(U: np.ndarray) -> np.ndarray:
    """U as ``(N * Hp * Wp, C)`` rows, one per pixel of the zero-ringed image."""
    N, C, H, W = U.shape
    U_pad = np.zeros((N, H + 2, W + 2, C), dtype=U.dtype)
    U_pad[:, 1:-1, 1:-1, :] = U.transpose(0, 2, 3, 1)
    return U_pad.reshape(N * (H + 2) * (W + 2), C)


def _sample_by_gathers(U, grid, mode, padding_mode, align_corners):
    """``V = S U`` without building ``S``: one weighted gather per tap, accumulated.

    The sum runs over the taps in the order of the entries of S's rows, starting from 0,
    exactly as scipy's CSR product does, so V is bit-identical to ``_apply(_build(...))``.
    The images go through in blocks of about ``_GATHER_BLOCK`` output points: the
    temporaries then stay small and are reused from the heap instead of being fresh
    multi-MB arrays, whose page faults would cost more than the arithmetic.
    """
    N, C, H, W = U.shape
    _, Ho, Wo, _ = grid.shape
    U_rows = _padded_rows(U)
    V = np.empty((N, C, Ho, Wo), dtype=U.dtype)
    step = max(1, _GATHER_BLOCK // max(1, Ho * Wo))
    for n in range(0, N, step):
        block = grid[n:n + step]
        V_rows = _gather_block(U_rows, block, n, (H, W), mode, padding_mode, align_corners)
        # Explicit sizes, not -1: with C = 0 or an empty grid, 0 elements fix no -1.
        V[n:n + step] = V_rows.reshape(block.shape[:3] + (C,)).transpose(0, 3, 1, 2)
    return V


def _gather_block(U_rows, grid, n0, image_hw, mode, padding_mode, align_corners):
    """Rows ``S U`` of the images ``n0, n0 + 1, ...`` sampled at ``grid``, as ``(M, C)``."""
    N, Ho, Wo, _ = grid.shape
    H, W = image_hw
    Hp, Wp = H + 2, W + 2
    M = N * Ho * Wo
    coords = grid.reshape(M, 2)
    ix, wx, _, _ = _axis_taps(coords[:, 0], W, mode, padding_mode, align_corners)
    iy, wy, _, _ = _axis_taps(coords[:, 1], H, mode, padding_mode, align_corners)
    index_dtype = np.int32 if len(U_rows) < 2**31 - 1 else np.int64
    batch_start = (np.arange(n0, n0 + N, dtype=index_dtype) * (Hp * Wp))[:, None]
    row_start = np.empty((N, Ho * Wo), dtype=index_dtype)
    rows = np.empty((N, Ho * Wo), dtype=index_dtype)
    weight = np.empty(M, dtype=U_rows.dtype)
    V_rows = np.zeros((M, U_rows.shape[1]), dtype=U_rows.dtype)
    gathered = np.empty_like(V_rows)
    for j in range(len(iy)):
        np.multiply(iy[j].reshape(N, Ho * Wo), Wp, out=row_start, dtype=index_dtype)
        row_start += batch_start
        for i in range(len(ix)):
            np.add(row_start, ix[i].reshape(N, Ho * Wo), out=rows)
            np.multiply(wy[j], wx[i], out=weight)  # rounded as S's entries are
            # The indices are in range by construction; mode="clip" skips the bounds
            # check that would make take() buffer its output.
            np.take(U_rows, rows.reshape(M), axis=0, out=gathered, mode="clip")
            gathered *= weight[:, None]
            V_rows += gathered
    return V_rows


def _matmul(A, B: np.ndarray) -> np.ndarray:
    """Sparse @ dense for a dense ``(rows, C)``; a single column goes through matvec."""
    if B.shape[1] == 1:
        return (A @ B[:, 0])[:, None]
    return A @ B


def _apply(cache: _SamplingCache) -> np.ndarray:
    N, C, _, _ = cache.U_shape
    Ho, Wo = cache.out_hw
    V_rows = _matmul(cache.S, cache.U_rows)
    return np.ascontiguousarray(V_rows.reshape(N, Ho * Wo, C).transpose(0, 2, 1)).reshape(
        N, C, Ho, Wo
    )
