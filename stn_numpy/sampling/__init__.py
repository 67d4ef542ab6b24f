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
4, 1 or 16 weights per output point (eq. 3). The backward pass therefore is
``dU = S^T dV`` (eq. 6), and the grid gradient is ``dx_s = sum_c dV * (S_x U) * dx/dx_s``
where ``S_x`` holds the derivatives of the weights with respect to ``x`` (eq. 7; likewise
for ``y``). U is padded with one ring of zeros and every tap outside the image, whatever
the mode, is redirected to that ring, so each tap is a plain row gather.

The work runs in blocks of whole images small enough for their temporaries to stay in
cache, spread over worker threads (:mod:`stn_numpy._parallel`; NumPy and SciPy release
the GIL inside each array operation). ``V`` sums one weighted gather per tap; ``dU``
scatters the weighted dV through one sparse ``S^T`` product per block; ``dgrid`` gathers
again. The backward recomputes the taps instead of storing them: in cache this costs
less than writing and re-reading them. It does reuse the forward's zero-padded,
channels-last copy of U, whose rebuilding is a transposing copy. Each output value
depends on its own image alone and sums its taps in a fixed order, so every result is
bit-identical for any split into blocks and any number of threads.

Volumes: U of shape ``(N, C, D, H, W)`` and a grid ``(N, D_o, H_o, W_o, 3)`` holding
``(x_s, y_s, z_s)``, where x runs along W, y along H and z along D (the reverse of the
tensor's axis order, as in PyTorch), give V of shape ``(N, C, D_o, H_o, W_o)``.
``"bilinear"`` is then trilinear (8 voxels per point) and ``"nearest"`` reads one voxel;
every convention above holds along each of the three axes. ``"bicubic"`` is refused, as
PyTorch refuses it. :mod:`stn_numpy.sampling.volumes` holds the 3-D work.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .._checks import NonFiniteError, check_choice, check_finite, check_float_array
from .._parallel import even_split, get_num_threads, parallel_map
from . import volumes

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
# Values (output points x (channels + 4)) per block of images, see _blocks: a block's
# temporaries then total about 8 MB (float32), within the shared L3 cache. A block runs
# some 40 NumPy calls whatever its size, and two threads contend for the GIL between
# them: measured on a 2-core Xeon with 2 threads, blocks a quarter this size (2 MB, in
# L2) made the forward 1.5x and the forward + backward 1.4x slower than these.
_BLOCK = 2**19
# Up to this many channels the forward sums one weighted gather per tap; from there on
# scipy's product with S, over all channels at once, is faster. Measured: gathers about 2x
# faster at C=1, even at C=3, slower from C=4 on.
_GATHER_MAX_CHANNELS = 3
# Zeros on each side of U: as many as the kernel has taps per axis (see _padded_index).
_RING = {"nearest": 1, "bilinear": 2, "bicubic": 4}
_INT32_MAX = 2**31 - 1  # sparse indices beyond this need int64


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def grid_sample(U, grid, mode="bilinear", padding_mode="zeros", align_corners=False):
    """Sample U at the grid's source coordinates, as PyTorch's ``F.grid_sample``.

    Images and volumes: the number of U's dimensions (4 or 5) selects the case, and the
    grid must have as many.

    Parameters
    ----------
    U : ndarray, shape (N, C, H, W) or (N, C, D, H, W), float32 or float64
        Input feature map or volume.
    grid : ndarray, shape (N, H_o, W_o, 2) or (N, D_o, H_o, W_o, 3), dtype of ``U``
        Normalized source coordinates ``(x_s, y_s)``, resp. ``(x_s, y_s, z_s)``: x along W,
        y along H, z along D, the reverse of U's axis order. Finite, and at most
        ``finfo(dtype).max / max(D, H, W)`` in magnitude, so that pixel coordinates cannot
        overflow (any larger value lies far outside the image anyway).
    mode : {"bilinear", "nearest", "bicubic"}
        ``"bilinear"`` is trilinear for volumes; ``"bicubic"`` takes images only.
    padding_mode : {"zeros", "border", "reflection"}
    align_corners : bool

    Returns
    -------
    V : ndarray, shape (N, C, H_o, W_o) or (N, C, D_o, H_o, W_o), dtype of ``U``
        A view of channels-last memory ``(N, H_o, W_o, C)``, the rows the sampler
        computes (for ``C = 1`` the two layouts coincide): transposing them into
        ``(N, C, H_o, W_o)`` order cost 15% of the forward at ``C = 32``, and a consumer
        that reorders its input anyway (a convolution's im2col) pays the same either
        way. ``np.ascontiguousarray(V)`` gives the channel-first copy.

    Raises
    ------
    TypeError
        Non-float arrays or mismatched dtypes.
    ValueError
        Wrong shapes (an image U with a volume's grid, or the reverse, names both),
        unknown modes, bicubic on a volume; :class:`~stn_numpy.NonFiniteError` (a ValueError)
        for NaN, inf or a value beyond that bound in ``grid``. NaN or inf in ``U``
        propagate.
    """
    _check_inputs(U, grid, mode, padding_mode, align_corners, grid_range=False)
    if U.ndim == 5:
        return volumes.forward(U, grid, mode, padding_mode, align_corners)
    return _forward(U, grid, mode, padding_mode, align_corners)


def grid_sample_backward(dV, U, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False):
    """Gradients of :func:`grid_sample` with respect to U and grid.

    ``dU = S^T dV`` and ``dgrid[..., 0] = sum_c dV (S_x U) dx/dx_s`` (likewise for y,
    and z for volumes), see the module docstring and :mod:`~stn_numpy.sampling.volumes`.
    For ``mode="nearest"`` ``dgrid`` is zero.

    Parameters
    ----------
    dV : ndarray, shape (N, C, H_o, W_o) or (N, C, D_o, H_o, W_o)
        Upstream gradient, the shape and dtype of the forward's V.
    U, grid, mode, padding_mode, align_corners
        Exactly the arguments of the forward call.

    Returns
    -------
    dU : ndarray, shape of ``U``
        A view of channels-last memory, as :func:`grid_sample`'s V.
    dgrid : ndarray, shape of ``grid``
        A view of ``(N, 2, H_o, W_o)`` (``(N, 3, D_o, H_o, W_o)``) planes, the layout
        :func:`~stn_numpy.affine_grid` returns.
    """
    _check_inputs(U, grid, mode, padding_mode, align_corners)
    return grid_sample_backward_from_cache(
        dV, _SamplingCache(U, grid, (mode, padding_mode, align_corners)))


def grid_sample_forward(U, grid, mode="bilinear", padding_mode="zeros", align_corners=False):
    """:func:`grid_sample` that also returns the cache its backward needs.

    Returns
    -------
    V : ndarray, shape (N, C, H_o, W_o)
        As :func:`grid_sample` returns it (a view of channels-last memory).
    cache : object
        Pass to :func:`grid_sample_backward_from_cache`. It refers to ``U`` and ``grid``
        (no copies; the backward recomputes the taps block by block, cheaper than storing
        them), so leave both unchanged until then. It also keeps the zero-padded
        channels-last copy of ``U`` that the forward built, ``(H + 2 r)(W + 2 r) / (H W)``
        times the size of ``U`` (``r`` = 2 for bilinear, 4 for bicubic; none for nearest),
        which the backward reads again wherever its blocks are the forward's (the same
        worker count). A ``U`` changed in between would thus be read partly as it was
        and partly as it is. For volumes the copy is of the whole batch,
        ``(D + 4)(H + 4)(W + 4) / (D H W)`` times ``U`` for trilinear, always reread.
    """
    _check_inputs(U, grid, mode, padding_mode, align_corners, grid_range=False)
    rows = {}
    if U.ndim == 5:
        factored = False
        V = volumes.forward(U, grid, mode, padding_mode, align_corners, keep_rows=rows)
    else:
        factored = _factored_bilinear(U, mode)
        V = _forward(U, grid, mode, padding_mode, align_corners, keep_rows=rows,
                     factored=factored)
    return V, _SamplingCache(U, grid, (mode, padding_mode, align_corners), rows, factored)


def grid_sample_backward_from_cache(dV, cache, input_grad=True):
    """Gradients of the :func:`grid_sample_forward` call that produced ``cache``.

    Parameters
    ----------
    dV : ndarray, shape (N, C, H_o, W_o) or (N, C, D_o, H_o, W_o)
        Upstream gradient, the shape and dtype of the forward's V.
    cache : object
        The second value :func:`grid_sample_forward` returned.
    input_grad : bool
        False skips ``dU`` (returned as None), for a U that is data: eq. (6)'s scatter
        is then not run at all.

    Returns
    -------
    dU : ndarray, shape of ``U``, or None
        A view of channels-last memory, as :func:`grid_sample`'s V.
    dgrid : ndarray, shape of ``grid``
        Zero for ``mode="nearest"``; a view of ``(N, 2, H_o, W_o)`` (or
        ``(N, 3, D_o, H_o, W_o)``) planes.
    """
    if not isinstance(cache, _SamplingCache):
        raise TypeError(f"cache must be the cache grid_sample_forward returned, "
                        f"got {type(cache).__name__}")
    U, grid = cache.U, cache.grid
    dV = check_float_array("dV", dV, shape=(*U.shape[:2], *grid.shape[1:-1]))
    if dV.dtype != U.dtype:
        raise TypeError(f"dV must have the dtype of U, {U.dtype}, got {dV.dtype}")
    if U.ndim == 5:
        return volumes.backward(dV, U, grid, *cache.options, input_grad=bool(input_grad),
                                kept_rows=cache.rows)
    return _backward(dV, U, grid, *cache.options, input_grad=bool(input_grad),
                     kept_rows=cache.rows, factored=cache.factored)


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _check_inputs(U, grid, mode, padding_mode, align_corners, grid_range=True) -> None:
    """Raise for invalid arguments. ``grid_range=False`` leaves the grid's values to the
    caller: :func:`_forward` checks them block by block (:func:`_within_range`)."""
    check_float_array("U", U)
    check_float_array("grid", grid)
    if {U.ndim, grid.ndim} == {4, 5}:
        raise ValueError(
            f"U and grid must both be images, U (N, C, H, W) with grid (N, H_o, W_o, 2), or "
            f"both volumes, U (N, C, D, H, W) with grid (N, D_o, H_o, W_o, 3); got U of "
            f"shape {U.shape} and grid of shape {grid.shape}")
    if U.ndim != 5:
        check_float_array("U", U, shape=(None, None, None, None))
    dims = U.ndim - 2
    if grid.ndim == U.ndim and grid.shape[-1] != dims:  # a coordinate per axis of U
        holds = "(x, y, z) for a volume" if dims == 3 else "(x, y) for an image"
        raise ValueError(f"grid must have shape ({'*, ' * (dims + 1)}{dims}), got "
                         f"{grid.shape}: its last axis holds {holds} U, of shape {U.shape}")
    check_float_array("grid", grid, shape=(None,) * (dims + 1) + (dims,))
    if grid.dtype != U.dtype:
        raise TypeError(f"grid must have the dtype of U, {U.dtype}, got {grid.dtype}")
    if grid.shape[0] != U.shape[0]:
        raise ValueError(
            f"grid batch size must equal U's, {U.shape[0]}, got grid of shape {grid.shape}"
        )
    if min(U.shape[2:]) < 1:
        axes = "D, H, W" if U.ndim == 5 else "H, W"
        raise ValueError(f"U must have {axes} >= 1, got shape {U.shape}")
    check_choice("mode", mode, MODES)
    if mode == "bicubic" and U.ndim == 5:
        raise ValueError(f"mode='bicubic' samples images (4-D U) only, as in PyTorch; for "
                         f"a volume U of shape {U.shape} use 'bilinear' (trilinear) or "
                         f"'nearest'")
    check_choice("padding_mode", padding_mode, PADDING_MODES)
    check_choice("align_corners", align_corners, (True, False))
    if grid_range:
        _check_grid_range(grid, max(U.shape[2:]))


def _within_range(grid: np.ndarray, size: int) -> bool:
    """Whether ``|grid| <= finfo.max / size`` everywhere (False for NaN): two reductions
    without temporaries."""
    limit = np.finfo(grid.dtype).max / size
    return grid.size == 0 or bool(-limit <= grid.min() and grid.max() <= limit)


def _check_grid_range(grid: np.ndarray, size: int) -> None:
    """Raise :class:`NonFiniteError` unless ``|grid| <= finfo.max / size`` everywhere.

    The bound is what keeps every index computation in range: with ``size = max(H, W)``
    every pixel coordinate obeys ``|x| <= (max / W + 1) W / 2 + 1/2 < max``, so it, its
    bicubic taps and its reflections are finite, and clipping a finite value yields an
    in-range index. A larger finite ``x_s`` would overflow to inf, which reflection turns
    into NaN and no index can represent; PyTorch returns NaN (or crashes) there, we
    refuse it as we refuse inf itself.
    """
    if _within_range(grid, size):
        return
    limit = np.finfo(grid.dtype).max / size
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
    """Normalized -> pixel coordinate; returns ``(x, dx/dcoord)``, ``x`` a fresh 1-D array."""
    # One new array, then in place: the same roundings as ``(coord + 1) * scale - 0.5``
    # without a temporary per operation (fresh multi-MB arrays cost page faults).
    x = np.add(coord, 1).reshape(-1)
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


def _padded_index(i: np.ndarray, size: int, ring: int) -> np.ndarray:
    """Pixel index ``i``, clipped for the axis padded with ``ring`` zeros on each side.

    ``i`` holds integer-valued floats, the first of ``ring`` consecutive taps: clipped to
    ``[-ring, size]``, every tap ``i, ..., i + ring - 1`` stays inside the padded axis of
    ``size + 2 ring`` (at ``i + ring`` and on), and a run of taps wholly outside the
    image reads only zeros. So one index per point serves all its taps, each tap a fixed
    offset from it. The shift by ``ring`` is left to :func:`_block_taps`, which folds it
    into one constant per image. int32 suffices (the axis is short) and halves the memory
    traffic of the index maths; the clip writes it directly (clip and cast in one pass).
    """
    out = np.empty(i.shape, dtype=np.int32)
    np.clip(i, -ring, size, out=out, casting="unsafe")
    return out


# --------------------------------------------------------------------------------------
# Kernels: per axis, the pixel indices, weights and weight derivatives of each tap
# --------------------------------------------------------------------------------------


def _axis_taps(coord, size, mode, padding_mode, align_corners, fractions_only=False):
    """Taps along one axis for every output point, tap-major so each tap is contiguous.

    Returns
    -------
    index : (1, M) or (k, M) int32, pixel indices clipped for the axis padded with
        ``_RING[mode]`` zeros on each side (:func:`_padded_index`): one row for the first of ``k``
        consecutive taps, else one per tap (bicubic with border or reflection padding,
        where each tap is padded on its own)
    weight : (k, M) float, kernel weights
    dweight : (k, M) float or None, derivative of the weights w.r.t. the pixel coordinate
    coord_grad : (M,) float, d(pixel coordinate fed to the kernel) / d(normalized coord)

    Constant entries are returned unmaterialised, as arrays or scalars that broadcast to
    these shapes: nearest's weights (all 1), bilinear's ``dweight`` (-1 and 1) and, with
    ``padding_mode="zeros"`` or bicubic, ``coord_grad`` (the scale). With
    ``fractions_only``, bilinear's ``weight`` is ``(None, t)``: the fractional part
    ``t = weight[1]`` alone, all that the factored form needs, and one pass fewer.
    """
    x, scale = _unnormalize(coord, size, align_corners)
    if mode == "bicubic":
        x0 = np.floor(x)
        t = np.subtract(x, x0, out=x)
        if padding_mode == "zeros":
            index = _padded_index(x0 - 1, size, 4)[None]
        else:
            taps = x0[None, :] + np.arange(-1, 3, dtype=x.dtype)[:, None]
            taps, _ = _pad_coordinate(taps, size, padding_mode, align_corners)
            index = _padded_index(np.rint(taps), size, 4)
        weight, dweight = _cubic_weights(t)
        return index, weight, dweight, scale

    x, pad_grad = _pad_coordinate(x, size, padding_mode, align_corners)
    coord_grad = scale if pad_grad is None else scale * pad_grad
    if mode == "nearest":
        index = _padded_index(np.rint(x, out=x), size, 1)[None]
        return index, np.ones((1, 1), dtype=x.dtype), None, coord_grad
    x0 = np.floor(x)
    if fractions_only:
        weight = (None, np.subtract(x, x0, out=x))
    else:
        weight = np.empty((2,) + x.shape, dtype=x.dtype)
        t = np.subtract(x, x0, out=weight[1])
        np.subtract(1, t, out=weight[0])
    index = _padded_index(x0, size, 2)[None]
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
# Blocks of whole images: taps, forward (eqs. 3-5) and backward (eqs. 6-7)
# --------------------------------------------------------------------------------------


@dataclass
class _SamplingCache:
    U: np.ndarray  # the forward's arguments, by reference: the backward recomputes the taps
    grid: np.ndarray
    options: tuple  # (mode, padding_mode, align_corners)
    # The forward's padded rows of U per block, {(start, stop): rows}: the backward reads
    # them again, and keeping them costs memory where rebuilding costs a transposing copy.
    rows: dict = field(default_factory=dict)
    # The forward's _factored_bilinear(U, mode), two reductions over U not made again; None
    # when there was no forward (grid_sample_backward).
    factored: bool | None = None


def _blocks(N: int, points: int, C: int) -> list[slice]:
    """Slices of whole images of at most about ``_BLOCK`` values each (points x (channels
    + 4)), as many as a multiple of the worker threads where the batch allows.

    Small enough for every temporary of a block to stay in cache, where reusing it costs
    neither memory traffic nor the page faults of fresh arrays; large enough that the
    fixed cost of a block's NumPy calls stays small; and, when there are several, a
    multiple of the workers, so that none waits for another's last block. Every output
    value depends on its own image alone and is computed in a fixed order, so the split
    changes no result.
    """
    count = -(-N * max(points, 1) * (C + 4) // _BLOCK)  # ceil
    if count > 1:  # a single block runs inline: below _BLOCK a thread saves nothing
        workers = get_num_threads()
        count = min(N, -(-count // workers) * workers)
    return [slice(start, stop) for start, stop in even_split(N, count)] if N else []


def _padded_rows(U: np.ndarray, ring: int) -> np.ndarray:
    """U as ``(N * Hp * Wp, C)`` rows, one per pixel of the image padded with ``ring``
    zeros on every side (``Hp = H + 2 ring``)."""
    N, C, H, W = U.shape
    U_pad = np.zeros((N, H + 2 * ring, W + 2 * ring, C), dtype=U.dtype)
    U_pad[:, ring:ring + H, ring:ring + W, :] = U.transpose(0, 2, 3, 1)
    return U_pad.reshape(len(U_pad) * (H + 2 * ring) * (W + 2 * ring), C)


def _block_taps(grid, image_hw, mode, padding_mode, align_corners, fractions_only=False):
    """Rows of the padded U that every tap reads, and the kernel factors, for a block
    (``fractions_only``: see :func:`_axis_taps`).

    Returns
    -------
    taps : list of ``(j, i, rows, offset)``, one per tap: the tap with weight
        ``wy[j] * wx[i]`` reads row ``rows + offset`` of :func:`_padded_rows` of the block
        (``rows`` an ``(M,)`` int array shared by consecutive taps, ``offset`` an int)
    x_taps, y_taps : tuples ``(weight, dweight, coord_grad)`` of :func:`_axis_taps`
    """
    N, Ho, Wo, _ = grid.shape
    H, W = image_hw
    Wp = W + 2 * _RING[mode]
    P = Ho * Wo  # output points per image
    # Each coordinate as (N, P): a view of affine_grid's planes and of interleaved grids (a
    # copy of some other layouts). In the planes its rows are contiguous, and a pass over
    # them is 3x faster than over every second value of interleaved (x, y) pairs.
    x_s, y_s = grid[..., 0].reshape(N, P), grid[..., 1].reshape(N, P)
    ix, wx, *x_grads = _axis_taps(x_s, W, mode, padding_mode, align_corners, fractions_only)
    iy, wy, *y_grads = _axis_taps(y_s, H, mode, padding_mode, align_corners, fractions_only)
    ring = _RING[mode]
    index_dtype = np.int32 if N * (H + 2 * ring) * Wp < 2**31 - 1 else np.int64
    # Row of pixel (0, 0) of each image in the padded rows.
    image_start = np.arange(N, dtype=index_dtype) * ((H + 2 * ring) * Wp) + ring * (Wp + 1)
    batch_start = image_start[:, None]
    rows = np.empty((len(iy), len(ix), N, P), dtype=index_dtype)
    row_start = np.empty((N, P), dtype=index_dtype)
    for j in range(len(iy)):
        np.multiply(iy[j].reshape(N, P), Wp, out=row_start, dtype=index_dtype)
        row_start += batch_start
        for i in range(len(ix)):
            np.add(row_start, ix[i].reshape(N, P), out=rows[j, i])
    rows = rows.reshape(len(iy), len(ix), N * P)
    # A single index row stands for consecutive taps: tap j is then j rows (j * Wp
    # padded pixels) further on.
    taps = [(j, i, rows[j if len(iy) > 1 else 0, i if len(ix) > 1 else 0],
             (0 if len(iy) > 1 else j * Wp) + (0 if len(ix) > 1 else i))
            for j in range(len(wy)) for i in range(len(wx))]
    return taps, (wx, *x_grads), (wy, *y_grads)


def _forward(U, grid, mode, padding_mode, align_corners, keep_rows=None,
             factored=None) -> np.ndarray:
    """V of every block, computed on the worker threads; a ``(N, C, H_o, W_o)`` view of
    channels-last rows, where each block's ``(M, C)`` rows are copied as they are.
    ``keep_rows``, a dict, receives each block's :func:`_padded_rows`, keyed by
    ``(start, stop)``; ``factored`` is :func:`_factored_bilinear`, computed when None."""
    N, C, H, W = U.shape
    _, Ho, Wo, _ = grid.shape
    V = np.empty((N, Ho, Wo, C), dtype=U.dtype)
    if factored is None:
        factored = _factored_bilinear(U, mode)
    size = max(H, W)

    def block(sl):
        # The grid's range is checked here, on the worker threads and on values the block
        # reads next anyway, rather than in one serial pass over the whole grid first.
        if not _within_range(grid[sl], size):
            raise _OutOfRange
        U_rows = _padded_rows(U[sl], _RING[mode])
        if keep_rows is not None and mode != "nearest":  # nearest's backward reads no U
            keep_rows[sl.start, sl.stop] = U_rows
        V_rows = _sample_block(U_rows, U.shape[1:], grid[sl], mode, padding_mode,
                               align_corners, factored)
        # Explicit sizes, not -1: with C = 0 or an empty grid, 0 elements fix no -1.
        V[sl] = V_rows.reshape(len(V[sl]), Ho, Wo, C)

    try:
        parallel_map(block, _blocks(N, Ho * Wo, C))
    except _OutOfRange:
        pass  # raised below, outside the handler: the internal signal is not chained
    else:
        return V.transpose(0, 3, 1, 2)
    _check_grid_range(grid, size)  # raises, counting the bad values of the whole grid
    raise AssertionError("a block found the grid out of range but the whole grid passed")


class _OutOfRange(Exception):
    """A block of :func:`_forward` found a grid value :func:`_check_grid_range` refuses."""


def _factored_bilinear(U: np.ndarray, mode: str) -> bool:
    """Whether bilinear sampling of U may use the factored form of one channel (see
    :func:`_sample_block`). Its differences of neighbours, ``U01 - U00``, would turn an
    infinite pixel into NaN and overflow for values beyond a quarter of the dtype's range,
    where the four-tap sum gives inf or a finite value; such U take the four-tap sum.
    Two reductions over U."""
    if mode != "bilinear" or U.shape[1] != 1 or U.size == 0:
        return False
    limit = np.finfo(U.dtype).max / 4
    return bool(-limit <= U.min() and U.max() <= limit)  # False for NaN too


def _sample_block(U_rows, U_shape, grid, mode, padding_mode, align_corners,
                  factored) -> np.ndarray:
    """Paper eq. (3), ``V = sum_taps k(x_s - w) k(y_s - h) U[h, w]``, as ``(M, C)`` rows.

    The kernel ``k`` is eq. (4) (nearest), eq. (5) (bilinear) or Keys' cubic; the sum
    runs over the taps in a fixed order (for bilinear on one channel, factored into
    interpolations along x, then y), so V does not depend on the blocks or threads.
    ``U_rows`` is the block's :func:`_padded_rows`, ``U_shape`` its ``(C, H, W)``.
    """
    C = U_shape[0]
    taps, (wx, _, _), (wy, _, _) = _block_taps(grid, U_shape[1:], mode, padding_mode,
                                               align_corners, fractions_only=factored)
    if C > _GATHER_MAX_CHANNELS:
        return _sampling_matrix(taps, wx, wy, len(U_rows), U_rows.dtype) @ U_rows
    M = len(taps[0][2])
    if factored:
        # Eq. (5)'s four weights factored: two interpolations along x, one along y, 9
        # passes instead of 15 (more channels gain nothing: the passes then run over all
        # of them). V = top + ty (bottom - top).
        top, _, bottom, _ = _along_x(_corners(U_rows[:, 0], taps), wx[1])
        bottom -= top
        bottom *= wy[1]
        top += bottom
        return top.reshape(M, 1)
    return _weighted_gathers(U_rows, M, ((rows, offset, functools.partial(
        np.multiply, wy[j], wx[i])) for j, i, rows, offset in taps))


def _weighted_gathers(U_rows, M: int, taps) -> np.ndarray:
    """``sum_taps weight * U_rows[rows + offset]`` as ``(M, C)`` rows, the taps added in
    their order. ``taps`` yields ``(rows, offset, weigh)``, ``weigh(out=w)`` writing the
    tap's ``(M,)`` weights into ``w``."""
    C = U_rows.shape[1]
    U_rows, V_rows, per_row = _squeezed(U_rows, np.empty((M, C), dtype=U_rows.dtype))
    weight = np.empty(M, dtype=U_rows.dtype)
    gathered = np.empty_like(V_rows)
    for t, (rows, offset, weigh) in enumerate(taps):
        weigh(out=weight)
        # The rows are in range by construction; mode="clip" skips the bounds check that
        # would make take() buffer its output. The offset is a view, not an addition.
        np.take(U_rows[offset:], rows, axis=0, out=gathered, mode="clip")
        if t == 0:
            np.multiply(gathered, per_row(weight), out=V_rows)
        else:
            gathered *= per_row(weight)
            V_rows += gathered
    return V_rows.reshape(M, C)


def _corners(U_rows: np.ndarray, taps) -> list[np.ndarray]:
    """Bilinear's four taps of every point, fresh ``(M,)`` arrays for a single channel: top
    left, top right, bottom left, bottom right (``U00, U01, U10, U11``).

    The rows are in range by construction; mode="clip" skips the bounds check that would
    make take() buffer its output. The offset is a view, not an addition.
    """
    return [np.take(U_rows[offset:], rows, axis=0, mode="clip") for _, _, rows, offset in taps]


def _squeezed(U_rows: np.ndarray, rows: np.ndarray):
    """``(U_rows, rows, per_row)`` with a single channel dropped, and ``per_row(w)``
    shaping a per-row factor to multiply ``rows``.

    A ``(M, 1)`` operand runs NumPy's loops one element at a time (about 8 times slower
    than the same data as ``(M,)``); several channels broadcast a ``(M, 1)`` factor.
    """
    if U_rows.shape[1] == 1:
        return U_rows[:, 0], rows[:, 0], lambda w: w
    return U_rows, rows, lambda w: w[:, None]


def _backward(dV, U, grid, mode, padding_mode, align_corners, input_grad=True, kept_rows=None,
              factored=None):
    """dU (eq. 6; None without input_grad) and dgrid (eq. 7) of every block, computed on
    the worker threads. ``kept_rows``: the forward's padded rows of U per block (see
    :func:`_forward`), used where a block matches one of the forward's; ``factored`` as
    for :func:`_forward`."""
    N, C, H, W = U.shape
    _, Ho, Wo, _ = grid.shape
    # dU in channels-last memory, the blocks' rows copied as they are (as V; see
    # grid_sample); dgrid in (N, 2, Ho, Wo) planes, as affine_grid lays out the grid:
    # each coordinate's gradient is written, and read by affine_grid_backward, as
    # contiguous rows.
    dU = np.empty((N, H, W, C), dtype=U.dtype) if input_grad else None
    planes = np.empty((N, 2, Ho, Wo), dtype=grid.dtype)
    if factored is None:
        factored = _factored_bilinear(U, mode)

    kept_rows = kept_rows or {}

    def block(sl):
        dU_block, planes[sl] = _backward_block(dV[sl], U[sl], grid[sl], mode, padding_mode,
                                               align_corners, input_grad, factored,
                                               kept_rows.get((sl.start, sl.stop)))
        if input_grad:
            dU[sl] = dU_block

    parallel_map(block, _blocks(N, Ho * Wo, C))
    return (None if dU is None else dU.transpose(0, 3, 1, 2)), np.moveaxis(planes, 1, -1)


def _backward_block(dV, U, grid, mode, padding_mode, align_corners, input_grad, factored,
                    U_rows=None):
    """Gradients of one block: ``(dU as channels-last rows (n, H, W, C) or None, dgrid as
    planes (n, 2, Ho, Wo))``. ``U_rows``: the block's :func:`_padded_rows`, if at hand.

    Paper eq. (6): ``dU[h, w] = sum_i dV[i] k(x_s[i] - w) k(y_s[i] - h)``, i.e.
    ``dU = S^T dV``, a scatter of every tap's weighted dV, done as one sparse product.
    Paper eq. (7): ``dx_s[i] = sum_c dV[c, i] sum_taps k'(x_s - w) k(y_s - h) U[c, h, w]``
    times ``dx/dx_s`` (likewise for ``y_s``); zero for nearest, whose kernel is flat.
    """
    n, C, H, W = U.shape
    _, Ho, Wo, _ = grid.shape
    M = n * Ho * Wo
    ring = _RING[mode]
    Hp, Wp = H + 2 * ring, W + 2 * ring
    taps, (wx, dwx, gx), (wy, dwy, gy) = _block_taps(
        grid, (H, W), mode, padding_mode, align_corners,
        fractions_only=factored and not input_grad)
    dV_rows = np.ascontiguousarray(dV.reshape(n, C, Ho * Wo).transpose(0, 2, 1)).reshape(M, C)

    dU = None
    if input_grad:
        # S^T's product (a CSC one) is scipy's fastest scatter, faster than COO,
        # np.add.at or np.bincount.
        S = _sampling_matrix(taps, wx, wy, n * Hp * Wp, U.dtype)
        dU_pad = _matmul(S.T, dV_rows).reshape(n, Hp, Wp, C)
        dU = dU_pad[:, ring:ring + H, ring:ring + W, :]

    # Zeros only for nearest, whose grid gradient is zero; otherwise every value is written.
    dgrid = (np.zeros if dwx is None else np.empty)((2, n, Ho * Wo), dtype=U.dtype)
    if dwx is not None:
        if U_rows is None:
            U_rows = _padded_rows(U, ring)
        U_rows, dV_rows, _ = _squeezed(U_rows, dV_rows)
        if factored:  # the per-tap sums below, factored (bilinear, one channel)
            dx, dy = _bilinear_slopes(_corners(U_rows, taps), wx[1], wy[1])
            dx *= dV_rows
            dy *= dV_rows
        elif len(taps) == 4 and not np.isfinite(dV_rows).all():
            # Bilinear with an infinite dV: the slopes per channel first, then times dV,
            # as the reference and PyTorch order it; the per-tap sums below would add
            # inf - inf = NaN where the two taps of a difference meet.
            dx, dy = _slopes_then_dV(U_rows, dV_rows, taps, wx, dwx, wy, dwy)
        else:
            gathered = np.empty_like(dV_rows)
            dVU = np.empty(M, dtype=U.dtype)
            factor = np.empty(M, dtype=U.dtype)
            dx = np.zeros(M, dtype=U.dtype)
            dy = np.zeros(M, dtype=U.dtype)
            for j, i, rows, offset in taps:
                np.take(U_rows[offset:], rows, axis=0, out=gathered, mode="clip")
                if C == 1:
                    np.multiply(dV_rows, gathered, out=dVU)
                else:
                    np.einsum("mc,mc->m", dV_rows, gathered, out=dVU)
                np.multiply(wy[j], dwx[i], out=factor)
                factor *= dVU
                dx += factor
                np.multiply(dwy[j], wx[i], out=factor)
                factor *= dVU
                dy += factor
        np.multiply(dx, gx, out=dgrid[0].reshape(M))
        np.multiply(dy, gy, out=dgrid[1].reshape(M))
    return dU, dgrid.reshape(2, n, Ho, Wo).swapaxes(0, 1)


def _slopes_then_dV(U_rows, dV_rows, taps, wx, dwx, wy, dwy):
    """``(dx, dy)`` of eq. (7) summed over the taps per channel, then weighted by dV:
    ``dx = sum_c dV[c] sum_taps k'(x_s - w) k(y_s - h) U[c, h, w]`` (likewise ``dy``)."""
    M, C = dV_rows.shape
    slope_x = np.zeros((M, C), dtype=dV_rows.dtype)
    slope_y = np.zeros((M, C), dtype=dV_rows.dtype)
    for j, i, rows, offset in taps:
        gathered = np.take(U_rows[offset:], rows, axis=0, mode="clip")
        slope_x += (wy[j] * dwx[i])[:, None] * gathered
        slope_y += (dwy[j] * wx[i])[:, None] * gathered
    return (dV_rows * slope_x).sum(axis=1), (dV_rows * slope_y).sum(axis=1)


def _along_x(corners, tx):
    """Bilinear's interpolation along x, shared by V and its slopes (overwrites the
    corners of :func:`_corners`): returns ``top = U00 + tx (U01 - U00)``, ``U01 - U00``,
    ``bottom = U10 + tx (U11 - U10)`` and ``U11 - U10``, one channel, ``(M,)`` each."""
    top, top_right, bottom, bottom_right = corners
    top_right -= top
    bottom_right -= bottom
    top += top_right * tx
    bottom += bottom_right * tx
    return top, top_right, bottom, bottom_right


def _bilinear_slopes(corners, tx, ty):
    """``dV/dx`` and ``dV/dy`` of eq. (5) at every point (pixel units), from the four
    corners of :func:`_corners` (overwritten) and the fractional parts ``tx``, ``ty``.

    With ``V = (1-tx)(1-ty) U00 + tx(1-ty) U01 + (1-tx)ty U10 + tx ty U11``:
    ``dV/dx = (1-ty)(U01 - U00) + ty(U11 - U10)`` and ``dV/dy = bottom - top``, the rows
    interpolated along x (``top = U00 + tx (U01 - U00)``). 10 passes, where summing the
    four taps' weight derivatives (eq. 7) takes 24. One channel: ``(M,)`` arrays.
    """
    top, top_right, bottom, bottom_right = _along_x(corners, tx)
    bottom -= top  # dV/dy
    bottom_right -= top_right
    bottom_right *= ty
    top_right += bottom_right  # dV/dx
    return top_right, bottom


def _sampling_matrix(taps, wx, wy, n_rows: int, dtype) -> sp.csr_matrix:
    """S of eq. (3) for a block as CSR ``(M, n_rows)``: one row of taps per output point."""
    M, k = len(taps[0][2]), len(taps)
    weight = np.empty((M, k), dtype=dtype)
    # The index type follows the sizes: int32 wraps once the taps (M k, the row pointer's
    # last value) or the columns pass 2^31 - 1, and scipy would then read out of bounds.
    index_dtype = np.int32 if max(M * k, n_rows) <= _INT32_MAX else np.int64
    cols = np.empty((M, k), dtype=index_dtype)
    for t, (j, i, rows, offset) in enumerate(taps):
        np.multiply(wy[j], wx[i], out=weight[:, t])
        np.add(rows, offset, out=cols[:, t])
    indptr = np.arange(0, M * k + 1, k, dtype=index_dtype)
    return sp.csr_matrix((weight.reshape(-1), cols.reshape(-1), indptr), shape=(M, n_rows))


def _matmul(A, B: np.ndarray) -> np.ndarray:
    """Sparse @ dense for a dense ``(rows, C)``; a single column goes through matvec."""
    if B.shape[1] == 1:
        return (A @ B[:, 0])[:, None]
    return A @ B


# The second order lives in its own module (read on its own); re-exported here, where the
# sampler's API is. Imported last: it builds on the helpers above.
from .second_order import grid_sample_double_backward  # noqa: E402

__all__ += ["grid_sample_double_backward"]
