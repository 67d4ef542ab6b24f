"""Checkpoints: one ``.npz`` holding weights, optimizer state, config and progress.

Layout of the archive (all plain arrays, readable with ``np.load(path)``):

* ``param/<name>`` -- model parameters, keyed like PyTorch's ``state_dict``;
* ``optim/<key>``  -- optimizer state (momentum buffers, Adam moments, step count);
* ``meta``         -- a JSON string: ``format``, model ``config``, training ``config``,
  ``epoch`` (completed epochs), ``history`` (per-epoch metrics) and ``rng`` (generator
  states for shuffling and dropout, so a resumed run continues bit-identically).

Files are written atomically (:func:`stn_numpy._io.atomic_write`): to a temporary file in
the same folder, flushed to disk, then renamed over the old checkpoint. A crash mid-write
leaves the previous checkpoint.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from ._io import atomic_write
from .models import Model, build_model

__all__ = ["save_checkpoint", "load_checkpoint", "load_model", "atomic_write"]

FORMAT = "stn-numpy-checkpoint-1"


def save_checkpoint(path, params: dict, optim_state: dict, meta: dict) -> None:
    """Write ``params``, ``optim_state`` (dicts of arrays) and ``meta`` (JSON-able) to ``path``."""
    arrays = {f"param/{k}": np.asarray(v) for k, v in params.items()}
    arrays.update({f"optim/{k}": np.asarray(v) for k, v in optim_state.items()})
    arrays["meta"] = np.array(json.dumps({"format": FORMAT, **meta}))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path) -> tuple[dict, dict, dict]:
    """Read a checkpoint; returns ``(params, optim_state, meta)``.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        The file is not a readable stn-numpy checkpoint (truncated, corrupt, wrong format);
        the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable stn-numpy checkpoint ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    params = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    optim_state = {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}
    return params, optim_state, meta


def model_from_params(config: dict, params: dict, source="parameters") -> Model:
    """Rebuild the architecture of ``config`` and copy ``params`` into it."""
    model = build_model(
        config["arch"], config["input_size"], config["transform"], config["mode"],
        config["padding_mode"], config["align_corners"], config["seed"], config["dtype"],
        st_size=config.get("st_size"),
    )
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


def load_model(path) -> Model:
    """The trained model stored in a checkpoint, ready for ``predict`` and ``transform``."""
    params, _, meta = load_checkpoint(path)
    return model_from_params(meta["model"], params, source=str(path))
