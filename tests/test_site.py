"""The documentation site builds cleanly, its links resolve, and it works offline.

Builds the site once into a temporary folder as ``nox -s docs`` does (Sphinx,
warnings as errors, nitpicky references), but without running the examples
(``KLDIV_DOCS_EXAMPLES=0``: tests/test_examples.py runs them), then runs the
docstrings' examples with Sphinx's doctest builder. The build itself fails on a
broken link (docs/_ext/kldiv_docs.py); a tiny project built with the same
extension shows that it does. The built HTML loads no script or stylesheet from
the network, and where a headless Chromium is installed,
``docs/_tools/check_offline_math.py`` opens the pages with formulas with the
network off and checks that MathJax rendered them. Skipped where Sphinx and the
site's extensions are not installed (the ``docs`` extra). About 45 s of CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NEEDS = ("sphinx", "myst_parser", "numpydoc", "pydata_sphinx_theme", "sphinx-mathjax-offline")
REPOSITORY = "https://github.com/kldiv-spec/kldiv-spec"

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in NEEDS),
    reason="the docs extra (sphinx, myst-parser, numpydoc, pydata-sphinx-theme, "
    "sphinx-mathjax-offline) is not installed",
)


class _Page(HTMLParser):
    """Collect the ids and the link targets (href, src) of one HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.scripts: list[str] = []
        self.stylesheets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(str(values["id"]))
        if tag == "a" and values.get("name"):
            self.ids.add(str(values["name"]))
        for key in ("href", "src"):
            if values.get(key) and tag in ("a", "img", "link", "script"):
                self.links.append(str(values[key]))
        if tag == "script" and values.get("src"):
            self.scripts.append(str(values["src"]))
        if tag == "link" and "stylesheet" in str(values.get("rel", "")).split():
            self.stylesheets.append(str(values.get("href", "")))


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _sphinx(
    builder: str, out: Path, doctrees: Path, source: Path = DOCS
) -> subprocess.CompletedProcess[str]:
    options = ("-n", "-W", "--keep-going", "-q", "-d", str(doctrees))
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", builder, *options, str(source), str(out)],
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


def _pages(html: Path) -> dict[Path, _Page]:
    return {p: _parse(p) for p in html.rglob("*.html") if "_static" not in p.parts}


def test_no_script_or_stylesheet_comes_from_the_network(site: Path) -> None:
    html = site / "html"
    remote = re.compile(r"^(?:https?:)?//", re.IGNORECASE)
    found = [
        f"{page.relative_to(html)}: {url}"
        for page, parsed in _pages(html).items()
        for url in parsed.scripts + parsed.stylesheets
        if remote.match(url)
    ]
    css_import = re.compile(r"(?:@import\s+|url\(\s*)['\"]?(?:https?:)?//", re.IGNORECASE)
    found += [
        str(css.relative_to(html))
        for css in (html / "_static").rglob("*.css")
        if css_import.search(css.read_text(encoding="utf-8", errors="replace"))
    ]
    assert not found, "\n".join(found)


def test_mathjax_is_bundled_with_the_site(site: Path) -> None:
    html = site / "html"
    scripts = _parse(html / "spec.html").scripts
    mathjax = [s for s in scripts if "mathjax" in s.lower()]
    assert mathjax == ["_static/mathjax/tex-svg.js"], scripts
    assert (html / "_static" / "mathjax" / "tex-svg.js").is_file()
    # What tex-svg.js loads on demand (autoload) is there too.
    assert (html / "_static" / "mathjax" / "input" / "tex" / "extensions").is_dir()


def test_links_from_the_api_pages_to_other_pages_stay_on_the_site(site: Path) -> None:
    links = _parse(site / "html" / "api" / "cli.html").links
    assert "../vectors.html" in links
    assert not [link for link in links if link.startswith(f"{REPOSITORY}/blob/main/vectors")]


def test_the_conformance_matrices_keep_their_first_column_in_view(site: Path) -> None:
    html = site / "html"
    css = (html / "_static" / "kldiv.css").read_text(encoding="utf-8")
    assert "position: sticky" in css and "table.kldiv-matrix" in css
    for name in ("conformance-matrix.html", "conformance-peers.html"):
        text = (html / name).read_text(encoding="utf-8")
        assert re.search(r'<table class="[^"]*\bkldiv-matrix\b', text), name
        assert "_static/kldiv.css" in text, name


# ----------------------------------------------------------------------------- broken links

_CONF = """
import sys
sys.path.insert(0, {ext!r})
extensions = ["myst_parser", "kldiv_docs"]
kldiv_repository_url = "{repository}/blob/main/"
html_theme = "basic"
myst_heading_anchors = 3
"""

_GOOD = f"""
[a section](other.md#a-section), [a file](../present.py#L2), [a folder](../folder/),
[a heading]({REPOSITORY}/blob/main/notes.md#a-heading), [an issue]({REPOSITORY}/issues/1),
[elsewhere](https://example.org/not/checked), <a href="other.html#a-section">raw</a>
"""

# Each broken link, and the words of the warning that must name it.
_BROKEN = {
    '<a href="missing.html">raw</a>': "missing.html: no such file in the build",
    '<a href="other.html#no-such-anchor">raw</a>': "no anchor #no-such-anchor",
    "[gone](../gone.py)": "gone.py is not in the checkout",
    f"[gone]({REPOSITORY}/tree/main/no-such-folder)": "no-such-folder is not in the checkout",
    f"[heading]({REPOSITORY}/blob/main/notes.md#no-such-heading)": "no heading or anchor",
    f"[line]({REPOSITORY}/blob/main/present.py#L99)": "has 3 lines, not 99",
    '<script src="https://cdn.example.org/lib.js"></script>': "loads https://cdn.example.org",
}


def _tiny_project(base: Path, extra: str) -> Path:
    """Write a checkout with a docs/ folder built with kldiv_docs; return docs/."""
    docs = base / "docs"
    (docs / "api").mkdir(parents=True)
    (base / "folder").mkdir()
    (base / "folder" / "file.txt").write_text("x\n")
    (base / "present.py").write_text("a = 1\nb = 2\nc = 3\n")
    (base / "notes.md").write_text("# Notes\n\n## A heading\n\ntext\n")
    conf = _CONF.format(ext=str(DOCS / "_ext"), repository=REPOSITORY)
    (docs / "conf.py").write_text(conf)
    index = "# Home\n\n```{toctree}\nother\napi/page\n```\n" + _GOOD + "\n" + extra + "\n"
    (docs / "index.md").write_text(index)
    (docs / "other.md").write_text("# Other\n\n## A section\n\ntext\n")
    # A link up out of docs/api/ that stays in the docs: a link between pages.
    (docs / "api" / "page.md").write_text("# Page\n\n[other](../other.md#a-section)\n")
    return docs


def test_good_links_build_cleanly(tmp_path: Path) -> None:
    docs = _tiny_project(tmp_path, "")
    proc = _sphinx("html", tmp_path / "html", tmp_path / "doctrees", docs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    links = _parse(tmp_path / "html" / "api" / "page.html").links
    assert "../other.html#a-section" in links
    index = _parse(tmp_path / "html" / "index.html").links
    assert f"{REPOSITORY}/blob/main/present.py#L2" in index
    assert f"{REPOSITORY}/tree/main/folder" in index


def test_a_broken_link_fails_the_build(tmp_path: Path) -> None:
    docs = _tiny_project(tmp_path, "\n\n".join(_BROKEN))
    proc = _sphinx("html", tmp_path / "html", tmp_path / "doctrees", docs)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    missing = [words for words in _BROKEN.values() if words not in output]
    assert not missing, output


def test_a_broken_link_between_pages_fails_the_build(tmp_path: Path) -> None:
    docs = _tiny_project(tmp_path, "[nowhere](no-such-page.md)")
    proc = _sphinx("html", tmp_path / "html", tmp_path / "doctrees", docs)
    assert proc.returncode != 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- browser


def _offline_math_tool() -> ModuleType:
    path = DOCS / "_tools" / "check_offline_math.py"
    spec = importlib.util.spec_from_file_location("_check_offline_math", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_math_renders_offline_in_a_headless_browser(site: Path) -> None:
    tool = _offline_math_tool()
    if tool.find_browser() is None:
        pytest.skip(
            "no headless Chromium found (apt-get install chromium-headless-shell, "
            "or set KLDIV_BROWSER): the offline math check did not run"
        )
    proc = subprocess.run(
        [sys.executable, str(DOCS / "_tools" / "check_offline_math.py"), str(site / "html")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok   spec.html" in proc.stdout, proc.stdout
