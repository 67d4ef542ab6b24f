"""Export of trained models to ONNX, to run them in ONNX Runtime or any other ONNX runtime.

    stn-numpy export runs/stn-mnist/checkpoint.npz model.onnx
    stn_numpy.onnx.export(model, "model.onnx")

The graph uses opset 20 and plain operators only, one node (or a few) per layer, so that
it reads in a viewer such as Netron:

==========================  ========================================================================
this package                ONNX
==========================  ========================================================================
``Normalize``               ``Sub``, ``Div`` (the MNIST mean and standard deviation)
``Conv2d``                  ``Conv`` (stride 1, no padding)
``MaxPool2d(k)``            ``MaxPool`` (kernel and stride ``k``, floor of the output size)
``ReLU``, ``Flatten``       ``Relu``, ``Flatten`` (axis 1)
``Linear``                  ``Gemm`` (``transB=1``: ``x W^T + b``)
``Dropout``, ``Dropout2d``  nothing: the identity in evaluation
the sampler                 ``GridSample`` (mode ``linear``/``nearest``/``cubic``, padding mode,
                            align_corners)
affine grid                 ``AffineGrid`` on theta reshaped to ``(N, 2, 3)``
attention grid              ``Mul``, ``Add``: ``s (x_t, y_t) + (t_x, t_y)`` over the constant
                            target grid
similarity grid             ``Exp``, ``Cos``, ``Sin``, ``Mul``, ``Neg``, ``Concat``: the affine
                            matrix ``s R(a)`` beside ``(t_x, t_y)``, then ``AffineGrid``
projective grid             ``Pad`` (h_33 = 1), ``MatMul`` with the homogeneous target points,
                            ``Div`` by the third coordinate
thin-plate spline grid      ``MatMul`` by the constant ``(H_o W_o, K)`` matrix ``M`` of
                            :func:`~stn_numpy.tps_grid` (the spline is linear in its control
                            points, so no solve is left for the runtime)
==========================  ========================================================================

Every transform head is expressible; none is refused. The graph's input is ``images``
``(N, 1, H, W)`` (N free) in ``[0, 1]``; its outputs are ``logits`` ``(N, 10)`` and, for a
model with a spatial transformer, ``theta`` ``(N, P)`` (the localisation net's output)
and ``V`` ``(N, 1, H_o, W_o)`` (the transformer's output, :meth:`Model.transform`).

``onnx`` is imported only here and only when a function is called; the package itself
does not need it (``pip install -e ".[onnx]"`` installs it with ONNX Runtime).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from . import grids
from ._io import atomic_write
from .layers import Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU
from .models import Model, Normalize
from .transformer import SpatialTransformer

__all__ = ["GRID_SAMPLE_MODES", "OPSET", "OnnxNotInstalledError", "export", "grid_sample_model",
           "to_onnx"]

OPSET = 20
#: opset -> this package's sampling mode -> GridSample's ``mode`` attribute. Opset 16
#: named the modes as PyTorch does; opset 20 renamed two of them (and allowed N-D input).
GRID_SAMPLE_MODES = {
    16: {"bilinear": "bilinear", "nearest": "nearest", "bicubic": "bicubic"},
    20: {"bilinear": "linear", "nearest": "nearest", "bicubic": "cubic"},
}


class OnnxNotInstalledError(ImportError):
    """``onnx`` (or ``onnxruntime``) is needed but cannot be imported; the message says what
    to install."""


def import_onnx(module: str = "onnx"):
    """``module`` (``onnx``, ``onnx.reference``, ``onnxruntime``), or an error naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise OnnxNotInstalledError(
            f"{top} not installed: pip install {top} (or both onnx and onnxruntime: "
            f"pip install -e \".[onnx]\")") from exc


def _elem_type(dtype) -> int:
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return import_onnx().helper.np_dtype_to_tensor_dtype(dtype)


def grid_sample_node(inputs, output: str, mode: str, padding_mode: str, align_corners: bool,
                     opset: int = OPSET, name: str | None = None):
    """A ``GridSample`` node with this package's settings in the attribute names of ``opset``."""
    if opset < 16:
        raise ValueError(f"opset must be at least 16 (GridSample's first), got {opset}")
    helper = import_onnx().helper
    names = GRID_SAMPLE_MODES[16 if opset < 20 else 20]
    return helper.make_node("GridSample", list(inputs), [output], name=name,
                            mode=names[mode], padding_mode=padding_mode,
                            align_corners=int(bool(align_corners)))


def grid_sample_model(mode: str, padding_mode: str, align_corners: bool, dtype=np.float64,
                      opset: int = OPSET, dims: int = 2):
    """A one-node model ``Y = GridSample(X, grid)`` of ``dtype``, any N, C and sizes.

    ``X`` is ``(N, C, H, W)``, ``grid`` ``(N, H_o, W_o, 2)``, as :func:`stn_numpy.grid_sample`
    takes them (``dims=3``: ``X (N, C, D, H, W)``, ``grid (N, D_o, H_o, W_o, 3)``, opset 20
    only); ``opset`` 16 (mode names ``bilinear``/``bicubic``) or 20 (``linear``/
    ``cubic``). The verify adapters run it in ONNX Runtime and ONNX's reference evaluator.
    """
    if dims not in (2, 3) or (dims == 3 and opset < 20):
        raise ValueError(f"dims must be 2, or 3 at opset 20 or later (GridSample became "
                         f"N-dimensional there), got dims={dims!r} at opset {opset}")
    helper = import_onnx().helper
    t = _elem_type(dtype)
    axes = ["D", "H", "W"][3 - dims:]
    out = [f"{a}_o" for a in axes]
    graph = helper.make_graph(
        [grid_sample_node(["X", "grid"], "Y", mode, padding_mode, align_corners, opset)],
        "grid_sample",
        [helper.make_tensor_value_info("X", t, ["N", "C", *axes]),
         helper.make_tensor_value_info("grid", t, ["N", *out, dims])],
        [helper.make_tensor_value_info("Y", t, ["N", "C", *out])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             producer_name="stn-numpy")


class _Graph:
    """Nodes and constants of a graph under construction, named after the layers' keys.

    Constants are cast to the graph's dtype (parameters included), unless told otherwise.
    """

    def __init__(self, dtype, input_size) -> None:
        self.onnx = import_onnx()
        self.dtype, self.input_size = np.dtype(dtype), tuple(input_size)
        self.nodes, self.initializers = [], []

    def const(self, name: str, value, dtype=None) -> str:
        value = np.asarray(value, dtype=self.dtype if dtype is None else dtype)
        self.initializers.append(self.onnx.numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs, name: str, **attrs) -> str:
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [name], name=name,
                                                     **attrs))
        return name


def _sequential(g: _Graph, layers, x: str, prefix: str) -> str:
    """Add ``layers`` (in evaluation mode) applied to ``x``; returns the output's name."""
    for i, layer in enumerate(layers):
        name = f"{prefix}{i}"
        if isinstance(layer, SpatialTransformer):
            x = _transformer(g, layer, x, f"{name}.")
        elif isinstance(layer, Normalize):
            x = g.node("Sub", [x, g.const(f"{name}.mean", layer.mean)], f"{name}.centred")
            x = g.node("Div", [x, g.const(f"{name}.std", layer.std)], name)
        elif isinstance(layer, Conv2d):
            k = layer.kernel_size
            x = g.node("Conv", [x, g.const(f"{name}.weight", layer.params["weight"]),
                                g.const(f"{name}.bias", layer.params["bias"])], name,
                       kernel_shape=[k, k])
        elif isinstance(layer, MaxPool2d):
            k = layer.kernel_size
            x = g.node("MaxPool", [x], name, kernel_shape=[k, k], strides=[k, k])
        elif isinstance(layer, ReLU):
            x = g.node("Relu", [x], name)
        elif isinstance(layer, Flatten):
            x = g.node("Flatten", [x], name, axis=1)
        elif isinstance(layer, Linear):
            x = g.node("Gemm", [x, g.const(f"{name}.weight", layer.params["weight"]),
                                g.const(f"{name}.bias", layer.params["bias"])], name, transB=1)
        elif isinstance(layer, Dropout):  # Dropout2d too: the identity in evaluation
            continue
        else:
            raise ValueError(f"cannot export layer {prefix}{i} ({type(layer).__name__}): "
                             f"no ONNX counterpart is defined for it")
    return x


def _transformer(g: _Graph, st: SpatialTransformer, U: str, prefix: str) -> str:
    """theta = f_loc(U), grid = T_theta(G), V = GridSample(U, grid); returns V's name."""
    theta = _sequential(g, st.localization, U, f"{prefix}localization.")
    theta = g.node("Identity", [theta], "theta")
    Ho, Wo = st.out_size or g.input_size
    grid = _GRIDS[st.transform](g, st, theta, Ho, Wo, f"{prefix}grid.")
    g.nodes.append(grid_sample_node([U, grid], "V", st.mode, st.padding_mode,
                                    st.align_corners, name="V"))
    return "V"


def _batch_shape(g: _Graph, prefix: str, *tail: int) -> str:
    """A shape ``(N, *tail)``, N read from theta at run time (the graph takes any batch)."""
    return g.const(f"{prefix}shape", [0, *tail], np.int64)  # Reshape's 0: keep that axis


def _columns(g, theta, prefix, *names):
    """``theta[:, i:i + 1]`` for each name in order, each ``(N, 1)``."""
    axis = g.const(f"{prefix}axis1", [1], np.int64)
    return [g.node("Slice", [theta, g.const(f"{prefix}{n}.start", [i], np.int64),
                             g.const(f"{prefix}{n}.end", [i + 1], np.int64), axis],
                   f"{prefix}{n}") for i, n in enumerate(names)]


def _affine(g, st, theta, Ho, Wo, prefix):
    theta = g.node("Reshape", [theta, _batch_shape(g, prefix, 2, 3)], f"{prefix}theta")
    N = g.node("Shape", [theta], f"{prefix}N", start=0, end=1)
    size = g.node("Concat", [N, g.const(f"{prefix}CHW", [1, Ho, Wo], np.int64)],
                  f"{prefix}size", axis=0)
    return g.node("AffineGrid", [theta, size], f"{prefix}grid",
                  align_corners=int(st.align_corners))


def _target(g, st, Ho, Wo):
    """The constant target grid ``(x_t, y_t)``, ``(H_o, W_o, 2)``, as the grids use it."""
    return grids.target_coordinates(Ho, Wo, st.align_corners, g.dtype)


def _attention(g, st, theta, Ho, Wo, prefix):
    s, tx, ty = _columns(g, theta, prefix, "s", "t_x", "t_y")
    t = g.node("Concat", [tx, ty], f"{prefix}t", axis=1)
    s = g.node("Reshape", [s, _batch_shape(g, f"{prefix}s.", 1, 1, 1)], f"{prefix}s.nhwc")
    t = g.node("Reshape", [t, _batch_shape(g, f"{prefix}t.", 1, 1, 2)], f"{prefix}t.nhwc")
    scaled = g.node("Mul", [s, g.const(f"{prefix}target", _target(g, st, Ho, Wo))],
                    f"{prefix}scaled")
    return g.node("Add", [scaled, t], f"{prefix}grid")


def _similarity(g, st, theta, Ho, Wo, prefix):
    # A = [[s cos a, -s sin a, t_x], [s sin a, s cos a, t_y]], s = exp(log s), then AffineGrid.
    a, log_s, tx, ty = _columns(g, theta, prefix, "a", "log_s", "t_x", "t_y")
    s = g.node("Exp", [log_s], f"{prefix}s")
    cos = g.node("Mul", [s, g.node("Cos", [a], f"{prefix}cos_a")], f"{prefix}s_cos_a")
    sin = g.node("Mul", [s, g.node("Sin", [a], f"{prefix}sin_a")], f"{prefix}s_sin_a")
    minus_sin = g.node("Neg", [sin], f"{prefix}minus_s_sin_a")
    A = g.node("Concat", [cos, minus_sin, tx, sin, cos, ty], f"{prefix}A", axis=1)
    return _affine(g, st, A, Ho, Wo, f"{prefix}affine.")


def _projective(g, st, theta, Ho, Wo, prefix):
    # h = [theta, 1] as (N, 3, 3); (a, b, w) = h (x_t, y_t, 1) for every target point.
    h = g.node("Pad", [theta, g.const(f"{prefix}pads", [0, 0, 0, 1], np.int64),
                       g.const(f"{prefix}one", 1.0)], f"{prefix}h.flat")
    h = g.node("Reshape", [h, _batch_shape(g, f"{prefix}h.", 3, 3)], f"{prefix}h")
    hT = g.node("Transpose", [h], f"{prefix}h.T", perm=[0, 2, 1])
    base = np.concatenate([_target(g, st, Ho, Wo),
                           np.ones((Ho, Wo, 1), g.dtype)], axis=-1).reshape(Ho * Wo, 3)
    abw = g.node("MatMul", [g.const(f"{prefix}target", base), hT], f"{prefix}abw")
    ab, w = (g.node("Slice", [abw, g.const(f"{prefix}{n}.start", [lo], np.int64),
                              g.const(f"{prefix}{n}.end", [hi], np.int64),
                              g.const(f"{prefix}{n}.axis", [2], np.int64)], f"{prefix}{n}")
             for n, lo, hi in (("ab", 0, 2), ("w", 2, 3)))
    xy = g.node("Div", [ab, w], f"{prefix}xy")
    return g.node("Reshape", [xy, _batch_shape(g, prefix, Ho, Wo, 2)], f"{prefix}grid")


def _tps(g, st, theta, Ho, Wo, prefix):
    rows, cols = st.lattice
    M = grids._tps_matrix((rows, cols), Ho, Wo, st.align_corners).astype(g.dtype)
    points = g.node("Reshape", [theta, _batch_shape(g, f"{prefix}points.", rows * cols, 2)],
                    f"{prefix}points")
    flat = g.node("MatMul", [g.const(f"{prefix}M", M), points], f"{prefix}flat")
    return g.node("Reshape", [flat, _batch_shape(g, prefix, Ho, Wo, 2)], f"{prefix}grid")


#: transform -> builder of its grid from theta (N, P) in the graph
_GRIDS = {"affine": _affine, "attention": _attention, "similarity": _similarity,
          "projective": _projective, "tps": _tps}


def to_onnx(model: Model, dtype=np.float32):
    """The ONNX model (an ``onnx.ModelProto``, opset 20) computing ``model`` in evaluation mode.

    Parameters
    ----------
    model : Model
        A model of :func:`stn_numpy.build_model` or :func:`stn_numpy.load_model`.
    dtype : float32 or float64
        The graph's dtype (parameters are cast to it). ONNX Runtime's CPU convolution runs
        float32 only; float64 graphs run in ONNX's reference evaluator.

    Returns
    -------
    onnx.ModelProto
        Input ``images`` ``(N, 1, H, W)``; outputs ``logits`` ``(N, 10)`` and, with a
        spatial transformer, ``theta`` ``(N, P)`` and ``V`` ``(N, 1, H_o, W_o)``. Checked
        with ``onnx.checker`` (full check, with shape inference).
    """
    if not isinstance(model, Model):
        raise TypeError(f"model must be a stn_numpy Model (build_model, load_model), got "
                        f"{type(model).__name__}")
    onnx = import_onnx()
    helper = onnx.helper
    t = _elem_type(dtype)
    H, W = model.config["input_size"]
    g = _Graph(dtype, (H, W))
    logits = _sequential(g, model.net, "images", "")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))
    outputs = [helper.make_tensor_value_info("logits", t, ["N", 10])]
    st = model.transformer
    if st is not None:
        Ho, Wo = st.out_size or (H, W)
        P = st.localization[-1].out_features
        outputs += [helper.make_tensor_value_info("theta", t, ["N", P]),
                    helper.make_tensor_value_info("V", t, ["N", 1, Ho, Wo])]
    graph = helper.make_graph(
        g.nodes, f"stn_numpy_{model.config['arch']}",
        [helper.make_tensor_value_info("images", t, ["N", 1, H, W])], outputs,
        initializer=g.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="stn-numpy", doc_string=_describe(model))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _describe(model: Model) -> str:
    c = model.config
    text = f"stn-numpy {c['arch']} for {c['input_size'][0]}x{c['input_size'][1]} images in [0, 1]"
    if model.transformer is not None:
        text += (f"; spatial transformer: {c['transform']} grid, GridSample mode {c['mode']}, "
                 f"padding {c['padding_mode']}, align_corners={c['align_corners']}")
    return text


def export(model: Model, path, dtype=np.float32) -> Path:
    """Write ``model`` as an ONNX file at ``path`` (atomically); returns the path.

    See :func:`to_onnx` for the graph and ``dtype``. A crash mid-write leaves the previous
    file (or none), never a partial one.
    """
    proto = to_onnx(model, dtype)
    path = Path(path)
    atomic_write(path, lambda f: f.write(proto.SerializeToString()))
    return path
