"""Verifying another implementation against this reference.

For engineers checking a PyTorch, JAX, CUDA, C++ or any other spatial-transformer port:

* :func:`parity_matrix` runs ours beside PyTorch (``other=None`` or ``"torch"``), beside
  another library's sampler (``"scipy"``, ``"jax"``, ``"opencv"``, ``"skimage"``,
  ``"onnxruntime"``, ``"onnx-reference"``, see :mod:`~stn_numpy.verify.adapters`) or
  beside any callable
  ``other(U, grid, dV, mode, padding_mode, align_corners) -> (V, dU, dgrid)`` on NumPy
  arrays (:func:`numpy_impl` is this package behind that interface, a template for
  wrapping yours); :func:`format_table` renders the result, with where each failing row
  differs. Besides forward and both gradients it runs an adjoint (dot-product) test and
  a determinism check (:mod:`~stn_numpy.verify.parity`).
* :func:`parity_matrix_3d` does the same for volumes (5-D ``grid_sample``, 3-D
  ``affine_grid``; :mod:`~stn_numpy.verify.volumes`).
* :func:`export_golden` writes inputs and our outputs (the sampler on every combination
  and on edge cases, every grid transform, a whole spatial-transformer layer) to an
  ``.npz`` file with a JSON manifest, for a test that cannot call Python;
  :func:`check_against_golden` re-checks a callable (or this package, after an upgrade)
  against such a file (:mod:`~stn_numpy.verify.golden`).
* :func:`second_order_matrix` does the same for a double backward (the gradients of
  ``<ddU, dU> + <ddgrid, dgrid>``), called as ``other(U, grid, dV, ddU, ddgrid, mode,
  padding_mode, align_corners) -> (d_dV, d_U, d_grid)``; PyTorch's by default
  (:mod:`~stn_numpy.verify.second_order`; :func:`second_order_matrix_3d` on volumes).
  Golden files carry the images' cases too.
* :mod:`~stn_numpy.verify.atlas` measures how each library's settings map onto these
  conventions and writes the table; :mod:`~stn_numpy.verify.mutants` holds samplers with
  bugs re-created from real reports, each of which the checks above flag.
* ``stn-numpy verify`` (or ``python -m stn_numpy.verify``)::

      stn-numpy verify [--dtype float32] [--tol 1e-10]   # vs torch; exit 1 on failure
      stn-numpy verify --against jax                     # or scipy, opencv, skimage,
                                                         # onnxruntime, onnx-reference
      stn-numpy verify --dims 3                          # volumes (5-D grid_sample)
      stn-numpy verify --against mypkg.kernels:sample    # your callable
      stn-numpy verify --export golden.npz
      stn-numpy verify --check golden.npz [--against mypkg.kernels:sample]
      stn-numpy verify --order 2 [--against mypkg.kernels:double_backward]
      stn-numpy verify --order 2 --check golden.npz [--against ...]
      stn-numpy verify --atlas docs/atlas.md             # regenerate the atlas page
"""

from .._torch import TorchNotInstalledError, import_torch
from .adapters import ADAPTERS, LibraryNotInstalledError
from .cli import main
from .golden import GoldenFormatError, check_against_golden, export_golden, load_golden
from .parity import (
    ParityResult,
    Unsupported,
    default_tol,
    format_table,
    make_grid,
    numpy_impl,
    parity_matrix,
    pixel_coordinates,
    torch_impl,
)
from .second_order import (
    numpy_double_backward,
    second_order_matrix,
    second_order_matrix_3d,
    torch_double_backward,
)
from .volumes import make_volume_grid, parity_matrix_3d

__all__ = [
    "ADAPTERS",
    "GoldenFormatError",
    "LibraryNotInstalledError",
    "ParityResult",
    "TorchNotInstalledError",
    "Unsupported",
    "check_against_golden",
    "default_tol",
    "export_golden",
    "format_table",
    "import_torch",
    "load_golden",
    "main",
    "make_grid",
    "make_volume_grid",
    "numpy_double_backward",
    "numpy_impl",
    "parity_matrix",
    "parity_matrix_3d",
    "pixel_coordinates",
    "second_order_matrix",
    "second_order_matrix_3d",
    "torch_double_backward",
    "torch_impl",
]
