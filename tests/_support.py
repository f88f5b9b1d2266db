"""Constants and helpers shared by several test modules (importable: pytest's pythonpath)."""

from __future__ import annotations

from typing import Any

import array_api_compat

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
