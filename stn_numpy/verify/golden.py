"""Golden test vectors: inputs and this package's outputs, for tests that cannot call Python.

File format
-----------
An uncompressed NumPy ``.npz`` archive: a zip file (entries stored, not deflated, so a
reader without zlib, e.g. cnpy, can open it) holding one ``.npy`` file per array, named
by its key plus ``.npy``, e.g. ``bilinear/zeros/align_corners=True/V.npy``. Arrays are
C-contiguous, little-endian, of the file's dtype (``float64`` or ``float32``) except the
int64 ``size`` arrays. :func:`export_golden` also writes the manifest as a plain JSON file
beside the archive (``golden.json`` for ``golden.npz``), for reading without NumPy.

The manifest (entry ``manifest``: a 1-D uint8 array holding UTF-8 JSON)::

    {"format": "stn-numpy-golden", "format_version": 3, "stn_numpy_version": ...,
     "numpy_version": ..., "scipy_version": ..., "dtype": "float64", "seed": 0,
     "tolerance": 1e-10, "tolerance_note": "how it was measured",
     "conventions": {...}, "cases": [...], "arrays": {key: {"shape": [...], "dtype": ...}}}

Each case names its ``kind``, its key prefix (``key``), its settings, and which of its
arrays are ``inputs`` and which ``outputs``; a checker feeds the inputs to the function
under test and compares each output with ``rel_error`` against ``tolerance``:

``grid_sample`` (settings ``mode``, ``padding_mode``, ``align_corners``)
    inputs ``U (N, C, H, W)``, ``grid (N, Ho, Wo, 2)``, ``dV (N, C, Ho, Wo)``; outputs
    ``V``, and ``dU``, ``dgrid``, the gradients of ``sum(V * dV)``. The 18 combinations on
    the inputs of the parity matrix (key ``{mode}/{padding_mode}/align_corners={..}``),
    then edge cases under ``edge/{name}/...``: ``height_1`` and ``width_1`` (a one-pixel
    axis), ``identity`` (the identity affine grid: every point on a pixel centre),
    ``far_reflection`` (pixel coordinates up to 1e6 outside, reflection padding),
    ``nearest_ties`` (exact half-pixel ties, nearest mode) and ``on_border`` (points
    exactly on 0 and W - 1, H - 1).
``grid_sample`` on volumes (the case has ``"dims": 3``)
    inputs ``U (N, C, D, H, W)``, ``grid (N, Do, Ho, Wo, 3)`` holding ``(x, y, z)`` (x
    along W, y along H, z along D), ``dV (N, C, Do, Ho, Wo)``; outputs as in 2-D. The 12
    trilinear (``bilinear``) and nearest combinations on the inputs of the 3-D parity
    matrix (key ``3d/{mode}/{padding_mode}/align_corners={..}``), and under
    ``3d/edge/identity/...`` the identity affine grid (every point on a voxel centre).
``affine_grid``, ``attention_grid``, ``projective_grid``, ``tps_grid``
    Settings ``align_corners`` (and ``lattice`` for TPS); inputs ``theta``, ``size (4,)
    int64`` = ``(N, C, Ho, Wo)``, ``dgrid``; outputs ``grid`` and ``dtheta``, the gradient
    of ``sum(grid * dgrid)``. theta is ``(N, 2, 3)``, ``(N, 3)`` = (s, t_x, t_y), ``(N,
    8)`` (h_33 = 1) and ``(N, K, 2)``. The volume
    ``affine_grid`` cases (``"dims": 3``, key ``3d/affine_grid/align_corners={..}``) have
    theta ``(N, 3, 4)``, ``size (5,)`` = ``(N, C, Do, Ho, Wo)`` and grid ``(N, Do, Ho, Wo, 3)``.
``grid_sample_double_backward`` (settings as ``grid_sample``)
    The second order: inputs ``U``, ``grid``, ``dV`` and the upstream gradients ``ddU
    (N, C, H, W)`` and ``ddgrid (N, Ho, Wo, 2)`` of the backward's ``dU`` and ``dgrid``;
    outputs ``d_dV``, ``d_U``, ``d_grid``, the gradients of ``<ddU, dU> + <ddgrid, dgrid>``
    with respect to ``dV``, ``U`` and ``grid`` (see
    :func:`stn_numpy.grid_sample_double_backward`). The 18 combinations, key
    ``second_order/{mode}/{padding_mode}/align_corners={..}``, on the inputs of the
    first-order cases (kinks included); then the 12 volume combinations (``"dims": 3``,
    key ``second_order/3d/...``, 5-D arrays) on the inputs of the first-order volume
    cases; listed after every other case. Files written before these cases existed hold
    none and check as before.
``spatial_transformer``
    A whole layer: ``theta = W2 relu(W1 flatten(U) + b1) + b2`` reshaped to
    ``(N, 2, 3)``, ``V = grid_sample(U, affine_grid(theta, U.shape))`` (bilinear, zeros,
    align_corners=False), loss ``sum(V * dV)``. Inputs ``U``, ``dV`` and the parameters
    ``localization.1.weight (8, C*H*W)``, ``localization.1.bias``,
    ``localization.3.weight (6, 8)``, ``localization.3.bias`` (Linear layers as
    ``torch.nn.Linear``: ``x W^T + b``); outputs ``V``, ``theta``, ``loss`` (a 0-d
    array), ``dU`` (both paths: sampler and localisation net) and ``d`` + each parameter's
    name.

:func:`load_golden` checks a file field by field (the manifest's fields, then each
array's ``.npy`` header: dtype, shape and declared size, before anything large is read;
then that inputs are finite) and raises :class:`GoldenFormatError`, a ``ValueError``
naming the file and the field, for anything else. Files of format version 2 (before the
volume cases) are read and checked as they are.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import numbers
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .._checks import check_int_pair
from .._io import (
    atomic_write_all,
    check_destination,
    check_writable,
    folder_lock,
    open_regular,
    read_npy_header,
    remove_stale_temporaries,
)
from ..gradcheck import rel_error
from ..grids import (
    MAX_TPS_POINTS,
    affine_grid,
    affine_grid_backward,
    attention_grid,
    attention_grid_backward,
    projective_grid,
    projective_grid_backward,
    tps_grid,
    tps_grid_backward,
    tps_lattice,
)
from .parity import (
    COMBOS,
    ParityResult,
    affine_inputs,
    compare_sampler,
    default_tol,
    make_grid,
    normalize,
    numpy_impl,
    resolve,
    sampler_inputs,
    sampler_key,
    special_coords,
)
from .second_order import (
    SECOND_ORDER_OUTPUTS,
    compare_double_backward,
    numpy_double_backward,
    resolve_double_backward,
    second_order_inputs,
    second_order_key,
)
from .volumes import COMBOS_3D, volume_affine_inputs, volume_key, volume_sampler_inputs

__all__ = ["GoldenFormatError", "check_against_golden", "export_golden", "load_golden"]

GOLDEN_FORMAT = "stn-numpy-golden"
GOLDEN_FORMAT_VERSION = 3
#: Versions this reader checks: 2 has no volume cases, and is otherwise the same.
_READABLE_VERSIONS = (2, 3)
#: Refuse to read an archive declaring more than this (a golden file is about 1 MB).
MAX_BYTES = 1 << 30
#: A grid case's channel count is not in its arrays (grids have none), so it is bounded.
MAX_CHANNELS = 1 << 20

_TOLERANCE_NOTE = (
    "rel_error(a, b) = max|a - b| / max(1e-8, max(|a| + |b|)) per array. 1e-10 (float64): "
    "against torch 2.13.0 CPU (DEFAULT, AVX2 and AVX512 kernels) the worst error of the 18 "
    "sampler and 2 affine cases is 7e-16, below 2e-15 over seeds 0-9 and eight shapes; a "
    "convention mismatch shows as 0.1 or more. 1e-5 (float32): measured 5e-7 worst, below "
    "9e-7 over the same seeds, shapes and kernels; the margin leaves room for other "
    "summation orders (atomics on a GPU). A port that rounds (x_s + 1) * W / 2 - 1/2 with "
    "a fused multiply-add sees the same side of every kink: the special points are chosen "
    "so (see stn_numpy.verify.make_grid). Volumes (3d/ cases): the worst float64 error "
    "against torch 2.13.0 CPU is below 1e-15 (stn_numpy.verify.parity_matrix_3d).")

CONVENTIONS = {
    "layout": "U, V: (N, C, H, W); grid: (N, H_out, W_out, 2) with [..., 0] = x (width), "
    "[..., 1] = y (height); theta: (N, 2, 3)",
    "normalized_coordinates": "-1 and +1 are the centres of the corner pixels with "
    "align_corners=True and their outer edges with align_corners=False",
    "unnormalize": "x = (x_s + 1) * (W - 1) / 2 (align_corners=True), "
    "x = (x_s + 1) * W / 2 - 0.5 (align_corners=False), rounded after the multiply and "
    "after the subtraction",
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
    "attention_grid": "x_s = s x_t + t_x, y_s = s y_t + t_y",
    "projective_grid": "(x_s, y_s) = (h11 x + h12 y + h13, h21 x + h22 y + h23) / "
    "(h31 x + h32 y + 1), theta = (h11, h12, h13, h21, h22, h23, h31, h32)",
    "tps_grid": "theta (N, K, 2) are the source positions of K control points on a regular "
    "lattice over [-1, 1]^2 (rows x cols, row-major); the thin-plate spline interpolating "
    "them, with radial basis r^2 log r^2",
    "comparison": "rel_error(a, b) = max|a - b| / max(1e-8, max(|a| + |b|)) per array",
    "volumes": "U, V: (N, C, D, H, W); grid: (N, D_out, H_out, W_out, 3) with [..., 0] = x "
    "(width), [..., 1] = y (height), [..., 2] = z (depth): the reverse of the tensor's axis "
    "order; theta: (N, 3, 4); every convention above applies along each axis",
    "trilinear": "mode 'bilinear' on volumes: the 8 voxels around the point, each weighted "
    "by a product of three hat functions; bicubic is not defined for volumes",
}

_GRID_TRANSFORMS = {
    "affine_grid": (affine_grid, affine_grid_backward),
    "attention_grid": (attention_grid, attention_grid_backward),
    "projective_grid": (projective_grid, projective_grid_backward),
    "tps_grid": (tps_grid, tps_grid_backward),
}
_SAMPLER_IO = (("U", "grid", "dV"), ("V", "dU", "dgrid"))
_SECOND_ORDER_IO = (("U", "grid", "dV", "ddU", "ddgrid"), SECOND_ORDER_OUTPUTS)
_SECOND_ORDER = "grid_sample_double_backward"
_GRID_IO = (("theta", "size", "dgrid"), ("grid", "dtheta"))
_STN_PARAMS = ("localization.1.weight", "localization.1.bias", "localization.3.weight",
               "localization.3.bias")
_STN_IO = (("U", "dV") + _STN_PARAMS,
           ("V", "theta", "loss", "dU") + tuple("d" + p for p in _STN_PARAMS))
_TPS_LATTICE = (3, 3)


class GoldenFormatError(ValueError):
    """A golden-vector file is not in the format :func:`export_golden` writes."""


# --------------------------------------------------------------------------------------
# The cases and their inputs
# --------------------------------------------------------------------------------------


def _edge_grids(name, shape, out_hw, align_corners, rng, dtype):
    """``(U shape, grid)`` of the edge case ``name`` (see the module docstring)."""
    N, C, H, W = shape
    Ho, Wo = out_hw
    t = np.dtype(dtype).type
    if name == "height_1":
        shape = (N, C, 1, W)
        return shape, make_grid(N, Ho, Wo, 1, W, align_corners, rng=rng, dtype=dtype)
    if name == "width_1":
        shape = (N, C, H, 1)
        return shape, make_grid(N, Ho, Wo, H, 1, align_corners, rng=rng, dtype=dtype)
    if name == "identity":
        theta = np.tile(np.eye(2, 3, dtype=dtype), (N, 1, 1))
        return shape, affine_grid(theta, (N, C, H, W), align_corners)
    if name == "far_reflection":
        pixels = rng.uniform(-1e6, 1e6, size=(N, Ho, Wo, 2))
        pixels.reshape(-1, 2)[:4] = [[1e6, -1e6], [-1e6, 1e6], [2e5, 3.5], [-7.5, 2e5 + 0.5]]
    elif name == "nearest_ties":
        pixels = rng.integers(-2, max(H, W) + 2, size=(N, Ho, Wo, 2)) + 0.5
    else:  # on_border: x, y or both exactly on the first or last pixel centre
        size = (N, Ho, Wo)
        which = rng.integers(0, 3, size=size)
        x = np.where(which != 1, rng.choice([0.0, W - 1.0], size=size),
                     rng.uniform(-0.3, W - 0.7, size=size))
        y = np.where(which != 0, rng.choice([0.0, H - 1.0], size=size),
                     rng.uniform(-0.3, H - 0.7, size=size))
        pixels = np.stack([x, y], axis=-1)
    grid = np.stack([normalize(pixels[..., 0], W, align_corners),
                     normalize(pixels[..., 1], H, align_corners)], axis=-1).astype(t)
    # Where a normalized float lands exactly on the pixel centre, use it (make_grid's way).
    for axis, size in enumerate((W, H)):
        for u, coord in special_coords(size, align_corners, np.dtype(dtype)).items():
            grid[..., axis][pixels[..., axis] == u] = coord
    return shape, grid


_EDGE_CASES = {
    "height_1": COMBOS, "width_1": COMBOS, "identity": COMBOS,
    "far_reflection": [c for c in COMBOS if c[1] == "reflection"],
    "nearest_ties": [c for c in COMBOS if c[0] == "nearest"],
    "on_border": COMBOS,
}


def _sampler_case(key, mode, padding_mode, align_corners):
    return {"key": key, "kind": "grid_sample", "mode": mode, "padding_mode": padding_mode,
            "align_corners": align_corners, "inputs": list(_SAMPLER_IO[0]),
            "outputs": list(_SAMPLER_IO[1])}


def _build_cases(seed, dtype, shape, out_hw) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Every case of a golden file and its input arrays."""
    cases, arrays = [], {}

    def add_sampler(key, combo, U, grid, dV):
        cases.append(_sampler_case(key, *combo))
        arrays.update({f"{key}/U": U, f"{key}/grid": grid, f"{key}/dV": dV})

    for case, combo in enumerate(COMBOS):
        add_sampler(sampler_key(*combo), combo,
                    *sampler_inputs(seed, case, shape, out_hw, combo[2], dtype))
    case = len(COMBOS)
    for name, combos in _EDGE_CASES.items():
        for combo in combos:
            rng = np.random.default_rng([seed, case])
            case += 1
            U_shape, grid = _edge_grids(name, shape, out_hw, combo[2], rng, dtype)
            U = rng.standard_normal(U_shape).astype(dtype)
            dV = rng.standard_normal(U_shape[:2] + grid.shape[1:3]).astype(dtype)
            add_sampler(f"edge/{name}/{sampler_key(*combo)}", combo, U, grid, dV)
    N, C = shape[:2]
    for kind in _GRID_TRANSFORMS:
        for align_corners in (True, False):
            theta, size, dgrid = affine_inputs(seed, case, shape, out_hw, dtype)
            rng = np.random.default_rng([seed, case])
            case += 1
            if kind == "attention_grid":
                theta = np.array([0.8, 0.1, -0.2]) + 0.2 * rng.standard_normal((N, 3))
            elif kind == "projective_grid":
                theta = (np.array([1.0, 0, 0, 0, 1, 0, 0, 0])
                         + np.r_[[0.2] * 6, [0.1] * 2] * rng.standard_normal((N, 8)))
            elif kind == "tps_grid":
                theta = tps_lattice(_TPS_LATTICE) + 0.1 * rng.standard_normal(
                    (N, _TPS_LATTICE[0] * _TPS_LATTICE[1], 2))
            key = f"{kind}/align_corners={align_corners}"
            entry = {"key": key, "kind": kind, "align_corners": align_corners,
                     "inputs": list(_GRID_IO[0]), "outputs": list(_GRID_IO[1])}
            if kind == "tps_grid":
                entry["lattice"] = list(_TPS_LATTICE)
            cases.append(entry)
            arrays.update({f"{key}/theta": theta.astype(dtype), f"{key}/size": size,
                           f"{key}/dgrid": dgrid})
    rng = np.random.default_rng([seed, case])
    C_, H, W = shape[1:]
    stn = {"U": rng.random(shape), "dV": rng.standard_normal(shape),
           "localization.1.weight": 0.05 * rng.standard_normal((8, C_ * H * W)),
           "localization.1.bias": 0.1 * rng.standard_normal(8),
           "localization.3.weight": 0.1 * rng.standard_normal((6, 8)),
           "localization.3.bias": np.array([1.0, 0, 0, 0, 1, 0]) + 0.1 * rng.standard_normal(6)}
    cases.append({"key": "spatial_transformer", "kind": "spatial_transformer",
                  "transform": "affine", "mode": "bilinear", "padding_mode": "zeros",
                  "align_corners": False, "inputs": list(_STN_IO[0]),
                  "outputs": list(_STN_IO[1])})
    arrays.update({f"spatial_transformer/{k}": v.astype(dtype) for k, v in stn.items()})
    _add_volume_cases(cases, arrays, seed, dtype)
    # Last, so that every case above keeps the inputs it had before these existed; the
    # volumes' after the images', so that those keep theirs too.
    second_order = ([(2, i, combo, shape, out_hw) for i, combo in enumerate(COMBOS)]
                    + [(3, i, combo, _VOLUME_SHAPE, _VOLUME_OUT)
                       for i, combo in enumerate(COMBOS_3D)])
    for dims, i, combo, U_shape, out in second_order:
        key = second_order_key(*combo, dims=dims)
        cases.append({**_sampler_case(key, *combo), "kind": _SECOND_ORDER,
                      **({"dims": 3} if dims == 3 else {}),
                      "inputs": list(_SECOND_ORDER_IO[0]), "outputs": list(_SECOND_ORDER_IO[1])})
        inputs = second_order_inputs(seed, i, U_shape, out, combo[2], dtype)
        arrays.update({f"{key}/{n}": a for n, a in zip(_SECOND_ORDER_IO[0], inputs,
                                                        strict=True)})
    return cases, arrays


_VOLUME_SHAPE, _VOLUME_OUT = (2, 2, 3, 4, 5), (4, 5, 6)


def _add_volume_cases(cases, arrays, seed, dtype) -> None:
    """The ``3d/`` cases (see the module docstring), after every 2-D case, on input
    streams of their own: a 2-D case's inputs are those of format version 2."""
    for case, combo in enumerate(COMBOS_3D):
        key = volume_key(*combo)
        U, grid, dV = volume_sampler_inputs(seed, case, _VOLUME_SHAPE, _VOLUME_OUT, combo[2],
                                            dtype)
        cases.append({**_sampler_case(key, *combo), "dims": 3})
        arrays.update({f"{key}/U": U, f"{key}/grid": grid, f"{key}/dV": dV})
        # The identity grid of the same U: every point on a voxel centre, a kink of each axis.
        key = "3d/edge/identity/" + key[len("3d/"):]
        N, C = _VOLUME_SHAPE[:2]
        grid = affine_grid(np.tile(np.eye(3, 4, dtype=dtype), (N, 1, 1)), _VOLUME_SHAPE,
                           combo[2])
        dV = np.random.default_rng([seed, 200 + case]).standard_normal(_VOLUME_SHAPE)
        cases.append({**_sampler_case(key, *combo), "dims": 3})
        arrays.update({f"{key}/U": U, f"{key}/grid": grid, f"{key}/dV": dV.astype(dtype)})
    for i, align_corners in enumerate((True, False)):
        theta, size, dgrid = volume_affine_inputs(seed, len(COMBOS_3D) + i, _VOLUME_SHAPE,
                                                  _VOLUME_OUT, dtype)
        key = volume_key("affine_grid", None, align_corners)
        cases.append({"key": key, "kind": "affine_grid", "dims": 3,
                      "align_corners": align_corners, "inputs": list(_GRID_IO[0]),
                      "outputs": list(_GRID_IO[1])})
        arrays.update({f"{key}/theta": theta, f"{key}/size": size, f"{key}/dgrid": dgrid})


def _spatial_transformer(U, dV, **params):
    """The golden STN layer's outputs (see the module docstring) for these parameters."""
    from ..layers import Flatten, Linear, ReLU, Sequential
    from ..transformer import SpatialTransformer

    N, C, H, W = U.shape
    loc = Sequential(Flatten(), Linear(C * H * W, 8, rng=0, dtype=U.dtype), ReLU(),
                     Linear(8, 6, rng=0, dtype=U.dtype))
    layer = SpatialTransformer(loc, "affine")
    for name, value in params.items():
        layer.params[name][...] = value
    V = layer.forward(U)
    dU = layer.backward(dV)
    out = {"V": V, "theta": layer.theta, "loss": np.array(np.sum(V * dV), dtype=U.dtype),
           "dU": dU}
    out.update({"d" + name: g for name, g in layer.grads.items()})
    return out


def _outputs(case: dict, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This package's outputs of one case."""
    kind = case["kind"]
    if kind == "grid_sample":
        args = case["mode"], case["padding_mode"], case["align_corners"]
        return dict(zip(_SAMPLER_IO[1], numpy_impl(inputs["U"], inputs["grid"], inputs["dV"],
                                                   *args), strict=True))
    if kind == "spatial_transformer":
        return _spatial_transformer(**inputs)
    if kind == _SECOND_ORDER:
        args = case["mode"], case["padding_mode"], case["align_corners"]
        return dict(zip(SECOND_ORDER_OUTPUTS, numpy_double_backward(
            *(inputs[n] for n in _SECOND_ORDER_IO[0]), *args), strict=True))
    forward, backward = _GRID_TRANSFORMS[kind]
    size = tuple(int(s) for s in inputs["size"])
    kwargs = {"align_corners": case["align_corners"]}
    if kind == "tps_grid":
        kwargs["lattice"] = tuple(case["lattice"])
    return {"grid": forward(inputs["theta"], size, **kwargs),
            "dtheta": backward(inputs["dgrid"], inputs["theta"], size, **kwargs)}


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def export_golden(path, *, seed: int = 0, dtype=np.float64, shape=(2, 3, 5, 6),
                  out_hw=(7, 8)) -> Path:
    """Write golden test vectors to ``path`` and the manifest as JSON beside it.

    Both destinations are checked first (a ``path`` ending in ``.json``, a folder or a
    device is refused), then both files are written to temporary files and only then
    moved into place with ``os.replace``, so a reader never sees a half-written file and
    a failed export changes neither file. The folder is locked
    (:func:`~stn_numpy._io.folder_lock`) while the temporaries of an earlier, killed
    export are removed and the pair is written.

    Parameters
    ----------
    path : str or Path
        Destination, conventionally ending in ``.npz`` (nothing is appended); the JSON
        manifest goes to ``path`` with the suffix ``.json``.
    seed, dtype, shape, out_hw
        As in :func:`~stn_numpy.verify.parity_matrix`; the 18 main sampler cases have the
        same inputs as its rows.

    Returns
    -------
    Path
        ``path``.
    """
    import scipy

    from .. import __version__

    path, json_path = _export_paths(path)
    dtype = np.dtype(dtype)
    tol = default_tol(dtype)
    cases, arrays = _build_cases(seed, dtype, tuple(shape), tuple(out_hw))
    for case in cases:
        inputs = {name: arrays[f"{case['key']}/{name}"] for name in case["inputs"]}
        for name, a in _outputs(case, inputs).items():
            arrays[f"{case['key']}/{name}"] = a
    arrays = {k: np.array(v, order="C") for k, v in arrays.items()}
    manifest = {
        "format": GOLDEN_FORMAT,
        "format_version": GOLDEN_FORMAT_VERSION,
        "stn_numpy_version": __version__,
        "numpy_version": np.__version__,
        "scipy_version": scipy.__version__,
        "dtype": dtype.name,
        "seed": int(seed),
        "tolerance": tol,
        "tolerance_note": _TOLERANCE_NOTE,
        "conventions": CONVENTIONS,
        "cases": cases,
        "arrays": {k: {"shape": list(a.shape), "dtype": a.dtype.name} for k, a in arrays.items()},
    }
    text = json.dumps(manifest, indent=1)
    arrays["manifest"] = np.frombuffer(text.encode(), dtype=np.uint8)
    with folder_lock(path.parent):
        # What a killed export left; no other export into this folder is under way.
        remove_stale_temporaries(path.parent, (path.name, json_path.name))
        atomic_write_all([(path, lambda f: np.savez(f, **arrays)),
                          (json_path, lambda f: f.write(text.encode() + b"\n"))])
    return path


def _export_paths(path) -> tuple[Path, Path]:
    """``(path, its .json manifest)``, both checked before anything is computed."""
    path = check_destination(path)
    if path.name in ("", ".", ".."):
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
    json_path = path.with_suffix(".json")
    if json_path == path:
        raise ValueError(f"{path}: the vectors cannot go to a .json file, where their JSON "
                         f"manifest goes; name it {path.with_suffix('.npz')}")
    check_writable(path)
    check_writable(json_path)
    return path, json_path


# --------------------------------------------------------------------------------------
# Reading, field by field
# --------------------------------------------------------------------------------------


def _fail(path, field, message):
    raise GoldenFormatError(f"{path}: {field}: {message}")


def _read_header(z: zipfile.ZipFile, member: str, path):
    """``(shape, dtype)`` from a member's ``.npy`` header, its declared size checked."""
    try:
        shape, fortran, dtype = read_npy_header(z, z.getinfo(member))
    except ValueError as exc:
        _fail(path, member, str(exc))
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_BYTES:
        _fail(path, member, f"header declares {nbytes} bytes, more than {MAX_BYTES}")
    if fortran:
        _fail(path, member, "is Fortran-ordered, expected C order")
    return tuple(shape), dtype


def _check_manifest(path, manifest):
    if not isinstance(manifest, dict):
        _fail(path, "manifest", "is not a JSON object")
    if manifest.get("format") != GOLDEN_FORMAT:
        _fail(path, "format", f"is {manifest.get('format')!r}, expected {GOLDEN_FORMAT!r}")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in _READABLE_VERSIONS:
        _fail(path, "format_version", f"is {version!r}, this reader knows "
              + " and ".join(str(v) for v in _READABLE_VERSIONS))
    if manifest.get("dtype") not in ("float32", "float64"):
        _fail(path, "dtype", f"is {manifest.get('dtype')!r}, expected float32 or float64")
    tol = manifest.get("tolerance")
    if (isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not math.isfinite(tol)
            or tol <= 0):
        _fail(path, "tolerance", f"must be a finite number > 0, got {tol!r}")
    if not isinstance(manifest.get("cases"), list) or not manifest["cases"]:
        _fail(path, "cases", "must be a non-empty list")
    if not isinstance(manifest.get("arrays"), dict):
        _fail(path, "arrays", "must map every key to its shape and dtype")
    known = {"grid_sample", "spatial_transformer", _SECOND_ORDER, *_GRID_TRANSFORMS}
    for i, case in enumerate(manifest["cases"]):
        if not isinstance(case, dict) or case.get("kind") not in known or not isinstance(
                case.get("key"), str):
            _fail(path, f"cases[{i}]", "needs a 'key' and a 'kind' among " + ", ".join(known))
        io = {"grid_sample": _SAMPLER_IO, "spatial_transformer": _STN_IO,
              _SECOND_ORDER: _SECOND_ORDER_IO}.get(case["kind"], _GRID_IO)
        if case.get("inputs") != list(io[0]) or case.get("outputs") != list(io[1]):
            _fail(path, f"cases[{i}] ({case['key']})", f"inputs and outputs must be "
                  f"{list(io[0])} and {list(io[1])}")
        dims = case.get("dims", 2)
        if (isinstance(dims, bool) or dims not in (2, 3)
                or (dims == 3 and (version < 3 or case["kind"] not in (
                    "grid_sample", "affine_grid", _SECOND_ORDER)))):
            _fail(path, f"cases[{i}] ({case['key']})", f"dims must be 2, or 3 for a "
                  f"grid_sample, affine_grid or {_SECOND_ORDER} case of format version 3, "
                  f"got {dims!r}")
        settings = (case.get("mode"), case.get("padding_mode"), case.get("align_corners"))
        if case["kind"] in ("grid_sample", _SECOND_ORDER) and settings not in (
                COMBOS_3D if dims == 3 else COMBOS):
            _fail(path, f"cases[{i}] ({case['key']})", "unknown mode, padding_mode or "
                  "align_corners" + (" for a volume" if dims == 3 else ""))
        if not isinstance(case.get("align_corners"), bool):
            _fail(path, f"cases[{i}] ({case['key']})", f"align_corners must be true or false, "
                  f"got {case.get('align_corners')!r}")
        # The layer's settings are fixed (see the module docstring); a file claiming others
        # would be checked against outputs computed with these.
        layer = {"transform": "affine", "mode": "bilinear", "padding_mode": "zeros",
                 "align_corners": False}
        got = {k: case.get(k) for k in layer}
        if case["kind"] == "spatial_transformer" and got != layer:
            _fail(path, f"cases[{i}] ({case['key']})", f"settings {got}, expected {layer}")


def _check_shapes(path, case, shapes):
    """Shapes of one case's arrays agree with each other (sampler and grid cases)."""
    key = case["key"]

    def need(name, expected):
        if shapes[name] != tuple(expected):
            _fail(path, f"{key}/{name}", f"shape {shapes[name]}, expected {tuple(expected)}")

    rank = 5 if case.get("dims", 2) == 3 else 4  # of U and of the grid
    if case["kind"] in ("grid_sample", _SECOND_ORDER):
        U, grid = shapes["U"], shapes["grid"]
        if (len(U) != rank or len(grid) != rank or grid[-1] != rank - 2
                or grid[0] != U[0]):
            _fail(path, f"{key}/grid", f"shape {grid} does not fit U of shape {U}")
        need("dV", U[:2] + grid[1:-1])
        if case["kind"] == "grid_sample":
            need("V", U[:2] + grid[1:-1])
            need("dU", U)
            need("dgrid", grid)
        else:
            for name, like in (("ddU", U), ("ddgrid", grid), ("d_dV", U[:2] + grid[1:-1]),
                               ("d_U", U), ("d_grid", grid)):
                need(name, like)
    elif case["kind"] == "spatial_transformer":
        U = shapes["U"]
        if len(U) != 4:
            _fail(path, f"{key}/U", f"shape {U}, expected (N, C, H, W)")
        N, C, H, W = U
        for name in ("dV", "V", "dU"):
            need(name, U)
        need("theta", (N, 2, 3))
        need("loss", ())
        for name, expected in zip(_STN_PARAMS, ((8, C * H * W), (8,), (6, 8), (6,)),
                                  strict=True):
            need(name, expected)
            need("d" + name, expected)
    else:
        grid = shapes["grid"]
        if len(grid) != rank or grid[-1] != rank - 2:
            expected = ("(N, D_out, H_out, W_out, 3)" if rank == 5
                        else "(N, H_out, W_out, 2)")
            _fail(path, f"{key}/grid", f"shape {grid}, expected {expected}")
        N = grid[0]
        if case["kind"] == "tps_grid":
            try:
                rows, cols = check_int_pair("lattice", case.get("lattice"), 2)
                if rows * cols > MAX_TPS_POINTS:
                    raise ValueError(f"lattice must have at most {MAX_TPS_POINTS} points, got "
                                     f"{rows} x {cols}")
            except ValueError as exc:
                _fail(path, f"{key}: lattice", str(exc))
            theta = (N, rows * cols, 2)
        else:
            theta = {"affine_grid": (N, 2, 3) if rank == 4 else (N, 3, 4),
                     "attention_grid": (N, 3), "projective_grid": (N, 8)}[case["kind"]]
        need("theta", theta)
        need("size", (rank,))
        need("dgrid", grid)
        need("dtheta", theta)


def _check_sizes(path, case, arrays):
    """A grid case's ``size`` is the ``(N, C, [D_out,] H_out, W_out)`` its grid has.

    Read from the values, not the headers: a size that disagreed could make the forward
    allocate far more than the file holds.
    """
    key = case["key"]
    size, grid = arrays[f"{key}/size"], arrays[f"{key}/grid"]
    N, spatial = grid.shape[0], grid.shape[1:-1]
    if size[0] != N or not 1 <= size[1] <= MAX_CHANNELS or tuple(size[2:]) != spatial:
        expected = ", ".join(str(d) for d in (N, f"C in 1..{MAX_CHANNELS}", *spatial))
        _fail(path, f"{key}/size", f"is {size.tolist()}, expected [{expected}] "
              f"(the grid's shape)")


def load_golden(path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read and check a golden-vector file: ``(manifest, arrays)``.

    ``manifest`` is the parsed JSON; ``arrays`` maps every key of ``manifest["arrays"]``
    to its array. Raises :class:`GoldenFormatError` (a ``ValueError`` naming the file and
    the field) for a file of another format or version, a missing or mistyped field, an
    array whose dtype or shape differs from the manifest's or from its case's other
    arrays (a grid case's ``size`` values included), a header declaring more bytes than
    its entry holds, or a non-finite input;
    ``OSError`` if it cannot be read.
    """
    with open_regular(path) as f:
        try:
            return _load_golden(path, f)
        except (zipfile.BadZipFile, EOFError, RecursionError, zlib.error,
                NotImplementedError) as exc:  # a damaged or unsupported member
            raise GoldenFormatError(f"{path}: not a readable .npz file ({type(exc).__name__}"
                                    f": {exc})") from exc
        except OSError as exc:
            if exc.filename is not None:
                raise
            raise GoldenFormatError(f"{path}: not a readable .npz file ({exc})") from exc


def _load_golden(path, f):
    try:
        z = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise GoldenFormatError(f"{path}: not a readable .npz file ({exc})") from exc
    with z:
        names = set(z.namelist())
        if "manifest.npy" not in names:
            raise GoldenFormatError(f"{path}: no 'manifest' entry; not a stn-numpy golden file")
        shape, dtype = _read_header(z, "manifest.npy", path)
        if dtype != np.uint8 or len(shape) != 1:
            _fail(path, "manifest", f"must be 1-D uint8, got {dtype} of shape {shape}")
        try:
            with z.open("manifest.npy") as f:
                raw = np.lib.format.read_array(f, allow_pickle=False)
            manifest = json.loads(raw.tobytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as exc:
            raise GoldenFormatError(f"{path}: manifest is not UTF-8 JSON ({exc})") from exc
        _check_manifest(path, manifest)
        declared, shapes, total = manifest["arrays"], {}, 0
        for key in (f"{c['key']}/{n}" for c in manifest["cases"]
                    for n in c["inputs"] + c["outputs"]):
            if key not in declared:
                _fail(path, "arrays", f"no entry for {key!r}")
            if f"{key}.npy" not in names:
                _fail(path, key, "is in the manifest but has no array")
            shape, dtype = _read_header(z, f"{key}.npy", path)
            expected = "int64" if key.endswith("/size") else manifest["dtype"]
            if dtype != np.dtype(expected).newbyteorder("<"):
                _fail(path, key, f"dtype {dtype}, expected {expected}")
            entry = declared[key]
            if not isinstance(entry, dict) or entry.get("shape") != list(shape):
                _fail(path, key, f"shape {shape} differs from the manifest's "
                      f"{entry.get('shape') if isinstance(entry, dict) else entry!r}")
            shapes[key] = shape
            total += math.prod(shape) * dtype.itemsize
        if total > MAX_BYTES:
            _fail(path, "arrays", f"declare {total} bytes in all, more than {MAX_BYTES}")
        for case in manifest["cases"]:
            _check_shapes(path, case, {n: shapes[f"{case['key']}/{n}"]
                                       for n in case["inputs"] + case["outputs"]})
        arrays = {}
        for key in shapes:
            with z.open(f"{key}.npy") as f:
                arrays[key] = np.lib.format.read_array(f, allow_pickle=False)
    for case in manifest["cases"]:
        for name in case["inputs"]:
            if not np.isfinite(arrays[f"{case['key']}/{name}"]).all():
                _fail(path, f"{case['key']}/{name}", "input holds NaN or inf")
        if case["kind"] in _GRID_TRANSFORMS:
            _check_sizes(path, case, arrays)
    return manifest, arrays


# --------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------


def check_against_golden(path, other=None, *, tol: float | None = None,
                         order: int = 1) -> list[ParityResult]:
    """Re-run the cases of a golden file and compare with its stored outputs.

    Parameters
    ----------
    path : str or Path
        A file written by :func:`export_golden`.
    other : None, str or callable
        None: this package, every case (e.g. after an upgrade of NumPy or SciPy).
        ``"torch"``: PyTorch, on the sampler and affine_grid cases. A library name or a
        callable as in :func:`~stn_numpy.verify.parity_matrix`: its sampler on the
        stored inputs of every grid_sample case.
    tol : float, optional
        Defaults to the file's recorded tolerance.
    order : {1, 2}
        2: only the double backward cases, with ``other`` a double backward as
        :func:`~stn_numpy.verify.second_order.resolve_double_backward` takes it (None:
        this package). With 1 and ``other=None`` they are checked among every case.

    Returns
    -------
    list of ParityResult, in the order of the file's cases, each with ``key`` set to the
    case's key. A grid-transform row has ``op`` set to its kind and carries
    ``err_grid`` and ``err_dtheta``; the spatial-transformer row carries its
    errors as ``err_V``, ``err_dU`` and ``err_params`` (the worst of theta, the loss and
    every parameter gradient).
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    manifest, arrays = load_golden(path)
    if order == 2:
        return _check_second_order(path, manifest, arrays, other, tol)
    sampler, affine = resolve(other, "numpy")
    everything = other is None or other == "numpy"
    tol = float(manifest["tolerance"]) if tol is None else float(tol)
    results = []
    for case in manifest["cases"]:
        key, kind = case["key"], case["kind"]
        get = {n: arrays[f"{key}/{n}"] for n in case["inputs"] + case["outputs"]}
        if kind == "grid_sample":
            results.append(_check_sampler(sampler, case, get, tol))
        elif kind == "affine_grid" and affine is not None:
            try:
                grid, dtheta = affine(get["theta"], tuple(int(s) for s in get["size"]),
                                      get["dgrid"], case["align_corners"])
            except Exception as exc:  # noqa: BLE001 - the other implementation's row
                results.append(_with_key(ParityResult(
                    op=kind, mode=None, padding_mode=None, align_corners=case["align_corners"],
                    tol=tol, failure=f"{type(exc).__name__}: {exc}"), key))
                continue
            results.append(_grid_row(case, get, grid, dtheta, tol))
        elif kind == _SECOND_ORDER:
            if everything:
                results.append(_check_double_backward(numpy_double_backward, case, get, tol))
        elif everything and kind in _GRID_TRANSFORMS:
            out = _our_outputs(path, case, get)
            results.append(_grid_row(case, get, out["grid"], out["dtheta"], tol))
        elif everything:
            out = _our_outputs(path, case, {n: get[n] for n in case["inputs"]})
            params = [n for n in case["outputs"] if n not in ("V", "dU")]
            results.append(ParityResult(
                op=kind, mode=case["mode"], padding_mode=case["padding_mode"],
                align_corners=case["align_corners"], tol=tol,
                err_V=rel_error(get["V"], out["V"]), err_dU=rel_error(get["dU"], out["dU"]),
                err_params=max(rel_error(get[n], out[n]) for n in params), key=key))
    if not results:
        raise GoldenFormatError(f"{path}: no cases found")
    return results


def _our_outputs(path, case, inputs):
    """:func:`_outputs`, a refusal of the inputs (a pole, a size) being the file's fault."""
    try:
        return _outputs(case, inputs)
    except (TypeError, ValueError) as exc:
        raise GoldenFormatError(f"{path}: {case['key']}: the stored inputs are refused "
                                f"({exc})") from None


def _check_sampler(sampler, case, get, tol):
    """A grid_sample case: the stored outputs stand in for this package's."""
    stored = tuple(get[n] for n in _SAMPLER_IO[1])

    def reference(U, grid, dV, mode, padding_mode, align_corners):
        return stored

    row = compare_sampler(sampler, get["U"], get["grid"], get["dV"], case["mode"],
                          case["padding_mode"], case["align_corners"], tol=tol, repeat=False,
                          reference=reference)
    return _with_key(row, case["key"])


def _check_second_order(path, manifest, arrays, other, tol):
    """The double backward cases of a file, ``other`` (a double backward) on each."""
    fn = resolve_double_backward("numpy" if other is None else other)
    tol = float(manifest["tolerance"]) if tol is None else float(tol)
    results = [_check_double_backward(fn, case, {n: arrays[f"{case['key']}/{n}"]
                                                 for n in case["inputs"] + case["outputs"]}, tol)
               for case in manifest["cases"] if case["kind"] == _SECOND_ORDER]
    if not results:
        raise GoldenFormatError(f"{path}: no second-order cases (files written before "
                                f"they were added hold none)")
    return results


def _check_double_backward(fn, case, get, tol):
    stored = tuple(get[n] for n in _SECOND_ORDER_IO[1])
    row = compare_double_backward(fn, *(get[n] for n in _SECOND_ORDER_IO[0]), case["mode"],
                                  case["padding_mode"], case["align_corners"], tol=tol,
                                  repeat=False, reference=lambda *args: stored)
    return _with_key(row, case["key"])


def _grid_row(case, get, grid, dtheta, tol):
    return _with_key(ParityResult(
        op=case["kind"], mode=None, padding_mode=None, align_corners=case["align_corners"],
        err_grid=rel_error(get["grid"], grid), err_dtheta=rel_error(get["dtheta"], dtheta),
        tol=tol), case["key"])


def _with_key(row: ParityResult, key: str) -> ParityResult:
    return dataclasses.replace(row, key=key)

