"""The generated reference pages of the documentation, and the check that they are complete.

* The API reference has one page per module in :data:`API_MODULES` (and per module that
  ``stn_numpy.__all__`` names), with an entry for every name in that module's ``__all__``,
  written from the docstrings by autodoc. A name someone adds to an ``__all__`` gets its
  entry at the next build without any page being edited; a name already documented under
  the package that re-exports it is linked, not documented twice.
* The CLI reference is the ``-h`` text of ``stn-numpy`` and of each of its commands, so it
  cannot drift from the command line.
* After reading, the build fails if a public name has no entry (an object autodoc could not
  import or document): a warning, which ``-W`` makes fatal, and an error without ``-W``.

The page texts come from plain functions (:func:`api_pages`, :func:`cli_page`) that import
no Sphinx, so the tests check them without the ``docs`` extra.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import re
from pathlib import Path

# The modules whose __all__ the API reference covers, in the order of its pages; the
# modules that stn_numpy.__all__ names (gradcheck, reference, ...) are added after the first.
API_MODULES = (
    "stn_numpy",
    "stn_numpy.grids",
    "stn_numpy.sampling",
    "stn_numpy.layers",
    "stn_numpy.transformer",
    "stn_numpy.models",
    "stn_numpy.optim",
    "stn_numpy.checkpoint",
    "stn_numpy.train",
    "stn_numpy.data",
    "stn_numpy.measures",
    "stn_numpy.experiment",
    "stn_numpy.verify",
    "stn_numpy.verify.parity",
    "stn_numpy.verify.golden",
    "stn_numpy.verify.adapters",
    "stn_numpy.verify.common",
    "stn_numpy.verify.second_order",
    "stn_numpy.verify.volumes",
    "stn_numpy.verify.atlas",
    "stn_numpy.verify.mutants",
    "stn_numpy.onnx",
)
GENERATED = "api/generated"  # relative to the docs folder (conf.py's); not committed


def api_modules() -> list[str]:
    """:data:`API_MODULES`, with every module ``stn_numpy.__all__`` names after the first."""
    package = importlib.import_module("stn_numpy")
    named = [f"stn_numpy.{n}" for n in package.__all__
             if inspect.ismodule(getattr(package, n))]
    modules = [API_MODULES[0], *sorted(named), *API_MODULES[1:]]
    return list(dict.fromkeys(modules))


def _kind(obj) -> str:
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if callable(obj):
        return "function"
    return "data"


def public_entries(modules=None) -> dict[str, list[tuple[str, str, str]]]:
    """For each module, ``(name, kind, documented_as)`` for every name in its ``__all__``.

    ``documented_as`` is the full name of the entry that documents the object: the module's
    own (``stn_numpy.verify.golden.load_golden``), or that of an earlier page's module that
    exports the same object (``stn_numpy.verify.load_golden``). A module in ``__all__`` is
    documented by its own page.
    """
    modules = api_modules() if modules is None else modules
    seen: dict[int, str] = {}
    entries = {}
    for modname in modules:
        module = importlib.import_module(modname)
        rows = []
        for name in module.__all__:
            obj = getattr(module, name)
            kind = _kind(obj)
            if kind == "module":
                rows.append((name, kind, obj.__name__))
                continue
            full = f"{modname}.{name}"
            # Only objects that have an identity worth sharing (not ints or strings).
            key = id(obj) if kind != "data" else None
            owner = seen.get(key) if key is not None else None
            rows.append((name, kind, owner or full))
            if key is not None and owner is None:
                seen[key] = full
        entries[modname] = rows
    return entries


def _summary(obj) -> str:
    """The first paragraph of ``obj``'s docstring, on one line."""
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _short_repr(value) -> str | None:
    """``repr(value)`` if it is short and plain enough to show, else None."""
    text = repr(value)
    return text if len(text) <= 80 and "<" not in text and "`" not in text else None


def _data_summary(value) -> str:
    """What a public constant holds: its value when short, else its type and size."""
    text = _short_repr(value)
    if text is not None:
        return f"``{text}``"
    size = f" of {len(value)} entries" if hasattr(value, "__len__") else ""
    return f"a ``{type(value).__name__}``{size}"


_ROLES = {"module": "mod", "class": "class", "exception": "exc", "function": "func",
          "data": "data"}


def api_pages(modules=None) -> dict[str, str]:
    """The reST text of each API page, keyed by file name (``stn_numpy.verify.rst``)."""
    pages = {}
    for modname, rows in public_entries(modules).items():
        module = importlib.import_module(modname)
        title = f"``{modname}``"
        lines = [f".. _api-{modname}:", "", title, "=" * len(title), "",
                 f".. automodule:: {modname}", "   :no-members:", "",
                 f".. currentmodule:: {modname}", ""]
        # A table of every public name: the first paragraph of its docstring, linked to
        # its entry (below, or on the page that documents it).
        lines += [".. list-table::", "   :widths: 30 70", ""]
        for name, kind, doc in rows:
            target = doc if kind == "module" or doc != f"{modname}.{name}" else name
            obj = getattr(module, name)
            summary = _summary(obj) if kind != "data" else _data_summary(obj)
            lines += [f"   * - :{_ROLES[kind]}:`{name} <{target}>`", f"     - {summary}"]
        lines.append("")
        for name, kind, doc in rows:
            if kind == "module" or doc != f"{modname}.{name}":
                continue
            lines.append(f".. auto{kind}:: {name}")
            if kind in ("class", "exception"):
                lines.append("   :members:")
                if getattr(module, name).__bases__ != (object,):  # "Bases: object" says nothing
                    lines.append("   :show-inheritance:")
            if kind == "data" and _short_repr(getattr(module, name)) is None:
                lines.append("   :no-value:")
            lines.append("")
        pages[f"{modname}.rst"] = "\n".join(lines)
    return pages


def _help(argv: list[str]) -> str:
    from stn_numpy.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(argv)
    return out.getvalue()


def commands() -> list[str]:
    """The commands of ``stn-numpy``, read from its usage line (``{train,evaluate,...}``)."""
    usage = _help(["-h"])
    match = re.search(r"\{([\w,-]+)\}", usage)
    return match.group(1).split(",") if match else []


def cli_page() -> str:
    """The CLI reference (reST): ``stn-numpy -h`` and ``stn-numpy COMMAND -h``, verbatim."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"  # argparse wraps to the terminal; the page fits 80
    try:
        title = "Command line reference"
        lines = [".. _cli:", "", title, "=" * len(title), "",
                 "The help of ``stn-numpy`` and of each of its commands, as ``-h`` prints it "
                 "(generated from the argument parsers when the documentation is built).", ""]
        for argv in [[]] + [[c] for c in commands()]:
            heading = " ".join(["stn-numpy", *argv])
            lines += [f".. _cli-{'-'.join(argv) or 'main'}:", "", f"``{heading}``",
                      "-" * (len(heading) + 4), "", ".. code-block:: text", ""]
            lines += ["   " + line if line else "" for line in
                      _help([*argv, "-h"]).rstrip().splitlines()]
            lines.append("")
        return "\n".join(lines)
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _write(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")  # rewritten only when changed


def generate(docs) -> None:
    """Write the API and CLI pages into ``docs/api/generated``, removing stale ones."""
    folder = Path(docs) / GENERATED
    folder.mkdir(parents=True, exist_ok=True)
    pages = {**api_pages(), "cli.rst": cli_page()}
    for old in folder.glob("*.rst"):
        if old.name not in pages:
            old.unlink()
    for name, text in pages.items():
        _write(folder / name, text)


def missing_entries(documented) -> list[str]:
    """The public names with no entry among ``documented`` (full names of documented objects)."""
    return [f"{mod}.{name} (documented as {doc})"
            for mod, rows in public_entries().items()
            for name, _, doc in rows if doc not in documented]


def documented_objects() -> dict[int, str]:
    """The full name of the entry documenting each public object (and module), by ``id``."""
    found = {}
    for modname, rows in public_entries().items():
        module = importlib.import_module(modname)
        found.setdefault(id(module), modname)
        for name, kind, doc in rows:
            if kind != "data":
                found.setdefault(id(getattr(module, name)), doc)
    return found


def _resolve(target: str, context: list[str]) -> list | None:
    """The chain of objects a dotted ``target`` names, tried under each ``context`` prefix;
    for an attribute only instances have, the chain up to its class."""
    for prefix in context:
        parts = [p for p in f"{prefix}.{target}".split(".") if p]
        for i in range(len(parts), 0, -1):  # the longest importable module first
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            chain = [(".".join(parts[:i]), obj)]
            for part in parts[i:]:
                obj = getattr(obj, part, None)
                if obj is None:
                    break
                chain.append((part, obj))
            else:
                return chain
            if len(chain) == len(parts) - i and inspect.isclass(chain[-1][1]):
                return chain  # an attribute only instances have (``grads``): its class
            break
    return None


def _documented_names(chain, names) -> list[str]:
    """The names that may document the end of ``chain``, best first: the entry of its
    deepest documented object followed by the rest of the chain (``Layer.forward``), then
    that object's own entry (a property without a docstring has none); a module without
    a page stands for its nearest documented package."""
    for i in range(len(chain) - 1, -1, -1):
        obj = chain[i][1]
        rest = [p for p, _ in chain[i + 1:]]
        owner = names.get(id(obj))
        if owner is None and inspect.ismodule(obj) and not rest:
            parents = obj.__name__.split(".")
            owner = next((m for k in range(len(parents) - 1, 0, -1)
                          if (m := ".".join(parents[:k])) in names.values()), None)
        if owner is not None:
            return list(dict.fromkeys([".".join([owner, *rest]), owner]))
    return []


def _on_missing_reference(app, env, node, contnode):
    """Link a name a docstring uses where it is defined (``stn_numpy.grids.affine_grid``,
    ``build_model`` inside ``stn_numpy.models``, ``Linear`` anywhere) to the entry that
    documents the object (``stn_numpy.affine_grid``)."""
    if node.get("refdomain") != "py":
        return None
    module, cls = node.get("py:module") or "", node.get("py:class") or ""
    target = node["reftarget"].lstrip(".")
    context = list(dict.fromkeys([f"{module}.{cls}" if cls else module, module, ""]))
    names = env.stn_documented
    chain = _resolve(target, context)
    candidates = _documented_names(chain, names) if chain else []
    bare = {n for n in names.values() if n.endswith("." + target)}
    if len(bare) == 1:  # a bare name documented exactly once: ``Linear``
        candidates += bare
    py = env.get_domain("py")
    for full in candidates:
        found = py.resolve_any_xref(env, node["refdoc"], app.builder, full, node, contnode)
        if found:
            return found[0][1]
    return None


def _on_builder_inited(app) -> None:
    generate(app.confdir)
    app.env.stn_documented = documented_objects()


def _on_check_consistency(app, env) -> None:
    from sphinx.errors import SphinxError
    from sphinx.util import logging

    domain = env.get_domain("py")
    documented = {name for name, *_ in domain.get_objects()}
    missing = missing_entries(documented)
    if missing:
        message = "public names without an API entry: " + ", ".join(missing)
        logging.getLogger(__name__).warning(message, type="stn_docs", subtype="missing_entry")
        if not app.warningiserror:  # -W fails the build at its end; without it, fail here
            raise SphinxError(message)


def setup(app):
    app.connect("builder-inited", _on_builder_inited)
    app.connect("env-check-consistency", _on_check_consistency)
    app.connect("missing-reference", _on_missing_reference)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
