"""Sphinx configuration of the stn-numpy documentation (see README.md here for the build)."""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path[:0] = [str(DOCS.parent), str(DOCS / "_ext")]  # this checkout's stn_numpy first

import stn_numpy  # noqa: E402

project = "stn-numpy"
author = "The stn-numpy developers"
copyright = "2026, The stn-numpy developers"
release = version = stn_numpy.__version__

extensions = [
    "myst_nb",  # Markdown (MyST) pages and notebooks; brings myst_parser
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
    "stn_docs",  # the API and CLI pages, and the check that every public name has an entry
]

# The source folder is the repository's root, so that links from these pages to
# ../notebooks/ resolve in the site as they do on GitHub; only these files are read.
root_doc = "docs/index"
include_patterns = ["docs/**.md", "docs/**.rst", "notebooks/*.ipynb", "notebooks/README.md",
                    "notebooks/experiment/results.md", "data/README.md"]
exclude_patterns = ["docs/_build", "docs/README.md", "**/.ipynb_checkpoints", ".git",
                    "runs", "data/mnist"]
html_extra_path = ["_root"]  # index.html at the site's root, forwarding to docs/index.html

# Markdown: $...$ and $$...$$ maths (the notebooks use them), ::: fences, heading anchors.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# Notebooks render with the outputs they were committed with: never executed here.
nb_execution_mode = "off"
nb_merge_streams = True

# API reference: autodoc reads the docstrings, numpydoc renders their sections.
autodoc_typehints = "none"  # the numpydoc Parameters section says the types and shapes
autodoc_member_order = "bysource"
numpydoc_show_class_members = False
numpydoc_xref_param_type = False

html_theme = "pydata_sphinx_theme"
html_title = f"stn-numpy {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "navbar_align": "left",
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
    "secondary_sidebar_items": ["page-toc"],
}
html_show_sourcelink = False
html_copy_source = False
