"""Shared fixtures: one ``xp`` fixture over every installed array library.

Backends that are not installed are skipped with the reason in the summary;
CuPy and torch-on-CUDA are skipped with "no GPU" where no GPU is visible.
"""

from __future__ import annotations

import importlib
import os
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from _support import cupy_skip_reason
from hypothesis import HealthCheck, settings

from kldiv_spec.backends._registry import BACKENDS, BackendSpec

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@dataclass(frozen=True)
class Backend:
    """An array library (and flavour) the tests run on, derived from the backend registry.

    Each registry entry gives its own backend, plus flavours where it declares them:
    read-only arrays (``<name>_readonly``), a CUDA device for a library that also runs
    on the CPU (``<name>_gpu``), and array-api-strict's strictest flags.
    """

    value: str
    spec: BackendSpec
    flavour: str = ""

    @property
    def module_name(self) -> str:
        return self.spec.module


def _all_backends() -> list[Backend]:
    out = []
    for spec in BACKENDS:
        out.append(Backend(spec.name, spec))
        if spec.read_only:
            out.append(Backend(f"{spec.name}_readonly", spec, "readonly"))
        if spec.name == "array_api_strict":
            out.append(Backend("array_api_strictest", spec, "strictest"))
        if "cuda" in spec.devices and "cpu" in spec.devices:
            out.append(Backend(f"{spec.name}_gpu", spec, "gpu"))
    return out


ALL_BACKENDS = _all_backends()


def _gpu_skip_reason(backend: Backend) -> str | None:
    if backend.value == "cupy":
        return cupy_skip_reason()
    if backend.flavour == "gpu":
        try:
            import torch
        except ImportError:
            return "torch is not installed"
        return None if torch.cuda.is_available() else "no GPU: torch CUDA tests need a CUDA device"
    return None


class _ReadOnlyNumPy(types.ModuleType):
    """array_api_compat.numpy whose array constructors return read-only arrays."""

    def __init__(self) -> None:
        super().__init__("numpy_readonly")
        import array_api_compat.numpy as cnp

        self._inner = cnp

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name in ("asarray", "zeros", "ones", "full", "linspace", "arange", "empty"):

            def readonly(*args: Any, **kwargs: Any) -> Any:
                a = np.array(attr(*args, **kwargs))
                a.flags.writeable = False
                return a

            return readonly
        return attr


def namespace(backend: Backend) -> Any:
    """Return the array API namespace for ``backend`` (skipping when unavailable)."""
    reason = None
    if backend.value == "cupy" or backend.flavour == "gpu":
        reason = _gpu_skip_reason(backend)
    else:
        try:
            importlib.import_module(backend.module_name)
        except ImportError:
            reason = f"{backend.module_name} is not installed"
    if reason is not None:
        pytest.skip(reason)
    if backend.flavour == "readonly":
        return _ReadOnlyNumPy()
    if backend.spec.name == "array_api_strict":
        import array_api_strict

        return array_api_strict
    if backend.spec.name == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        return jnp
    if backend.spec.name == "cupy":
        import array_api_compat.cupy

        return array_api_compat.cupy
    import array_api_compat

    module = importlib.import_module(backend.module_name)
    return array_api_compat.array_namespace(module.asarray([1.0]))


def selected_backends() -> list[Backend]:
    """Backends chosen by ``KLDIV_SPEC_BACKENDS`` (comma-separated values), default all.

    A name selects its flavours too: ``numpy`` also runs ``numpy_readonly``,
    ``array_api_strict`` also ``array_api_strictest``, ``torch`` also ``torch_gpu``.
    """
    names = os.environ.get("KLDIV_SPEC_BACKENDS", "").strip()
    if not names:
        return list(ALL_BACKENDS)
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    unknown = wanted - {b.value for b in ALL_BACKENDS}
    if unknown:
        msg = f"KLDIV_SPEC_BACKENDS names unknown backends: {sorted(unknown)}"
        raise pytest.UsageError(msg)
    return [b for b in ALL_BACKENDS if b.value in wanted or b.spec.name in wanted]


@pytest.fixture(params=selected_backends(), ids=lambda b: b.value)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The backend under test; strictest flags are applied for its duration."""
    b: Backend = request.param
    if b.flavour == "strictest":
        try:
            import array_api_strict
        except ImportError:
            pytest.skip("array_api_strict is not installed")
        array_api_strict.set_array_api_strict_flags(
            boolean_indexing=False, data_dependent_shapes=False
        )
        try:
            yield b
        finally:
            array_api_strict.reset_array_api_strict_flags()
    else:
        yield b


@pytest.fixture
def xp(backend: Backend) -> Any:
    """The array API namespace of the backend under test."""
    xp = namespace(backend)
    if backend.flavour == "gpu":
        import functools

        import array_api_compat.torch as ctorch

        wrapped = types.ModuleType("torch_gpu")
        wrapped.__dict__.update(ctorch.__dict__)
        for name in ("asarray", "zeros", "ones", "full", "linspace", "arange", "empty"):
            setattr(wrapped, name, functools.partial(getattr(ctorch, name), device="cuda"))
        return wrapped
    return xp


@pytest.fixture(params=["fast_path", "reference"])
def evaluation(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test through the library's fast path and through the reference.

    Where the library under test (the ``xp`` fixture) has no fast path the two
    runs are the same, so the ``fast_path`` one is skipped.
    """
    if request.param == "fast_path" and "xp" in request.fixturenames:
        import array_api_compat

        from kldiv_spec._dispatch import fast_path

        namespace = array_api_compat.array_namespace(request.getfixturevalue("xp").asarray([1.0]))
        if fast_path(namespace) is None:
            pytest.skip("no fast path for this library: the reference run covers it")
    import kldiv_spec

    with kldiv_spec.use_reference(request.param == "reference"):
        yield request.param
