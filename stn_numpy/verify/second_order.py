"""Second order: another implementation's double backward beside this package's.

A double backward takes upstream gradients ``ddU`` and ``ddgrid`` of a backward's outputs
``(dU, dgrid)`` and returns the gradients of ``<ddU, dU> + <ddgrid, dgrid>`` with respect
to the backward's arguments ``dV``, ``U`` and ``grid`` (see
:func:`stn_numpy.grid_sample_double_backward`). Another implementation is called as::

    other(U, grid, dV, ddU, ddgrid, mode, padding_mode, align_corners) -> (d_dV, d_U, d_grid)

on NumPy arrays: the first-order interface's arrays, then the two upstream gradients, then
the settings (:func:`numpy_double_backward` is this package behind it; a gradient the
implementation cannot reach, such as ``d_U`` of nearest, may be zeros). PyTorch 2.12 and
later provide one through autograd (:func:`torch_double_backward`).

The inputs of each of the 18 rows are the parity matrix's (:func:`~stn_numpy.verify.make_grid`
puts half the points on the samplers' kinks) plus two upstream gradients. At the kinks
every choice is the first order's (right-hand derivatives at integers, zero gradient on
the clip limits), which PyTorch 2.13 makes too: measured against it, the worst error of
the 18 rows is below 1e-15 in float64, so the first order's tolerances (1e-10 float64,
1e-5 float32) apply unchanged.

Volumes (:func:`second_order_matrix_3d`): the 12 trilinear and nearest rows of
:func:`~stn_numpy.verify.parity_matrix_3d`, on its inputs (kinks along every axis) plus two
upstream gradients, with ``U (N, C, D, H, W)`` and ``grid (N, D_o, H_o, W_o, 3)`` passed
to the same interface. Against PyTorch 2.13's 5-D double backward the worst float64 error
is again below 1e-15.
"""

from __future__ import annotations

import numpy as np

from .._torch import import_torch
from ..gradcheck import rel_error
from ..sampling import grid_sample_double_backward
from .parity import (
    COMBOS,
    ParityResult,
    Unsupported,
    checked_outputs,
    default_tol,
    failure_text,
    repeat_diff,
    sampler_inputs,
    sampler_key,
    worst_text,
)
from .volumes import _FIRST_CASE, COMBOS_3D, volume_key, volume_sampler_inputs

__all__ = [
    "SECOND_ORDER_OUTPUTS",
    "compare_double_backward",
    "numpy_double_backward",
    "resolve_double_backward",
    "second_order_inputs",
    "second_order_key",
    "second_order_matrix",
    "second_order_matrix_3d",
    "torch_double_backward",
]

SECOND_ORDER_OUTPUTS = ("d_dV", "d_U", "d_grid")


def second_order_key(mode, padding_mode, align_corners, dims: int = 2) -> str:
    """The key prefix of a double backward case, e.g. ``second_order/bilinear/zeros/...``
    (``second_order/3d/bilinear/...`` for volumes)."""
    key = volume_key if dims == 3 else sampler_key
    return "second_order/" + key(mode, padding_mode, align_corners)


def second_order_inputs(seed, case, shape, out_hw, align_corners, dtype):
    """``(U, grid, dV, ddU, ddgrid)``: the first-order row's inputs of ``case`` and two
    upstream gradients from a stream of their own (so those inputs stay the same). A
    5-entry ``shape`` (and 3-entry ``out_hw``) gives the volume case's inputs."""
    if len(shape) == 5:
        U, grid, dV = volume_sampler_inputs(seed, case, shape, out_hw, align_corners, dtype)
        case += _FIRST_CASE
    else:
        U, grid, dV = sampler_inputs(seed, case, shape, out_hw, align_corners, dtype)
    rng = np.random.default_rng([seed, case, 2])
    ddU = rng.standard_normal(U.shape).astype(dtype)
    ddgrid = rng.standard_normal(grid.shape).astype(dtype)
    return U, grid, dV, ddU, ddgrid


def numpy_double_backward(U, grid, dV, ddU, ddgrid, mode, padding_mode, align_corners):
    """This package's double backward behind the ``other`` interface (module docstring)."""
    return grid_sample_double_backward(ddU, ddgrid, dV, U, grid, mode, padding_mode,
                                       align_corners)


def torch_double_backward(U, grid, dV, ddU, ddgrid, mode, padding_mode, align_corners):
    """PyTorch's double backward on the CPU: ``torch.autograd.grad`` twice, the first with
    ``create_graph=True``. An input its graph does not reach comes back as zeros."""
    torch = import_torch()
    dV_t, U_t, grid_t = (torch.from_numpy(np.array(a)).requires_grad_() for a in (dV, U, grid))
    V = torch.nn.functional.grid_sample(U_t, grid_t, mode=mode, padding_mode=padding_mode,
                                        align_corners=align_corners)
    dU, dgrid = torch.autograd.grad(V, (U_t, grid_t), dV_t, create_graph=True)
    outs = torch.autograd.grad((dU, dgrid), (dV_t, U_t, grid_t),
                               (torch.from_numpy(np.array(ddU)),
                                torch.from_numpy(np.array(ddgrid))), allow_unused=True)
    return tuple(np.zeros_like(a) if o is None else o.detach().numpy()
                 for o, a in zip(outs, (dV, U, grid), strict=True))


def resolve_double_backward(other):
    """The double backward that ``other`` names: None or ``"torch"`` (PyTorch), ``"numpy"``
    (this package), or a callable with the interface of the module docstring."""
    if other is None or other == "torch":
        import_torch()
        return torch_double_backward
    if other == "numpy":
        return numpy_double_backward
    if callable(other):
        return other
    raise TypeError(f"other must be None, 'torch', 'numpy' or a callable "
                    f"other(U, grid, dV, ddU, ddgrid, mode, padding_mode, align_corners) -> "
                    f"(d_dV, d_U, d_grid), got {other!r}")


def _call(fn, U, grid, dV, ddU, ddgrid, mode, padding_mode, align_corners):
    """``fn``'s three gradients as float arrays, checked by
    :func:`~stn_numpy.verify.parity.checked_outputs` as the sampler's are."""
    return checked_outputs(fn, (U, grid, dV, ddU, ddgrid, mode, padding_mode, align_corners),
                           tuple((name, like.shape, False) for name, like in
                                 zip(SECOND_ORDER_OUTPUTS, (dV, U, grid), strict=True)))


def compare_double_backward(other, U, grid, dV, ddU, ddgrid, mode, padding_mode,
                            align_corners, *, tol: float, repeat: bool = True,
                            reference=None) -> ParityResult:
    """One row: ``other``'s double backward beside this package's on these inputs.

    As :func:`~stn_numpy.verify.parity.compare_sampler`: :class:`Unsupported` makes the
    row N/A, any other exception or a wrong shape an ERROR; ``repeat`` calls ``other``
    twice and requires the same bits; ``reference`` (same interface) replaces this
    package, e.g. by a golden file's stored outputs. The row's key is
    :func:`second_order_key`.
    """
    row = {"op": "grid_sample_double_backward", "mode": mode, "padding_mode": padding_mode,
           "align_corners": align_corners, "tol": tol,
           "key": second_order_key(mode, padding_mode, align_corners, U.ndim - 2)}
    args = (U, grid, dV, ddU, ddgrid, mode, padding_mode, align_corners)
    try:
        theirs = _call(other, *args)
        again = _call(other, *args) if repeat else None
    except Unsupported as exc:
        return ParityResult(**row, unsupported=str(exc))
    # The other implementation's failure is the row's, a sys.exit() in it included.
    except (Exception, SystemExit) as exc:  # noqa: BLE001
        return ParityResult(**row, failure=failure_text(exc))
    ours = (reference or numpy_double_backward)(*args)
    errs, where = {}, {}
    for name, a, b in zip(SECOND_ORDER_OUTPUTS, ours, theirs, strict=True):
        errs[f"err_{name}"] = err = rel_error(a, b)
        if not err <= tol:
            where[name] = worst_text(name, np.asarray(a), b)[1]
    if again is not None:
        errs["repeat_diff"] = repeat_diff(theirs, again)
    return ParityResult(**row, **errs, where=where)


def second_order_matrix(other=None, *, dtype=np.float64, seed: int = 0, shape=(2, 3, 5, 6),
                        out_hw=(7, 8), tol: float | None = None,
                        repeat: bool = True) -> list[ParityResult]:
    """Compare ``other``'s double backward with this package's on all 18 combinations.

    Parameters
    ----------
    other : None, "torch", "numpy" or callable
        See :func:`resolve_double_backward`; PyTorch by default.
    dtype, seed, shape, out_hw, tol, repeat
        As in :func:`~stn_numpy.verify.parity_matrix`, whose inputs each row reuses.

    Returns
    -------
    list of ParityResult
        One per combination, in the order of ``parity_matrix``'s sampler rows, carrying
        ``err_d_dV``, ``err_d_U`` and ``err_d_grid``.
    """
    return _matrix(other, COMBOS, dtype, seed, shape, out_hw, tol, repeat)


def second_order_matrix_3d(other=None, *, dtype=np.float64, seed: int = 0,
                           shape=(2, 2, 4, 5, 6), out_dhw=(5, 6, 7), tol: float | None = None,
                           repeat: bool = True) -> list[ParityResult]:
    """Compare ``other``'s double backward with this package's on the 12 volume
    combinations (trilinear and nearest; module docstring).

    Parameters
    ----------
    other : None, "torch", "numpy" or callable
        As for :func:`second_order_matrix`; a callable takes U ``(N, C, D, H, W)`` and grid
        ``(N, D_o, H_o, W_o, 3)``.
    dtype, seed, shape, out_dhw, tol, repeat
        As in :func:`~stn_numpy.verify.parity_matrix_3d`, whose inputs each row reuses.

    Returns
    -------
    list of ParityResult
        One per combination, in the order of ``parity_matrix_3d``'s sampler rows, keyed
        ``second_order/3d/...``.
    """
    return _matrix(other, COMBOS_3D, dtype, seed, shape, out_dhw, tol, repeat)


def _matrix(other, combos, dtype, seed, shape, out, tol, repeat) -> list[ParityResult]:
    fn = resolve_double_backward(other)
    dtype = np.dtype(dtype)
    tol = default_tol(dtype) if tol is None else float(tol)
    return [compare_double_backward(
        fn, *second_order_inputs(seed, case, shape, out, combo[2], dtype), *combo, tol=tol,
        repeat=repeat) for case, combo in enumerate(combos)]
