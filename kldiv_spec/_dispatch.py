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

Per-call cost. Before any of this, :func:`front` looks up the type of the
input in :data:`FRONTS`: a fast path may register there, for its array type, a
function ``front(input, target, reduction, log_target)`` that handles the
common call (plain arrays of one dtype, shape and device) with a few attribute
checks instead of the full validation, or returns ``NotImplemented`` for
anything else, which then takes the full route (and its errors). A front never
raises for bad arguments and never runs while the reference is forced.
:func:`reference_forced` reads the context variable only while some
:func:`use_reference` block is open (a counter says so), because reading it
costs time on every call and cannot be traced by ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from kldiv_spec.backends._registry import for_namespace

__all__ = ["use_reference"]

_FORCE_REFERENCE: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "kldiv_spec_force_reference", default=None
)
_LOADED: dict[str, ModuleType] = {}

#: ``type(input) -> front(input, target, reduction, log_target)``: the fast fronts (see above).
FRONTS: dict[type, Callable[[Any, Any, Any, Any], Any]] = {}

#: How many :func:`use_reference` blocks are open, in all threads and tasks together.
_OPEN_BLOCKS = 0
_OPEN_LOCK = threading.Lock()
_ENV = "KLDIV_SPEC_REFERENCE"


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
    reference process-wide. Code compiled by ``torch.compile`` reads both once, when
    it is traced (the first call), and keeps the route it traced: it is not guarded
    on them, as a compiled ``F.kl_div`` is guarded on nothing of PyTorch's. Open the
    block (or set the variable) before the first call of the compiled function, or
    call ``torch.compiler.reset()`` inside the block to trace it again.

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
    global _OPEN_BLOCKS
    token = _FORCE_REFERENCE.set(bool(enabled))
    with _OPEN_LOCK:
        _OPEN_BLOCKS += 1
    try:
        yield
    finally:
        with _OPEN_LOCK:
            _OPEN_BLOCKS -= 1
        _FORCE_REFERENCE.reset(token)


def _not_compiling() -> bool:
    return False


_IS_COMPILING: Callable[[], bool] = _not_compiling

#: The front of the one array library ``torch.compile`` traces, PyTorch's (set by its
#: fast path with :func:`use_torch_compiler`).
_TRACED_FRONT: Callable[[Any, Any, Any, Any], Any] | None = None


def _context_setting() -> bool | None:
    """Return the :func:`use_reference` setting of the current context (None: no block)."""
    return _FORCE_REFERENCE.get()


def _environment_setting() -> bool:
    """Return whether ``$KLDIV_SPEC_REFERENCE`` forces the reference."""
    return getenv(_ENV) not in ("", "0")


#: :func:`_context_setting` and :func:`_environment_setting` as traced code reads them:
#: once, while tracing, as constants of the graph (Dynamo cannot trace ``ContextVar.get``,
#: and tracing the environment's lookup would guard the compiled code on it).
_TRACED_CONTEXT_SETTING: Callable[[], bool | None] = _context_setting
_TRACED_ENVIRONMENT_SETTING: Callable[[], bool] = _environment_setting


def use_torch_compiler(
    is_compiling: Callable[[], bool],
    traced_front: Callable[[Any, Any, Any, Any], Any],
    constant_result: Callable[[Callable[[], Any]], Callable[[], Any]],
    /,
) -> None:
    """Register what ``torch.compile`` needs from PyTorch's fast path.

    ``torch.compiler.is_compiling``, the front of the calls it traces, and
    ``torch.compiler.assume_constant_result``, which makes code that Dynamo traces read
    the :func:`use_reference` setting once, while tracing (Dynamo cannot trace
    ``ContextVar.get``). The loss's entry points are not traced by Dynamo but recorded as
    calls (``torch.compiler.allow_in_graph``, as ``F.kl_div`` is); AOTAutograd traces
    them, and they read the setting then.
    """
    global _IS_COMPILING, _TRACED_FRONT, _TRACED_CONTEXT_SETTING, _TRACED_ENVIRONMENT_SETTING
    _IS_COMPILING, _TRACED_FRONT = is_compiling, traced_front
    _TRACED_CONTEXT_SETTING = constant_result(_context_setting)
    _TRACED_ENVIRONMENT_SETTING = constant_result(_environment_setting)


def compiling() -> bool:
    """Return whether the call is being traced by ``torch.compile`` (False without torch)."""
    return _IS_COMPILING()


def reference_forced() -> bool:
    """Return whether the reference is forced for the current context.

    The context variable is read only while a :func:`use_reference` block is open
    somewhere; otherwise the answer is the environment variable's. Code traced by
    ``torch.compile`` reads both once, while tracing (see :func:`use_reference`); code
    that Dynamo itself traces is guarded on the number of open blocks.
    """
    if _IS_COMPILING():  # compiling(), one call less (this runs on every call)
        forced = _TRACED_CONTEXT_SETTING() if _OPEN_BLOCKS else None
        return _TRACED_ENVIRONMENT_SETTING() if forced is None else forced
    if _OPEN_BLOCKS:
        forced = _FORCE_REFERENCE.get()
        if forced is not None:
            return forced
    return getenv(_ENV) not in ("", "0")


# os.environ.get costs a raised and caught KeyError for every unset name (about a
# microsecond, as much as a small ufunc call); on POSIX os.environ keeps its contents in a
# dict of encoded names, which is read here directly (os.environ[...] = ... and
# monkeypatch.setenv update it). Elsewhere, or once os.environ has been replaced, the
# public mapping is read.
_ENVIRON = os.environ
_ENV_DATA: dict[Any, Any] | None = getattr(os.environ, "_data", None)
_ENCODE = getattr(os.environ, "encodekey", None)
_DECODE = getattr(os.environ, "decodevalue", None)
_ENCODED: dict[str, Any] = {}


def _encode(name: str, /) -> Any:
    """Return (and cache) the encoded form of ``name``, the key of ``os.environ._data``."""
    key = _ENCODED.get(name)
    if key is None and _ENCODE is not None:
        key = _ENCODED[name] = _ENCODE(name)
    return key


# Encoded now, not on the first call: a first call traced by torch.compile would fill the
# cache inside the graph, and the next call would fail the guard on it and recompile.
_encode(_ENV)


def getenv(name: str, /) -> str:
    """Return ``os.environ.get(name, "")``, cheaply for an unset name."""
    if _ENV_DATA is None or _ENCODE is None or _DECODE is None or os.environ is not _ENVIRON:
        return os.environ.get(name, "")
    key = _ENCODED.get(name)
    if key is None:
        key = _encode(name)
    value = _ENV_DATA.get(key)
    return "" if value is None else _DECODE(value)


def front(input: Any, /) -> Callable[[Any, Any, Any, Any], Any] | None:
    """Return the registered front for ``input``'s type, or None (see the module docstring).

    None also while the reference is forced. A PyTorch tensor whose fast path has
    not been imported yet imports it (which registers its front).
    """
    if _IS_COMPILING():  # compiling(), one call less
        # Only tensors are traced; reading FRONTS here would guard the compiled code on
        # every entry of the dictionary.
        handler = _TRACED_FRONT
        return None if handler is None or reference_forced() else handler
    kind = type(input)
    handler = FRONTS.get(kind)
    if handler is None:
        if kind.__module__ != "torch" or "torch" not in sys.modules:
            return None
        _load("torch")
        handler = FRONTS.get(kind)
        if handler is None:
            return None
    if reference_forced():
        return None
    return handler


def fast_path(xp: Any, /) -> ModuleType | None:
    """Return the fast-path module for namespace ``xp``, or None to use the reference."""
    if reference_forced():
        return None
    spec = for_namespace(xp)
    if spec is None or spec.fast_path_module is None:
        return None
    module = _LOADED.get(spec.name)
    if module is None:
        module = _load(spec.name)
    return module


def _load(name: str, /) -> ModuleType:
    """Import the fast path of the registry's entry ``name`` (once)."""
    module = _LOADED.get(name)
    if module is None:
        path = f"kldiv_spec.backends.{name}"
        module = _LOADED[name] = importlib.import_module(path)
    return module


if "torch" in sys.modules:
    # PyTorch is already imported: register its front now, so that the first call on a
    # tensor needs no import (which torch.compile could not trace).
    _load("torch")
