"""Packaging: the wheel's layout and the editable install's package mapping.

``backends/`` and ``conformance/`` are installed as ``kldiv_spec.backends`` and
``kldiv_spec.conformance``; no generic top-level package (``backends``,
``conformance``, ``tests``) may be installed. The wheel is built from a copy of
the sources in a temporary directory, so the working tree gets no ``build/``.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import kldiv_spec

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "kldiv_spec", "backends", "conformance")


def _copy_sources(destination: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.so")
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=ignore)
        else:  # every listed source must exist: a missing one is an error, not a skip
            shutil.copy2(source, destination / name)


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The file list of a wheel built (offline, no isolation) from the current sources."""
    pytest.importorskip("setuptools")
    source = tmp_path_factory.mktemp("source")
    out = tmp_path_factory.mktemp("wheel")
    _copy_sources(source)
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--quiet",
        "--wheel-dir",
        str(out),
        str(source),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("kldiv_spec-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_wheel_contains_the_subpackages_and_marker(wheel_files):
    for name in (
        "kldiv_spec/__init__.py",
        "kldiv_spec/py.typed",
        "kldiv_spec/backends/__init__.py",
        "kldiv_spec/conformance/__init__.py",
        "kldiv_spec/torch.py",
        "kldiv_spec/conformance/schemas/vectors.schema.json",
        "kldiv_spec/conformance/schemas/results.schema.json",
    ):
        assert name in wheel_files, name


def test_wheel_holds_every_backend_and_conformance_module(wheel_files):
    for folder in ("backends", "conformance"):
        for module in (ROOT / folder).glob("*.py"):
            assert f"kldiv_spec/{folder}/{module.name}" in wheel_files, module


def test_wheel_carries_the_compiled_fused_sum(wheel_files):
    """The optional extensions are built wherever a C compiler is (CI has one)."""
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler: the wheel is built without the fused float32 sum")
    for name in ("_fused", "_fused_logits", "_fused_jsd", "_fused_logits64"):
        built = [n for n in wheel_files if n.startswith(f"kldiv_spec/backends/{name}.")]
        assert len(built) == 1 and built[0].endswith((".so", ".pyd")), (name, built)


def test_wheel_installs_no_generic_top_level_package(wheel_files):
    top = {name.split("/", 1)[0] for name in wheel_files}
    metadata = {name for name in top if name.endswith((".dist-info", ".data"))}
    assert top - metadata == {"kldiv_spec"}
    for forbidden in ("backends/", "conformance/", "tests/"):
        assert not any(name.startswith(forbidden) for name in wheel_files), forbidden


def test_wheel_carries_the_license(wheel_files):
    """pyproject declares BSD-3-Clause; the LICENSE text ships in the wheel's metadata."""
    assert (ROOT / "LICENSE").read_text().startswith("BSD 3-Clause License")
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel_files), wheel_files


def test_wheel_declares_the_console_script(wheel_files):
    assert any(name.endswith(".dist-info/entry_points.txt") for name in wheel_files)


def test_editable_install_maps_the_repository_folders():
    backends = importlib.import_module("kldiv_spec.backends")
    conformance = importlib.import_module("kldiv_spec.conformance")
    assert Path(kldiv_spec.__file__).resolve().parent == ROOT / "kldiv_spec"
    assert Path(backends.__file__).resolve() == ROOT / "backends" / "__init__.py"
    assert Path(conformance.__file__).resolve() == ROOT / "conformance" / "__init__.py"
    assert (Path(kldiv_spec.__file__).parent / "py.typed").is_file()


def test_no_generic_top_level_package_is_importable(tmp_path):
    """In a fresh interpreter, away from the repository, only ``kldiv_spec`` is installed."""
    code = (
        "import importlib.util as u, sys\n"
        "names = ('backends', 'conformance', 'tests', 'kldiv_spec.backends',"
        " 'kldiv_spec.conformance')\n"
        "print([u.find_spec(n) is not None for n in names])\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.strip() == "[False, False, False, True, True]"
