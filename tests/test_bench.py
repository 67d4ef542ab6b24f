"""Smoke tests of the benchmark at tiny sizes: rows, table and JSON, never the timings."""

import builtins
import json
import math
import os
import stat

import pytest

from stn_numpy import bench


def _torch_importable() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _check_rows(rows, with_torch: bool, rounds: int = 1) -> None:
    assert len(rows) == (3 * len(bench.QUICK_SAMPLER_SIZES) + 2 * len(bench.QUICK_VOLUME_SIZES)
                         + 1 + 2 + len(bench.PAPER_CASES))  # ..., the double backward, ...
    assert len({r["case"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == {"case", "ours_ms", "torch_ms", "ratio", "ratio_range",
                          "ours_rounds_ms", "torch_rounds_ms"}
        assert len(r["ours_rounds_ms"]) == rounds
        assert math.isfinite(r["ours_ms"]) and r["ours_ms"] > 0, r
        assert r["ours_ms"] == min(r["ours_rounds_ms"])
        if with_torch:
            assert math.isfinite(r["torch_ms"]) and r["torch_ms"] > 0, r
            assert r["torch_ms"] == min(r["torch_rounds_ms"])
            assert len(r["torch_rounds_ms"]) == rounds
            assert r["ratio"] == pytest.approx(r["ours_ms"] / r["torch_ms"])
            per_round = [o / t for o, t in zip(r["ours_rounds_ms"], r["torch_rounds_ms"],
                                                   strict=True)]
            assert r["ratio_range"] == pytest.approx([min(per_round), max(per_round)])
        else:
            assert r["torch_ms"] is None and r["ratio"] is None, r
            assert r["ratio_range"] is None and r["torch_rounds_ms"] is None, r


@pytest.fixture
def no_torch(monkeypatch):
    """Make ``import torch`` fail, as on a machine without PyTorch."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_run_quick_rows_are_finite_and_positive():
    _check_rows(bench.run(repeats=1, quick=True, rounds=1), with_torch=_torch_importable())


def test_run_alternates_rounds_and_keeps_each_sides_best(monkeypatch):
    calls = []
    times = iter([5.0, 2.0, 4.0, 3.0])  # ours, torch, ours, torch

    def fake_best_ms(fn, repeats, warmup):
        calls.append(fn)
        return next(times)

    monkeypatch.setattr(bench, "best_ms", fake_best_ms)
    row = bench._row("case", "ours", "torch", (1, 0, 2))
    assert calls == ["ours", "torch", "ours", "torch"]
    assert row["ours_ms"] == 4.0 and row["torch_ms"] == 2.0 and row["ratio"] == 2.0
    assert row["ratio_range"] == [4.0 / 3.0, 2.5]
    assert row["ours_rounds_ms"] == [5.0, 4.0] and row["torch_rounds_ms"] == [2.0, 3.0]


def test_run_with_two_rounds_reports_both():
    _check_rows(bench.run(repeats=1, quick=True, rounds=2), with_torch=_torch_importable(),
                rounds=2)


def test_run_without_torch_leaves_torch_columns_empty(no_torch):
    rows = bench.run(repeats=1, quick=True, rounds=1)
    _check_rows(rows, with_torch=False)
    assert "-" in bench.format_table(rows).splitlines()[-1]
    assert bench.environment()["torch"] is None


def test_main_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench.main(["--quick", "--repeats", "1", "--rounds", "1", "--json", str(path)]) == 0
    saved = json.loads(path.read_text())
    assert saved["rounds"] == 1
    _check_rows(saved["rows"], with_torch=_torch_importable())
    assert saved["environment"]["numpy"]
    out = capsys.readouterr().out
    for r in saved["rows"]:
        assert r["case"] in out


def test_main_json_is_readable_by_others_under_umask_022(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run", lambda repeats, quick, rounds: [])
    path = tmp_path / "bench.json"
    old = os.umask(0o022)
    try:
        assert bench.main(["--quick", "--json", str(path)]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["bench.json"]


@pytest.mark.parametrize("where", ["missing/bench.json", "."])
def test_main_unwritable_json_fails_before_the_benchmark(tmp_path, monkeypatch, capsys, where):
    def run(repeats, quick, rounds):
        raise AssertionError("the benchmark ran although its results could not be saved")

    monkeypatch.setattr(bench, "run", run)
    path = tmp_path / where
    assert bench.main(["--quick", "--json", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"stn-numpy bench: error: cannot write --json {path}: ")
    assert captured.err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("repeats", [0, -1, 1.5, True])
def test_run_rejects_bad_repeats(repeats):
    with pytest.raises(ValueError, match="repeats"):
        bench.run(repeats=repeats, quick=True)


@pytest.mark.parametrize("rounds", [0, -2, 2.0, False])
def test_run_rejects_bad_rounds(rounds):
    with pytest.raises(ValueError, match="rounds"):
        bench.run(repeats=1, quick=True, rounds=rounds)


def test_format_table_aligns_columns():
    rows = [{"case": "a", "ours_ms": 1.0, "torch_ms": 2.0, "ratio": 0.5,
             "ratio_range": [0.45, 0.61]},
            {"case": "longer case", "ours_ms": 123.456, "torch_ms": None, "ratio": None,
             "ratio_range": None}]
    lines = bench.format_table(rows).splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[2].split() == ["a", "1.00", "2.00", "0.50x", "0.45-0.61x"]
    assert lines[3].split() == ["longer", "case", "123.46", "-", "-", "-"]


def test_header_reports_blas_env_vars_and_busy_machine(monkeypatch):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.delenv("OPENBLAS_L2_SIZE", raising=False)
    env = bench.environment()
    assert env["env"]["OPENBLAS_CORETYPE"] == "Haswell"
    assert "OPENBLAS_L2_SIZE" not in env["env"]
    env["busy_cores"] = 0.1
    header = bench.format_header(env)
    assert "OPENBLAS_CORETYPE=Haswell" in header
    assert "warning" not in header
    env["busy_cores"] = 1.5
    assert "warning: other processes kept 1.5 cores busy" in bench.format_header(env)


def test_memory_rows_measure_each_side_in_a_fresh_process():
    rows = bench.memory_rows(quick=True)
    assert [r["case"] for r in rows] == [
        "peak memory sampler fwd+bwd N=1 C=1 8x8x8",
        "peak memory affine_grid + sampler fwd+bwd N=1 C=1 8x8x8"]
    for row in rows:
        assert row["inout_mb"] == pytest.approx(2 * 4 * 8**3 / 2**20)
        assert row["ours_traced_mb"] > 0 and row["ours_rss_mb"] >= 0
        assert (row["torch_rss_mb"] is None) == (not _torch_importable())
    assert "ours traced" in bench.format_memory(rows)


def test_json_to_a_device_is_refused_before_measuring(capsys):
    import os
    import stat

    from stn_numpy.cli import main as cli_main

    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    assert cli_main(["bench", "--json", "/dev/null"]) == 2
    assert "character device, not a regular file" in capsys.readouterr().err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
