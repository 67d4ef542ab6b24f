"""Tests for stn_numpy.onnx: exported models run in ONNX Runtime as they run here.

The tests that run a graph skip without onnx and onnxruntime (``pip install -e ".[onnx]"``),
those on real digits without MNIST. Every model kind is exported and run on real test
digits: ONNX Runtime's logits must match :meth:`Model.predict`, its V
:meth:`Model.transform` and its theta the localisation net's, to 1e-5 in float32 (the
relative error of :func:`~stn_numpy.gradcheck.rel_error`).
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import stn_numpy.onnx as stn_onnx
from stn_numpy import build_model, load_model
from stn_numpy.cli import main
from stn_numpy.gradcheck import rel_error
from stn_numpy.models import ARCHITECTURES, MIN_ST_SIZE
from stn_numpy.train import TrainConfig, load_split, train
from stn_numpy.transformer import TRANSFORMS, identity_parameters

ROOT = Path(__file__).resolve().parents[1]
MISSING = 'onnx not installed: pip install -e ".[onnx]"'
TOL = 1e-5
#: The operators an exported graph may use: the layers' and the grid generators'.
PLAIN_OPS = {"Sub", "Div", "Conv", "MaxPool", "Relu", "Flatten", "Gemm", "Identity",
             "Reshape", "Shape", "Concat", "AffineGrid", "GridSample", "Slice", "Mul", "Add",
             "Pad", "Transpose", "MatMul", "Exp", "Cos", "Sin", "Neg"}


def need_onnx():
    pytest.importorskip("onnx", reason=MISSING)
    return pytest.importorskip("onnxruntime", reason=MISSING.replace("onnx not", "onnxruntime not"))


def run_in_onnxruntime(path_or_proto, X) -> dict:
    ort = need_onnx()
    data = path_or_proto if isinstance(path_or_proto, str) else path_or_proto.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"images": X}), strict=True))


def assert_matches(model, outputs, X):
    """ONNX Runtime's outputs against this package's, on the same images."""
    assert rel_error(outputs["logits"], model.predict(X)) <= TOL
    assert (model.transformer is None) == ("V" not in outputs)
    if model.transformer is not None:
        assert outputs["V"].shape == model.transform(X).shape
        assert rel_error(outputs["V"], model.transform(X)) <= TOL
        model.net.forward(X, train=False)
        theta = model.transformer.theta.reshape(len(X), -1)
        assert rel_error(outputs["theta"], theta) <= TOL


def digits(mnist_dir, name="mnist", split="test", n=100):
    X, y = load_split(name, split, mnist_dir, n, whole_split=False)
    return X, y


def test_import_stn_numpy_loads_no_onnx():
    # The core and every module a user imports for training, verifying or the command line
    # leave onnx and onnxruntime alone; only an export or an ONNX adapter imports them.
    code = ("import sys, stn_numpy, stn_numpy.onnx, stn_numpy.verify, stn_numpy.cli, "
            "stn_numpy.train, stn_numpy.verify.atlas\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('onnx', 'onnxruntime'))\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_dir):
    """Checkpoints of a short real training: stn on MNIST, paper-stcnn on RTS with a 28x28
    transformer output; each with the real test digits of its dataset."""
    runs = {}
    for arch, dataset, st_size in (("stn", "mnist", None), ("paper-stcnn", "rts", 28)):
        out = tmp_path_factory.mktemp(arch)
        data = (*digits(mnist_dir, dataset, "train", 256), *digits(mnist_dir, dataset, "test", 64))
        cfg = TrainConfig(model=arch, dataset=dataset, epochs=1, batch_size=32, lr=3e-3,
                          st_size=st_size, out=str(out), progress=False)
        train(cfg, data=data, log=lambda s: None)
        runs[arch] = out / "checkpoint.npz", digits(mnist_dir, dataset, "test", 100)[0]
    return runs


def test_exported_stn_matches_on_mnist_digits(trained, tmp_path, capsys):
    need_onnx()
    checkpoint, X = trained["stn"]
    path = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint), str(path)]) == 0
    assert "outputs logits, theta, V" in capsys.readouterr().out
    model = load_model(checkpoint)
    model.net.forward(X, train=False)
    learnt = model.transformer.theta.reshape(len(X), -1) - identity_parameters("affine")
    assert np.abs(learnt).max() > 1e-3  # the transformer has moved away from the identity
    assert_matches(model, run_in_onnxruntime(str(path), X), X)


def test_exported_paper_stcnn_matches_on_rts_digits(trained, tmp_path):
    need_onnx()
    checkpoint, X = trained["paper-stcnn"]
    model = load_model(checkpoint)
    path = stn_onnx.export(model, tmp_path / "paper-stcnn.onnx")
    outputs = run_in_onnxruntime(str(path), X)
    assert X.shape[2:] == (42, 42) and outputs["V"].shape[2:] == (28, 28)
    assert_matches(model, outputs, X)


# Every architecture, every transform head of those with a transformer, both paper
# localisation nets, and other sampler settings.
WITH_TRANSFORMER = [arch for arch in ARCHITECTURES if arch in MIN_ST_SIZE]
KINDS = [(arch, transform, {}) for arch in WITH_TRANSFORMER for transform in TRANSFORMS]
KINDS += [(arch, None, {}) for arch in ARCHITECTURES if arch not in WITH_TRANSFORMER]
KINDS += [("paper-stcnn", "affine", {"loc_net": "fcn"}),
          ("paper-stfcn", "affine", {"loc_net": "cnn"}),
          ("stn", "affine", {"mode": "bicubic", "padding_mode": "border", "align_corners": True}),
          ("stn", "affine", {"mode": "nearest", "padding_mode": "reflection"}),
          ("stn", "tps", {"padding_mode": "reflection", "align_corners": True, "st_size": 20})]


@pytest.mark.parametrize(("arch", "transform", "options"), KINDS,
                         ids=[f"{a}-{t}-{'-'.join(map(str, o.values()))}".rstrip("-")
                              for a, t, o in KINDS])
def test_every_model_kind_matches(arch, transform, options, mnist_dir):
    need_onnx()
    X = digits(mnist_dir)[0]
    model = build_model(arch, (28, 28), transform=transform or "affine", seed=3, **options)
    if model.transformer is not None:
        # A fixed random head, so that theta depends on the image (a fresh one is the identity).
        head = model.transformer.localization[-1].params["weight"]
        head[...] = 0.02 * np.random.default_rng(0).standard_normal(head.shape)
    proto = stn_onnx.to_onnx(model)
    assert {n.op_type for n in proto.graph.node} <= PLAIN_OPS
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 20)]
    assert_matches(model, run_in_onnxruntime(proto, X), X)


def test_float64_graph_runs_in_the_reference_evaluator():
    # ONNX Runtime's CPU convolution is float32 only; ONNX's reference evaluator runs float64.
    need_onnx()
    from onnx.reference import ReferenceEvaluator

    model = build_model("cnn", (28, 28), seed=0, dtype=np.float64)
    X = np.random.default_rng(0).uniform(0, 1, (4, 1, 28, 28))
    (logits,) = ReferenceEvaluator(stn_onnx.to_onnx(model, np.float64)).run(None, {"images": X})
    assert logits.dtype == np.float64 and rel_error(logits, model.predict(X)) <= 1e-12


def test_the_graph_takes_any_batch():
    need_onnx()
    model = build_model("stn", (28, 28), transform="projective", seed=0)
    proto = stn_onnx.to_onnx(model)
    for n in (1, 3):
        X = np.random.default_rng(n).uniform(0, 1, (n, 1, 28, 28)).astype(np.float32)
        assert_matches(model, run_in_onnxruntime(proto, X), X)


def test_export_is_atomic(tmp_path, monkeypatch):
    class Unwritable:
        def SerializeToString(self):
            raise OSError("disk full")

    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous")
    monkeypatch.setattr(stn_onnx, "to_onnx", lambda model, dtype: Unwritable())
    with pytest.raises(OSError, match="disk full"):
        stn_onnx.export(build_model("cnn"), path)
    assert path.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_bad_arguments():
    need_onnx()
    with pytest.raises(TypeError, match="model must be a stn_numpy Model"):
        stn_onnx.to_onnx(object())
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got int64"):
        stn_onnx.to_onnx(build_model("cnn"), np.int64)
    with pytest.raises(ValueError, match="opset must be at least 16"):
        stn_onnx.grid_sample_model("bilinear", "zeros", False, opset=11)


def test_cli_errors(tmp_path, monkeypatch, capsys):
    assert main(["export", str(tmp_path / "missing.npz"), str(tmp_path / "m.onnx")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    checkpoint = tmp_path / "run" / "checkpoint.npz"
    X = np.random.default_rng(0).uniform(0, 1, (8, 1, 16, 16)).astype(np.float32)
    y = np.arange(8) % 10
    train(TrainConfig(model="cnn", epochs=1, batch_size=8, out=str(checkpoint.parent),
                      progress=False), data=(X, y, X, y), log=lambda s: None)
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["export", str(checkpoint), str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err.startswith(
        'stn-numpy export: error: onnx not installed: pip install onnx (or both onnx and '
        'onnxruntime: pip install -e ".[onnx]")')
    assert not (tmp_path / "m.onnx").exists()
