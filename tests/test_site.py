"""The documentation site builds cleanly and every internal link in it resolves.

Builds the site once into a temporary folder as ``nox -s docs`` does (Sphinx,
warnings as errors, nitpicky references), but without running the examples
(``KLDIV_DOCS_EXAMPLES=0``: tests/test_examples.py runs them), then runs the
docstrings' examples with Sphinx's doctest builder. Skipped where Sphinx and
the site's extensions are not installed (the ``docs`` extra). About 25 s of CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NEEDS = ("sphinx", "myst_parser", "numpydoc", "pydata_sphinx_theme")

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in NEEDS),
    reason="the docs extra (sphinx, myst-parser, numpydoc, pydata-sphinx-theme) is not installed",
)


class _Page(HTMLParser):
    """Collect the ids and the link targets (href, src) of one HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(str(values["id"]))
        if tag == "a" and values.get("name"):
            self.ids.add(str(values["name"]))
        for key in ("href", "src"):
            if values.get(key) and tag in ("a", "img", "link", "script"):
                self.links.append(str(values[key]))


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _sphinx(builder: str, out: Path, doctrees: Path) -> subprocess.CompletedProcess[str]:
    options = ("-n", "-W", "--keep-going", "-q", "-d", str(doctrees))
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", builder, *options, str(DOCS), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "KLDIV_DOCS_EXAMPLES": "0", "MPLBACKEND": "Agg"},
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("site")
    proc = _sphinx("html", base / "html", base / "doctrees")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return base


def test_site_builds_without_warnings(site: Path) -> None:
    assert (site / "html" / "index.html").is_file()


def test_docstring_examples_pass_as_doctests(site: Path) -> None:
    proc = _sphinx("doctest", site / "doctest", site / "doctrees")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 failures in tests" in (site / "doctest" / "output.txt").read_text()


def test_every_internal_link_resolves(site: Path) -> None:
    html = site / "html"
    # The site's pages; _static/ holds the theme's template fragments, not pages.
    pages = {p: _parse(p) for p in html.rglob("*.html") if "_static" not in p.parts}
    broken = []
    for page, parsed in pages.items():
        for link in parsed.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc:
                continue  # external: not checked (the build is offline)
            target = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{page.relative_to(html)} -> {link}")
                continue
            fragment = unquote(parts.fragment)
            if fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if fragment not in ids:
                    broken.append(f"{page.relative_to(html)} -> {link} (no such anchor)")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("module", ["kldiv_spec", "kldiv_spec.torch", "kldiv_spec.conformance"])
def test_api_reference_lists_every_public_name(site: Path, module: str) -> None:
    if module == "kldiv_spec.torch" and importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    page = site / "html" / "api" / f"{module.removeprefix('kldiv_spec.')}.html"
    ids = _parse(page).ids
    missing = [n for n in importlib.import_module(module).__all__ if f"{module}.{n}" not in ids]
    assert not missing


def test_generated_pages_hold_generated_content(site: Path) -> None:
    html = site / "html"
    cli = (html / "api" / "cli.html").read_text(encoding="utf-8")
    assert "usage: kldiv-spec check" in cli
    assert "kldiv-spec vectors export" in cli
    backends = (html / "backends.html").read_text(encoding="utf-8")
    assert "kldiv_spec.backends.numpy" in backends
    results = (html / "benchmark-results.html").read_text(encoding="utf-8")
    assert results.count("<img") >= 1
    gallery = (html / "gallery.html").read_text(encoding="utf-8")
    assert "KLDIV_DOCS_EXAMPLES=0" in gallery or "needs torch" in gallery
