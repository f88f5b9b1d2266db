"""The one dispatcher: a validated call goes to its backend's fast path, or to the reference.

The layers run one way::

    public API (kl_div, kl_div_from_logits, gaussian_kl, KLDivLoss, kldiv_spec.torch)
      -> this dispatcher (reads the registry, kldiv_spec.backends._registry)
        -> the backends' fast paths (kldiv_spec.backends.<module>)
        -> the reference (kldiv_spec._reference*, with autodiff on PyTorch and JAX)
          -> validation, the core (kldiv_spec._validation, _core*), the settings

Nothing below imports anything above it (``tests/test_layers.py`` checks the import
graph). The public functions validate their arguments into an operands object, then
call :func:`evaluate` with the name of the function and the arguments of the backend
protocol (:mod:`kldiv_spec.backends._protocol`). :func:`evaluate` looks the array
library up in the registry once per namespace: where its entry lists a fast path for
the function's family, the module (``kldiv_spec.backends.<name>`` for ``kl_div``,
``kldiv_spec.backends.logits_<name>`` for the from-logits functions) is imported on
first use and the function of the same name is looked up on it and called; returning
``NotImplemented`` declines the call, and the reference evaluates it. An ImportError
raised while importing a fast path propagates: it is never a silent fall-back to the
(much slower) reference.

Per-call cost. Before validation, ``kl_div`` asks :func:`front` for the registered
*front* of the input's type: a backend may export ``FRONTS`` (array type -> function
``front(input, target, reduction, log_target)``) that evaluates the common call (plain
arrays of one dtype, shape and device) after a few attribute checks, or returns
``NotImplemented`` (then the full route runs, with its errors), or a
:class:`~kldiv_spec.backends._protocol.Recast` of operands it changed (autocast's casts)
for the full route to take. A front never raises for bad arguments and never runs
while the reference is forced.

The reference can be forced, for debugging or to check a fast path against it, with
:func:`use_reference` or ``KLDIV_SPEC_REFERENCE=1`` (:mod:`kldiv_spec._settings`).
:func:`reference_forced` reads the context variable only while some
:func:`use_reference` block is open (a counter says so), because reading it costs time
on every call and cannot be traced by ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import sys
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import numpy as np

from kldiv_spec import _settings
from kldiv_spec._floating_point import numpy_backed
from kldiv_spec.backends._registry import BACKENDS, BackendSpec, for_namespace

__all__ = ["use_reference"]

_FORCE_REFERENCE: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "kldiv_spec_force_reference", default=None
)

#: How many :func:`use_reference` blocks are open, in all threads and tasks together.
_OPEN_BLOCKS = 0
_OPEN_LOCK = threading.Lock()


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
    such block, the environment variable ``KLDIV_SPEC_REFERENCE=1`` (read when
    kldiv_spec is imported) forces the reference process-wide. Code compiled by
    ``torch.compile`` reads both once, when it is traced (the first call), and keeps
    the route it traced: it is not guarded on them, as a compiled ``F.kl_div`` is
    guarded on nothing of PyTorch's. Open the block before the first call of the
    compiled function, or call ``torch.compiler.reset()`` inside the block to trace
    it again.

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


# --------------------------------------------------------------------------- torch.compile


def _not_compiling() -> bool:
    return False


def _context_setting() -> bool | None:
    """Return the :func:`use_reference` setting of the current context (None: no block)."""
    return _FORCE_REFERENCE.get()


def _environment_setting() -> bool:
    """Return whether ``$KLDIV_SPEC_REFERENCE`` forces the reference."""
    return _settings.current.reference


_IS_COMPILING: Callable[[], bool] = _not_compiling
#: The front of the one array library ``torch.compile`` traces, PyTorch's.
_TRACED_FRONT: Callable[[Any, Any, Any, Any], Any] | None = None
#: :func:`_context_setting` and :func:`_environment_setting` as traced code reads them:
#: once, while tracing, as constants of the graph (Dynamo cannot trace ``ContextVar.get``).
_TRACED_CONTEXT_SETTING: Callable[[], bool | None] = _context_setting
_TRACED_ENVIRONMENT_SETTING: Callable[[], bool] = _environment_setting

#: Public entry points that a tracing compiler records as calls instead of tracing them
#: (:func:`register_entry_point`).
_ENTRY_POINTS: list[Callable[..., Any]] = []
#: Backends that take entry points (``allow_in_graph``), once loaded.
_ENTRY_POINT_TAKERS: list[Callable[[Callable[..., Any]], Any]] = []


def compiling() -> bool:
    """Return whether the call is being traced by ``torch.compile`` (False without torch)."""
    return _IS_COMPILING()


def reference_forced() -> bool:
    """Return whether the reference is forced for the current context.

    The context variable is read only while a :func:`use_reference` block is open
    somewhere; otherwise the answer is the environment variable's. Code traced by
    ``torch.compile`` reads both once, while tracing (see :func:`use_reference`).
    """
    if _IS_COMPILING():  # compiling(), one call less (this runs on every call)
        forced = _TRACED_CONTEXT_SETTING() if _OPEN_BLOCKS else None
        return _TRACED_ENVIRONMENT_SETTING() if forced is None else forced
    if _OPEN_BLOCKS:
        forced = _FORCE_REFERENCE.get()
        if forced is not None:
            return forced
    return _settings.current.reference


def register_entry_point(function: Callable[..., Any], /) -> None:
    """Register a public entry point that compilers should record as one call.

    PyTorch's fast path passes each to ``torch.compiler.allow_in_graph`` (as PyTorch does
    for ``F.kl_div``): Dynamo would otherwise trace this package's Python and guard the
    compiled code on every function and global it reads.
    """
    _ENTRY_POINTS.append(function)
    for take in _ENTRY_POINT_TAKERS:
        take(function)


# --------------------------------------------------------------------------- fronts

#: ``type(input) -> front(input, target, reduction, log_target)``, from the loaded backends.
FRONTS: dict[type, Callable[[Any, Any, Any, Any], Any]] = {}

#: Top-level module of an array type -> the registry entry whose fast path has its front.
_FRONT_MODULES: dict[str, BackendSpec] = {
    spec.module.split(".")[0]: spec for spec in BACKENDS if spec.front
}


def front(input: Any, /) -> Callable[[Any, Any, Any, Any], Any] | None:
    """Return the registered front for ``input``'s type, or None (see the module docstring).

    None also while the reference is forced. An array of a library whose fast path has a
    front but was not loaded yet loads it (which registers its front).
    """
    if _IS_COMPILING():  # compiling(), one call less
        # Only tensors are traced; reading FRONTS here would guard the compiled code on
        # every entry of the dictionary.
        handler = _TRACED_FRONT
        return None if handler is None or reference_forced() else handler
    kind = type(input)
    handler = FRONTS.get(kind)
    if handler is None:
        spec = _FRONT_MODULES.get(kind.__module__.split(".")[0])
        if spec is None or spec.module not in sys.modules:
            return None
        load(spec.name)
        handler = FRONTS.get(kind)
        if handler is None:
            return None
    if reference_forced():
        return None
    return handler


# --------------------------------------------------------------------------- evaluation

#: Function -> the family of fast-path modules that implement it.
_FAMILY = {
    "kl_div": "kl_div",
    "kl_div_backward": "kl_div",
    "kl_div_from_logits": "logits",
    "kl_div_from_logits_backward": "logits",
    "gaussian_kl": "gaussian",
    "gaussian_kl_backward": "gaussian",
    "kl_div_from_hidden": "hidden",
    "kl_div_from_hidden_backward": "hidden",
}

#: Function -> autodiff library (None: none) -> ``module:function`` of the reference.
#: On PyTorch and JAX the forward is the core's with its analytic backward attached.
_REFERENCES: dict[str, dict[str | None, str]] = {
    "kl_div": {
        None: "kldiv_spec._reference:forward",
        "torch": "kldiv_spec._autodiff_torch:kl_div_with_gradient",
        "jax": "kldiv_spec._autodiff_jax:kl_div_with_gradient",
    },
    "kl_div_backward": {None: "kldiv_spec._reference:backward"},
    "kl_div_from_logits": {
        None: "kldiv_spec._reference_logits:forward",
        "torch": "kldiv_spec._autodiff_logits_torch:from_logits_with_gradient",
        "jax": "kldiv_spec._autodiff_logits_jax:from_logits_with_gradient",
    },
    "kl_div_from_logits_backward": {None: "kldiv_spec._reference_logits:backward"},
    "gaussian_kl": {
        None: "kldiv_spec._reference_gaussian:forward",
        "torch": "kldiv_spec._autodiff_gaussian_torch:gaussian_with_gradient",
        "jax": "kldiv_spec._autodiff_gaussian_jax:gaussian_with_gradient",
    },
    "gaussian_kl_backward": {None: "kldiv_spec._reference_gaussian:backward"},
    "kl_div_from_hidden": {
        None: "kldiv_spec._reference_hidden:forward",
        "torch": "kldiv_spec._reference_hidden:forward_torch",
        "jax": "kldiv_spec._reference_hidden:forward_jax",
    },
    "kl_div_from_hidden_backward": {None: "kldiv_spec._reference_hidden:backward"},
}

#: ``(function, namespace) -> (fast-path module or None, reference, NumPy-backed)``, filled
#: on first use.
_ROUTES: dict[tuple[str, Any], tuple[ModuleType | None, Callable[..., Any], bool]] = {}
#: The loaded fast-path modules, by module name.
_LOADED: dict[str, ModuleType] = {}


def evaluate(function: str, xp: Any, /, *args: Any) -> Any:
    """Evaluate ``function`` (a name of :data:`_FAMILY`) on validated arguments.

    ``args`` are the backend protocol's (:mod:`kldiv_spec.backends._protocol`), for
    arrays of namespace ``xp``: the fast path's function of that name when there is
    one and it does not decline (and the reference is not forced), else the reference.
    """
    route = _ROUTES.get((function, xp))
    if route is None:
        route = _ROUTES[function, xp] = _route(function, xp)
    module, reference, silence = route
    if module is not None and not reference_forced():
        if silence:  # NaN and inf without RuntimeWarning, as in PyTorch
            with np.errstate(all="ignore"):
                result = getattr(module, function)(*args)
        else:
            result = getattr(module, function)(*args)
        if result is not NotImplemented:
            return result
    return reference(*args)


def _route(function: str, xp: Any, /) -> tuple[ModuleType | None, Callable[..., Any], bool]:
    """Return the fast-path module (or None) and the reference of ``function`` for ``xp``.

    And whether ``xp`` computes with NumPy (its floating-point warnings are silenced).
    """
    spec = for_namespace(xp)
    family = _FAMILY[function]
    module = None
    if spec is not None and family in spec.fast_paths:
        module = load(spec.name, family)
    references = _REFERENCES[function]
    autograd = spec.autograd if spec is not None else None
    where = references.get(autograd, references[None])
    module_name, _, name = where.partition(":")
    reference = getattr(importlib.import_module(module_name), name)
    return module, reference, numpy_backed(xp)


def load(name: str, family: str = "kl_div", /) -> ModuleType:
    """Import the fast path of registry entry ``name`` for ``family`` (once), and connect it.

    Connecting a module registers what it exports for the dispatcher: ``FRONTS``, the
    ``torch.compile`` hooks (``COMPILER``: ``is_compiling``, ``traced_front``,
    ``constant_result``, ``allow_in_graph``), and ``connect(evaluate)`` for backends that
    evaluate nested calls on their chunks' own libraries (Dask).
    """
    module_name = _module_name(name, family)
    module = _LOADED.get(module_name)
    if module is None:
        module = importlib.import_module(module_name)
        _LOADED[module_name] = module
        _connect(module)
    return module


def _module_name(name: str, family: str, /) -> str:
    prefix = "" if family == "kl_div" else f"{family}_"
    return f"kldiv_spec.backends.{prefix}{name}"


def _connect(module: ModuleType, /) -> None:
    global _IS_COMPILING, _TRACED_FRONT, _TRACED_CONTEXT_SETTING, _TRACED_ENVIRONMENT_SETTING
    FRONTS.update(getattr(module, "FRONTS", {}))
    connect = getattr(module, "connect", None)
    if connect is not None:
        connect(evaluate)
    compiler = getattr(module, "COMPILER", None)
    if compiler is not None:
        _IS_COMPILING = compiler.is_compiling
        _TRACED_FRONT = compiler.traced_front
        _TRACED_CONTEXT_SETTING = compiler.constant_result(_context_setting)
        _TRACED_ENVIRONMENT_SETTING = compiler.constant_result(_environment_setting)
        _ENTRY_POINT_TAKERS.append(compiler.allow_in_graph)
        for entry in _ENTRY_POINTS:
            compiler.allow_in_graph(entry)


def fast_path(xp: Any, /, family: str = "kl_div") -> ModuleType | None:
    """Return the fast-path module of ``family`` for namespace ``xp``, or None.

    None also while the reference is forced (what :func:`evaluate` would call).
    """
    if reference_forced():
        return None
    spec = for_namespace(xp)
    if spec is None or family not in spec.fast_paths:
        return None
    return load(spec.name, family)


# NumPy is a dependency: its fast path's front is registered now. PyTorch's is registered
# now if PyTorch is imported already, so that the first call on a tensor needs no import
# (which torch.compile could not trace); else on the first tensor (see front()).
for _spec in BACKENDS:
    if _spec.front and _spec.module in sys.modules:
        load(_spec.name)
