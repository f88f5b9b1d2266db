"""Python started in a source checkout imports the whole package, as an install does.

The checkout keeps ``backends/`` and ``conformance/`` beside ``kldiv_spec/``, and
``kldiv_spec/backends`` and ``kldiv_spec/conformance`` are symbolic links to them: Python
started in the clone's root imports ``kldiv_spec`` from the folder, subpackages included,
with no import hook. These tests copy the three folders (links kept) into a fresh
directory and start Python there with any editable-install finder removed, so that only
the checkout can be found: the situation of a user who ran ``pip install .`` and then
``python`` in the clone.
"""

from __future__ import annotations

import os
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


def _copy(root: Path, *, compiled: bool) -> Path:
    patterns = ["__pycache__"] if compiled else ["__pycache__", "*.so", "*.pyd"]
    for folder in ("kldiv_spec", "backends", "conformance"):
        shutil.copytree(
            ROOT / folder, root / folder, symlinks=True, ignore=shutil.ignore_patterns(*patterns)
        )
    return root


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkout whose compiled kernels are not built (``pip install .`` builds elsewhere)."""
    return _copy(tmp_path_factory.mktemp("checkout"), compiled=False)


def run_in(root: Path, code: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_the_subpackages_are_links_in_the_repository() -> None:
    for folder in ("backends", "conformance"):
        link = ROOT / "kldiv_spec" / folder
        assert link.is_symlink(), link
        assert link.resolve() == (ROOT / folder).resolve()


def test_the_whole_package_imports_from_the_checkout(checkout: Path) -> None:
    done = run_in(
        checkout,
        """
        import warnings
        warnings.simplefilter("ignore", RuntimeWarning)  # the kernels are not built here
        import kldiv_spec, kldiv_spec.backends, kldiv_spec.conformance
        from kldiv_spec.backends import numpy as fast_numpy
        for module in (kldiv_spec, kldiv_spec.backends, kldiv_spec.conformance, fast_numpy):
            print(module.__file__)
        print(len(kldiv_spec.conformance.PROPERTIES))
        """,
    )
    *files, count = done.stdout.split()
    expected = ["kldiv_spec", "backends", "conformance", "backends"]
    for file, folder in zip(files, expected, strict=True):
        assert Path(file).resolve().parent == (checkout / folder).resolve()
    assert int(count) > 0


def test_the_checkout_takes_the_fast_path_and_says_its_kernels_are_missing(
    checkout: Path,
) -> None:
    """Without the kernels the fast path runs about 3x slower: one warning says what to run."""
    done = run_in(
        checkout,
        """
        import numpy as np
        import kldiv_spec
        x = np.zeros(1 << 17, dtype=np.float32)
        kldiv_spec.kl_div(x, np.full_like(x, 0.5), reduction="sum")
        z = np.zeros((512, 512), np.float32)
        kldiv_spec.kl_div_from_logits(z, z)
        from kldiv_spec._dispatch import fast_path
        print(fast_path(np).__name__)
        """,
    )
    assert done.stdout.strip() == "kldiv_spec.backends.numpy"
    warnings = [line for line in done.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warnings) == 1, done.stderr
    assert "pip install -e ." in done.stderr
    assert "backends/_fused.c" in done.stderr and "backends/_fused_logits.c" in done.stderr


def test_built_kernels_or_the_setting_silence_the_warning(tmp_path: Path) -> None:
    built = _copy(tmp_path / "built", compiled=True)
    if not list((built / "backends").glob("_fused*.so")):
        pytest.skip("the compiled kernels are not built in this checkout")
    code = "import warnings; warnings.simplefilter('error'); import kldiv_spec.backends._blocks"
    run_in(built, code)
    bare = _copy(tmp_path / "bare", compiled=False)
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + code],
        cwd=bare,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KLDIV_SPEC_NUMPY_FUSED": "0"},
    )
    assert done.returncode == 0, done.stderr


def test_an_installed_copy_does_not_warn(tmp_path: Path) -> None:
    """An install without a compiler has no kernels and no C sources: nothing to say."""
    package = tmp_path / "site" / "kldiv_spec"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.c")
    shutil.copytree(ROOT / "kldiv_spec", package, ignore=ignore, symlinks=False)
    done = run_in(
        tmp_path / "site",
        """
        import warnings
        warnings.simplefilter("error")
        import kldiv_spec.backends._blocks, kldiv_spec.backends._blocks_logits
        print(kldiv_spec.backends.__file__)
        """,
    )
    assert Path(done.stdout.strip()).parent == package / "backends"


@pytest.mark.parametrize("folder", ["backends", "conformance"])
def test_a_folder_imported_by_its_own_name_is_refused(checkout: Path, folder: str) -> None:
    """From the root, ``import conformance`` would be a second copy of every module."""
    done = run_in(checkout, f"import {folder}", check=False)
    assert done.returncode != 0
    assert "import it by that name" in done.stderr
    assert f"kldiv_spec.{folder}" in done.stderr
