"""Tests for the training loop and CLI: determinism, resume, divergence, real MNIST."""

import json

import numpy as np
import pytest

import stn_numpy.train as train_module
from stn_numpy.checkpoint import load_checkpoint, load_model
from stn_numpy.cli import main
from stn_numpy.models import build_model
from stn_numpy.train import TrainConfig, TrainingDiverged, train


def synthetic_data(n_train=96, n_test=32, seed=0):
    """Bright-square images whose label is the square's row band: learnable, tiny, no MNIST."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 10, n)
        X = 0.1 * rng.random((n, 1, 28, 28), dtype=np.float32)
        for i, label in enumerate(y):
            r = 2 + 2 * label
            X[i, 0, r:r + 4, 10:18] = 1.0
        return X, y

    return (*make(n_train), *make(n_test))


def config(tmp_path, **kw):
    return TrainConfig(**{"out": str(tmp_path / "run"), "epochs": 2, "batch_size": 32,
                          "progress": False, **kw})


def final_state(path):
    params, optim_state, meta = load_checkpoint(path)
    history = [{k: v for k, v in row.items() if k != "seconds"} for row in meta["history"]]
    return params, optim_state, history


def assert_same_state(a, b):
    for x, y in zip(a[:2], b[:2], strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    assert a[2] == b[2]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_same_seed_same_weights(tmp_path, optimizer):
    data = synthetic_data()
    lr = 0.01 if optimizer == "sgd" else 1e-3
    train(config(tmp_path / "a", optimizer=optimizer, lr=lr), data=data, log=lambda s: None)
    train(config(tmp_path / "b", optimizer=optimizer, lr=lr), data=data, log=lambda s: None)
    train(config(tmp_path / "c", optimizer=optimizer, lr=lr, seed=1), data=data,
          log=lambda s: None)
    a = final_state(tmp_path / "a" / "run" / "checkpoint.npz")
    assert_same_state(a, final_state(tmp_path / "b" / "run" / "checkpoint.npz"))
    c = final_state(tmp_path / "c" / "run" / "checkpoint.npz")
    assert not np.array_equal(a[0]["2.weight"], c[0]["2.weight"])


class Interrupted(Exception):
    pass


def stop_after(epoch):
    """A log callback that interrupts the run once ``epoch`` has been checkpointed."""

    def log(line):
        if line.startswith(f"epoch {epoch}/"):
            raise Interrupted

    return log


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_is_bit_identical(tmp_path, optimizer):
    # Interrupted after epoch 2 of 3, so the resumed epoch runs at a cosine rate that
    # depends on the total: a resume that mishandled the schedule would differ.
    data = synthetic_data()
    lr = 0.01 if optimizer == "sgd" else 1e-3
    train(config(tmp_path / "straight", epochs=3, optimizer=optimizer, lr=lr), data=data,
          log=lambda s: None)
    with pytest.raises(Interrupted):
        train(config(tmp_path / "resumed", epochs=3, optimizer=optimizer, lr=lr), data=data,
              log=stop_after(2))
    lines = []
    train(config(tmp_path / "resumed", epochs=None), resume=True, data=data, log=lines.append)
    assert lines[0].startswith("resumed from") and "after epoch 2" in lines[0]
    assert_same_state(final_state(tmp_path / "straight" / "run" / "checkpoint.npz"),
                      final_state(tmp_path / "resumed" / "run" / "checkpoint.npz"))


def test_resume_extends_or_refuses(tmp_path):
    data = synthetic_data()
    train(config(tmp_path, epochs=2), data=data, log=lambda s: None)
    with pytest.raises(ValueError, match="already holds 2 epochs: pass --epochs N with N > 2"):
        train(config(tmp_path, epochs=1), resume=True, data=data, log=lambda s: None)
    lines = []
    _, history = train(config(tmp_path, epochs=3), resume=True, data=data, log=lines.append)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert any("cosine schedule is recomputed" in line for line in lines)


def test_resuming_a_complete_run_rewrites_its_metrics_and_figures(tmp_path):
    # As after a kill between the last checkpoint and the last figure.
    data = synthetic_data()
    _, history = train(config(tmp_path, epochs=1), data=data, log=lambda s: None)
    run = tmp_path / "run"
    checkpoint = (run / "checkpoint.npz").read_bytes()
    for name in ("metrics.csv", "metrics.json", "curves.png", "transforms.png"):
        (run / name).unlink()
    lines = []
    _, again = train(config(tmp_path, epochs=None), resume=True, data=data, log=lines.append)
    assert again == history and any("rewriting its metrics and figures" in x for x in lines)
    assert {p.name for p in run.iterdir()} == set(train_module.RUN_FILES)
    assert json.loads((run / "metrics.json").read_text()) == history
    assert (run / "checkpoint.npz").read_bytes() == checkpoint


def test_stray_temporaries_of_killed_writes_are_removed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stray = [run / ".metrics.csv.0123456789abcdef.tmp",
             run / ".checkpoint.npz.fedcba9876543210.tmp"]
    kept = [run / ".notes.txt.0123456789abcdef.tmp", run / ".metrics.csv.tmp"]
    for path in stray + kept:
        path.write_bytes(b"partial")
    train(config(tmp_path, epochs=1), data=synthetic_data(), log=lambda s: None)
    assert not any(p.exists() for p in stray) and all(p.exists() for p in kept)


def test_thread_count_is_recorded_and_a_different_one_warned_about(tmp_path, monkeypatch):
    data = synthetic_data()
    monkeypatch.setattr(train_module, "blas_threads", lambda: 1)
    train(config(tmp_path, epochs=1), data=data, log=lambda s: None)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.npz")[2]["threads"] == 1
    monkeypatch.setattr(train_module, "blas_threads", lambda: 2)
    lines = []
    train(config(tmp_path, epochs=2), resume=True, data=data, log=lines.append)
    assert any("trained with 1 BLAS thread(s), this process uses 2" in x for x in lines)


def test_blas_threads_reads_the_usual_variables(monkeypatch):
    for name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert train_module.blas_threads() == 3
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "5")
    assert train_module.blas_threads() == 5


def test_fresh_run_does_not_overwrite_a_checkpoint(tmp_path):
    data = synthetic_data()
    train(config(tmp_path, epochs=1), data=data, log=lambda s: None)
    before = (tmp_path / "run" / "checkpoint.npz").read_bytes()
    with pytest.raises(ValueError, match="already exists: pass --resume"):
        train(config(tmp_path, epochs=1, seed=9), data=data, log=lambda s: None)
    assert (tmp_path / "run" / "checkpoint.npz").read_bytes() == before
    train(config(tmp_path, epochs=1, seed=9), data=data, log=lambda s: None, overwrite=True)
    assert (tmp_path / "run" / "checkpoint.npz").read_bytes() != before


def test_cosine_schedule():
    cfg = TrainConfig(epochs=4, lr=0.1)
    rates = [train_module.learning_rate(cfg, e) for e in range(1, 5)]
    np.testing.assert_allclose(rates, [0.1, 0.1 * (1 + 2**-0.5) / 2, 0.05, 0.1 * (1 - 2**-0.5) / 2])
    cfg.lr_schedule = "constant"
    assert train_module.learning_rate(cfg, 3) == 0.1


def test_outputs_written(tmp_path):
    model, history = train(config(tmp_path), data=synthetic_data(), log=lambda s: None)
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == {"checkpoint.npz", "metrics.csv", "metrics.json",
                                               "curves.png", "transforms.png"}
    rows = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2] and rows == history
    csv_lines = (run / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == "epoch,lr,train_loss,train_acc,test_loss,test_acc,seconds"
    assert len(csv_lines) == 3
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    data = synthetic_data()
    steps_per_epoch = 3
    calls = {"n": 0}
    real = train_module.cross_entropy

    def nan_in_second_epoch(logits, y):
        # Calls 1-3 are epoch 1's steps and call 4 its evaluation; call 5 is epoch 2, step 1.
        calls["n"] += 1
        loss, dlogits = real(logits, y)
        return (float("nan") if calls["n"] > steps_per_epoch + 1 else loss), dlogits

    monkeypatch.setattr(train_module, "cross_entropy", nan_in_second_epoch)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at epoch 2, step 1.*"
                                               r"checkpoint.npz \(epoch 1\)"):
        train(config(tmp_path, epochs=3), data=data, log=lambda s: None)
    _, _, meta = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    assert meta["epoch"] == 1


def test_non_finite_test_loss_is_not_checkpointed(tmp_path, monkeypatch):
    real = train_module.evaluate
    calls = {"n": 0}

    def nan_after_first_epoch(model, X, y, batch_size=None):
        calls["n"] += 1
        loss, acc = real(model, X, y, batch_size)
        return (float("nan") if calls["n"] > 1 else loss), acc

    monkeypatch.setattr(train_module, "evaluate", nan_after_first_epoch)
    with pytest.raises(TrainingDiverged, match=r"test loss after epoch 2.*\(epoch 1\)"):
        train(config(tmp_path, epochs=3), data=synthetic_data(), log=lambda s: None)
    _, _, meta = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    assert meta["epoch"] == 1
    json.loads((tmp_path / "run" / "metrics.json").read_text())  # strict JSON, no NaN


def test_non_finite_grid_in_evaluation_is_divergence(tmp_path, monkeypatch):
    def evaluate_with_overflowing_grid(*args, **kwargs):
        raise train_module.NonFiniteError("grid contains 3 value(s) beyond +-1e38")

    monkeypatch.setattr(train_module, "evaluate", evaluate_with_overflowing_grid)
    with pytest.raises(TrainingDiverged, match=r"non-finite test loss after epoch 1 "
                                               r"\(grid contains 3"):
        train(config(tmp_path), data=synthetic_data(), log=lambda s: None)


def test_non_finite_weights_are_divergence(tmp_path, monkeypatch):
    real = train_module._make_optimizer

    def optimizer_that_overflows(cfg, params):
        opt = real(cfg, params)
        step = opt.step

        def overflowing_step(grads):
            step(grads)
            next(iter(params.values()))[...] = np.inf
        opt.step = overflowing_step
        return opt

    monkeypatch.setattr(train_module, "_make_optimizer", optimizer_that_overflows)
    data = synthetic_data(n_train=32)  # one step per epoch: the weights check sees it first
    with pytest.raises(TrainingDiverged, match="non-finite weights after epoch 1"):
        train(config(tmp_path, model="cnn"), data=data, log=lambda s: None)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflection"])
def test_huge_learning_rate_exits_3_in_every_padding_mode(tmp_path, capsys, monkeypatch,
                                                           padding_mode):
    monkeypatch.setattr(train_module, "load_dataset", lambda *a, **k: synthetic_data())
    code = main(["train", "--out", str(tmp_path / "r"), "--lr", "1e37", "--epochs", "1",
                 "--padding-mode", padding_mode, "--no-progress"])
    assert code == 3, capsys.readouterr().err
    assert "stopped: non-finite" in capsys.readouterr().err


def test_real_divergence_is_caught(tmp_path):
    # An absurd learning rate blows up the weights within a few steps: the loss (or the
    # transform parameters, caught by the grid generator) turns non-finite.
    with pytest.raises(TrainingDiverged, match="non-finite loss at epoch 1"):
        train(config(tmp_path, optimizer="sgd", lr=1e12, momentum=0.0), data=synthetic_data(),
              log=lambda s: None)
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


def test_cli_exit_codes(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_module, "load_dataset", lambda *a, **k: synthetic_data())
    out = str(tmp_path / "r")
    assert main(["train", "--out", out, "--optimizer", "sgd", "--lr", "1e12", "--momentum",
                 "0", "--no-progress"]) == 3
    assert "non-finite loss at epoch 1" in capsys.readouterr().err
    assert main(["train", "--out", out, "--epochs", "1", "--no-progress"]) == 0
    assert "final test accuracy" in capsys.readouterr().out
    assert main(["train", "--out", out, "--resume", "--lr", "0.5", "--no-progress"]) == 2
    assert "drop --lr" in capsys.readouterr().err
    assert main(["train", "--out", out, "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert main(["evaluate", str(tmp_path / "nope.npz")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--out", out, "--epochs", "0"])
    assert "expected a positive integer, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_short_real_mnist_training_beats_chance(tmp_path, mnist_dir, capsys):
    out = tmp_path / "mnist"
    code = main(["train", "--data-dir", mnist_dir, "--train-limit", "10000", "--test-limit",
                 "1000", "--epochs", "1", "--out", str(out), "--no-progress"])
    assert code == 0
    rows = json.loads((out / "metrics.json").read_text())
    assert rows[0]["test_acc"] > 0.6, rows  # chance is 0.1
    capsys.readouterr()
    assert main(["evaluate", str(out / "checkpoint.npz"), "--data-dir", mnist_dir,
                 "--test-limit", "1000"]) == 0
    printed = capsys.readouterr().out
    assert f"accuracy {100 * rows[0]['test_acc']:.2f}%" in printed
    model = load_model(out / "checkpoint.npz")
    from stn_numpy.data import load_mnist

    images, labels = load_mnist("test", mnist_dir)
    X = images[:200].astype(np.float64) / 255
    assert model.predict(X).shape == (200, 10)
    assert model.transform(X).shape == (200, 1, 28, 28)


def test_os_errors_give_one_line_naming_the_path_and_exit_2(tmp_path, capsys, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("the run folder must be checked before the data is loaded")

    monkeypatch.setattr(train_module, "load_dataset", no_data)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out in (a_file, a_file / "run"):
        assert main(["train", "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("stn-numpy train: error: ") and str(a_file) in err
        assert err.count("\n") == 1 and "Traceback" not in err


def test_full_disk_during_a_run_exits_2(tmp_path, capsys, monkeypatch):
    import errno

    monkeypatch.setattr(train_module, "load_dataset", lambda *a, **k: synthetic_data())

    def full_disk(path, params, optim_state, meta):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(train_module, "save_checkpoint", full_disk)
    assert main(["train", "--out", str(tmp_path / "r"), "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (f"stn-numpy train: error: {tmp_path / 'r' / 'checkpoint.npz'}: "
                   f"No space left on device\n")


def no_network(url, timeout):
    raise AssertionError("tests never download")


def test_data_dir_that_is_a_file_exits_2(tmp_path, capsys, monkeypatch):
    from stn_numpy.data import mnist

    monkeypatch.setattr(mnist, "_urlopen", no_network)
    model = build_model("cnn")
    ckpt = tmp_path / "c.npz"
    from stn_numpy.checkpoint import save_checkpoint

    save_checkpoint(ckpt, model.params, {}, {"model": model.config, "train": {"dataset": "mnist"}})
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["evaluate", str(ckpt), "--data-dir", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stn-numpy evaluate: error: ") and str(a_file) in err


def test_loc_lr_scale_reaches_only_the_localisation_net():
    model = build_model("paper-stcnn", (42, 42), st_size=28)
    cfg = TrainConfig(model="paper-stcnn", loc_lr_scale=0.25)
    cfg.validate()
    opt = train_module._make_optimizer(cfg, model.params)
    assert set(opt.lr_scale) == {k for k in model.params if k.startswith("0.localization.")}
    assert set(opt.lr_scale.values()) == {0.25} and len(opt.lr_scale) == 8
    with pytest.raises(ValueError, match="loc_lr_scale must be > 0"):
        TrainConfig(loc_lr_scale=0).validate()


def test_loc_net_is_checked_before_any_data_is_loaded():
    TrainConfig(model="paper-stcnn", loc_net="fcn").validate()
    with pytest.raises(ValueError, match="loc_net must be one of"):
        TrainConfig(model="paper-stcnn", loc_net="mlp").validate()
    with pytest.raises(ValueError, match="arch='stn' has none to choose"):
        TrainConfig(model="stn", loc_net="fcn").validate()


def _hold_lock(folder):
    """A separate process holding ``folder``'s lock (as a live run does) until killed."""
    import subprocess
    import sys

    code = ("import sys, time; from stn_numpy._io import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_command_on_a_live_run_folder_is_refused(tmp_path, capsys, monkeypatch):
    pytest.importorskip("fcntl")
    monkeypatch.setattr(train_module, "load_dataset", lambda *a, **k: synthetic_data())
    out = tmp_path / "r"
    assert main(["train", "--out", str(out), "--epochs", "1", "--no-progress"]) == 0
    before = sorted(p.name for p in out.iterdir())
    stray = out / ".checkpoint.npz.0123456789abcdef.tmp"  # the live run's in-flight write
    stray.write_bytes(b"partial")
    proc = _hold_lock(out)
    try:
        for extra in ([], ["--overwrite"], ["--resume", "--epochs", "2"]):
            assert main(["train", "--out", str(out), "--no-progress", *extra]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"{out}: in use by another stn-numpy command" in err
        assert stray.exists()  # nothing of the live run was touched
    finally:
        proc.kill()
        proc.wait()
    assert sorted(p.name for p in out.iterdir() if p != stray) == before
    assert main(["train", "--out", str(out), "--no-progress", "--resume", "--epochs", "2"]) == 0
    assert not stray.exists()


@pytest.mark.parametrize("option, value", [("--lr", "inf"), ("--lr", "nan"),
                                           ("--weight-decay", "inf"), ("--momentum", "nan"),
                                           ("--loc-lr-scale", "inf"), ("--weight-decay", "-1")])
def test_non_finite_options_are_refused_naming_the_option(tmp_path, capsys, option, value):
    out = tmp_path / "r"
    assert main(["train", "--out", str(out), option, value, "--no-progress"]) == 2
    name = option[2:].replace("-", "_")
    assert f"{name} must be" in capsys.readouterr().err
    assert not (out / "checkpoint.npz").exists()


def test_huge_st_size_is_a_value_error_not_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_module, "load_dataset", lambda *a, **k: synthetic_data())
    assert main(["train", "--out", str(tmp_path / "r"), "--st-size", "100000",
                 "--no-progress"]) == 2
    assert "st_size must be at most" in capsys.readouterr().err


def test_resuming_on_images_of_another_size_names_both(tmp_path):
    cfg = config(tmp_path, epochs=1)
    train(cfg, data=synthetic_data(), log=lambda s: None)
    X, y, Xt, yt = synthetic_data()
    bigger = (np.pad(X, ((0, 0), (0, 0), (2, 2), (2, 2))), y,
              np.pad(Xt, ((0, 0), (0, 0), (2, 2), (2, 2))), yt)
    with pytest.raises(ValueError, match=r"takes images of \[28, 28\], the data has \[32, 32\]"):
        train(config(tmp_path, epochs=2), resume=True, data=bigger, log=lambda s: None)


def test_a_crafted_generator_state_is_a_value_error_naming_the_field(tmp_path):
    cfg = config(tmp_path, model="stn", epochs=1)
    train(cfg, data=synthetic_data(), log=lambda s: None)
    path = tmp_path / "run" / "checkpoint.npz"
    params, optim_state, meta = load_checkpoint(path)
    meta["rng"]["dropout"][0]["state"]["state"] = -1  # numpy raises OverflowError on it
    from stn_numpy.checkpoint import save_checkpoint

    save_checkpoint(path, params, optim_state, {k: v for k, v in meta.items() if k != "format"})
    with pytest.raises(ValueError, match="field 'rng'"):
        train(config(tmp_path, epochs=1), resume=True, data=synthetic_data(), log=lambda s: None)
