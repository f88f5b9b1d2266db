"""Import the whole package from a source checkout, installed or not.

The repository keeps the fast paths and the conformance suite in top-level
folders (``backends/``, ``conformance/``) beside ``kldiv_spec/``; an install
maps them to ``kldiv_spec.backends`` and ``kldiv_spec.conformance``
(``[tool.setuptools.package-dir]`` in ``pyproject.toml``). Python started in the
checkout's root imports ``kldiv_spec`` from the folder instead, where those
subpackages do not exist: the fast paths, the conformance suite and its pytest
plugin would be missing. :func:`install` adds a meta-path finder that maps
exactly those two names to the sibling folders, so the checkout imports as the
installed package does. In an installed copy (the subpackages are real folders
inside ``kldiv_spec/``) it does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__: list[str] = []

#: Subpackage name -> its folder beside ``kldiv_spec/`` in a source checkout.
SUBPACKAGES = {"kldiv_spec.backends": "backends", "kldiv_spec.conformance": "conformance"}


class SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Find :data:`SUBPACKAGES` in the checkout rooted at ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        """Return the spec of ``kldiv_spec.backends`` / ``.conformance``, else None."""
        folder = SUBPACKAGES.get(fullname)
        if folder is None:
            return None
        init = self.root / folder / "__init__.py"
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[str(init.parent)]
        )


def install(package_dir: Path, /) -> None:
    """Add the finder when ``package_dir`` (``kldiv_spec/``) lies in a source checkout."""
    if all((package_dir / name.rsplit(".", 1)[1]).is_dir() for name in SUBPACKAGES):
        return  # an installed copy: the subpackages are inside it
    root = package_dir.parent
    if not all((root / folder / "__init__.py").is_file() for folder in SUBPACKAGES.values()):
        return
    if not any(isinstance(f, SourceTreeFinder) and f.root == root for f in sys.meta_path):
        sys.meta_path.insert(0, SourceTreeFinder(root))
