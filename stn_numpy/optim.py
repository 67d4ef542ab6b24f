"""Gradient-descent optimizers with PyTorch's update rules: SGD (with momentum) and Adam.

An optimizer is built from a dict ``name -> parameter array`` (a model's ``params``) and
updates those arrays in place on every ``step(grads)``, where ``grads`` has the same keys.
Its state (step count, moment buffers, hyper-parameters) round-trips through
``state_dict()`` / ``load_state_dict()`` as a flat dict of numbers and arrays, which
``np.savez`` can store, so a resumed run continues bit for bit.

Weight decay is the L2 penalty folded into the gradient, ``g <- g + weight_decay * p``,
as in ``torch.optim.SGD`` and ``torch.optim.Adam`` (not AdamW's decoupled decay).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["SGD", "Adam"]


class _Optimizer:
    """Shared bookkeeping: parameter checks, gradient checks, state (de)serialisation.

    Subclasses list their hyper-parameters in ``_hyper`` and their per-parameter buffers in
    ``_buffers`` (attribute names of dicts ``name -> array``).
    """

    _hyper: tuple[str, ...] = ()
    _buffers: tuple[str, ...] = ()

    def __init__(self, params: dict[str, np.ndarray], lr: float, weight_decay: float,
                 lr_scale: dict[str, float] | None = None) -> None:
        if not isinstance(params, dict) or not params:
            raise ValueError("params must be a non-empty dict name -> parameter array")
        for name, p in params.items():
            if not isinstance(p, np.ndarray) or not np.issubdtype(p.dtype, np.floating):
                raise TypeError(f"params[{name!r}] must be a float numpy array, got "
                                f"{type(p).__name__} {getattr(p, 'dtype', '')}".rstrip())
        _check_nonnegative("lr", lr)
        _check_nonnegative("weight_decay", weight_decay)
        self.params = dict(params)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.lr_scale = _check_lr_scale(lr_scale, self.params)
        self.step_count = 0

    def step(self, grads: dict[str, np.ndarray]) -> None:
        """Update every parameter in place from its gradient.

        Parameters
        ----------
        grads : dict[str, ndarray]
            ``dL/dparam`` for exactly the keys of ``params``, each a float array of the
            parameter's shape (``TypeError`` or ``ValueError`` otherwise).
        """
        self._check_grads(grads)
        self.step_count += 1
        for name, p in self.params.items():
            g = grads[name]
            if self.weight_decay != 0.0:
                g = g + self.weight_decay * p
            self._update(name, p, g, self.lr * self.lr_scale.get(name, 1.0))

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        raise NotImplementedError

    def _check_grads(self, grads) -> None:
        if not isinstance(grads, dict):
            raise TypeError(f"grads must be a dict name -> array, got {type(grads).__name__}")
        missing = sorted(set(self.params) - set(grads))
        extra = sorted(set(grads) - set(self.params))
        if missing or extra:
            raise ValueError(f"grads must have the keys of params: missing {missing}, "
                             f"unexpected {extra}")
        for name, p in self.params.items():
            g = grads[name]
            # An int or object array would be cast into p's dtype by the in-place update,
            # silently truncating the step or failing deep inside numpy.
            if not isinstance(g, np.ndarray) or not np.issubdtype(g.dtype, np.floating):
                raise TypeError(f"grads[{name!r}] must be a float numpy array, got "
                                f"{type(g).__name__} {getattr(g, 'dtype', '')}".rstrip())
            if g.shape != p.shape:
                raise ValueError(f"grads[{name!r}] must have shape {p.shape} (the parameter's), "
                                 f"got {g.shape}")

    def state_dict(self) -> dict:
        """Step count, hyper-parameters and buffers as a flat dict.

        Keys are ``"step"``, each hyper-parameter name (``"lr"``, ...) and
        ``"<buffer>.<param name>"`` (e.g. ``"momentum_buffer.0.weight"``); values are Python
        numbers or copies of the buffers, so ``np.savez(path, **opt.state_dict())`` works.
        """
        state = {"step": self.step_count}
        state.update({h: getattr(self, h) for h in self._hyper})
        for buffer in self._buffers:
            for name, a in getattr(self, buffer).items():
                state[f"{buffer}.{name}"] = a.copy()
        return state

    def load_state_dict(self, state) -> None:
        """Restore what :meth:`state_dict` returned (or its ``np.load`` round trip).

        Buffers are copied into the parameters' dtype. A missing hyper-parameter, a buffer
        for an unknown parameter or of the wrong shape, or a buffer present for only some
        parameters raises ``ValueError``.
        """
        state = dict(state)
        missing = sorted({"step", *self._hyper} - set(state))
        if missing:
            raise ValueError(f"state is missing the entries {missing}")
        buffers = {buffer: {} for buffer in self._buffers}
        for key, value in state.items():
            if key == "step" or key in self._hyper:
                continue
            buffer, _, name = key.partition(".")
            if buffer not in buffers or name not in self.params:
                raise ValueError(f"state has an unexpected entry {key!r}")
            p = self.params[name]
            if np.shape(value) != p.shape:
                raise ValueError(f"state[{key!r}] must have shape {p.shape}, "
                                 f"got {np.shape(value)}")
            buffers[buffer][name] = np.array(value, dtype=p.dtype)
        for buffer, values in buffers.items():
            if values and len(values) != len(self.params):
                absent = sorted(set(self.params) - set(values))
                raise ValueError(f"state holds {buffer} for some parameters but not {absent}")
        self.step_count = int(state["step"])
        for h in self._hyper:
            setattr(self, h, float(state[h]))
        for buffer, values in buffers.items():
            setattr(self, buffer, values)


def _check_lr_scale(lr_scale, params: dict) -> dict[str, float]:
    if lr_scale is None:
        return {}
    if not isinstance(lr_scale, dict):
        raise TypeError(f"lr_scale must be a dict name -> factor, got {type(lr_scale).__name__}")
    unknown = sorted(set(lr_scale) - set(params))
    if unknown:
        raise ValueError(f"lr_scale names parameters that are not in params: {unknown}")
    for name, factor in lr_scale.items():
        _check_nonnegative(f"lr_scale[{name!r}]", factor)
    return {name: float(factor) for name, factor in lr_scale.items()}


def _check_nonnegative(name: str, value) -> None:
    if not (isinstance(value, (int, float, np.floating, np.integer)) and value >= 0):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


class SGD(_Optimizer):
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD`` (no dampening).

    For each parameter ``p`` with gradient ``g``::

        d_p = g + weight_decay * p
        buf = d_p                          (first step)
        buf = momentum * buf + d_p         (later steps)
        p  -= lr * buf                     (p -= lr * d_p when momentum = 0)

    Parameters
    ----------
    params : dict[str, ndarray]
        The arrays to update in place.
    lr : float >= 0
    momentum : float >= 0
    weight_decay : float >= 0
    lr_scale : dict[str, float], optional
        Per-parameter factors on ``lr`` (1 for the names not listed), e.g. a smaller rate
        for a localisation net than for the classifier.
    """

    _hyper = ("lr", "momentum", "weight_decay")
    _buffers = ("momentum_buffer",)

    def __init__(self, params: dict[str, np.ndarray], lr: float = 0.01, momentum: float = 0.0,
                 weight_decay: float = 0.0, lr_scale: dict[str, float] | None = None) -> None:
        super().__init__(params, lr, weight_decay, lr_scale)
        _check_nonnegative("momentum", momentum)
        self.momentum = float(momentum)
        self.momentum_buffer: dict[str, np.ndarray] = {}

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        if self.momentum != 0.0:
            buf = self.momentum_buffer.get(name)
            if buf is None:
                buf = self.momentum_buffer[name] = np.array(g, dtype=p.dtype)
            else:
                buf *= self.momentum
                buf += g
            g = buf
        p -= lr * g


class Adam(_Optimizer):
    """Adam (Kingma and Ba, 2015), as ``torch.optim.Adam`` (``amsgrad=False``).

    For each parameter ``p`` with gradient ``g``, at step ``t = 1, 2, ...``::

        g     = g + weight_decay * p
        m     = beta1 * m + (1 - beta1) * g          (m = v = 0 before the first step)
        v     = beta2 * v + (1 - beta2) * g**2
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        p    -= lr * m_hat / (sqrt(v_hat) + eps)

    The arithmetic follows PyTorch's order of operations (``m += (1 - beta1) (g - m)``;
    ``p -= (lr / (1 - beta1**t)) m / (sqrt(v) / sqrt(1 - beta2**t) + eps)``), so results
    agree to rounding.

    Parameters
    ----------
    params : dict[str, ndarray]
        The arrays to update in place.
    lr : float >= 0
    betas : (float, float), each in [0, 1)
    eps : float >= 0
    weight_decay : float >= 0
    lr_scale : dict[str, float], optional
        Per-parameter factors on ``lr``, as for :class:`SGD`.
    """

    _hyper = ("lr", "beta1", "beta2", "eps", "weight_decay")
    _buffers = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: dict[str, np.ndarray], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, lr_scale: dict[str, float] | None = None) -> None:
        super().__init__(params, lr, weight_decay, lr_scale)
        try:
            beta1, beta2 = (float(b) for b in betas)
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair of floats, got {betas!r}") from None
        for i, b in enumerate((beta1, beta2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {b!r}")
        _check_nonnegative("eps", eps)
        self.beta1, self.beta2, self.eps = beta1, beta2, float(eps)
        self.exp_avg: dict[str, np.ndarray] = {}
        self.exp_avg_sq: dict[str, np.ndarray] = {}
        self._scratch: dict[str, np.ndarray] = {}  # not state: overwritten every step

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        m = self.exp_avg.setdefault(name, np.zeros_like(p))
        v = self.exp_avg_sq.setdefault(name, np.zeros_like(p))
        # One kept scratch array per parameter instead of a fresh temporary per operation;
        # the operations and their order (so the roundings) are those written above.
        tmp = self._scratch.get(name)
        if tmp is None or tmp.shape != p.shape or tmp.dtype != p.dtype:
            tmp = self._scratch[name] = np.empty_like(p)
        np.subtract(g, m, out=tmp)
        tmp *= 1.0 - self.beta1
        m += tmp
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - self.beta2
        v *= self.beta2
        v += tmp
        t = self.step_count
        step_size = lr / (1.0 - self.beta1 ** t)
        np.sqrt(v, out=tmp)
        tmp /= math.sqrt(1.0 - self.beta2 ** t)
        tmp += self.eps
        np.divide(m, tmp, out=tmp)
        tmp *= step_size
        p -= tmp
