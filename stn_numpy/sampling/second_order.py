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

The per-tap sums are written for any number of axes (:func:`_tap_factor`,
:func:`_double_backward_block`): a volume (5-D U, grid ``(..., 3)``) needs only its taps
(one index per axis, a padded row and offset each) and, per axis, the weights, their first
and second derivatives and ``g``; its terms are the same with ``d, e`` over ``x, y, z``
(trilinear: the three pure terms vanish, the three mixed ones do not).
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

    **Kinks** follow the first order (and PyTorch): the taps come from ``floor(x)``, so
    at an integer ``x`` the right-hand derivatives are taken (bilinear's pixels ``x`` and
    ``x + 1``; bicubic's ``k''``, which jumps at integers, from the right); a coordinate
    exactly on a clip limit (``0`` or ``W - 1`` for border and reflection) has
    ``g_x = 0``. The derivative of ``g_x`` itself (a step at the limits, a Dirac
    impulse) is taken as zero, as it is almost everywhere.

    Parameters
    ----------
    ddU : ndarray, shape (N, C, H, W), or None
        Upstream gradient of the backward's dU; None means zero.
    ddgrid : ndarray, shape (N, H_o, W_o, 2), or None
        Upstream gradient of the backward's dgrid; None means zero.
    dV, U, grid, mode, padding_mode, align_corners
        Exactly the arguments of :func:`~stn_numpy.grid_sample_backward`.

    Returns
    -------
    d_dV : ndarray, shape (N, C, H_o, W_o)
    d_U : ndarray, shape (N, C, H, W)
        Zero for nearest, and without ddgrid.
    d_grid : ndarray, shape (N, H_o, W_o, 2)
        Zero for nearest.

    Raises
    ------
    TypeError
        Non-float arrays or dtypes other than U's.
    ValueError
        Wrong shapes, unknown modes, a grid out of range (as :func:`~stn_numpy.grid_sample`);
        a volume (5-D U), whose double backward is not written yet.
    """
    _check_inputs(U, grid, mode, padding_mode, align_corners)
    if U.ndim != 4:
        raise ValueError(f"grid_sample_double_backward takes images, U of shape (N, C, H, W) "
                         f"with grid (N, H_o, W_o, 2); volumes are not supported yet, got U "
                         f"of shape {U.shape}")
    N, C, H, W = U.shape
    Ho, Wo = grid.shape[1:3]
    dV = _check_like("dV", dV, (N, C, Ho, Wo), U.dtype)
    if ddU is not None:
        ddU = _check_like("ddU", ddU, U.shape, U.dtype)
    if ddgrid is not None:
        ddgrid = _check_like("ddgrid", ddgrid, grid.shape, U.dtype)
    d_dV = np.zeros((N, Ho, Wo, C), dtype=U.dtype)
    d_U = np.zeros((N, H, W, C), dtype=U.dtype)
    d_grid = np.zeros((N, Ho, Wo, 2), dtype=U.dtype)

    def block(sl):
        _double_backward_block(
            None if ddU is None else ddU[sl], None if ddgrid is None else ddgrid[sl],
            dV[sl], U[sl], grid[sl], mode, padding_mode, align_corners,
            d_dV[sl], d_U[sl], d_grid[sl])

    parallel_map(block, _blocks(N, Ho * Wo, C))
    return d_dV.transpose(0, 3, 1, 2), d_U.transpose(0, 3, 1, 2), d_grid


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


def _double_backward_block(ddU, ddgrid, dV, U, grid, mode, padding_mode, align_corners,
                           d_dV, d_U, d_grid):
    """One block of images: writes ``d_dV (n, Ho, Wo, C)``, ``d_U (n, H, W, C)`` and
    ``d_grid (n, Ho, Wo, 2)`` (channels-last views of the caller's arrays)."""
    n, C, H, W = U.shape
    _, Ho, Wo, D = grid.shape
    M = n * Ho * Wo
    ring = _RING[mode]
    Hp, Wp = H + 2 * ring, W + 2 * ring
    taps2d, (wx, dwx, gx), (wy, dwy, gy) = _block_taps(grid, (H, W), mode, padding_mode,
                                                       align_corners)
    coords = [grid[..., 0].reshape(M), grid[..., 1].reshape(M)]
    # Per axis (in the grid's order x, y): kernel factors and dx/dx_s.
    axes = [(wx, dwx, _axis_second_derivative(coords[0], W, mode, align_corners)),
            (wy, dwy, _axis_second_derivative(coords[1], H, mode, align_corners))]
    g = [gx, gy]
    taps = [((i, j), rows, offset) for j, i, rows, offset in taps2d]
    dV_rows = np.ascontiguousarray(dV.reshape(n, C, Ho * Wo).transpose(0, 2, 1)).reshape(M, C)
    smooth = dwx is not None  # nearest: no derivative of the kernel anywhere
    # a_d = ddgrid_d g_d: the upstream grid gradient in pixel units.
    a = None if ddgrid is None or not smooth else [ddgrid[..., d].reshape(M) * g[d]
                                                   for d in range(D)]
    U_rows = _padded_rows(U, ring) if a is not None else None
    ddU_rows = _padded_rows(ddU, ring) if ddU is not None else None
    out_dV = np.zeros((M, C), dtype=U.dtype)
    acc = [np.zeros(M, dtype=U.dtype) for _ in range(D)] if smooth else None
    scatter = []  # per tap, the weight a_x W^x + a_y W^y of d(dgrid)/dU
    for tap, rows, offset in taps:
        ddU_t = U_t = None
        if ddU_rows is not None:
            ddU_t = np.take(ddU_rows[offset:], rows, axis=0, mode="clip")
            out_dV += _per_row(_tap_factor(axes, tap, (0,) * D), M) * ddU_t
        if a is not None:
            U_t = np.take(U_rows[offset:], rows, axis=0, mode="clip")
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
    d_dV[...] = out_dV.reshape(n, Ho, Wo, C)
    if smooth:
        for d in range(D):
            d_grid[..., d] = (acc[d] * g[d]).reshape(n, Ho, Wo)
    if scatter:
        S = _tap_matrix(taps, scatter, n * Hp * Wp)
        d_U[...] = _matmul(S.T, dV_rows).reshape(n, Hp, Wp, C)[:, ring:ring + H,
                                                                ring:ring + W, :]


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
