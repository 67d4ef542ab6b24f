"""Training: the loop, metrics, checkpoints, resume and figures.

One epoch shuffles the training set with a seeded generator, runs mini-batch steps
(forward, cross-entropy, hand-derived backward, optimizer step) under a progress bar, then
evaluates on the test set and writes, into the run folder:

* ``checkpoint.npz`` -- weights, optimizer state, config, epoch, history and generator
  states (see :mod:`stn_numpy.checkpoint`), atomically, after every epoch;
* ``metrics.csv`` and ``metrics.json`` -- one row per epoch;
* at the end, ``curves.png`` (loss and accuracy per epoch) and, for models with a spatial
  transformer, ``transforms.png`` (test inputs beside the transformer's outputs).

Every file is written atomically. The same seed gives the same weights for a given BLAS
thread count (recorded in the checkpoint), and ``resume=True`` continues from the last
checkpoint bit-identically (shuffling and dropout generators are restored); resuming a
complete run rewrites its metrics and figures. A non-finite loss, weight or test loss
stops the run with :class:`TrainingDiverged`, leaving the last good checkpoint.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ._checks import NonFiniteError, check_choice, check_int, check_positive_int
from ._io import check_writable, folder_lock, remove_stale_temporaries
from ._parallel import usable_cores
from .checkpoint import atomic_write, load_checkpoint, model_from_params, save_checkpoint
from .data import DATASETS, load_mnist
from .layers import Dropout, Sequential, cross_entropy
from .models import ARCHITECTURES, LOC_NETS, Model, build_model, check_loc_net_arch
from .optim import SGD, Adam
from .transformer import TRANSFORMS, SpatialTransformer

__all__ = ["TrainConfig", "TrainingDiverged", "train", "evaluate", "load_dataset",
           "load_split", "learning_rate"]

OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("cosine", "constant")
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3}
METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds")
LOCALIZATION_PREFIX = "0.localization."  # parameter names of the transformer's net
# Everything a run writes into its folder (all of it atomically).
RUN_FILES = ("checkpoint.npz", "metrics.csv", "metrics.json", "curves.png", "transforms.png")
_DATA_SEED = 20150605  # distortions are fixed per dataset, whatever the training seed


@dataclass
class TrainConfig:
    """Everything that defines a run. The defaults are the main job: ``stn`` on MNIST."""

    model: str = "stn"
    dataset: str = "mnist"
    epochs: int | None = 10  # None when resuming: keep the stored total
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float | None = None  # None: DEFAULT_LR of the optimizer
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    seed: int = 0
    out: str = "runs/stn-mnist"
    data_dir: str | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    transform: str = "affine"
    st_size: int | None = None  # None: the transformer's output has the input's size
    loc_lr_scale: float = 1.0  # the localisation net learns at lr * loc_lr_scale
    loc_net: str | None = None  # a paper model's localisation net: "cnn", "fcn"; None: its own
    mode: str = "bilinear"
    padding_mode: str = "zeros"
    align_corners: bool = False
    progress: bool = True

    def validate(self) -> None:
        check_choice("model", self.model, ARCHITECTURES)
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("transform", self.transform, TRANSFORMS)
        if self.loc_net is not None:
            check_choice("loc_net", self.loc_net, LOC_NETS)
            check_loc_net_arch(self.model)
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        check_int("seed", self.seed)
        for name in ("train_limit", "test_limit", "st_size"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        for name, positive in (("lr", True), ("loc_lr_scale", True), ("momentum", False),
                               ("weight_decay", False)):
            value = getattr(self, name)
            # A number, finite: an infinite rate would only show as a diverged run, and
            # NaN would make the checkpoint's metadata invalid JSON.
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value < 0 or (positive and value == 0)):
                raise ValueError(f"{name} must be {'>' if positive else '>='} 0 and finite"
                                 f", got {value!r}")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class TrainingDiverged(RuntimeError):
    """The loss, the weights, the test loss or a sampling grid became NaN or infinite."""


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def load_split(name: str = "mnist", split: str = "test", data_dir=None, limit=None,
               return_params: bool = False, whole_split: bool = True):
    """One split of a dataset: images in ``[0, 1]``, float32 ``(N, 1, H, W)``, int64 labels.

    Distorted variants (``rot``, ``rts``, ``proj``, ``elastic``, ``t``, ``tc``, see
    :mod:`stn_numpy.data.distort`) are generated from the whole MNIST split with a fixed
    seed and only then cut to the first ``limit`` images, so an image is the same whatever
    the limit and whichever command loads it. ``whole_split=False`` distorts only the first
    ``limit`` digits instead: much faster for a few hundred images, but other images.

    With ``return_params=True`` returns ``(X, y, params)``: the distortion's parameters
    per image (see :mod:`stn_numpy.data.distort`), cut like ``X``, plus ``"digits"``, the
    undistorted MNIST digits ``(N, 28, 28)`` in ``[0, 1]``.
    """
    check_choice("dataset", name, DATASETS)
    check_choice("split", split, ("train", "test"))
    if limit is not None:
        check_positive_int("limit", limit)
    images, labels = load_mnist(split, data_dir)
    if not whole_split:
        images, labels = images[:limit], labels[:limit]
    offset = 0 if split == "train" else 1
    X, params = DATASETS[name](images, np.random.default_rng(_DATA_SEED + offset),
                               return_params=True)
    # A copy, not a view, so that the whole split's images can be freed (TC's are 0.9 GB).
    X = X[:limit, None].astype(np.float32, copy=limit is not None)
    y = labels[:limit].astype(np.int64)
    if not return_params:
        return X, y
    params = {k: v[:limit] for k, v in params.items()}
    params["digits"] = images[:limit].astype(np.float32) / 255
    return X, y, params


def load_dataset(name: str = "mnist", data_dir=None, train_limit=None, test_limit=None):
    """``(X_train, y_train, X_test, y_test)``, each split as :func:`load_split` gives it."""
    return (*load_split(name, "train", data_dir, train_limit),
            *load_split(name, "test", data_dir, test_limit))


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def evaluate(model: Model, X: np.ndarray, y: np.ndarray, batch_size: int | None = None):
    """Mean cross-entropy and accuracy of ``model`` (evaluation mode) on ``(X, y)``."""
    logits = model.predict(X, batch_size).astype(np.float64)
    loss, _ = cross_entropy(logits, y)
    return loss, float(np.mean(logits.argmax(axis=1) == y))


def learning_rate(cfg: TrainConfig, epoch: int) -> float:
    """The learning rate of ``epoch`` (1-based).

    ``"cosine"`` anneals from ``lr`` towards 0 over ``cfg.epochs``:
    ``lr * (1 + cos(pi * (epoch - 1) / epochs)) / 2``; ``"constant"`` keeps ``lr``.
    It depends only on the epoch, so a resumed run uses the rates of a straight one.
    """
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / cfg.epochs))


def _make_optimizer(cfg: TrainConfig, params: dict):
    lr_scale = {name: cfg.loc_lr_scale for name in params
                if name.startswith(LOCALIZATION_PREFIX)}
    if cfg.optimizer == "sgd":
        return SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                   lr_scale=lr_scale)
    return Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, lr_scale=lr_scale)


def _dropout_layers(layer):
    if isinstance(layer, Dropout):
        yield layer
    elif isinstance(layer, Sequential):
        for child in layer:
            yield from _dropout_layers(child)
    elif isinstance(layer, SpatialTransformer):
        yield from _dropout_layers(layer.localization)


def _rng_states(shuffle_rng, model: Model) -> dict:
    return {"shuffle": shuffle_rng.bit_generator.state,
            "dropout": [d.rng.bit_generator.state for d in _dropout_layers(model.net)]}


def _restore_rng_states(states: dict, shuffle_rng, model: Model) -> None:
    shuffle_rng.bit_generator.state = states["shuffle"]
    for d, state in zip(_dropout_layers(model.net), states["dropout"], strict=True):
        d.rng.bit_generator.state = state


def blas_threads() -> int:
    """The BLAS thread count this process runs with, as set by the usual variables.

    ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS`` or ``OMP_NUM_THREADS`` (the first one
    set), else the CPUs this process may use, which is what OpenBLAS and MKL default to.
    Matrix products split their sums by thread, so weights agree bit for bit only between
    runs with the same count.
    """
    for name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return usable_cores()


def _diverged(what: str, cfg: TrainConfig, ckpt_path: Path, epoch: int) -> TrainingDiverged:
    kept = f"{ckpt_path} (epoch {epoch - 1})" if epoch > 1 else "none was written"
    return TrainingDiverged(f"{what}: try a smaller --lr than {cfg.lr}. "
                            f"The last good checkpoint is kept: {kept}")


def _write_metrics(out: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(out / "metrics.csv", lambda f: f.write(buf.getvalue().encode()))
    text = json.dumps(history, indent=2, allow_nan=False) + "\n"
    atomic_write(out / "metrics.json", lambda f: f.write(text.encode()))


def train(config: TrainConfig | None = None, resume: bool = False, data=None, log=print,
          overwrite: bool = False, on_epoch=None):
    """Train a model; returns ``(model, history)``.

    Parameters
    ----------
    config : TrainConfig
        The run; ``config.out`` is the run folder.
    resume : bool
        Continue from ``<out>/checkpoint.npz`` with the stored config; only ``out``,
        ``data_dir``, ``progress`` and ``epochs`` come from ``config`` (``epochs=None``
        keeps the stored total). Resuming an interrupted run with its own ``epochs`` is
        bit-identical to a run that was never interrupted. A larger ``epochs`` extends the
        run; the cosine schedule is then recomputed over the new total, so the extension
        differs from a straight run of that length.
    overwrite : bool
        Allow a fresh run to replace an existing checkpoint in ``out``; otherwise that is
        refused, so that no finished run is lost by accident.
    data : tuple, optional
        ``(X_train, y_train, X_test, y_test)`` to use instead of :func:`load_dataset`.
    log : callable
        Receives one line of text per epoch.
    on_epoch : callable, optional
        ``on_epoch(model, row)`` after each epoch's checkpoint is written, ``row`` being
        that epoch's metrics (the experiment records the transformer's progress with it).

    Raises
    ------
    TrainingDiverged
        The loss, a weight or the test loss became non-finite (or a grid overflowed); the
        last good checkpoint is left in place.
    OSError
        The run folder cannot be written (checked before the data is loaded) or a write
        failed; the file in place stays intact.
    ValueError
        A bad config, or a checkpoint to resume whose fields are missing or mistyped.

    While it runs, ``train`` holds the run folder's lock
    (:func:`~stn_numpy._io.folder_lock`): another ``train`` (fresh, ``overwrite`` or
    ``resume``) on the same folder raises ``OSError`` at once instead of losing a run.
    """
    cfg = config or TrainConfig()
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.npz"
    start_epoch, history, saved = 0, [], None
    if resume:
        read = _identity(ckpt_path)
        params, optim_state, meta = load_checkpoint(
            ckpt_path, require=("model", "train", "epoch", "history", "rng"))
        stored = dict(meta["train"], out=cfg.out, data_dir=cfg.data_dir, progress=cfg.progress)
        if cfg.epochs is not None:
            stored["epochs"] = cfg.epochs
        start_epoch, history = meta["epoch"], meta["history"]
        try:
            cfg = TrainConfig.from_dict(stored)
            cfg.validate()
        except (TypeError, ValueError) as e:
            raise ValueError(f"{ckpt_path}: field 'train': {e}") from None
        if cfg.epochs < start_epoch:
            raise ValueError(f"{ckpt_path} already holds {start_epoch} epochs: pass --epochs N "
                             f"with N > {start_epoch} to extend it")
        if cfg.epochs != meta["train"]["epochs"] and cfg.lr_schedule == "cosine":
            log(f"extending the run to {cfg.epochs} epochs: the cosine schedule is "
                f"recomputed over the new total")
        saved = (params, optim_state, meta)
    if cfg.epochs is None:
        cfg.epochs = TrainConfig.epochs
    cfg.validate()
    out.mkdir(parents=True, exist_ok=True)
    # One command per run folder: a second one (a fresh run, --overwrite, --resume) is
    # refused while this one lives, so neither loses its run or its temporaries.
    with folder_lock(out):
        if saved is None and ckpt_path.exists() and not overwrite:
            raise ValueError(f"{ckpt_path} already exists: pass --resume to continue that "
                             f"run, --overwrite to replace it, or choose another --out")
        if saved is not None and _identity(ckpt_path) != read:
            raise OSError(errno.EBUSY, "was replaced by another command while this one "
                          "read it; run again", str(ckpt_path))
        return _train_locked(cfg, out, saved, start_epoch, history, data, log, on_epoch)


def _identity(path: Path):
    """What tells one version of a file from the next: atomic writes rename a new file
    (inode) into place."""
    info = os.stat(path)
    return info.st_ino, info.st_mtime_ns, info.st_size


def _train_locked(cfg: TrainConfig, out: Path, saved, start_epoch: int, history: list,
                  data, log, on_epoch):
    """The body of :func:`train`, run while it holds the run folder's lock."""
    from tqdm import tqdm

    ckpt_path = out / "checkpoint.npz"
    # Before the data and the first epoch: an unwritable --out fails now, not in an hour.
    check_writable(ckpt_path)
    remove_stale_temporaries(out, RUN_FILES)

    X_train, y_train, X_test, y_test = data or load_dataset(
        cfg.dataset, cfg.data_dir, cfg.train_limit, cfg.test_limit)
    input_size = X_train.shape[2:]
    if saved is not None and list(input_size) != list(saved[2]["model"].get("input_size", [])):
        raise ValueError(f"{ckpt_path}: the run's model takes images of "
                         f"{saved[2]['model'].get('input_size')}, the data has "
                         f"{list(input_size)}")
    if saved is None:
        model = build_model(cfg.model, input_size, cfg.transform, cfg.mode, cfg.padding_mode,
                            cfg.align_corners, seed=cfg.seed, st_size=cfg.st_size,
                            loc_net=cfg.loc_net)
    else:
        model = model_from_params(saved[2]["model"], saved[0], source=str(ckpt_path))
    optimizer = _make_optimizer(cfg, model.params)
    shuffle_rng = np.random.default_rng([cfg.seed, 1])
    threads = blas_threads()
    if saved is not None:
        for field, restore in (("optim", lambda: optimizer.load_state_dict(saved[1])),
                               ("rng", lambda: _restore_rng_states(saved[2]["rng"],
                                                                   shuffle_rng, model))):
            try:
                restore()
            except (KeyError, TypeError, ValueError, OverflowError) as e:
                raise ValueError(f"{ckpt_path}: field {field!r}: {e}") from None
        log(f"resumed from {ckpt_path} after epoch {start_epoch}")
        stored_threads = saved[2].get("threads")
        if stored_threads is not None and stored_threads != threads:
            log(f"warning: the run was trained with {stored_threads} BLAS thread(s), this "
                f"process uses {threads}: results may differ in the last bits from a run "
                f"that was never interrupted")
        if start_epoch == cfg.epochs:
            log(f"the run is complete ({start_epoch} epochs): rewriting its metrics and "
                f"figures")

    n_train = len(X_train)
    steps = -(-n_train // cfg.batch_size)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        optimizer.lr = learning_rate(cfg, epoch)
        order = shuffle_rng.permutation(n_train)
        loss_sum = correct = seen = 0
        bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", disable=not cfg.progress,
                   unit="batch", leave=False)
        for step in range(steps):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            xb, yb = X_train[idx], y_train[idx]
            # Overflow is detected through the loss (or the weights after the epoch) and
            # reported once, clearly.
            with np.errstate(over="ignore", invalid="ignore"):
                try:
                    logits = model.forward(xb, train=True)
                    loss, dlogits = cross_entropy(logits, yb)
                except NonFiniteError as e:
                    loss, reason = float("nan"), f" ({e})"
                else:
                    reason = ""
                if not np.isfinite(loss):
                    bar.close()
                    raise _diverged(f"non-finite loss at epoch {epoch}, step {step + 1}"
                                    f"{reason}", cfg, ckpt_path, epoch)
                model.backward(dlogits, input_grad=False)
                optimizer.step(model.grads)
            loss_sum += loss * len(idx)
            correct += int(np.sum(logits.argmax(axis=1) == yb))
            seen += len(idx)
            bar.update()
            if step % 20 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
        bar.close()
        if not all(np.isfinite(p).all() for p in model.params.values()):
            raise _diverged(f"non-finite weights after epoch {epoch}", cfg, ckpt_path, epoch)
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                test_loss, test_acc = evaluate(model, X_test, y_test)
        except NonFiniteError as e:
            test_loss, reason = float("nan"), f" ({e})"
        else:
            reason = ""
        if not np.isfinite(test_loss):
            raise _diverged(f"non-finite test loss after epoch {epoch}{reason}", cfg,
                            ckpt_path, epoch)
        row = {"epoch": epoch, "lr": optimizer.lr,
               "train_loss": loss_sum / seen, "train_acc": correct / seen,
               "test_loss": test_loss, "test_acc": test_acc,
               "seconds": round(time.perf_counter() - t0, 3)}
        history.append(row)
        train_cfg = asdict(cfg)
        meta = {"model": model.config, "train": train_cfg, "epoch": epoch,
                "history": history, "rng": _rng_states(shuffle_rng, model),
                "threads": threads}
        save_checkpoint(ckpt_path, model.params, optimizer.state_dict(), meta)
        _write_metrics(out, history)
        if on_epoch is not None:
            on_epoch(model, row)
        log(f"epoch {epoch}/{cfg.epochs}: train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f} | test loss {test_loss:.4f} acc {test_acc:.4f} "
            f"| {row['seconds']:.1f}s")

    from .plots import plot_curves, plot_transforms

    # Rewritten at the end too, so that a resumed complete run (killed after its last
    # checkpoint, say) gets back every output.
    _write_metrics(out, history)
    plot_curves(history, out / "curves.png")
    if model.transformer is not None:
        plot_transforms(model, X_test[:16], out / "transforms.png")
    return model, history
