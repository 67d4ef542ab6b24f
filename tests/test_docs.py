"""Tests for the README and the documentation pages: the README stays short, and its
relative links lead somewhere."""

import re
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[1]
README_LIMIT = 12_000  # characters: a README a newcomer reads in five minutes

# Markdown links and images, [text](target) and ![alt](target), and HTML src/href.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"
                   r"|(?:src|href)=\"([^\"]+)\"")


def relative_links(text: str) -> list[str]:
    """Every link target in markdown ``text`` that is a path, not a URL or an anchor."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code is not a link
    targets = [a or b for a, b in _LINK.findall(text)]
    return [t for t in targets
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I) and not t.startswith("#")]


def test_readme_is_at_most_12000_characters():
    n = len((REPO / "README.md").read_text(encoding="utf-8"))
    assert n <= README_LIMIT, f"README.md has {n} characters, expected at most {README_LIMIT}"


def test_every_relative_link_in_the_readme_points_at_a_file_that_exists():
    links = relative_links((REPO / "README.md").read_text(encoding="utf-8"))
    assert links, "expected the README to link into the repository"
    missing = [t for t in links if not (REPO / unquote(t.split("#")[0])).exists()]
    assert not missing, f"README.md links to missing paths: {missing}"


def test_ci_runs_the_readmes_test_and_docs_commands_exactly():
    readme = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for extra in ("test", "docs"):
        commands = [line.strip() for line in readme
                    if line.strip().startswith(f'pip install -e ".[{extra}]" && ')]
        assert len(commands) == 1, f"expected one {extra} command in the README: {commands}"
        assert commands[0] in ci, f".ci/run does not run the README's {commands[0]!r}"


def test_relative_links_finds_paths_and_skips_urls_anchors_and_code():
    text = ('[a](docs/a.md) ![b](img/b.png "title") [c](https://x.org) [d](#top)\n'
            '[e](docs/e.md#part) <img src="f.png"> [m](mailto:x@y.z)\n'
            "```\n[g](not/a/link.md)\n```\n")
    assert relative_links(text) == ["docs/a.md", "img/b.png", "docs/e.md#part", "f.png"]


# --------------------------------------------------------------------------------------
# The generated reference pages (docs/_ext/stn_docs.py; Sphinx is not needed for these)
# --------------------------------------------------------------------------------------

def _stn_docs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("stn_docs", REPO / "docs/_ext/stn_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_public_name_has_an_api_entry():
    import importlib

    stn_docs = _stn_docs()
    pages = stn_docs.api_pages()
    documented = set()
    for modname, rows in stn_docs.public_entries().items():
        page = pages[f"{modname}.rst"]
        for name, kind, doc in rows:
            if kind == "module":
                assert f"{name}.rst" in pages or f"{doc}.rst" in pages, (modname, name)
            elif doc == f"{modname}.{name}":
                assert f".. auto{kind}:: {name}\n" in page, (modname, name)
                documented.add(doc)
            else:  # documented on an earlier page, linked from this one
                assert f"<{doc}>`" in page, (modname, name)
    for modname in ["stn_numpy", "stn_numpy.verify", "stn_numpy.layers", "stn_numpy.models",
                    "stn_numpy.optim"]:
        module = importlib.import_module(modname)
        for name in module.__all__:
            assert any(doc.endswith(f".{name}") for doc in documented) or (
                importlib.import_module("inspect").ismodule(getattr(module, name))), name
    assert stn_docs.missing_entries(documented | set(stn_docs.api_modules())) == []


def test_a_new_public_name_gets_an_entry_without_editing_the_docs(monkeypatch):
    import types

    import stn_numpy

    def similarity_grid(theta, size):
        """A grid from a similarity transform."""

    submodule = types.ModuleType("stn_numpy.volumes")
    submodule.__all__ = []
    monkeypatch.setattr(stn_numpy, "similarity_grid", similarity_grid, raising=False)
    monkeypatch.setattr(stn_numpy, "volumes", submodule, raising=False)
    monkeypatch.setitem(__import__("sys").modules, "stn_numpy.volumes", submodule)
    monkeypatch.setattr(stn_numpy, "__all__", [*stn_numpy.__all__, "similarity_grid",
                                                "volumes"])
    stn_docs = _stn_docs()
    pages = stn_docs.api_pages()
    assert ".. autofunction:: similarity_grid\n" in pages["stn_numpy.rst"]
    assert "A grid from a similarity transform." in pages["stn_numpy.rst"]
    assert "stn_numpy.volumes.rst" in pages
    # and a build that failed to document it would fail
    assert "stn_numpy.similarity_grid (documented as stn_numpy.similarity_grid)" in (
        stn_docs.missing_entries(set()))


def test_cli_page_is_every_commands_help():
    stn_docs = _stn_docs()
    commands = stn_docs.commands()
    assert {"train", "evaluate", "experiment", "bench", "verify"} <= set(commands)
    page = stn_docs.cli_page()
    for command in commands:
        assert f"``stn-numpy {command}``" in page
        assert f"usage: stn-numpy {command}" in page
    assert "--loc-lr-scale" in page and "--atlas" in page  # train's and verify's own options
