"""The notebooks' committed outputs: present, portable, and checked by nbval.

Executing the notebooks and comparing their outputs is nbval's job (``notebooks/conftest.py``
turns it on for ``python -m pytest``). The tests here guard that machinery and what nbval
cannot see: outputs that would only differ on another machine.
"""

import json
import os
import re
from pathlib import Path

import pytest
from test_exercises import load_notebook_module

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# An absolute path under a usual root of a POSIX machine, or a Windows drive path.
ABSOLUTE_PATH = re.compile(
    r"(?<![\w.~/])(/(?:home|root|tmp|usr|work|Users|var|mnt)/\S+|[A-Z]:\\\S+)")


def output_text(path):
    """Every text output of the notebook at ``path``, joined."""
    parts = []
    for cell in json.loads(path.read_text())["cells"]:
        for out in cell.get("outputs", []):
            parts.append("".join(out.get("text", "")))
            parts.append("".join(out.get("data", {}).get("text/plain", "")))
            parts.extend(out.get("traceback", []))
    return "\n".join(parts)


def test_notebooks_are_found():
    # Guards the glob: without it, a moved folder would silently parametrize nothing.
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


def test_nbval_is_installed():
    # Without the plugin the notebooks are not collected at all; say so instead.
    pytest.importorskip("nbval", reason="needs nbval to execute the notebooks: "
                                        "pip install -e .[test]")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_portable(path):
    text = output_text(path)
    assert str(REPO_ROOT) not in text
    assert os.path.expanduser("~") + os.sep not in text
    assert not ABSOLUTE_PATH.search(text), ABSOLUTE_PATH.search(text).group(0)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_was_executed_without_errors(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert all(c["execution_count"] is not None for c in cells), "a code cell was not run"
    assert not any(o["output_type"] == "error" for c in cells for o in c["outputs"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_lesson_fits_one_sitting(path):
    # notebooks/lesson_size.py measures prose words and lines of code; appendices are exempt.
    over_limits = load_notebook_module("lesson_size").over_limits
    assert not over_limits(path), f"{path.name}: {'; '.join(over_limits(path))}"


def test_lesson_size_counts_prose_and_code_as_defined():
    lesson_size = load_notebook_module("lesson_size")
    code_lines, prose_words = lesson_size.code_lines, lesson_size.prose_words
    markdown = "Two words `not_these` $\\alpha + 1$\n$$x = 1$$\n```\ncode here\n```\n[a link](http://x)"
    assert prose_words(markdown) == 4  # "Two", "words", "a", "link"
    assert code_lines("x = 1\n\ny = 2\n") == 3
