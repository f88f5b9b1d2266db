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

Links from a page to files of the repository outside ``docs/`` (``../benchmarks/...``)
work on GitHub but not on the site; they are rewritten to the repository's
URL (``kldiv_repository_url``). Generated files (PNGs) go to a folder of the
build directory, never into the source tree.
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
from pathlib import Path
from types import ModuleType
from typing import Any

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
# A Markdown link (not an image) to a file of the repository outside docs/.
OUTSIDE_LINK = re.compile(r"(?<!!)(\[[^\]]*\])\(\.\./([^)\s#]+)(#[^)\s]*)?\)")


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
    return tool._replaced(text)


# ----------------------------------------------------------------------------- Sphinx glue


def _outside_links(text: str, base: str) -> str:
    return OUTSIDE_LINK.sub(lambda m: f"{m[1]}({base}{m[2]}{m[3] or ''})", text)


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
    source[0] = _outside_links(text, app.config.kldiv_repository_url)


def setup(app: Sphinx) -> dict[str, Any]:
    """Register the ``source-read`` handler and the ``kldiv_repository_url`` setting."""
    app.add_config_value("kldiv_repository_url", "", "env", types=(str,))
    app.connect("source-read", _on_source_read)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
