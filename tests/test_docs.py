"""The documentation's code runs, and its edge-value table is what PyTorch gives.

Every fenced ```python block in ``docs/*.md`` is executed (the blocks of one
page in one subprocess, each block in a fresh namespace, warnings as errors);
a block importing a library that is not installed is skipped. The table
between the ``edge-table`` markers of ``docs/spec.md`` must be exactly what
``docs/_tools/edge_table.py`` prints, and that script must find kldiv-spec in
agreement with PyTorch.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
RUNNABLE_PAGES = [ROOT / "README.md", *PAGES]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)
IMPORT = re.compile(r"^(?:import|from)\s+([A-Za-z_][\w]*)", re.MULTILINE)
TABLE = re.compile(r"<!-- edge-table:start -->\n(.*?)<!-- edge-table:end -->", re.DOTALL)

# Runs the blocks given as JSON on stdin; prints one JSON result per block.
RUNNER = """
import importlib.util, json, sys, traceback
for source, modules in json.load(sys.stdin):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        print(json.dumps({"skipped": missing}))
        continue
    try:
        exec(compile(source, "<docs block>", "exec"), {"__name__": "__docs__"})
    except BaseException:
        print(json.dumps({"error": traceback.format_exc()}))
    else:
        print(json.dumps({"ok": True}))
"""


def python_blocks(page: Path) -> list[str]:
    """Return the source of every ```python block of a Markdown page."""
    return BLOCK.findall(page.read_text(encoding="utf-8"))


def test_every_page_is_found() -> None:
    names = {p.name for p in PAGES}
    assert {
        "index.md",
        "spec.md",
        "gradients.md",
        "accuracy.md",
        "backends.md",
        "usage.md",
    } <= names


@pytest.mark.parametrize(
    "page", [p for p in RUNNABLE_PAGES if python_blocks(p)], ids=lambda p: p.name
)
def test_python_blocks_run(page: Path) -> None:
    blocks = python_blocks(page)
    payload = json.dumps([(src, sorted(set(IMPORT.findall(src)))) for src in blocks])
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", RUNNER],
        input=payload,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(blocks), proc.stdout + proc.stderr
    errors = [
        f"block {i + 1}:\n{blocks[i]}\n{r['error']}" for i, r in enumerate(results) if "error" in r
    ]
    assert not errors, "\n".join(errors)
    if all("skipped" in r for r in results):
        pytest.skip(f"every block needs a missing library: {results}")


def slug(heading: str) -> str:
    """Return the anchor GitHub (and MyST's heading anchors) give a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.MULTILINE)
    return {slug(h) for h in headings}


def test_links_between_pages_resolve() -> None:
    link = re.compile(r"\]\(([\w-]+\.md)(?:#([\w-]+))?\)")
    broken = []
    for page in PAGES:
        for target, anchor in link.findall(page.read_text(encoding="utf-8")):
            if not (DOCS / target).is_file():
                broken.append(f"{page.name} -> {target}")
            elif anchor and anchor not in anchors(DOCS / target):
                broken.append(f"{page.name} -> {target}#{anchor}")
    assert not broken


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_edge_table_is_current_and_agrees_with_torch() -> None:
    proc = subprocess.run(
        [sys.executable, str(DOCS / "_tools" / "edge_table.py")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "MISMATCH" not in proc.stderr
    documented = TABLE.search((DOCS / "spec.md").read_text(encoding="utf-8"))
    assert documented is not None, "docs/spec.md lost its edge-table markers"
    assert documented.group(1).strip() == proc.stdout.strip()


@pytest.mark.skipif(importlib.util.find_spec("mpmath") is None, reason="mpmath is not installed")
def test_accuracy_tool_smoke_run_stays_within_the_documented_bound() -> None:
    proc = subprocess.run(
        [sys.executable, str(DOCS / "_tools" / "accuracy.py"), "--quick"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [
        line for line in proc.stdout.splitlines() if line.startswith("| ") and "u M" not in line
    ]
    assert len(rows) >= 4 * 4  # two dtypes x two target forms x at least four input families
    sum_errors = [float(row.strip("| ").split(" | ")[-1]) for row in rows]
    assert max(sum_errors) <= 4.0  # a small multiple of u * M (docs/accuracy.md)
