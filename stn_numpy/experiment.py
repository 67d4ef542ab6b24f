"""The paper's distorted-MNIST experiment: CNN against ST-CNN, measured and pictured.

Jaderberg et al. (2015), Sec. 4.1 and Table 1: the same classifier with and without a
spatial transformer in front, trained on rotated (R), rotated-translated-scaled (RTS),
projective (P), elastic (E) and translated-cluttered (TC) MNIST. ``run_experiment`` fills
every row of the paper's Table 1: the fully connected ``paper-fcn`` and convolutional
``paper-cnn`` baselines, and ``paper-stfcn`` and ``paper-stcnn`` with affine, projective and
TPS heads, on R, RTS, P and E; the CNN and the affine ST-CNN on TC. Rows of this project's
own put a similarity head (angle, log scale, translation) in front of the CNN, with the
convolutional and with the fully connected localisation net, on R and RTS. The CNN rows
and the affine and similarity ST-CNNs train two seeds on RTS and TC. The *curve* runs
train the affine and similarity heads with each localisation net for ``curve_epochs`` on R
and record the rotation they undo after every epoch. After every finished run it writes:

* ``<runs>/<run>/`` -- the run folder of :func:`stn_numpy.train.train` (checkpoint, metrics)
  plus ``progress.json`` (per-epoch test error and transformer measures),
  ``snapshots.npz`` (the transformer's outputs for fixed test digits after every epoch)
  and ``result.json``, whose presence marks the run finished: a later call skips it, and
  an interrupted run continues from its last checkpoint;
* ``<out>/results.json`` -- every run's ``result.json`` and the config, the numbers
  themselves (:func:`read_results` reads them back);
* ``<out>/results.md`` -- the test errors beside the paper's Table 1, the measures of
  :mod:`stn_numpy.measures`, the settings and wall time of every run, and the figures
  ``<out>/<run>-snapshots.png`` (digits as the transformer saw them, epoch by epoch) and
  ``<out>/<run>-recovered.png`` (recovered against applied distortion), and
  ``<out>/epochs.png`` (every run's test error and transformer measure against epoch).

``results.md`` names files only relative to ``<out>``, so the folder can be committed.
:func:`readme_block` gives the experiment page's account of the same results (the tables,
the settings and the main figures, linked relative to the page), and :func:`update_readme`
writes it between the page's ``README_START`` and ``README_END`` markers, so that every
number there comes from the runs (``stn-numpy experiment --page docs/experiment.md``).
"""

from __future__ import annotations

import errno
import json
import math
import os
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ._io import (
    atomic_write,
    folder_lock,
    open_regular,
    read_text,
    remove_stale_temporaries,
    replace_marked,
)
from .checkpoint import load_checkpoint, model_from_params
from .measures import transformer_measures
from .train import TrainConfig, load_split, train

__all__ = ["CONFIGS", "DEFAULT_OUT", "DEFAULT_RUNS", "PAPER_ERRORS", "README_END",
           "README_START", "ExperimentConfig", "experiment_runs", "read_results",
           "readme_block", "run_experiment", "update_readme", "write_results"]

DEFAULT_OUT = "runs/experiment"
DEFAULT_RUNS = "runs/experiment/runs"

# Table 1 of the paper, test error in %: (dataset, model) -> error.
PAPER_ERRORS = {
    ("rot", "FCN"): 2.1, ("rts", "FCN"): 5.2, ("proj", "FCN"): 3.1, ("elastic", "FCN"): 3.2,
    ("rot", "ST-FCN Aff"): 1.2, ("rts", "ST-FCN Aff"): 0.8, ("proj", "ST-FCN Aff"): 1.5,
    ("elastic", "ST-FCN Aff"): 2.7,
    ("rot", "ST-FCN Proj"): 1.3, ("rts", "ST-FCN Proj"): 0.9, ("proj", "ST-FCN Proj"): 1.4,
    ("elastic", "ST-FCN Proj"): 2.6,
    ("rot", "ST-FCN TPS"): 1.1, ("rts", "ST-FCN TPS"): 0.8, ("proj", "ST-FCN TPS"): 1.4,
    ("elastic", "ST-FCN TPS"): 2.4,
    ("rot", "CNN"): 1.2, ("rts", "CNN"): 0.8, ("proj", "CNN"): 1.5, ("elastic", "CNN"): 1.4,
    ("rot", "ST-CNN Aff"): 0.7, ("rts", "ST-CNN Aff"): 0.5, ("proj", "ST-CNN Aff"): 0.8,
    ("elastic", "ST-CNN Aff"): 1.2,
    ("rot", "ST-CNN Proj"): 0.8, ("rts", "ST-CNN Proj"): 0.6, ("proj", "ST-CNN Proj"): 0.8,
    ("elastic", "ST-CNN Proj"): 1.3,
    ("rot", "ST-CNN TPS"): 0.7, ("rts", "ST-CNN TPS"): 0.5, ("proj", "ST-CNN TPS"): 0.8,
    ("elastic", "ST-CNN TPS"): 1.1,
    ("tc", "CNN"): 3.5, ("tc", "ST-CNN Aff"): 1.7,
}
COLUMNS = (("rot", "R"), ("rts", "RTS"), ("proj", "P"), ("elastic", "E"), ("tc", "TC"))
ROWS = ("FCN", "CNN", "ST-FCN Aff", "ST-FCN Proj", "ST-FCN TPS", "ST-CNN Aff", "ST-CNN Proj",
        "ST-CNN TPS", "ST-CNN Sim", "ST-CNN Sim, FCN loc")
HEAD_NAMES = {"affine": "Aff", "projective": "Proj", "tps": "TPS", "similarity": "Sim"}
ST_ARCHS = ("paper-stcnn", "paper-stfcn")
# rows that train every seed of the config on RTS and TC (the others: the first seed)
SEEDED_ROWS = ("CNN", "ST-CNN Aff", "ST-CNN Sim")
PAPER_HEADS = ("affine", "projective", "tps")
# (arch, transform, loc_net) of the curve runs: both heads with both localisation nets
CURVE_MODELS = (("paper-stcnn", "affine", None), ("paper-stcnn", "affine", "fcn"),
                ("paper-stcnn", "similarity", None), ("paper-stcnn", "similarity", "fcn"))
# The transformer's output side per dataset (None: the input's). RTS (42x42) and TC
# (60x60) are sampled down to a digit's 28x28, where the classifier then runs.
ST_SIZES = {"rts": 28, "tc": 28}
NOT_FULL_WARNING = ("> **Not the full experiment:** these runs had another budget than "
                    "`--config full` (see the settings); the paper comparison and the "
                    "analysis elsewhere refer to the full one.")
N_SNAPSHOT = 8  # test digits whose transformed images are kept after every epoch
N_PROGRESS = 1000  # test images measured after every epoch (the final measures use all)


@dataclass(frozen=True)
class ExperimentConfig:
    """The budget and recipe shared by every run of the experiment."""

    train_limit: int | None
    test_limit: int | None
    epochs: int
    seeds: tuple[int, ...]  # for rts and tc; the other datasets use the first
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9  # SGD only
    loc_lr_scale: float = 1.0
    lr_schedule: str = "cosine"
    whole_split: bool = True  # False: distort only the images used (see load_split)
    # (dataset, epochs) pairs: the ST-CNN runs on these datasets train this many epochs
    # instead of ``epochs``, e.g. at the CNN's compute where its classifier runs on a
    # smaller image.
    st_epochs: tuple[tuple[str, int], ...] = ()
    # The curve runs (CURVE_MODELS on R): their epochs (0: none) and training images.
    curve_epochs: int = 0
    curve_train_limit: int | None = None

    def epochs_of(self, run: Run) -> int:
        """The epochs ``run`` trains for."""
        if run.curve:
            return self.curve_epochs
        if run.arch == "paper-stcnn":
            return dict(self.st_epochs).get(run.dataset, self.epochs)
        return self.epochs

    def train_limit_of(self, run: Run) -> int | None:
        """The training images ``run`` uses (None: all)."""
        return self.curve_train_limit if run.curve else self.train_limit

    @classmethod
    def from_dict(cls, fields: dict) -> ExperimentConfig:
        """The config ``asdict`` gave, back from JSON (lists to tuples; fields added since
        take their defaults)."""
        fields = dict(fields)
        fields["seeds"] = tuple(fields["seeds"])
        if "st_epochs" in fields:
            fields["st_epochs"] = tuple((d, e) for d, e in fields["st_epochs"])
        return cls(**fields)


CONFIGS = {
    "full": ExperimentConfig(train_limit=None, test_limit=None, epochs=10, seeds=(0, 1),
                             st_epochs=(("rts", 25), ("tc", 30)), curve_epochs=30,
                             curve_train_limit=20000),
    "tiny": ExperimentConfig(train_limit=256, test_limit=128, epochs=1, seeds=(0, 1),
                             whole_split=False, curve_epochs=2, curve_train_limit=128),
}


@dataclass(frozen=True)
class Run:
    """One training run: a model on a dataset with a seed.

    ``loc_net`` names a localisation net other than the model's own (``"fcn"`` in front of
    the CNN classifier); ``curve`` marks a run of the epoch-by-epoch rotation curve.
    """

    dataset: str
    arch: str
    transform: str
    seed: int
    loc_net: str | None = None
    curve: bool = False

    @property
    def name(self) -> str:
        head = f"-{self.transform}" if self.arch in ST_ARCHS else ""
        loc = f"-{self.loc_net}loc" if self.loc_net else ""
        prefix = "curve-" if self.curve else ""
        return f"{prefix}{self.dataset}-{self.arch}{head}{loc}-seed{self.seed}"

    @property
    def row(self) -> str:
        if self.arch not in ST_ARCHS:
            return "CNN" if self.arch == "paper-cnn" else "FCN"
        kind = "ST-CNN" if self.arch == "paper-stcnn" else "ST-FCN"
        loc = f", {self.loc_net.upper()} loc" if self.loc_net else ""
        return f"{kind} {HEAD_NAMES[self.transform]}{loc}"


def _dataset_runs(dataset: str) -> list[Run]:
    """The table's runs on ``dataset`` for seed 0: the CNN and the affine ST-CNN, the
    similarity heads, the other ST-CNN heads, then the fully connected models."""
    runs = [Run(dataset, "paper-cnn", "affine", 0), Run(dataset, "paper-stcnn", "affine", 0)]
    if dataset == "tc":
        return runs
    if dataset in ("rot", "rts"):
        runs += [Run(dataset, "paper-stcnn", "similarity", 0),
                 Run(dataset, "paper-stcnn", "similarity", 0, loc_net="fcn")]
    runs += [Run(dataset, "paper-stcnn", head, 0) for head in PAPER_HEADS[1:]]
    runs += [Run(dataset, "paper-fcn", "affine", 0),
             *(Run(dataset, "paper-stfcn", head, 0) for head in PAPER_HEADS)]
    return runs


def experiment_runs(config: ExperimentConfig) -> list[Run]:
    """Every run of the experiment, grouped by the data it loads (each set is loaded once):
    the table's runs dataset by dataset, every seed of the config for ``SEEDED_ROWS`` on RTS
    and TC, and right after R's the curve runs (``config.curve_epochs`` > 0)."""
    runs = []
    for dataset, _ in COLUMNS:
        table = _dataset_runs(dataset)
        for seed in config.seeds:
            if seed == config.seeds[0]:
                runs += [replace(run, seed=seed) for run in table]
            elif dataset in ("rts", "tc"):
                runs += [replace(run, seed=seed) for run in table if run.row in SEEDED_ROWS]
        if dataset == "rot" and config.curve_epochs:
            runs += [Run("rot", arch, head, config.seeds[0], loc_net, curve=True)
                     for arch, head, loc_net in CURVE_MODELS]
    return runs


def _train_config(config: ExperimentConfig, run: Run, folder: Path, data_dir,
                  progress: bool) -> TrainConfig:
    return TrainConfig(
        model=run.arch, dataset=run.dataset, epochs=config.epochs_of(run),
        batch_size=config.batch_size, optimizer=config.optimizer, lr=config.lr,
        momentum=config.momentum, lr_schedule=config.lr_schedule, seed=run.seed,
        out=str(folder), data_dir=data_dir, train_limit=config.train_limit_of(run),
        test_limit=config.test_limit, transform=run.transform,
        st_size=ST_SIZES.get(run.dataset) if run.arch in ST_ARCHS else None,
        loc_lr_scale=config.loc_lr_scale, loc_net=run.loc_net, progress=progress)


def _run_settings(config: ExperimentConfig, run: Run) -> dict:
    """What ``run``'s training depends on: the config without the seed list and the other
    runs' epochs and images."""
    others = ("seeds", "st_epochs", "curve_epochs", "curve_train_limit")
    settings = {k: v for k, v in asdict(config).items() if k not in others}
    return {**settings, "epochs": config.epochs_of(run),
            "train_limit": config.train_limit_of(run)}


_RESULT_FIELDS = {"run": str, "dataset": str, "arch": str, "row": str, "seed": int,
                  "train_images": int, "test_images": int, "epochs": int,
                  "test_error": (int, float), "seconds": (int, float), "measures": dict,
                  "progress": list}


def _finished(folder: Path, config: ExperimentConfig, run: Run) -> dict | None:
    """``run``'s stored result, or None if it has not finished. A run finished with other
    settings of its own raises ``ValueError``; one finished under a config that differs
    only for other runs (their seeds, their epochs) is kept."""
    path = folder / "result.json"
    done = _read_json(path, None)
    if done is None:
        return None
    if _stored_settings(done, run, f"{path}: ", "delete it to train the run again") \
            != _run_settings(config, run):
        raise ValueError(f"{folder} was finished with other settings "
                         f"({done['config']}); choose another --runs folder")
    return done


def _stored_settings(done, run: Run, where: str, remedy: str) -> dict:
    """The settings of its own that a stored result of ``run`` was made with, once the
    fields results.md reads from it are checked; ``ValueError`` (``where`` + why +
    ``remedy``) for one this experiment did not write."""
    try:
        stored = _run_settings(ExperimentConfig.from_dict(done["config"]), run)
        for key, kind in _RESULT_FIELDS.items():  # what results.md reads from each result
            if not isinstance(done[key], kind) or isinstance(done[key], bool):
                raise TypeError(f"{key!r} is a {type(done[key]).__name__}")
        if not all(isinstance(row, dict) and {"epoch", "test_error"} <= set(row)
                   for row in done["progress"]):
            raise TypeError("'progress' rows need 'epoch' and 'test_error'")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}not a result this experiment wrote (field {exc}); "
                         f"{remedy}") from None
    return stored


def _recorded_results(out: Path) -> dict[str, dict]:
    """The results ``<out>/results.json`` records, by run name (none without the file)."""
    path = out / "results.json"
    if not path.is_file():
        return {}
    return {r["run"]: r for r in read_results(out)[0]}


def _kept_if_same_settings(result: dict, config: ExperimentConfig, run: Run,
                           out: Path) -> dict | None:
    """A result recorded in ``<out>/results.json`` whose run folder is gone (a fresh clone
    holds the results and figures, not the checkpoints), kept when its own settings are
    the config's: the committed results stay the record until a setting of theirs changes.
    It is checked as a run folder's ``result.json`` is."""
    where = f"{out / 'results.json'}, run {run.name}: "
    stored = _stored_settings(result, run, where, "remove that run from the file to train "
                              "it again")
    return result if stored == _run_settings(config, run) else None


def _summary(measures: dict) -> dict:
    """The measures without their per-image arrays (what result.json keeps)."""
    return {name: {k: v for k, v in m.items() if not isinstance(v, np.ndarray)}
            for name, m in measures.items()}


def _write_json(path: Path, value) -> None:
    text = json.dumps(value, indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _read_json(path: Path, default):
    """The JSON value in ``path``, ``default`` if there is no such file; a file that is not
    JSON (or not a regular file) is an error naming it."""
    try:
        text = read_text(path)
    except FileNotFoundError:
        return default
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


class _Recorder:
    """Keeps, after every epoch, the transformer's outputs for fixed test digits and its
    measures on the first test images; resumes from what an interrupted run left, and
    :meth:`__call__` recomputes for an epoch only what is missing (a run killed between
    its checkpoint and these files gets them back from the checkpoint)."""

    def __init__(self, folder: Path, X, params: dict, dataset: str, start_epoch: int):
        self.folder, self.dataset = folder, dataset
        self.X = X[:N_PROGRESS]
        self.params = {k: v[:N_PROGRESS] for k, v in params.items()}
        progress = folder / "progress.json"
        try:
            self.progress = [r for r in _read_json(progress, [])
                             if r["epoch"] <= start_epoch]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{progress}: not the per-epoch record this experiment "
                             f"writes ({type(exc).__name__}: {exc})") from None
        self.epochs, self.images = [], []
        path = folder / "snapshots.npz"
        try:
            with open_regular(path) as f, np.load(f, allow_pickle=False) as z:
                epochs, images = z["epochs"], z["images"]
                keep = epochs <= start_epoch
                self.epochs, self.images = list(epochs[keep]), list(images[keep])
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: not the snapshots this experiment writes "
                             f"({type(exc).__name__}: {exc})") from None

    def __call__(self, model, row: dict) -> None:
        epoch = row["epoch"]
        if model.transformer is not None and epoch not in self.epochs:
            self.epochs.append(epoch)
            self.images.append(model.transform(self.X[:N_SNAPSHOT])[:, 0])
            epochs, images = np.array(self.epochs), np.stack(self.images)
            atomic_write(self.folder / "snapshots.npz",
                         lambda f: np.savez(f, epochs=epochs, images=images))
        if all(r["epoch"] != epoch for r in self.progress):
            entry = {"epoch": epoch, "test_error": 100 * (1 - row["test_acc"])}
            if model.transformer is not None and len(self.X) > 1:
                entry.update(_summary(transformer_measures(model, self.X, self.params,
                                                           self.dataset)))
            self.progress.append(entry)
            _write_json(self.folder / "progress.json", self.progress)


def _run_one(config: ExperimentConfig, run: Run, folder: Path, data, test_params, out: Path,
             data_dir, progress: bool, log) -> dict:
    cfg = _train_config(config, run, folder, data_dir, progress)
    remove_stale_temporaries(folder, ("progress.json", "snapshots.npz", "result.json"))
    remove_stale_temporaries(out, ("results.json", "results.md", "epochs.png",
                                   f"{run.name}-snapshots.png", f"{run.name}-recovered.png"))
    ckpt = folder / "checkpoint.npz"
    start_epoch = 0
    if ckpt.exists():
        params, _, meta = load_checkpoint(ckpt, require=("model", "epoch", "history"))
        start_epoch = meta["epoch"]
    recorder = _Recorder(folder, data[2], test_params, run.dataset, start_epoch)
    if start_epoch:
        # A kill between the checkpoint and the per-epoch record (or its figures) loses
        # nothing: what the checkpoint's last epoch implies is recomputed from it.
        recorder(model_from_params(meta["model"], params, source=str(ckpt)),
                 meta["history"][-1])
    # Also for a checkpoint that holds every epoch: train then trains none, removes
    # stale temporaries and rewrites the run's metrics and figures.
    model, history = train(cfg, resume=start_epoch > 0, data=data, log=log,
                           overwrite=True, on_epoch=recorder)
    X_test = data[2]
    measures = transformer_measures(model, X_test, test_params, run.dataset)
    result = {"run": run.name, "dataset": run.dataset, "arch": run.arch,
              "transform": run.transform if run.arch in ST_ARCHS else None,
              "loc_net": run.loc_net, "curve": run.curve,
              "seed": run.seed, "st_size": cfg.st_size, "row": run.row,
              "train_images": len(data[0]), "test_images": len(X_test),
              "epochs": len(history), "test_error": 100 * (1 - history[-1]["test_acc"]),
              "seconds": round(sum(r["seconds"] for r in history), 1),
              "measures": _summary(measures), "progress": recorder.progress,
              "config": asdict(config)}
    from .plots import plot_recovered, plot_snapshots

    if recorder.images:
        plot_snapshots(X_test[:N_SNAPSHOT], np.stack(recorder.images), recorder.epochs,
                       out / f"{run.name}-snapshots.png", title=run.name)
    scatter = {k: m for k, m in measures.items() if "applied" in m}
    if scatter:
        plot_recovered(scatter, out / f"{run.name}-recovered.png", title=run.name)
    _write_json(folder / "result.json", result)
    return json.loads(json.dumps(result))  # as a later call reads it back


def run_experiment(config="full", out=DEFAULT_OUT, runs=None, data_dir=None, progress=True,
                   log=print) -> list[dict]:
    """Train every run of the experiment not yet finished, then write ``results.md``.

    Parameters
    ----------
    config : str or ExperimentConfig
        A key of ``CONFIGS`` (``"full"``: the budgeted experiment; ``"tiny"``: a smoke test
        of every run on a few hundred images) or a config.
    out : str or Path
        Folder for ``results.md`` and the figures.
    runs : str or Path or None
        Folder for the run folders; ``DEFAULT_RUNS/<config>`` when None (a custom config:
        ``DEFAULT_RUNS/custom``).
    data_dir, progress, log
        As for :func:`stn_numpy.train.train`.

    Returns
    -------
    list of dict
        The result of every run (``result.json``), in the order of :func:`experiment_runs`.

    While it runs it holds the locks of ``out`` and ``runs``
    (:func:`~stn_numpy._io.folder_lock`), and ``train`` that of each run folder, so a
    second experiment (or a ``train``) on them is refused with ``OSError``.

    Raises
    ------
    ValueError
        A finished run in ``runs`` was made with other settings of its own, or a file of
        a run is damaged (the message names it).
    OSError
        Another command holds ``out``, ``runs`` or a run folder.
    """
    name = config if isinstance(config, str) else "custom"
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"config must be one of {sorted(CONFIGS)}, got {config!r}")
        config = CONFIGS[config]
    out = Path(out)
    runs = Path(runs) if runs is not None else Path(DEFAULT_RUNS) / name
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    with folder_lock(out), folder_lock(runs):
        return _run_all(config, out, runs, data_dir, progress, log)


def _run_all(config: ExperimentConfig, out: Path, runs: Path, data_dir, progress,
             log) -> list[dict]:
    """The body of :func:`run_experiment`, run while it holds the folders' locks."""
    recorded = _recorded_results(out)
    every_run = experiment_runs(config)
    # Every finished result first: each write of results.json then holds them all, not
    # only those the loop has reached (a kill mid-experiment loses no recorded run).
    finished = {}
    for run in every_run:
        folder = runs / run.name
        done = _finished(folder, config, run)
        if done is None and run.name in recorded and not (folder / "checkpoint.npz").exists():
            done = _kept_if_same_settings(recorded[run.name], config, run, out)
        if done is not None:
            finished[run.name] = done

    def in_order() -> list[dict]:
        return [finished[run.name] for run in every_run if run.name in finished]

    data, loaded = None, None
    for run in every_run:
        folder = runs / run.name
        if run.name in finished:
            log(f"{run.name}: finished earlier, kept")
            continue
        wanted = (run.dataset, config.train_limit_of(run))
        if loaded != wanted:
            data = None  # free the previous dataset first
            X_tr, y_tr = load_split(run.dataset, "train", data_dir, wanted[1],
                                    whole_split=config.whole_split)
            X_te, y_te, test_params = load_split(run.dataset, "test", data_dir,
                                                 config.test_limit, return_params=True,
                                                 whole_split=config.whole_split)
            data, loaded = (X_tr, y_tr, X_te, y_te), wanted
        log(f"{run.name}: training")
        folder.mkdir(parents=True, exist_ok=True)
        finished[run.name] = _run_one(config, run, folder, data, test_params, out, data_dir,
                                      progress, log)
        write_results(in_order(), config, out)
        log(f"{run.name}: test error {finished[run.name]['test_error']:.2f}%")
    results = in_order()
    write_results(results, config, out)
    return results


# --------------------------------------------------------------------------------------
# results.md
# --------------------------------------------------------------------------------------


def _cell(errors: list[float], paper: float | None) -> str:
    if not errors:
        text = "-"
    elif len(errors) == 1:
        text = f"{errors[0]:.2f}"
    else:
        text = f"{np.mean(errors):.2f} ± {np.std(errors, ddof=1):.2f}"
    return text if paper is None else f"{text} ({paper})"


def _measure_text(name: str, m: dict) -> str:
    if name == "ink_inside":
        return f"ink inside window: mean {m['mean']:.3f}, min {m['min']:.3f}"
    return f"{name}: slope {m['slope']:+.3f}, R² {m['r2']:.3f}"


# The one measure that the epoch-by-epoch table and figure follow, the first of these a
# run has: (measure, its number, text format, axis label, reference lines (value, label)).
_HEADLINES = (
    ("rotation", "slope", "+.2f", "rotation slope, recovered vs applied",
     ((0.0, "none undone (0)"), (-0.8, "target (-0.8)"), (-1.0, "all undone (-1)"))),
    ("ink_inside", "mean", ".2f", "ink inside the window (mean)", ((1.0, "all inside"),)),
)
EPOCHS_CAPTION = ("test error and the transformer's measure (rotation slope on R and RTS, "
                  "ink inside the window on TC) after each epoch")


def _headline(row: dict) -> str:
    for name, key, fmt, *_ in _HEADLINES:
        if name in row:
            return format(row[name][key], fmt)
    return "-"


def _curve(result: dict, headline, seeds: list[int]):
    """A run's test error and headline measure (NaN where not measured) after each epoch."""
    from .plots import Curve

    progress, measure = result["progress"], None
    if headline and any(headline[0] in row for row in progress):
        name, key = headline[:2]
        measure = [row[name][key] if name in row else math.nan for row in progress]
    return Curve(f"{result['row']}, seed {result['seed']}", ROWS.index(result["row"]),
                 seeds.index(result["seed"]), [row["epoch"] for row in progress],
                 [row["test_error"] for row in progress], measure)


def _plot_epochs(results: list[dict], path: Path) -> bool:
    """Draw ``path``: each dataset's runs epoch by epoch; False (nothing drawn) without
    per-epoch data."""
    from .plots import plot_epochs

    seeds = sorted({r["seed"] for r in results})
    columns = []
    for dataset, label in COLUMNS:
        runs = [r for r in results if r["dataset"] == dataset and r.get("progress")]
        rows = [row for r in runs for row in r["progress"]]
        headline = next((h for h in _HEADLINES if any(h[0] in row for row in rows)), None)
        curves = [_curve(r, headline, seeds) for r in runs]
        if curves:
            columns.append((f"{label} ({dataset})", curves, headline and headline[3],
                            headline[4] if headline else ()))
    if columns:
        plot_epochs(columns, path, title="test error and transformer measure after each epoch")
    return bool(columns)


def read_results(out) -> tuple[list[dict], ExperimentConfig]:
    """The runs' results and the config that :func:`write_results` stored in ``<out>``."""
    path = Path(out) / "results.json"
    stored = _read_json(path, None)
    if stored is None:
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
    try:
        return stored["results"], ExperimentConfig.from_dict(stored["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not the results this experiment writes "
                         f"({type(exc).__name__}: {exc})") from None


def write_results(results: list[dict], config: ExperimentConfig, out) -> None:
    """Write ``<out>/results.json`` and ``<out>/results.md`` from the finished runs' results.

    ``results.json`` holds ``{"config": the config as a dict, "results": results}``, the
    results exactly as given (each run's ``result.json``).
    """
    out = Path(out)
    _write_json(out / "results.json", {"config": asdict(config), "results": results})
    results, curve_runs = _split_curves(results)
    drew_epochs = _plot_epochs(results, out / "epochs.png")
    curve_lines = _curve_section(curve_runs, out, out)
    lines = ["# CNN against ST-CNN on distorted MNIST", "", *_error_table(results, config),
             "", "## Settings", "", *(f"* {item}" for item in _settings(results, config)),
             "", "## What the transformer does", "", *_measures_table(results)]
    curves = [r for r in results
              if any(set(row) - {"epoch", "test_error"} for row in r.get("progress", []))]
    if curves:
        test_images = _image_counts(results, config)[1]
        lines += ["", "### Epoch by epoch", "",
                  f"The same measures on the first {min(N_PROGRESS, *test_images)} test images "
                  "after each epoch "
                  "(rotation slope; for TC the mean ink inside the window), and the test "
                  "error (%):", "", "| run | epoch: measure, error |", "|---|---|"]
        for r in curves:
            cells = [f"{row['epoch']}: {_headline(row)}, {row['test_error']:.1f}"
                     for row in r["progress"]]
            lines.append(f"| {r['run']} | " + "; ".join(cells) + " |")
    if curve_lines:
        lines += ["", "## How fast the transformer learns to undo rotation", "", *curve_lines]
    lines += ["", "## Runs", "",
              "| run | epochs | test error % | wall time (s) |", "|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['epochs']} | {r['test_error']:.2f} | {r['seconds']:.0f} |"
              for r in results + curve_runs]
    lines += ["", _total_time(results + curve_runs), "", "## Figures", ""]
    if drew_epochs:
        lines += _epochs_figure(out, out)
    for r in results:
        lines += _run_figures(out, r["run"], out)
    text = "\n".join(lines).rstrip() + "\n"
    atomic_write(out / "results.md", lambda f: f.write(text.encode()))


def _split_curves(results: list[dict]) -> tuple[list[dict], list[dict]]:
    """The table's results and the curve runs' results."""
    return ([r for r in results if not r.get("curve")], [r for r in results if r.get("curve")])


CURVE_TARGETS = (-0.5, -0.8)
CURVE_FIGURE = "rotation-curve.png"


def _first_epoch(progress: list[dict], target: float) -> str:
    """The first epoch whose rotation slope is at or below ``target`` ("-" if none)."""
    return next((str(row["epoch"]) for row in progress
                 if "rotation" in row and row["rotation"]["slope"] <= target), "-")


def _curve_section(curve_runs: list[dict], out: Path, link_dir) -> list[str]:
    """The curve runs' table (the first epoch each reaches each of ``CURVE_TARGETS``, the
    last slope, R² and error) and their figure ``<out>/CURVE_FIGURE``; nothing without
    curve runs."""
    from .plots import plot_rotation_curves

    if not curve_runs:
        return []
    curves = []
    for r in curve_runs:
        rows = [row for row in r["progress"] if "rotation" in row]
        curves.append((r["row"], [row["epoch"] for row in rows],
                       [row["rotation"]["slope"] for row in rows],
                       [row["rotation"]["r2"] for row in rows],
                       [row["test_error"] for row in rows]))
    plot_rotation_curves(curves, out / CURVE_FIGURE, CURVE_TARGETS,
                         title="R: the rotation each transformer undoes after each epoch")
    first = curve_runs[0]
    lines = [
        f"Each run trains {first['epochs']} epochs on the first {first['train_images']} "
        f"images of R (digits rotated up to ±90°) with a cosine schedule over those epochs; "
        f"after each epoch the rotation slope (recovered against applied, -1 undoes every "
        f"rotation) and its R² are measured on the first {N_PROGRESS} test images, and at the "
        f"end on all {first['test_images']}.",
        "",
        "| run | first epoch with slope ≤ -0.5 | ≤ -0.8 | final slope | final R² | "
        "test error % |",
        "|---|---|---|---|---|---|",
    ]
    for r in curve_runs:
        rotation = r["measures"].get("rotation", {})
        slope, r2 = rotation.get("slope", math.nan), rotation.get("r2", math.nan)
        lines.append(f"| {r['row']} | {_first_epoch(r['progress'], CURVE_TARGETS[0])} | "
                     f"{_first_epoch(r['progress'], CURVE_TARGETS[1])} | {slope:+.3f} | "
                     f"{r2:.3f} | {r['test_error']:.2f} |")
    return lines + [""] + _figure(out, CURVE_FIGURE, "rotation slope against epoch",
                                  "Rotation slope, R² and test error after each epoch:",
                                  link_dir)


def _image_counts(results: list[dict], config: ExperimentConfig) -> tuple[list, list]:
    """The training and test set sizes the runs used (the config's limits before any)."""
    return (sorted({r["train_images"] for r in results}) or [config.train_limit],
            sorted({r["test_images"] for r in results}) or [config.test_limit])


def _error_table(results: list[dict], config: ExperimentConfig) -> list[str]:
    """The test errors beside the paper's Table 1, with the sentence that explains them."""
    lines = [
        "Test error (%) of this project's runs, the paper's Table 1 in brackets "
        "(Jaderberg et al. 2015, trained about 640 epochs on the full set). Rows are the "
        "fully connected and convolutional classifiers alone (`paper-fcn`, `paper-cnn`) and "
        "with a spatial transformer of the given head in front (`paper-stfcn`, "
        "`paper-stcnn`); Sim is this project's similarity head (angle, log scale, "
        "translation), with the CNN's or the FCN's localisation net. RTS and TC: mean ± "
        f"standard deviation over {len(config.seeds)} seeds for {', '.join(SEEDED_ROWS)}.",
        "",
        "| model | " + " | ".join(label for _, label in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for row in ROWS:
        cells = []
        for dataset, _ in COLUMNS:
            errors = _errors(results, row, dataset)
            paper = PAPER_ERRORS.get((dataset, row))
            cells.append(_cell(errors, paper) if errors or paper is None else f"- ({paper})")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    reduction = _reduction_line(results)
    return lines + (["", reduction] if reduction else [])


def _errors(results: list[dict], row: str, dataset: str) -> list[float]:
    """The test errors of the runs of one table cell (one per seed)."""
    return [r["test_error"] for r in results if r["row"] == row and r["dataset"] == dataset]


def _reduction_line(results: list[dict]) -> str:
    """How many fewer errors the affine ST-CNN makes than the CNN, per dataset (means
    over the seeds); empty until some dataset has both."""
    cells = []
    for dataset, label in COLUMNS:
        cnn, st = _errors(results, "CNN", dataset), _errors(results, "ST-CNN Aff", dataset)
        if cnn and st and np.mean(cnn) > 0:
            cells.append(f"{label} {100 * (1 - np.mean(st) / np.mean(cnn)):.0f}%")
    return ("Fewer errors with the affine ST-CNN than with the CNN: " + ", ".join(cells)
            + ".") if cells else ""


def _settings(results: list[dict], config: ExperimentConfig) -> list[str]:
    """The budget and recipe, one item per line of results.md."""
    train_images, test_images = _image_counts(results, config)
    return [
        f"training images per dataset: {', '.join(map(str, train_images))}; test images: "
        f"{', '.join(map(str, test_images))}",
        f"epochs: {config.epochs}"
        + "".join(f", ST-CNN on {d.upper()} {e}" for d, e in config.st_epochs)
        + f"; batch size {config.batch_size}; {config.optimizer}"
        + (f" (momentum {config.momentum})" if config.optimizer == "sgd" else "")
        + f", lr {config.lr}, {config.lr_schedule} schedule; localisation net at "
        f"{config.loc_lr_scale} x lr",
        f"seeds: {', '.join(map(str, config.seeds))} for {', '.join(SEEDED_ROWS)} on RTS "
        f"and TC, {config.seeds[0]} elsewhere",
        "transformer output: " + ", ".join(f"{d} {s}x{s}" for d, s in ST_SIZES.items())
        + ", the input's size elsewhere",
    ]


def _measures_table(results: list[dict]) -> list[str]:
    """What each ST run's transformer does to the distortion, one row per run."""
    lines = [
        "Measured on the test set (see `stn_numpy/measures.py`): on R and RTS the angle of "
        "the transformer's sampling grid against the rotation applied to the digit (slope "
        "-1: the grid turns with the digit and V shows it upright, 0: no rotation undone), "
        "on RTS also the window's scale and its centre "
        "against the digit's (slope > 0 and R² near 1: it follows the digit), on TC the "
        "fraction of the digit's ink inside the transformer's window.",
        "",
        "| run | measures |",
        "|---|---|",
    ]
    for r in results:
        if r["measures"]:
            text = "; ".join(_measure_text(k, m) for k, m in r["measures"].items())
            lines.append(f"| {r['run']} | {text} |")
    return lines


def _total_time(results: list[dict]) -> str:
    total = sum(r["seconds"] for r in results)
    return f"Total training time: {total / 3600:.2f} h ({math.ceil(total)} s)."


_RUN_FIGURES = (("snapshots", "test digits (top) and the transformer's output after each epoch"),
                ("recovered", "recovered against applied distortion"))


def _figure(out: Path, name: str, alt: str, caption: str, link_dir) -> list[str]:
    """A caption and the markdown image of ``<out>/<name>`` linked relative to
    ``link_dir``; nothing when the file is absent."""
    path = out / name
    if not path.is_file():
        return []
    link = Path(os.path.relpath(path, link_dir)).as_posix()
    return [caption, "", f"![{alt}]({link})", ""]


def _epochs_figure(out: Path, link_dir) -> list[str]:
    return _figure(out, "epochs.png", "epoch by epoch", f"All runs: {EPOCHS_CAPTION}", link_dir)


def _run_figures(out: Path, run: str, link_dir) -> list[str]:
    return [line for kind, caption in _RUN_FIGURES
            for line in _figure(out, f"{run}-{kind}.png", f"{run} {kind}", f"{run}: {caption}",
                                link_dir)]


# --------------------------------------------------------------------------------------
# The README's block
# --------------------------------------------------------------------------------------

README_START, README_END = "<!-- experiment:start -->", "<!-- experiment:end -->"
# the runs (of the first seed) whose snapshots and recovered-vs-applied plots are pictured
README_FIGURES = (("rot", "paper-stcnn", "similarity", "fcn"),
                  ("rot", "paper-stcnn", "similarity", None),
                  ("rot", "paper-stcnn", "affine", None), ("rts", "paper-stcnn", "affine", None),
                  ("proj", "paper-stcnn", "affine", None), ("tc", "paper-stcnn", "affine", None))


def readme_block(results: list[dict], config: ExperimentConfig, out, readme_dir) -> str:
    """The README's account of the experiment, as markdown, from the runs' results.

    The test-error table beside the paper's (under a warning line for any config other
    than ``CONFIGS["full"]``), the settings in one line, the total training
    time, the transformer measures of every ST run (the same text as ``results.md``), the
    curve runs' table and figure, and the figures: ``epochs.png``, and for each of
    ``README_FIGURES`` the first seed's snapshots and recovered-vs-applied plot, where drawn.

    Parameters
    ----------
    results : list of dict
        The runs' results, as :func:`run_experiment` returns them.
    config : ExperimentConfig
        The config they were made with.
    out : str or Path
        The folder holding the figures (``write_results``'s ``out``).
    readme_dir : str or Path
        The folder of the markdown file: image links are relative to it.

    Returns
    -------
    str
        Markdown ending in a newline; the same for the same results and files.
    """
    out = Path(out)
    # A smoke test written into a README must not pass for the experiment's results.
    warning = [] if config == CONFIGS["full"] else [NOT_FULL_WARNING, ""]
    results, curve_runs = _split_curves(results)
    lines = [*warning, *_error_table(results, config), "",
             "Settings: " + "; ".join(_settings(results, config)) + ".", "",
             _total_time(results + curve_runs), "", *_measures_table(results), ""]
    lines += _epochs_figure(out, readme_dir)
    curve_lines = _curve_section(curve_runs, out, readme_dir)
    if curve_lines:
        lines += ["How fast the transformer learns to undo rotation:", "", *curve_lines]
    finished = {r["run"] for r in results}
    for dataset, arch, transform, loc_net in README_FIGURES:
        run = Run(dataset, arch, transform, config.seeds[0], loc_net).name
        if run in finished:
            lines += _run_figures(out, run, readme_dir)
    return "\n".join(lines).rstrip() + "\n"


def update_readme(path, results: list[dict], config: ExperimentConfig, out) -> Path:
    """Replace the block of the markdown file ``path`` between ``README_START`` and
    ``README_END`` with :func:`readme_block`, atomically; the rest stays byte for byte.

    Raises
    ------
    ValueError
        ``path`` lacks the markers (the message names it).
    """
    path = Path(path)
    return replace_marked(path, README_START, README_END,
                          readme_block(results, config, out, path.parent))
