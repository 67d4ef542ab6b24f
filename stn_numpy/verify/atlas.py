"""The conventions atlas: every installed library's sampler settings, measured against ours.

For each library setting (SciPy ``map_coordinates`` order x mode, JAX's, OpenCV
``remap`` interpolation x border, scikit-image ``warp`` order x mode) the forward output
is compared with this package's sampler of the same kernel under the padding mode it
stands for, on the inputs of the parity matrix (points on pixel centres, half-pixel ties, the
border, the reflection lines, and random points inside and outside) with both
``align_corners`` conventions (the coordinate conversion of
:mod:`~stn_numpy.verify.adapters`), in float64 and in float32. A row names the setting of
ours it stands for, its errors, and where the differing points lie: on half-pixel ties, on
integer coordinates, outside the image (beyond the outermost pixel centres) or at generic
points inside; for JAX, whose sampler differentiates, the autodiff gradients are compared
too. The notes beside the measurements say why, from the library's source or
documentation (named in :mod:`~stn_numpy.verify.adapters`).

Libraries whose samplers take volumes (SciPy's and JAX's ``map_coordinates``) get a
second table measured the same way on 5-D inputs (:mod:`~stn_numpy.verify.volumes`: points
on the kinks of every axis), where the differing points are sorted by any of the three
coordinates.

``stn-numpy verify --atlas`` prints the table; ``stn-numpy verify --atlas docs/atlas.md``
replaces the text between the ``<!-- atlas:start -->`` and ``<!-- atlas:end -->`` lines
of that file (atomically). Errors print as ``0``, ``round-off`` (below 1e-12 in float64,
1e-5 in float32) or one significant digit, so the table is the same on every machine.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import numpy as np

from .._io import replace_marked
from ..gradcheck import rel_error
from ..onnx import GRID_SAMPLE_MODES
from ..sampling import MODES, PADDING_MODES
from . import adapters
from .common import Unsupported
from .parity import default_tol, numpy_impl, pixel_coordinates, sampler_inputs
from .volumes import volume_sampler_inputs

__all__ = ["AtlasRow", "LIBRARIES", "build_atlas", "measure", "write_atlas"]

START, END = "<!-- atlas:start -->", "<!-- atlas:end -->"
_SHAPE, _OUT_HW, _SEED = (2, 3, 5, 6), (7, 8), 0
_VOLUME_SHAPE, _VOLUME_OUT = (2, 2, 4, 5, 6), (5, 6, 7)
#: the libraries whose samplers take volumes, measured in 3-D too
VOLUME_LIBRARIES = ("scipy", "jax")
_ROUND_OFF = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}
_KERNELS = {0: "nearest", 1: "bilinear", 3: "bicubic"}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One library setting: its label, how to sample with it, and the note on it."""

    label: str
    sample: object  # (U, grid, align_corners) -> V
    mode: str  # our kernel it is compared with
    padding: tuple  # (padding_mode, align_corners or None for both) it stands for
    note: str = ""
    differentiable: bool = False


def _scipy():
    modes = {"grid-constant": "per tap, as zeros", "nearest": "edge pixel repeated",
             "mirror": "reflected about the edge pixel's centre",
             "reflect": "reflected about the outer edge",
             "constant": "cval for the whole point once it is outside [0, W - 1]: no "
                         "interpolation towards the fill"}
    out = []
    for order in (0, 1):
        for mode, note in modes.items():
            if order == 0:
                note += "; ties rounded up (floor(x + 1/2)), here half to even"
            out.append(Setting(f"order={order}, mode='{mode}'",
                               _bind(adapters.scipy_sample, order=order, mode=mode),
                               _KERNELS[order], _NDIMAGE_PADDING[mode], note))
    return out


def _jax():
    modes = {"constant": "each tap tested for being inside, cval otherwise (SciPy's "
                         "grid-constant)", "nearest": "tap index clipped",
             "mirror": "tap index folded about the edge pixel's centre",
             "reflect": "tap index folded about the outer edge"}
    out = []
    for order in (0, 1):
        for mode, note in modes.items():
            if order == 0:
                note += "; ties rounded half away from zero (lax.round), here half to even"
            else:
                note += ("; floor-based taps, so at an integer the right-hand derivative, "
                         "as here, but a clipped or folded tap index has no zero-gradient "
                         "zone at the clip limits")
            out.append(Setting(f"order={order}, mode='{mode}'",
                               _bind(_jax_forward, order=order, mode=mode), _KERNELS[order],
                               _NDIMAGE_PADDING[mode], note, differentiable=True))
    return out


def _jax_forward(U, grid, align_corners, *, order, mode):
    return adapters.jax_sample(align_corners, order=order, mode=mode)


def _opencv():
    quantised = ("measured: float32 images exact to round-off, float64 images with the map "
                 "fractions quantised to 1/32 pixel (INTER_TAB_SIZE)")
    interps = {"INTER_NEAREST": ("nearest", "ties to even, as here; integer tap index "
                                            "reflected"),
               "INTER_LINEAR": ("bilinear", quantised),
               "INTER_CUBIC": ("bicubic", "Keys a = -0.75 as here; " + quantised
                               + " (OpenCV 5.0's float64 bicubic was also wrong wherever a "
                                 "tap fell outside the image; 5.1's is not)")}
    borders = {"BORDER_CONSTANT": ("zeros", None), "BORDER_REPLICATE": ("border", None),
               "BORDER_REFLECT_101": ("reflection", True),
               "BORDER_REFLECT": ("reflection", False)}
    return [Setting(f"{interp}, {border}",
                    _bind(adapters.opencv_sample, interpolation=interp, border=border),
                    mode, padding, note)
            for interp, (mode, note) in interps.items() for border, padding in borders.items()]


def _skimage():
    modes = {"constant": "SciPy grid-constant", "edge": "SciPy nearest",
             "symmetric": "SciPy reflect", "reflect": "SciPy mirror"}
    ndimage = {"constant": "grid-constant", "edge": "nearest", "symmetric": "reflect",
               "reflect": "mirror"}
    out = []
    for order in (0, 1, 3):
        for mode, note in modes.items():
            if order == 0:
                note += "; ties rounded up, here half to even"
            if order == 3:
                note += "; a cubic B-spline interpolant (prefiltered), not Keys' kernel"
            out.append(Setting(f"order={order}, mode='{mode}'",
                               _bind(adapters.skimage_sample, order=order, mode=mode),
                               _KERNELS[order], _NDIMAGE_PADDING[ndimage[mode]], note))
    return out


#: ONNX Runtime 1.32, onnxruntime/core/providers/cpu/tensor/grid_sample.cc
_ONNXRUNTIME_NOTES = {
    "nearest": "std::nearbyint: ties to even, as here",
    "bilinear": "each of the 4 tap indices zeroed outside (zeros), clamped (border) or "
                "reflected (GsReflect) when it is read, which gives the values of clipping "
                "or reflecting the point, as here",
    "bicubic": "each of the 16 tap indices bounded (clamped, reflected or zero) and the "
               "point itself left unclamped, as here and in PyTorch",
}
#: onnx 1.23, onnx/reference/ops/op_grid_sample.py
_ONNX_REFERENCE_NOTES = {
    "nearest": "np.rint: ties to even, as here; rounded pixel coordinates are exact in float32",
    "bilinear": "pixel coordinates stored in a float32 array (_gs_denormalize_coordinates), "
                "so float64 input agrees to float32 round-off only",
    "bicubic": "pixel coordinates in float32, as for linear",
}
#: Both round the point to the nearest pixel first and reflect the integer after, where
#: PyTorch reflects the point and rounds the reflection: measured on the golden file's
#: nearest_ties case, which the parity inputs here do not hold.
_ONNX_NEAREST_REFLECTION = (
    "; rounds the point first and reflects the pixel index after (PyTorch reflects, then "
    "rounds): with align_corners=False a half-pixel tie outside the image lands on the "
    "other neighbour (golden edge case nearest_ties)")
_ONNX_REFERENCE_REFLECTION = (
    "; an axis of one pixel with align_corners=True raises OverflowError (_gs_reflect "
    "divides by the axis' extent, 0 there)")
_ONNX_REFERENCE_BORDER_CUBIC = (
    "; border: a point beyond the border lines (the outer pixel centres with "
    "align_corners=True, edges with False) is first clamped into [0, W - 1], and its 16 taps "
    "taken there; PyTorch and this package bound each tap of the unclamped point, so the "
    "two differ at such points only")


def _onnx(runtime: str, notes: dict):
    out = []
    for opset in (20, 16):
        names = GRID_SAMPLE_MODES[opset]
        for mode in MODES:
            if opset == 16 and names[mode] == GRID_SAMPLE_MODES[20][mode]:
                continue  # the same graph as opset 20's
            for padding in PADDING_MODES:
                note = notes[mode]
                if mode == "nearest" and padding == "reflection":
                    note += _ONNX_NEAREST_REFLECTION
                if runtime == "onnx-reference" and padding == "reflection" and mode != "nearest":
                    note += _ONNX_REFERENCE_REFLECTION
                if runtime == "onnx-reference" and mode == "bicubic" and padding == "border":
                    note += _ONNX_REFERENCE_BORDER_CUBIC
                out.append(Setting(
                    f"opset {opset}, mode='{names[mode]}', padding_mode='{padding}'",
                    _bind(adapters.onnx_sample, runtime=runtime, mode=mode,
                          padding_mode=padding, opset=opset),
                    mode, (padding, None), note))
    return out


def _onnxruntime():
    return _onnx("onnxruntime", _ONNXRUNTIME_NOTES)


def _onnx_reference():
    return _onnx("onnx-reference", _ONNX_REFERENCE_NOTES)


#: ndimage-style boundary mode -> the padding (and align_corners) it stands for here
_NDIMAGE_PADDING = {"grid-constant": ("zeros", None), "constant": ("zeros", None),
                    "nearest": ("border", None), "mirror": ("reflection", True),
                    "reflect": ("reflection", False)}


def _bind(fn, **kwargs):
    return lambda U, grid, align_corners: fn(U, grid, align_corners, **kwargs)


#: library -> (what it is, module to import, settings factory)
LIBRARIES = {
    "scipy": ("SciPy `ndimage.map_coordinates`", "scipy.ndimage", _scipy),
    "jax": ("JAX `scipy.ndimage.map_coordinates`", "jax", _jax),
    "opencv": ("OpenCV `remap`, float32 maps", "cv2", _opencv),
    "skimage": ("scikit-image `transform.warp`", "skimage.transform", _skimage),
    "onnxruntime": ("ONNX Runtime `GridSample`, CPU", "onnxruntime", _onnxruntime),
    "onnx-reference": ("ONNX's reference evaluator `GridSample`", "onnx.reference",
                       _onnx_reference),
}


@dataclasses.dataclass(frozen=True)
class AtlasRow:
    """One library setting measured against the padding mode of ours it stands for."""

    library: str
    setting: str
    mode: str
    padding_mode: str
    align_corners: bool | None  # None: the same for both
    err64: float
    err32: float
    err_grad: float | None
    where: str
    note: str
    exact: bool
    refused: dict = dataclasses.field(default_factory=dict)  # dtype name -> why not run


def _classify(ours, theirs, grid, shape, align_corners, dtype) -> tuple[int, dict[str, int]]:
    """How many output points differ beyond round-off, by kind of sampling point."""
    diff = np.abs(ours.astype(np.float64) - theirs)
    scale = max(1e-8, float(np.max(np.abs(ours) + np.abs(theirs))))
    bad = (diff / scale > _ROUND_OFF[np.dtype(dtype)]).any(axis=1)  # (N, Ho, Wo)
    # Pixel coordinates x, y (and z for volumes) with the size of their axis.
    axes = [(pixel_coordinates(grid[..., a], size, align_corners)[0].astype(np.float64), size)
            for a, size in enumerate(reversed(shape[2:]))]

    def anywhere(test):
        return np.logical_or.reduce([test(c, size) for c, size in axes])

    kinds = {
        "half-pixel ties": anywhere(lambda c, size: c % 1 == 0.5),
        "outside": anywhere(lambda c, size: (c < 0) | (c > size - 1)),
        "on integers": anywhere(lambda c, size: c % 1 == 0),
    }
    counts, left = {}, bad.copy()
    for name, mask in kinds.items():
        counts[name] = int((left & mask).sum())
        left &= ~mask
    counts["inside"] = int(left.sum())
    return int(bad.sum()), counts


def _where(total: int, bad: int, counts: dict[str, int]) -> str:
    if bad == 0:
        return "nowhere"
    parts = [f"{name} {n}" for name, n in counts.items() if n]
    return f"{bad}/{total} points: " + ", ".join(parts)


def measure(library: str, volumes: bool = False) -> list[AtlasRow]:
    """Measure every setting of ``library`` (a key of :data:`LIBRARIES`).

    Each setting is compared with our kernel under the padding mode it stands for (see
    the adapters' tables), with both align_corners conventions unless it stands for one
    only (the reflections); errors are the worst of those. ``volumes``: on 5-D inputs
    (for a library of :data:`VOLUME_LIBRARIES`).
    """
    _, module, settings = LIBRARIES[library]
    importlib.import_module(module)

    def inputs(align_corners, dtype):
        if volumes:
            return volume_sampler_inputs(_SEED, int(align_corners), _VOLUME_SHAPE,
                                         _VOLUME_OUT, align_corners, dtype)
        return sampler_inputs(_SEED, int(align_corners), _SHAPE, _OUT_HW, align_corners,
                              dtype)

    rows = []
    for setting in settings():
        padding, only = setting.padding
        err = {np.dtype(np.float64): 0.0, np.dtype(np.float32): 0.0}
        refused = {}
        err_grad, total, bad, counts, grad_bad, grad_counts = None, 0, 0, {}, 0, {}
        for align_corners in (True, False) if only is None else (only,):
            for dtype in (np.float64, np.float32):
                U, grid, dV = inputs(align_corners, dtype)
                try:
                    theirs = _run(setting, U, grid, dV, align_corners)
                except Unsupported as exc:  # the library refuses this setting or dtype
                    refused[np.dtype(dtype).name] = str(exc)
                    continue
                ours = numpy_impl(U, grid, dV, setting.mode, padding, align_corners)
                err[np.dtype(dtype)] = max(err[np.dtype(dtype)], rel_error(ours[0], theirs[0]))
                if dtype is np.float32:
                    continue
                if setting.differentiable:
                    err_grad = max(err_grad or 0.0, rel_error(ours[1], theirs[1]),
                                   rel_error(ours[2], theirs[2]))
                    n_bad, kinds = _classify(np.moveaxis(ours[2], -1, 1),
                                             np.moveaxis(theirs[2], -1, 1), grid, U.shape,
                                             align_corners, dtype)
                    grad_bad += n_bad
                    for k, n in kinds.items():
                        grad_counts[k] = grad_counts.get(k, 0) + n
                n_bad, kinds = _classify(ours[0], theirs[0], grid, U.shape, align_corners,
                                         dtype)
                total, bad = total + ours[0][:, 0].size, bad + n_bad
                for k, n in kinds.items():
                    counts[k] = counts.get(k, 0) + n
        e64, e32 = (None if np.dtype(t).name in refused else err[np.dtype(t)]
                    for t in (np.float64, np.float32))
        where = "V: " + _where(total, bad, counts)
        if "float64" in refused:
            where = f"V: not run ({refused['float64']})"
        if setting.differentiable:
            where += "; dgrid: " + _where(total, grad_bad, grad_counts)
        rows.append(AtlasRow(
            library, setting.label, setting.mode, padding, only, e64, e32, err_grad,
            where, setting.note,
            exact=not refused and e64 <= default_tol(np.float64)
            and e32 <= default_tol(np.float32)
            and (err_grad is None or err_grad <= default_tol(np.float64)), refused=refused))
    return rows


def _run(setting, U, grid, dV, align_corners):
    if not setting.differentiable:
        return setting.sample(U, grid, align_corners), None, None
    return setting.sample(U, grid, align_corners)(U, grid, dV)


def _fmt(err: float | None, dtype) -> str:
    if err is None:
        return "-"
    if err == 0:
        return "0"
    if err < _ROUND_OFF[np.dtype(dtype)]:
        return "round-off"
    return f"{err:.0e}"


def build_atlas(libraries=None) -> str:
    """The atlas as markdown: one table per installed library, then one per library of
    :data:`VOLUME_LIBRARIES` measured on volumes, and which are missing."""
    lines, missing = [], []
    for name in libraries or LIBRARIES:
        try:
            lines += _table(name, measure(name))
        except ImportError:
            missing.append(name)
    for name in libraries or LIBRARIES:
        if name in VOLUME_LIBRARIES and name not in missing:
            lines += _table(name, measure(name, volumes=True), " on volumes (5-D)")
    if missing:
        lines.append("Not measured (not installed): " + ", ".join(missing) + ".")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _table(name: str, rows, suffix: str = "") -> list[str]:
    """The markdown lines of one library's table."""
    title, module, _ = LIBRARIES[name]
    lines = [f"**{title}**{suffix} ({name} {_version(module)})", "",
             "| setting | compared with, here | float64 | float32 | autodiff dU, dgrid "
             "| where it differs (float64) | why |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        match = f"`{r.mode}`, `{r.padding_mode}`"
        if r.align_corners is not None:
            match += f", align_corners={r.align_corners}"
        measured = [e <= default_tol(t) for e, t in ((r.err64, np.float64),
                                                     (r.err32, np.float32)) if e is not None]
        match += "" if r.exact or (r.refused and all(measured)) else " (differs)"
        e64, e32 = (_fmt(e, t) if t not in r.refused else "not run"
                    for e, t in ((r.err64, "float64"), (r.err32, "float32")))
        lines.append(f"| `{r.setting}` | {match} | {e64} | {e32} | "
                     f"{_fmt(r.err_grad, np.float64)} | {r.where} | {r.note} |")
    lines.append("")
    return lines


def _version(module: str) -> str:
    top = importlib.import_module(module.split(".")[0])
    return getattr(top, "__version__", "?")


def write_atlas(path, libraries=None) -> Path:
    """Replace the atlas section of the markdown file ``path`` (between the markers)."""
    return replace_marked(path, START, END, build_atlas(libraries))
