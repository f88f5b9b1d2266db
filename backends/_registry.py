"""The one registry of array libraries: how each is recognised, its fast path, what it can do.

Every consumer reads this table and nothing else: the dispatch
(:mod:`kldiv_spec._dispatch`) picks a fast path from it, the conformance suite
builds its backends from it (:mod:`kldiv_spec.conformance.namespaces`), the
test fixtures derive their backends from it, and the backend matrix in
``docs/backends.md`` is generated from it (``docs/_tools/backend_table.py``,
checked by ``tests/test_docs.py``).

Adding an array library means one :class:`BackendSpec` entry here and, if it
gets a fast path, one module ``backends/<name>.py`` with the protocol of
:mod:`kldiv_spec.backends`. Nothing here imports an optional array library: the
namespace predicates are array-api-compat's, which look at module names only.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat

__all__ = ["BACKENDS", "BackendSpec", "by_name", "for_namespace"]


@dataclass(frozen=True)
class BackendSpec:
    """One array library, as kldiv-spec sees it.

    Attributes
    ----------
    name : str
        Short name: the fast-path module ``kldiv_spec.backends.<name>`` (when
        ``fast_path``), the ``--backend`` of ``kldiv-spec check`` and the test
        fixture's id.
    title : str
        Human-readable name.
    module : str
        The importable module whose presence means the library is installed.
    is_namespace : callable
        ``is_namespace(xp) -> bool``: whether an array API namespace is this library's.
    fast_paths : tuple of str
        The families of functions it has fast paths for: ``"kl_div"`` (module
        ``kldiv_spec.backends.<name>``: ``kl_div`` and its backward), ``"logits"``
        (module ``kldiv_spec.backends.logits_<name>``: the from-logits functions) and
        ``"hidden"`` (``kldiv_spec.backends.hidden_<name>``: the from-hidden ones).
        The dispatcher reads this, and nothing else, to find them.
    dtypes : tuple of str
        The floating dtypes ``kl_div`` accepts for it.
    fast_dtypes : tuple of str
        The dtypes its fast path takes (the reference takes the others).
    devices : tuple of str
        The devices its arrays can live on (``"cuda"`` only with a GPU).
    lazy : bool
        Whether results are lazy (nothing computed until asked for).
    traced : str
        The tracing or compilation it works under (``""`` for none).
    autograd : str or None
        The automatic differentiation that carries the analytic gradients
        (``"torch"``, ``"jax"``), or None: gradients come from
        :func:`kldiv_spec.kl_div_backward`.
    read_only : bool
        Whether read-only arrays are supported (inputs are never written anyway;
        this says the library can make them, and the tests cover them).
    front : bool
        Whether its ``kl_div`` fast path exports a front for its array types (registered
        when the library is imported: :mod:`kldiv_spec.backends._protocol`).
    """

    name: str
    title: str
    module: str
    is_namespace: Callable[[Any], bool]
    fast_paths: tuple[str, ...]
    dtypes: tuple[str, ...]
    fast_dtypes: tuple[str, ...]
    devices: tuple[str, ...]
    lazy: bool = False
    traced: str = ""
    autograd: str | None = None
    read_only: bool = False
    front: bool = False

    @property
    def fast_path(self) -> bool:
        """Whether ``kl_div`` has a fast path for it (``"kl_div"`` in :attr:`fast_paths`)."""
        return "kl_div" in self.fast_paths

    def installed(self) -> bool:
        """Return whether the library can be imported here (without importing it)."""
        return importlib.util.find_spec(self.module.split(".")[0]) is not None

    @property
    def fast_path_module(self) -> str | None:
        """The fast path's module name, or None."""
        return f"kldiv_spec.backends.{self.name}" if self.fast_path else None


_HALF_TO_DOUBLE = ("float16", "float32", "float64")

#: Every array library kldiv-spec knows, in the order the docs list them.
BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec(
        name="numpy",
        title="NumPy",
        module="numpy",
        is_namespace=array_api_compat.is_numpy_namespace,
        fast_paths=("kl_div", "logits"),
        dtypes=_HALF_TO_DOUBLE,
        fast_dtypes=_HALF_TO_DOUBLE,
        devices=("cpu",),
        read_only=True,
        front=True,
    ),
    BackendSpec(
        name="array_api_strict",
        title="array-api-strict",
        module="array_api_strict",
        is_namespace=array_api_compat.is_array_api_strict_namespace,
        fast_paths=(),
        dtypes=("float32", "float64"),
        fast_dtypes=(),
        devices=("cpu",),
    ),
    BackendSpec(
        name="torch",
        title="PyTorch",
        module="torch",
        is_namespace=array_api_compat.is_torch_namespace,
        fast_paths=("kl_div", "logits", "hidden"),
        dtypes=("float16", "bfloat16", "float32", "float64"),
        fast_dtypes=("float16", "bfloat16", "float32", "float64"),
        devices=("cpu", "cuda"),
        traced="torch.compile, torch.export, torch.func",
        autograd="torch",
        front=True,
    ),
    BackendSpec(
        name="jax",
        title="JAX",
        module="jax.numpy",
        is_namespace=array_api_compat.is_jax_namespace,
        fast_paths=("kl_div", "logits"),
        dtypes=("float16", "bfloat16", "float32", "float64"),
        fast_dtypes=("float32", "float64"),
        devices=("cpu", "gpu"),
        traced="jax.jit, jax.vmap",
        autograd="jax",
    ),
    BackendSpec(
        name="dask",
        title="Dask",
        module="dask.array",
        is_namespace=array_api_compat.is_dask_namespace,
        fast_paths=("kl_div", "logits"),
        dtypes=_HALF_TO_DOUBLE,
        fast_dtypes=_HALF_TO_DOUBLE,
        devices=("cpu",),
        lazy=True,
    ),
    BackendSpec(
        name="cupy",
        title="CuPy",
        module="cupy",
        is_namespace=array_api_compat.is_cupy_namespace,
        fast_paths=("kl_div",),
        dtypes=_HALF_TO_DOUBLE,
        fast_dtypes=("float32", "float64"),
        devices=("cuda",),
    ),
)

_BY_NAME = {spec.name: spec for spec in BACKENDS}


def by_name(name: str, /) -> BackendSpec:
    """Return the entry called ``name``; ValueError naming the known ones otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        msg = f"unknown backend {name!r}; choose from {', '.join(_BY_NAME)}"
        raise ValueError(msg) from None


def for_namespace(xp: Any, /) -> BackendSpec | None:
    """Return the entry of array API namespace ``xp``, or None for a library not listed."""
    for spec in BACKENDS:
        if spec.is_namespace(xp):
            return spec
    return None
