"""Execute the notebooks in this folder and store their outputs in place.

Usage, from the repository root::

    python notebooks/run_all.py                 # every notebook, outputs written back
    python notebooks/run_all.py --check         # execute only, leave the files untouched
    python notebooks/run_all.py notebooks/01_grids_and_sampler.ipynb

Each notebook runs in a fresh ``python3`` kernel whose working directory is this folder and
whose ``PYTHONPATH`` starts with the repository root, so ``import stn_numpy`` finds the
working tree whether or not the package is installed. A cell that raises stops the run with
a non-zero exit status. Needs ``nbformat``, ``nbclient`` and ``ipykernel``
(``pip install -e .[notebooks]``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parent
REPO_ROOT = NOTEBOOK_DIR.parent
TIMEOUT_PER_CELL = 300  # seconds; every cell of these notebooks takes a few seconds at most


def notebooks() -> list[Path]:
    """Every notebook in this folder, in name order (their numbers give the reading order)."""
    return sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def execute(path: Path, write: bool = True) -> float:
    """Run every cell of the notebook at ``path``; return the wall time in seconds.

    Raises ``nbclient.exceptions.CellExecutionError`` (with the cell's traceback) if a cell
    fails. With ``write=True`` the executed notebook, outputs included, replaces the file.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    client = NotebookClient(
        nb,
        timeout=TIMEOUT_PER_CELL,
        kernel_name="python3",
        # Per-cell timestamps would turn every re-run into a diff.
        record_timing=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    start = time.perf_counter()
    client.execute(env={**os.environ, "PYTHONPATH": pythonpath})
    elapsed = time.perf_counter() - start
    if write:
        # The slider of 01 leaves its widgets' state (random ids, 24 KB) in the metadata on
        # every run; a page without a kernel shows the static figure beside it instead.
        nb.metadata.pop("widgets", None)
        nbformat.write(nb, path)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks to run (default: all)")
    parser.add_argument("--check", action="store_true", help="execute without writing back")
    args = parser.parse_args(argv)
    paths = args.paths or notebooks()
    for path in paths:
        elapsed = execute(path, write=not args.check)
        size_kb = path.stat().st_size / 1024
        print(f"{path.name}: executed in {elapsed:.1f} s, {size_kb:.0f} KiB on disk")
    return 0


if __name__ == "__main__":
    sys.exit(main())
