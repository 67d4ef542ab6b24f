"""Every notebook in notebooks/ executes from top to bottom without an error.

The notebooks assert their own gradient checks, so a cell that raises is a failed check as
well as broken code. Execution goes through ``notebooks/run_all.py`` (without writing the
outputs back), so the test runs them exactly as the documented command does.
"""

import importlib.util
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
MISSING = "needs nbformat, nbclient and ipykernel: pip install -e .[notebooks]"


def _load_runner():
    spec = importlib.util.spec_from_file_location("run_all", NOTEBOOK_DIR / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path):
    for name in ("nbformat", "nbclient", "ipykernel"):
        pytest.importorskip(name, reason=MISSING)
    runner = _load_runner()
    # A failing cell raises CellExecutionError, whose message carries the cell's traceback.
    runner.execute(path, write=False)


def test_notebooks_are_found():
    # Guards the glob above: without it, a moved folder would silently parametrize nothing.
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"
