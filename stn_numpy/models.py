"""The named architectures: ``stn`` and ``cnn`` of the PyTorch spatial transformer tutorial,
and ``paper-stcnn`` and ``paper-cnn`` of the paper's distorted-MNIST experiments.

Both share one classifier (the tutorial's)::

    conv 10@5x5 -> maxpool 2 -> relu -> conv 20@5x5 -> dropout2d -> maxpool 2 -> relu
    -> flatten -> fc ->50 -> relu -> dropout -> fc 50->10

``stn`` puts a spatial transformer in front, with the localisation net::

    conv 8@7x7 -> maxpool 2 -> relu -> conv 10@5x5 -> maxpool 2 -> relu
    -> flatten -> fc ->32 -> relu -> fc 32->P

where ``P`` is the number of transform parameters (6 for affine). Flattened sizes follow
from the input size, so 28x28 (MNIST), 42x42 (RTS) and 60x60 (translated, cluttered) all
work.

``paper-cnn`` and ``paper-stcnn`` follow Jaderberg et al. (2015), Appendix A.1, with
fewer filters than the paper's (which are not stated per layer there), so that the
experiment of :mod:`stn_numpy.experiment` fits a small CPU budget. The classifier::

    conv 16@9x9 -> maxpool 2 -> relu -> conv 32@7x7 -> maxpool 2 -> relu -> flatten -> fc ->10

and the localisation net of ``paper-stcnn``::

    [maxpool 2] -> conv 20@5x5 -> maxpool 2 -> relu -> conv 20@5x5 -> maxpool 2 -> relu
    -> flatten -> fc ->20 -> relu -> fc 20->P

``paper-fcn`` and ``paper-stfcn`` are the paper's fully connected pair (Appendix A.1 gives
two hidden layers of 128 to 256 units for the FCN and a 3-layer FCN of 32 units for the
ST-FCN's localisation net; this project takes 128 units for both hidden layers)::

    flatten -> fc ->128 -> relu -> fc 128->128 -> relu -> fc 128->10

and the localisation net of ``paper-stfcn``::

    [maxpool 2] -> flatten -> fc ->32 -> relu -> fc 32->32 -> relu -> fc 32->P

Either localisation net can sit in front of either paper classifier (``loc_net="cnn"`` or
``"fcn"`` in :func:`build_model`); by default each model takes its own.

The paper feeds its localisation net a 2x max-pooled copy of the input; that leading pool
is used for inputs of at least ``PAPER_POOL_FROM`` pixels a side (RTS's 42x42, TC's 60x60),
since a pooled 28x28 image is too small for two 5x5 convolutions with pooling. The
transformer's output size ``st_size`` may differ from the input's: the classifier then
runs on the smaller image, as the paper does for RTS and TC.

Images enter in ``[0, 1]``; the model normalises with the MNIST mean and standard
deviation itself. The transformer samples the raw image, so ``"zeros"`` padding is black
background, and the localisation net and classifier see normalised values.
"""

from __future__ import annotations

import operator

import numpy as np

from ._checks import (
    FLOAT_DTYPES,
    check_choice,
    check_finite,
    check_float_array,
    check_int,
    check_positive_int,
)
from .layers import (
    Conv2d,
    Dropout,
    Dropout2d,
    Flatten,
    Layer,
    Linear,
    MaxPool2d,
    ReLU,
    Sequential,
)
from .sampling import MODES, PADDING_MODES
from .transformer import TRANSFORMS, SpatialTransformer, identity_parameters

__all__ = ["ARCHITECTURES", "LOC_NET_ARCHS", "LOC_NETS", "MIN_INPUT_SIZE", "MIN_ST_SIZE", "Model",
           "Normalize", "build_model", "check_loc_net_arch"]

ARCHITECTURES = ("stn", "cnn", "paper-stcnn", "paper-cnn", "paper-stfcn", "paper-fcn")
# The localisation nets a paper model may take instead of its own (``loc_net``).
LOC_NETS = ("cnn", "fcn")
# The smallest side whose feature maps stay at least 1 x 1: the classifier needs 16
# (conv 5x5 -> 12, pool -> 6, conv 5x5 -> 2, pool -> 1), the localisation net 18
# (conv 7x7 -> 12, pool -> 6, conv 5x5 -> 2, pool -> 1). The paper's classifier needs 24
# (conv 9x9 -> 16, pool -> 8, conv 7x7 -> 2, pool -> 1), its localisation net 16
# (conv 5x5 -> 12, pool -> 6, conv 5x5 -> 2, pool -> 1), 32 when it pools first. The fully
# connected nets take any size.
MIN_INPUT_SIZE = {"cnn": 16, "stn": 18, "paper-cnn": 24, "paper-stcnn": 24, "paper-fcn": 1,
                  "paper-stfcn": 1}
# The transformer's output feeds the classifier, so it needs the classifier's minimum.
MIN_ST_SIZE = {"stn": 16, "paper-stcnn": 24, "paper-stfcn": 1}
_MIN_LOC_SIZE = {"cnn": 16, "fcn": 1}
PAPER_POOL_FROM = 32
PAPER_FILTERS = (16, 32)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
_PIXELS_PER_BATCH = 1 << 19


class Normalize(Layer):
    """``out = (x - mean) / std``; ``dx = dout / std``. No parameters."""

    def __init__(self, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> None:
        super().__init__()
        self.mean, self.std = float(mean), float(std)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """Parameters: ``x`` ndarray of any shape, float. Returns ``out``, shape of ``x``."""
        x = check_float_array("x", x)
        self._out_shape = x.shape
        return (x - x.dtype.type(self.mean)) / x.dtype.type(self.std)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """Parameters: ``dout`` of the shape of ``x``. Returns ``dx``, shape of ``x``."""
        dout = self._check_dout(dout)
        return dout / dout.dtype.type(self.std)


def _after_conv_pool(size: int, kernel: int) -> int:
    return (size - kernel + 1) // 2


def _classifier(H: int, W: int, rng, dtype) -> Sequential:
    h = _after_conv_pool(_after_conv_pool(H, 5), 5)
    w = _after_conv_pool(_after_conv_pool(W, 5), 5)
    return Sequential(
        Normalize(),
        Conv2d(1, 10, 5, rng, dtype), MaxPool2d(2), ReLU(),
        Conv2d(10, 20, 5, rng, dtype), Dropout2d(0.5, rng), MaxPool2d(2), ReLU(),
        Flatten(), Linear(20 * h * w, 50, rng, dtype), ReLU(), Dropout(0.5, rng),
        Linear(50, 10, rng, dtype),
    )


def _localization(H: int, W: int, n_params: int, rng, dtype) -> Sequential:
    h = _after_conv_pool(_after_conv_pool(H, 7), 5)
    w = _after_conv_pool(_after_conv_pool(W, 7), 5)
    return Sequential(
        Normalize(),
        Conv2d(1, 8, 7, rng, dtype), MaxPool2d(2), ReLU(),
        Conv2d(8, 10, 5, rng, dtype), MaxPool2d(2), ReLU(),
        Flatten(), Linear(10 * h * w, 32, rng, dtype), ReLU(),
        Linear(32, n_params, rng, dtype),
    )


def _paper_classifier(H: int, W: int, rng, dtype) -> Sequential:
    c1, c2 = PAPER_FILTERS
    h = _after_conv_pool(_after_conv_pool(H, 9), 7)
    w = _after_conv_pool(_after_conv_pool(W, 9), 7)
    return Sequential(
        Normalize(),
        Conv2d(1, c1, 9, rng, dtype), MaxPool2d(2), ReLU(),
        Conv2d(c1, c2, 7, rng, dtype), MaxPool2d(2), ReLU(),
        Flatten(), Linear(c2 * h * w, 10, rng, dtype),
    )


def _paper_localization_input(H: int, W: int) -> tuple[list[Layer], int, int]:
    """The layers both paper localisation nets start with (normalise; a 2x max-pool from
    ``PAPER_POOL_FROM`` pixels a side on), and the size they leave."""
    if min(H, W) >= PAPER_POOL_FROM:
        return [Normalize(), MaxPool2d(2)], H // 2, W // 2
    return [Normalize()], H, W


def _paper_localization(H: int, W: int, n_params: int, rng, dtype) -> Sequential:
    first, H, W = _paper_localization_input(H, W)
    h = _after_conv_pool(_after_conv_pool(H, 5), 5)
    w = _after_conv_pool(_after_conv_pool(W, 5), 5)
    return Sequential(
        *first,
        Conv2d(1, 20, 5, rng, dtype), MaxPool2d(2), ReLU(),
        Conv2d(20, 20, 5, rng, dtype), MaxPool2d(2), ReLU(),
        Flatten(), Linear(20 * h * w, 20, rng, dtype), ReLU(),
        Linear(20, n_params, rng, dtype),
    )


PAPER_FCN_UNITS, PAPER_FCN_LOC_UNITS = 128, 32


def _paper_fcn_classifier(H: int, W: int, rng, dtype) -> Sequential:
    units = PAPER_FCN_UNITS
    return Sequential(
        Normalize(), Flatten(),
        Linear(H * W, units, rng, dtype), ReLU(),
        Linear(units, units, rng, dtype), ReLU(),
        Linear(units, 10, rng, dtype),
    )


def _paper_fcn_localization(H: int, W: int, n_params: int, rng, dtype) -> Sequential:
    first, H, W = _paper_localization_input(H, W)
    units = PAPER_FCN_LOC_UNITS
    return Sequential(
        *first, Flatten(),
        Linear(H * W, units, rng, dtype), ReLU(),
        Linear(units, units, rng, dtype), ReLU(),
        Linear(units, n_params, rng, dtype),
    )


# arch -> (classifier, localisation net or None)
_BUILDERS = {
    "stn": (_classifier, _localization),
    "cnn": (_classifier, None),
    "paper-stcnn": (_paper_classifier, _paper_localization),
    "paper-cnn": (_paper_classifier, None),
    "paper-stfcn": (_paper_fcn_classifier, _paper_fcn_localization),
    "paper-fcn": (_paper_fcn_classifier, None),
}
_PAPER_LOC_NETS = {"cnn": _paper_localization, "fcn": _paper_fcn_localization}
_OWN_LOC_NET = {"paper-stcnn": "cnn", "paper-stfcn": "fcn"}
LOC_NET_ARCHS = tuple(_OWN_LOC_NET)  # the models whose localisation net loc_net chooses


class Model:
    """A classifier for ``(N, 1, H, W)`` images in ``[0, 1]``, optionally with a transformer.

    ``params`` / ``grads`` are flat dicts keyed like PyTorch's ``state_dict``
    (``"0.localization.1.weight"``, ``"2.bias"``, ...).

    Parameters
    ----------
    net : Sequential
        The layers; for ``stn`` the first one is the :class:`SpatialTransformer`.
    config : dict
        What :func:`build_model` needs to rebuild the architecture (saved in checkpoints).
    """

    def __init__(self, net: Sequential, config: dict) -> None:
        self.net = net
        self.config = dict(config)

    def __repr__(self) -> str:
        return f"Model({self.config['arch']!r}, {self.net!r})"

    @property
    def params(self) -> dict[str, np.ndarray]:
        return self.net.params

    @property
    def grads(self) -> dict[str, np.ndarray]:
        return self.net.grads

    @property
    def transformer(self) -> SpatialTransformer | None:
        first = self.net[0]
        return first if isinstance(first, SpatialTransformer) else None

    @property
    def dtype(self):
        return next(iter(self.params.values())).dtype

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """Logits ``(N, 10)`` for images ``x`` ``(N, 1, H, W)`` of the parameters' dtype."""
        return self.net.forward(x, train=train)

    def backward(self, dlogits: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """Backpropagate ``dL/dlogits`` ``(N, 10)``; fills :attr:`grads`, returns ``dx``.

        ``input_grad=False`` (what training needs) skips the gradient with respect to the
        images and returns None; :attr:`grads` come out the same.
        """
        return self.net.backward(dlogits, input_grad=input_grad)

    def _images(self, X) -> np.ndarray:
        X = np.asarray(X)
        if not np.issubdtype(X.dtype, np.floating):
            raise TypeError(f"X must be float images in [0, 1], got dtype {X.dtype}")
        if X.ndim == 3:
            X = X[:, None]
        H, W = self.config["input_size"]
        if X.ndim != 4 or X.shape[1:] != (1, H, W):
            raise ValueError(f"X must have shape (N, {H}, {W}) or (N, 1, {H}, {W}), "
                             f"got {X.shape}")
        check_finite("X", X)
        # The model normalises with MNIST's statistics of [0, 1] pixels: 0-255 images
        # would pass every other check and give confident nonsense.
        if X.size and (X.min() < 0 or X.max() > 1):
            raise ValueError(f"X must hold images in [0, 1], got values in "
                             f"[{X.min()}, {X.max()}]; divide uint8-range (0-255) images by 255")
        return X.astype(self.dtype, copy=False)

    def _batched(self, fn, X, batch_size) -> np.ndarray:
        if batch_size is not None:
            batch_size = check_positive_int("batch_size", batch_size)
        X = self._images(X)
        if batch_size is None:
            # A fixed pixel budget per batch bounds the convolutions' column buffers
            # (about 0.3 GB at most) whatever the image size.
            batch_size = max(1, _PIXELS_PER_BATCH // (X.shape[2] * X.shape[3]))
        outs = [fn(X[i:i + batch_size]) for i in range(0, len(X), batch_size)]
        if not outs:
            return fn(X)  # an empty batch still goes through the net for its output shape
        return np.concatenate(outs)

    def predict(self, X, batch_size: int | None = None) -> np.ndarray:
        """Logits ``(N, 10)`` in evaluation mode for images ``X`` in ``[0, 1]``.

        ``X`` has shape ``(N, 1, H, W)`` or ``(N, H, W)``, any float dtype, finite values
        in ``[0, 1]`` (``ValueError`` otherwise); ``N = 0`` gives logits of shape
        ``(0, 10)``. It is processed in batches of ``batch_size`` images, a positive int
        (by default as many as fit 2**19 pixels).
        """
        return self._batched(lambda x: self.net.forward(x, train=False), X, batch_size)

    def transform(self, X, batch_size: int | None = None) -> np.ndarray:
        """The transformer's output images ``(N, 1, H_o, W_o)`` for images ``X`` in ``[0, 1]``.

        ``X`` and ``batch_size`` as in :meth:`predict`.
        """
        if self.transformer is None:
            raise ValueError(f"model {self.config['arch']!r} has no spatial transformer")
        return self._batched(lambda x: self.transformer.forward(x, train=False), X, batch_size)


def build_model(arch: str = "stn", input_size=(28, 28), transform: str = "affine",
                mode: str = "bilinear", padding_mode: str = "zeros", align_corners=False,
                seed: int = 0, dtype=np.float32, st_size=None, loc_net=None) -> Model:
    """Build a model of ``ARCHITECTURES`` for ``input_size = (H, W)``, seeded by ``seed``.

    ``transform``, ``mode``, ``padding_mode`` and ``align_corners`` configure the
    transformer of ``stn`` and ``paper-stcnn`` (see
    :class:`~stn_numpy.transformer.SpatialTransformer`); ``st_size`` (an int or a pair
    ``(H_o, W_o)``, None for the input's size) is the size of the transformer's output, on
    which the classifier then runs. ``loc_net`` (``"cnn"`` or ``"fcn"``, None for the
    model's own) puts the other paper localisation net in front of a paper model's
    classifier. Dropout masks come from the same seeded generator, so one seed fixes the
    whole run.

    Every argument is checked first, for ``cnn`` too (which ignores the transformer's),
    so a configuration that could not be rebuilt never reaches a checkpoint.

    Raises
    ------
    ValueError
        Unknown ``arch``, ``transform``, ``mode``, ``padding_mode``, a non-bool
        ``align_corners``; ``input_size`` not a pair or below ``MIN_INPUT_SIZE[arch]``
        (16 for ``cnn``, 18 for ``stn``, 24 for the paper's convolutional models, 16 for
        a convolutional localisation net); ``seed`` not an int >= 0; ``st_size`` below
        ``MIN_ST_SIZE[arch]`` or given for a model without transformer; ``loc_net`` not in
        ``LOC_NETS`` or given for a model that is not a paper model with a transformer.
    TypeError
        ``input_size`` not of ints; ``dtype`` not float32 or float64.
    """
    check_choice("arch", arch, ARCHITECTURES)
    if loc_net is not None:
        check_choice("loc_net", loc_net, LOC_NETS)
        check_loc_net_arch(arch)
    loc_net = _OWN_LOC_NET.get(arch) if loc_net is None else loc_net
    H, W = _check_input_size(input_size, arch, loc_net)
    check_choice("transform", transform, TRANSFORMS)
    check_choice("mode", mode, MODES)
    check_choice("padding_mode", padding_mode, PADDING_MODES)
    check_choice("align_corners", align_corners, (True, False))
    if np.dtype(dtype) not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
    seed = check_int("seed", seed)
    make_classifier, make_localization = _BUILDERS[arch]
    Ho, Wo = _check_st_size(st_size, arch, (H, W), make_localization is not None)
    rng = np.random.default_rng(seed)
    config = {"arch": arch, "input_size": [H, W], "transform": transform, "mode": mode,
              "padding_mode": padding_mode, "align_corners": bool(align_corners),
              "seed": seed, "dtype": np.dtype(dtype).name,
              "st_size": None if st_size is None else [Ho, Wo], "loc_net": loc_net}
    classifier = make_classifier(Ho, Wo, rng, dtype)
    if make_localization is None:
        return Model(classifier, config)
    if loc_net is not None:
        make_localization = _PAPER_LOC_NETS[loc_net]
    n_params = identity_parameters(transform).size
    stn = SpatialTransformer(make_localization(H, W, n_params, rng, dtype), transform,
                             out_size=(Ho, Wo), mode=mode, padding_mode=padding_mode,
                             align_corners=align_corners)
    return Model(Sequential(stn, *classifier), config)


MAX_ST_SCALE = 4


def check_loc_net_arch(arch: str) -> None:
    """``ValueError`` unless ``arch`` is a model whose localisation net ``loc_net`` chooses."""
    if arch not in LOC_NET_ARCHS:
        raise ValueError(f"loc_net chooses a paper model's localisation net; arch={arch!r} "
                         f"has none to choose (use one of {list(LOC_NET_ARCHS)})")


def _check_st_size(st_size, arch: str, input_size, has_transformer: bool) -> tuple[int, int]:
    if st_size is None:
        return input_size
    if not has_transformer:
        raise ValueError(f"st_size needs a model with a spatial transformer; "
                         f"arch={arch!r} has none")
    pair = (st_size, st_size) if isinstance(st_size, (int, np.integer)) else st_size
    try:
        Ho, Wo = (operator.index(s) for s in pair)
    except (TypeError, ValueError):
        raise TypeError(f"st_size must be an int or a pair (H_o, W_o) of ints, "
                        f"got {st_size!r}") from None
    minimum = MIN_ST_SIZE[arch]
    if Ho < minimum or Wo < minimum:
        raise ValueError(f"st_size must be at least {minimum}x{minimum} for arch={arch!r}, "
                         f"got {(Ho, Wo)}")
    # The classifier's weights grow with the output's area; beyond a few times the input's
    # side a transformer only interpolates, and a typo (100000) would ask for terabytes.
    limit = MAX_ST_SCALE * max(input_size)
    if Ho > limit or Wo > limit:
        raise ValueError(f"st_size must be at most {MAX_ST_SCALE}x the input's larger side "
                         f"({limit}), got {(Ho, Wo)}")
    return Ho, Wo


def _check_input_size(input_size, arch: str, loc_net) -> tuple[int, int]:
    try:
        H, W = (operator.index(s) for s in input_size)
    except TypeError:
        raise TypeError(f"input_size must be a pair (H, W) of ints, got {input_size!r}") from None
    except ValueError:
        raise ValueError(f"input_size must be a pair (H, W), got {input_size!r}") from None
    minimum = MIN_INPUT_SIZE[arch]
    if loc_net is not None and loc_net != _OWN_LOC_NET[arch]:
        minimum = max(MIN_ST_SIZE[arch], _MIN_LOC_SIZE[loc_net])
    if H < minimum or W < minimum:
        where = f"arch={arch!r}" + ("" if loc_net is None else f", loc_net={loc_net!r}")
        raise ValueError(f"input_size must be at least {minimum}x{minimum} for {where}, "
                         f"got {(H, W)}")
    return H, W
