"""Choosing how a call is evaluated: a backend's fast path, or the reference.

The array library of the operands is looked up in the one backend registry
(:mod:`kldiv_spec.backends._registry`); where its entry has a fast path, the
module ``kldiv_spec.backends.<name>`` is imported on first use and called with
the protocol of :mod:`kldiv_spec.backends`::

    kl_div(ops) -> array | NotImplemented
    kl_div_backward(grad_output, ops) -> (grad_input, grad_target) | NotImplemented

where ``ops`` is the call's :class:`~kldiv_spec._validation.Operands`.
Returning ``NotImplemented`` declines the call (an unsupported dtype, say) and
the reference evaluates it instead. An ImportError raised while importing a
fast path is an error of this package and propagates: it is never turned into
a silent fall-back to the (much slower) reference.

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

from kldiv_spec.backends._registry import for_namespace

__all__ = ["use_reference"]

_FORCE_REFERENCE: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "kldiv_spec_force_reference", default=None
)
_LOADED: dict[str, ModuleType] = {}


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


def fast_path(xp: Any, /) -> ModuleType | None:
    """Return the fast-path module for namespace ``xp``, or None to use the reference."""
    if reference_forced():
        return None
    spec = for_namespace(xp)
    if spec is None or spec.fast_path_module is None:
        return None
    module = _LOADED.get(spec.name)
    if module is None:
        module = _LOADED[spec.name] = importlib.import_module(spec.fast_path_module)
    return module
