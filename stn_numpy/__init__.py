"""stn-numpy: Spatial Transformer Networks in pure NumPy, with hand-derived backward passes.

Jaderberg, Simonyan, Zisserman and Kavukcuoglu, "Spatial Transformer Networks", NeurIPS
2015 (arXiv:1506.02025). The core (grid generators and samplers) mirrors PyTorch's
``F.affine_grid`` / ``F.grid_sample`` conventions exactly, forward and backward;
:mod:`stn_numpy.reference` is the same sampler written plainly, to read first.
"""

from . import gradcheck, reference
from ._checks import NonFiniteError
from .checkpoint import load_model
from .grids import (
    affine_grid,
    affine_grid_backward,
    attention_grid,
    attention_grid_backward,
    projective_grid,
    projective_grid_backward,
    similarity_affine,
    similarity_affine_backward,
    similarity_grid,
    similarity_grid_backward,
    target_coordinates,
    tps_grid,
    tps_grid_backward,
    tps_lattice,
)
from .models import build_model
from .sampling import (
    grid_sample,
    grid_sample_backward,
    grid_sample_backward_from_cache,
    grid_sample_forward,
)
from .transformer import SpatialTransformer

__version__ = "0.1.0"

__all__ = [
    "NonFiniteError",
    "SpatialTransformer",
    "affine_grid",
    "affine_grid_backward",
    "attention_grid",
    "attention_grid_backward",
    "build_model",
    "gradcheck",
    "grid_sample",
    "grid_sample_backward",
    "grid_sample_backward_from_cache",
    "grid_sample_forward",
    "load_model",
    "projective_grid",
    "reference",
    "projective_grid_backward",
    "similarity_affine",
    "similarity_affine_backward",
    "similarity_grid",
    "similarity_grid_backward",
    "target_coordinates",
    "tps_grid",
    "tps_grid_backward",
    "tps_lattice",
]
