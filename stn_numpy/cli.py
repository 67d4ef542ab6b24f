"""The ``stn-numpy`` command: a thin front end over train, evaluate, experiment, export, bench
and verify.

    stn-numpy train [--model stn] [--dataset mnist] [--epochs 10] ... [--out runs/NAME]
    stn-numpy evaluate runs/NAME/checkpoint.npz [--dataset mnist | --data FILE.npz]
    stn-numpy experiment [--config full] [--out runs/experiment] [--runs DIR]
                         [--page docs/experiment.md]
    stn-numpy export runs/NAME/checkpoint.npz model.onnx [--dtype float32]
    stn-numpy bench
    stn-numpy verify [--against torch|scipy|jax|opencv|skimage|onnxruntime|onnx-reference|
                                MODULE:FUNCTION]
                     [--export golden.npz | --check golden.npz | --atlas [docs/atlas.md]]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from ._checks import parse_positive_int
from ._io import describe_error
from ._parallel import add_threads_option, keep_freed_memory, set_num_threads

__all__ = ["main"]


class _HelpFormatter(argparse.HelpFormatter):
    """Show every option's default, except the empty ones (None, False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        empty = action.default is None or action.default is False
        if action.option_strings and not empty and action.default != argparse.SUPPRESS:
            text += " (default: %(default)s)"
        return text


# Options that --resume takes from the command line; every other one is the stored run's.
_RESUME_OPTIONS = {"epochs", "out", "data_dir", "progress"}


def _add_train(sub):
    from .data import DATASETS
    from .models import ARCHITECTURES, LOC_NETS
    from .sampling import MODES, PADDING_MODES
    from .train import LR_SCHEDULES, OPTIMIZERS, TrainConfig
    from .transformer import TRANSFORMS

    d = TrainConfig()
    p = sub.add_parser("train", help="train a model (default: stn on MNIST)",
                       formatter_class=_HelpFormatter)
    p.add_argument("--model", choices=ARCHITECTURES, default=d.model,
                   help="stn: transformer + classifier; cnn: the classifier alone; "
                        "paper-stcnn / paper-cnn and paper-stfcn / paper-fcn: the paper's "
                        "distorted-MNIST pairs")
    p.add_argument("--dataset", choices=sorted(DATASETS), default=d.dataset,
                   help="MNIST or one of the paper's distorted variants")
    p.add_argument("--epochs", type=parse_positive_int, default=None,
                   help=f"total epochs (default: {d.epochs}; with --resume, the stored total)")
    p.add_argument("--batch-size", type=parse_positive_int, default=d.batch_size,
                   help="images per step")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="update rule")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: 0.001 for adam, 0.01 for sgd)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD only")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 penalty")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                   help="cosine: anneal the learning rate towards 0 over --epochs")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="fixes initial weights, shuffling and dropout")
    p.add_argument("--out", default=d.out, help="run folder")
    p.add_argument("--data-dir", default=None,
                   help="folder with the MNIST .gz files (else $STN_NUMPY_DATA, else data/mnist)")
    p.add_argument("--train-limit", type=parse_positive_int, default=None,
                   help="use the first N train images")
    p.add_argument("--test-limit", type=parse_positive_int, default=None,
                   help="use the first N test images")
    p.add_argument("--transform", choices=sorted(TRANSFORMS), default=d.transform,
                   help="the transformer's grid generator")
    p.add_argument("--st-size", type=parse_positive_int, default=None,
                   help="side of the transformer's output, on which the classifier runs "
                        "(default: the input's)")
    p.add_argument("--loc-net", choices=LOC_NETS, default=None,
                   help="the localisation net of a paper model with a transformer "
                        "(default: its own, cnn for paper-stcnn and fcn for paper-stfcn)")
    p.add_argument("--loc-lr-scale", type=float, default=d.loc_lr_scale,
                   help="the localisation net learns at --lr times this")
    p.add_argument("--mode", choices=MODES, default=d.mode, help="the sampling kernel")
    p.add_argument("--padding-mode", choices=PADDING_MODES, default=d.padding_mode,
                   help="what the sampler reads outside the image")
    p.add_argument("--align-corners", action="store_true",
                   help="+-1 are the corner pixels' centres, not their outer edges")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint.npz (use --epochs to extend)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint in --out with a fresh run")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_threads_option(p)
    return p


def _run_train(args, parser) -> int:
    from .train import TrainConfig, TrainingDiverged, train

    names = {f.name for f in fields(TrainConfig)}
    if args.resume:
        changed = sorted(f"--{k.replace('_', '-')}" for k in names - _RESUME_OPTIONS
                         if k in vars(args) and getattr(args, k) != parser.get_default(k))
        if changed:
            raise ValueError(f"--resume continues the stored run with its own settings; "
                             f"drop {', '.join(changed)} (only --epochs, --out and "
                             f"--data-dir may be given)")
    cfg = TrainConfig.from_dict({k: v for k, v in vars(args).items() if k in names})
    cfg.progress = not args.no_progress
    try:
        _, history = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except TrainingDiverged as e:
        print(f"stn-numpy train: stopped: {e}", file=sys.stderr)
        return 3
    last = history[-1] if history else None
    if last:
        print(f"final test accuracy {100 * last['test_acc']:.2f}% after epoch {last['epoch']}; "
              f"outputs in {cfg.out}")
    return 0


def _add_evaluate(sub) -> None:
    from .data import DATASETS

    p = sub.add_parser("evaluate", help="print the test accuracy of a checkpoint and, for "
                       "a spatial transformer, what it does to the distortion")
    p.add_argument("checkpoint")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--dataset", choices=sorted(DATASETS), default=None,
                        help="default: the dataset the model was trained on")
    source.add_argument("--data", metavar="FILE.npz", default=None,
                        help="a test set made elsewhere: x (N, H, W) float in [0, 1], "
                             "y (N,) integer labels 0-9")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--test-limit", type=parse_positive_int, default=None)


def _run_evaluate(args) -> int:
    from .checkpoint import load_checkpoint, model_from_params
    from .data import load_npz
    from .measures import format_measures, transformer_measures
    from .train import evaluate, load_split

    params, _, meta = load_checkpoint(args.checkpoint)
    model = model_from_params(meta["model"], params, source=args.checkpoint)
    measures = {}
    if args.data is not None:
        X, y = load_npz(args.data, tuple(model.config["input_size"]))
        X, y, name = X[:args.test_limit], y[:args.test_limit], args.data
    else:
        name = args.dataset or meta["train"]["dataset"]
        X, y, distortion = load_split(name, "test", args.data_dir, args.test_limit,
                                      return_params=True)
    loss, acc = evaluate(model, X, y)
    print(f"{name} test: accuracy {100 * acc:.2f}% ({len(y)} images), loss {loss:.4f}")
    if args.data is None and len(y) > 1:
        measures = transformer_measures(model, X, distortion, name)
    for line in format_measures(measures):
        print(line)
    return 0


def _add_experiment(sub) -> None:
    from .experiment import CONFIGS, DEFAULT_OUT, DEFAULT_RUNS

    p = sub.add_parser("experiment", help="the paper's CNN vs ST-CNN table on distorted "
                       "MNIST, with the transformer's measures and figures (resumable)",
                       formatter_class=_HelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="full",
                   help="full: the budgeted experiment; tiny: a smoke test of every run")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for results.md and figures")
    p.add_argument("--runs", default=None,
                   help=f"folder for the runs' checkpoints (default: {DEFAULT_RUNS}/<config>)")
    p.add_argument("--data-dir", default=None,
                   help="folder with the MNIST .gz files (else $STN_NUMPY_DATA, else data/mnist)")
    p.add_argument("--page", "--readme", dest="readme", metavar="MARKDOWN", default=None,
                   help="after the runs, rewrite the results block of this markdown page, "
                        "docs/experiment.md (between "
                        "<!-- experiment:start --> and <!-- experiment:end -->)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _run_experiment(args) -> int:
    from ._io import read_marked
    from .experiment import CONFIGS, README_END, README_START, run_experiment, update_readme
    from .train import TrainingDiverged

    if args.readme is not None:  # missing markers show now, not after hours of training
        read_marked(args.readme, README_START, README_END)
    try:
        results = run_experiment(args.config, out=args.out, runs=args.runs,
                                 data_dir=args.data_dir, progress=not args.no_progress)
    except TrainingDiverged as e:
        print(f"stn-numpy experiment: stopped: {e}", file=sys.stderr)
        return 3
    if args.readme is not None:
        update_readme(args.readme, results, CONFIGS[args.config], args.out)
        print(f"wrote the experiment's results into {args.readme}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint's model as an ONNX file (opset 20) "
                       "to run in ONNX Runtime (needs the onnx extra)",
                       formatter_class=_HelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("output", metavar="MODEL.onnx")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="the graph's dtype; ONNX Runtime's CPU convolution runs float32 only")


def _run_export(args) -> int:
    from .checkpoint import load_model
    from .onnx import OnnxNotInstalledError, export

    model = load_model(args.checkpoint)
    try:
        path = export(model, args.output, args.dtype)
    except OnnxNotInstalledError as e:
        print(f"stn-numpy export: error: {e}", file=sys.stderr)
        return 2
    outputs = "logits, theta, V" if model.transformer is not None else "logits"
    H, W = model.config["input_size"]
    print(f"wrote {path}: {model.config['arch']}, opset 20, input images (N, 1, {H}, {W}) "
          f"{args.dtype} in [0, 1], outputs {outputs}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="stn-numpy", description="Spatial Transformer Networks in pure NumPy.")
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser = _add_train(sub)
    _add_evaluate(sub)
    _add_experiment(sub)
    _add_export(sub)
    sub.add_parser("bench", help="time ours against PyTorch (args: see `stn-numpy bench -h`)",
                   add_help=False)
    sub.add_parser("verify", help="parity with PyTorch, another library or golden vectors; "
                   "the atlas (args: see `stn-numpy verify -h`)", add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    # The command line owns its process, so it may tune the allocator (see _parallel).
    keep_freed_memory()
    command = argv[0] if argv else None
    # Bench and verify handle their own bad input; any OS error of any command (an
    # unwritable or impossible path, a full disk, a file where a folder should be, a
    # failed download) ends in one line naming the path, never a traceback.
    handled = ((OSError, MemoryError) if command in ("bench", "verify")
               else (OSError, ValueError, MemoryError))
    try:
        if command in ("bench", "verify"):
            if command == "bench":
                from .bench import main as sub_main
            else:
                from .verify import main as sub_main
            return sub_main(argv[1:]) or 0
        args = parser.parse_args(argv)
        if getattr(args, "threads", None) is not None:
            set_num_threads(args.threads)
        if args.command == "train":
            return _run_train(args, train_parser)
        if args.command == "experiment":
            return _run_experiment(args)
        if args.command == "export":
            return _run_export(args)
        return _run_evaluate(args)
    except handled as e:
        reason = (f"out of memory ({e or 'an allocation failed'}); choose smaller sizes"
                  if isinstance(e, MemoryError) else describe_error(e))
        print(f"stn-numpy {command}: error: {reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
