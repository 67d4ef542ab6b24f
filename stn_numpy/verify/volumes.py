"""The parity matrix for volumes: 5-D ``grid_sample`` and 3-D ``affine_grid``.

The same comparison as :mod:`~stn_numpy.verify.parity` (forward V, both gradients, the
adjoint test, the determinism check, ``rel_error`` per array), on U of shape
``(N, C, D, H, W)`` and grids of shape ``(N, D_o, H_o, W_o, 3)`` holding ``(x, y, z)``:
x runs along W, y along H and z along D, the reverse of the tensor's axis order. Modes are
``bilinear`` (trilinear) and ``nearest``; PyTorch, like this package, refuses ``bicubic``
on volumes, so the matrix has 2 x 3 x 2 = 12 sampler rows and two affine rows
(``theta (N, 3, 4)``).

The inputs put points on the kinks of every axis (:func:`make_volume_grid`): each special
coordinate of :func:`~stn_numpy.verify.parity.special_coords` along one axis with random
coordinates inside along the other two, and every triple of boundary coordinates (the
volume's corners, inside and out). Tolerances are those of 2-D (1e-10 in float64, 1e-5 in
float32); measured against torch 2.13.0 on the CPU the worst float64 error is round-off.
"""

from __future__ import annotations

import itertools

import numpy as np

from ..sampling import PADDING_MODES
from .parity import (
    ParityResult,
    matrix_rows,
    special_coords,
)

__all__ = ["COMBOS_3D", "make_volume_grid", "parity_matrix_3d", "volume_key"]

MODES_3D = ("bilinear", "nearest")
COMBOS_3D = list(itertools.product(MODES_3D, PADDING_MODES, (True, False)))
# The inputs' streams are numbered after the 2-D cases' (18 samplers, 2 affine), so the two
# matrices never share one.
_FIRST_CASE = 100


def volume_key(mode, padding_mode, align_corners) -> str:
    """A 3-D case's key in tables and golden files, e.g. ``3d/bilinear/zeros/align_corners=True``
    (``3d/affine_grid/align_corners=True`` for ``mode="affine_grid"``)."""
    if mode == "affine_grid":
        return f"3d/affine_grid/align_corners={align_corners}"
    return f"3d/{mode}/{padding_mode}/align_corners={align_corners}"


def make_volume_grid(N: int, Do: int, Ho: int, Wo: int, D: int, H: int, W: int,
                     align_corners: bool = False, *, rng=None, dtype=np.float64) -> np.ndarray:
    """A volume sampling grid that hits the samplers' kinks along every axis.

    The special coordinates of each axis (integers, half-integers, the border, one voxel
    outside, the reflection lines and the second fold beyond them; chosen, as in 2-D, so
    that fused and separate roundings of the unnormalization land on the same side) each
    with random coordinates inside along the other two axes, and every triple of the
    boundary coordinates ``-1, 0, size - 1, size`` (the corners of the volume, inside and
    out). At most half of the points are special; the rest are uniform in
    ``[-1.6, 1.6]^3``.

    Parameters
    ----------
    N, Do, Ho, Wo : int
        Grid shape (batch, output depth, height and width).
    D, H, W : int
        Size of the volume the grid will sample.
    align_corners : bool
    rng : numpy.random.Generator or int seed, optional
    dtype : float32 or float64

    Returns
    -------
    grid : ndarray, shape (N, Do, Ho, Wo, 3), the last axis ``(x, y, z)``
    """
    rng = np.random.default_rng(rng)
    dtype = np.dtype(dtype)
    grid = rng.uniform(-1.6, 1.6, size=(N, Do, Ho, Wo, 3)).astype(dtype)
    axes = [special_coords(size, bool(align_corners), dtype) for size in (W, H, D)]
    special = []
    for a, coords in enumerate(axes):
        for value in coords.values():
            point = rng.uniform(-1, 1, size=3)
            point[a] = value
            special.append(point)
    boundary = [[c[-1.0], c[0.0], c[size - 1.0], c[float(size)]]
                for c, size in zip(axes, (W, H, D), strict=True)]
    special += [list(p) for p in itertools.product(*boundary)]
    special = np.array(special, dtype=dtype)
    flat = grid.reshape(-1, 3)
    k = min(len(special), len(flat) // 2)
    flat[rng.permutation(len(flat))[:k]] = special[rng.permutation(len(special))[:k]]
    return grid


def volume_sampler_inputs(seed, case, shape, out_dhw, align_corners, dtype):
    """``(U, grid, dV)`` of one 3-D case, a deterministic function of ``seed`` and ``case``."""
    rng = np.random.default_rng([seed, _FIRST_CASE + case])
    N, C, D, H, W = shape
    U = rng.standard_normal((N, C, D, H, W)).astype(dtype)
    grid = make_volume_grid(N, *out_dhw, D, H, W, align_corners, rng=rng, dtype=dtype)
    dV = rng.standard_normal((N, C, *out_dhw)).astype(dtype)
    return U, grid, dV


def volume_affine_inputs(seed, case, shape, out_dhw, dtype):
    """``(theta (N, 3, 4), size (N, C, D, H, W), dgrid)`` of one 3-D affine case."""
    rng = np.random.default_rng([seed, _FIRST_CASE + case])
    N, C = shape[:2]
    theta = np.eye(3, 4) + 0.5 * rng.standard_normal((N, 3, 4))
    size = np.array([N, C, *out_dhw], dtype=np.int64)
    dgrid = rng.standard_normal((N, *out_dhw, 3))
    return theta.astype(dtype), size, dgrid.astype(dtype)


def parity_matrix_3d(other=None, *, dtype=np.float64, seed: int = 0, shape=(2, 2, 4, 5, 6),
                     out_dhw=(5, 6, 7), tol: float | None = None,
                     repeat: bool = True) -> list[ParityResult]:
    """Compare this package with ``other`` on all 12 volume combinations (+ affine_grid).

    Parameters
    ----------
    other : None, str or callable
        As for :func:`~stn_numpy.verify.parity_matrix`: None or ``"torch"`` (5-D
        ``F.grid_sample`` and ``F.affine_grid``), an adapter's name, or a callable
        ``other(U, grid, dV, mode, padding_mode, align_corners) -> (V, dU, dgrid)`` that
        takes U ``(N, C, D, H, W)`` and grid ``(N, D_o, H_o, W_o, 3)``.
    dtype, seed, tol, repeat
        As for :func:`~stn_numpy.verify.parity_matrix`.
    shape : (N, C, D, H, W)
        Shape of U.
    out_dhw : (D_o, H_o, W_o)
        Output size; ``N D_o H_o W_o`` of at least about 200 uses every special point.

    Returns
    -------
    list of ParityResult
        12 sampler rows in the order ``("bilinear", "nearest")`` x ``PADDING_MODES`` x
        (True, False), then, for torch, one affine_grid row per align_corners; each
        row's ``case`` is its :func:`volume_key`.
    """
    return matrix_rows(
        other, dtype, tol, repeat, COMBOS_3D,
        lambda case, align_corners, dtype: volume_sampler_inputs(seed, case, shape, out_dhw,
                                                                 align_corners, dtype),
        lambda case, dtype: volume_affine_inputs(seed, case, shape, out_dhw, dtype),
        key=volume_key)


