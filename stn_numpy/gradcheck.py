"""Central-difference gradients, for checking hand-derived backward passes.

For a function ``f`` and an upstream gradient ``df`` of the shape of ``f(x)``, the scalar
``L(x) = sum(f(x) * df)`` has gradient ``dL/dx = J_f(x)^T df``: exactly what a backward
pass returns. :func:`numerical_gradient` estimates it one coordinate at a time,

    dL/dx_i ~= (L(x + h e_i) - L(x - h e_i)) / (2 h),

with truncation error O(h^2) and round-off O(eps / h): in float64, ``h = 1e-6`` leaves
about 1e-9 relative error on smooth functions, which is why every check runs in float64.

Typical use::

    dx = my_backward(dout, x)
    report = check_gradient(lambda x: my_forward(x), x, dx, df=dout)
    assert report.max_rel_error < 1e-7, report

The second order is checked the same way, like PyTorch's ``gradgradcheck``: a backward
is itself a function of its arguments (the upstream gradient and the forward's inputs),
and a double backward is that function's backward. :func:`numerical_double_backward`
takes central differences of the backward itself, one argument at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "numerical_gradient",
    "rel_error",
    "check_gradient",
    "GradientReport",
    "numerical_double_backward",
    "check_double_backward",
]


def numerical_gradient(f, x: np.ndarray, df=None, h: float = 1e-6) -> np.ndarray:
    """Central-difference gradient of ``sum(f(x) * df)`` with respect to ``x``.

    Parameters
    ----------
    f : callable
        Maps the array ``x`` to an array (or scalar). It is called ``2 * x.size`` times
        with ``x`` perturbed in place; ``x`` is restored before returning.
    x : ndarray, float64, any shape
        The point at which to differentiate.
    df : ndarray of the shape of ``f(x)``, optional
        The upstream gradient; ones when omitted (so a scalar ``f`` gives ``dL/dx``).
    h : float
        Step size.

    Returns
    -------
    dx : ndarray, shape of ``x``

    Raises
    ------
    TypeError
        ``x`` is not a float64 ndarray.
    ValueError
        ``x`` is read-only, ``h`` is not a finite number > 0, or ``df`` does not have the
        shape of ``f(x)``.
    """
    _check_x(x)
    _check_h(h)
    df = None if df is None else np.asarray(df)
    grad = np.zeros_like(x)
    if not x.size:  # nothing to perturb (nditer refuses an empty array)
        return grad
    it = np.nditer(x, flags=["multi_index"], op_flags=[["readwrite"]])
    for _ in it:
        i = it.multi_index
        old = x[i]
        try:
            x[i] = old + h
            # np.array copies: f may return a view of x, which the next perturbation
            # would change.
            plus = np.array(f(x), dtype=np.float64)
            x[i] = old - h
            minus = np.array(f(x), dtype=np.float64)
        finally:  # also when f raises: the caller's x must come back unchanged
            x[i] = old
        # Checked on the values already computed, not by an extra call: f may be costly.
        if df is not None and df.shape != plus.shape:
            raise ValueError(f"df must have the shape of f(x), {plus.shape}, got {df.shape}")
        weight = 1.0 if df is None else df
        grad[i] = np.sum((plus - minus) * weight) / (2 * h)
    return grad


def _check_h(h) -> None:
    if (isinstance(h, bool) or not isinstance(h, (int, float, np.integer, np.floating))
            or not np.isfinite(h) or h <= 0):
        raise ValueError(f"h must be a finite number > 0 (the step of the central "
                         f"differences), got {h!r}")


def _check_x(x) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.float64:
        got = f"dtype {x.dtype}" if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(
            f"x must be a float64 ndarray, got {got}: float32 round-off in f, about "
            "eps / h relative to f, swamps central differences"
        )
    if not x.flags.writeable:
        raise ValueError("x is read-only, but numerical_gradient perturbs it in place: "
                         "pass a writeable copy (x.copy())")


def rel_error(a, b) -> float:
    """Relative error ``max|a - b| / max(1e-8, max(|a| + |b|))``, a single float.

    Normalising by the largest magnitude (not element by element) keeps entries that are
    legitimately zero, such as a gradient at a clipped coordinate, from dominating.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(1e-8, float(np.max(np.abs(a) + np.abs(b)))))


@dataclass(frozen=True)
class GradientReport:
    """Agreement between an analytic and a numerical gradient."""

    max_abs_error: float
    max_rel_error: float

    def __str__(self) -> str:
        return f"max abs error {self.max_abs_error:.3e}, max rel error {self.max_rel_error:.3e}"


def check_gradient(f, x: np.ndarray, analytic: np.ndarray, df=None, h: float = 1e-6):
    """Compare ``analytic`` with :func:`numerical_gradient` ``(f, x, df, h)``.

    Returns
    -------
    GradientReport
        ``max_abs_error = max|analytic - numeric|`` and ``max_rel_error`` as in
        :func:`rel_error`.

    Raises
    ------
    TypeError
        ``x`` is not a float64 ndarray.
    ValueError
        ``analytic`` does not have the shape of ``x``, or ``df`` that of ``f(x)``.
    """
    _check_x(x)
    analytic = np.asarray(analytic)
    if analytic.shape != x.shape:
        raise ValueError(
            f"analytic gradient has shape {analytic.shape}, expected {x.shape} (shape of x)"
        )
    numeric = numerical_gradient(f, x, df=df, h=h)
    abs_err = float(np.max(np.abs(analytic - numeric))) if numeric.size else 0.0
    return GradientReport(abs_err, rel_error(analytic, numeric))


# --------------------------------------------------------------------------------------
# Second order: central differences of a backward
# --------------------------------------------------------------------------------------


def numerical_double_backward(backward, args, ddout, h: float = 1e-6) -> list[np.ndarray]:
    """Central-difference gradients of ``S = sum_k <ddout[k], backward(*args)[k]>`` with
    respect to every array in ``args``.

    ``backward(*args)`` returns a tuple of gradients (say ``(dU, dgrid)`` of
    ``grid_sample_backward(dV, U, grid)``); ``ddout`` holds an upstream gradient for each,
    None for zero. A double backward must return exactly these gradients.

    Parameters
    ----------
    backward : callable
        ``backward(*args) -> tuple of arrays``; extra settings bound beforehand (e.g. with
        ``functools.partial`` or a lambda).
    args : sequence of ndarray, float64
        The point; each array is perturbed in place and restored.
    ddout : sequence of ndarray or None
        One per output of ``backward``, of its shape.
    h : float
        Step size.

    Returns
    -------
    list of ndarray, one per argument, of its shape
    """
    args = list(args)

    def scalar(i):
        def S(x):
            outs = backward(*args[:i], x, *args[i + 1:])
            if len(outs) != len(ddout):
                raise ValueError(f"ddout must hold one gradient per output of backward, "
                                 f"{len(outs)}, got {len(ddout)}")
            return sum(float(np.sum(np.asarray(o, dtype=np.float64) * d))
                       for o, d in zip(outs, ddout, strict=True) if d is not None)
        return S

    return [numerical_gradient(scalar(i), x, h=h) for i, x in enumerate(args)]


def check_double_backward(backward, args, ddout, analytic, h: float = 1e-6) -> GradientReport:
    """Compare a double backward's gradients ``analytic`` (one per argument of ``backward``)
    with :func:`numerical_double_backward`, as PyTorch's ``gradgradcheck`` does.

    Returns
    -------
    GradientReport
        The worst argument: ``max_abs_error`` and ``max_rel_error`` (:func:`rel_error` of
        each argument's gradient, so a small gradient is judged on its own scale) are
        maxima over the arguments.

    Raises
    ------
    TypeError
        An argument is not a float64 ndarray.
    ValueError
        ``analytic`` does not hold one gradient of each argument's shape.
    """
    args = list(args)
    for x in args:
        _check_x(x)
    analytic = [np.asarray(a) for a in analytic]
    if len(analytic) != len(args) or any(
            a.shape != x.shape for a, x in zip(analytic, args, strict=True)):
        raise ValueError(f"analytic must hold one gradient per argument, of shapes "
                         f"{[x.shape for x in args]}, got {[a.shape for a in analytic]}")
    numeric = numerical_double_backward(backward, args, ddout, h=h)
    pairs = list(zip(analytic, numeric, strict=True))
    abs_err = max((float(np.max(np.abs(a - n))) for a, n in pairs if n.size), default=0.0)
    return GradientReport(abs_err, max((rel_error(a, n) for a, n in pairs), default=0.0))
