"""What the suite checks: an implementation with PyTorch's functional signature.

An :class:`Implementation` wraps ``fn(input, target, reduction=..., log_target=...)``
and declares what it can express: its reductions, its ``log_target`` forms, the
backends it runs on, and properties that do not apply to it (reported as n/a,
never as failures). ``--impl`` names are resolved by :func:`resolve`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["REDUCTIONS", "Implementation", "resolve"]

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
    import kldiv_spec

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
    from .numpy_impl import NUMPY_IMPLEMENTATION

    return NUMPY_IMPLEMENTATION


BUILTIN: dict[str, Callable[[], Implementation]] = {
    "reference": _reference,
    "torch": _torch,
    "numpy": _numpy,
}


def resolve(spec: str, /) -> Implementation:
    """Return the implementation named by ``spec``.

    ``spec`` is ``reference``, ``torch``, ``numpy`` (the suite's independent
    NumPy implementation), an adapter name (see :mod:`.adapters`), ``mutant:NAME``
    (see :mod:`.mutants`) or ``MODULE:CALLABLE``. The callable may be an
    :class:`Implementation`, or a function with PyTorch's functional signature
    (a ``backward`` attribute on it, if any, is used as its backward).

    Raises
    ------
    ValueError
        If ``spec`` names nothing importable.
    """
    from . import adapters, mutants

    if spec in BUILTIN:
        return BUILTIN[spec]()
    if spec in adapters.ADAPTERS:
        return adapters.load(spec)
    if spec.startswith("mutant:"):
        name = spec.split(":", 1)[1]
        if name not in mutants.MUTANTS:
            msg = f"unknown mutant {name!r}; choose from {', '.join(mutants.MUTANTS)}"
            raise ValueError(msg)
        return mutants.MUTANTS[name]
    if ":" not in spec:
        known = ", ".join([*BUILTIN, *adapters.ADAPTERS])
        msg = f"--impl must be one of {known}, mutant:NAME or MODULE:CALLABLE, got {spec!r}"
        raise ValueError(msg)
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        msg = f"cannot load {spec!r}: {exc}"
        raise ValueError(msg) from None
    if isinstance(obj, Implementation):
        return obj
    if not callable(obj):
        msg = f"{spec!r} is not callable"
        raise ValueError(msg)
    return Implementation(spec, obj, backward=getattr(obj, "backward", None), description=spec)
