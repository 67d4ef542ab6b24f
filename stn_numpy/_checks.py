"""Argument checks shared by the public functions.

Every public function validates at its boundary and then trusts its inner helpers, so the
messages here name the argument and show the expected against the actual shape or dtype.
"""

from __future__ import annotations

import math
import operator

import numpy as np

FLOAT_DTYPES = (np.float32, np.float64)
#: The most values an output ``size`` may ask for (64 GiB of float32): beyond it a typo
#: would end in ``MemoryError`` or NumPy's own message instead of one naming ``size``.
MAX_VALUES = 2**34


def check_float_array(name: str, x, ndim: int | None = None, shape=None) -> np.ndarray:
    """Return ``x`` as an ndarray after checking dtype, rank and (partial) shape.

    ``shape`` may hold ``None`` for free dimensions, e.g. ``(None, 2, 3)``.
    Raises ``TypeError`` for anything but float32/float64 and ``ValueError`` for a wrong shape.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if isinstance(x, (np.ma.MaskedArray, np.matrix)):
        # A mask would be ignored and a matrix changes what * and indexing mean.
        raise TypeError(f"{name} must be a plain numpy.ndarray, got {type(x).__name__}; "
                        f"pass np.asarray({name}) (after filling any masked values)")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and x.ndim != ndim:
        expected = _format_shape(shape) if shape is not None else f"{ndim} dimensions"
        raise ValueError(f"{name} must have shape {expected}, got {x.shape} ({x.ndim} dimensions)")
    if shape is not None and any(
        s is not None and s != d for s, d in zip(shape, x.shape, strict=True)
    ):
        raise ValueError(f"{name} must have shape {_format_shape(shape)}, got {x.shape}")
    return x


def check_finite(name: str, x: np.ndarray) -> None:
    """Raise :class:`NonFiniteError` if ``x`` holds NaN or infinity."""
    if not np.isfinite(x).all():
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        raise NonFiniteError(f"{name} contains {bad} non-finite value(s) (NaN or inf)")


def check_size(size, name: str = "size", lengths=(4,)) -> tuple[int, ...]:
    """Check an output size ``(N, C, H, W)``, or ``(N, C, D, H, W)`` where ``lengths``
    allows 5 entries, of non-negative ints (C and the spatial sizes >= 1)."""
    axes = {4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}
    expected = " or ".join(axes[k] for k in lengths)
    try:
        # operator.index, not int(): int() would truncate 4.7 to 4 and parse "4" as 4.
        size = tuple(operator.index(s) for s in size)
    except TypeError:
        raise TypeError(f"{name} must be a sequence {axes[lengths[0]]} of ints"
                        + "".join(f", or {axes[k]}" for k in lengths[1:])
                        + f", got {size!r}") from None
    if len(size) not in lengths:
        counts = " or ".join(str(k) for k in lengths)
        raise ValueError(f"{name} must have {counts} entries {expected}, got {len(size)}: "
                         f"{size}")
    if size[0] < 0 or min(size[1:]) < 1:
        spatial = "D, H, W" if len(size) == 5 else "H, W"
        raise ValueError(f"{name} must have N >= 0 and C, {spatial} >= 1, got {size}")
    # max(N, 1): the grid generators build the target grid even for an empty batch.
    values = max(size[0], 1) * math.prod(size[2:]) * max(size[1], 2)
    if values > MAX_VALUES:
        raise ValueError(f"{name} {size} asks for {values} values (max(N, 1) x spatial x "
                         f"max(C, 2)), more than {MAX_VALUES}")
    return size


def check_int(name: str, value, minimum: int = 0) -> int:
    """Return ``value`` as an int, raising ``ValueError`` unless it is an int >= ``minimum``.

    A float (even 4.0), a string or a bool is refused, never truncated or parsed.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        what = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_positive_int(name: str, value) -> int:
    """Return ``value`` as an int, raising ``ValueError`` unless it is an int >= 1."""
    return check_int(name, value, 1)


def check_int_pair(name: str, value, minimum: int) -> tuple[int, int]:
    """Return ``value`` as a pair of ints, each checked by :func:`check_int` against ``minimum``."""
    try:
        first, second = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of ints, got {value!r}") from None
    return check_int(f"{name}[0]", first, minimum), check_int(f"{name}[1]", second, minimum)


def parse_positive_int(text: str) -> int:
    """``type=`` for command-line options that take a count: an int >= 1."""
    return _parse_int(text, 1, "a positive integer")


def parse_non_negative_int(text: str) -> int:
    """``type=`` for command-line options that take a seed: an int >= 0."""
    return _parse_int(text, 0, "a non-negative integer")


def _parse_int(text: str, minimum: int, what: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """Return ``value`` as a bool, raising ``ValueError`` unless it is one (``"False"``,
    1 or an array are refused, never read as true or false)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r:.80}")
    return bool(value)


def check_float_dtype(name: str, dtype) -> np.dtype:
    """Return ``np.dtype(dtype)``, raising ``TypeError`` unless it is float32 or float64."""
    try:
        dtype = np.dtype(dtype)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r:.80}") from None
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dtype}")
    return dtype


def check_choice(name: str, value, choices) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices`` (a tuple or a dict's keys)."""
    try:
        # An array compared with each choice gives an array, not a bool: not a choice.
        known = not isinstance(value, np.ndarray) and bool(value in choices)
    except (TypeError, ValueError):  # unhashable, or a comparison that is not a bool
        known = False
    if not known:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r:.80}")


class NonFiniteError(ValueError):
    """A transform parameter or sampling grid holds NaN or infinity.

    The samplers refuse non-finite coordinates rather than guess where they point; the
    trainer catches this to stop a diverged run cleanly.
    """


def _format_shape(shape) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
