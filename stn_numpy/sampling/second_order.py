"""Second order of the sampler: the backward of :func:`~stn_numpy.grid_sample_backward`.

Kept apart from :mod:`stn_numpy.sampling` (which re-exports it) so that each file reads in
one sitting; it reuses that module's taps, coordinate maps and blocks unchanged.

Notation as in :mod:`stn_numpy.sampling`. For one output point ``i`` write ``x, y`` for
its pixel coordinates (unnormalized, and for bilinear and nearest padded), ``g_x, g_y``
for ``dx/dx_s, dy/dy_s`` (the scale times the padding's derivative: ``+-1`` inside,
0 where clipped), and for each tap ``t`` reading pixel ``p(t)``

    W_t = k_x(t) k_y(t),   W_t^x = k_x'(t) k_y(t),   W_t^y = k_x(t) k_y'(t),
    W_t^xx = k_x''(t) k_y(t),   W_t^xy = k_x'(t) k_y'(t),   W_t^yy = k_x(t) k_y''(t),

the tap's weight and its derivatives with respect to ``x`` and ``y`` (per axis the kernel
factor and its first and second derivatives, combined per tap). The backward is

    dU[c, p]     = sum_i sum_{t: p(t) = p} W_t dV[c, i]                 (eq. 6)
    dx_s[i]      = g_x sum_c dV[c, i] sum_t W_t^x U[c, p(t)]            (eq. 7)
    dy_s[i]      = g_y sum_c dV[c, i] sum_t W_t^y U[c, p(t)]

and its double backward is the gradient of ``L2 = <ddU, dU> + <ddgrid, dgrid>`` with
respect to dV, U and grid, ``a_x = ddx_s g_x`` and ``a_y = ddy_s g_y`` the upstream grid
gradient carried into pixel units.

Volumes (5-D U, grid ``(..., 3)`` holding ``(x, y, z)``) take the same sums over three
axes: a tap's weight is ``W_t = k_x(t) k_y(t) k_z(t)`` and its derivatives are the products
with one or two of the factors differentiated, ``W_t^{de}`` for ``d, e`` in ``x, y, z``.
The per-tap sums (:func:`_tap_factor`, :func:`_double_backward_block`) are written for
any number of axes; only the taps come from :mod:`stn_numpy.sampling.volumes`.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .._checks import check_float_array
from .._parallel import parallel_map
from . import (
    _CUBIC_A,
    _RING,
    _block_taps,
    _blocks,
    _check_inputs,
    _matmul,
    _padded_rows,
    _unnormalize,
    volumes,
)

__all__ = ["grid_sample_double_backward"]


def grid_sample_double_backward(ddU, ddgrid, dV, U, grid, mode="bilinear",
                                padding_mode="zeros", align_corners=False):
    """Gradients of ``<ddU, dU> + <ddgrid, dgrid>`` with respect to dV, U and grid, where
    ``(dU, dgrid) = grid_sample_backward(dV, U, grid, mode, padding_mode, align_corners)``.

    The backward is linear in dV, linear in U, and through its kernel weights piecewise
    smooth in the grid. Term by term (module docstring for the notation; sums over the
    taps ``t`` of point ``i``, channels ``c`` where written):

    **d(dU)/d(grid)**, through ``<ddU, dU> = <dV, S ddU>``: the first-order grid gradient
    with ``ddU`` in place of ``U``,
    ``d_grid_x[i] += g_x sum_c dV[c, i] sum_t W_t^x ddU[c, p(t)]`` (likewise y).
    The same term gives **d(dU)/d(dV)**: ``d_dV += S ddU``, the forward applied to ddU.
    dU does not depend on U.

    **d(dgrid)/d(dV)**: dgrid is linear in dV, so
    ``d_dV[c, i] += sum_t (a_x W_t^x + a_y W_t^y) U[c, p(t)]``.

    **d(dgrid)/d(U)**: dgrid is linear in U, a scatter like eq. (6) with the weights
    ``a_x W_t^x + a_y W_t^y`` in place of ``W_t``:
    ``d_U[c, p] = sum_i sum_{t: p(t) = p} (a_x W_t^x + a_y W_t^y) dV[c, i]``.

    **d(dgrid)/d(grid)**: ``g_x, g_y`` are piecewise constant, so only the weights
    move, and each ``d/dx_s`` brings one more factor ``g_x``:

        d_grid_x[i] += g_x sum_c dV[c, i] sum_t (a_x W_t^xx + a_y W_t^xy) U[c, p(t)]
        d_grid_y[i] += g_y sum_c dV[c, i] sum_t (a_x W_t^xy + a_y W_t^yy) U[c, p(t)]

    (the mixed term is symmetric, Schwarz).

    **Which terms vanish.**

    * bilinear: ``k`` is piecewise linear, so ``k'' = 0`` and ``W^xx = W^yy = 0``: the
      second derivative along one axis vanishes. ``W^xy = k_x' k_y' = +-1`` does not: a
      bilinear patch ``U00 + tx (U01 - U00) + ty (U10 - U00) + tx ty (U11 - U10 - U01 + U00)``
      is a saddle whose twist ``U11 - U10 - U01 + U00`` couples x and y.
    * nearest: ``k' = 0`` almost everywhere (the first-order convention), so every term
      with a derivative of ``k`` vanishes: ``d_U = 0``, ``d_grid = 0``, and only
      ``d_dV = S ddU`` remains (ddgrid reaches nothing).
    * bicubic: Keys' kernel has ``k'' != 0``; all terms are present. Its padding acts on
      the tap indices, which are piecewise constant in ``x``, so ``g_x`` is the scale and
      carries no sign.
    * border / reflection (bilinear, nearest): ``g_x`` is ``+-scale`` inside and 0 where
      the coordinate is clipped, so every term with a factor ``a_x`` or ``g_x`` vanishes
      there. The pure terms carry ``g_x^2``, so a reflection's sign cancels in
      ``W^xx``; the mixed term carries ``g_x g_y`` (and ``a_x g_y``), which flips with
      the reflection along either axis.

    **Volumes** (5-D U; ``mode="bilinear"`` is trilinear, bicubic is refused as in the
    forward). Every formula above holds with the sums over ``d, e`` in ``x, y, z``:
    ``a_z = ddz_s g_z``, ``d_dV`` and ``d_U`` take the weight ``sum_d a_d W_t^d`` and

        d_grid_d[i] += g_d sum_c dV[c, i] sum_t (W_t^d ddU[c, p(t)]
                                                 + sum_e a_e W_t^{de} U[c, p(t)]).

    Trilinear: the hats ``h_0(t) = 1 - t``, ``h_1(t) = t`` have ``h'' = 0``, so the three
    pure terms ``W^xx, W^yy, W^zz`` vanish; the three mixed ones do not, and each keeps the
    hat of the third axis, ``W^xy = h_i'(t_x) h_j'(t_y) h_k(t_z) = +-h_k(t_z)``. With the
    first order's ``G[k, j, i] = sum_c dV_c U_c[z0 + k, y0 + j, x0 + i]``
    (:mod:`~stn_numpy.sampling.volumes`) and the twist of a face,
    ``T_xy[k] = G[k, 1, 1] - G[k, 1, 0] - G[k, 0, 1] + G[k, 0, 0]`` (likewise ``T_xz[j]``
    over ``(k, i)``, ``T_yz[i]`` over ``(k, j)``), the grid-grid term is

        d_grid_x += g_x (a_y sum_k h_k(t_z) T_xy[k] + a_z sum_j h_j(t_y) T_xz[j])
        d_grid_y += g_y (a_x sum_k h_k(t_z) T_xy[k] + a_z sum_i h_i(t_x) T_yz[i])
        d_grid_z += g_z (a_x sum_j h_j(t_y) T_xz[j] + a_y sum_i h_i(t_x) T_yz[i])

    the twists of the cube's faces, interpolated along the axis normal to them. Nearest:
    as in 2-D, only ``d_dV = S ddU`` survives. The paddings act per axis exactly as in 2-D.

    **Kinks** follow the first order (and PyTorch): the taps come from ``floor(x)``, so
    at an integer ``x`` the right-hand derivatives are taken (bilinear's pixels ``x`` and
    ``x + 1``; bicubic's ``k''``, which jumps at integers, from the right); a coordinate
    exactly on a clip limit (``0`` or ``W - 1`` for border and reflection) has
    ``g_x = 0``. The derivative of ``g_x`` itself (a step at the limits, a Dirac
    impulse) is taken as zero, as it is almost everywhere. The same holds per axis for
    volumes.

    Parameters
    ----------
    ddU : ndarray, shape (N, C, H, W) or (N, C, D, H, W), or None
        Upstream gradient of the backward's dU; None means zero.
    ddgrid : ndarray, shape (N, H_o, W_o, 2) or (N, D_o, H_o, W_o, 3), or None
        Upstream gradient of the backward's dgrid; None means zero.
    dV, U, grid, mode, padding_mode, align_corners
        Exactly the arguments of :func:`~stn_numpy.grid_sample_backward`.

    Returns
    -------
    d_dV : ndarray, shape of ``dV``
    d_U : ndarray, shape of ``U``
        Zero for nearest, and without ddgrid.
    d_grid : ndarray, shape of ``grid``
        Zero for nearest.

    Raises
    ------
    TypeError
        Non-float arrays or dtypes other than U's.
    ValueError
        Wrong shapes, unknown modes (bicubic on a volume), a grid out of range (as
        :func:`~stn_numpy.grid_sample`).
    """
    _check_inputs(U, grid, mode, padding_mode, align_corners)
    N, C, *spatial = U.shape
    out = grid.shape[1:-1]
    D = len(spatial)
    dV = _check_like("dV", dV, (N, C, *out), U.dtype)
    if ddU is not None:
        ddU = _check_like("ddU", ddU, U.shape, U.dtype)
    if ddgrid is not None:
        ddgrid = _check_like("ddgrid", ddgrid, grid.shape, U.dtype)
    d_dV = np.zeros((N, *out, C), dtype=U.dtype)
    d_U = np.zeros((N, *spatial, C), dtype=U.dtype)
    d_grid = np.zeros((N, *out, D), dtype=U.dtype)
    ring = _RING[mode]
    # The zero-padded channels-last rows the taps read: of U where ddgrid reaches it
    # (nearest's grid terms vanish), of ddU where given.
    sources = [U if ddgrid is not None and mode != "nearest" else None, ddU]
    if D == 3:  # the volumes' padding runs on the worker threads: once, outside the blocks
        per_volume = int(np.prod([s + 2 * ring for s in spatial]))
        whole = [None if x is None else volumes._padded_rows(x, ring) for x in sources]

    def block(sl):
        if D == 2:
            rows = [None if x is None else _padded_rows(x[sl], ring) for x in sources]
        else:
            rows = [None if x is None else x[sl.start * per_volume:sl.stop * per_volume]
                    for x in whole]
        _double_backward_block(
            None if ddgrid is None else ddgrid[sl], dV[sl], U[sl], grid[sl], mode,
            padding_mode, align_corners, *rows, d_dV[sl], d_U[sl], d_grid[sl])

    parallel_map(block, _blocks(N, int(np.prod(out)), C))
    channels_first = (0, D + 1, *range(1, D + 1))
    return d_dV.transpose(channels_first), d_U.transpose(channels_first), d_grid


def _check_like(name, x, shape, dtype) -> np.ndarray:
    x = check_float_array(name, x, shape=shape)
    if x.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of U, {dtype}, got {x.dtype}")
    return x


# --------------------------------------------------------------------------------------
# Per axis: the kernel's second derivative; per tap: products of the axes' factors
# --------------------------------------------------------------------------------------


def _axis_second_derivative(coord, size, mode, align_corners):
    """``d^2 weight / dx^2`` of every tap along one axis, ``(k, M)``, or None where it is
    zero (bilinear: piecewise linear; nearest: flat). ``coord``: normalized, ``(M,)``.

    Bicubic's taps sit at distances ``1 + t, t, 1 - t, 2 - t`` from ``x``, with
    ``t = x - floor(x)`` exactly as :func:`stn_numpy.sampling._axis_taps` computes it
    (the padding moves the taps, not ``t``); the chain rule's sign squares away.
    """
    if mode != "bicubic":
        return None
    x, _ = _unnormalize(coord, size, align_corners)
    t = x - np.floor(x)
    a = _CUBIC_A

    def near(d):  # k''(d), |d| <= 1
        return 6 * (a + 2) * d - 2 * (a + 3)

    def far(d):  # k''(d), 1 < |d| < 2
        return 6 * a * d - 10 * a

    return np.stack([far(1 + t), near(t), near(1 - t), far(2 - t)])


def _tap_factor(axes, tap, orders):
    """The product over axes of each axis' kernel factor of derivative order
    ``orders[d]`` (0, 1 or 2) at the tap's index along that axis; None if any is zero.

    ``axes[d] = (weight, dweight, d2weight)`` as rows per tap index; ``tap[d]`` the index.
    Written for any number of axes: a volume adds a third.
    """
    out = None
    for factors, k, order in zip(axes, tap, orders, strict=True):
        f = factors[order]
        if f is None:
            return None
        out = f[k] if out is None else out * f[k]
    return out


def _orders(D, *axes_of_derivatives):
    """Derivative orders per axis for :func:`_tap_factor`: ``_orders(2, 0)`` is
    ``(1, 0)`` (``W^x``), ``_orders(2, 0, 1)`` is ``(1, 1)`` (``W^xy``), ``_orders(2, 1, 1)``
    is ``(0, 2)`` (``W^yy``)."""
    return tuple(axes_of_derivatives.count(d) for d in range(D))


def _double_backward_block(ddgrid, dV, U, grid, mode, padding_mode, align_corners, U_rows,
                           ddU_rows, d_dV, d_U, d_grid):
    """One block of whole images or volumes: writes ``d_dV (n, *out, C)``, ``d_U
    (n, *spatial, C)`` and ``d_grid (n, *out, D)`` (channels-last views of the caller's
    arrays). ``U_rows``, ``ddU_rows``: the block's U and ddU as zero-padded channels-last
    rows, as the forward reads them, or None where not needed (U) or not given (ddU)."""
    n, C, *spatial = U.shape
    out = grid.shape[1:-1]
    D = len(spatial)
    P = int(np.prod(out))  # explicit sizes, not -1: with C = 0, 0 elements fix no -1
    M = n * P
    ring = _RING[mode]
    padded = [s + 2 * ring for s in spatial]
    sizes = spatial[::-1]  # along x, y (, z): the grid's order
    if D == 2:
        taps2d, *kernels = _block_taps(grid, spatial, mode, padding_mode, align_corners)
        taps = [((i, j), rows_, offset) for j, i, rows_, offset in taps2d]
    else:
        coords = tuple(grid[..., d].reshape(n, P) for d in range(D))
        vt = volumes._chunk_taps(coords, 0, U.shape, mode, padding_mode, align_corners)
        taps = [((i, j, k), vt.rows, offset) for offset, (k, j, i) in vt.offsets]
        kernels = [vt.x, vt.y, vt.z]
    # Per axis (in the grid's order x, y, z): kernel factors and dx/dx_s.
    axes = [(w, dw, _axis_second_derivative(grid[..., d].reshape(M), sizes[d], mode,
                                            align_corners))
            for d, (w, dw, _) in enumerate(kernels)]
    g = [kernel[2] for kernel in kernels]
    dV_rows = np.ascontiguousarray(np.moveaxis(dV.reshape(n, C, P), 1, 2)).reshape(M, C)
    smooth = axes[0][1] is not None  # nearest: no derivative of the kernel anywhere
    # a_d = ddgrid_d g_d: the upstream grid gradient in pixel units.
    a = None if ddgrid is None or not smooth else [ddgrid[..., d].reshape(M) * g[d]
                                                   for d in range(D)]
    out_dV = np.zeros((M, C), dtype=U.dtype)
    acc = [np.zeros(M, dtype=U.dtype) for _ in range(D)] if smooth else None
    scatter = []  # per tap, the weight sum_d a_d W^d of d(dgrid)/dU
    for tap, tap_rows, offset in taps:
        ddU_t = U_t = None
        if ddU_rows is not None:
            ddU_t = np.take(ddU_rows[offset:], tap_rows, axis=0, mode="clip")
            out_dV += _per_row(_tap_factor(axes, tap, (0,) * D), M) * ddU_t
        if a is not None:
            U_t = np.take(U_rows[offset:], tap_rows, axis=0, mode="clip")
            coef = sum(a[d] * _tap_factor(axes, tap, _orders(D, d)) for d in range(D))
            out_dV += coef[:, None] * U_t
            scatter.append(coef)
        if not smooth:
            continue
        dVddU = None if ddU_t is None else np.einsum("mc,mc->m", dV_rows, ddU_t)
        dVU = None if U_t is None else np.einsum("mc,mc->m", dV_rows, U_t)
        for d in range(D):
            if dVddU is not None:
                acc[d] += _tap_factor(axes, tap, _orders(D, d)) * dVddU
            if dVU is not None:
                # sum_e a_e W^{de}, W^{de} the tap weight's second derivative along d and e.
                terms = [a[e] * w for e in range(D)
                         if (w := _tap_factor(axes, tap, _orders(D, d, e))) is not None]
                if terms:
                    acc[d] += sum(terms) * dVU
    d_dV[...] = out_dV.reshape(n, *out, C)
    if smooth:
        for d in range(D):
            d_grid[..., d] = (acc[d] * g[d]).reshape(n, *out)
    if scatter:
        S = _tap_matrix(taps, scatter, n * int(np.prod(padded)))
        inside = tuple(slice(ring, ring + s) for s in spatial)
        d_U[...] = _matmul(S.T, dV_rows).reshape(n, *padded, C)[(slice(None), *inside)]


def _per_row(w, M):
    """A tap weight (an ``(M,)`` array, or a constant that broadcasts) as an ``(M, 1)``
    column."""
    return np.broadcast_to(w, (M,))[:, None]


def _tap_matrix(taps, weights, n_rows: int) -> sp.csr_matrix:
    """The sparse ``(M, n_rows)`` matrix with ``weights[t]`` at tap ``t``'s pixel row,
    as :func:`stn_numpy.sampling._sampling_matrix` builds ``S`` from its own weights."""
    M, k = len(taps[0][1]), len(taps)
    dtype = np.result_type(*weights)
    weight = np.empty((M, k), dtype=dtype)
    cols = np.empty((M, k), dtype=taps[0][1].dtype)
    for t, ((_, rows, offset), w) in enumerate(zip(taps, weights, strict=True)):
        weight[:, t] = w
        np.add(rows, offset, out=cols[:, t])
    indptr = np.arange(0, M * k + 1, k, dtype=cols.dtype)
    return sp.csr_matrix((weight.reshape(-1), cols.reshape(-1), indptr), shape=(M, n_rows))
