"""Test the notebooks with nbval: each is re-executed and its fresh outputs compared with the
committed ones, so a stale output fails the suite.

``python -m pytest`` collects this folder (``testpaths`` in pyproject.toml); this file turns
nbval's ``--nbval`` on for it, so every ``*.ipynb`` added here is picked up without further
wiring. What it sets up:

* the kernel is the Python running pytest, with the repository root first on its
  ``PYTHONPATH``, so the notebooks import this working tree (as ``run_all.py`` does);
* ``nbval_sanitize.cfg`` masks what legitimately changes between runs (durations);
* every notebook cell is marked ``slow`` (``-m "not slow"`` leaves them out);
* cells tagged ``needs-mnist`` are skipped, with the reason, when the MNIST files are not in
  ``$STN_NUMPY_DATA`` (else ``notebooks/data/mnist``, where the kernel would look), and
  cells tagged ``needs-torch`` when PyTorch is not installed: their outputs would differ.

Figures are not compared (nbval skips ``image/png``); their text lines are.
"""

import os
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent
REPO_ROOT = NOTEBOOK_DIR.parent
SANITIZE = NOTEBOOK_DIR / "nbval_sanitize.cfg"
NEEDS_MNIST = "needs-mnist"
NEEDS_TORCH = "needs-torch"


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("nbval"):
        return  # tests/test_notebooks.py reports the missing plugin as a skip
    opt = config.option
    if not (opt.nbval or opt.nbval_lax):
        opt.nbval = True
    if opt.nbval_sanitize_with is None:
        opt.nbval_sanitize_with = str(SANITIZE)
    if opt.nbval_kernel_name is None:
        opt.nbval_current_env = True
    paths = [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)


def _missing_mnist():
    from stn_numpy.data import mnist

    env = os.environ.get(mnist.ENV_VAR)
    root = Path(env) if env else NOTEBOOK_DIR / mnist.DEFAULT_ROOT
    names = [name for pair in mnist.FILES.values() for name in pair]
    if all((root / name).is_file() for name in names):
        return None
    return f"MNIST files not found: set {mnist.ENV_VAR} to a folder with the four .gz files"


def _missing_torch():
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return "PyTorch not installed: pip install torch==2.13.0"
    return None


def pytest_collection_modifyitems(config, items):
    missing = {NEEDS_MNIST: _missing_mnist(), NEEDS_TORCH: _missing_torch()}
    for item in items:
        if not str(item.fspath).endswith(".ipynb"):
            continue
        item.add_marker(pytest.mark.slow)
        tags = getattr(item, "cell", {}).get("metadata", {}).get("tags", [])
        for tag, reason in missing.items():
            if reason and tag in tags:
                item.add_marker(pytest.mark.skip(reason=reason))
