"""Parity checks of another ``grid_sample`` implementation against this reference.

For engineers verifying a PyTorch, JAX, CUDA or C++ sampler: every combination of
``mode`` x ``padding_mode`` x ``align_corners`` (3 x 3 x 2 = 18) is run on the same
inputs by this package and by the other implementation, and the forward output V and
both gradients, dU and dgrid, are compared with :func:`stn_numpy.gradcheck.rel_error`,

    rel_error(a, b) = max|a - b| / max(1e-8, max(|a| + |b|)),

one number per array. The inputs (:func:`make_grid`) deliberately put sampling points
*on* the kinks of the piecewise maps (pixel centres, half-pixel rounding ties, the image
border, the reflection lines and the lines one span beyond them, where a second fold
happens), where conventions differ between implementations, as well as at random points
inside and outside the image.

Three ways in
-------------
* :func:`parity_matrix` runs ours beside PyTorch (``other=None`` or ``"torch"``, CPU,
  autograd) or beside any callable
  ``other(U, grid, dV, mode, padding_mode, align_corners) -> (V, dU, dgrid)`` taking and
  returning NumPy arrays (:func:`numpy_impl` is this package behind that interface, a
  template for wrapping yours; :func:`torch_impl` is PyTorch's); :func:`format_table`
  renders the result.
* :func:`export_golden` writes the inputs and our outputs to an ``.npz`` file for a test
  that cannot call Python; :func:`check_against_golden` re-checks a callable (or this
  package, after an upgrade) against such a file.
* ``python -m stn_numpy.verify`` (or ``stn-numpy verify``), see :func:`main`::

      python -m stn_numpy.verify [--dtype float32] [--tol 1e-10]  # table, exit 1 on failure
      python -m stn_numpy.verify --other mypkg.kernels:sample     # your callable, not torch
      python -m stn_numpy.verify --export golden.npz
      python -m stn_numpy.verify --check golden.npz [--other mypkg.kernels:sample]

Tolerances
----------
``1e-10`` in float64: measured against torch 2.13.0 (CPU, with each of its DEFAULT, AVX2
and AVX512 kernels), the worst error over all 20 rows is 7e-16 for the default inputs and
stays below 2e-15 over seeds 0-9 and eight shapes, plain round-off; a convention mismatch
(align_corners swapped, or the left-hand instead of the right-hand derivative at an
integer pixel) shows up as 0.1 or more. ``1e-5`` in float32: measured 5e-7 worst for the
default inputs, below 9e-7 over the same seeds, shapes and kernels; the 10x margin leaves
room for other summation orders (e.g. atomics on a GPU).

Being exactly on a kink depends on the last bit of the unnormalized coordinate, and
implementations round ``(x_s + 1) * W / 2 - 1/2`` differently: torch's AVX2/AVX512 CPU
kernels (and CUDA code by default) fuse it into one multiply-add, its DEFAULT kernel and
this package round twice. The special points of :func:`make_grid` are chosen to land on
the same side of every kink both ways, so the verdict does not depend on the machine.
Where a gradient is zero analytically but not numerically (bicubic with border or
reflection padding on a 1 x 1 input) both sides return round-off, and ``rel_error`` of two
noise arrays is meaningless.

Golden-vector file format
-------------------------
An uncompressed NumPy ``.npz`` archive: a zip file (entries stored, not deflated, so a
reader without zlib, e.g. cnpy, can open it) holding one ``.npy`` file per array, named
by its key plus ``.npy``, e.g. ``bilinear/zeros/align_corners=True/V.npy``. Arrays are
C-contiguous, little-endian, of the dtype recorded in the manifest (``float64`` or
``float32``) unless noted. Shapes for the defaults ``N, C, H, W = 2, 3, 5, 6`` and
``Ho, Wo = 7, 8``.

18 sampler cases, under ``{mode}/{padding_mode}/align_corners={True|False}/`` with mode in
``bilinear, nearest, bicubic`` and padding_mode in ``zeros, border, reflection``:

========  ==================  =================================================
``U``     ``(N, C, H, W)``    input feature map
``grid``  ``(N, Ho, Wo, 2)``  normalized source points, ``[..., 0]`` is x
``dV``    ``(N, C, Ho, Wo)``  upstream gradient
``V``     ``(N, C, Ho, Wo)``  ``grid_sample(U, grid, mode, padding_mode, align_corners)``
``dU``    ``(N, C, H, W)``    gradient of ``sum(V * dV)`` with respect to U
``dgrid`` ``(N, Ho, Wo, 2)``  gradient of ``sum(V * dV)`` with respect to grid
========  ==================  =================================================

2 affine cases, under ``affine_grid/align_corners={True|False}/``:

==========  ==================  ==============================================
``theta``   ``(N, 2, 3)``       affine matrices
``size``    ``(4,)`` int64      output size ``(N, C, Ho, Wo)``
``grid``    ``(N, Ho, Wo, 2)``  ``affine_grid(theta, size, align_corners)``
``dgrid``   ``(N, Ho, Wo, 2)``  upstream gradient
``dtheta``  ``(N, 2, 3)``       gradient of ``sum(grid * dgrid)`` with respect to theta
==========  ==================  ==============================================

``manifest`` is a 1-D uint8 array holding UTF-8 JSON (bytes rather than a NumPy string,
which would be UTF-32 and awkward outside Python)::

    {"format": "stn-numpy-golden", "format_version": 1, "stn_numpy_version": "0.1.0",
     "numpy_version": ..., "scipy_version": ..., "dtype": "float64", "seed": 0,
     "tolerance": 1e-10, "conventions": {...}, "cases": [...], "keys": [...]}

``keys`` lists every array except ``manifest``; ``cases`` lists the key prefixes;
``conventions`` states in words the coordinate, padding and gradient conventions (those of
PyTorch's CPU ``grid_sample``/``affine_grid``, see :mod:`stn_numpy.sampling`). A
checker compares each output array with ``rel_error`` against ``tolerance``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import json
import sys
import warnings
import zipfile
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np

from ._io import atomic_write
from ._torch import TorchNotInstalledError, import_torch
from .gradcheck import rel_error
from .grids import affine_grid, affine_grid_backward
from .sampling import MODES, PADDING_MODES, grid_sample, grid_sample_backward

__all__ = [
    "GoldenFormatError",
    "ParityResult",
    "TorchNotInstalledError",
    "check_against_golden",
    "default_tol",
    "export_golden",
    "format_table",
    "load_golden",
    "main",
    "make_grid",
    "numpy_impl",
    "parity_matrix",
    "torch_impl",
]

GOLDEN_FORMAT = "stn-numpy-golden"
GOLDEN_FORMAT_VERSION = 1
_DEFAULT_TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}
_COMBOS = list(itertools.product(MODES, PADDING_MODES, (True, False)))
_SAMPLER_OUTPUTS = ("V", "dU", "dgrid")

_CONVENTIONS = {
    "layout": "U, V: (N, C, H, W); grid: (N, H_out, W_out, 2) with [..., 0] = x (width), "
    "[..., 1] = y (height); theta: (N, 2, 3)",
    "normalized_coordinates": "-1 and +1 are the centres of the corner pixels with "
    "align_corners=True and their outer edges with align_corners=False",
    "unnormalize": "x = (x_s + 1) * (W - 1) / 2 (align_corners=True), "
    "x = (x_s + 1) * W / 2 - 0.5 (align_corners=False)",
    "affine_grid_target": "x_t[j] = -1 + 2j / (W - 1) (align_corners=True), "
    "(2j + 1) / W - 1 (align_corners=False); a size of 1 gives 0",
    "bilinear": "k(d) = max(0, 1 - |d|); at an exact integer x the pixels x and x + 1 are "
    "used, so dgrid is the right-hand derivative",
    "nearest": "round half to even; dgrid is zero",
    "bicubic": "Keys cubic convolution, a = -0.75, 16 taps; padding applied to each tap",
    "padding_zeros": "pixels outside the image read 0",
    "padding_border": "coordinate clipped to [0, W - 1]; zero gradient at and beyond the ends",
    "padding_reflection": "coordinate reflected about 0 and W - 1 (align_corners=True) or "
    "-0.5 and W - 0.5 (align_corners=False), then clipped to [0, W - 1]; zero gradient "
    "where the result lies on 0 or W - 1",
    "gradients": "dU and dgrid are the gradients of sum(V * dV); dtheta of sum(grid * dgrid)",
    "comparison": "rel_error(a, b) = max|a - b| / max(1e-8, max(|a| + |b|)) per array",
}


class GoldenFormatError(ValueError):
    """A golden-vector file is not in the format :func:`export_golden` writes."""


def default_tol(dtype) -> float:
    """The tolerance on ``rel_error`` for ``dtype``: 1e-10 (float64) or 1e-5 (float32)."""
    dtype = np.dtype(dtype)
    if dtype not in _DEFAULT_TOL:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return _DEFAULT_TOL[dtype]


# --------------------------------------------------------------------------------------
# Results and their table
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParityResult:
    """Agreement of one case between this package and another implementation.

    A sampler row (``op="grid_sample"``) carries ``err_V``, ``err_dU`` and ``err_dgrid``;
    an affine row (``op="affine_grid"``, ``mode`` and ``padding_mode`` None) carries
    ``err_grid`` and ``err_dtheta``. Errors are :func:`~stn_numpy.gradcheck.rel_error`;
    ``passed`` means every error present is at most ``tol`` (NaN fails).
    """

    op: str = "grid_sample"
    mode: str | None
    padding_mode: str | None
    align_corners: bool
    err_V: float | None = None
    err_dU: float | None = None
    err_dgrid: float | None = None
    err_grid: float | None = None
    err_dtheta: float | None = None
    tol: float

    @property
    def errors(self) -> dict[str, float]:
        """The errors present, by array name (``V``, ``dU``, ``dgrid``, ``grid``, ``dtheta``)."""
        named = {"V": self.err_V, "dU": self.err_dU, "dgrid": self.err_dgrid,
                 "grid": self.err_grid, "dtheta": self.err_dtheta}
        return {name: err for name, err in named.items() if err is not None}

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def passed(self) -> bool:
        return all(err <= self.tol for err in self.errors.values())

    @property
    def case(self) -> str:
        """The case's key prefix in a golden file, e.g. ``bilinear/zeros/align_corners=True``."""
        if self.op == "affine_grid":
            return _affine_key(self.align_corners)
        return _sampler_key(self.mode, self.padding_mode, self.align_corners)


_COLUMNS = ("V", "dU", "dgrid", "grid", "dtheta")


def format_table(results: Sequence[ParityResult], tol: float | None = None) -> str:
    """Render results as a fixed-width table with a one-line summary below it.

    ``tol`` overrides each result's own tolerance for the PASS/FAIL column and summary.
    Errors that do not apply to a row (dU for affine_grid, ...) show as ``-``.
    """
    results = [r if tol is None else dataclasses.replace(r, tol=tol) for r in results]
    header = f"{'mode':<12}{'padding':<12}{'align_corners':<15}" + "".join(
        f"{'err ' + name:>11}" for name in _COLUMNS) + f"{'result':>8}"
    lines = [header, "-" * len(header)]
    for r in results:
        mode = r.op if r.op == "affine_grid" else r.mode
        cells = "".join(
            f"{'-':>11}" if name not in r.errors else f"{r.errors[name]:>11.1e}"
            for name in _COLUMNS)
        verdict = "PASS" if r.passed else "FAIL"
        lines.append(f"{mode:<12}{r.padding_mode or '-':<12}{r.align_corners!s:<15}{cells}"
                     f"{verdict:>8}")
    lines.append("-" * len(header))
    lines.append(_summary(results))
    return "\n".join(lines)


def _summary(results: Sequence[ParityResult]) -> str:
    if not results:
        return "no cases"
    n_pass = sum(r.passed for r in results)
    worst = max(results, key=lambda r: np.nan_to_num(r.max_error, nan=np.inf))
    worst_name = max(worst.errors, key=lambda k: np.nan_to_num(worst.errors[k], nan=np.inf),
                     default="-")
    tols = sorted({r.tol for r in results})
    tol_text = ", ".join(f"{t:g}" for t in tols)
    return (f"{n_pass}/{len(results)} cases within tol {tol_text}; worst "
            f"{worst.max_error:.2e} ({worst.case}, {worst_name})")


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def _normalize(u, size: int, align_corners: bool):
    """Pixel coordinate -> normalized coordinate, the inverse of the sampler's unnormalize."""
    if align_corners:
        return 2 * u / (size - 1) - 1 if size > 1 else np.zeros_like(u)
    return (2 * u + 1) / size - 1


def _unnormalize_both_ways(coord, size: int, align_corners: bool):
    """Pixel coordinate of one normalized ``coord`` as implementations round it.

    Returns ``(separate, fused)``: the multiply and the subtraction rounded one at a time
    (this package; torch's scalar CPU code), or rounded once as a fused multiply-add
    (torch's AVX2/AVX512 kernels, nvcc's default). Both start from ``coord + 1`` rounded
    in ``coord``'s dtype; ``((c + 1) * size - 1) / 2`` rounds like ``(c + 1) * size / 2 -
    0.5`` since halving commutes with rounding.
    """
    t = type(coord)
    shifted = coord + t(1)
    if align_corners:
        separate = shifted * t((size - 1) / 2)
        return separate, separate
    separate = shifted * t(size / 2) - t(0.5)
    fused = _round_to(Fraction(float(shifted)) * Fraction(size, 2) - Fraction(1, 2), t)
    return separate, fused


def _round_to(x: Fraction, t):
    """``x`` rounded to the nearest value of float type ``t``, ties to even."""
    # float() rounds correctly to float64; a float32 may then be one double rounding off.
    near = t(float(x))
    if Fraction(float(near)) == x:
        return near
    other = np.nextafter(near, t(np.inf) if Fraction(float(near)) < x else t(-np.inf))
    d_near, d_other = abs(Fraction(float(near)) - x), abs(Fraction(float(other)) - x)
    if d_other < d_near or (d_other == d_near and _is_even(other)):
        return other
    return near


def _is_even(v) -> bool:
    bits = np.array(v).view(np.uint32 if np.array(v).dtype == np.float32 else np.uint64)
    return int(bits) % 2 == 0


def _special_pixel_coords(size: int, align_corners: bool) -> np.ndarray:
    """Pixel coordinates on the kinks of the samplers along an axis of ``size`` pixels.

    Integers (bilinear and bicubic change taps, border clipping acts at 0 and size - 1),
    half-integers (nearest rounding ties), one pixel outside, the reflection lines (which
    are the normalized +-1) and the lines one span further out, where a second fold
    happens.
    """
    lo, hi = (0.0, size - 1.0) if align_corners else (-0.5, size - 0.5)
    span = hi - lo
    coords = [-1.0, -0.5, 0.0, 0.5, 1.0, size - 1.5, size - 1.0, size - 0.5, float(size),
              lo - span, hi + span]
    return np.unique(coords)


@lru_cache(maxsize=64)
def _special_coords(size: int, align_corners: bool, dtype: np.dtype) -> dict[float, float]:
    """Normalized coordinates in ``dtype`` for every special pixel coordinate of an axis.

    The float nearest to the ideal normalized value often misses its kink by an ulp once
    unnormalized (pixel 0 of a 6-pixel axis is -5/6), and whether it falls short or
    beyond can depend on whether the implementation fuses the multiply-add. So the
    nearest floats are tried, closest first, and the first one that lands exactly on
    the kink both ways is kept. Where none does (a fused product of 1/3 is never exact),
    the first on which both ways agree is kept, so every implementation sees the same
    side of the kink; failing that, the nearest float.
    """
    t = dtype.type
    chosen = {}
    for u in _special_pixel_coords(size, align_corners):
        ideal = t(_normalize(float(u), size, align_corners))
        up, down, candidates = ideal, ideal, [ideal]
        for _ in range(16):
            up, down = np.nextafter(up, t(np.inf)), np.nextafter(down, t(-np.inf))
            candidates += [up, down]
        ways = [_unnormalize_both_ways(c, size, align_corners) for c in candidates]
        exact = [c for c, (a, b) in zip(candidates, ways, strict=True) if a == b == u]
        agreed = [c for c, (a, b) in zip(candidates, ways, strict=True) if a == b]
        chosen[float(u)] = (exact or agreed or [ideal])[0]
    return chosen


def make_grid(N: int, Ho: int, Wo: int, H: int, W: int, align_corners: bool = False, *,
              rng=None, dtype=np.float64) -> np.ndarray:
    """A sampling grid that hits the samplers' kinks as well as generic points.

    At most half of the ``N * Ho * Wo`` points sit on a special pixel coordinate
    (integers, half-integers, the border, one pixel outside, the reflection lines and the
    second fold beyond them; see the module docstring): each special x with a random y
    inside the image, each special y with a random x, and every pair of the boundary
    coordinates (the image corners inside and out). The rest are uniform in
    ``[-1.6, 1.6]^2``, inside the image and up to 30% of its size outside. Specials go to
    random positions, so a small grid still gets a random subset of them.

    A special point is a normalized coordinate that unnormalizes exactly onto its kink,
    whether the implementation rounds ``(x_s + 1) * W / 2 - 1/2`` in two steps or fuses
    it into one multiply-add; where no float does that (e.g. pixel 0 of a 6-pixel axis
    with align_corners=False), one on which both roundings agree, an ulp off the kink.

    Parameters
    ----------
    N, Ho, Wo : int
        Grid shape (batch, output height and width).
    H, W : int
        Size of the input U the grid will sample; the special points depend on it.
    align_corners : bool
        The convention the grid will be sampled with.
    rng : numpy.random.Generator or int seed, optional
    dtype : float32 or float64
        Special points are chosen in this dtype, for samplers computing in it.

    Returns
    -------
    grid : ndarray, shape (N, Ho, Wo, 2)
    """
    rng = np.random.default_rng(rng)
    dtype = np.dtype(dtype)
    grid = rng.uniform(-1.6, 1.6, size=(N, Ho, Wo, 2)).astype(dtype)
    xs = _special_coords(W, bool(align_corners), dtype)
    ys = _special_coords(H, bool(align_corners), dtype)
    inside_x = rng.uniform(-1, 1, size=len(ys))
    inside_y = rng.uniform(-1, 1, size=len(xs))
    corners = itertools.product([xs[-1.0], xs[0.0], xs[W - 1.0], xs[float(W)]],
                                [ys[-1.0], ys[0.0], ys[H - 1.0], ys[float(H)]])
    special = np.array(list(zip(xs.values(), inside_y, strict=True))
                       + list(zip(inside_x, ys.values(), strict=True)) + list(corners),
                       dtype=dtype)
    flat = grid.reshape(-1, 2)
    k = min(len(special), len(flat) // 2)
    flat[rng.permutation(len(flat))[:k]] = special[rng.permutation(len(special))[:k]]
    return grid


def _case_rng(seed: int, case: int) -> np.random.Generator:
    # One stream per case, so a case's inputs do not depend on which other cases run.
    return np.random.default_rng([seed, case])


def _sampler_inputs(seed, case, shape, out_hw, align_corners, dtype):
    rng = _case_rng(seed, case)
    N, C, H, W = shape
    Ho, Wo = out_hw
    U = rng.standard_normal((N, C, H, W)).astype(dtype)
    grid = make_grid(N, Ho, Wo, H, W, align_corners, rng=rng, dtype=dtype)
    dV = rng.standard_normal((N, C, Ho, Wo)).astype(dtype)
    return U, grid, dV


def _affine_inputs(seed, case, shape, out_hw, dtype):
    rng = _case_rng(seed, case)
    N, C = shape[:2]
    theta = (np.array([[1.0, 0, 0], [0, 1, 0]]) + 0.5 * rng.standard_normal((N, 2, 3)))
    size = np.array([N, C, *out_hw], dtype=np.int64)
    dgrid = rng.standard_normal((N, *out_hw, 2))
    return theta.astype(dtype), size, dgrid.astype(dtype)


def _sampler_key(mode, padding_mode, align_corners) -> str:
    return f"{mode}/{padding_mode}/align_corners={align_corners}"


def _affine_key(align_corners) -> str:
    return f"affine_grid/align_corners={align_corners}"


# --------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------


def numpy_impl(U, grid, dV, mode, padding_mode, align_corners):
    """This package's sampler behind the ``other`` interface: returns ``(V, dU, dgrid)``.

    Also the template for a user's callable: NumPy arrays in, NumPy arrays out, dU and
    dgrid being the gradients of ``sum(V * dV)``.
    """
    V = grid_sample(U, grid, mode, padding_mode, align_corners)
    dU, dgrid = grid_sample_backward(dV, U, grid, mode, padding_mode, align_corners)
    return V, dU, dgrid


def _numpy_affine(theta, size, dgrid, align_corners):
    return (affine_grid(theta, size, align_corners),
            affine_grid_backward(dgrid, theta, size, align_corners))


def torch_impl(U, grid, dV, mode, padding_mode, align_corners):
    """PyTorch's ``F.grid_sample`` on the CPU behind the ``other`` interface, via autograd."""
    torch = import_torch()
    U_t = torch.from_numpy(np.array(U)).requires_grad_()
    grid_t = torch.from_numpy(np.array(grid)).requires_grad_()
    V_t = torch.nn.functional.grid_sample(U_t, grid_t, mode=mode, padding_mode=padding_mode,
                                          align_corners=align_corners)
    V_t.backward(torch.from_numpy(np.array(dV)))
    dgrid = np.zeros_like(grid) if grid_t.grad is None else grid_t.grad.numpy()
    return V_t.detach().numpy(), U_t.grad.numpy(), dgrid


def _torch_affine(theta, size, dgrid, align_corners):
    torch = import_torch()
    theta_t = torch.from_numpy(np.array(theta)).requires_grad_()
    with warnings.catch_warnings():
        # torch warns that align_corners=True with a size of 1 is ill-defined; both
        # implementations give the coordinate 0 there, which is what is being compared.
        warnings.simplefilter("ignore", UserWarning)
        grid_t = torch.nn.functional.affine_grid(theta_t, [int(s) for s in size],
                                                 align_corners=align_corners)
    grid_t.backward(torch.from_numpy(np.array(dgrid)))
    return grid_t.detach().numpy(), theta_t.grad.numpy()


def _resolve(other, default):
    """``(sampler, affine or None)`` for ``other`` in {None, "numpy", "torch", callable}.

    A user callable covers the sampler only, so affine rows are skipped for it.
    """
    other = default if other is None else other
    if other == "torch":
        import_torch()
        return torch_impl, _torch_affine
    if other == "numpy":
        return numpy_impl, _numpy_affine
    if callable(other):
        return other, None
    raise TypeError(f"other must be None, 'torch' or a callable, got {other!r}")


def _call_sampler(fn, U, grid, dV, mode, padding_mode, align_corners):
    # Copies, so a callable that writes into its inputs cannot change what we compare.
    out = fn(U.copy(), grid.copy(), dV.copy(), mode, padding_mode, align_corners)
    try:
        V, dU, dgrid = (np.asarray(a) for a in out)
    except (TypeError, ValueError):
        raise ValueError(f"other must return (V, dU, dgrid), got {type(out).__name__}") from None
    Ho, Wo = grid.shape[1:3]
    for name, a, shape in (("V", V, U.shape[:2] + (Ho, Wo)), ("dU", dU, U.shape),
                           ("dgrid", dgrid, grid.shape)):
        if a.shape != shape:
            raise ValueError(f"other returned {name} of shape {a.shape}, expected {shape} "
                             f"({_sampler_key(mode, padding_mode, align_corners)})")
    return V, dU, dgrid


# --------------------------------------------------------------------------------------
# The parity matrix
# --------------------------------------------------------------------------------------


def parity_matrix(other=None, *, dtype=np.float64, seed: int = 0, shape=(2, 3, 5, 6),
                  out_hw=(7, 8), tol: float | None = None) -> list[ParityResult]:
    """Compare this package with ``other`` on all 18 sampler combinations (+ affine_grid).

    Parameters
    ----------
    other : None, "torch" or callable
        None or ``"torch"``: PyTorch's ``F.grid_sample`` and ``F.affine_grid`` on the CPU,
        gradients by autograd (raises :class:`TorchNotInstalledError` without torch).
        A callable ``other(U, grid, dV, mode, padding_mode, align_corners) -> (V, dU,
        dgrid)`` on NumPy arrays, dU and dgrid being the gradients of ``sum(V * dV)``;
        affine rows are skipped for it.
    dtype : float32 or float64
        dtype of every input; the other implementation computes in it too.
    seed : int
        Inputs are a deterministic function of ``seed`` and the case.
    shape : (N, C, H, W)
        Shape of U.
    out_hw : (Ho, Wo)
        Output size; ``N * Ho * Wo`` should be at least 80 (twice the about 40 special
        points of :func:`make_grid`) for every special point to be used.
    tol : float, optional
        Pass threshold on each ``rel_error``; :func:`default_tol` of ``dtype`` if omitted.

    Returns
    -------
    list of ParityResult
        18 sampler rows in the order ``MODES`` x ``PADDING_MODES`` x (True, False), then,
        for torch, one affine_grid row per align_corners.
    """
    sampler, affine = _resolve(other, "torch")
    dtype = np.dtype(dtype)
    tol = default_tol(dtype) if tol is None else float(tol)
    results = []
    for case, (mode, padding_mode, align_corners) in enumerate(_COMBOS):
        U, grid, dV = _sampler_inputs(seed, case, shape, out_hw, align_corners, dtype)
        ours = numpy_impl(U, grid, dV, mode, padding_mode, align_corners)
        theirs = _call_sampler(sampler, U, grid, dV, mode, padding_mode, align_corners)
        errs = {f"err_{name}": rel_error(a, b)
                for name, a, b in zip(_SAMPLER_OUTPUTS, ours, theirs, strict=True)}
        results.append(ParityResult(mode=mode, padding_mode=padding_mode,
                                    align_corners=align_corners, tol=tol, **errs))
    if affine is not None:
        for i, align_corners in enumerate((True, False)):
            theta, size, dgrid = _affine_inputs(seed, len(_COMBOS) + i, shape, out_hw, dtype)
            ours = _numpy_affine(theta, size, dgrid, align_corners)
            theirs = affine(theta, size, dgrid, align_corners)
            results.append(ParityResult(
                op="affine_grid", mode=None, padding_mode=None, align_corners=align_corners,
                err_grid=rel_error(ours[0], theirs[0]), err_dtheta=rel_error(ours[1], theirs[1]),
                tol=tol))
    return results


# --------------------------------------------------------------------------------------
# Golden vectors
# --------------------------------------------------------------------------------------


def _golden_arrays(seed, dtype, shape, out_hw) -> dict[str, np.ndarray]:
    arrays = {}
    for case, (mode, padding_mode, align_corners) in enumerate(_COMBOS):
        U, grid, dV = _sampler_inputs(seed, case, shape, out_hw, align_corners, dtype)
        V, dU, dgrid = numpy_impl(U, grid, dV, mode, padding_mode, align_corners)
        prefix = _sampler_key(mode, padding_mode, align_corners)
        for name, a in (("U", U), ("grid", grid), ("dV", dV), ("V", V), ("dU", dU),
                        ("dgrid", dgrid)):
            arrays[f"{prefix}/{name}"] = np.ascontiguousarray(a)
    for i, align_corners in enumerate((True, False)):
        theta, size, dgrid = _affine_inputs(seed, len(_COMBOS) + i, shape, out_hw, dtype)
        grid, dtheta = _numpy_affine(theta, size, dgrid, align_corners)
        prefix = _affine_key(align_corners)
        for name, a in (("theta", theta), ("size", size), ("grid", grid), ("dgrid", dgrid),
                        ("dtheta", dtheta)):
            arrays[f"{prefix}/{name}"] = np.ascontiguousarray(a)
    return arrays


def export_golden(path, *, seed: int = 0, dtype=np.float64, shape=(2, 3, 5, 6),
                  out_hw=(7, 8)) -> Path:
    """Write golden test vectors to ``path`` (format: see the module docstring).

    The file is written to a temporary file beside ``path`` and moved into place with
    ``os.replace``, so a reader never sees a half-written file and an existing file
    survives a failed export.

    Parameters
    ----------
    path : str or Path
        Destination, conventionally ending in ``.npz`` (nothing is appended).
    seed, dtype, shape, out_hw
        As in :func:`parity_matrix`; the inputs are the same as its inputs.

    Returns
    -------
    Path
        ``path``.
    """
    import scipy

    from . import __version__

    dtype = np.dtype(dtype)
    tol = default_tol(dtype)
    arrays = _golden_arrays(seed, dtype, tuple(shape), tuple(out_hw))
    manifest = {
        "format": GOLDEN_FORMAT,
        "format_version": GOLDEN_FORMAT_VERSION,
        "stn_numpy_version": __version__,
        "numpy_version": np.__version__,
        "scipy_version": scipy.__version__,
        "dtype": dtype.name,
        "seed": int(seed),
        "tolerance": tol,
        "conventions": _CONVENTIONS,
        "cases": [_sampler_key(*c) for c in _COMBOS] + [_affine_key(ac) for ac in (True, False)],
        "keys": list(arrays),
    }
    arrays["manifest"] = np.frombuffer(json.dumps(manifest, indent=1).encode(), dtype=np.uint8)

    path = Path(path)
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def load_golden(path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a golden-vector file: ``(manifest, arrays)``.

    ``manifest`` is the parsed JSON; ``arrays`` maps every key of ``manifest["keys"]`` to
    its array. Raises :class:`GoldenFormatError` for a file of another format or version
    and ``OSError`` if it cannot be read.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise GoldenFormatError(f"{path}: not a readable .npz file ({exc})") from exc
    if "manifest" not in arrays:
        raise GoldenFormatError(f"{path}: no 'manifest' entry; not a stn-numpy golden file")
    try:
        manifest = json.loads(arrays.pop("manifest").tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GoldenFormatError(f"{path}: manifest is not UTF-8 JSON ({exc})") from exc
    if manifest.get("format") != GOLDEN_FORMAT:
        raise GoldenFormatError(f"{path}: format is {manifest.get('format')!r}, "
                                f"expected {GOLDEN_FORMAT!r}")
    if manifest.get("format_version") != GOLDEN_FORMAT_VERSION:
        raise GoldenFormatError(f"{path}: format_version {manifest.get('format_version')!r}, "
                                f"this reader knows {GOLDEN_FORMAT_VERSION}")
    missing = sorted(set(manifest.get("keys", [])) - set(arrays))
    if missing:
        raise GoldenFormatError(f"{path}: {len(missing)} key(s) in the manifest have no array, "
                                f"e.g. {missing[0]!r}")
    return manifest, arrays


def check_against_golden(path, other=None, *, tol: float | None = None) -> list[ParityResult]:
    """Re-run the cases of a golden file and compare with its stored outputs.

    Parameters
    ----------
    path : str or Path
        A file written by :func:`export_golden`.
    other : None, "torch" or callable
        None: this package (sampler and affine_grid), e.g. after an upgrade of NumPy or
        SciPy. ``"torch"``: PyTorch. A callable as in :func:`parity_matrix`: its sampler
        on the stored inputs (affine cases skipped).
    tol : float, optional
        Defaults to the file's recorded tolerance.

    Returns
    -------
    list of ParityResult, in the order of the file's cases.
    """
    manifest, arrays = load_golden(path)
    sampler, affine = _resolve(other, "numpy")
    tol = float(manifest["tolerance"]) if tol is None else float(tol)
    results = []
    for mode, padding_mode, align_corners in _COMBOS:
        prefix = _sampler_key(mode, padding_mode, align_corners)
        if f"{prefix}/U" not in arrays:
            continue
        U, grid, dV = (arrays[f"{prefix}/{name}"] for name in ("U", "grid", "dV"))
        theirs = _call_sampler(sampler, U, grid, dV, mode, padding_mode, align_corners)
        errs = {f"err_{name}": rel_error(arrays[f"{prefix}/{name}"], b)
                for name, b in zip(_SAMPLER_OUTPUTS, theirs, strict=True)}
        results.append(ParityResult(mode=mode, padding_mode=padding_mode,
                                    align_corners=align_corners, tol=tol, **errs))
    for align_corners in (True, False):
        prefix = _affine_key(align_corners)
        if affine is None or f"{prefix}/theta" not in arrays:
            continue
        theta, size, dgrid = (arrays[f"{prefix}/{name}"] for name in ("theta", "size", "dgrid"))
        grid, dtheta = affine(theta, tuple(int(s) for s in size), dgrid, align_corners)
        results.append(ParityResult(
            op="affine_grid", mode=None, padding_mode=None, align_corners=align_corners,
            err_grid=rel_error(arrays[f"{prefix}/grid"], grid),
            err_dtheta=rel_error(arrays[f"{prefix}/dtheta"], dtheta), tol=tol))
    if not results:
        raise GoldenFormatError(f"{path}: no cases found")
    return results


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``verify`` options to ``parser``; :func:`_run` carries them out."""
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--export", metavar="PATH",
                        help="write golden test vectors (.npz) to PATH instead of comparing")
    action.add_argument("--check", metavar="PATH",
                        help="re-check against golden vectors in PATH (this package unless "
                             "--other is given)")
    parser.add_argument("--other", metavar="MODULE:FUNCTION",
                        help="compare a callable other(U, grid, dV, mode, padding_mode, "
                             "align_corners) -> (V, dU, dgrid) instead of PyTorch")
    parser.add_argument("--tol", type=_positive_float, default=None,
                        help="pass threshold on the relative error (default: 1e-10 for "
                             "float64, 1e-5 for float32; --check: the file's)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="dtype of the comparison or export (--check uses the file's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    """Carry out parsed ``verify`` options; returns the exit code (0 pass, 1 fail, 2 error)."""
    try:
        if args.export and args.other:
            raise _CallableSpecError("--export writes this package's outputs; drop --other")
        other = _load_callable(args.other) if args.other else None
        if args.export:
            path = export_golden(args.export, seed=args.seed, dtype=args.dtype)
            print(f"wrote golden vectors ({args.dtype}, seed {args.seed}) to {path}")
            return 0
        if args.check:
            results = check_against_golden(args.check, other, tol=args.tol)
            title = f"{_label(other or numpy_impl)} vs golden vectors in {args.check}"
        else:
            results = parity_matrix(other, dtype=args.dtype, seed=args.seed, tol=args.tol)
            against = _label(other) if other else f"torch {import_torch().__version__}"
            title = f"stn_numpy vs {against} ({args.dtype}, seed {args.seed})"
    except (TorchNotInstalledError, GoldenFormatError, OSError, _CallableSpecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:
        if not args.other:
            raise  # from this package: a bug, whose traceback is wanted
        # The user's callable raised, or returned something unusable: their error, not a
        # crash of the checker.
        message = " ".join(str(exc).split())
        print(f"error: --other {args.other}: {type(exc).__name__}: {message}", file=sys.stderr)
        return 2
    print(title)
    print(format_table(results))
    return 0 if all(r.passed for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``verify`` subcommand entry point; returns the exit code.

    ``main(["verify", "--check", "golden.npz"])``; the subcommand name may be left out, as
    ``stn-numpy verify`` and ``python -m stn_numpy.verify`` do. Exit codes: 0 every case
    passed, 1 some case failed, 2 PyTorch missing (and no ``--other``), an unreadable
    golden file, a bad argument, or an ``--other`` callable that raised ``ValueError`` or
    ``TypeError`` or returned something other than ``(V, dU, dgrid)`` of the right shapes.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # `stn-numpy verify ...` and `python -m stn_numpy.verify ...` hand over the options
    # without the subcommand name; repeating it would be noise.
    if not argv or argv[0] != "verify":
        argv.insert(0, "verify")
    parser = argparse.ArgumentParser(
        prog="stn-numpy",
        description="Check grid_sample implementations against the stn_numpy reference.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_arguments(commands.add_parser(
        "verify", help="parity table vs PyTorch or a callable; golden vectors",
        description="Compare forward and both gradients on all 18 mode x padding_mode x "
                    "align_corners combinations."))
    args = parser.parse_args(argv)
    return args.func(args)


class _CallableSpecError(ValueError):
    pass


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _load_callable(spec: str):
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise _CallableSpecError(f"--other must look like MODULE:FUNCTION, got {spec!r}")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise _CallableSpecError(f"--other: cannot import {module_name!r} ({exc})") from exc
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise _CallableSpecError(f"--other: {module_name!r} has no {attr!r}") from None
    if not callable(obj):
        raise _CallableSpecError(f"--other: {spec} is not callable")
    return obj


def _label(fn) -> str:
    return getattr(fn, "__qualname__", repr(fn))


if __name__ == "__main__":
    raise SystemExit(main())
