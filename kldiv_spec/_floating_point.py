"""Silence NumPy's floating-point warnings where PyTorch is silent.

PyTorch returns NaN and inf without a word (``0 * inf``, ``log(-1)``,
``0 / 0``); NumPy (and array-api-strict, which computes with NumPy) would emit
``RuntimeWarning`` for the same values. The reference evaluates NumPy-backed
namespaces inside :func:`numpy.errstate` so the values are the same and no
warning is raised. Other libraries do not warn and need nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any

import array_api_compat

__all__: list[str] = []


def numpy_backed(xp: Any, /) -> bool:
    """Return whether ``xp`` computes with NumPy (and warns on NaN and inf)."""
    return array_api_compat.is_numpy_namespace(
        xp
    ) or array_api_compat.is_array_api_strict_namespace(xp)


def quiet(xp: Any, /) -> contextlib.AbstractContextManager[Any]:
    """Return a context in which ``xp`` computes NaN/inf silently."""
    if numpy_backed(xp):
        import numpy as np

        return np.errstate(all="ignore")
    return contextlib.nullcontext()
