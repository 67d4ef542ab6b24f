"""Checkpoints: one ``.npz`` holding weights, optimizer state, config and progress.

Layout of the archive (all plain arrays, readable with ``np.load(path)``):

* ``param/<name>`` -- model parameters, keyed like PyTorch's ``state_dict``;
* ``optim/<key>``  -- optimizer state (momentum buffers, Adam moments, step count);
* ``meta``         -- a JSON string: ``format``, model ``config``, training ``config``,
  ``epoch`` (completed epochs), ``history`` (per-epoch metrics), ``rng`` (generator
  states for shuffling and dropout, so a resumed run continues bit-identically) and
  ``threads`` (the run's BLAS thread count, on which the last bits of the weights depend).

Files are written atomically (:func:`stn_numpy._io.atomic_write`): to a temporary file in
the same folder, flushed to disk, then renamed over the old checkpoint. A crash mid-write
leaves the previous checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np

from ._io import atomic_write, open_regular, read_npy_header
from .models import Model, build_model

__all__ = ["save_checkpoint", "load_checkpoint", "load_model", "atomic_write"]

FORMAT = "stn-numpy-checkpoint-1"


def save_checkpoint(path, params: dict, optim_state: dict, meta: dict) -> None:
    """Write ``params``, ``optim_state`` (dicts of arrays) and ``meta`` (JSON-able) to ``path``."""
    arrays = {f"param/{k}": np.asarray(v) for k, v in params.items()}
    arrays.update({f"optim/{k}": np.asarray(v) for k, v in optim_state.items()})
    arrays["meta"] = np.array(json.dumps({"format": FORMAT, **meta}, allow_nan=False))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path, require=("model",)) -> tuple[dict, dict, dict]:
    """Read a checkpoint; returns ``(params, optim_state, meta)``.

    Every member's ``.npy`` header is checked against the bytes the archive really holds
    before anything is read, so a forged header cannot make it allocate terabytes. Then
    every field is checked: parameters are float arrays, optimizer entries numbers, and
    each ``meta`` field present has its type (``epoch`` an int >= 0, ``history`` a list of
    rows of finite numbers, ...); the fields named in ``require`` must be present.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        The file is not a readable stn-numpy checkpoint (truncated, corrupt, wrong format,
        a missing or mistyped field); the message names the file and the field.
    """
    path = Path(path)
    try:
        f = open_regular(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    with f:
        try:
            _check_member_sizes(f)
            f.seek(0)
            with np.load(f, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in archive.files}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path} is not a readable stn-numpy checkpoint ({e})") from e
    meta_array = arrays.pop("meta", None)
    if meta_array is None or meta_array.shape != () or meta_array.dtype.kind != "U":
        raise ValueError(f"{path}: field 'meta' must be a JSON string, got "
                         f"{'nothing' if meta_array is None else _describe(meta_array)}")
    try:
        meta = json.loads(str(meta_array))
    except ValueError as e:
        raise ValueError(f"{path}: field 'meta' is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: field 'meta' must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    _check_meta(path, meta, require)
    params, optim_state = {}, {}
    for key, value in arrays.items():
        group, _, name = key.partition("/")
        if group == "param" and value.dtype in (np.float32, np.float64):
            params[name] = value
        elif group == "optim" and value.dtype.kind in "fiu":
            optim_state[name] = value
        else:
            raise ValueError(f"{path}: field {key!r} is not a float parameter or a numeric "
                             f"optimizer entry, got {_describe(value)}")
    return params, optim_state, meta


def _describe(a: np.ndarray) -> str:
    return f"{a.dtype} array of shape {a.shape}"


def _check_member_sizes(f) -> None:
    """Compare every member's declared array size with what the archive stores for it.

    ``np.savez`` stores members as they are, so a compressed one is refused (see
    :func:`~stn_numpy._io.read_npy_header`) and none can claim more than the file holds.
    """
    on_disk = os.fstat(f.fileno()).st_size
    with zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            name = info.filename.removesuffix(".npy")
            if info.file_size > on_disk:
                raise ValueError(f"field {name!r} claims {info.file_size} bytes, more than "
                                 f"the {on_disk}-byte file can hold")
            try:
                read_npy_header(zf, info)
            except ValueError as exc:
                raise ValueError(f"field {name!r} {exc}") from None


def _check_meta(path: Path, meta: dict, require) -> None:
    missing = [name for name in require if name not in meta]
    if missing:
        raise ValueError(f"{path}: field(s) {missing} missing from 'meta'")

    def bad(field, expected):
        return ValueError(f"{path}: field {field!r} must be {expected}, got {meta[field]!r:.80}")

    for field in ("model", "train", "rng"):
        if field in meta and not isinstance(meta[field], dict):
            raise bad(field, "a JSON object")
    for field, minimum in (("epoch", 0), ("threads", 1)):
        value = meta.get(field, minimum)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise bad(field, f"an int >= {minimum}")
    history = meta.get("history", [])
    if not isinstance(history, list) or not all(
        isinstance(row, dict) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in row.values())
        for row in history
    ):
        raise bad("history", "a list of rows of finite numbers")
    if "history" in meta and "epoch" in meta and len(history) != meta["epoch"]:
        raise ValueError(f"{path}: field 'history' holds {len(history)} rows for "
                         f"epoch {meta['epoch']}")
    rng = meta.get("rng", {"shuffle": {}, "dropout": []})
    if not (isinstance(rng.get("shuffle"), dict) and isinstance(rng.get("dropout"), list)):
        raise bad("rng", "an object with 'shuffle' (an object) and 'dropout' (a list)")


def model_from_params(config: dict, params: dict, source="parameters") -> Model:
    """Rebuild the architecture of ``config`` and copy ``params`` into it.

    Before the model is built, the sizes in ``config`` are bounded by ``params``: every
    architecture's parameters grow with its input's area (see :func:`_least_parameters`),
    so a size the parameters cannot match is refused before its weights are allocated.
    """
    keys = ("arch", "input_size", "transform", "mode", "padding_mode", "align_corners",
            "seed", "dtype")
    missing = [k for k in keys if k not in config]
    if missing:
        raise ValueError(f"{source}: field 'model' lacks {missing}")
    held = sum(int(np.size(p)) for p in params.values())
    least = _least_parameters(config.get("input_size"), config.get("st_size"))
    if least > held:
        raise ValueError(f"{source}: field 'model': input_size {config['input_size']!r} and "
                         f"st_size {config.get('st_size')!r} need at least {least} "
                         f"parameters, the file holds {held}")
    try:
        model = build_model(*(config[k] for k in keys), st_size=config.get("st_size"),
                            loc_net=config.get("loc_net"))  # None before it existed
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: field 'model': {e}") from None
    own = model.params
    if set(own) != set(params):
        raise ValueError(f"{source} do not match a {config['arch']!r} model: "
                         f"missing {sorted(set(own) - set(params))}, "
                         f"unexpected {sorted(set(params) - set(own))}")
    for name, p in own.items():
        if params[name].shape != p.shape:
            raise ValueError(f"{source}: {name} has shape {params[name].shape}, "
                             f"expected {p.shape}")
        p[...] = params[name]
    return model


def _least_parameters(input_size, st_size) -> int:
    """A lower bound of the parameter count of every architecture for these sizes.

    Each network ends in two convolutions (kernels of at most 9) with 2x2 pooling, after an
    optional 2x pool (at most 8x smaller a side, less 5 for the kernels), then a Linear
    layer of at least 10 channels in and 10 units out, at least
    ``100 (H // 8 - 5) (W // 8 - 5)`` weights; the classifier runs on ``st_size`` and a
    transformer's localisation net on ``input_size``. Unreadable sizes count as 0 here;
    :func:`~stn_numpy.models.build_model` refuses them.
    """
    def least(size):
        try:
            H, W = ((size, size) if isinstance(size, int) else size)
            return 100 * max(0, H // 8 - 5) * max(0, W // 8 - 5)
        except (TypeError, ValueError):
            return 0

    if st_size is None:
        return least(input_size)
    return least(input_size) + least(st_size)


def load_model(path) -> Model:
    """The trained model stored in a checkpoint, ready for ``predict`` and ``transform``."""
    params, _, meta = load_checkpoint(path)
    return model_from_params(meta["model"], params, source=str(path))
