"""Count a notebook's prose words and lines of code, and hold the lessons to one sitting.

Usage, from the repository root::

    python notebooks/lesson_size.py              # a table for every notebook here
    python notebooks/lesson_size.py --check      # exit 1 if a lesson is over its limits

What is counted:

* **prose words**: the words of the markdown cells once fenced code blocks, inline code
  (`` `...` ``), LaTeX (``$$...$$``, ``$...$``), link targets and HTML tags are taken out;
  a word is a run of non-space characters holding at least one letter or digit;
* **lines of code**: every line of the code cells, blank ones included.

These are the measures the teaching issue's table used (its code lines agree exactly; its prose
count differs by a few words per hundred, this one counting more).

A lesson (every numbered notebook but the appendices, ``NNa_*``) has at most
``MAX_PROSE_WORDS`` and ``MAX_CODE_LINES``; the appendices and the solutions notebook have
no limit. ``tests/test_notebooks.py`` enforces it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parent
MAX_PROSE_WORDS = 2000
MAX_CODE_LINES = 300

_NOT_PROSE = [
    re.compile(r"```.*?```", re.S),  # fenced code blocks
    re.compile(r"\$\$.*?\$\$", re.S),  # display LaTeX
    re.compile(r"\\begin\{(\w+\*?)\}.*?\\end\{\1\}", re.S),  # LaTeX environments outside $$
    re.compile(r"(?<!\\)\$.+?(?<!\\)\$", re.S),  # inline LaTeX
    re.compile(r"`[^`]*`"),  # inline code
    re.compile(r"\]\([^)]*\)"),  # link targets: the text in [...] stays
    re.compile(r"<[^>]+>"),  # HTML tags
]
_WORD = re.compile(r"\S*[^\W_]\S*")


def prose_words(markdown: str) -> int:
    """Words of ``markdown`` outside code, inline code, LaTeX, link targets and HTML tags."""
    for pattern in _NOT_PROSE:
        markdown = pattern.sub(" ", markdown)
    return len(_WORD.findall(markdown))


def code_lines(source: str) -> int:
    """Lines of a code cell's ``source``, blank ones included."""
    return len(source.splitlines())


def measure(path: Path) -> dict:
    """``{"prose_words", "code_lines", "code_cells"}`` of the notebook at ``path``."""
    cells = json.loads(Path(path).read_text())["cells"]
    text = {kind: ["".join(c["source"]) for c in cells if c["cell_type"] == kind]
            for kind in ("markdown", "code")}
    return {"prose_words": sum(prose_words(s) for s in text["markdown"]),
            "code_lines": sum(code_lines(s) for s in text["code"]),
            "code_cells": len(text["code"])}


def is_lesson(path: Path) -> bool:
    """A numbered notebook that is not an appendix (``01a_...``): the limits apply to it."""
    return re.match(r"\d+_", Path(path).name) is not None


def over_limits(path: Path) -> list[str]:
    """What about the lesson at ``path`` exceeds the limits (empty if nothing, or no lesson)."""
    if not is_lesson(path):
        return []
    m = measure(path)
    problems = []
    if m["prose_words"] > MAX_PROSE_WORDS:
        problems.append(f"{m['prose_words']} prose words > {MAX_PROSE_WORDS}")
    if m["code_lines"] > MAX_CODE_LINES:
        problems.append(f"{m['code_lines']} lines of code > {MAX_CODE_LINES}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: all here)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a lesson is too long")
    args = parser.parse_args(argv)
    failed = False
    print(f"{'notebook':45s} {'prose words':>11s} {'code lines':>10s} {'cells':>5s}  limits")
    for path in args.paths or sorted(NOTEBOOK_DIR.glob("*.ipynb")):
        m = measure(path)
        problems = over_limits(path)
        failed |= bool(problems)
        verdict = "; ".join(problems) or ("within" if is_lesson(path) else "none (not a lesson)")
        print(f"{path.name:45s} {m['prose_words']:11d} {m['code_lines']:10d} "
              f"{m['code_cells']:5d}  {verdict}")
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
