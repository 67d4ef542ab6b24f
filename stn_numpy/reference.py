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

Volumes (U of shape ``(N, C, D, H, W)``, grid ``(N, D_o, H_o, W_o, 3)`` holding
``(x_s, y_s, z_s)``, x along W, y along H, z along D) take the same steps in three axes:
the point ``(x, y, z)`` lies in a cube of eight voxels, each weighted by the product of
three hat functions, one per axis (:func:`_sample_volume` names all eight). The digits of
a corner's name are its offsets along z, y and x, in the tensor's axis order::

    I000 = U[z0, y0, x0]   w000 = (z1 - z) (y1 - y) (x1 - x)
    I001 = U[z0, y0, x1]   w001 = (z1 - z) (y1 - y) (x - x0)
    ...
    I111 = U[z1, y1, x1]   w111 = (z - z0) (y - y0) (x - x0)

and ``dV/dx`` differentiates the x factor only: ``(x1 - x) -> -1``, ``(x - x0) -> +1``.
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
    U : ndarray, shape (N, C, H, W) or (N, C, D, H, W), float32 or float64
    grid : ndarray, shape (N, H_o, W_o, 2) or (N, D_o, H_o, W_o, 3), dtype of ``U``
        Normalized source points ``(x_s, y_s)``, resp. ``(x_s, y_s, z_s)``.
    mode : {"bilinear", "nearest"}
    padding_mode : {"zeros", "border", "reflection"}
    align_corners : bool

    Returns
    -------
    V : ndarray, shape (N, C, H_o, W_o) or (N, C, D_o, H_o, W_o)
        Equal to :func:`stn_numpy.grid_sample` up to round-off.
    """
    V, _ = _sample(U, grid, mode, padding_mode, align_corners, dV=None)
    return V


def grid_sample_backward(dV, U, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False):
    """Gradients of :func:`grid_sample`: paper eqs. (6) and (7), the latter in floor form.

    Parameters
    ----------
    dV : ndarray, shape (N, C, H_o, W_o) or (N, C, D_o, H_o, W_o)
        Upstream gradient dL/dV, dtype of ``U``.
    U, grid, mode, padding_mode, align_corners
        Exactly the arguments of the forward call.

    Returns
    -------
    dU : ndarray, shape of ``U``
        ``dU[n, :, h, w] = sum over points i and corners k that read (h, w) of w_k dV_i``.
    dgrid : ndarray, shape of ``grid``
        ``dL/dx_s = dx/dx_s * dpad/dx * sum_c dV dV/dx`` (likewise for y, z); zero for
        nearest.
    """
    dV = check_float_array("dV", dV, shape=(*U.shape[:2], *grid.shape[1:-1]))
    if dV.dtype != U.dtype:
        raise TypeError(f"dV must have the dtype of U, {U.dtype}, got {dV.dtype}")
    _, grads = _sample(U, grid, mode, padding_mode, align_corners, dV=dV)
    return grads


def _sample(U, grid, mode, padding_mode, align_corners, dV):
    check_choice("mode", mode, MODES)
    _check_inputs(U, grid, mode, padding_mode, align_corners)
    if U.ndim == 5:
        return _sample_volume(U, grid, mode, padding_mode, align_corners, dV)
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


def _sample_volume(U, grid, mode, padding_mode, align_corners, dV):
    """:func:`_sample` for volumes: eight corners, each weight a product of three hats."""
    N, C, D, H, W = U.shape
    U_t = U.transpose(0, 2, 3, 4, 1)  # U_t[n, z, y, x] is the vector of C values of a voxel
    n = np.arange(N).reshape(N, 1, 1, 1)

    x, dx_dxs = _unnormalize(grid[..., 0], W, align_corners)
    y, dy_dys = _unnormalize(grid[..., 1], H, align_corners)
    z, dz_dzs = _unnormalize(grid[..., 2], D, align_corners)
    x, dpad_x = _pad(x, W, padding_mode, align_corners)
    y, dpad_y = _pad(y, H, padding_mode, align_corners)
    z, dpad_z = _pad(z, D, padding_mode, align_corners)

    def inside(zz, yy, xx):
        return (xx >= 0) & (xx < W) & (yy >= 0) & (yy < H) & (zz >= 0) & (zz < D)

    def read(zz, yy, xx):
        """U at integer voxels (zz, yy, xx), zero outside the volume: (N, ..., C)."""
        values = U_t[n, np.clip(zz, 0, D - 1), np.clip(yy, 0, H - 1), np.clip(xx, 0, W - 1)]
        return np.where(inside(zz, yy, xx)[..., None], values, 0).astype(U.dtype)

    def scatter(dU_t, zz, yy, xx, weighted):
        """``dU_t[n, zz, yy, xx] += weighted`` for the voxels inside, repeats added."""
        keep = inside(zz, yy, xx)
        nn = np.broadcast_to(n, xx.shape)
        np.add.at(dU_t, (nn[keep], zz[keep], yy[keep], xx[keep]), weighted[keep])

    def channels_first(a):
        return np.ascontiguousarray(a.transpose(0, 4, 1, 2, 3))

    if mode == "nearest":
        xr, yr, zr = _index(np.rint(x), W), _index(np.rint(y), H), _index(np.rint(z), D)
        V_t = read(zr, yr, xr)
        if dV is None:
            return channels_first(V_t), None
        dU_t = np.zeros_like(U_t)
        scatter(dU_t, zr, yr, xr, dV.transpose(0, 2, 3, 4, 1))
        return channels_first(V_t), (channels_first(dU_t), np.zeros(grid.shape, U.dtype))

    x0, y0, z0 = np.floor(x), np.floor(y), np.floor(z)
    x1, y1, z1 = x0 + 1, y0 + 1, z0 + 1
    ix0, ix1 = _index(x0, W), _index(x1, W)
    iy0, iy1 = _index(y0, H), _index(y1, H)
    iz0, iz1 = _index(z0, D), _index(z1, D)

    # The eight corners; the digits are the offsets along z, y, x.
    I000, I001 = read(iz0, iy0, ix0), read(iz0, iy0, ix1)
    I010, I011 = read(iz0, iy1, ix0), read(iz0, iy1, ix1)
    I100, I101 = read(iz1, iy0, ix0), read(iz1, iy0, ix1)
    I110, I111 = read(iz1, iy1, ix0), read(iz1, iy1, ix1)

    # The hat functions of each axis: weight of the lower and of the upper neighbour.
    hx0, hx1 = (x1 - x)[..., None], (x - x0)[..., None]
    hy0, hy1 = (y1 - y)[..., None], (y - y0)[..., None]
    hz0, hz1 = (z1 - z)[..., None], (z - z0)[..., None]

    w000, w001 = hz0 * hy0 * hx0, hz0 * hy0 * hx1
    w010, w011 = hz0 * hy1 * hx0, hz0 * hy1 * hx1
    w100, w101 = hz1 * hy0 * hx0, hz1 * hy0 * hx1
    w110, w111 = hz1 * hy1 * hx0, hz1 * hy1 * hx1

    V_t = (w000 * I000 + w001 * I001 + w010 * I010 + w011 * I011
           + w100 * I100 + w101 * I101 + w110 * I110 + w111 * I111)
    if dV is None:
        return channels_first(V_t), None

    dV_t = dV.transpose(0, 2, 3, 4, 1)
    dU_t = np.zeros_like(U_t)
    scatter(dU_t, iz0, iy0, ix0, w000 * dV_t)
    scatter(dU_t, iz0, iy0, ix1, w001 * dV_t)
    scatter(dU_t, iz0, iy1, ix0, w010 * dV_t)
    scatter(dU_t, iz0, iy1, ix1, w011 * dV_t)
    scatter(dU_t, iz1, iy0, ix0, w100 * dV_t)
    scatter(dU_t, iz1, iy0, ix1, w101 * dV_t)
    scatter(dU_t, iz1, iy1, ix0, w110 * dV_t)
    scatter(dU_t, iz1, iy1, ix1, w111 * dV_t)

    # Each derivative replaces one axis's hats by their derivatives -1 (lower), +1 (upper).
    dV_dx = (hz0 * hy0 * (I001 - I000) + hz0 * hy1 * (I011 - I010)
             + hz1 * hy0 * (I101 - I100) + hz1 * hy1 * (I111 - I110))
    dV_dy = (hz0 * hx0 * (I010 - I000) + hz0 * hx1 * (I011 - I001)
             + hz1 * hx0 * (I110 - I100) + hz1 * hx1 * (I111 - I101))
    dV_dz = (hy0 * hx0 * (I100 - I000) + hy0 * hx1 * (I101 - I001)
             + hy1 * hx0 * (I110 - I010) + hy1 * hx1 * (I111 - I011))

    dgrid = np.empty(grid.shape, dtype=U.dtype)
    dgrid[..., 0] = (dV_t * dV_dx).sum(axis=-1) * dpad_x * dx_dxs
    dgrid[..., 1] = (dV_t * dV_dy).sum(axis=-1) * dpad_y * dy_dys
    dgrid[..., 2] = (dV_t * dV_dz).sum(axis=-1) * dpad_z * dz_dzs
    return channels_first(V_t), (channels_first(dU_t), dgrid)


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
