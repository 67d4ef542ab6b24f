"""Samplers with bugs re-created from real reports, to test the checks that should catch them.

Each is a few lines on top of this package's sampler, behind the ``other`` interface
``(U, grid, dV, mode, padding_mode, align_corners) -> (V, dU, dgrid)``, and reproduces
one class of bug that shipped in a real implementation:

* :func:`tf_stn_pixel_range` -- a popular TensorFlow STN mapped ``[-1, 1]`` onto
  ``(W - 2)`` pixel spans (``0.5 * (x + 1) * (W - 1 - 1)``) and computed the bilinear
  weights from the corners *after* clipping them to the image, so the identity
  transform does not return its input and points near the border get wrong weights
  (kevinzakka/spatial-transformer-network issue #13, 2018).
* :func:`clip_gradient_at_last_pixel` -- PyTorch's ``grid_sample`` let the grid gradient
  of border and reflection padding pass through the clip exactly at the last pixel
  ``W - 1``, as if the upper tap were still inside (pytorch/pytorch issue #23925, 2019;
  fixed by pull request #32829, 2020).
* :func:`ceil_upper_tap` -- taking the upper tap as ``ceil(x)`` instead of
  ``floor(x) + 1``, as dm-pix's linear interpolation does (google-deepmind/dm_pix pull
  request #126 replaces it with ``floor(x) + 1``; JAX's ``map_coordinates`` already uses
  ``floor(x)`` and ``floor(x) + 1``): the forward is right, but at integer coordinates
  both taps are the same pixel and the coordinate gradient is zero.
* :func:`non_adjoint_image_gradient` -- an image gradient computed by warping dV back with
  the inverse transform (TensorFlow's ``ImageProjectiveTransform`` gradient, added in
  tensorflow/tensorflow pull request #9533, 2017) rather than by the transpose of the
  sampling matrix: it averages where the adjoint sums.
* :func:`nearest_ties_away_from_zero` -- nearest rounding half away from zero (C's
  ``round``, JAX's ``lax.round``) instead of half to even.
* :func:`atomic_accumulation` -- a port that accumulates dU with unordered atomic adds:
  right to round-off, but not bit-identical from one call to the next.

:func:`~stn_numpy.verify.parity_matrix` flags every one of them, naming the failing rows
and where (``tests/test_verify_mutants.py``); most of them pass a random
finite-difference test, which almost never samples a point exactly on a pixel, a tie or
the last pixel, and compares a function with its own gradient, not with a reference.
"""

from __future__ import annotations

import numpy as np

from ..sampling import grid_sample, grid_sample_backward
from .parity import normalize, numpy_impl, pixel_coordinates

__all__ = ["MUTANTS", "atomic_accumulation", "ceil_upper_tap", "clip_gradient_at_last_pixel",
           "nearest_ties_away_from_zero", "non_adjoint_image_gradient", "tf_stn_pixel_range"]


def _pixels(grid, U, align_corners):
    H, W = U.shape[2:]
    return (pixel_coordinates(grid[..., 0], W, align_corners)[0],
            pixel_coordinates(grid[..., 1], H, align_corners)[0])


def tf_stn_pixel_range(U, grid, dV, mode, padding_mode, align_corners):
    """Bilinear with ``x = (x_s + 1) (W - 2) / 2`` and weights from the clipped corners."""
    if mode != "bilinear":  # that implementation has no other kernel
        return numpy_impl(U, grid, dV, mode, padding_mode, align_corners)
    N, C, H, W = U.shape
    x = 0.5 * (grid[..., 0] + 1) * (W - 2)
    y = 0.5 * (grid[..., 1] + 1) * (H - 2)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x0, x1 = np.clip(x0, 0, W - 1), np.clip(x0 + 1, 0, W - 1)
    y0, y1 = np.clip(y0, 0, H - 1), np.clip(y0 + 1, 0, H - 1)
    n = np.arange(N)[:, None, None]
    corners = [(y0, x0, (x1 - x) * (y1 - y)), (y1, x0, (x1 - x) * (y - y0)),
               (y0, x1, (x - x0) * (y1 - y)), (y1, x1, (x - x0) * (y - y0))]
    V = sum(w[:, None] * U[n, :, yi, xi].transpose(0, 3, 1, 2) for yi, xi, w in corners)
    dU = np.zeros_like(U)
    for yi, xi, w in corners:
        np.add.at(dU.transpose(0, 2, 3, 1), (n, yi, xi), (w[:, None] * dV).transpose(0, 2, 3, 1))
    Ia, Ib, Ic, Id = (U[n, :, yi, xi].transpose(0, 3, 1, 2) for yi, xi, _ in corners)
    g = dV * ((Ic - Ia) * (y1 - y)[:, None] + (Id - Ib) * (y - y0)[:, None])
    h = dV * ((Ib - Ia) * (x1 - x)[:, None] + (Id - Ic) * (x - x0)[:, None])
    dgrid = np.stack([g.sum(1) * (W - 2) / 2, h.sum(1) * (H - 2) / 2], axis=-1)
    return V.astype(U.dtype), dU, dgrid.astype(U.dtype)


def clip_gradient_at_last_pixel(U, grid, dV, mode, padding_mode, align_corners):
    """Border/reflection: at x == W - 1 the grid gradient of zeros padding leaks through."""
    V, dU, dgrid = numpy_impl(U, grid, dV, mode, padding_mode, align_corners)
    if padding_mode == "zeros":
        return V, dU, dgrid
    _, leaked = grid_sample_backward(dV, U, grid, mode, "zeros", align_corners)
    x, y = _pixels(grid, U, align_corners)
    last = np.stack([x == U.shape[3] - 1, y == U.shape[2] - 1], axis=-1)
    return V, dU, np.where(last, leaked, dgrid)


def ceil_upper_tap(U, grid, dV, mode, padding_mode, align_corners):
    """Bilinear taps ``floor(x)`` and ``ceil(x)``: zero coordinate gradient at integers."""
    V, dU, dgrid = numpy_impl(U, grid, dV, mode, padding_mode, align_corners)
    if mode != "bilinear":
        return V, dU, dgrid
    x, y = _pixels(grid, U, align_corners)
    on_integer = np.stack([x == np.floor(x), y == np.floor(y)], axis=-1)
    return V, dU, np.where(on_integer, 0, dgrid)


def non_adjoint_image_gradient(U, grid, dV, mode, padding_mode, align_corners):
    """dU as dV warped back: ``S^T dV`` divided by how much weight lands on each pixel."""
    V, dU, dgrid = numpy_impl(U, grid, dV, mode, padding_mode, align_corners)
    weight, _ = grid_sample_backward(np.ones_like(dV), U, grid, mode, padding_mode,
                                     align_corners)
    return V, dU / np.where(np.abs(weight) > 1e-3, weight, 1), dgrid


def nearest_ties_away_from_zero(U, grid, dV, mode, padding_mode, align_corners):
    """Nearest rounding half away from zero: the grid moved onto the pixel it picks."""
    if mode != "nearest":
        return numpy_impl(U, grid, dV, mode, padding_mode, align_corners)
    H, W = U.shape[2:]
    x, y = _pixels(grid, U, align_corners)
    ties = np.stack([x % 1 == 0.5, y % 1 == 0.5], axis=-1)
    away = np.stack([x + np.sign(x) * 0.25, y + np.sign(y) * 0.25], axis=-1)
    shifted = np.where(ties, away, np.stack([x, y], axis=-1))
    moved = np.stack([normalize(shifted[..., 0], W, align_corners),
                      normalize(shifted[..., 1], H, align_corners)], axis=-1)
    moved = np.where(ties, moved, grid).astype(grid.dtype)
    V = grid_sample(U, moved, mode, padding_mode, align_corners)
    dU, dgrid = grid_sample_backward(dV, U, moved, mode, padding_mode, align_corners)
    return V, dU, dgrid


def atomic_accumulation(U, grid, dV, mode, padding_mode, align_corners):
    """dU summed in an order that changes from call to call (unseeded), like atomics."""
    V, dU, dgrid = numpy_impl(U, grid, dV, mode, padding_mode, align_corners)
    ulps = np.random.default_rng().integers(-2, 3, size=dU.shape)
    return V, dU + ulps * np.spacing(dU), dgrid


#: name -> (mutant, the rows it must fail: a predicate on (mode, padding_mode,
#: align_corners)), the contract tests/test_verify_mutants.py checks.
MUTANTS = {
    "tf_stn_pixel_range": (tf_stn_pixel_range, lambda m, p, a: m == "bilinear"),
    "clip_gradient_at_last_pixel": (clip_gradient_at_last_pixel,
                                    lambda m, p, a: m != "nearest" and p != "zeros"),
    "ceil_upper_tap": (ceil_upper_tap, lambda m, p, a: m == "bilinear"),
    "non_adjoint_image_gradient": (non_adjoint_image_gradient, lambda m, p, a: True),
    "nearest_ties_away_from_zero": (nearest_ties_away_from_zero,
                                    lambda m, p, a: m == "nearest"),
    "atomic_accumulation": (atomic_accumulation, lambda m, p, a: True),
}
