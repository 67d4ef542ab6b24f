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


def test_relative_links_finds_paths_and_skips_urls_anchors_and_code():
    text = ('[a](docs/a.md) ![b](img/b.png "title") [c](https://x.org) [d](#top)\n'
            '[e](docs/e.md#part) <img src="f.png"> [m](mailto:x@y.z)\n'
            "```\n[g](not/a/link.md)\n```\n")
    assert relative_links(text) == ["docs/a.md", "img/b.png", "docs/e.md#part", "f.png"]
