"""``stn-numpy verify``: the parity table, golden vectors and the conventions atlas."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .._checks import parse_non_negative_int
from .._io import describe_error
from .._torch import TorchNotInstalledError, import_torch
from .adapters import ADAPTERS, LibraryNotInstalledError
from .golden import GoldenFormatError, check_against_golden, export_golden
from .parity import format_table, numpy_impl, parity_matrix
from .volumes import parity_matrix_3d

__all__ = ["main"]

_AGAINST = ("torch", *ADAPTERS)


def _add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``verify`` options to ``parser``; :func:`_run` carries them out."""
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--export", metavar="PATH",
                        help="write golden test vectors (.npz, and a .json manifest beside "
                             "it) to PATH instead of comparing")
    action.add_argument("--check", metavar="PATH",
                        help="re-check against golden vectors in PATH (this package unless "
                             "--against is given)")
    action.add_argument("--atlas", nargs="?", const="-", metavar="MARKDOWN",
                        help="measure every installed library's sampler settings and print "
                             "the conventions atlas (markdown); with a file, replace the "
                             "atlas section of that file instead")
    parser.add_argument("--against", "--other", dest="against", metavar="NAME",
                        help="the implementation to compare: " + ", ".join(_AGAINST)
                             + " (default torch), or MODULE:FUNCTION naming a callable "
                               "other(U, grid, dV, mode, padding_mode, align_corners) -> "
                               "(V, dU, dgrid)")
    parser.add_argument("--order", type=int, choices=(1, 2), default=1,
                        help="2: compare double backwards instead (torch, numpy, or "
                             "MODULE:FUNCTION naming other(U, grid, dV, ddU, ddgrid, mode, "
                             "padding_mode, align_corners) -> (d_dV, d_U, d_grid)); with "
                             "--check, the file's second-order cases")
    parser.add_argument("--tol", type=_positive_float, default=None,
                        help="pass threshold on the relative error (default: 1e-10 for "
                             "float64, 1e-5 for float32; --check: the file's)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="dtype of the comparison or export (--check uses the file's)")
    parser.add_argument("--seed", type=parse_non_negative_int, default=0,
                        help="seed of the inputs (default 0)")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2,
                        help="2: images, 4-D U (default); 3: volumes, 5-D U (N, C, D, H, W) "
                             "with grids (N, D_o, H_o, W_o, 3) of (x, y, z): the 12 "
                             "trilinear and nearest combinations and the 3-D affine_grid "
                             "(with --order 2, their double backwards)")
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    """Carry out parsed ``verify`` options; returns the exit code (0 pass, 1 fail, 2 error)."""
    try:
        for option in ("export", "check", "atlas"):
            if getattr(args, option) == "":
                raise _CallableSpecError(f"--{option} needs a path, got ''")
        if (args.export is not None or args.atlas) and args.against is not None:
            raise _CallableSpecError(f"--{'export' if args.export else 'atlas'} takes no "
                                     f"--against; drop it")
        if args.dims == 3 and (args.export or args.check or args.atlas):
            raise _CallableSpecError("--dims applies to the parity table only: golden files "
                                     "and the atlas hold both images and volumes; drop it")
        if args.order == 2 and (args.export or args.atlas):
            raise _CallableSpecError(f"--{'export' if args.export else 'atlas'} takes no "
                                     f"--order (an export holds both orders)")
        if args.order == 2:
            return _second_order(args)
        other = _load_other(args.against) if args.against is not None else None
        if args.atlas:
            return _atlas(args.atlas)
        if args.export is not None:
            try:
                path = export_golden(args.export, seed=args.seed, dtype=args.dtype)
            except ValueError as exc:  # a path the pair cannot go to (it ends in .json)
                return _error(exc)
            print(f"wrote golden vectors ({args.dtype}, seed {args.seed}) to {path} and "
                  f"{path.with_suffix('.json')}")
            return 0
        if args.check is not None:
            results = check_against_golden(args.check, other, tol=args.tol)
            title = f"{_label(args.against, other or numpy_impl)} vs golden vectors in {args.check}"
        else:
            matrix = parity_matrix_3d if args.dims == 3 else parity_matrix
            results = matrix(other, dtype=args.dtype, seed=args.seed, tol=args.tol)
            against = (_label(args.against, other) if other
                       else f"torch {import_torch().__version__}")
            volumes = ", volumes" if args.dims == 3 else ""
            title = f"stn_numpy vs {against} ({args.dtype}, seed {args.seed}{volumes})"
    except (TorchNotInstalledError, LibraryNotInstalledError, GoldenFormatError, OSError,
            _CallableSpecError) as exc:
        return _error(exc)
    print(title)
    print(format_table(results))
    if not any(r.status in ("PASS", "FAIL") for r in results):
        # Success needs evidence: every case unsupported or errored compared nothing.
        print("stn-numpy verify: nothing was compared (every case N/A or ERROR)",
              file=sys.stderr)
        return 1
    return 0 if all(r.passed for r in results) else 1


def _second_order(args: argparse.Namespace) -> int:
    """``--order 2``: double backwards beside this package's (parity or golden cases)."""
    from .second_order import second_order_matrix, second_order_matrix_3d

    spec = args.against or ("numpy" if args.check else "torch")
    if spec in ADAPTERS:
        raise _CallableSpecError(f"--against {spec} with --order 2: that library has no "
                                 f"double backward; wrap one as MODULE:FUNCTION")
    other = spec if spec in ("torch", "numpy") else _load_other(spec)
    label = {"torch": lambda: f"torch {import_torch().__version__}",
             "numpy": lambda: "stn_numpy"}.get(spec, lambda: _label(spec, other))()
    if args.check:
        results = check_against_golden(args.check, other, tol=args.tol, order=2)
        title = f"{label} double backward vs golden vectors in {args.check}"
    else:
        matrix = second_order_matrix_3d if args.dims == 3 else second_order_matrix
        results = matrix(other, dtype=args.dtype, seed=args.seed, tol=args.tol)
        volumes = ", volumes" if args.dims == 3 else ""
        title = (f"stn_numpy vs {label}: double backward ({args.dtype}, seed {args.seed}"
                 f"{volumes})")
    print(title)
    print(format_table(results))
    return 0 if all(r.passed for r in results) else 1


def _atlas(target: str) -> int:
    from .atlas import build_atlas, write_atlas

    if target == "-":
        print(build_atlas())
    else:
        try:
            write_atlas(target)
        except ValueError as exc:  # the file lacks the markers that delimit the atlas
            return _error(exc)
        print(f"wrote the conventions atlas into {target}")
    return 0


def _error(exc: Exception) -> int:
    """Report ``exc`` in one line, as every ``stn-numpy`` command does; exit code 2."""
    print(f"stn-numpy verify: error: {describe_error(exc)}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """``verify`` subcommand entry point; returns the exit code.

    ``main(["verify", "--check", "golden.npz"])``; the subcommand name may be left out, as
    ``stn-numpy verify`` and ``python -m stn_numpy.verify`` do. Exit codes: 0 every case
    passed (or a file was written), 1 some case failed (including an implementation that
    raised, exited or returned something unusable: its row says so) or nothing was
    compared (every case N/A or ERROR), 2 an error before
    any comparison: the library asked for is missing (the message names what to install),
    a golden file that is unreadable or malformed, a bad argument, or a
    ``MODULE:FUNCTION`` that cannot be imported.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # `stn-numpy verify ...` and `python -m stn_numpy.verify ...` hand over the options
    # without the subcommand name; repeating it would be noise.
    if not argv or argv[0] != "verify":
        argv.insert(0, "verify")
    parser = argparse.ArgumentParser(
        prog="stn-numpy",
        description="Check grid_sample implementations against the stn_numpy reference.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_arguments(commands.add_parser(
        "verify", help="parity table vs PyTorch, another library or a callable; golden "
                       "vectors; the conventions atlas",
        description="Compare forward and both gradients on all 18 mode x padding_mode x "
                    "align_corners combinations.",
        epilog="exit status: 0 every case passed (or a file was written), 1 some case "
               "failed or none was compared, 2 an error before comparing (a missing "
               "library, a malformed golden file, a bad argument or path)"))
    args = parser.parse_args(argv)
    return args.func(args)


class _CallableSpecError(ValueError):
    pass


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _load_other(spec: str):
    """``"torch"``, an adapter's function, or the callable ``MODULE:FUNCTION`` names."""
    if spec == "torch":
        import_torch()
        return "torch"
    if spec in ADAPTERS:
        from .adapters import load_adapter

        return load_adapter(spec)
    if spec == "tensorflow":
        raise _CallableSpecError(
            "--against tensorflow: no adapter; tf.raw_ops.ImageProjectiveTransformV3 takes a "
            "projective matrix, not a sampling grid, so it can express only projective grids. "
            "Wrap your TensorFlow sampler as MODULE:FUNCTION instead")
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise _CallableSpecError(f"--against must be one of {', '.join(_AGAINST)} or look "
                                 f"like MODULE:FUNCTION, got {spec!r}")
    # As `python -m` would, find modules in the current folder too (after every installed
    # one, so that nothing installed is shadowed).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise _CallableSpecError(f"--against: cannot import {module_name!r} ({exc}); it is "
                                 f"looked for in the current folder and on sys.path") from exc
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the module's own failure
        raise _CallableSpecError(f"--against: importing {module_name!r} failed "
                                 f"({type(exc).__name__}: {exc})") from exc
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise _CallableSpecError(f"--against: {module_name!r} has no {attr!r}") from None
    if not callable(obj):
        raise _CallableSpecError(f"--against: {spec} is not callable")
    return obj


def _label(spec: str | None, fn) -> str:
    if spec in ADAPTERS or spec == "torch":
        return spec
    return getattr(fn, "__qualname__", repr(fn))
