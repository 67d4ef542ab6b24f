"""The exercises of notebooks 01-03: every solution passes its checker, wrong ones do not, and an
unfilled stub neither passes nor fails.

The solutions are read from the cells tagged ``solution`` of ``notebooks/solutions.ipynb`` and
executed here (nbval executes them too, but only in the slow notebook run), so they cannot rot.
"""

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
SOLUTIONS = NOTEBOOK_DIR / "solutions.ipynb"


def load_notebook_module(name):
    """A helper module of notebooks/ (``exercises``, ``lesson_size``), imported from its file
    as the kernels import it from their working directory, whatever pytest put on sys.path."""
    spec = importlib.util.spec_from_file_location(name, NOTEBOOK_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


exercises = load_notebook_module("exercises")


def _cells(path):
    return json.loads(Path(path).read_text())["cells"]


def _solutions():
    namespace = {"np": np, "stn": exercises.stn}
    for cell in _cells(SOLUTIONS):
        if "solution" in cell["metadata"].get("tags", []):
            exec("".join(cell["source"]), namespace)
    return namespace


SOLVED = _solutions()


def _stub(*args, **kwargs):
    raise NotImplementedError


def _scaled(fn, factor=1.001):
    # The solution with every float output off by 0.1%: a wrong answer close to the right one.
    def wrong(*args):
        out = fn(*args)
        if isinstance(out, tuple):
            return tuple(np.asarray(o) * factor for o in out)
        return np.asarray(out) * factor
    return wrong


def test_at_least_eight_exercises_across_the_lessons():
    assert len(exercises.EXERCISES) >= 8
    assert {nb for nb, _ in exercises.EXERCISES.values()} == {"01", "02", "03"}


@pytest.mark.parametrize("name", exercises.EXERCISES)
def test_each_exercise_has_a_stub_and_a_checker_in_its_lesson(name):
    lesson_number, _ = exercises.EXERCISES[name]
    (lesson,) = NOTEBOOK_DIR.glob(f"{lesson_number}_*.ipynb")
    sources = ["".join(c["source"]) for c in _cells(lesson) if c["cell_type"] == "code"]
    stubs = [s for s in sources if re.search(rf"^def {name}\(", s, re.M)]
    assert len(stubs) == 1, f"{lesson.name} has no single stub for {name}"
    assert '"""' in stubs[0] and stubs[0].rstrip().endswith("raise NotImplementedError")
    assert any(f"exercises.check_{name}({name})" in s for s in sources)
    # The solution is hidden: no cell of the lesson holds it.
    assert not any("solution" in c["metadata"].get("tags", []) for c in _cells(lesson))


@pytest.mark.parametrize("name", exercises.EXERCISES)
def test_solution_passes_its_checker(name, capsys):
    _, check = exercises.EXERCISES[name]
    check(SOLVED[name])
    assert capsys.readouterr().out.rstrip().endswith(f"{name}: passed")


@pytest.mark.parametrize("name", exercises.EXERCISES)
def test_unfilled_stub_is_reported_not_failed(name, capsys):
    _, check = exercises.EXERCISES[name]
    check(_stub)
    assert exercises.NOT_WRITTEN in capsys.readouterr().out


@pytest.mark.parametrize("name", exercises.EXERCISES)
def test_slightly_wrong_solution_fails(name):
    _, check = exercises.EXERCISES[name]
    with pytest.raises(AssertionError, match=name):
        check(_scaled(SOLVED[name]))


def _dU_with_plus_equals(dV, U_shape, x, y):
    # eq. (6) with dU[idx] += w dV: repeated pixels keep only one write.
    C, H, W = U_shape
    dU = np.zeros(U_shape)
    x0, y0 = np.floor(x), np.floor(y)
    for yy, xx, w in ((y0, x0, (x0 + 1 - x) * (y0 + 1 - y)), (y0 + 1, x0, (x0 + 1 - x) * (y - y0)),
                      (y0, x0 + 1, (x - x0) * (y0 + 1 - y)), (y0 + 1, x0 + 1, (x - x0) * (y - y0))):
        ok = (xx >= 0) & (xx < W) & (yy >= 0) & (yy < H)
        dU[:, yy[ok].astype(int), xx[ok].astype(int)] += (w * dV)[:, ok]
    return dU


def _dxy_eq7_as_printed(dV, U, x, y):
    # The floor form everywhere except at integer x, where eq. (7) as printed keeps U[:, y, x].
    dx, dy = SOLVED["bilinear_dxy"](dV, U, x, y)
    on = (x == np.floor(x)) & (x >= 0) & (x < U.shape[2]) & (y == np.floor(y))
    on &= (y >= 0) & (y < U.shape[1])
    dx[on] = (dV[:, on] * U[:, y[on].astype(int), x[on].astype(int)]).sum(axis=0)
    return dx, dy


def _border_pad_leaky(x, W):
    # The gradient passes at the last pixel (notebook 04, Section 2.2).
    return np.clip(x, 0, W - 1), ((x > 0) & (x <= W - 1)).astype(float)


def _similarity_without_scale(dA, theta):
    d = SOLVED["similarity_backward"](dA, theta)
    d[:, 0] /= np.exp(theta[:, 1])  # forgets that A carries the scale s
    return d


@pytest.mark.parametrize("name, wrong", [
    ("bilinear_backward_dU", _dU_with_plus_equals),
    ("bilinear_dxy", _dxy_eq7_as_printed),
    ("border_pad", _border_pad_leaky),
    ("affine_grid_backward", lambda dgrid, theta, size, ac: SOLVED["affine_grid_backward"](
        dgrid, theta, size, not ac)),
    ("similarity_backward", _similarity_without_scale),
])
def test_common_mistakes_fail_with_a_hint(name, wrong):
    _, check = exercises.EXERCISES[name]
    with pytest.raises(AssertionError, match="Hint"):
        check(wrong)
