"""Sphinx configuration of the kldiv-spec site (``nox -s docs`` builds it into build/docs/).

Why Sphinx with MyST and numpydoc: it is what NumPy, SciPy, scikit-learn,
pandas, CuPy and most of the scientific-Python ecosystem use, so readers find
the layout they know (the PyData theme) and the docstrings are already written
in numpydoc's format. MyST keeps the pages as Markdown, readable on GitHub and
checked by ``tests/test_docs.py`` as they are; autodoc builds the API reference
from the docstrings, ``sphinx.ext.doctest`` runs their examples, and a small
local extension (``docs/_ext/kldiv_docs.py``) generates every table, plot,
command-line help text and example output from the code and the stored results.

The build needs no network, and neither does the site: no intersphinx (the
references to NumPy, PyTorch, JAX and Dask objects stay plain text, see
``nitpick_ignore_regex``), no remote images, the theme's assets are bundled, and
so is MathJax (``sphinx-mathjax-offline`` copies MathJax 3 into ``_static/mathjax``):
the formulas render from a copy of the site opened as files, behind a firewall or
offline. Warnings are errors (``-W --keep-going``), every cross-reference must
resolve (``-n``), and ``kldiv_docs`` fails the build on a broken link (between
pages, to an anchor, or to a file of this repository that the checkout lacks) and
on any script or stylesheet loaded from the network.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from sphinx.application import Sphinx

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))

import kldiv_spec  # noqa: E402

project = "kldiv-spec"
author = "kldiv-spec developers"
copyright = "kldiv-spec developers"
release = version = kldiv_spec.__version__

_urls = re.search(
    r'Documentation\s*=\s*"(https://github\.com/[^/"]+/[^/"]+)',
    (ROOT / "pyproject.toml").read_text(encoding="utf-8"),
)
repository = _urls[1] if _urls else "https://github.com/kldiv-spec/kldiv-spec"
kldiv_repository_url = f"{repository}/blob/main/"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",
    "numpydoc",
    "kldiv_docs",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_tools", "_ext", "README.md", "**/README.md"]
templates_path: list[str] = []

# MyST: $math$ and $$math$$ as on GitHub; heading anchors for links like spec.md#edge-values.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 4
myst_dmath_double_inline = True

# API reference: numpydoc renders the docstrings' sections; the signatures keep no type
# hints (they are stated, in words, under Parameters and Returns).
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_default_options = {"exclude-members": "__init__, __weakref__"}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()

# Every reference must resolve (-n), except to the array libraries' own objects: without
# intersphinx (the build is offline) they cannot, and they are plain names to the reader.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(numpy|np|torch|jax|jnp|dask|cupy|array_api_strict|hypothesis)(\..*)?"),
]

# Math: MathJax 3 from the site's own _static/mathjax/ (sphinx-mathjax-offline ships it),
# never from a CDN. Its SVG output needs no web fonts, which a browser may refuse to load
# for a page opened as a file; the TeX extensions it loads on demand are local scripts.
# sphinx-mathjax-offline sets its own mathjax_path (CHTML) when it loads: setup() below
# puts this one back.
mathjax_path = "mathjax/tex-svg.js"

# Docstring examples run as doctests (sphinx-build -b doctest), with the same warnings policy.
doctest_global_setup = "import warnings\nwarnings.simplefilter('error')\n"
doctest_test_doctest_blocks = "default"

html_theme = "pydata_sphinx_theme"
html_title = f"kldiv-spec {release}"
# kldiv.css: the conformance matrices' sticky header and first column (kldiv_docs marks them).
html_static_path = ["_static"]
html_css_files = ["kldiv.css"]
html_show_sourcelink = False
html_theme_options = {
    "github_url": repository,
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "header_links_before_dropdown": 4,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": [],
}
# The section navigation only where there are sections (the API reference); elsewhere
# the page gets the width (the examples' outputs and the benchmark tables are wide).
html_sidebars = {"*": [], "api/*": ["sidebar-nav-bs"]}
html_context = {"default_mode": "light"}


def setup(app: Sphinx) -> None:
    """Load MathJax from ``mathjax_path`` above (sphinx-mathjax-offline's setup sets its own)."""
    app.config.mathjax_path = mathjax_path
