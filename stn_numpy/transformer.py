"""The spatial transformer layer: localisation net -> parameters -> grid -> sampler.

Jaderberg et al. (2015), Sec. 3 and Fig. 2. For an input U of shape ``(N, C, H, W)``::

    theta = f_loc(U)                      (N, P)   the localisation network
    grid  = T_theta(G)                    (N, H_o, W_o, 2)   a grid generator of grids.py
    V     = sample(U, grid)               (N, C, H_o, W_o)   grid_sample of sampling.py

The backward pass runs the chain in reverse. U reaches V along two paths, through the
sampler directly and through the localisation net, so its gradient is the sum::

    dU_sampler, dgrid = grid_sample_backward(dV)
    dtheta            = T_backward(dgrid)
    dU                = dU_sampler + f_loc.backward(dtheta)

The last layer of the localisation net regresses the ``P`` transform parameters; it starts
with zero weights and the identity transform as bias, so training begins from V = U
(the paper's initialisation).
"""

from __future__ import annotations

import math

import numpy as np

from . import grids
from ._checks import check_bool, check_choice, check_float_array, check_int_pair
from .layers import Layer, Linear, Sequential
from .sampling import (
    MODES,
    PADDING_MODES,
    grid_sample,
    grid_sample_backward_from_cache,
    grid_sample_forward,
)

__all__ = ["SpatialTransformer", "TRANSFORMS", "identity_parameters"]

# name -> (grid generator, its backward, parameter shape after N; None: set by the lattice)
TRANSFORMS = {
    "affine": (grids.affine_grid, grids.affine_grid_backward, (2, 3)),
    "attention": (grids.attention_grid, grids.attention_grid_backward, (3,)),
    "similarity": (grids.similarity_grid, grids.similarity_grid_backward, (4,)),
    "projective": (grids.projective_grid, grids.projective_grid_backward, (8,)),
    "tps": (grids.tps_grid, grids.tps_grid_backward, None),
}


def identity_parameters(transform: str, lattice=(4, 4)) -> np.ndarray:
    """The flat parameter vector of the identity transform, shape ``(P,)``, float64."""
    check_choice("transform", transform, TRANSFORMS)
    if transform == "affine":
        return np.array([1.0, 0, 0, 0, 1, 0])
    if transform == "attention":
        return np.array([1.0, 0, 0])
    if transform == "similarity":
        return np.zeros(4)
    if transform == "projective":
        return np.array([1.0, 0, 0, 0, 1, 0, 0, 0])
    return grids.tps_lattice(lattice).ravel()


class SpatialTransformer(Layer):
    """A spatial transformer: warps its input by a transform its localisation net predicts.

    Parameters
    ----------
    localization : Sequential
        Maps U ``(N, C, H, W)`` to ``(N, P)``; its last layer must be a :class:`Linear` with
        ``P`` outputs (6 affine, 3 attention, 4 similarity, 8 projective, ``2 K`` TPS). That
        layer is re-initialised to zero weights and the identity bias.
    transform : {"affine", "attention", "similarity", "projective", "tps"}
    out_size : (H_o, W_o) or None
        Size of V; the input's size when None.
    mode, padding_mode, align_corners
        Passed to the sampler, see :func:`stn_numpy.grid_sample`.
    lattice : (rows, cols)
        The TPS control-point lattice (the paper uses 4 x 4); ignored for other transforms.

    Attributes
    ----------
    theta : ndarray
        The transform parameters of the last forward pass, in the generator's shape.
    """

    def __init__(self, localization: Sequential, transform: str = "affine", out_size=None,
                 mode: str = "bilinear", padding_mode: str = "zeros", align_corners=False,
                 lattice=(4, 4)) -> None:
        # params/grads are views of the localisation net's, so Layer.__init__ is not used.
        self._out_shape = None
        check_choice("transform", transform, TRANSFORMS)
        check_choice("mode", mode, MODES)
        check_choice("padding_mode", padding_mode, PADDING_MODES)
        check_choice("align_corners", align_corners, (True, False))
        if not isinstance(localization, Sequential) or not isinstance(localization[-1], Linear):
            raise TypeError("localization must be a Sequential whose last layer is a Linear")
        identity = identity_parameters(transform, lattice)
        head = localization[-1]
        if head.out_features != identity.size:
            raise ValueError(
                f"localization must end in {identity.size} outputs for transform={transform!r}, "
                f"got {head.out_features}"
            )
        head.params["weight"][...] = 0
        head.params["bias"][...] = identity
        self.localization = localization
        self.transform = transform
        self.out_size = None if out_size is None else check_int_pair("out_size", out_size, 1)
        self.mode, self.padding_mode, self.align_corners = mode, padding_mode, align_corners
        self.lattice = grids._check_lattice(lattice)
        self._grid, self._grid_backward, self._theta_shape = TRANSFORMS[transform]
        if transform == "tps":
            self._theta_shape = (self.lattice[0] * self.lattice[1], 2)
        self.theta = None
        self._sampler_cache = None

    def __repr__(self) -> str:
        return (f"SpatialTransformer(transform={self.transform!r}, mode={self.mode!r}, "
                f"padding_mode={self.padding_mode!r}, align_corners={self.align_corners}, "
                f"localization={self.localization!r})")

    @property
    def params(self) -> dict[str, np.ndarray]:
        return {f"localization.{k}": v for k, v in self.localization.params.items()}

    @property
    def grads(self) -> dict[str, np.ndarray]:
        return {f"localization.{k}": v for k, v in self.localization.grads.items()}

    def astype(self, dtype) -> SpatialTransformer:
        self.localization.astype(dtype)
        return self

    def _grid_kwargs(self) -> dict:
        kwargs = {"align_corners": self.align_corners}
        if self.transform == "tps":
            kwargs["lattice"] = self.lattice
        return kwargs

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """Warp ``x``.

        Parameters
        ----------
        x : ndarray, shape (N, C, H, W), float
            The input U.
        train : bool
            Passed to the localisation net (dropout). With False the sampler keeps no
            cache for its backward, so :meth:`backward` cannot follow.

        Returns
        -------
        V : ndarray, shape (N, C, H_o, W_o)
        """
        U = check_float_array("x", x, ndim=4)
        self._sampler_cache = None  # the previous step's, freed before this one's is made
        N, C, H, W = U.shape
        Ho, Wo = self.out_size or (H, W)
        theta_flat = self.localization.forward(U, train=train)
        self.theta = theta_flat.reshape((N,) + self._theta_shape)
        self._size = (N, C, Ho, Wo)
        grid = self._grid(self.theta, self._size, **self._grid_kwargs())
        if train:
            V, self._sampler_cache = grid_sample_forward(U, grid, self.mode, self.padding_mode,
                                                         self.align_corners)
        else:
            V = grid_sample(U, grid, self.mode, self.padding_mode, self.align_corners)
            self._sampler_cache = None
        self._out_shape = V.shape
        return V

    def backward(self, dout: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """Gradient with respect to U along both paths; fills :attr:`grads`.

        Parameters
        ----------
        dout : ndarray, shape (N, C, H_o, W_o)
            ``dL/dV``.
        input_grad : bool
            False skips ``dU`` on both paths (returns None): for a transformer that sees
            the data itself. :attr:`grads` come out the same.

        Returns
        -------
        dx : ndarray, shape (N, C, H, W), or None
        """
        dV = self._check_dout(dout)
        if self._sampler_cache is None:
            raise RuntimeError("SpatialTransformer.backward needs a forward pass with "
                               "train=True; forward(x, train=False) keeps no sampler "
                               "cache for the backward pass")
        dtype = self._sampler_cache.U.dtype
        if dV.dtype != dtype:  # named here: the sampler would name its own dV and U
            raise TypeError(f"dout must have the dtype of the forward's output, {dtype}, "
                            f"got {dV.dtype}")
        input_grad = check_bool("input_grad", input_grad)
        dU, dgrid = grid_sample_backward_from_cache(dV, self._sampler_cache,
                                                    input_grad=input_grad)
        dtheta = self._grid_backward(dgrid, self.theta, self._size, **self._grid_kwargs())
        # The explicit width, not -1: an empty batch has 0 elements, which fix no -1.
        dtheta_flat = dtheta.reshape(dtheta.shape[0], math.prod(self._theta_shape))
        dU_loc = self.localization.backward(dtheta_flat, input_grad=input_grad)
        if not input_grad:
            return None
        dU += dU_loc
        return dU
