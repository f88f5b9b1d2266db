"""What a fast-path module provides, and what the dispatcher gives it.

A fast path is a module ``kldiv_spec.backends.<name>`` (for ``kl_div``) or
``kldiv_spec.backends.logits_<name>`` (for the from-logits functions), ``<name>`` an
entry of the registry (:mod:`kldiv_spec.backends._registry`) that lists the family in
its ``fast_paths``. The dispatcher (:mod:`kldiv_spec._dispatch`) imports it on first use
and calls, with the call's validated operands (:mod:`kldiv_spec._validation`)::

    kl_div(ops) -> array | NotImplemented
    kl_div_backward(grad_output, ops) -> (grad_input, grad_target) | NotImplemented
    kl_div_from_logits(ops) -> array | NotImplemented
    kl_div_from_logits_backward(grad_output, ops, target_grad)
        -> (grad_input, grad_target or None) | NotImplemented

``NotImplemented`` declines the call (an unsupported dtype, say), and the reference
evaluates it. Reductions follow the one rounding rule,
:func:`kldiv_spec._core.divide_total`. A module may also export, for the dispatcher to
register when it loads the module:

``FRONTS``
    ``{array type: front(input, target, reduction, log_target)}``: the common
    ``kl_div`` call before validation. A front returns the result, ``NotImplemented``
    (the full route then validates and dispatches), or a :class:`Recast` of operands it
    changed, for the full route to take instead of the caller's.
``COMPILER``
    The hooks of the array library's tracing compiler (:class:`CompilerHooks`).
``connect(evaluate)``
    Called once with the dispatcher's ``evaluate(function, xp, *args)``, for a backend
    whose chunks are arrays of another library (Dask) to evaluate them as any call is.

Fast paths import only what lies below the dispatcher: the core, the validation's
operand types, the references, the settings and each other; never the public layer or
the dispatcher (``tests/test_layers.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["CompilerHooks", "Connection", "Evaluate", "Recast"]

#: The dispatcher's ``evaluate(function, xp, *args)`` (``connect``).
Evaluate = Callable[..., Any]


class Recast(NamedTuple):
    """A front's answer: take the full route, on these operands instead of the caller's.

    PyTorch's front returns it under autocast, with the operands cast as autocast casts
    those of ``kl_div`` (to float32), when its own routes decline the cast call.
    """

    input: Any
    target: Any


class CompilerHooks(NamedTuple):
    """What the dispatcher needs from a tracing compiler (``torch.compile``).

    Attributes
    ----------
    is_compiling : callable
        ``() -> bool``: whether the current call is being traced.
    traced_front : callable
        The front of the calls it traces (their operands are fake tensors).
    constant_result : callable
        Turns a function of no arguments into one the compiler evaluates once, while
        tracing, as a constant of the graph (``torch.compiler.assume_constant_result``).
    allow_in_graph : callable
        Makes the compiler record a public entry point as one call instead of tracing
        its Python (``torch.compiler.allow_in_graph``).
    """

    is_compiling: Callable[[], bool]
    traced_front: Callable[[Any, Any, Any, Any], Any]
    constant_result: Callable[[Callable[[], Any]], Callable[[], Any]]
    allow_in_graph: Callable[[Callable[..., Any]], Any]


class Connection:
    """The dispatcher's ``evaluate``, as a backend with nested calls receives it (``connect``).

    A module exports ``connect = connection.connect``; its graph's tasks then carry
    :meth:`evaluate`'s result as an argument (a module-level function, pickled by name),
    so that a worker in another process, which imports the module without the dispatcher
    having loaded it, evaluates its chunks as this process would.
    """

    def __init__(self, backend: str, /) -> None:
        self._backend = backend
        self._evaluate: Evaluate | None = None

    def connect(self, evaluate: Evaluate, /) -> None:
        """Receive the dispatcher's ``evaluate``."""
        self._evaluate = evaluate

    def evaluate(self) -> Evaluate:
        """Return the dispatcher's ``evaluate``; RuntimeError if the dispatcher never connected."""
        if self._evaluate is None:
            msg = (
                f"the {self._backend} fast path was imported but not loaded by kldiv_spec's "
                "dispatcher"
            )
            raise RuntimeError(msg)
        return self._evaluate
