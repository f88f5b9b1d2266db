r"""Check in a headless browser that the site's formulas render with the network off.

Opens pages of a built site as ``file://`` URLs (no server) in headless Chromium,
with no network: inside a network namespace of its own where ``unshare`` can make
one, and always with every host name unresolvable and a proxy that refuses every
connection. After MathJax has run, the page's DOM must hold:

* at least one ``mjx-container`` (the rendered formula), and one for every
  ``span.math`` / ``div.math`` that Sphinx wrote;
* no raw TeX left in those elements (``\(``, ``\)``, ``\[``, ``\]``) and no
  MathJax error node (``merror``).

And the browser must not have requested anything from the network (no
``http(s)://`` or ``ws(s)://`` URL in its network log, ``--log-net-log``).

Usage::

    python docs/_tools/check_offline_math.py build/docs/html            # every page with math
    python docs/_tools/check_offline_math.py build/docs/html --page spec.html
    python docs/_tools/check_offline_math.py /tmp/site --build          # build docs/ there first

The browser is ``$KLDIV_BROWSER`` or the first of ``chromium-headless-shell``,
``chromium``, ``chromium-browser``, ``google-chrome`` found on the ``PATH`` (Debian:
``apt-get install chromium-headless-shell``). Exit status: 0 when every page
passes, 1 when one fails, 2 when no browser is found.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

__all__ = ["BROWSERS", "check_page", "find_browser", "main", "math_pages"]

ROOT = Path(__file__).resolve().parents[2]
#: Browser executables tried, in this order, after ``$KLDIV_BROWSER``.
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
RAW_TEX = re.compile(r"\\[()\[\]]")
NETWORK_URL = re.compile(r'"url":\s*"((?:https?|wss?)://[^"]*)"')


def find_browser() -> str | None:
    """Return the path of a headless-capable Chromium, or None."""
    wanted = os.environ.get("KLDIV_BROWSER")
    if wanted:
        return shutil.which(wanted) or (wanted if Path(wanted).is_file() else None)
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


@functools.cache
def _isolated() -> tuple[str, ...]:
    """Return a command prefix running a program without any network, or () where none works."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for prefix in ((unshare, "--net"), (unshare, "--map-root-user", "--net")):
        try:
            proc = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if proc.returncode == 0:
            return prefix
    return ()


class _MathDom(HTMLParser):
    """Count Sphinx's math elements and MathJax's output; collect raw TeX left outside it."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.math = 0
        self.containers = 0
        self.errors = 0
        self.raw: list[str] = []
        self._stack: list[tuple[str, bool, bool]] = []  # (tag, in math, in mjx-container)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        in_math, in_mjx = self._stack[-1][1:] if self._stack else (False, False)
        if tag in ("span", "div") and "math" in values.get("class", "").split():
            self.math += 1
            in_math = True
        if tag == "mjx-container":
            self.containers += 1
            in_mjx = True
        if tag == "mjx-merror" or values.get("data-mml-node") == "merror":
            self.errors += 1
        if "data-mjx-error" in values:
            self.errors += 1
        if tag not in ("br", "img", "input", "link", "meta", "hr", "wbr", "col"):
            self._stack.append((tag, in_math, in_mjx))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if self._stack and self._stack[-1][0] == tag:
            self._stack.pop()

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                del self._stack[i:]
                break

    def handle_data(self, data: str) -> None:
        if self._stack and self._stack[-1][1] and not self._stack[-1][2] and RAW_TEX.search(data):
            self.raw.append(data.strip()[:80])


def check_page(browser: str, page: Path, *, timeout: float = 120) -> list[str]:
    """Open ``page`` with the network off; return what is wrong (empty when math rendered)."""
    with tempfile.TemporaryDirectory(prefix="kldiv-browser-") as profile:
        command = [
            *_isolated(),
            browser,
            *(["--headless"] if "headless-shell" not in Path(browser).name else []),
            "--no-sandbox",  # as root, and in the namespace, Chromium's sandbox cannot start
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--proxy-server=127.0.0.1:9",
            "--allow-file-access-from-files",
            f"--user-data-dir={profile}",
            f"--log-net-log={Path(profile) / 'net-log.json'}",
            "--virtual-time-budget=30000",
            "--dump-dom",
            page.resolve().as_uri(),
        ]
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
        log = Path(profile) / "net-log.json"
        requested = NETWORK_URL.findall(log.read_text(errors="replace")) if log.is_file() else []
    if proc.returncode != 0 or "</html>" not in proc.stdout:
        return [f"the browser failed ({proc.returncode}): {proc.stderr[-2000:]}"]
    dom = _MathDom()
    dom.feed(proc.stdout)
    problems = []
    if dom.math == 0:
        problems.append("the page has no span.math or div.math: nothing to check")
    if dom.containers < max(dom.math, 1):
        problems.append(
            f"{dom.containers} mjx-container for {dom.math} formulas: MathJax did not run"
        )
    if dom.raw:
        problems.append(f"raw TeX left in {len(dom.raw)} formulas, first {dom.raw[0]!r}")
    if dom.errors:
        problems.append(f"{dom.errors} MathJax error node(s)")
    if requested:
        problems.append(f"the page requested {', '.join(sorted(set(requested)))}")
    return problems


def math_pages(site: Path) -> list[Path]:
    """Return the site's pages that hold formulas (Sphinx's ``class="math``)."""
    pages = [p for p in sorted(site.rglob("*.html")) if "_static" not in p.parts]
    return [p for p in pages if 'class="math' in p.read_text(encoding="utf-8", errors="replace")]


def _build(site: Path) -> None:
    env = {**os.environ, "KLDIV_DOCS_EXAMPLES": "0", "MPLBACKEND": "Agg"}
    doctrees = site.parent / f"{site.name}-doctrees"
    command = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-d", str(doctrees)]
    subprocess.run([*command, str(ROOT / "docs"), str(site)], cwd=ROOT, env=env, check=True)


def main(argv: list[str] | None = None) -> int:
    """Check the pages given (default: every page with formulas); return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the built HTML site (Sphinx's output folder)")
    parser.add_argument(
        "--page", action="append", default=[], help="a page of the site, relative to it"
    )
    parser.add_argument("--build", action="store_true", help="build docs/ into SITE first")
    args = parser.parse_args(argv)
    browser = find_browser()
    if browser is None:
        print(f"no headless browser found (tried $KLDIV_BROWSER, {', '.join(BROWSERS)})")
        return 2
    if args.build:
        _build(args.site)
    pages = [args.site / p for p in args.page] or math_pages(args.site)
    if not pages:
        print(f"{args.site}: no page with formulas")
        return 1
    failed = 0
    isolation = "own network namespace" if _isolated() else "unresolvable hosts, dead proxy"
    print(f"{browser}, network off ({isolation})")
    for page in pages:
        problems = check_page(browser, page)
        failed += bool(problems)
        name = page.relative_to(args.site) if page.is_relative_to(args.site) else page
        print(f"{'FAIL' if problems else 'ok  '} {name}")
        for problem in problems:
            print(f"     {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
