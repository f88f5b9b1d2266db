"""Shared fixtures: one ``xp`` fixture over every installed array library.

Backends that are not installed are skipped with the reason in the summary;
CuPy and torch-on-CUDA are skipped with "no GPU" where no GPU is visible.

Long tests (whole-suite conformance runs on JAX and Dask, benchmark dry runs: tens of
seconds each) are marked ``long`` and run only with ``--run-long``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from _support import (
    FastPathCalls,
    cupy_skip_reason,
    reread_settings,
    set_torch_min_elements,
    setenv,
    spy_fast_paths,
)
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

#: Scripts the tests run in subprocesses, not test modules (``--doctest-modules`` would
#: import them, and they need torch).
collect_ignore = ["_hidden_sharded_check.py"]


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--run-long``: also run the tests marked ``long``."""
    parser.addoption(
        "--run-long",
        action="store_true",
        default=False,
        help="also run the tests marked long (tens of seconds each: whole-suite "
        "conformance runs on JAX and Dask, peers' adapters, benchmark dry runs)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "long: a long run (tens of seconds or more), skipped unless --run-long is given",
    )
    config.addinivalue_line(
        "markers",
        "checks_fast_path: the fast_path run of the evaluation fixture fails unless a "
        "fast path took at least one call",
    )


_CALL_REPORT = pytest.StashKey[pytest.TestReport]()


@pytest.fixture
def every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send every NumPy call, however small, through the blocked fast path (and kernels)."""
    setenv(monkeypatch, "KLDIV_SPEC_NUMPY_MIN_ELEMENTS", "0")


@pytest.fixture(autouse=True)
def _settings_follow_the_environment() -> Iterator[None]:
    """After the test (and after monkeypatch restored the environment): kldiv_spec reads
    its environment variables again, where it keeps what it read (``_support.setenv``)."""
    yield
    reread_settings()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep the report of the test's call, for fixtures' teardown (``evaluation``)."""
    report = yield
    if report.when == "call":
        item.stash[_CALL_REPORT] = report
    return report


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-long", default=False):
        return
    skip = pytest.mark.skip(reason="long: run with --run-long")
    for item in items:
        if item.get_closest_marker("long") is not None:
            item.add_marker(skip)


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


class Evaluation(str):
    """``"fast_path"`` or ``"reference"`` (it compares equal to the string), and the calls
    the fast paths' protocol functions got while the test ran (:class:`FastPathCalls`)."""

    calls: FastPathCalls


def _fast_path_modules(libraries: list[BackendSpec]) -> list[types.ModuleType]:
    """The fast-path modules (``kldiv_spec.backends.<name>``, ``.logits_<name>``) of these."""
    modules = []
    for spec in libraries:
        if not spec.fast_path or not spec.installed():
            continue
        for name in (spec.name, f"logits_{spec.name}"):
            path = f"kldiv_spec.backends.{name}"
            if path in sys.modules or importlib.util.find_spec(path) is not None:
                modules.append(importlib.import_module(path))
    return modules


@pytest.fixture(params=["fast_path", "reference"])
def evaluation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test through the library's fast path and through the reference.

    ``fast_path``: the size thresholds are lowered (``KLDIV_SPEC_NUMPY_MIN_ELEMENTS=0``,
    ``kldiv_spec.backends.torch.MIN_ELEMENTS = 1``) so that the small arrays of the tests
    reach the fast paths, whose protocol functions are spied on: ``evaluation.calls``
    says which took a call. A test (or module) marked ``checks_fast_path`` fails when
    none did. Where the library under test (the ``xp`` fixture) has no fast path the two
    runs would be the same, so the ``fast_path`` one is skipped. ``reference``: inside
    :func:`kldiv_spec.use_reference`.
    """
    import kldiv_spec

    if request.param == "reference":
        reference = Evaluation("reference")
        reference.calls = FastPathCalls()  # none spied on
        with kldiv_spec.use_reference():
            yield reference
        return
    if "backend" in request.fixturenames:
        backend: Backend = request.getfixturevalue("backend")
        if not backend.spec.fast_path:
            pytest.skip("no fast path for this library: the reference run covers it")
        libraries = [backend.spec]
    else:  # a test of one library, imported by the test itself: spy on every fast path
        libraries = list(BACKENDS)
    modules = _fast_path_modules(libraries)
    setenv(monkeypatch, "KLDIV_SPEC_NUMPY_MIN_ELEMENTS", "0")
    if any(module.__name__ == "kldiv_spec.backends.torch" for module in modules):
        set_torch_min_elements(monkeypatch, 1)
    out = Evaluation("fast_path")
    out.calls = spy_fast_paths(monkeypatch, modules)
    with kldiv_spec.use_reference(False):
        yield out
    report = request.node.stash.get(_CALL_REPORT, None)
    passed = report is not None and report.passed  # not skipped, not already failed
    if passed and request.node.get_closest_marker("checks_fast_path") is not None:
        assert out.calls.taken, f"no fast path took a call: {out.calls}"
