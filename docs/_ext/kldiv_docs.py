"""Sphinx extension: everything on the site that is generated rather than written.

The Markdown pages stay the source (they read well on GitHub too). While Sphinx
reads a page (the ``source-read`` event) this extension replaces a few
placeholders in it with generated Markdown, so that nothing on the site is
copied by hand:

``<!-- kldiv:autoall MODULE -->``
    one autodoc entry (``autofunction`` / ``autoclass`` / ``autodata``) for
    every name in ``MODULE.__all__``, in that order: new public names appear in
    the API reference without editing any page.
``<!-- kldiv:cli ARGS -->``
    the ``--help`` text of ``kldiv-spec ARGS``, from the command's own parsers.
``<!-- kldiv:example SCRIPT -->``
    runs ``examples/SCRIPT --quick --out DIR`` (DIR is in the build directory)
    and shows what it printed and the PNGs it saved; a script whose
    ``REQUIRES`` libraries are not installed is shown as not run, and so is
    every script when ``KLDIV_DOCS_EXAMPLES=0`` (tests/test_site.py: the
    examples have their own tests).
``<!-- kldiv:benchmark-results -->``
    every stored result in ``benchmarks/results/``: the CPU harness's tables
    and plots redrawn from its JSON with the harness's own functions, the GPU
    plot redrawn by ``benchmarks/plot_gpu.py``, and each other result's
    Markdown report.
the edge-value table of ``spec.md`` (between its ``edge-table`` markers)
    recomputed from PyTorch by ``docs/_tools/edge_table.py`` when PyTorch is
    installed; otherwise the stored table is shown, as committed.
the backend matrix of ``backends.md`` (between its ``backend-table`` markers)
    regenerated from the backend registry by ``docs/_tools/backend_table.py``.

Links from a page to files of the repository outside ``docs/`` (``../benchmarks/...``
from ``docs/``, ``../../examples/`` from ``docs/api/``) work on GitHub but not on
the site; they are rewritten to the repository's URL (``kldiv_repository_url``:
``blob/`` for a file, ``tree/`` for a folder). A relative link that stays inside
``docs/`` (``../vectors.md`` from ``docs/api/``) is left to MyST, which makes it a
link between pages. Generated files (PNGs) go to a folder of the build
directory, never into the source tree.

Broken links fail the build. Once the HTML pages are written (``build-finished``),
every link and asset of every page is checked, and each problem is a warning
(an error under ``-W``):

* a relative link whose file does not exist in the build, or whose ``#anchor``
  is no id of the page it names;
* a URL into the project's repository (the owner and name of
  ``kldiv_repository_url``) under ``blob/``, ``tree/`` or ``raw/`` whose path is
  not in the checkout (the folder above the documentation's source), or, for a
  Markdown file, whose ``#anchor`` is none of its headings (GitHub's slugs) and,
  for any file, whose ``#Lnn`` line is past its end;
* a script, stylesheet, preload or image loaded from the network (``http:``,
  ``https:`` or ``//``), and an ``@import`` or ``url()`` of a remote file in a
  stylesheet of ``_static/``: the site must work offline (MathJax is bundled by
  ``sphinx-mathjax-offline``).

Other external URLs are not fetched: the build needs no network.

Tables whose first two header cells read ``implementation`` and ``backend`` (the
conformance matrices) get the class ``kldiv-matrix``: ``_static/kldiv.css``
keeps their header and first column in view while they scroll, inside a box
no taller than the window, so that the horizontal scrollbar is always in reach.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import unquote, urlsplit

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util import logging

__all__ = ["setup"]

LOG = logging.getLogger(__name__)
DOCS = Path(__file__).resolve().parents[1]
ROOT = DOCS.parent
EXAMPLES = ROOT / "examples"
RESULTS = ROOT / "benchmarks" / "results"

PLACEHOLDER = re.compile(r"^<!-- kldiv:([\w-]+)(?:[ \t]+(.*?))?[ \t]*-->[ \t]*$", re.MULTILINE)
EDGE = re.compile(r"(<!-- edge-table:start -->\n)(.*?)(<!-- edge-table:end -->)", re.DOTALL)
# A Markdown link (not an image) with a path and an optional anchor.
RELATIVE_LINK = re.compile(r"(?<!!)(\[[^\]]*\])\(([^)\s#<>]+)(#[^)\s]*)?\)")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# A URL into a GitHub repository: owner, name, and what follows.
GITHUB = re.compile(r"^https://github\.com/([^/?#]+)/([^/?#]+)(/[^?#]*)?(?:\?[^#]*)?(?:#(.*))?$")
WARN_LINK: dict[str, Any] = {"type": "kldiv", "subtype": "link"}
LINE_ANCHOR = re.compile(r"^L(\d+)(?:C\d+)?(?:-L(\d+)(?:C\d+)?)?$")
REMOTE = re.compile(r"^(?:https?:)?//", re.IGNORECASE)
CSS_REMOTE = re.compile(r"(?:@import\s+|url\(\s*)['\"]?((?:https?:)?//[^'\")\s]+)", re.IGNORECASE)


# ----------------------------------------------------------------------------- helpers


def _load_script(path: Path) -> ModuleType:
    """Import a script of the source tree (not a package module) by its path."""
    name = f"_kldiv_docs_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _fence(text: str, info: str = "text") -> str:
    """Return ``text`` as a fenced block whose fence is longer than any run of backticks in it."""
    ticks = max([3, *(len(m) + 1 for m in re.findall(r"`{3,}", text))])
    return f"{'`' * ticks}{info}\n{text.rstrip()}\n{'`' * ticks}"


def _relative(target: Path, docname: str, srcdir: Path) -> str:
    """Return the path of ``target`` relative to the folder of document ``docname``."""
    folder = (srcdir / docname).parent
    return Path(os.path.relpath(target, folder)).as_posix()


def _missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _demoted(markdown: str, levels: int = 1) -> str:
    """Return Markdown with every ATX heading ``levels`` deeper (outside fenced blocks)."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,6} ", line):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out)


# ----------------------------------------------------------------------------- API reference


def _attribute_doc(module_name: str, name: str, obj: object) -> list[str]:
    """Return the ``#:`` comment documenting ``obj`` where it is defined, else nothing.

    The module re-exports the constant; the comment is in the module that assigns
    it, one of the package's modules already imported that holds the same object.
    """
    from sphinx.pycode import ModuleAnalyzer

    package = module_name.split(".")[0]
    others = sorted(m for m in sys.modules if m.startswith(f"{package}.") and m != module_name)
    candidates = [module_name, *others]
    for candidate in candidates:
        if getattr(sys.modules.get(candidate), name, None) is not obj:
            continue
        with contextlib.suppress(Exception):
            docs = ModuleAnalyzer.for_module(candidate).find_attr_docs()
            if ("", name) in docs:
                return [line for line in docs["", name] if line.strip()]
    return []


def autoall(module_name: str) -> str:
    """Return autodoc directives for every name in ``module_name.__all__``.

    Autodoc writes reStructuredText, so each directive is wrapped in MyST's
    ``eval-rst``. Constants are written as ``py:data`` with their value and the
    ``#:`` comment of their definition (autodoc would show ``tuple``'s docstring).
    """
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:  # kldiv_spec.torch without PyTorch
        LOG.warning("kldiv_docs: %s is not documented: %s", module_name, error)
        return f"*Not documented in this build: importing `{module_name}` failed ({error}).*"
    blocks = []
    for name in module.__all__:
        obj = getattr(module, name)
        target = f"{module_name}.{name}"
        if inspect.isclass(obj):
            rst = f".. autoclass:: {target}\n   :members:"
            if obj.__bases__ != (object,):
                rst += "\n   :show-inheritance:"
        elif callable(obj):
            rst = f".. autofunction:: {target}"
        else:
            value = repr(obj)
            rst = f".. py:data:: {name}\n   :module: {module_name}\n"
            if len(value) <= 120:
                rst += f"   :value: {value}\n"
            else:
                rst += f"   :type: {type(obj).__name__}\n"
            rst += "".join(f"\n   {line}" for line in _attribute_doc(module_name, name, obj))
        blocks.append(_fence(rst, "{eval-rst}"))
    return "\n\n".join(blocks)


# ----------------------------------------------------------------------------- CLI


def cli_help(args: str) -> str:
    """Return the ``--help`` output of ``kldiv-spec ARGS`` as a fenced block."""
    from kldiv_spec._cli import main

    argv = [*args.split(), "--help"]
    buffer = io.StringIO()
    saved = {k: os.environ.get(k) for k in ("COLUMNS", "NO_COLOR", "PYTHON_COLORS")}
    os.environ.update(COLUMNS="76", NO_COLOR="1", PYTHON_COLORS="0")
    try:
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            main(argv)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    text = buffer.getvalue()
    if not text.strip():
        msg = f"`kldiv-spec {' '.join(argv)}` printed nothing"
        raise RuntimeError(msg)
    return _fence(f"$ kldiv-spec {' '.join(argv)}\n{text}")


# ----------------------------------------------------------------------------- examples


def requires(script: Path) -> tuple[str, ...]:
    """Return the script's module-level ``REQUIRES`` tuple (read without importing it)."""
    for node in ast.parse(script.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "REQUIRES" for t in node.targets
        ):
            return tuple(ast.literal_eval(node.value))
    return ()


def example(script_name: str, out: Path, docname: str, srcdir: Path) -> str:
    """Run one example in quick mode and return its output and pictures as Markdown."""
    script = EXAMPLES / script_name
    if not script.is_file():
        msg = f"examples/{script_name} does not exist"
        raise FileNotFoundError(msg)
    command = f"python examples/{script_name} --quick"
    missing = _missing(requires(script))
    if missing:
        return (
            f"*Not run in this build: it needs {', '.join(missing)}, which is not installed.* "
            f"Run it with `{command}`."
        )
    if os.environ.get("KLDIV_DOCS_EXAMPLES", "1") == "0":
        return f"*Not run in this build (`KLDIV_DOCS_EXAMPLES=0`).* Run it with `{command}`."
    folder = out / script.stem
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(script), "--quick", "--out", str(folder)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        msg = f"examples/{script_name} --quick failed ({proc.returncode}):\n"
        msg += proc.stdout + proc.stderr
        raise RuntimeError(msg)
    parts = [f"Output of `{command}`:", _fence(proc.stdout.replace(str(folder), "OUT"))]
    for png in sorted(folder.glob("*.png")):
        alt = png.stem.replace("_", " ").replace("-", " ")
        parts.append(f"![{alt}]({_relative(png, docname, srcdir)})")
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- benchmarks


def _title(markdown: str, default: str) -> tuple[str, str]:
    """Split off a leading ``# title`` line; return (title, rest)."""
    lines = markdown.lstrip().splitlines()
    if lines and lines[0].startswith("# "):
        return lines[0][2:].strip(), "\n".join(lines[1:])
    return default, markdown


def benchmark_results(out: Path, docname: str, srcdir: Path) -> str:
    """Return every stored benchmark result as Markdown sections, with plots redrawn."""
    cpu_bench = _load_script(ROOT / "benchmarks" / "cpu_bench.py")
    plot_gpu = _load_script(ROOT / "benchmarks" / "plot_gpu.py")
    out.mkdir(parents=True, exist_ok=True)
    stems = sorted(
        {p.stem for p in RESULTS.glob("*.json")} | {p.stem for p in RESULTS.glob("*.md")}
    )
    sections = []
    for stem in stems:
        json_path, md_path = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
        result: dict[str, Any] = {}
        if json_path.is_file():
            result = json.loads(json_path.read_text(encoding="utf-8"))
        files = ", ".join(
            f"[`{p.name}`](../benchmarks/results/{p.name})"
            for p in sorted(RESULTS.glob(f"{stem}.*"))
        )
        body: list[str] = []
        picture: Callable[[Path], object] | None = None
        if "records" in result and "roofline" in result:  # benchmarks/cpu_bench.py
            title = f"CPU: {stem}" + (" (quick run)" if result.get("quick") else "")
            body.append(f"`{result.get('command', '')}`")
            body.append(_demoted(cpu_bench.markdown(result), 2))
            picture = lambda png, r=result: cpu_bench.plot(r, png)  # noqa: E731
        elif md_path.is_file():
            title, rest = _title(md_path.read_text(encoding="utf-8"), stem)
            title = f"{title} ({stem})"
            body.append(_demoted(rest, 1))
            if "copy_bandwidth_gbps" in result:  # benchmarks/gpu_bench.py
                picture = lambda png, r=result: plot_gpu.plot(r, png)  # noqa: E731
        else:
            title = stem
            body.append(_fence(json.dumps(result, indent=1)[:4000], "json"))
        png = out / f"{stem}.png"
        if picture is not None and picture(png) is not False and png.is_file():
            body.insert(0, f"![{stem}]({_relative(png, docname, srcdir)})")
        sections.append(f"## {title}\n\nStored as {files}.\n\n" + "\n\n".join(body))
    return "\n\n".join(sections)


# ----------------------------------------------------------------------------- tables


def edge_table(text: str) -> str:
    """Replace the stored edge-value table with PyTorch's, when PyTorch is installed."""
    if _missing(("torch",)):
        LOG.info("kldiv_docs: torch is not installed; the stored edge-value table is shown")
        return text
    tool = _load_script(DOCS / "_tools" / "edge_table.py")
    fresh = "\n".join(tool.table()) + "\n"
    match = EDGE.search(text)
    if match is None:
        LOG.warning("kldiv_docs: spec.md has no edge-table markers", type="kldiv", subtype="edge")
        return text
    if match.group(2).strip() != fresh.strip():
        LOG.warning(
            "kldiv_docs: the edge-value table of spec.md differs from PyTorch's; "
            "run python docs/_tools/edge_table.py and paste its output",
            type="kldiv",
            subtype="edge",
        )
    return text[: match.start(2)] + fresh + text[match.end(2) :]


def backend_table(text: str) -> str:
    """Replace the backend matrix with the one generated from the registry."""
    tool = _load_script(DOCS / "_tools" / "backend_table.py")
    return tool.replaced(text)


# ----------------------------------------------------------------------------- Sphinx glue


def _unfenced(text: str, change: Callable[[str], str]) -> str:
    """Return ``text`` with ``change`` applied to every part outside fenced code blocks."""
    parts: list[str] = []
    chunk: list[str] = []
    fence = ""
    for line in text.splitlines(keepends=True):
        opening = FENCE.match(line)
        if not fence and opening:
            parts += [change("".join(chunk)), line]
            chunk, fence = [], opening[1]
        elif fence:
            parts.append(line)
            closing = FENCE.match(line)
            # A closing fence: the same character, at least as long, nothing after it.
            if closing and closing[1][0] == fence[0] and len(closing[1]) >= len(fence):
                fence = "" if not line.strip().lstrip(fence[0]) else fence
        else:
            chunk.append(line)
    parts.append(change("".join(chunk)))
    return "".join(parts)


def outside_links(text: str, docname: str, srcdir: Path, base: str) -> str:
    """Rewrite the relative links of a page that leave the documentation to repository URLs.

    ``docname`` is the page's name (``api/cli``), ``srcdir`` the documentation's
    source folder, whose parent is the checkout, and ``base`` the repository's
    ``.../blob/BRANCH/`` URL. A link whose target stays under ``srcdir`` is kept
    (MyST resolves it); one that leaves it becomes ``base`` plus its path from the
    checkout (``tree/`` for a folder); one that leaves the checkout is kept as it is.
    Links in fenced code blocks are not touched.
    """
    folder = Path(os.path.normpath(srcdir / docname)).parent
    source = Path(os.path.normpath(srcdir))
    checkout = source.parent

    def rewrite(match: re.Match[str]) -> str:
        path = match[2]
        if ":" in path or path.startswith("/"):  # a URL (scheme:) or an absolute path
            return match[0]
        target = Path(os.path.normpath(folder / unquote(path)))
        if target == source or source in target.parents or checkout not in target.parents:
            return match[0]
        url = base
        if target.is_dir():
            url = re.sub(r"/blob/([^/]+)/$", r"/tree/\1/", base)
        return f"{match[1]}({url}{target.relative_to(checkout).as_posix()}{match[3] or ''})"

    return _unfenced(text, lambda chunk: RELATIVE_LINK.sub(rewrite, chunk))


# ----------------------------------------------------------------------------- link check


class _Page(HTMLParser):
    """The ids of an HTML page, and its links and loaded assets as ``(tag, attribute, URL)``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v for k, v in attrs if v is not None}
        if values.get("id"):
            self.ids.add(values["id"])
        if tag == "a" and values.get("name"):
            self.ids.add(values["name"])
        for key in ("href", "src"):
            if values.get(key) is not None:
                rel = values.get("rel", "").lower() if tag == "link" else ""
                self.links.append((f"{tag}[{rel}]" if rel else tag, key, values[key]))


def _parse_html(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8", errors="replace"))
    page.close()
    return page


def github_slug(heading: str) -> str:
    """Return the anchor GitHub gives a Markdown heading (its text, lowercased, dashed)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def markdown_anchors(text: str) -> set[str]:
    """Return the anchors of a Markdown file: its headings' slugs (``-1``... for repeats), ids."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    prose: list[str] = []  # the text outside fenced code blocks
    _unfenced(text, lambda chunk: prose.append(chunk) or chunk)
    for heading in re.findall(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", "".join(prose), re.M):
        slug = github_slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    found.update(re.findall(r"""<a\s[^>]*(?:name|id)=["']([^"']+)["']""", text))
    return found


def check_repository_url(url: str, repository: str, checkout: Path) -> str | None:
    """Return what is wrong with ``url``, a URL into ``repository``, or None.

    ``repository`` is ``https://github.com/OWNER/NAME``. Only ``blob/``, ``tree/``
    and ``raw/`` URLs name a file or folder; the others (issues, pulls, the
    repository's page) are not checked. The branch is not checked.
    """
    match, home = GITHUB.match(url), GITHUB.match(repository)
    if match is None or home is None or match.group(1, 2) != home.group(1, 2):
        return None
    rest, anchor = (match[3] or "").strip("/"), unquote(match[4] or "")
    kind, _, rest = rest.partition("/")
    if kind not in ("blob", "tree", "raw"):
        return None
    _branch, _, path = rest.partition("/")
    target = checkout / unquote(path) if path else checkout
    if not target.exists():
        return f"{unquote(path) or '.'} is not in the checkout"
    if kind == "tree" and not target.is_dir():
        return f"{path} is a file, not a folder (tree/ URL)"
    if not anchor or target.is_dir():
        return None
    text = target.read_text(encoding="utf-8", errors="replace")
    lines = LINE_ANCHOR.match(anchor)
    if lines is not None:
        last = max(int(n) for n in lines.groups() if n)
        count = len(text.splitlines())
        return None if last <= count else f"{path} has {count} lines, not {last}"
    if target.suffix.lower() in (".md", ".markdown") and anchor not in markdown_anchors(text):
        return f"{path} has no heading or anchor #{anchor}"
    return None


def _remote_asset(kind: str, key: str, url: str) -> bool:
    """Whether ``url`` is a resource the page loads (not a link to follow) from the network."""
    if not REMOTE.match(url):
        return False
    if kind in ("script", "img", "iframe", "source", "audio", "video", "embed"):
        return True
    rels = set(kind.partition("[")[2].rstrip("]").split())
    return kind.startswith("link") and bool(
        rels & {"stylesheet", "preload", "modulepreload", "icon", "prefetch"}
    )


def check_links(
    outdir: Path, pages: dict[str, Path], repository: str, checkout: Path
) -> list[tuple[str, str]]:
    """Return ``(page, problem)`` for every broken link and remote asset of the built site.

    ``pages`` maps each page's name to its HTML file under ``outdir``.
    """
    parsed: dict[Path, _Page] = {}

    def page_of(path: Path) -> _Page:
        if path not in parsed:
            parsed[path] = _parse_html(path)
        return parsed[path]

    problems: list[tuple[str, str]] = []
    for name, path in sorted(pages.items()):
        for kind, key, url in page_of(path).links:
            parts = urlsplit(url)
            if _remote_asset(kind, key, url):
                problems.append((name, f"loads {url} from the network ({kind} {key})"))
                continue
            if parts.scheme in ("http", "https"):
                wrong = check_repository_url(url, repository, checkout)
                if wrong:
                    problems.append((name, f"broken link {url}: {wrong}"))
                continue
            if parts.scheme or parts.netloc:
                continue  # mailto:, data:, javascript: ...
            target = (
                path
                if not parts.path
                else Path(os.path.normpath(path.parent / unquote(parts.path)))
            )
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                problems.append((name, f"broken link {url}: no such file in the build"))
                continue
            fragment = unquote(parts.fragment)
            if fragment and target.suffix == ".html" and fragment not in page_of(target).ids:
                problems.append((name, f"broken link {url}: no anchor #{fragment} there"))
    static = outdir / "_static"
    for css in sorted(static.rglob("*.css")) if static.is_dir() else []:
        text = css.read_text(encoding="utf-8", errors="replace")
        for url in CSS_REMOTE.findall(text):
            problems.append((css.relative_to(outdir).as_posix(), f"loads {url} from the network"))
    return problems


def _on_build_finished(app: Sphinx, exception: BaseException | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    if app.builder.name not in ("html", "dirhtml"):
        return
    builder = app.builder
    outdir = Path(builder.outdir)
    names = [*app.env.all_docs, "genindex", "py-modindex", "search"]
    pages = {n: Path(builder.get_outfilename(n)) for n in names}  # type: ignore[attr-defined]
    pages = {n: p for n, p in pages.items() if p.is_file()}
    home = GITHUB.match(app.config.kldiv_repository_url)
    repository = f"https://github.com/{home[1]}/{home[2]}" if home else ""
    checkout = Path(app.srcdir).resolve().parent
    for name, problem in check_links(outdir, pages, repository, checkout):
        if name in app.env.all_docs:  # the warning names the page's source
            LOG.warning("kldiv_docs: %s", problem, location=(name, None), **WARN_LINK)
        else:  # genindex, search, a stylesheet of _static/
            LOG.warning("kldiv_docs: %s: %s", name, problem, **WARN_LINK)


# ----------------------------------------------------------------------------- tables


def _mark_matrix_tables(app: Sphinx, doctree: nodes.document) -> None:
    """Give the conformance matrices' tables the class ``kldiv-matrix`` (see the CSS)."""
    for table in doctree.findall(nodes.table):
        head = next(iter(table.findall(nodes.thead)), None)
        row = next(iter(head.findall(nodes.row)), None) if head is not None else None
        cells = [entry.astext().strip() for entry in row.children] if row is not None else []
        if cells[:2] == ["implementation", "backend"]:
            table["classes"].append("kldiv-matrix")


def _on_source_read(app: Sphinx, docname: str, source: list[str]) -> None:
    text = source[0]
    out = Path(app.doctreedir) / "kldiv_generated"
    srcdir = Path(app.srcdir)
    doc_suffix = Path(app.env.doc2path(docname)).suffix
    doc = f"{docname}{doc_suffix}"
    if docname == "spec":
        text = edge_table(text)
    if docname == "backends":
        text = backend_table(text)

    def replace(match: re.Match[str]) -> str:
        kind, arg = match[1], (match[2] or "").strip()
        if kind == "autoall":
            return autoall(arg)
        if kind == "cli":
            return cli_help(arg)
        if kind == "example":
            app.env.note_dependency(str(EXAMPLES / arg))
            return example(arg, out / "examples", doc, srcdir)
        if kind == "benchmark-results":
            for path in RESULTS.glob("*"):
                app.env.note_dependency(str(path))
            return benchmark_results(out / "benchmarks", doc, srcdir)
        msg = f"{docname}: unknown placeholder kldiv:{kind}"
        raise ValueError(msg)

    text = PLACEHOLDER.sub(replace, text)
    source[0] = outside_links(text, docname, srcdir, app.config.kldiv_repository_url)


def setup(app: Sphinx) -> dict[str, Any]:
    """Register the handlers (placeholders, links, matrix tables) and ``kldiv_repository_url``."""
    app.add_config_value("kldiv_repository_url", "", "env", types=(str,))
    app.connect("source-read", _on_source_read)
    app.connect("doctree-read", _mark_matrix_tables)
    app.connect("build-finished", _on_build_finished)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
