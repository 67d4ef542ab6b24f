"""The sampler written plainly, as the paper states it: read this before :mod:`~stn_numpy.sampling`.

Jaderberg et al. (2015), Sec. 3.3. For every output point ``i`` the grid holds the
normalized source point ``(x_s, y_s)``; in pixel units it is ``(x, y)``. The bilinear
kernel (paper eq. 5) gives non-zero weight to four input pixels only, the corners of the
unit square that holds ``(x, y)``::

    x0 = floor(x), x1 = x0 + 1, y0 = floor(y), y1 = y0 + 1

    Ia = U[y0, x0]   top-left        wa = (x1 - x) (y1 - y)
    Ib = U[y1, x0]   bottom-left     wb = (x1 - x) (y - y0)
    Ic = U[y0, x1]   top-right       wc = (x - x0) (y1 - y)
    Id = U[y1, x1]   bottom-right    wd = (x - x0) (y - y0)

    V = wa Ia + wb Ib + wc Ic + wd Id                          (eq. 5, the four non-zero terms)

Its gradients (paper eqs. 6 and 7):

* ``dV/dU`` at each corner is that corner's weight (eq. 6), so ``dU`` is ``dV`` scattered
  back onto the four corners with the same weights. Several output points can read the
  same pixel, so the scatter must add up repeated indices: ``np.add.at``, not ``dU[idx] +=``.
* ``dV/dx = (y1 - y) (Ic - Ia) + (y - y0) (Id - Ib)`` and
  ``dV/dy = (x1 - x) (Ib - Ia) + (x - x0) (Id - Ic)``. This is eq. (7) in *floor form*:
  eq. (7) as printed gives the column ``m`` the derivative ``+1`` if ``m >= x`` and ``-1``
  otherwise, which at an integer ``x = m`` keeps only the ``m`` term and yields neither
  one-sided derivative. With ``x0 = floor(x)`` an integer ``x`` takes the pixels ``x`` and
  ``x + 1``, the right-hand derivative (as PyTorch does). Away from integers the two forms
  agree.

The chain rule then multiplies by ``dx/dx_s`` (the unnormalization factor ``(W - 1) / 2``
or ``W / 2``) and by the derivative of the padding map, and sums over channels, since one
grid point serves every channel.

``mode="nearest"`` (paper eq. 4 with round-half-to-even) reads one pixel; its grid
gradient is zero. Conventions (unnormalization, padding modes, kinks) are those of
:mod:`stn_numpy.sampling`, whose module docstring states them; this module computes the
same numbers one equation per line, with the four corners named as in the paper and every
point handled at once by NumPy's elementwise operations (no sparse matrices, blocks or
threads), and is the oracle the fast sampler is tested against. It is slow (the scatter
is unbuffered) and does not offer bicubic.
"""

from __future__ import annotations

import numpy as np

from ._checks import check_choice, check_float_array
from .sampling import _check_inputs

__all__ = ["grid_sample", "grid_sample_backward", "MODES"]

MODES = ("bilinear", "nearest")


def grid_sample(U, grid, mode="bilinear", padding_mode="zeros", align_corners=False):
    """Sample U at the grid's source points: paper eqs. (3)-(5), written out.

    Parameters
    ----------
    U : ndarray, shape (N, C, H, W), float32 or float64
    grid : ndarray, shape (N, H_o, W_o, 2), dtype of ``U``
        Normalized source points ``(x_s, y_s)``.
    mode : {"bilinear", "nearest"}
    padding_mode : {"zeros", "border", "reflection"}
    align_corners : bool

    Returns
    -------
    V : ndarray, shape (N, C, H_o, W_o)
        Equal to :func:`stn_numpy.grid_sample` up to round-off.
    """
    V, _ = _sample(U, grid, mode, padding_mode, align_corners, dV=None)
    return V


def grid_sample_backward(dV, U, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False):
    """Gradients of :func:`grid_sample`: paper eqs. (6) and (7), the latter in floor form.

    Parameters
    ----------
    dV : ndarray, shape (N, C, H_o, W_o)
        Upstream gradient dL/dV, dtype of ``U``.
    U, grid, mode, padding_mode, align_corners
        Exactly the arguments of the forward call.

    Returns
    -------
    dU : ndarray, shape (N, C, H, W)
        ``dU[n, :, h, w] = sum over points i and corners k that read (h, w) of w_k dV_i``.
    dgrid : ndarray, shape (N, H_o, W_o, 2)
        ``dL/dx_s = dx/dx_s * dpad/dx * sum_c dV dV/dx`` (likewise for y); zero for nearest.
    """
    N, C, _, _ = U.shape
    _, Ho, Wo, _ = grid.shape
    dV = check_float_array("dV", dV, shape=(N, C, Ho, Wo))
    if dV.dtype != U.dtype:
        raise TypeError(f"dV must have the dtype of U, {U.dtype}, got {dV.dtype}")
    _, grads = _sample(U, grid, mode, padding_mode, align_corners, dV=dV)
    return grads


def _sample(U, grid, mode, padding_mode, align_corners, dV):
    check_choice("mode", mode, MODES)
    _check_inputs(U, grid, mode, padding_mode, align_corners)
    N, C, H, W = U.shape
    # Channels last: U_t[n, y, x] is the vector of C values of one pixel.
    U_t = U.transpose(0, 2, 3, 1)
    n = np.arange(N).reshape(N, 1, 1)  # broadcasts against the (N, H_o, W_o) indices

    # Normalized -> pixel coordinates, then the padding map; keep both derivatives.
    x, dx_dxs = _unnormalize(grid[..., 0], W, align_corners)
    y, dy_dys = _unnormalize(grid[..., 1], H, align_corners)
    x, dpad_x = _pad(x, W, padding_mode, align_corners)
    y, dpad_y = _pad(y, H, padding_mode, align_corners)

    def read(yy, xx):
        """U at integer pixels (yy, xx), zero outside the image: (N, H_o, W_o, C)."""
        inside = (xx >= 0) & (xx < W) & (yy >= 0) & (yy < H)
        values = U_t[n, np.clip(yy, 0, H - 1), np.clip(xx, 0, W - 1)]
        return np.where(inside[..., None], values, 0).astype(U.dtype)

    def scatter(dU_t, yy, xx, weighted):
        """``dU_t[n, yy, xx] += weighted`` for the pixels inside the image, repeats added."""
        inside = (xx >= 0) & (xx < W) & (yy >= 0) & (yy < H)
        nn = np.broadcast_to(n, xx.shape)
        np.add.at(dU_t, (nn[inside], yy[inside], xx[inside]), weighted[inside])

    if mode == "nearest":
        xr = _index(np.rint(x), W)  # round half to even, as PyTorch
        yr = _index(np.rint(y), H)
        V_t = read(yr, xr)
        if dV is None:
            return V_t.transpose(0, 3, 1, 2), None
        dV_t = dV.transpose(0, 2, 3, 1)
        dU_t = np.zeros_like(U_t)
        scatter(dU_t, yr, xr, dV_t)
        dgrid = np.zeros(grid.shape, dtype=U.dtype)  # piecewise constant in (x, y)
        return V_t.transpose(0, 3, 1, 2), (np.ascontiguousarray(dU_t.transpose(0, 3, 1, 2)),
                                           dgrid)

    x0 = np.floor(x)
    y0 = np.floor(y)
    x1 = x0 + 1
    y1 = y0 + 1
    ix0, ix1 = _index(x0, W), _index(x1, W)
    iy0, iy1 = _index(y0, H), _index(y1, H)

    Ia = read(iy0, ix0)  # top-left
    Ib = read(iy1, ix0)  # bottom-left
    Ic = read(iy0, ix1)  # top-right
    Id = read(iy1, ix1)  # bottom-right

    wa = ((x1 - x) * (y1 - y))[..., None]
    wb = ((x1 - x) * (y - y0))[..., None]
    wc = ((x - x0) * (y1 - y))[..., None]
    wd = ((x - x0) * (y - y0))[..., None]

    V_t = wa * Ia + wb * Ib + wc * Ic + wd * Id
    if dV is None:
        return V_t.transpose(0, 3, 1, 2), None

    dV_t = dV.transpose(0, 2, 3, 1)

    # eq. (6): each corner receives dV times the weight it was read with.
    dU_t = np.zeros_like(U_t)
    scatter(dU_t, iy0, ix0, wa * dV_t)
    scatter(dU_t, iy1, ix0, wb * dV_t)
    scatter(dU_t, iy0, ix1, wc * dV_t)
    scatter(dU_t, iy1, ix1, wd * dV_t)

    # eq. (7) in floor form: differences of the corners, interpolated along the other axis.
    dV_dx = (y1 - y)[..., None] * (Ic - Ia) + (y - y0)[..., None] * (Id - Ib)
    dV_dy = (x1 - x)[..., None] * (Ib - Ia) + (x - x0)[..., None] * (Id - Ic)

    dgrid = np.empty(grid.shape, dtype=U.dtype)
    dgrid[..., 0] = (dV_t * dV_dx).sum(axis=-1) * dpad_x * dx_dxs
    dgrid[..., 1] = (dV_t * dV_dy).sum(axis=-1) * dpad_y * dy_dys
    return V_t.transpose(0, 3, 1, 2), (np.ascontiguousarray(dU_t.transpose(0, 3, 1, 2)), dgrid)


def _index(v, size):
    """Integer pixel indices of the whole numbers ``v``, those outside kept outside.

    Clipped to ``[-1, size]`` first: every index there or beyond reads 0 anyway, and a
    coordinate such as 1e30 (possible with zeros padding) does not fit an int64.
    """
    return np.clip(v, -1, size).astype(np.int64)


def _unnormalize(coord, size, align_corners):
    """Normalized -> pixel coordinate; returns ``(x, dx/dcoord)``.

    ``align_corners=True``: -1 and +1 are the centres of the corner pixels,
    ``x = (x_s + 1) (W - 1) / 2``. ``False``: they are the outer edges,
    ``x = (x_s + 1) W / 2 - 1/2``.
    """
    if align_corners:
        scale = (size - 1) / 2
        return (coord + 1) * scale, scale
    scale = size / 2
    return (coord + 1) * scale - 0.5, scale


def _pad(x, size, padding_mode, align_corners):
    """The padding mode as a map of pixel coordinates; returns ``(x', dx'/dx)``.

    ``zeros``: no map (pixels outside read 0). ``border``: clip to ``[0, W - 1]``.
    ``reflection``: mirror about the borders (pixel centres ``0, W - 1`` with
    ``align_corners=True``, edges ``-1/2, W - 1/2`` otherwise) until inside, then clip.
    Clipping has derivative 0 on and beyond both ends; each mirror flips the sign.
    """
    if padding_mode == "zeros":
        return x, np.ones_like(x)
    sign = np.ones_like(x)
    if padding_mode == "reflection":
        low, high = (0.0, size - 1.0) if align_corners else (-0.5, size - 0.5)
        span = high - low
        if span == 0:  # a single pixel with align_corners=True: every point maps onto it
            return np.zeros_like(x), np.zeros_like(x)
        d = x - low
        sign = np.where(d < 0, -1.0, 1.0)
        d = np.abs(d)
        folds = np.floor(d / span)
        extra = np.fmod(d, span)
        odd = folds % 2 == 1
        x = np.where(odd, span - extra + low, extra + low)
        sign = np.where(odd, -sign, sign)
    inside = (x > 0) & (x < size - 1)
    return np.clip(x, 0, size - 1), sign * inside
