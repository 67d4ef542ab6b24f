"""Neural-network layers with hand-derived backward passes, and the cross-entropy loss.

Conventions
-----------
* Images are ``(N, C, H, W)`` (batch, channels, rows, columns), features ``(N, D)``.
* A layer is an object with ``forward(x, train=True) -> out`` and ``backward(dout) -> dx``;
  a layer with parameters also takes ``backward(dout, input_grad=False)``, which fills
  its gradients but skips ``dx`` (returns None), for a layer whose input is the data.
  ``forward`` keeps on the layer what ``backward`` needs (the cache), so ``backward``
  always refers to the most recent ``forward``. ``train`` changes dropout here; a
  :class:`~stn_numpy.SpatialTransformer` run with ``train=False`` keeps no cache at all,
  so its ``backward`` needs a ``forward`` with ``train=True``.
* A gradient is named ``d`` + the variable it belongs to: ``dout`` is the upstream gradient
  ``dL/dout``, ``dx`` the one returned for the input. ``backward`` stores the parameter
  gradients in ``layer.grads`` under the names used in ``layer.params`` (``"weight"``,
  ``"bias"``); a :class:`Sequential` prefixes them with the layer's index (``"0.weight"``),
  like the keys of PyTorch's ``state_dict``.
* Parameters are initialised as PyTorch's defaults, from a ``numpy.random.Generator``, and
  keep their dtype (float32 for training, float64 for gradient checks: :meth:`Layer.astype`).
  Outputs keep the dtype of the input; an output may be a non-contiguous view.

The layers are those of the Spatial Transformer Networks MNIST models (Jaderberg et al.,
2015, Sec. 4.1): convolutions, max-pooling, ReLU, dropout and fully connected layers.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ._checks import check_float_array, check_positive_int
from ._parallel import bands, parallel_map

__all__ = [
    "Layer",
    "Conv2d",
    "MaxPool2d",
    "ReLU",
    "Flatten",
    "Linear",
    "Dropout",
    "Dropout2d",
    "Sequential",
    "log_softmax",
    "cross_entropy",
]


class Layer:
    """Base class: a forward/backward pair with named parameters and gradients.

    Attributes
    ----------
    params : dict[str, ndarray]
        The trainable arrays, updated in place by an optimizer.
    grads : dict[str, ndarray]
        ``dL/dparam`` for each key of ``params``, filled by :meth:`backward`.
    """

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self._out_shape: tuple[int, ...] | None = None

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """Compute the output for input ``x`` and keep what :meth:`backward` needs."""
        raise NotImplementedError

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """Return ``dx = dL/dx`` given ``dout = dL/dout``; fill :attr:`grads`."""
        raise NotImplementedError

    def astype(self, dtype) -> Layer:
        """Convert every parameter to ``dtype`` (replacing the arrays); return ``self``.

        An optimizer holds references to the parameter arrays, so build it after this call.
        """
        for name, p in self.params.items():
            self.params[name] = p.astype(dtype)
        self.grads.clear()
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def _check_dout(self, dout) -> np.ndarray:
        if self._out_shape is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return check_float_array("dout", dout, shape=self._out_shape)


def _init_uniform(rng: np.random.Generator, bound: float, shape, dtype) -> np.ndarray:
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


# im2col and col2im go to worker threads only from this many column-matrix values on
# (16 MB in float32). Below it one call is faster: a hand-off to a thread costs about as
# much as copying a few megabytes. Measured on a 2-core Xeon: two bands 1.5-3x faster at
# 6M values and more, up to 2x slower at 1-2M.
_PARALLEL_MIN_VALUES = 2**22


def _row_bands(rows: int, values: int) -> list[tuple[int, int]]:
    """Bands of image rows for im2col and col2im (:func:`~stn_numpy._parallel.bands`).
    With the batch innermost, a band keeps every copy a run of whole image rows (``W N``
    contiguous values), and an element's sum never spans two bands, so results do not
    depend on the split."""
    return bands(rows, values, _PARALLEL_MIN_VALUES)


def _element_strides(a: np.ndarray) -> tuple[int, ...]:
    """Strides in elements: equal for two arrays of one shape that share a memory layout."""
    return tuple(s // a.itemsize for s in a.strides)


# --------------------------------------------------------------------------------------
# Convolution and pooling
# --------------------------------------------------------------------------------------


class Conv2d(Layer):
    """2-D convolution (cross-correlation), stride 1, no padding, as ``torch.nn.Conv2d``.

    Forward, for ``x`` of shape ``(N, C, H, W)`` and weight ``w`` of shape ``(F, C, k, k)``::

        out[n, o, i, j] = b[o] + sum_{c, p, q} w[o, c, p, q] x[n, c, i + p, j + q]

    with ``out`` of shape ``(N, F, H - k + 1, W - k + 1)``. Backward::

        dw[o, c, p, q] = sum_{n, i, j} dout[n, o, i, j] x[n, c, i + p, j + q]
        db[o]          = sum_{n, i, j} dout[n, o, i, j]
        dx[n, c, h, v] = sum_{o, p, q} dout[n, o, h - p, v - q] w[o, c, p, q]

    ``dx`` is the "full" correlation of ``dout`` (zero outside its extent) with the
    kernel rotated by 180 degrees.

    Implementation (im2col): the ``k * k`` shifted copies of ``x`` form a column matrix
    ``X`` of shape ``(C k k, H_o W_o N)``, so that ``out = W X + b`` with ``W`` the weight
    reshaped to ``(F, C k k)``, ``dW = dOut X^T`` and ``dX = W^T dOut``, three matrix
    products. ``dx`` is then ``dX`` summed back onto the image, one strided add per kernel
    offset (col2im). This is faster than an im2col of the zero-padded ``dout`` for ``dx``,
    whose column matrix is ``F / C * (H W) / (H_o W_o)`` times larger. The batch axis is
    kept last in every column matrix so each copy and add moves long contiguous rows.

    Parameters
    ----------
    in_channels, out_channels, kernel_size : int
        ``C``, ``F`` and ``k`` (square kernels).
    rng : numpy.random.Generator or int or None
        Source of the initial weights (``np.random.default_rng(rng)``).
    dtype : numpy float dtype
        Dtype of the parameters.

    Notes
    -----
    PyTorch's default initialisation: ``weight`` and ``bias`` are drawn from ``U(-b, b)``
    with ``b = 1 / sqrt(C k k)`` (``kaiming_uniform_`` with ``a = sqrt(5)`` for the weight).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, rng=None,
                 dtype=np.float32) -> None:
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        rng = np.random.default_rng(rng)
        C, F, k = self.in_channels, self.out_channels, self.kernel_size
        bound = 1.0 / math.sqrt(C * k * k)
        self.params["weight"] = _init_uniform(rng, bound, (F, C, k, k), dtype)
        self.params["bias"] = _init_uniform(rng, bound, (F,), dtype)
        self._cache = None
        # Reused between calls: fresh multi-megabyte arrays every step cost page faults
        # that rival the matrix products themselves.
        self._buffers: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"Conv2d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size})"

    def _buffer(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._buffers[name] = np.empty(shape, dtype=dtype)
        return buf

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """Convolve.

        Parameters
        ----------
        x : ndarray, shape (N, C, H, W), float, with ``H, W >= k``
        train : bool
            Unused.

        Returns
        -------
        out : ndarray, shape (N, F, H - k + 1, W - k + 1)
        """
        x = check_float_array("x", x, shape=(None, self.in_channels, None, None))
        N, C, H, W = x.shape
        k, F = self.kernel_size, self.out_channels
        if H < k or W < k:
            raise ValueError(f"x must have H, W >= kernel_size={k}, got shape {x.shape}")
        Ho, Wo = H - k + 1, W - k + 1
        xt = np.ascontiguousarray(x.transpose(1, 2, 3, 0))  # (C, H, W, N)
        cols = self._buffer("cols", (C, k, k, Ho, Wo, N), x.dtype)
        windows = sliding_window_view(xt, (k, k), axis=(1, 2)).transpose(0, 4, 5, 1, 2, 3)
        parallel_map(lambda band: np.copyto(cols[:, :, :, band[0]:band[1]],
                                            windows[:, :, :, band[0]:band[1]]),
                     _row_bands(Ho, cols.size))
        cols = cols.reshape(C * k * k, Ho * Wo * N)
        out = self.params["weight"].reshape(F, -1) @ cols
        out += self.params["bias"][:, None]
        self._cache = (x.shape, cols)
        self._out_shape = (N, F, Ho, Wo)
        return out.reshape(F, Ho, Wo, N).transpose(3, 0, 1, 2)

    def backward(self, dout: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """Gradients of the convolution; fills ``grads["weight"]`` and ``grads["bias"]``.

        Parameters
        ----------
        dout : ndarray, shape (N, F, H - k + 1, W - k + 1)
        input_grad : bool
            False skips ``dx`` (returns None): for a layer that sees the data itself.

        Returns
        -------
        dx : ndarray, shape (N, C, H, W), or None
        """
        dout = self._check_dout(dout)
        (_, C, H, W), cols = self._cache
        N, F, Ho, Wo = dout.shape
        k = self.kernel_size
        w = self.params["weight"]
        dout_mat = dout.transpose(1, 2, 3, 0).reshape(F, Ho * Wo * N)
        # cols @ dout_mat^T, then transposed: OpenBLAS runs this orientation of the
        # skinny, long product about twice as fast as dout_mat @ cols^T.
        self.grads["weight"] = np.ascontiguousarray((cols @ dout_mat.T).T).reshape(w.shape)
        self.grads["bias"] = dout_mat.sum(axis=1)
        if not input_grad:
            return None
        w_mat = w.transpose(2, 3, 1, 0).reshape(k * k * C, F)
        dcols = self._buffer("dcols", (k * k * C, Ho * Wo * N), np.result_type(w, dout))
        np.matmul(w_mat, dout_mat, out=dcols)
        dcols = dcols.reshape(k, k, C, Ho, Wo, N)
        dxt = np.zeros((C, H, W, N), dtype=dcols.dtype)

        def col2im(band):  # the rows h0 <= h < h1 of dx, summed in the same order always
            h0, h1 = band
            for p in range(k):
                i0, i1 = max(h0 - p, 0), min(h1 - p, Ho)
                if i0 >= i1:  # this kernel row reaches no row of the band
                    continue
                for q in range(k):
                    dxt[:, i0 + p:i1 + p, q:q + Wo] += dcols[p, q, :, i0:i1]

        parallel_map(col2im, _row_bands(H, dcols.size))
        return dxt.transpose(3, 0, 1, 2)


class MaxPool2d(Layer):
    """Non-overlapping max-pooling (stride = kernel size), as ``torch.nn.MaxPool2d(k)``.

    Forward, for ``x`` of shape ``(N, C, H, W)``::

        out[n, c, i, j] = max_{0 <= p, q < k} x[n, c, k i + p, k j + q]

    with ``out`` of shape ``(N, C, H // k, W // k)``: trailing rows and columns that do not
    fill a window are dropped. Backward routes each ``dout[n, c, i, j]`` to the position of
    the maximum in its window, and to the first one in row-major order when several tie
    (PyTorch's rule); every other entry of ``dx`` is zero. A window holding NaN gives NaN
    and routes its gradient to its last NaN in row-major order, as PyTorch's CPU kernel.

    The window offsets ``(p, q)`` are visited one at a time, each as a strided view of the
    whole batch: ``k * k`` elementwise passes, faster than an ``argmax`` over a reshaped
    copy of the windows.

    Parameters
    ----------
    kernel_size : int
        ``k``, the window side and stride.
    """

    def __init__(self, kernel_size: int = 2) -> None:
        super().__init__()
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        self._cache = None

    def __repr__(self) -> str:
        return f"MaxPool2d(kernel_size={self.kernel_size})"

    def _window_offsets(self, a: np.ndarray):
        """Views ``a[:, :, p::k, q::k]`` (trimmed to whole windows), in row-major order.

        Slices, not a reshape: they stay views whatever the memory layout of ``a`` (a
        convolution's output has the batch innermost), so no copy is made and NumPy
        runs each pass along that layout's contiguous axis.
        """
        k = self.kernel_size
        Ho, Wo = a.shape[2] // k, a.shape[3] // k
        return [a[:, :, p:Ho * k:k, q:Wo * k:k] for p in range(k) for q in range(k)]

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """Pool.

        Parameters
        ----------
        x : ndarray, shape (N, C, H, W), float, with ``H, W >= k``
        train : bool
            Unused.

        Returns
        -------
        out : ndarray, shape (N, C, H // k, W // k)
        """
        x = check_float_array("x", x, ndim=4)
        k = self.kernel_size
        if x.shape[2] < k or x.shape[3] < k:
            raise ValueError(f"x must have H, W >= kernel_size={k}, got shape {x.shape}")
        offsets = self._window_offsets(x)
        # order="K" everywhere: every array here shares x's memory layout. An operand in
        # another layout (np.where's C-order result, say) makes each pass several times
        # slower than a pass over matching strides.
        out = offsets[0].copy(order="K")
        for candidate in offsets[1:]:
            np.maximum(out, candidate, out=out)
        # The first offset attaining the maximum is the number of leading offsets that
        # miss it: a running AND of "missed" flags, summed (no np.where, which is slow).
        index_dtype = np.min_scalar_type(k * k)
        missed = np.not_equal(offsets[0], out)
        argmax = missed.astype(index_dtype)
        missed_here = np.empty_like(missed)
        for candidate in offsets[1:-1]:
            np.not_equal(candidate, out, out=missed_here)
            np.logical_and(missed, missed_here, out=missed)
            argmax += missed
        # np.maximum propagates NaN, but NaN == NaN is False: PyTorch's scan
        # (``val > max || isnan(val)``) sends the gradient to the last NaN of the window.
        if np.isnan(out).any():
            for j, candidate in enumerate(offsets):
                argmax[np.isnan(candidate)] = j
        self._cache = (x, argmax)
        self._out_shape = out.shape
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """Route ``dout`` to the (first) maximum of each window.

        Parameters
        ----------
        dout : ndarray, shape (N, C, H // k, W // k)

        Returns
        -------
        dx : ndarray, shape (N, C, H, W)
        """
        dout = self._check_dout(dout)
        x, argmax = self._cache
        # dx in x's memory layout and dout copied into argmax's (the same) once, so that
        # every pass below runs over matching strides (see forward).
        if _element_strides(dout) != _element_strides(argmax):
            dout_copy = np.empty_like(argmax, dtype=dout.dtype)
            np.copyto(dout_copy, dout)
            dout = dout_copy
        dx = np.zeros_like(x, dtype=dout.dtype)
        for j, dx_offset in enumerate(self._window_offsets(dx)):
            np.multiply(dout, argmax == j, out=dx_offset)
        return dx


# --------------------------------------------------------------------------------------
# Elementwise and reshaping layers
# --------------------------------------------------------------------------------------


class ReLU(Layer):
    """Rectified linear unit: ``out = max(x, 0)``; ``dx = dout * [x > 0]``.

    The derivative at ``x = 0`` is taken as 0, as in PyTorch.
    """

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """Parameters: ``x`` ndarray of any shape, float. Returns ``out``, shape of ``x``."""
        x = check_float_array("x", x)
        self._mask = x > 0
        self._out_shape = x.shape
        return np.maximum(x, 0)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """Parameters: ``dout`` of the shape of ``x``. Returns ``dx``, shape of ``x``."""
        dout = self._check_dout(dout)
        return dout * self._mask


class Flatten(Layer):
    """Reshape ``(N, d_1, ..., d_k) -> (N, d_1 * ... * d_k)``; backward reshapes back."""

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """Parameters: ``x`` ndarray, shape (N, ...), float. Returns ``out``, shape (N, D)."""
        x = check_float_array("x", x)
        if x.ndim < 1:
            raise ValueError(f"x must have shape (N, ...), got a scalar of shape {x.shape}")
        self._x_shape = x.shape
        # An explicit D, not -1: with N = 0 the size 0 cannot determine a -1.
        out = x.reshape(len(x), math.prod(x.shape[1:]))
        self._out_shape = out.shape
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """Parameters: ``dout`` ndarray, shape (N, D). Returns ``dx``, shape (N, ...)."""
        dout = self._check_dout(dout)
        return dout.reshape(self._x_shape)


class Linear(Layer):
    """Fully connected layer, as ``torch.nn.Linear``.

    Forward: ``out = x W^T + b`` for ``x`` of shape ``(N, D)``, ``W`` of shape ``(M, D)``.
    Backward: ``dx = dout W``, ``dW = dout^T x``, ``db = sum_n dout[n]``.

    Parameters
    ----------
    in_features, out_features : int
        ``D`` and ``M``.
    rng : numpy.random.Generator or int or None
        Source of the initial weights.
    dtype : numpy float dtype
        Dtype of the parameters.

    Notes
    -----
    PyTorch's default initialisation: ``weight`` and ``bias`` from ``U(-b, b)``,
    ``b = 1 / sqrt(D)``.
    """

    def __init__(self, in_features: int, out_features: int, rng=None, dtype=np.float32) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        rng = np.random.default_rng(rng)
        bound = 1.0 / math.sqrt(self.in_features)
        self.params["weight"] = _init_uniform(rng, bound, (self.out_features, self.in_features),
                                              dtype)
        self.params["bias"] = _init_uniform(rng, bound, (self.out_features,), dtype)

    def __repr__(self) -> str:
        return f"Linear({self.in_features}, {self.out_features})"

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """Parameters: ``x`` ndarray, shape (N, D), float. Returns ``out``, shape (N, M)."""
        x = check_float_array("x", x, shape=(None, self.in_features))
        self._x = x
        self._out_shape = (x.shape[0], self.out_features)
        return x @ self.params["weight"].T + self.params["bias"]

    def backward(self, dout: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """Parameters: ``dout`` ndarray, shape (N, M); ``input_grad=False`` skips ``dx``.

        Returns ``dx``, shape (N, D), or None.
        """
        dout = self._check_dout(dout)
        self.grads["weight"] = dout.T @ self._x
        self.grads["bias"] = dout.sum(axis=0)
        return dout @ self.params["weight"] if input_grad else None


# --------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------


class Dropout(Layer):
    """Inverted dropout, as ``torch.nn.Dropout`` (Srivastava et al., 2014).

    In training ``out = x * m / (1 - p)`` with ``m`` a Bernoulli(1 - p) mask drawn from the
    layer's own generator, and ``dx = dout * m / (1 - p)``, so ``E[out] = x``; with ``p = 1``
    everything is zeroed. In evaluation (``train=False``) it is the identity.

    Parameters
    ----------
    p : float in [0, 1]
        Probability of zeroing an entry.
    rng : numpy.random.Generator or int or None
        The generator the masks are drawn from, kept as ``self.rng``: save and restore
        ``self.rng.bit_generator.state`` to resume a seeded run exactly.
    """

    _channelwise = False

    def __init__(self, p: float = 0.5, rng=None) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, numbers.Real):
            raise TypeError(f"p must be a number in [0, 1], got {type(p).__name__} {p!r}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        self.p = float(p)
        self.rng = np.random.default_rng(rng)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"

    def _mask_shape(self, x: np.ndarray) -> tuple[int, ...]:
        return x.shape

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """Parameters: ``x`` ndarray, float. Returns ``out``, shape of ``x``."""
        x = check_float_array("x", x)
        mask_shape = self._mask_shape(x)
        self._out_shape = x.shape
        if not train or self.p == 0.0:
            self._mask = None
            return x
        # Drawn in float64 whatever the dtype of x, so a seed gives one mask for both.
        keep = self.rng.random(mask_shape) >= self.p
        scale = 0.0 if self.p == 1.0 else 1.0 / (1.0 - self.p)
        self._mask = (keep * scale).astype(x.dtype)
        return x * self._mask

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """Parameters: ``dout`` of the shape of ``x``. Returns ``dx``, shape of ``x``."""
        dout = self._check_dout(dout)
        return dout if self._mask is None else dout * self._mask


class Dropout2d(Dropout):
    """Channel dropout, as ``torch.nn.Dropout2d`` (Tompson et al., 2015).

    As :class:`Dropout`, but one mask entry per ``(n, c)`` zeroes or scales the whole
    feature map ``x[n, c]``; ``x`` must have shape ``(N, C, H, W)``.
    """

    def _mask_shape(self, x: np.ndarray) -> tuple[int, ...]:
        check_float_array("x", x, ndim=4)
        return x.shape[:2] + (1, 1)


# --------------------------------------------------------------------------------------
# Container
# --------------------------------------------------------------------------------------


class Sequential(Layer):
    """Layers applied in order; backward runs them in reverse.

    ``params`` and ``grads`` are flat dicts keyed ``"<index>.<name>"`` (``"0.weight"``,
    ``"3.bias"``), the index being the layer's position, as in PyTorch's ``state_dict``.
    Both are rebuilt on access but hold the layers' own arrays.
    """

    def __init__(self, *layers: Layer) -> None:
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layers[{i}] must be a Layer, got {type(layer).__name__}")
        self.layers = list(layers)

    def __repr__(self) -> str:
        inner = "".join(f"\n  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({inner}\n)"

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> Layer:
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    @property
    def params(self) -> dict[str, np.ndarray]:
        return {f"{i}.{name}": p for i, layer in enumerate(self.layers)
                for name, p in layer.params.items()}

    @property
    def grads(self) -> dict[str, np.ndarray]:
        return {f"{i}.{name}": g for i, layer in enumerate(self.layers)
                for name, g in layer.grads.items()}

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """``out = layers[-1](...layers[0](x))``."""
        for layer in self.layers:
            x = layer.forward(x, train=train)
        return x

    def backward(self, dout: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """``dx = layers[0].backward(...layers[-1].backward(dout))``.

        With ``input_grad=False`` the chain stops at its first layer with parameters,
        asked for no ``dx`` of its own (as PyTorch skips the gradient of data): the
        layers before it have nothing to learn. Returns None then.
        """
        first = 0
        if not input_grad:
            first = next((i for i, layer in enumerate(self.layers) if layer.params),
                         len(self.layers))
        for i in range(len(self.layers) - 1, first - 1, -1):
            layer = self.layers[i]
            dout = layer.backward(dout) if input_grad or i > first else layer.backward(
                dout, input_grad=False)
        return dout if input_grad else None

    def astype(self, dtype) -> Sequential:
        """Convert the parameters of every layer to ``dtype``; return ``self``."""
        for layer in self.layers:
            layer.astype(dtype)
        return self


# --------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax, ``z[n, j] - log sum_i exp(z[n, i])``.

    The row maximum is subtracted before exponentiating, so no ``exp`` overflows.

    Parameters
    ----------
    z : ndarray, shape (N, K), float

    Returns
    -------
    ndarray, shape (N, K)
    """
    z = check_float_array("z", z, ndim=2)
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean negative log-likelihood of the log-softmax, as ``F.cross_entropy``.

    ``loss = -1/N sum_n log_softmax(logits)[n, y[n]]`` and its gradient
    ``dlogits = (softmax(logits) - onehot(y)) / N``.

    Parameters
    ----------
    logits : ndarray, shape (N, K), float
    y : ndarray, shape (N,), int, entries in ``[0, K)``

    Returns
    -------
    loss : float
    dlogits : ndarray, shape (N, K), dtype of ``logits``
    """
    logits = check_float_array("logits", logits, ndim=2)
    logp = log_softmax(logits)
    N, K = logp.shape
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
    if y.shape != (N,):
        raise ValueError(f"y must have shape ({N},) to match logits {logits.shape}, got {y.shape}")
    if N == 0:
        raise ValueError("logits must hold at least one example, got N=0")
    if y.min() < 0 or y.max() >= K:
        raise ValueError(f"y must be in [0, {K}), got values in [{y.min()}, {y.max()}]")
    rows = np.arange(N)
    loss = -float(logp[rows, y].mean())
    dlogits = np.exp(logp)
    dlogits[rows, y] -= 1.0
    dlogits /= N
    return loss, dlogits
