"""The parity matrix: another ``grid_sample`` beside this reference, case by case.

Every combination of ``mode`` x ``padding_mode`` x ``align_corners`` (3 x 3 x 2 = 18) is
run on the same inputs by this package and by the other implementation, and the forward
output V and both gradients, dU and dgrid, are compared with
:func:`stn_numpy.gradcheck.rel_error`, ::

    rel_error(a, b) = max|a - b| / max(1e-8, max(|a| + |b|)),

one number per array. The inputs (:func:`make_grid`) deliberately put sampling points
*on* the kinks of the piecewise maps (pixel centres, half-pixel rounding ties, the image
border, the reflection lines and the lines one span beyond them, where a second fold
happens), where conventions differ between implementations, as well as at random points
inside and outside the image.

Two checks need no reference at all and catch what a random finite-difference test
misses:

* the adjoint (dot-product) test: every sampler is linear in U, ``V = S U``, so its image
  gradient must be ``dU = S^T dV`` and ``<V, dV> == <U, dU>`` for the other
  implementation's own V and dU (``err_adjoint``, the difference over
  ``sum|V dV| + sum|U dU|``);
* the determinism check: the other implementation is called twice on the same inputs and
  its outputs compared bit for bit (``repeat_diff``, the largest difference; a port that
  accumulates with atomics shows it).

A row names where its worst error sits (array, index, ours and theirs, and the pixel
coordinate of the sampling point), so a failure points at the kink that caused it.

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
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache

import numpy as np

from .._torch import import_torch
from ..gradcheck import rel_error
from ..grids import affine_grid, affine_grid_backward
from ..sampling import MODES, PADDING_MODES, grid_sample, grid_sample_backward
from .adapters import ADAPTERS, load_adapter
from .common import Unsupported, pixel_coordinates

__all__ = [
    "ParityResult",
    "Unsupported",
    "compare_sampler",
    "default_tol",
    "format_table",
    "make_grid",
    "numpy_impl",
    "parity_matrix",
    "pixel_coordinates",
    "torch_impl",
]

_DEFAULT_TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}
COMBOS = list(itertools.product(MODES, PADDING_MODES, (True, False)))
SAMPLER_OUTPUTS = ("V", "dU", "dgrid")


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

    A sampler row (``op="grid_sample"``) carries ``err_V``, ``err_dU`` and ``err_dgrid``
    (None for an implementation that returns no gradients), ``err_adjoint`` and
    ``repeat_diff`` (see the module docstring); an affine row (``op="affine_grid"``,
    ``mode`` and ``padding_mode`` None) carries ``err_grid`` and ``err_dtheta``. Errors
    are :func:`~stn_numpy.gradcheck.rel_error`. ``failure`` holds the message when the
    other implementation raised or returned something unusable; ``unsupported`` the
    reason when it cannot express the case (the row neither passes nor fails). ``where``
    maps an array name to the location of its worst error; ``key`` overrides
    :attr:`case` (a golden file's edge and transform cases). ``err_params`` is a whole
    layer's worst parameter-side error (theta, loss, parameter gradients). A double
    backward row (``op="grid_sample_double_backward"``, see
    :mod:`~stn_numpy.verify.second_order`) carries ``err_d_dV``, ``err_d_U`` and
    ``err_d_grid``.

    ``status`` is ``"PASS"`` (every error present at most ``tol``, NaN fails, and the two
    calls agreed bit for bit), ``"FAIL"``, ``"ERROR"`` (``failure``) or ``"N/A"``.
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
    err_adjoint: float | None = None
    err_params: float | None = None
    err_d_dV: float | None = None
    err_d_U: float | None = None
    err_d_grid: float | None = None
    repeat_diff: float | None = None
    tol: float
    failure: str | None = None
    unsupported: str | None = None
    where: dict[str, str] = dataclasses.field(default_factory=dict)
    key: str | None = None

    @property
    def errors(self) -> dict[str, float]:
        """The errors present, by name (``V``, ``dU``, ``dgrid``, ``grid``, ``dtheta``, ...)."""
        named = {"V": self.err_V, "dU": self.err_dU, "dgrid": self.err_dgrid,
                 "grid": self.err_grid, "dtheta": self.err_dtheta, "adjoint": self.err_adjoint,
                 "params": self.err_params, "d_dV": self.err_d_dV, "d_U": self.err_d_U,
                 "d_grid": self.err_d_grid}
        return {name: err for name, err in named.items() if err is not None}

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def status(self) -> str:
        if self.unsupported is not None:
            return "N/A"
        if self.failure is not None:
            return "ERROR"
        within = all(err <= self.tol for err in self.errors.values())
        return "PASS" if within and not self.repeat_diff else "FAIL"

    @property
    def passed(self) -> bool:
        """True unless the row failed or errored (an N/A row does not fail)."""
        return self.status in ("PASS", "N/A")

    @property
    def case(self) -> str:
        """The case's key prefix in a golden file, e.g. ``bilinear/zeros/align_corners=True``."""
        if self.key is not None:
            return self.key
        if self.op == "affine_grid":
            return affine_key(self.align_corners)
        return sampler_key(self.mode, self.padding_mode, self.align_corners)


_COLUMNS = ("V", "dU", "dgrid", "grid", "dtheta", "adjoint", "params")
# Shown only when some row has them (a first-order table keeps its width); a table of
# double backward rows alone shows only these.
_SECOND_ORDER_COLUMNS = ("d_dV", "d_U", "d_grid")


def format_table(results: Sequence[ParityResult], tol: float | None = None) -> str:
    """Render results as a fixed-width table, the failures' locations, and a summary line.

    ``tol`` overrides each result's own tolerance for the result column and summary.
    Errors that do not apply to a row (dU for affine_grid, ...) show as ``-``; a row
    whose two calls differed shows its largest difference in the ``repeat`` column.
    Below the table, each failing row says where its worst error is, or why it errored.
    """
    results = [r if tol is None else dataclasses.replace(r, tol=tol) for r in results]
    first_order = not results or any(r.op != "grid_sample_double_backward" for r in results)
    columns = (_COLUMNS if first_order else ()) + tuple(
        c for c in _SECOND_ORDER_COLUMNS if any(c in r.errors for r in results))
    width = max((len(r.case) + 2 for r in results if r.key is not None), default=0)
    label = (lambda r: f"{r.case:<{width}}") if width else _label
    header = (f"{'case':<{width}}" if width else
              f"{'mode':<12}{'padding':<12}{'align_corners':<15}") + "".join(
        f"{'err ' + name:>12}" for name in columns) + f"{'repeat':>10}{'result':>8}"
    lines = [header, "-" * len(header)]
    notes = []
    for r in results:
        cells = "".join(
            f"{'-':>12}" if name not in r.errors else f"{r.errors[name]:>12.1e}"
            for name in columns)
        repeat = "-" if r.repeat_diff is None else ("same" if r.repeat_diff == 0
                                                    else f"{r.repeat_diff:.1e}")
        lines.append(f"{label(r)}{cells}{repeat:>10}{r.status:>8}")
        notes += _notes(r)
    lines.append("-" * len(header))
    lines += notes
    lines.append(_summary(results))
    return "\n".join(lines)


def _label(r: ParityResult) -> str:
    mode = r.op if r.op != "grid_sample" else r.mode
    return f"{mode:<12}{r.padding_mode or '-':<12}{r.align_corners!s:<15}"


def _notes(r: ParityResult) -> list[str]:
    if r.status == "ERROR":
        return [f"{r.case}: {r.failure}"]
    if r.status != "FAIL":
        return []
    out = [f"{r.case}: {name} {r.where.get(name, '')}".rstrip()
           for name, err in r.errors.items() if not err <= r.tol]
    if r.repeat_diff:
        out.append(f"{r.case}: two calls on the same inputs differ by up to "
                   f"{r.repeat_diff:.1e} (not deterministic)")
    return out


def _summary(results: Sequence[ParityResult]) -> str:
    if not results:
        return "no cases"
    counted = [r for r in results if r.status != "N/A"]
    n_pass = sum(r.passed for r in counted)
    tols = sorted({r.tol for r in results})
    tol_text = ", ".join(f"{t:g}" for t in tols)
    text = f"{n_pass}/{len(counted)} cases within tol {tol_text}"
    scored = [r for r in counted if r.errors]
    if scored:
        worst = max(scored, key=lambda r: np.nan_to_num(r.max_error, nan=np.inf))
        worst_name = max(worst.errors,
                         key=lambda k: np.nan_to_num(worst.errors[k], nan=np.inf))
        text += f"; worst {worst.max_error:.2e} ({worst.case}, {worst_name})"
    n_na = len(results) - len(counted)
    if n_na:
        text += f"; {n_na} not expressible by the other implementation"
    return text

# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def normalize(u, size: int, align_corners: bool):
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
def special_coords(size: int, align_corners: bool, dtype: np.dtype) -> dict[float, float]:
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
        ideal = t(normalize(float(u), size, align_corners))
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
    xs = special_coords(W, bool(align_corners), dtype)
    ys = special_coords(H, bool(align_corners), dtype)
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


def sampler_inputs(seed, case, shape, out_hw, align_corners, dtype):
    rng = _case_rng(seed, case)
    N, C, H, W = shape
    Ho, Wo = out_hw
    U = rng.standard_normal((N, C, H, W)).astype(dtype)
    grid = make_grid(N, Ho, Wo, H, W, align_corners, rng=rng, dtype=dtype)
    dV = rng.standard_normal((N, C, Ho, Wo)).astype(dtype)
    return U, grid, dV


def affine_inputs(seed, case, shape, out_hw, dtype):
    rng = _case_rng(seed, case)
    N, C = shape[:2]
    theta = (np.array([[1.0, 0, 0], [0, 1, 0]]) + 0.5 * rng.standard_normal((N, 2, 3)))
    size = np.array([N, C, *out_hw], dtype=np.int64)
    dgrid = rng.standard_normal((N, *out_hw, 2))
    return theta.astype(dtype), size, dgrid.astype(dtype)


def sampler_key(mode, padding_mode, align_corners) -> str:
    return f"{mode}/{padding_mode}/align_corners={align_corners}"


def affine_key(align_corners) -> str:
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


def numpy_affine(theta, size, dgrid, align_corners):
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


def torch_affine(theta, size, dgrid, align_corners):
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




def _call(fn, U, grid, dV, mode, padding_mode, align_corners):
    """``fn``'s ``(V, dU, dgrid)`` as float arrays (dU, dgrid may be None), checked by
    :func:`checked_outputs`."""
    return checked_outputs(fn, (U, grid, dV, mode, padding_mode, align_corners),
                           (("V", U.shape[:2] + grid.shape[1:-1], False),
                            ("dU", U.shape, True), ("dgrid", grid.shape, True)))


def checked_outputs(fn, args, expected) -> tuple:
    """``fn(*args)`` (arrays passed as copies), its outputs as float arrays, checked.

    ``expected`` holds ``(name, shape, may_be_None)`` for each output. Everything ``fn``
    returns is converted and checked here, inside the caller's guard, so that an odd
    result (complex, strings, objects, huge ints, wrong shapes) becomes that row's error
    and nothing later has to trust it. ``fn`` also may not change NumPy's floating-point
    error handling for the rest of the comparison.
    """
    saved = np.geterr()
    try:
        # Copies, so a callable that writes into its inputs cannot change what we compare.
        out = fn(*(a.copy() if isinstance(a, np.ndarray) else a for a in args))
    finally:
        np.seterr(**saved)
    names = ", ".join(name for name, _, _ in expected)
    try:
        values = tuple(out)
        if len(values) != len(expected):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"must return ({names}), got {type(out).__name__}") from None
    arrays = []
    for (name, shape, optional), a in zip(expected, values, strict=True):
        if a is None and optional:
            arrays.append(None)
            continue
        try:
            a = np.asarray(a)
        except Exception as exc:  # noqa: BLE001 - whatever it is, it is not an array
            raise ValueError(f"returned {name} that is not an array ({type(exc).__name__}: "
                             f"{exc})") from None
        if a.dtype.kind not in "biuf":
            raise ValueError(f"returned {name} of dtype {a.dtype}, expected real numbers")
        if a.shape != shape:
            raise ValueError(f"returned {name} of shape {a.shape}, expected {shape}")
        arrays.append(a if a.dtype.kind == "f" else a.astype(np.float64))
    return tuple(arrays)


def failure_text(exc: BaseException) -> str:
    """An ERROR row's text for what the other implementation raised (on one line)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"


def worst_text(name, ours, theirs) -> tuple[tuple, str]:
    """The index where ``|ours - theirs|`` is largest (NaN counts as largest), and the text
    naming it with both values."""
    diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
    diff = np.where(np.isnan(diff), np.inf, diff)
    idx = np.unravel_index(int(np.argmax(diff)), diff.shape)
    return idx, (f"worst at {name}[{', '.join(map(str, idx))}]: ours {ours[idx]:.6g}, "
                 f"theirs {theirs[idx]:.6g}")


def repeat_diff(theirs, again) -> float:
    """The largest difference between two calls' results (0 where their bits agree,
    NaNs in the same places included); None results are skipped."""
    return float(max([np.max(np.abs(a - b), initial=0.0)
                      if not np.array_equal(a, b, equal_nan=True) else 0.0
                      for a, b in zip(theirs, again, strict=True) if a is not None],
                     default=0.0))


def _where(name, ours, theirs, grid, U_shape, align_corners) -> str:
    """Where ``|ours - theirs|`` is largest: index, both values, the sampling point."""
    idx, text = worst_text(name, ours, theirs)
    if len(U_shape) == 5:
        return text + _where_in_volume(name, idx, grid, U_shape, align_corners)
    H, W = U_shape[2:]
    if name == "dU":
        return text + f", pixel (x={idx[3]}, y={idx[2]})"
    n, i, j = (idx[0], idx[1], idx[2]) if name == "dgrid" else (idx[0], idx[2], idx[3])
    x = pixel_coordinates(grid[n, i, j, 0], W, align_corners)[0]
    y = pixel_coordinates(grid[n, i, j, 1], H, align_corners)[0]
    return text + f", sampling point at pixel (x={x:.6g}, y={y:.6g}) of a {H}x{W} image"


def _where_in_volume(name, idx, grid, U_shape, align_corners) -> str:
    """:func:`_where`'s location for a volume: the voxel, or the sampling point in voxels."""
    D, H, W = U_shape[2:]
    if name == "dU":
        return f", voxel (x={idx[4]}, y={idx[3]}, z={idx[2]})"
    point = (idx[0], *idx[1:4]) if name == "dgrid" else (idx[0], *idx[2:5])
    x, y, z = (pixel_coordinates(grid[point + (a,)], size, align_corners)[0]
               for a, size in enumerate((W, H, D)))
    return (f", sampling point at voxel (x={x:.6g}, y={y:.6g}, z={z:.6g}) of a {D}x{H}x{W} "
            f"volume")


def _adjoint(U, V, dU, dV) -> tuple[float, str]:
    """The dot-product test's error and its explanation: ``<V, dV>`` against ``<U, dU>``."""
    lhs = np.sum(V.astype(np.float64) * dV)
    rhs = np.sum(U.astype(np.float64) * dU)
    scale = np.sum(np.abs(V * dV)) + np.sum(np.abs(U * dU))
    return (float(abs(lhs - rhs) / max(1e-8, scale)),
            f"<V, dV> = {lhs:.6g} but <U, dU> = {rhs:.6g}: dU is not S^T dV for the S of V")


def compare_sampler(other, U, grid, dV, mode, padding_mode, align_corners, *,
                    tol: float, repeat: bool = True, reference=None) -> ParityResult:
    """One row: ``other`` beside this package on these inputs.

    ``other(U, grid, dV, mode, padding_mode, align_corners) -> (V, dU, dgrid)`` on NumPy
    arrays (dU and dgrid the gradients of ``sum(V * dV)``, or None when it has no
    backward). If it raises :class:`Unsupported` the row is N/A; any other exception,
    or a result of the wrong shape, makes the row an ERROR carrying the message. With
    ``repeat`` it is called a second time and the two results compared bit for bit.
    ``reference`` (same interface) replaces this package, e.g. by stored golden outputs.
    """
    row = {"mode": mode, "padding_mode": padding_mode, "align_corners": align_corners,
           "tol": tol}
    try:
        theirs = _call(other, U, grid, dV, mode, padding_mode, align_corners)
        again = _call(other, U, grid, dV, mode, padding_mode, align_corners) if repeat else None
    except Unsupported as exc:
        return ParityResult(**row, unsupported=str(exc))
    # The other implementation's failure is the row's, a sys.exit() in it included.
    except (Exception, SystemExit) as exc:  # noqa: BLE001
        return ParityResult(**row, failure=failure_text(exc))
    ours = (reference or numpy_impl)(U, grid, dV, mode, padding_mode, align_corners)
    errs, where = {}, {}
    for name, a, b in zip(SAMPLER_OUTPUTS, ours, theirs, strict=True):
        if b is None:
            continue
        errs[f"err_{name}"] = err = rel_error(a, b)
        if not err <= tol:
            where[name] = _where(name, a, b, grid, U.shape, align_corners)
    if theirs[1] is not None:
        errs["err_adjoint"], text = _adjoint(U, theirs[0], theirs[1], dV)
        if not errs["err_adjoint"] <= tol:
            where["adjoint"] = text
    if again is not None:
        errs["repeat_diff"] = repeat_diff(theirs, again)
    return ParityResult(**row, **errs, where=where)


# --------------------------------------------------------------------------------------
# The parity matrix
# --------------------------------------------------------------------------------------


def parity_matrix(other=None, *, dtype=np.float64, seed: int = 0, shape=(2, 3, 5, 6),
                  out_hw=(7, 8), tol: float | None = None,
                  repeat: bool = True) -> list[ParityResult]:
    """Compare this package with ``other`` on all 18 sampler combinations (+ affine_grid).

    Parameters
    ----------
    other : None, str or callable
        None or ``"torch"``: PyTorch's ``F.grid_sample`` and ``F.affine_grid`` on the CPU,
        gradients by autograd (raises :class:`TorchNotInstalledError` without torch).
        Another library name of :data:`stn_numpy.verify.adapters.ADAPTERS` (``"scipy"``,
        ``"jax"``, ``"opencv"``, ``"skimage"``, ``"onnxruntime"``, ``"onnx-reference"``):
        its adapter. A callable
        ``other(U, grid, dV, mode, padding_mode, align_corners) -> (V, dU, dgrid)`` on
        NumPy arrays, dU and dgrid being the gradients of ``sum(V * dV)`` (or None);
        affine rows are run for torch only.
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
    repeat : bool
        Call ``other`` twice per case and require bit-identical results.

    Returns
    -------
    list of ParityResult
        18 sampler rows in the order ``MODES`` x ``PADDING_MODES`` x (True, False), then,
        for torch, one affine_grid row per align_corners.
    """
    return matrix_rows(
        other, dtype, tol, repeat, COMBOS,
        lambda case, align_corners, dtype: sampler_inputs(seed, case, shape, out_hw,
                                                          align_corners, dtype),
        lambda case, dtype: affine_inputs(seed, case, shape, out_hw, dtype))


def matrix_rows(other, dtype, tol, repeat, combos, sampler_case, affine_case,
                key=None) -> list[ParityResult]:
    """The rows of a parity matrix, for images (:func:`parity_matrix`) or volumes.

    One :func:`compare_sampler` row per ``(mode, padding_mode, align_corners)`` of
    ``combos`` on ``sampler_case(case, align_corners, dtype) -> (U, grid, dV)``, then, where
    ``other`` has an affine grid (torch), one affine_grid row per align_corners on
    ``affine_case(case, dtype) -> (theta, size, dgrid)``; ``case`` counts the rows.
    ``key(mode, padding_mode, align_corners)``, if given, names each row (the affine rows
    with mode ``"affine_grid"``).
    """
    sampler, affine = resolve(other, "torch")
    dtype = np.dtype(dtype)
    tol = default_tol(dtype) if tol is None else float(tol)
    results = []
    for case, (mode, padding_mode, align_corners) in enumerate(combos):
        U, grid, dV = sampler_case(case, align_corners, dtype)
        row = compare_sampler(sampler, U, grid, dV, mode, padding_mode, align_corners,
                              tol=tol, repeat=repeat)
        results.append(row if key is None
                       else dataclasses.replace(row, key=key(mode, padding_mode,
                                                             align_corners)))
    if affine is not None:
        for i, align_corners in enumerate((True, False)):
            theta, size, dgrid = affine_case(len(combos) + i, dtype)
            ours = numpy_affine(theta, size, dgrid, align_corners)
            theirs = affine(theta, size, dgrid, align_corners)
            results.append(ParityResult(
                op="affine_grid", mode=None, padding_mode=None, align_corners=align_corners,
                err_grid=rel_error(ours[0], theirs[0]), err_dtheta=rel_error(ours[1], theirs[1]),
                tol=tol, key=None if key is None else key("affine_grid", None, align_corners)))
    return results


def resolve(other, default):
    """``(sampler, affine or None)`` for ``other``: None, a library name, or a callable."""
    other = default if other is None else other
    if other == "torch":
        import_torch()
        return torch_impl, torch_affine
    if other == "numpy":
        return numpy_impl, numpy_affine
    if isinstance(other, str):
        if other in ADAPTERS:
            return load_adapter(other), None
    if callable(other):
        return other, None
    raise TypeError(f"other must be None, 'torch', one of {', '.join(ADAPTERS)}, or a "
                    f"callable, got {other!r}")
