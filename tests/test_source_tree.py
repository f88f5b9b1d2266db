"""Python started in a source checkout imports the whole package, as an install does.

The checkout keeps ``backends/`` and ``conformance/`` beside ``kldiv_spec/``;
Python started in its root imports ``kldiv_spec`` from the folder. These tests
copy the three folders into a fresh directory and start Python there with any
editable-install finder removed, so that only the checkout can be found, the
situation of a user who ran ``pip install .`` and then ``python`` in the clone.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Drop setuptools' editable finders (classes on sys.meta_path), which would map the
# subpackages themselves.
PRELUDE = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
"""


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("checkout")
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd")
    for folder in ("kldiv_spec", "backends", "conformance"):
        shutil.copytree(ROOT / folder, root / folder, ignore=ignore)
    return root


def run_in(root: Path, code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_whole_package_imports_from_the_checkout(checkout: Path) -> None:
    out = run_in(
        checkout,
        """
        import kldiv_spec, kldiv_spec.backends, kldiv_spec.conformance
        from kldiv_spec.backends import numpy as fast_numpy
        for module in (kldiv_spec, kldiv_spec.backends, kldiv_spec.conformance, fast_numpy):
            print(module.__file__)
        print(len(kldiv_spec.conformance.PROPERTIES))
        """,
    )
    *files, count = out.split()
    expected = ["kldiv_spec", "backends", "conformance", "backends"]
    for file, folder in zip(files, expected, strict=True):
        assert Path(file).resolve().parent == (checkout / folder).resolve()
    assert int(count) > 0


def test_the_checkout_takes_the_fast_path(checkout: Path) -> None:
    """Without the subpackages, NumPy calls fell back silently to the (45x slower) reference."""
    out = run_in(
        checkout,
        """
        import numpy as np
        from kldiv_spec._dispatch import fast_path
        print(fast_path(np).__name__)
        """,
    )
    assert out.strip() == "kldiv_spec.backends.numpy"


def test_an_installed_copy_adds_no_finder(tmp_path: Path) -> None:
    """In the installed layout (subpackages inside kldiv_spec/) nothing is added."""
    package = tmp_path / "site" / "kldiv_spec"
    shutil.copytree(ROOT / "kldiv_spec", package, ignore=shutil.ignore_patterns("__pycache__"))
    for folder in ("backends", "conformance"):
        shutil.copytree(
            ROOT / folder, package / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    out = run_in(
        tmp_path / "site",
        """
        import kldiv_spec, kldiv_spec.backends
        from kldiv_spec._source_tree import SourceTreeFinder
        print(any(isinstance(f, SourceTreeFinder) for f in sys.meta_path))
        print(kldiv_spec.backends.__file__)
        """,
    )
    added, backends_file = out.split()
    assert added == "False"
    assert Path(backends_file).parent == package / "backends"
