"""The ``stn-numpy`` command: a thin front end over train, evaluate, bench and verify.

    stn-numpy train [--model stn] [--dataset mnist] [--epochs 10] ... [--out runs/NAME]
    stn-numpy evaluate runs/NAME/checkpoint.npz [--dataset mnist]
    stn-numpy bench
    stn-numpy verify [--tol 1e-10] [--export golden.npz | --check golden.npz]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

__all__ = ["main"]


def _add_train(sub) -> None:
    from .data import DATASETS
    from .models import ARCHITECTURES
    from .sampling import MODES, PADDING_MODES
    from .train import LR_SCHEDULES, OPTIMIZERS, TrainConfig
    from .transformer import TRANSFORMS

    d = TrainConfig()
    p = sub.add_parser("train", help="train a model (default: stn on MNIST)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=ARCHITECTURES, default=d.model)
    p.add_argument("--dataset", choices=sorted(DATASETS), default=d.dataset)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: 0.001 for adam, 0.01 for sgd)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD only")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                   help="cosine: anneal the learning rate towards 0 over --epochs")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help="run folder")
    p.add_argument("--data-dir", default=None,
                   help="folder with the MNIST .gz files (else $STN_NUMPY_DATA, else data/mnist)")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N train images")
    p.add_argument("--test-limit", type=int, default=None, help="use the first N test images")
    p.add_argument("--transform", choices=sorted(TRANSFORMS), default=d.transform)
    p.add_argument("--mode", choices=MODES, default=d.mode)
    p.add_argument("--padding-mode", choices=PADDING_MODES, default=d.padding_mode)
    p.add_argument("--align-corners", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint.npz (use --epochs to extend)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _run_train(args) -> int:
    from .train import TrainConfig, TrainingDiverged, train

    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig.from_dict({k: v for k, v in vars(args).items() if k in names})
    cfg.progress = not args.no_progress
    try:
        _, history = train(cfg, resume=args.resume)
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

    p = sub.add_parser("evaluate", help="print the test accuracy of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--dataset", choices=sorted(DATASETS), default=None,
                   help="default: the dataset the model was trained on")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--test-limit", type=int, default=None)


def _run_evaluate(args) -> int:
    from .checkpoint import load_checkpoint, load_model
    from .train import evaluate, load_dataset

    model = load_model(args.checkpoint)
    dataset = args.dataset or load_checkpoint(args.checkpoint)[2]["train"]["dataset"]
    _, _, X, y = load_dataset(dataset, args.data_dir, train_limit=1, test_limit=args.test_limit)
    loss, acc = evaluate(model, X, y)
    print(f"{dataset} test: accuracy {100 * acc:.2f}% ({len(y)} images), loss {loss:.4f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="stn-numpy", description="Spatial Transformer Networks in pure NumPy.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_evaluate(sub)
    sub.add_parser("bench", help="time ours against PyTorch (args: see `stn-numpy bench -h`)",
                   add_help=False)
    sub.add_parser("verify", help="parity with PyTorch or golden vectors "
                   "(args: see `stn-numpy verify -h`)", add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("bench", "verify"):
        if argv[0] == "bench":
            from .bench import main as sub_main
        else:
            from .verify import main as sub_main
        return sub_main(argv[1:]) or 0
    args = parser.parse_args(argv)
    try:
        return _run_train(args) if args.command == "train" else _run_evaluate(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"stn-numpy {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
