"""Tests for stn_numpy.experiment: the run list, the results files, and a tiny experiment
end to end on real MNIST (every model kind, one epoch on a few hundred images)."""

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from stn_numpy import plots
from stn_numpy._io import read_marked
from stn_numpy.cli import main
from stn_numpy.experiment import (
    COLUMNS,
    CONFIGS,
    NOT_FULL_WARNING,
    README_END,
    README_START,
    ROWS,
    SEEDED_ROWS,
    ST_ARCHS,
    experiment_runs,
    read_results,
    readme_block,
    run_experiment,
    update_readme,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]

SMALL = replace(CONFIGS["tiny"], epochs=3)


def fake_results(config):
    """Result dicts shaped as the runs write them, with made-up numbers, for every run."""
    results = []
    for i, run in enumerate(experiment_runs(config)):
        measures = {}
        if run.arch in ST_ARCHS and run.dataset in ("rot", "rts"):
            measures["rotation"] = {"slope": -0.05 * (i % 3), "intercept": 0.0, "r2": 0.1,
                                    "n": 100}
        if run.arch == "paper-stcnn" and run.dataset == "tc":
            measures["ink_inside"] = {"mean": 0.9, "min": 0.5}
        epochs = config.epochs_of(run)
        progress = [{"epoch": e, "test_error": 10.0 / e + i, **measures}
                    for e in range(1, epochs + 1)]
        results.append({"run": run.name, "dataset": run.dataset, "arch": run.arch,
                        "transform": run.transform, "loc_net": run.loc_net,
                        "curve": run.curve, "seed": run.seed, "st_size": None,
                        "row": run.row, "train_images": 256, "test_images": 128,
                        "epochs": epochs, "test_error": 1.0 + i / 10,
                        "seconds": 10.0 + i, "measures": measures, "progress": progress,
                        "config": json.loads(json.dumps(asdict(config)))})
    return results


def test_every_cell_of_table_1_and_two_seeds_where_asked():
    runs = experiment_runs(CONFIGS["full"])
    table = [r for r in runs if not r.curve]
    kinds = {(r.dataset, r.row) for r in table}
    paper_rows = [row for row in ROWS if "Sim" not in row]
    for dataset in ("rot", "rts", "proj", "elastic"):
        assert {row for d, row in kinds if d == dataset} >= set(paper_rows)
    for dataset in ("rot", "rts"):
        assert (dataset, "ST-CNN Sim") in kinds and (dataset, "ST-CNN Sim, FCN loc") in kinds
    assert {row for d, row in kinds if d == "tc"} == {"CNN", "ST-CNN Aff"}
    assert {(d, row) for d, row in kinds if "Sim" in row} <= {(d, row) for d in ("rot", "rts")
                                                              for row in ROWS}
    for dataset in ("rts", "tc"):
        for row in SEEDED_ROWS:
            seeds = {r.seed for r in table if r.dataset == dataset and r.row == row}
            assert seeds == set(CONFIGS["full"].seeds) or (dataset, row) not in kinds
    others = [r for r in table if r.row not in SEEDED_ROWS]
    assert {r.seed for r in others} == {CONFIGS["full"].seeds[0]}
    assert len({r.name for r in runs}) == len(runs)
    # The runs of the earlier experiment keep their names (and so their folders).
    for name in ("rot-paper-cnn-seed0", "rts-paper-stcnn-affine-seed1",
                 "proj-paper-stcnn-tps-seed0", "tc-paper-stcnn-affine-seed1"):
        assert name in {r.name for r in runs}


def test_curve_runs_train_both_heads_with_both_localisation_nets_on_r(tmp_path):
    from stn_numpy.experiment import _train_config

    config = CONFIGS["full"]
    curves = [r for r in experiment_runs(config) if r.curve]
    assert {(r.transform, r.loc_net) for r in curves} == {
        ("affine", None), ("affine", "fcn"), ("similarity", None), ("similarity", "fcn")}
    for run in curves:
        cfg = _train_config(config, run, tmp_path, None, False)
        assert run.dataset == "rot" and run.name.startswith("curve-rot-")
        assert cfg.epochs == config.curve_epochs >= 30
        assert cfg.train_limit == config.curve_train_limit and cfg.loc_net == run.loc_net
    assert not any(r.curve for r in experiment_runs(replace(config, curve_epochs=0)))


def test_st_epochs_lengthen_only_the_st_cnn_on_their_datasets(tmp_path):
    from stn_numpy.experiment import _train_config

    config = replace(CONFIGS["full"], st_epochs=(("rts", 20), ("tc", 30)))
    epochs = {run.name: _train_config(config, run, tmp_path, None, False).epochs
              for run in experiment_runs(config)}
    assert epochs["rts-paper-stcnn-affine-seed1"] == 20
    assert epochs["tc-paper-stcnn-affine-seed0"] == 30
    assert epochs["rts-paper-cnn-seed1"] == epochs["tc-paper-cnn-seed0"] == 10
    assert epochs["rot-paper-stcnn-affine-seed0"] == epochs["proj-paper-stcnn-tps-seed0"] == 10
    assert epochs["rts-paper-stfcn-affine-seed0"] == epochs["rts-paper-fcn-seed0"] == 10
    assert epochs["rts-paper-stcnn-similarity-fcnloc-seed0"] == 20
    assert "epochs: 10, ST-CNN on RTS 20, ST-CNN on TC 30;" in readme_block(
        fake_results(config), config, tmp_path, tmp_path)


def test_finished_runs_are_kept_unless_their_own_settings_changed(tmp_path):
    # Lengthening the ST-CNN on RTS retrains those runs and keeps every other one; a
    # result.json from before st_epochs existed reads as st_epochs=().
    from stn_numpy.experiment import _finished

    old = json.loads(json.dumps(asdict(CONFIGS["full"])))
    del old["st_epochs"]
    longer = replace(CONFIGS["full"], st_epochs=(("rts", 20),))
    runs = {run.name: run for run in experiment_runs(longer)}
    for name in ("rts-paper-cnn-seed0", "rts-paper-stcnn-affine-seed0",
                 "rot-paper-stcnn-affine-seed0"):
        (tmp_path / name).mkdir()
        result = {**fake_results(SMALL)[0], "run": name, "config": old}
        (tmp_path / name / "result.json").write_text(json.dumps(result))
    assert _finished(tmp_path / "rts-paper-cnn-seed0", longer, runs["rts-paper-cnn-seed0"])
    assert _finished(tmp_path / "rot-paper-stcnn-affine-seed0", longer,
                     runs["rot-paper-stcnn-affine-seed0"])
    assert _finished(tmp_path / "tc-paper-cnn-seed0", longer, runs["tc-paper-cnn-seed0"]) is None
    with pytest.raises(ValueError, match="finished with other settings"):
        _finished(tmp_path / "rts-paper-stcnn-affine-seed0", longer,
                  runs["rts-paper-stcnn-affine-seed0"])
    with pytest.raises(ValueError, match="finished with other settings"):
        _finished(tmp_path / "rts-paper-cnn-seed0", replace(longer, lr=0.01),
                  runs["rts-paper-cnn-seed0"])


def test_results_recorded_in_out_are_kept_where_their_run_folders_are_gone(tmp_path):
    # A fresh clone holds <out>/results.json and the figures, not the run folders: a
    # recorded run whose own settings are the config's is kept, not trained again.
    from stn_numpy.experiment import _kept_if_same_settings, _recorded_results

    old = replace(CONFIGS["full"], curve_epochs=0, curve_train_limit=None)
    results = fake_results(replace(old, epochs=1))
    for r in results:
        r["config"] = json.loads(json.dumps(asdict(old)))
    out = tmp_path / "out"
    out.mkdir()
    write_results(results, old, out)
    recorded = _recorded_results(out)
    assert _recorded_results(tmp_path / "nothing") == {}
    runs = {run.name: run for run in experiment_runs(CONFIGS["full"])}
    kept = _kept_if_same_settings(recorded["rot-paper-cnn-seed0"], CONFIGS["full"],
                                  runs["rot-paper-cnn-seed0"], out)
    assert kept == recorded["rot-paper-cnn-seed0"]
    longer = replace(CONFIGS["full"], epochs=12)
    assert _kept_if_same_settings(recorded["rot-paper-cnn-seed0"], longer,
                                  runs["rot-paper-cnn-seed0"], out) is None
    # A damaged record is checked as a run folder's result.json is, and named.
    damaged = {**recorded["rot-paper-cnn-seed0"], "test_error": None}
    with pytest.raises(ValueError, match=r"results.json, run rot-paper-cnn-seed0: not a "
                                         r"result .* 'test_error' is a"):
        _kept_if_same_settings(damaged, CONFIGS["full"], runs["rot-paper-cnn-seed0"], out)


def test_curve_section_tables_the_first_epoch_each_target_is_reached(tmp_path):
    from stn_numpy.experiment import CURVE_FIGURE, _curve_section

    config = replace(SMALL, curve_epochs=4, curve_train_limit=64)
    results = fake_results(config)
    curves = [r for r in results if r["curve"]]
    assert len(curves) == 4
    for r, slopes in zip(curves, ([-0.1, -0.6, -0.7, -0.9], [-0.1, -0.2, -0.3, -0.4],
                                  [-0.85, -0.9, -0.95, -0.97], [0.0, -0.5, -0.8, -0.8]),
                         strict=True):
        for row, slope in zip(r["progress"], slopes, strict=True):
            row["rotation"] = {"slope": slope, "intercept": 0.0, "r2": 0.5, "n": 100}
        r["measures"] = {"rotation": {"slope": slopes[-1], "intercept": 0.0, "r2": 0.7,
                                      "n": 100}}
    lines = _curve_section(curves, tmp_path, tmp_path)
    rows = [line for line in lines if line.startswith("| ST-CNN")]
    assert [row.split(" | ")[1:3] for row in rows] == [["2", "4"], ["-", "-"], ["1", "1"],
                                                       ["2", "3"]]
    assert rows[0].endswith("| -0.900 | 0.700 | " + f"{curves[0]['test_error']:.2f} |")
    assert (tmp_path / CURVE_FIGURE).read_bytes()[:4] == b"\x89PNG"
    assert f"![rotation slope against epoch]({CURVE_FIGURE})" in lines
    assert _curve_section([], tmp_path, tmp_path) == []
    # results.md keeps the curve runs out of the table and gives them their own section.
    write_results(results, config, tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "## How fast the transformer learns to undo rotation" in text
    assert "ST-CNN Aff, FCN loc" not in text.split("## Settings")[0]


def test_results_json_holds_the_results_as_given_and_reads_back(tmp_path):
    results = fake_results(SMALL)
    write_results(results, SMALL, tmp_path)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored == {"config": json.loads(json.dumps(asdict(SMALL))), "results": results}
    assert read_results(tmp_path) == (results, SMALL)


def test_epochs_figure_follows_each_runs_measure(tmp_path, monkeypatch):
    results = fake_results(SMALL)
    write_results(results, SMALL, tmp_path)
    assert (tmp_path / "epochs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![epoch by epoch](epochs.png)" in (tmp_path / "results.md").read_text()
    drawn = []
    monkeypatch.setattr(plots, "plot_epochs", lambda columns, path, title: drawn.extend(columns))
    write_results(results, SMALL, tmp_path)
    columns = {title: (curves, label) for title, curves, label, _ in drawn}
    assert list(columns) == [f"{label} ({dataset})" for dataset, label in COLUMNS]
    rot_st = next(r for r in results if r["run"] == "rot-paper-stcnn-affine-seed0")
    curves, label = columns["R (rot)"]
    table_rot = [r for r in results if r["dataset"] == "rot" and not r["curve"]]
    assert label.startswith("rotation slope") and [c.label for c in curves] == [
        f"{r['row']}, seed 0" for r in table_rot]  # the curve runs have a figure of their own
    assert curves[0].label == "CNN, seed 0" and curves[0].measure is None
    assert curves[1].measure == [row["rotation"]["slope"] for row in rot_st["progress"]]
    assert curves[1].errors == [row["test_error"] for row in rot_st["progress"]]
    assert columns["TC (tc)"][1].startswith("ink inside")
    assert {c.style for c in columns["TC (tc)"][0]} == {0, 1}  # the two seeds
    assert columns["P (proj)"][1] is None


def results_folder(root, config):
    """``root/notebooks/experiment`` with the results of fake runs and stand-in figures."""
    out = root / "notebooks" / "experiment"
    out.mkdir(parents=True)
    results = fake_results(config)
    for r in results:
        if r["arch"] in ST_ARCHS:
            (out / f"{r['run']}-snapshots.png").write_bytes(b"png")
    (out / "rts-paper-stcnn-affine-seed0-recovered.png").write_bytes(b"png")
    write_results(results, config, out)
    return out, results


def test_readme_block_tables_settings_and_figures(tmp_path):
    out, results = results_folder(tmp_path, SMALL)
    block = readme_block(results, SMALL, out, tmp_path)
    assert str(tmp_path) not in block and block.endswith("\n")
    rts = [r["test_error"] for r in results if r["dataset"] == "rts" and r["row"] == "CNN"]
    cnn = f"| CNN | {results[0]['test_error']:.2f} (1.2) | {np.mean(rts):.2f} ± "
    assert f"{cnn}{np.std(rts, ddof=1):.2f} (0.8) |" in block
    table = [line for line in block.splitlines() if line.startswith("| ")]
    assert set(table) <= set((out / "results.md").read_text().splitlines())
    measured = [r["run"] for r in results if r["measures"] and not r["curve"]]
    names = {r["run"] for r in results}
    assert [line.split(" | ")[0][2:] for line in table
            if line.split(" | ")[0][2:] in names] == measured
    settings = next(line for line in block.splitlines() if line.startswith("Settings: "))
    for text in ("training images per dataset: 256", "test images: 128", "epochs: 3",
                 "batch size 64", "adam", "lr 0.001", "cosine schedule", "seeds: 0, 1"):
        assert text in settings
    assert f"Total training time: {sum(r['seconds'] for r in results) / 3600:.2f} h" in block
    links = [line for line in block.splitlines() if line.startswith("![")]
    assert links == [
        "![epoch by epoch](notebooks/experiment/epochs.png)",
        "![rotation slope against epoch](notebooks/experiment/rotation-curve.png)"] + [
        f"![{run} {kind}](notebooks/experiment/{run}-{kind}.png)" for run, kind in (
            ("rot-paper-stcnn-similarity-fcnloc-seed0", "snapshots"),
            ("rot-paper-stcnn-similarity-seed0", "snapshots"),
            ("rot-paper-stcnn-affine-seed0", "snapshots"),
            ("rts-paper-stcnn-affine-seed0", "snapshots"),
            ("rts-paper-stcnn-affine-seed0", "recovered"),
            ("proj-paper-stcnn-affine-seed0", "snapshots"),
            ("tc-paper-stcnn-affine-seed0", "snapshots"))]


def test_reduction_line_compares_the_affine_st_cnn_with_the_cnn():
    from stn_numpy.experiment import _reduction_line

    def result(dataset, row, error):
        return {"dataset": dataset, "row": row, "test_error": error}

    results = [result("rot", "CNN", 4.0), result("rot", "ST-CNN Aff", 3.0),
               result("rts", "CNN", 8.0), result("rts", "CNN", 12.0),
               result("rts", "ST-CNN Aff", 2.0), result("rts", "ST-CNN Aff", 3.0),
               result("proj", "CNN", 2.0), result("proj", "ST-CNN TPS", 1.0),
               result("tc", "ST-CNN Aff", 1.0)]
    # R: 1 - 3/4; RTS: means 10 and 2.5; P and TC lack one of the two rows.
    assert _reduction_line(results) == ("Fewer errors with the affine ST-CNN than with the "
                                        "CNN: R 25%, RTS 75%.")
    assert _reduction_line(results[-2:]) == ""


def test_readme_block_warns_unless_the_config_is_the_full_experiment(tmp_path):
    results = fake_results(CONFIGS["tiny"])
    block = readme_block(results, CONFIGS["tiny"], tmp_path, tmp_path)
    assert block.startswith(NOT_FULL_WARNING + "\n")
    full = readme_block(fake_results(CONFIGS["full"]), CONFIGS["full"], tmp_path, tmp_path)
    assert NOT_FULL_WARNING not in full


def test_update_readme_rewrites_only_its_block(tmp_path):
    out, results = results_folder(tmp_path, SMALL)
    readme = tmp_path / "README.md"
    before, after = "# t\n\nprose before\n", "\nprose after\n"
    readme.write_text(f"{before}{README_START}\nplaceholder\n{README_END}{after}")
    update_readme(readme, results, SMALL, out)
    text = readme.read_text()
    assert text.startswith(f"{before}{README_START}\n") and text.endswith(f"{README_END}{after}")
    assert read_marked(readme, README_START, README_END) == readme_block(results, SMALL, out,
                                                                         tmp_path)
    update_readme(readme, results, SMALL, out)
    assert readme.read_text() == text  # byte-identical on a rerun
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match=f"{readme}: needs one '{README_START}'"):
        update_readme(readme, results, SMALL, out)
    assert readme.read_text() == "no markers\n"


@pytest.mark.parametrize("option", ["--page", "--readme"])  # --readme: the old name
def test_cli_page_regenerates_the_block_from_finished_runs(tmp_path, capsys, option):
    out, runs, readme = tmp_path / "out", tmp_path / "runs", tmp_path / "experiment.md"
    results = fake_results(CONFIGS["tiny"])
    for r in results:  # every run finished: the command trains nothing
        (runs / r["run"]).mkdir(parents=True)
        (runs / r["run"] / "result.json").write_text(json.dumps(r))
    readme.write_text("no markers\n")
    args = ["experiment", "--config", "tiny", "--out", str(out), "--runs", str(runs),
            option, str(readme), "--no-progress"]
    assert main(args) == 2  # before any run
    assert "needs one" in capsys.readouterr().err and not out.exists()
    readme.write_text(f"# t\n{README_START}\n{README_END}\n")
    assert main(args) == 0
    assert read_marked(readme, README_START, README_END) == readme_block(
        results, CONFIGS["tiny"], out, tmp_path)


def test_committed_page_block_is_what_the_committed_results_give():
    # The experiment page's block is written by `stn-numpy experiment --out
    # notebooks/experiment --page docs/experiment.md`, never by hand.
    out, page = REPO / "notebooks" / "experiment", REPO / "docs" / "experiment.md"
    if not (out / "results.json").is_file():
        pytest.skip("notebooks/experiment/results.json is not committed: the experiment "
                    "page's block has no results to be checked against")
    results, config = read_results(out)
    assert read_marked(page, README_START, README_END) == readme_block(
        results, config, out, page.parent)


def test_no_epochs_figure_without_per_epoch_data(tmp_path):
    results = [{**r, "progress": []} for r in fake_results(SMALL)]
    write_results(results, SMALL, tmp_path)
    assert not (tmp_path / "epochs.png").exists()
    assert "epochs.png" not in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_tiny_experiment_end_to_end(tmp_path, mnist_dir, capsys):
    out, runs = tmp_path / "out", tmp_path / "runs"
    lines = []
    results = run_experiment("tiny", out=out, runs=runs, data_dir=mnist_dir, progress=False,
                             log=lines.append)
    assert len(results) == len(experiment_runs(CONFIGS["tiny"])) == 47
    text = (out / "results.md").read_text()
    assert str(tmp_path) not in text
    assert read_results(out) == (results, CONFIGS["tiny"])
    assert (out / "epochs.png").is_file()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    header = "| model | " + " | ".join(label for _, label in COLUMNS) + " |"
    start = table.index(header)
    rows = table[start + 1:start + 1 + len(ROWS)]
    assert [r.split(" | ")[0][2:] for r in rows] == list(ROWS)
    assert all(r.count(" | ") == len(COLUMNS) for r in rows)
    assert "(2.1)" in rows[0] and "(1.2)" in rows[1]  # the paper's numbers beside ours
    assert "(1.7)" in rows[ROWS.index("ST-CNN Aff")]
    for r in results:
        assert 0 <= r["test_error"] <= 100 and r["epochs"] == (2 if r["curve"] else 1)
        folder = runs / r["run"]
        assert json.loads((folder / "result.json").read_text())["run"] == r["run"]
        if r["arch"] in ST_ARCHS:
            with np.load(folder / "snapshots.npz") as f:
                assert f["images"].shape[:2] == (r["epochs"], 8)
            assert (out / f"{r['run']}-snapshots.png").is_file()
    assert set(results[1]["measures"]) == {"rotation"}
    assert "| rot-paper-stcnn-affine-seed0 | 1: " in text  # the epoch-by-epoch curve
    assert (out / f"{results[1]['run']}-recovered.png").is_file()
    assert "## How fast the transformer learns to undo rotation" in text
    assert (out / "rotation-curve.png").is_file()
    # evaluate prints the transformer's measures for an ST model, a similarity head's too.
    for name in (results[1]["run"], "rot-paper-stcnn-similarity-seed0"):
        checkpoint = runs / name / "checkpoint.npz"
        capsys.readouterr()
        assert main(["evaluate", str(checkpoint), "--data-dir", mnist_dir,
                     "--test-limit", "50"]) == 0
        assert "rotation: recovered vs applied slope" in capsys.readouterr().out
    # Finished runs are kept and skipped.
    lines.clear()
    again = run_experiment("tiny", out=out, runs=runs, data_dir=mnist_dir, progress=False,
                           log=lines.append)
    assert again == results and all("finished earlier" in line for line in lines)
    with pytest.raises(ValueError, match="finished with other settings"):
        run_experiment(CONFIGS["full"], out=out, runs=runs, data_dir=mnist_dir)


def test_each_write_of_results_json_holds_every_finished_run(tmp_path, monkeypatch):
    # Runs recorded in <out>/results.json but not yet reached by the loop stay in the file
    # each time a newly trained run rewrites it: a kill then loses none of them.
    from stn_numpy import experiment

    config = replace(SMALL, curve_epochs=0)
    results = fake_results(config)
    out = tmp_path / "out"
    out.mkdir()
    first = experiment_runs(config)[0].name
    write_results([r for r in results if r["run"] != first], config, out)
    written = []

    def fake_run_one(config, run, folder, *args):
        return next(r for r in results if r["run"] == run.name)

    def fake_write(results, config, out):
        written.append([r["run"] for r in results])

    monkeypatch.setattr(experiment, "_run_one", fake_run_one)
    monkeypatch.setattr(experiment, "load_split", lambda *a, **k: (None, None, None)[
        :3 if k.get("return_params") else 2])
    monkeypatch.setattr(experiment, "write_results", fake_write)
    got = run_experiment(config, out=out, runs=tmp_path / "runs", progress=False,
                         log=lambda *a: None)
    assert [r["run"] for r in got] == [r.name for r in experiment_runs(config)]
    assert written[0] == [r["run"] for r in results]  # the first write already holds them all


def _one_run(folder, out, data, **patches):
    """``proj``'s affine ST-CNN for 2 epochs on synthetic data, as run_experiment runs it."""
    from stn_numpy.experiment import Run, _run_one

    config = replace(CONFIGS["tiny"], epochs=2)
    run = Run("proj", "paper-stcnn", "affine", 0)
    folder.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return _run_one(config, run, folder, data, {}, out, None, False, lambda s: None)


def _kept(folder):
    """Everything a run folder holds but the wall times."""
    z = np.load(folder / "snapshots.npz")
    metrics = json.loads((folder / "metrics.json").read_text())
    return (sorted(p.name for p in folder.iterdir()), json.loads((folder / "progress.json")
            .read_text()), z["epochs"].tolist(), z["images"].tobytes(),
            [{k: v for k, v in row.items() if k != "seconds"} for row in metrics])


@pytest.mark.parametrize("killed_in", ["metrics", "progress"])
def test_a_run_killed_after_its_checkpoint_loses_nothing_on_resume(tmp_path, monkeypatch,
                                                                  killed_in):
    import stn_numpy.experiment as experiment
    import stn_numpy.train as train_module

    rng = np.random.default_rng(0)
    data = (rng.random((64, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 64),
            rng.random((16, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 16))
    straight = tmp_path / "straight"
    _one_run(straight / "run", straight, data)
    # A kill -9 in the window after the last epoch's checkpoint: before its metrics, or
    # after its snapshots and before its per-epoch measures.
    module, name = ((train_module, "_write_metrics") if killed_in == "metrics"
                    else (experiment, "_write_json"))
    real, calls = getattr(module, name), []

    def killed(*args):
        calls.append(args)
        if killed_in == "metrics" and len(calls) == 2 or killed_in == "progress" and len(
                [a for a in calls if a[0].name == "progress.json"]) == 2:
            raise SystemExit("killed")
        return real(*args)

    killed_run = tmp_path / "killed"
    with monkeypatch.context() as m, pytest.raises(SystemExit):
        m.setattr(module, name, killed)
        _one_run(killed_run / "run", killed_run, data)
    assert load_checkpoint_epoch(killed_run / "run") == 2
    _one_run(killed_run / "run", killed_run, data)
    assert _kept(killed_run / "run") == _kept(straight / "run")
    assert sorted(p.name for p in killed_run.iterdir() if p.is_file()) == sorted(
        p.name for p in straight.iterdir() if p.is_file())


def load_checkpoint_epoch(folder):
    from stn_numpy.checkpoint import load_checkpoint

    return load_checkpoint(folder / "checkpoint.npz")[2]["epoch"]


def test_damaged_run_files_are_named(tmp_path):
    from stn_numpy.experiment import Run, _finished

    run = Run("rot", "paper-cnn", "affine", 0)
    (tmp_path / "result.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"result.json: not valid JSON"):
        _finished(tmp_path, SMALL, run)
    (tmp_path / "result.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"result.json: not a result this experiment wrote"):
        _finished(tmp_path, SMALL, run)
    result = {**fake_results(SMALL)[0], "test_error": None}
    (tmp_path / "result.json").write_text(json.dumps(result))
    with pytest.raises(ValueError, match=r"result.json: not a result .* 'test_error' is a"):
        _finished(tmp_path, SMALL, run)
    (tmp_path / "result.json").write_text("[" * 100000)
    with pytest.raises(ValueError, match=r"result.json: not valid JSON"):
        _finished(tmp_path, SMALL, run)
