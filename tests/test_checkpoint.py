"""Tests for checkpoint files: round trip, atomic writes, clear errors on bad files."""

import io
import json
import os
import stat
import zipfile

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


def forged_header_file(path, shape):
    """An .npz whose one member's header declares ``shape`` but stores 8 bytes of data."""


    header = {"descr": "<f8", "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    np.lib.format.write_array_header_2_0(buf, header)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("param/w.npy", buf.getvalue() + b"\0" * 8)
        zf.writestr("meta.npy", _npy_bytes(np.array('{"format": "stn-numpy-checkpoint-1"}')))


def _npy_bytes(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_a_member_declaring_an_absurd_size_is_refused_before_allocation(tmp_path):
    path = tmp_path / "forged.npz"
    forged_header_file(path, (2**40, 2**10))  # 8 PB: reading it would try to allocate
    with pytest.raises(ValueError, match=r"forged.npz is not a readable .*field 'param/w' "
                                         r"declares a float64 array of shape"):
        load_checkpoint(path)


@pytest.mark.parametrize("change, pattern", [
    (lambda m: m.pop("model"), r"field\(s\) \['model'\] missing"),
    (lambda m: m.update(model=[1, 2]), "field 'model' must be a JSON object"),
    (lambda m: m.update(epoch="2"), "field 'epoch' must be an int >= 0"),
    (lambda m: m.update(epoch=-1), "field 'epoch' must be an int >= 0"),
    (lambda m: m.update(epoch=2.0), "field 'epoch' must be an int >= 0"),
    (lambda m: m.update(threads=0), "field 'threads' must be an int >= 1"),
    (lambda m: m.update(history=[{"loss": "x"}]), "field 'history' must be a list of rows"),
    (lambda m: m.update(history=[{"loss": 1.0}]), "field 'history' holds 1 rows for epoch 2"),
    (lambda m: m.update(rng={"shuffle": 3, "dropout": []}), "field 'rng' must be an object"),
])
def test_meta_fields_are_checked_one_by_one(tmp_path, change, pattern):
    model = build_model("cnn")
    meta = {"model": model.config, "epoch": 2}
    change(meta)
    path = tmp_path / "c.npz"
    save_checkpoint(path, model.params, {}, meta)
    with pytest.raises(ValueError, match="c.npz: " + pattern):
        load_checkpoint(path)


@pytest.mark.parametrize("arrays, pattern", [
    ({"param/w": np.arange(3)}, r"field 'param/w' is not a float parameter.*int64"),
    ({"optim/m": np.array("x")}, r"field 'optim/m' is not a float parameter"),
    ({"junk": np.zeros(2)}, r"field 'junk' is not"),
    ({"meta": np.zeros(2)}, r"field 'meta' must be a JSON string, got float64"),
])
def test_members_are_checked_one_by_one(tmp_path, arrays, pattern):
    path = tmp_path / "c.npz"
    np.savez(path, **{"meta": np.array('{"format": "stn-numpy-checkpoint-1", "model": {}}'),
                      **arrays})
    with pytest.raises(ValueError, match="c.npz: " + pattern):
        load_checkpoint(path)


@pytest.mark.parametrize("change, pattern", [
    (lambda c: c.pop("seed"), r"field 'model' lacks \['seed'\]"),
    (lambda c: c.update(seed=1.5), "field 'model': seed must be a non-negative int"),
    (lambda c: c.update(arch="vgg"), "field 'model': arch must be one of"),
])
def test_model_config_fields_are_checked(tmp_path, change, pattern):
    model = build_model("cnn")
    config = dict(model.config)
    change(config)
    path = tmp_path / "c.npz"
    save_checkpoint(path, model.params, {}, {"model": config})
    with pytest.raises(ValueError, match="c.npz: " + pattern):
        load_model(path)


def test_compressed_or_oversized_checkpoints_are_refused_before_allocating(tmp_path):
    model = build_model("cnn", (28, 28))
    meta = {"model": model.config, "epoch": 0, "history": []}
    path = tmp_path / "c.npz"
    save_checkpoint(path, model.params, {}, meta)
    load_model(path)
    # Deflated members: np.savez never writes them, and they could inflate 1000-fold.
    deflated = tmp_path / "deflated.npz"
    arrays = {f"param/{k}": v for k, v in model.params.items()}
    np.savez_compressed(deflated, meta=np.array(json.dumps({"format": "stn-numpy-checkpoint-1",
                                                             **meta})), **arrays)
    with pytest.raises(ValueError, match="compressed"):
        load_model(deflated)
    # A model configuration far larger than the parameters the file holds.
    huge = dict(meta, model=dict(model.config, input_size=[100000, 100000]))
    save_checkpoint(path, model.params, {}, huge)
    with pytest.raises(ValueError, match="need at least .* parameters, the file holds"):
        load_model(path)


def test_crafted_checkpoints_are_value_errors_naming_the_file(tmp_path):
    """Kept from a hostile round: bytes flipped, cut short, members replaced, dropped or
    deflated, metadata fields replaced by odd JSON; loading either works or raises a
    ValueError naming the file, and never allocates more than the file implies."""
    import random

    model = build_model("cnn", (28, 28))
    good = tmp_path / "good.npz"
    save_checkpoint(good, model.params, {}, {"model": model.config, "epoch": 0,
                                             "history": []})
    raw = good.read_bytes()
    with zipfile.ZipFile(good) as z:
        members = {i.filename: z.read(i.filename) for i in z.infolist()}
    meta = json.loads(str(np.load(good)["meta"]))
    odd = [None, True, -1, 2**70, 0.5, "x", [], {}, [10**6, 10**6], [28, 28, 28], 10**9]
    r = random.Random(0)
    for case in range(60):
        how = case % 5
        path = tmp_path / f"crafted{case}.npz"
        if how == 0:
            b = bytearray(raw)
            b[r.randrange(len(b))] ^= 1 << r.randrange(8)
            path.write_bytes(bytes(b))
        elif how == 1:
            path.write_bytes(raw[:r.randrange(len(raw))])
        else:
            crafted = dict(members)
            if how == 2:
                m = json.loads(json.dumps(meta))
                target = m["model"] if r.random() < 0.7 else m
                target[r.choice(list(target))] = r.choice(odd)
                buf = io.BytesIO()
                np.save(buf, np.array(json.dumps(m)))
                crafted["meta.npy"] = buf.getvalue()
            elif how == 3:
                crafted.pop(r.choice(list(crafted)))
            with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if how == 4
                                 else zipfile.ZIP_STORED) as z:
                for name, data in crafted.items():
                    z.writestr(name, data)
        try:
            load_model(path)
        except ValueError as exc:
            assert str(path) in str(exc), exc
