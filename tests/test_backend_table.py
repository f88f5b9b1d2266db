"""The backend registry: its claims hold, and docs/backends.md shows exactly what it says."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import kldiv_spec
from kldiv_spec._dispatch import fast_path
from kldiv_spec._validation import operands
from kldiv_spec.backends._registry import BACKENDS, BackendSpec, by_name, for_namespace

ROOT = Path(__file__).resolve().parents[1]
LARGE = (4, 1 << 15)  # above every fast path's size threshold


def test_the_docs_table_is_generated_from_the_registry() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "_tools" / "backend_table.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_names_are_unique_and_each_fast_path_module_exists() -> None:
    assert len({spec.name for spec in BACKENDS}) == len(BACKENDS)
    for spec in BACKENDS:
        if spec.fast_path:
            assert (ROOT / "backends" / f"{spec.name}.py").is_file(), spec.name
    with pytest.raises(ValueError, match="unknown backend 'nope'; choose from numpy"):
        by_name("nope")


def _namespace(spec: BackendSpec):
    if not spec.installed():
        pytest.skip(f"{spec.module} is not installed")
    if spec.devices == ("cuda",):
        pytest.skip(f"no GPU: {spec.title} needs a CUDA device")
    import array_api_compat

    if spec.name == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
    module = importlib.import_module(spec.module)
    return array_api_compat.array_namespace(module.asarray([1.0]))


@pytest.mark.parametrize("spec", BACKENDS, ids=lambda s: s.name)
def test_each_entry_recognises_its_namespace_and_no_other(spec: BackendSpec) -> None:
    xp = _namespace(spec)
    assert for_namespace(xp) is spec
    assert [s for s in BACKENDS if s.is_namespace(xp)] == [spec]


@pytest.mark.parametrize("spec", BACKENDS, ids=lambda s: s.name)
def test_declared_dtypes_and_fast_path_dtypes_hold(spec: BackendSpec) -> None:
    xp = _namespace(spec)
    path = fast_path(xp)
    assert (path is not None) == spec.fast_path
    for name in ("float16", "bfloat16", "float32", "float64"):
        dtype = getattr(xp, name, None)
        if dtype is None and spec.name == "dask":  # NumPy's dtypes, beyond the standard's
            dtype = np.dtype(name) if name != "bfloat16" else None
        if dtype is None:
            assert name not in spec.dtypes, f"{spec.name} has no {name}"
            continue
        x = xp.full(LARGE, -1.0, dtype=dtype)
        t = xp.full(LARGE, 0.5, dtype=dtype)
        if name not in spec.dtypes:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = kldiv_spec.kl_div(x, t, reduction="sum")
        assert out.dtype == dtype
        if path is not None:
            taken = path.kl_div(operands(x, t, reduction="sum", log_target=False))
            assert (taken is not NotImplemented) == (name in spec.fast_dtypes), name


@pytest.mark.parametrize("spec", BACKENDS, ids=lambda s: s.name)
def test_laziness_and_autograd_are_as_declared(spec: BackendSpec) -> None:
    xp = _namespace(spec)
    x = xp.asarray(np.log(np.full((3, 4), 0.25)))
    t = xp.asarray(np.full((3, 4), 0.25))
    out = kldiv_spec.kl_div(x, t, reduction="sum")
    import array_api_compat

    # array-api-compat calls JAX arrays lazy too (they may be traced); the registry records
    # that as `traced`, and `lazy` for results computed only when asked (Dask).
    deferred = array_api_compat.is_lazy_array(out) and not array_api_compat.is_jax_array(out)
    assert deferred == spec.lazy
    if spec.autograd == "torch":
        x.requires_grad_(True)
        kldiv_spec.kl_div(x, t, reduction="sum").backward()
        assert x.grad is not None
    elif spec.autograd == "jax":
        import jax

        grad = jax.grad(lambda v: kldiv_spec.kl_div(v, t, reduction="sum"))(x)
        assert grad.shape == x.shape
