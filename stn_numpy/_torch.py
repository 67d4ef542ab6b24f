"""PyTorch, imported only when asked for: it is optional, and slow to import."""

from __future__ import annotations


class TorchNotInstalledError(ImportError):
    """PyTorch was asked for as the other implementation but cannot be imported."""


def import_torch(required: bool = True):
    """The ``torch`` module; without PyTorch, ``None`` or (``required``) an error saying so.

    Raises
    ------
    TorchNotInstalledError
        ``required`` and ``import torch`` fails; the message says how to install it.
    """
    try:
        import torch
    except ImportError as exc:
        if not required:
            return None
        raise TorchNotInstalledError(
            "PyTorch not installed: pip install torch==2.13.0 (CPU is enough), or compare "
            "your own implementation instead (`other=` in Python, --other MODULE:FUNCTION "
            "on the command line)") from exc
    return torch
