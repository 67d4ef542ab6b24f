"""Tests for stn_numpy.data.npz and ``stn-numpy evaluate --data FILE.npz``."""

import numpy as np
import pytest

from stn_numpy.checkpoint import save_checkpoint
from stn_numpy.cli import main
from stn_numpy.data import load_npz
from stn_numpy.models import build_model


def write(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((5, 28, 28)).astype(np.float16)
    y = np.arange(5, dtype=np.uint8)
    X, Y = load_npz(write(tmp_path / "ok.npz", x=x, y=y, extra=np.zeros(2)), (28, 28))
    assert X.shape == (5, 1, 28, 28) and X.dtype == np.float32 and Y.dtype == np.int64
    np.testing.assert_array_equal(X[:, 0], x.astype(np.float32))
    np.testing.assert_array_equal(Y, y)


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((2, 28, 28))}, r"lacks the array\(s\) \['y'\]"),
    ({"x": np.zeros((2, 28, 28), np.uint8), "y": np.zeros(2, int)}, "x must be float images"),
    ({"x": np.zeros((2, 1, 28, 28)), "y": np.zeros(2, int)}, r"shape \(N, H, W\)"),
    ({"x": np.zeros((2, 28, 28)), "y": np.zeros(3, int)}, r"labels of shape \(2,\)"),
    ({"x": np.zeros((2, 28, 28)), "y": np.zeros(2)}, "y must be integer labels"),
    ({"x": np.full((2, 28, 28), 255.0), "y": np.zeros(2, int)}, r"values in \[0, 1\]"),
    ({"x": np.full((2, 28, 28), np.nan), "y": np.zeros(2, int)}, "finite values"),
    ({"x": np.zeros((2, 28, 28)), "y": np.array([0, 10])}, "labels 0 to 9"),
    ({"x": np.zeros((0, 28, 28)), "y": np.zeros(0, int)}, "holds no images"),
    ({"x": np.zeros((2, 42, 42)), "y": np.zeros(2, int)}, "the model expects 28x28"),
])
def test_bad_files_are_named_and_explained(tmp_path, arrays, message):
    path = write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message) as info:
        load_npz(path, (28, 28))
    assert "bad.npz" in str(info.value)


def test_not_an_archive(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_npz(tmp_path / "missing.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable .npz archive"):
        load_npz(garbage)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ValueError, match="single array"):
        load_npz(single)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, int))
    with pytest.raises(ValueError, match="not a readable array"):
        load_npz(pickled)


def test_evaluate_data_cli(tmp_path, capsys):
    model = build_model("paper-stcnn", (28, 28))
    ckpt = tmp_path / "checkpoint.npz"
    save_checkpoint(ckpt, model.params, {}, {"model": model.config,
                                             "train": {"dataset": "rot"}})
    rng = np.random.default_rng(1)
    good = write(tmp_path / "mine.npz", x=rng.random((6, 28, 28)), y=rng.integers(0, 10, 6))
    assert main(["evaluate", str(ckpt), "--data", good]) == 0
    assert "(6 images)" in capsys.readouterr().out
    bad = write(tmp_path / "wrong.npz", x=rng.random((6, 42, 42)), y=np.zeros(6, int))
    assert main(["evaluate", str(ckpt), "--data", bad]) == 2
    assert "the model expects 28x28" in capsys.readouterr().err
    assert main(["evaluate", str(ckpt), "--data", str(tmp_path / "nope.npz")]) == 2
    with pytest.raises(SystemExit):
        main(["evaluate", str(ckpt), "--data", good, "--dataset", "rot"])
