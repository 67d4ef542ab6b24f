"""Volumes: the 3-D work of :func:`~stn_numpy.sampling.grid_sample` and its backward.

The input U has shape ``(N, C, D, H, W)`` and the grid ``(N, D_o, H_o, W_o, 3)``. The
grid's last axis holds ``(x_s, y_s, z_s)``: x runs along W, y along H and z along D, the
*reverse* of the tensor's axis order ``(D, H, W)``, as in PyTorch. Each axis is
unnormalized and padded exactly as in 2-D (:func:`~stn_numpy.sampling._axis_taps`, the same
code), so every convention of the package docstring holds per axis.

Trilinear sampling (PyTorch's ``mode="bilinear"`` on 5-D input) reads the eight corners of
the voxel cube that holds the point ``(x, y, z)`` (pixel units) and weighs each with a
product of three hat functions, ``h_0(t) = 1 - t`` and ``h_1(t) = t`` of the fractional
parts ``t_x = x - floor(x)`` (likewise ``t_y``, ``t_z``)::

    V = sum_{k, j, i in {0, 1}} h_k(t_z) h_j(t_y) h_i(t_x) U[z0 + k, y0 + j, x0 + i]

Its gradients: ``dU = S^T dV`` (the same weights, scattered), and, with
``G[k, j, i] = sum_c dV_c U_c[z0 + k, y0 + j, x0 + i]`` (upstream gradient times the tap,
summed over channels)::

    dL/dx = sum_{k, j} h_k(t_z) h_j(t_y) (G[k, j, 1] - G[k, j, 0])
    dL/dy = sum_{k, i} h_k(t_z) h_i(t_x) (G[k, 1, i] - G[k, 0, i])
    dL/dz = sum_{j, i} h_j(t_y) h_i(t_x) (G[1, j, i] - G[0, j, i])

each times ``dx/dx_s`` and the padding map's derivative (the chain rule, as in 2-D). The
hat functions' derivatives ``h_0' = -1``, ``h_1' = +1`` are what the differences are; a
second derivative of the sampler would take a second difference along another axis (the
one along the same axis is zero between kinks). ``mode="nearest"`` reads the single voxel
``(rint(z), rint(y), rint(x))`` and has zero grid gradient. Bicubic is refused for
volumes, as PyTorch refuses it.

The work is split into chunks of output points, whole volumes when they are small and
consecutive runs of one volume's points when it is large, so that a chunk's temporaries stay
in cache and a 128^3 volume never needs them all at once. V and dgrid are computed per point,
so the split changes none of their bits. dU sums every point's taps into the voxels they read:
the chunks add theirs into one zero-padded, channels-last dU in chunk order (each waits for
its predecessor's turn, while their taps and dgrid are computed in parallel), point by
point and tap by tap within a chunk, which is the order of one sparse product over all
points. So every result is bit-identical for any split into chunks and any number of
threads.
"""

from __future__ import annotations

import functools
import itertools
import threading
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

import stn_numpy.sampling as planar

from .._parallel import even_split, get_num_threads, parallel_map

try:  # Y += A X for a CSC matrix A, in place: scipy's own kernel behind ``A @ X``.
    from scipy.sparse._sparsetools import csc_matvec, csc_matvecs
except ImportError:  # pragma: no cover - private; np.add.at below sums in the same order
    csc_matvec = csc_matvecs = None

__all__ = ["forward", "backward"]

# Values (output points x (channels + 8)) per chunk: half the 2-D sampler's block, since a
# volume's point carries twice the temporaries (8 taps' rows and weights, 3 axes). Measured
# at N=1 C=1 128^3 float32 on 2 threads: the forward + backward's peak is 55 MB against 60
# MB with 2^19, at the same speed within the noise of a shared host.
_CHUNK = 2**18


def forward(U, grid, mode, padding_mode, align_corners, keep_rows=None) -> np.ndarray:
    """V of every chunk, on the worker threads: a ``(N, C, D_o, H_o, W_o)`` view of
    channels-last memory, as in 2-D. ``keep_rows``, a dict, receives the zero-padded
    channels-last rows of U (:func:`_padded_rows`) under the key ``(0, N)``."""
    N, C, D, H, W = U.shape
    spatial_o = grid.shape[1:4]
    P = int(np.prod(spatial_o))
    grid = _point_major(grid)
    V = np.empty((N, P, C), dtype=U.dtype)
    U_rows = _padded_rows(U, planar._RING[mode])
    if keep_rows is not None and mode != "nearest":  # nearest's backward reads no U
        keep_rows[0, N] = U_rows
    size = max(D, H, W)

    def chunk(part):
        n0, n1, p0, p1 = part
        coords = _coordinates(grid, part)
        # The grid's range is checked here, on the worker threads and on values the chunk
        # reads next anyway, rather than in one serial pass over the whole grid first.
        if not all(planar._within_range(c, size) for c in coords):
            raise planar._OutOfRange
        taps = _chunk_taps(coords, n0, U.shape, mode, padding_mode, align_corners)
        V[n0:n1, p0:p1] = _sample_chunk(U_rows, taps).reshape(n1 - n0, p1 - p0, C)

    if not C:  # no chunks to check it
        planar._check_grid_range(grid, size)
    try:
        parallel_map(chunk, _chunks(N, P, C) if C else [])
    except planar._OutOfRange:
        pass  # raised below, outside the handler: the internal signal is not chained
    else:
        return V.reshape(N, *spatial_o, C).transpose(0, 4, 1, 2, 3)
    planar._check_grid_range(grid, size)  # raises, counting the bad values of the whole grid
    raise AssertionError("a chunk found the grid out of range but the whole grid passed")


def backward(dV, U, grid, mode, padding_mode, align_corners, input_grad=True, kept_rows=None):
    """dU (``S^T dV``; None without ``input_grad``) and dgrid (the module docstring's
    formulas), chunk by chunk on the worker threads. ``kept_rows``: the forward's
    ``keep_rows``, used when at hand. dU is a view of channels-last memory and dgrid one
    of ``(N, 3, D_o, H_o, W_o)`` planes, the layouts of the 2-D backward."""
    N, C, D, H, W = U.shape
    spatial_o = grid.shape[1:4]
    P = int(np.prod(spatial_o))
    grid = _point_major(grid)
    ring = planar._RING[mode]
    padded = (D + 2 * ring, H + 2 * ring, W + 2 * ring)
    dU_rows = np.zeros((N * int(np.prod(padded)), C), dtype=U.dtype) if input_grad else None
    planes = np.zeros((N, 3, P), dtype=U.dtype)
    dV_rows = dV.reshape(N, C, P)
    U_rows = None
    if mode == "bilinear" and C and P:
        U_rows = (kept_rows or {}).get((0, N))
        if U_rows is None:
            U_rows = _padded_rows(U, ring)
    parts = _chunks(N, P, C) if C else []
    turns = [threading.Event() for _ in range(len(parts) + 1)]
    turns[0].set()

    def chunk(index):
        n0, n1, p0, p1 = part = parts[index]
        try:
            coords = _coordinates(grid, part)
            taps = _chunk_taps(coords, n0, U.shape, mode, padding_mode, align_corners)
            dV_part = np.ascontiguousarray(
                dV_rows[n0:n1, :, p0:p1].transpose(0, 2, 1)).reshape(-1, C)
            if U_rows is not None:
                _grid_gradient(U_rows, taps, dV_part, planes, part)
            if input_grad:
                cols, weight = _scatter_operands(taps, U.dtype)
                turns[index].wait()  # the chunks before this one have added theirs
                _scatter_add(dU_rows, cols, weight, dV_part)
        finally:
            turns[index + 1].set()  # also on an error: no later chunk waits forever

    parallel_map(chunk, range(len(parts)))
    dU = None
    if input_grad:
        r = ring
        dU = dU_rows.reshape(N, *padded, C)[:, r:r + D, r:r + H, r:r + W, :]
        dU = dU.transpose(0, 4, 1, 2, 3)
    return dU, np.moveaxis(planes.reshape(N, 3, *spatial_o), 1, -1)


# --------------------------------------------------------------------------------------
# Chunks, rows and taps
# --------------------------------------------------------------------------------------


def _chunks(N: int, P: int, C: int) -> list[tuple[int, int, int, int]]:
    """``(n0, n1, p0, p1)``: output points ``p0:p1`` of volumes ``n0:n1``, each chunk about
    ``_CHUNK`` values (points x (channels + 8)) at most; whole volumes when one is smaller
    than that, else parts of a single volume (``n1 = n0 + 1``). When there are several, as
    many as a multiple of the worker threads where the sizes allow, so that none waits for
    another's last chunk."""
    if N == 0 or P == 0:
        return []
    per_chunk = max(1, _CHUNK // (C + 8))  # output points
    workers = get_num_threads()
    if P <= per_chunk:
        count = -(-N * P // per_chunk)
        if count > 1:  # a single chunk runs inline: below _CHUNK a thread saves nothing
            count = min(N, -(-count // workers) * workers)
        return [(a, b, 0, P) for a, b in even_split(N, count)]
    parts = -(-P // per_chunk)
    if N < workers:
        parts = min(P, -(-parts * N // workers) * workers // N)
    return [(n, n + 1, a, b) for n in range(N) for a, b in even_split(P, parts)]


def _point_major(grid):
    """``grid``, or a contiguous copy of it where a coordinate of its volumes cannot be
    viewed as ``(N, P)`` rows: :func:`_coordinates` then slices every chunk out of a view,
    instead of copying a whole volume's coordinates for each of its chunks. affine_grid's
    planes and interleaved ``(x, y, z)`` grids are viewed as they are."""
    if grid.size == 0:
        return grid
    x_s = grid[..., 0].reshape(len(grid), -1)
    return grid if np.shares_memory(x_s, grid) else np.ascontiguousarray(grid)


def _coordinates(grid, part):
    """``(x_s, y_s, z_s)`` of the chunk's points, each an ``(n, p)`` view where the grid's
    layout allows (a copy of some layouts)."""
    n0, n1, p0, p1 = part
    g = grid[n0:n1]
    return tuple(g[..., a].reshape(n1 - n0, -1)[:, p0:p1] for a in range(3))


def _padded_rows(U: np.ndarray, ring: int) -> np.ndarray:
    """U as ``(N Dp Hp Wp, C)`` rows, one per voxel of the volume padded with ``ring``
    zeros on every side (``Dp = D + 2 ring``), filled volume by volume on the threads."""
    N, C, D, H, W = U.shape
    r = ring
    U_pad = np.zeros((N, D + 2 * r, H + 2 * r, W + 2 * r, C), dtype=U.dtype)

    def fill(band):
        a, b = band
        U_pad[a:b, r:r + D, r:r + H, r:r + W, :] = U[a:b].transpose(0, 2, 3, 4, 1)

    parallel_map(fill, even_split(N, min(N, get_num_threads())) if N else [])
    # Explicit sizes, not -1: with C = 0, 0 elements fix no -1.
    return U_pad.reshape(U_pad.size // C if C else len(U_pad) * (D + 2 * r) * (H + 2 * r)
                         * (W + 2 * r), C)


@dataclass
class _Taps:
    """The taps of a chunk's points (:func:`_chunk_taps`).

    ``rows``: ``(M,)`` ints, the row of :func:`_padded_rows` of each point's first corner
    ``(z0, y0, x0)``. ``offsets``: ``(offset, (k, j, i))`` per tap, in a fixed order: the
    corner ``(z0 + k, y0 + j, x0 + i)`` is row ``rows + offset``. ``x``, ``y``, ``z``: the
    axis's ``(weight, dweight, coord_grad)`` of :func:`~stn_numpy.sampling._axis_taps`,
    weights ``h_0, h_1`` (bilinear) or a single 1 (nearest).
    """

    rows: np.ndarray
    offsets: list
    x: tuple
    y: tuple
    z: tuple

    def weight(self, kji, *, out):
        """The tap's weight ``h_k(t_z) h_j(t_y) h_i(t_x)``, into ``out``."""
        k, j, i = kji
        np.multiply(self.z[0][k], self.y[0][j], out=out)
        out *= self.x[0][i]
        return out


def _chunk_taps(coords, n0, U_shape, mode, padding_mode, align_corners) -> _Taps:
    """The rows of :func:`_padded_rows` that the chunk's points read, and their kernels.
    ``coords``: the chunk's ``(x_s, y_s, z_s)``, each ``(n, p)``, of volumes from ``n0``."""
    N, _, D, H, W = U_shape
    ring = planar._RING[mode]
    Dp, Hp, Wp = D + 2 * ring, H + 2 * ring, W + 2 * ring
    n, p = coords[0].shape
    axes = []
    for coord, size in zip(coords, (W, H, D), strict=True):
        index, *kernel = planar._axis_taps(coord, size, mode, padding_mode, align_corners)
        axes.append((index[0], *kernel))
    (ix, *x), (iy, *y), (iz, *z) = axes
    # One index type for every chunk: the scatter's kernel takes the rows' count in it.
    index_dtype = np.int32 if N * Dp * Hp * Wp < 2**31 - 1 else np.int64
    # Row of voxel (0, 0, 0) of each volume in the padded rows, then of each point's corner.
    start = ((n0 + np.arange(n, dtype=index_dtype)) * (Dp * Hp * Wp)
             + ring * (Hp * Wp + Wp + 1))
    rows = np.multiply(iz, Hp * Wp, dtype=index_dtype)
    rows += np.multiply(iy, Wp, dtype=index_dtype)
    rows += ix
    rows.reshape(n, p)[...] += start[:, None]
    k = 2 if mode == "bilinear" else 1
    offsets = [(c * Hp * Wp + b * Wp + a, (c, b, a))
               for c, b, a in itertools.product(range(k), repeat=3)]
    return _Taps(rows, offsets, tuple(x), tuple(y), tuple(z))


# --------------------------------------------------------------------------------------
# Forward, grid gradient, scatter
# --------------------------------------------------------------------------------------


def _sample_chunk(U_rows, taps: _Taps) -> np.ndarray:
    """``V = sum_taps h_k(t_z) h_j(t_y) h_i(t_x) U[tap]`` for the chunk, ``(M, C)`` rows,
    the taps summed in a fixed order; nearest reads its one voxel."""
    rows = taps.rows
    M, C = len(rows), U_rows.shape[1]
    if len(taps.offsets) == 1:
        return np.take(U_rows, rows, axis=0, mode="clip")
    if C > planar._GATHER_MAX_CHANNELS:
        # One product with S over all channels: its rows sum the taps in the same order.
        cols, weight = _scatter_operands(taps, U_rows.dtype)
        S = sp.csr_matrix((weight.reshape(-1), cols.reshape(-1),
                           np.arange(0, cols.size + 1, cols.shape[1], dtype=cols.dtype)),
                          shape=(M, len(U_rows)))
        return planar._matmul(S, U_rows)
    return planar._weighted_gathers(U_rows, M, ((rows, offset, functools.partial(
        taps.weight, kji)) for offset, kji in taps.offsets))


def _grid_gradient(U_rows, taps: _Taps, dV_rows, planes, part) -> None:
    """dgrid of the chunk ``part`` (trilinear), into ``planes[n0:n1, :, p0:p1]``.

    ``G[k, j, i] = sum_c dV_c U_c[tap]``, then the module docstring's three sums of
    differences, each times the axis's ``coord_grad``.
    """
    n0, n1, p0, p1 = part
    M, C = dV_rows.shape
    G = np.empty((2, 2, 2, M), dtype=dV_rows.dtype)
    gathered = np.empty((M, C), dtype=dV_rows.dtype)
    for offset, (k, j, i) in taps.offsets:
        np.take(U_rows[offset:], taps.rows, axis=0, out=gathered, mode="clip")
        if C == 1:
            np.multiply(dV_rows[:, 0], gathered[:, 0], out=G[k, j, i])
        else:
            np.einsum("mc,mc->m", dV_rows, gathered, out=G[k, j, i])
    hx, hy, hz = taps.x[0], taps.y[0], taps.z[0]
    # Differences along each axis: dG_x[k, j] = G[k, j, 1] - G[k, j, 0], and so on.
    slopes = (
        _weighted_pairs(G[:, :, 1] - G[:, :, 0], hz, hy),  # d/dx: sum_kj h_k h_j dG_x[k, j]
        _weighted_pairs(G[:, 1, :] - G[:, 0, :], hz, hx),  # d/dy: sum_ki h_k h_i dG_y[k, i]
        _weighted_pairs(G[1] - G[0], hy, hx),  # d/dz: sum_ji h_j h_i dG_z[j, i]
    )
    for a, (slope, (_, _, coord_grad)) in enumerate(zip(slopes, (taps.x, taps.y, taps.z),
                                                        strict=True)):
        slope *= coord_grad
        planes[n0:n1, a, p0:p1] = slope.reshape(n1 - n0, p1 - p0)


def _weighted_pairs(diff, h_outer, h_inner):
    """``sum_{a, b} h_outer[a] h_inner[b] diff[a, b]`` over the 2 x 2 pairs, ``(M,)``: the
    inner axis first (``diff[a, 0] h_inner[0] + diff[a, 1] h_inner[1]``), then the outer."""
    inner = diff[:, 0] * h_inner[0]
    inner += diff[:, 1] * h_inner[1]
    out = inner[0] * h_outer[0]
    out += inner[1] * h_outer[1]
    return out


def _scatter_operands(taps: _Taps, dtype):
    """``(cols, weight)``, each ``(M, taps)``: the padded row and weight of every tap of
    every point, point-major (S of eq. 3 in CSR order); nearest's one weight is 1."""
    M, k = len(taps.rows), len(taps.offsets)
    cols = np.empty((M, k), dtype=taps.rows.dtype)
    weight = np.ones((M, k), dtype=dtype)
    column = np.empty(M, dtype=dtype)
    for t, (offset, kji) in enumerate(taps.offsets):
        np.add(taps.rows, offset, out=cols[:, t])
        if k > 1:
            weight[:, t] = taps.weight(kji, out=column)
    return cols, weight


def _scatter_add(dU_rows, cols, weight, dV_rows) -> None:
    """``dU_rows += S^T dV_rows`` in place, summing point by point and tap by tap (the
    order of one CSC product over every point, so chunks added in order give its bits)."""
    M, k = cols.shape
    C = dV_rows.shape[1]
    if csc_matvec is None:  # pragma: no cover
        np.add.at(dU_rows, cols.reshape(-1),
                  (weight[:, :, None] * dV_rows[:, None, :]).reshape(-1, C))
        return
    indptr = np.arange(0, M * k + 1, k, dtype=cols.dtype)
    args = (len(dU_rows), M, indptr, cols.reshape(-1), weight.reshape(-1))
    if C == 1:
        csc_matvec(*args, dV_rows.reshape(-1), dU_rows.reshape(-1))
    else:
        csc_matvecs(args[0], M, C, *args[2:], dV_rows.reshape(-1), dU_rows.reshape(-1))
