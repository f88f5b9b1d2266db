"""Constants and helpers shared by several test modules (importable: pytest's pythonpath)."""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

# Every reduction, each log_target at least once: enough where shapes or laziness are
# the point, and cheaper on JAX and Dask, which build anew for every configuration.
CONFIGURATIONS = [
    ("none", False),
    ("batchmean", True),
    ("sum", False),
    ("mean", True),
    ("none", True),
    ("sum", True),
]

# JAX compiles every operation anew for every new shape (about a second each on
# this machine), so JAX runs the shape-heavy tests on these few shapes only; the
# broadcasting logic is the same core code on every backend.
JAX_SHAPES = [((3,), ()), ((4, 1), (1, 3)), ((2, 1, 3), (4, 1))]


def few_shapes_on_jax(xp: Any, shapes: list[Any]) -> list[Any]:
    """Return ``shapes``, or :data:`JAX_SHAPES` when ``xp`` is JAX."""
    return JAX_SHAPES if array_api_compat.is_jax_namespace(xp) else shapes


def cupy_skip_reason() -> str | None:
    """Return why CuPy tests cannot run here ("no GPU: ..."), or None when they can."""
    try:
        import cupy
    except ImportError:
        return "no GPU: CuPy is not installed (it needs a CUDA device)"
    try:
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return None
    except Exception:  # CUDA driver missing or broken
        pass
    return "no GPU: CuPy tests need a CUDA device"


def flushes_subnormals(xp: Any, dtype: str) -> bool:
    """Whether ``xp`` computes in ``dtype`` with subnormal numbers flushed to zero.

    JAX does (XLA on the CPU), and so does CuPy in float32: it compiles every
    kernel, its own and kldiv_spec's, with ``-ftz=true``. That is the platform's
    arithmetic, not kldiv-spec's (docs/backends.md), so the tests give the
    oracle the flushed operands there.
    """
    if array_api_compat.is_jax_namespace(xp):
        return True
    if array_api_compat.is_cupy_namespace(xp):
        half_tiny = xp.asarray(np.finfo(dtype).smallest_normal, dtype=getattr(xp, dtype)) / 2
        return bool(half_tiny == 0)
    return False


def as_computed(xp: Any, a: np.ndarray, dtype: str) -> np.ndarray:
    """The values ``xp`` computes with: ``a``, its subnormals flushed where ``xp`` flushes them.

    JAX (XLA on CPU) and CuPy in float32 flush subnormals to zero. That is a
    property of the platform, not of kldiv-spec (documented as such), so the
    oracle is given the flushed values there.
    """
    if not flushes_subnormals(xp, dtype):
        return a
    tiny = np.finfo(dtype).smallest_normal
    return np.where(np.abs(a) < tiny, np.copysign(0.0, a), a)
