"""Tests for checkpoint files: round trip, atomic writes, clear errors on bad files."""

import os
import stat

import numpy as np
import pytest

from stn_numpy import _io, checkpoint
from stn_numpy.checkpoint import load_checkpoint, load_model, save_checkpoint
from stn_numpy.models import build_model


def saved_model(tmp_path, arch="stn"):
    model = build_model(arch, seed=3)
    path = tmp_path / "run" / "checkpoint.npz"
    save_checkpoint(path, model.params, {"step": np.array(7)}, {"model": model.config,
                                                               "epoch": 2})
    return model, path


def test_round_trip(tmp_path):
    model, path = saved_model(tmp_path)
    params, optim_state, meta = load_checkpoint(path)
    assert meta["epoch"] == 2 and int(optim_state["step"]) == 7
    restored = load_model(path)
    for name, p in model.params.items():
        np.testing.assert_array_equal(restored.params[name], p)
    X = np.random.default_rng(0).random((4, 28, 28))
    np.testing.assert_array_equal(restored.predict(X), model.predict(X))
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.npz"]  # no temp files


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    _, path = saved_model(tmp_path)
    before = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {}, {}, {})
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.npz"]


def test_checkpoint_is_readable_by_others_under_umask_022(tmp_path):
    old = os.umask(0o022)
    try:
        _, path = saved_model(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # mkstemp's 0o600 would survive


def test_atomic_write_is_the_shared_helper():
    assert checkpoint.atomic_write is _io.atomic_write


def test_truncated_or_foreign_files_raise_naming_the_file(tmp_path):
    _, path = saved_model(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{path.name} is not a readable stn-numpy checkpoint"):
        load_checkpoint(path)
    other = tmp_path / "other.npz"
    np.savez(other, meta=np.array('{"format": "something-else"}'))
    with pytest.raises(ValueError, match="has format 'something-else'"):
        load_checkpoint(other)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.npz")


def test_parameters_must_fit_the_architecture(tmp_path):
    model = build_model("cnn")
    path = tmp_path / "c.npz"
    config = dict(model.config, arch="stn")
    save_checkpoint(path, model.params, {}, {"model": config, "epoch": 1})
    with pytest.raises(ValueError, match="do not match a 'stn' model"):
        load_model(path)
