"""What the suite checks: an implementation with PyTorch's functional signature.

An :class:`Implementation` wraps ``fn(input, target, reduction=..., log_target=...)``
and declares what it can express: its reductions, its ``log_target`` forms, the
backends it runs on, and properties that do not apply to it (reported as n/a,
never as failures). :data:`BUILTIN` holds the built-in ones (``reference``,
``torch``, ``numpy``); :func:`.runner.resolve` turns any ``--impl`` name into one.

This module sits below every other that builds implementations
(:mod:`.adapters`, :mod:`.mutants`): it imports only :mod:`.numpy_impl`, which
imports nothing from the suite.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kldiv_spec

from . import numpy_impl

__all__ = ["BUILTIN", "REDUCTIONS", "Implementation"]

REDUCTIONS: tuple[str, ...] = ("none", "batchmean", "sum", "mean")


@dataclass(frozen=True)
class Implementation:
    """A KL-divergence implementation under test.

    Parameters
    ----------
    name : str
        How reports name it.
    fn : callable
        ``fn(input, target, reduction=..., log_target=...)`` on arrays of the backend.
    backward : callable, optional
        ``backward(grad_output, input, target, reduction=..., log_target=...)``
        returning ``(grad_input, grad_target)``; used on backends without
        autograd. Without it (and without autograd) the gradient group is n/a.
    reductions : tuple of str
        The reductions it can express; properties needing others are n/a.
    log_targets : tuple of bool
        The ``log_target`` forms it can express.
    backends : tuple of str, optional
        The backends it runs on (None: any).
    not_applicable : mapping
        Property (or group) name -> why it does not apply.
    differentiable : bool
        Whether gradients through the backend's autograd are part of its contract.
    """

    name: str
    fn: Callable[..., Any]
    backward: Callable[..., Any] | None = None
    reductions: tuple[str, ...] = REDUCTIONS
    log_targets: tuple[bool, ...] = (False, True)
    backends: tuple[str, ...] | None = None
    not_applicable: Mapping[str, str] = field(default_factory=dict)
    differentiable: bool = True
    description: str = ""

    def __call__(self, input: Any, target: Any, /, **kwargs: Any) -> Any:
        """Call the wrapped function."""
        return self.fn(input, target, **kwargs)


def _reference() -> Implementation:
    def fn(input: Any, target: Any, reduction: str = "mean", log_target: bool = False) -> Any:
        return kldiv_spec.kl_div(input, target, reduction=reduction, log_target=log_target)

    def backward(
        g: Any, input: Any, target: Any, reduction: str = "mean", log_target: bool = False
    ) -> Any:
        return kldiv_spec.kl_div_backward(
            g, input, target, reduction=reduction, log_target=log_target
        )

    return Implementation(
        "reference", fn, backward, description="kldiv_spec.kl_div (+ kl_div_backward)"
    )


def _torch() -> Implementation:
    import torch

    return Implementation(
        "torch",
        torch.nn.functional.kl_div,
        backends=("torch", "torch_cuda"),
        description="torch.nn.functional.kl_div",
    )


def _numpy() -> Implementation:
    return Implementation(
        "numpy",
        numpy_impl.kl_div,
        numpy_impl.kl_div_backward,
        backends=("numpy",),
        description="kldiv_spec.conformance.numpy_impl (independent NumPy code)",
    )


#: The built-in implementations, by ``--impl`` name (factories: ``torch`` is imported on call).
BUILTIN: dict[str, Callable[[], Implementation]] = {
    "reference": _reference,
    "torch": _torch,
    "numpy": _numpy,
}
