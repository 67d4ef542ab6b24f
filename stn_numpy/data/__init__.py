"""MNIST loading and the distorted MNIST variants of the STN paper (Jaderberg et al. 2015)."""

from .distort import (
    DATASETS,
    elastic,
    output_size,
    projective,
    rotate,
    rts,
    to_unit,
    translate,
    translate_clutter,
)
from .mnist import (
    DEFAULT_ROOT,
    ChecksumError,
    DatasetNotFoundError,
    load_mnist,
    read_idx,
    resolve_root,
)
from .npz import load_npz

__all__ = [
    "DATASETS",
    "DEFAULT_ROOT",
    "ChecksumError",
    "DatasetNotFoundError",
    "elastic",
    "load_mnist",
    "load_npz",
    "output_size",
    "projective",
    "read_idx",
    "resolve_root",
    "rotate",
    "rts",
    "to_unit",
    "translate",
    "translate_clutter",
]
