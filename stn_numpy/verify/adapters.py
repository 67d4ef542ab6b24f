"""Other libraries' samplers behind this package's ``other`` interface.

Each adapter turns a library's image sampler into
``impl(U, grid, dV, mode, padding_mode, align_corners) -> (V, dU, dgrid)`` on NumPy
arrays, so :func:`~stn_numpy.verify.parity_matrix` and the atlas can compare it with this
reference. dU and dgrid are the gradients of ``sum(V * dV)``; a library that does not
differentiate returns None for both. A combination the library cannot express raises
:class:`~stn_numpy.verify.common.Unsupported` (the row shows N/A).

The coordinate conversion is the same for all of them. These libraries take *pixel*
coordinates, pixel ``k`` having its centre at ``k``; a normalized grid point
``(x_s, y_s)`` becomes

    x = (x_s + 1) * (W - 1) / 2          (align_corners=True)
    x = (x_s + 1) * W / 2 - 1/2          (align_corners=False)

and likewise y with H (:func:`~stn_numpy.verify.common.pixel_coordinates`, rounded as
this package rounds it), so ``align_corners`` is always expressible and a difference the
atlas shows is the library's. The padding mode is then a choice of the library's boundary
mode; ``reflection`` means reflecting about the outermost pixel centres with
align_corners=True and about the outer pixel edges with False, so it maps to two
different library modes. Which library setting stands for which of this package's
settings is the table ``SETTINGS`` of each adapter; the atlas
(:mod:`stn_numpy.verify.atlas`) measures every library setting, also those without a
counterpart, and records where each differs.

ONNX Runtime and ONNX's reference evaluator (``onnx.reference``) are different: their
``GridSample`` takes the normalized grid, the padding mode and align_corners as this
package does, so their adapters run a one-node graph on U and the grid as they are.

Each library is imported only when its adapter is first called; a missing one raises
:class:`LibraryNotInstalledError` naming what to install (``pip install -e ".[verify]"``,
or ``".[onnx]"`` for the two ONNX runtimes).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable

import numpy as np

from .common import Unsupported, pixel_coordinates

__all__ = ["ADAPTERS", "Adapter", "LibraryNotInstalledError", "load_adapter"]


class LibraryNotInstalledError(ImportError):
    """An adapter's library cannot be imported; the message says what to install."""


def _require(module: str, pip_name: str, extra: str = "verify"):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise LibraryNotInstalledError(
            f"{pip_name} not installed: pip install {pip_name} (or all of them: "
            f"pip install -e \".[{extra}]\")") from exc


def _pixel_grid(grid, *spatial: int, align_corners: bool):
    """``(x, y)`` (``(x, y, z)`` for a volume's ``spatial = (D, H, W)``) pixel coordinates
    of every grid point, each of the grid's shape without its last axis."""
    return tuple(pixel_coordinates(grid[..., a], size, align_corners)[0]
                 for a, size in enumerate(reversed(spatial)))


def _setting(settings: dict, mode: str, padding_mode: str, align_corners: bool, name: str):
    key = (mode, padding_mode, align_corners if padding_mode == "reflection" else None)
    if key not in settings:
        raise Unsupported(f"{name} has no setting for mode={mode!r}")
    return settings[key]


def _per_image(sample_2d, U, x, y, *z):
    """Apply ``sample_2d(image (H, W), x, y) -> (Ho, Wo)`` to every image and channel
    (``sample_2d(volume (D, H, W), x, y, z)`` to every volume when ``z`` is given)."""
    N, C = U.shape[:2]
    V = np.empty((N, C) + x.shape[1:], dtype=U.dtype)
    for n in range(N):
        for c in range(C):
            V[n, c] = sample_2d(U[n, c], x[n], y[n], *(a[n] for a in z))
    return V


# --------------------------------------------------------------------------------------
# SciPy
# --------------------------------------------------------------------------------------

#: (mode, padding_mode, align_corners or None) -> map_coordinates(order=, mode=).
#: SciPy's tutorial on interpolation boundary modes (docs, "ndimage: interpolation
#: boundary handling"): 'grid-constant' pads with cval and interpolates across the edge
#: (per tap, as zeros padding does), 'nearest' repeats the edge pixel, 'mirror' reflects
#: about the centre of the edge pixel (d c b | a b c d | c b a), 'reflect' about its outer
#: edge (d c b a | a b c d | d c b a).
SCIPY_SETTINGS = {
    **{(m, "zeros", None): {"order": o, "mode": "grid-constant"} for m, o in
       (("nearest", 0), ("bilinear", 1))},
    **{(m, "border", None): {"order": o, "mode": "nearest"} for m, o in
       (("nearest", 0), ("bilinear", 1))},
    **{(m, "reflection", True): {"order": o, "mode": "mirror"} for m, o in
       (("nearest", 0), ("bilinear", 1))},
    **{(m, "reflection", False): {"order": o, "mode": "reflect"} for m, o in
       (("nearest", 0), ("bilinear", 1))},
}


def scipy_sample(U, grid, align_corners, *, order, mode):
    """``scipy.ndimage.map_coordinates`` at the grid's pixel coordinates; V only.

    ``V[n, c] = map_coordinates(U[n, c], [y, x], order=order, mode=mode, cval=0,
    prefilter=False)``, and ``[z, y, x]`` for volumes (SciPy takes the coordinates in the
    array's axis order, the reverse of the grid's); SciPy interpolates in float64 and
    returns U's dtype.
    """
    ndimage = _require("scipy.ndimage", "scipy")
    coords = _pixel_grid(grid, *U.shape[2:], align_corners=align_corners)
    return _per_image(lambda img, *xyz: ndimage.map_coordinates(
        img, list(reversed(xyz)), order=order, mode=mode, cval=0.0, prefilter=False),
        U, *coords)


def scipy_impl(U, grid, dV, mode, padding_mode, align_corners):
    """SciPy ``ndimage.map_coordinates`` (order 0, 1): forward only, see ``SCIPY_SETTINGS``."""
    setting = _setting(SCIPY_SETTINGS, mode, padding_mode, align_corners,
                       "scipy.ndimage.map_coordinates (orders 0 and 1 here; order 3 is a "
                       "B-spline, not Keys' cubic)")
    return scipy_sample(U, grid, align_corners, **setting), None, None


# --------------------------------------------------------------------------------------
# JAX
# --------------------------------------------------------------------------------------

#: jax/_src/scipy/ndimage.py: 'constant' tests each tap for being inside the image and
#: uses cval otherwise (so it is SciPy's 'grid-constant'), 'nearest' clips the tap index,
#: 'mirror' and 'reflect' fold the tap index as SciPy does; orders 0 and 1 only.
JAX_SETTINGS = {
    (m, p, ac): {"order": s["order"], "mode": "constant" if s["mode"] == "grid-constant"
                 else s["mode"]}
    for (m, p, ac), s in SCIPY_SETTINGS.items()
}


_JAX = None


def _jax():
    global _JAX
    if _JAX is None:
        jax = _require("jax", "jax")
        # float64 inputs must stay float64 (JAX computes in float32 unless told).
        jax.config.update("jax_enable_x64", True)
        _JAX = jax
    return _JAX


def jax_sample(align_corners: bool, *, order: int, mode: str):
    """``forward_and_vjp(U, grid, dV) -> (V, dU, dgrid)`` of JAX's ``map_coordinates``.

    All ``N * C`` images are sampled by one call on the stack ``(N * C, H, W)``, with the
    image index as an integer first coordinate (its weights are exactly 1 and 0, so the
    result is that of 2-D sampling; one call compiles once per setting, where mapping
    over images compiles per call). The normalized -> pixel conversion is done in JAX
    too, so ``jax.vjp`` gives dgrid with respect to the normalized grid.
    """
    jax = _jax()
    jnp, map_coordinates = jax.numpy, jax.scipy.ndimage.map_coordinates

    def forward(U, grid):
        N, C, *spatial = U.shape  # (H, W), or (D, H, W) for volumes
        off = 0.0 if align_corners else 0.5
        per_image = (N, C) + grid.shape[1:-1]
        # Pixel coordinates in the array's axis order (z,) y, x: the grid's reversed.
        coords = [jnp.broadcast_to(((grid[..., a] + 1) * ((size - 1) / 2 if align_corners
                                                          else size / 2) - off)[:, None],
                                   per_image).reshape(-1)
                  for a, size in reversed(list(enumerate(reversed(spatial))))]
        k = jnp.broadcast_to(jnp.arange(N * C, dtype=grid.dtype).reshape(
            (N, C) + (1,) * len(spatial)), per_image)
        V = map_coordinates(U.reshape(N * C, *spatial), [k.reshape(-1), *coords],
                            order=order, mode=mode, cval=0.0)
        return V.reshape(per_image)

    def forward_and_vjp(U, grid, dV):
        V, vjp = jax.vjp(forward, jnp.asarray(U), jnp.asarray(grid))
        return tuple(np.asarray(a) for a in (V, *vjp(jnp.asarray(dV))))

    return forward_and_vjp


def jax_impl(U, grid, dV, mode, padding_mode, align_corners):
    """JAX ``map_coordinates`` (order 0, 1), gradients by ``jax.vjp``; see ``JAX_SETTINGS``."""
    setting = _setting(JAX_SETTINGS, mode, padding_mode, align_corners,
                       "jax.scipy.ndimage.map_coordinates (orders 0 and 1 only)")
    return jax_sample(align_corners, **setting)(U, grid, dV)


# --------------------------------------------------------------------------------------
# OpenCV
# --------------------------------------------------------------------------------------

#: OpenCV's documentation of cv::remap and cv::BorderTypes (imgproc, "Geometric Image
#: Transformations"; core, BorderTypes): BORDER_CONSTANT iiiiii|abcdefgh|iiiiiii with
#: i = borderValue, BORDER_REPLICATE aaaaaa|abcdefgh|hhhhhhh, BORDER_REFLECT
#: fedcba|abcdefgh|hgfedcb (about the outer edge), BORDER_REFLECT_101
#: gfedcb|abcdefgh|gfedcba (about the edge pixel's centre); INTER_CUBIC is Keys' cubic
#: with a = -0.75 (interpolateCubic in modules/imgproc/src/imgwarp.cpp). The maps are
#: float32 pixel coordinates; remap splits them into integer parts and fractions
#: quantised to 1/INTER_TAB_SIZE = 1/32 pixel (INTER_BITS = 5, imgwarp.cpp).
OPENCV_BORDERS = {"zeros": "BORDER_CONSTANT", "border": "BORDER_REPLICATE",
                  ("reflection", True): "BORDER_REFLECT_101",
                  ("reflection", False): "BORDER_REFLECT"}
OPENCV_INTERPOLATIONS = {"nearest": "INTER_NEAREST", "bilinear": "INTER_LINEAR",
                         "bicubic": "INTER_CUBIC"}


def opencv_sample(U, grid, align_corners, *, interpolation, border):
    """``cv2.remap`` of every image at the grid's pixel coordinates (float32 maps); V only.

    ``interpolation`` and ``border`` are names of cv2 constants, e.g. ``"INTER_LINEAR"``,
    ``"BORDER_REFLECT"``; the border value is 0.
    """
    cv2 = _require("cv2", "opencv-python-headless")
    if interpolation == "INTER_CUBIC" and border == "BORDER_REFLECT_101" and min(U.shape[2:]) == 1:
        # Measured with opencv 5.0.0: remap never returns (reflecting a 4-tap stencil about
        # the centre of a single pixel does not terminate).
        raise Unsupported("cv2.remap with INTER_CUBIC and BORDER_REFLECT_101 does not "
                          "return on an image 1 pixel high or wide")
    x, y = _pixel_grid(grid, *U.shape[2:], align_corners=align_corners)
    flags, border_mode = getattr(cv2, interpolation), getattr(cv2, border)
    return _per_image(lambda img, xi, yi: cv2.remap(
        np.ascontiguousarray(img), xi.astype(np.float32), yi.astype(np.float32), flags,
        borderMode=border_mode, borderValue=0), U, x, y)


def opencv_impl(U, grid, dV, mode, padding_mode, align_corners):
    """OpenCV ``cv2.remap``: forward only, see ``OPENCV_BORDERS``, ``OPENCV_INTERPOLATIONS``."""
    if U.ndim == 5:
        raise Unsupported("cv2.remap samples images only, not volumes")
    border = OPENCV_BORDERS.get(padding_mode) or OPENCV_BORDERS[(padding_mode, align_corners)]
    V = opencv_sample(U, grid, align_corners, interpolation=OPENCV_INTERPOLATIONS[mode],
                      border=border)
    return V, None, None


# --------------------------------------------------------------------------------------
# scikit-image
# --------------------------------------------------------------------------------------

#: skimage/_shared/utils.py (_to_ndimage_mode, _fix_ndimage_mode): warp's numpy.pad-style
#: modes become SciPy's: 'constant' -> 'grid-constant', 'edge' -> 'nearest',
#: 'symmetric' -> 'reflect', 'reflect' -> 'mirror'; a coordinate-array inverse_map goes
#: to scipy.ndimage.map_coordinates (skimage/transform/_warps.py), with a spline prefilter
#: for order > 1, so order 3 is a cubic B-spline interpolant.
SKIMAGE_MODES = {"zeros": "constant", "border": "edge", ("reflection", True): "reflect",
                 ("reflection", False): "symmetric"}
SKIMAGE_ORDERS = {"nearest": 0, "bilinear": 1}


def skimage_sample(U, grid, align_corners, *, order, mode):
    """``skimage.transform.warp`` with the grid's pixel coordinates as ``inverse_map``.

    ``warp(U[n, c], np.stack([y, x]), order=order, mode=mode, cval=0, clip=False,
    preserve_range=True)``; V only.
    """
    transform = _require("skimage.transform", "scikit-image")
    x, y = _pixel_grid(grid, *U.shape[2:], align_corners=align_corners)
    return _per_image(lambda img, xi, yi: transform.warp(
        img, np.stack([yi, xi]), order=order, mode=mode, cval=0.0, clip=False,
        preserve_range=True), U, x, y)


def skimage_impl(U, grid, dV, mode, padding_mode, align_corners):
    """scikit-image ``transform.warp`` (order 0, 1): forward only, see ``SKIMAGE_MODES``."""
    if U.ndim == 5:
        raise Unsupported("the adapter passes images to skimage.transform.warp; for "
                          "volumes see SciPy's map_coordinates, which warp calls")
    if mode not in SKIMAGE_ORDERS:
        raise Unsupported("skimage.transform.warp order 3 is a cubic B-spline, not Keys' "
                          "cubic convolution")
    sk_mode = SKIMAGE_MODES.get(padding_mode) or SKIMAGE_MODES[(padding_mode, align_corners)]
    V = skimage_sample(U, grid, align_corners, order=SKIMAGE_ORDERS[mode], mode=sk_mode)
    return V, None, None


# --------------------------------------------------------------------------------------
# ONNX Runtime and ONNX's reference evaluator
# --------------------------------------------------------------------------------------

#: Both run a one-node ``GridSample`` graph (:func:`stn_numpy.onnx.grid_sample_model`),
#: which takes the normalized grid, the padding mode and align_corners as they are here:
#: no coordinate conversion, and every combination has its counterpart. Opset 20 names
#: the modes ``linear``, ``nearest``, ``cubic``; opset 16 ``bilinear``, ``nearest``,
#: ``bicubic`` (``GRID_SAMPLE_MODES``). The graph is built once per setting and dtype.
ONNX_RUNTIMES = {"onnxruntime": "onnxruntime", "onnx-reference": "onnx.reference"}


@functools.lru_cache(maxsize=128)
def _onnx_runner(runtime: str, mode: str, padding_mode: str, align_corners: bool, dtype: str,
                 opset: int, dims: int = 2):
    """``run(U, grid) -> V`` of the one-node graph in ``runtime`` (a key of ONNX_RUNTIMES),
    for images (``dims=2``) or volumes (3)."""
    from ..onnx import grid_sample_model

    _require("onnx", "onnx", "onnx")  # builds the graph for either runtime
    module = _require(ONNX_RUNTIMES[runtime], runtime.split("-")[0], "onnx")
    if dims == 3 and opset < 20:
        raise Unsupported(f"GridSample samples volumes from opset 20 on, not at {opset}")
    model = grid_sample_model(mode, padding_mode, align_corners, dtype, opset, dims)
    if runtime == "onnx-reference":
        evaluator = module.ReferenceEvaluator(model)

        def run(U, grid):
            # Its reflection divides by the axis' extent, 0 for one pixel with
            # align_corners=True; the OverflowError that follows is the row's result.
            with np.errstate(divide="ignore"):
                return evaluator.run(None, {"X": U, "grid": grid})[0]

        return run
    options = module.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        session = module.InferenceSession(model.SerializeToString(), options,
                                          providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - a kernel missing for this opset or dtype
        if "NOT_IMPLEMENTED" not in str(exc):
            raise
        raise Unsupported(f"onnxruntime has no {dtype} GridSample kernel at opset {opset}") \
            from exc
    return lambda U, grid: session.run(None, {"X": U, "grid": grid})[0]


def onnx_sample(U, grid, align_corners, *, runtime, mode, padding_mode, opset=20):
    """``GridSample`` of ``runtime`` (``"onnxruntime"``, ``"onnx-reference"``) in U's dtype; V only.

    Raises :class:`Unsupported` where the runtime refuses the graph: ONNX Runtime without a
    kernel for the dtype at this opset, the reference evaluator for opset 16's mode names.
    """
    run = _onnx_runner(runtime, mode, padding_mode, bool(align_corners), np.dtype(U.dtype).name,
                       opset, U.ndim - 2)
    try:
        return run(np.ascontiguousarray(U), np.ascontiguousarray(grid))
    except RuntimeError as exc:
        # onnx/reference/ops/op_grid_sample.py knows opset 20's names only.
        if "only supports nearest, linear, and cubic" not in str(exc):
            raise
        raise Unsupported(f"onnx.reference rejects opset {opset}'s mode name {mode!r}: "
                          f"{exc}") from exc


def onnxruntime_impl(U, grid, dV, mode, padding_mode, align_corners):
    """ONNX Runtime's CPU ``GridSample`` at opset 20: forward only, float32 and float64."""
    V = onnx_sample(U, grid, align_corners, runtime="onnxruntime", mode=mode,
                    padding_mode=padding_mode)
    return V, None, None


def onnx_reference_impl(U, grid, dV, mode, padding_mode, align_corners):
    """ONNX's reference evaluator (``onnx.reference``), ``GridSample`` at opset 20; V only."""
    V = onnx_sample(U, grid, align_corners, runtime="onnx-reference", mode=mode,
                    padding_mode=padding_mode)
    return V, None, None


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A library's adapter: the module it needs, what to install, the interface function,
    and the extra of setup.cfg that installs it."""

    module: str
    pip_name: str
    impl: Callable
    extra: str = "verify"


ADAPTERS = {
    "scipy": Adapter("scipy.ndimage", "scipy", scipy_impl),
    "jax": Adapter("jax", "jax", jax_impl),
    "opencv": Adapter("cv2", "opencv-python-headless", opencv_impl),
    "skimage": Adapter("skimage.transform", "scikit-image", skimage_impl),
    "onnxruntime": Adapter("onnxruntime", "onnxruntime", onnxruntime_impl, "onnx"),
    "onnx-reference": Adapter("onnx.reference", "onnx", onnx_reference_impl, "onnx"),
}


def load_adapter(name: str) -> Callable:
    """The interface function of library ``name``; raises LibraryNotInstalledError if absent."""
    adapter = ADAPTERS[name]
    _require(adapter.module, adapter.pip_name, adapter.extra)
    return adapter.impl
