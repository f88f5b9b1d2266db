"""Choosing how a call is evaluated: a backend's fast path, or the reference.

A fast path is a module ``kldiv_spec.backends.<library>`` exposing::

    kl_div(x, t, /, *, reduction, log_target, ops) -> array | NotImplemented
    kl_div_backward(g, x, t, /, *, reduction, log_target, ops)
        -> (grad_input, grad_target) | NotImplemented

where ``ops`` is the :class:`~kldiv_spec._validation.Operands` of the call.
Returning ``NotImplemented`` declines the call (an unsupported dtype, say) and
the reference evaluates it instead. Fast paths are looked up by the array
library of the operands and imported only when first needed.

The reference can be forced, for debugging or to check a fast path against it,
with :func:`use_reference` or the environment variable
``KLDIV_SPEC_REFERENCE=1``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import array_api_compat

__all__ = ["use_reference"]

_FORCE_REFERENCE: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "kldiv_spec_force_reference", default=None
)
_LOADED: dict[str, ModuleType | None] = {}


@contextlib.contextmanager
def use_reference(enabled: bool = True, /) -> Iterator[None]:
    """Evaluate every call in this context with the plain reference implementation.

    Parameters
    ----------
    enabled : bool, default True
        True forces the reference; False restores automatic fast-path selection
        inside an outer ``use_reference()`` block.

    Notes
    -----
    The setting is local to the current thread and ``asyncio`` task. Outside any
    such block, the environment variable ``KLDIV_SPEC_REFERENCE=1`` forces the
    reference process-wide.

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv_spec
    >>> with kldiv_spec.use_reference():
    ...     loss = kldiv_spec.kl_div(np.log([0.5, 0.5]), np.asarray([0.25, 0.75]),
    ...                              reduction="sum")
    >>> round(float(loss), 6)
    0.130812
    """
    token = _FORCE_REFERENCE.set(bool(enabled))
    try:
        yield
    finally:
        _FORCE_REFERENCE.reset(token)


def reference_forced() -> bool:
    """Return whether the reference is forced for the current context."""
    forced = _FORCE_REFERENCE.get()
    if forced is None:
        return os.environ.get("KLDIV_SPEC_REFERENCE", "") not in ("", "0")
    return forced


def library_name(xp: Any, /) -> str | None:
    """Return the key of the fast-path module for namespace ``xp``, if any."""
    checks = (
        ("numpy", array_api_compat.is_numpy_namespace),
        ("torch", array_api_compat.is_torch_namespace),
        ("jax", array_api_compat.is_jax_namespace),
        ("cupy", array_api_compat.is_cupy_namespace),
        ("dask", array_api_compat.is_dask_namespace),
    )
    for name, is_namespace in checks:
        if is_namespace(xp):
            return name
    return None


def fast_path(xp: Any, /) -> ModuleType | None:
    """Return the fast-path module for ``xp``, or None to use the reference."""
    if reference_forced():
        return None
    name = library_name(xp)
    if name is None:
        return None
    if name not in _LOADED:
        try:
            _LOADED[name] = importlib.import_module(f"kldiv_spec.backends.{name}")
        except ModuleNotFoundError as error:
            if not (error.name or "").startswith("kldiv_spec.backends"):
                raise
            _LOADED[name] = None
    return _LOADED[name]
