"""Adapters for KL-divergence implementations that do not share PyTorch's signature.

Each maps its library's call onto ``(input, target, reduction, log_target)``
(``input`` = log q, ``target`` = p or log p) and declares what it cannot
express, which reports show as n/a rather than as failures. Only installed
libraries can be checked; :func:`load` raises ``ImportError`` otherwise and the
CLI reports "not installed". See ``shared/reference/peers.md`` for what each
is expected to show.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .implementations import Implementation

__all__ = ["ADAPTERS", "load"]

_NO_MEAN_WARNING = {"semantics.mean_warning": "the library has no 'mean' warning"}
_NO_ERRORS = {
    "semantics.bad_reduction": "the adapter, not the library, handles reduction",
}


def _reduce(xp: Any, rows_or_loss: Any, reduction: str, batch: int | None, numel: int) -> Any:
    if reduction == "none":
        return rows_or_loss
    if reduction not in ("sum", "mean", "batchmean"):
        msg = f"{reduction} is not a valid value for reduction"
        raise ValueError(msg)
    total = xp.sum(rows_or_loss)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / numel
    return total / batch if batch is not None else total


def _rows(xp: Any, input: Any, target: Any, *, two_d: bool = False) -> tuple[Any, Any]:
    """Broadcast ``input`` and ``target`` for a library that reduces over the last axis.

    PyTorch's loss is elementwise, so any shape is rows of the last axis: 0-d
    operands become one row of one element, and with ``two_d`` (a library that
    takes 2-D arrays only) leading axes are merged into one. The adapter sums
    the rows, so neither reshaping changes the loss.
    """
    broadcast = getattr(xp, "broadcast_arrays", None) or xp.broadcast_tensors  # torch
    x, t = broadcast(input, target)
    if x.ndim == 0:
        x, t = xp.reshape(x, (1,)), xp.reshape(t, (1,))
    if two_d:
        rows = (math.prod(x.shape[:-1]), x.shape[-1])
        x, t = xp.reshape(x, rows), xp.reshape(t, rows)
    return x, t


def _scipy_rel_entr() -> Implementation:
    import scipy.special

    def fn(input: Any, target: Any, reduction: str = "mean", log_target: bool = False) -> Any:
        x, t = np.asarray(input), np.asarray(target)
        if x.dtype.kind != "f" or t.dtype.kind != "f":
            msg = "floating inputs only"
            raise TypeError(msg)
        with np.errstate(all="ignore"):
            loss = np.asarray(scipy.special.rel_entr(t, np.exp(x)))
            n = int(np.prod(loss.shape))
            return np.asarray(_reduce(np, loss, reduction, x.shape[0] if x.ndim else None, n))

    return Implementation(
        "scipy-rel-entr",
        fn,
        log_targets=(False,),
        backends=("numpy",),
        not_applicable={**_NO_MEAN_WARNING, **_NO_ERRORS},
        differentiable=False,
        description="scipy.special.rel_entr(p, exp(input)), reduced by the adapter",
    )


def _optax() -> Implementation:
    import optax

    def fn(input: Any, target: Any, reduction: str = "mean", log_target: bool = False) -> Any:
        import jax.numpy as jnp

        f = (
            optax.losses.kl_divergence_with_log_targets
            if log_target
            else (optax.losses.kl_divergence)
        )
        rows = f(*_rows(jnp, input, target))
        batch = input.shape[0] if input.ndim else None
        return _reduce(
            jnp,
            rows,
            reduction,
            batch,
            int(np.prod(jnp.broadcast_shapes(input.shape, target.shape))),
        )

    return Implementation(
        "optax",
        fn,
        reductions=("sum", "batchmean"),
        backends=("jax",),
        not_applicable={**_NO_MEAN_WARNING, **_NO_ERRORS},
        description="optax.losses.kl_divergence[_with_log_targets], rows summed by the adapter",
    )


def _keras() -> Implementation:
    import os

    os.environ.setdefault("KERAS_BACKEND", "jax")  # read when keras is first imported
    import keras

    if keras.backend.backend() != "jax":
        msg = f"the keras adapter needs KERAS_BACKEND=jax, not {keras.backend.backend()!r}"
        raise ImportError(msg)

    def fn(input: Any, target: Any, reduction: str = "mean", log_target: bool = False) -> Any:
        import jax.numpy as jnp

        x, t = _rows(jnp, input, target)
        loss = keras.losses.KLDivergence(reduction="sum")
        return loss(t, jnp.exp(x))

    return Implementation(
        "keras",
        fn,
        reductions=("sum",),
        log_targets=(False,),
        backends=("jax",),
        not_applicable={**_NO_MEAN_WARNING, **_NO_ERRORS},
        description="keras.losses.KLDivergence(y_true=p, y_pred=exp(input)), JAX backend",
    )


def _torchmetrics() -> Implementation:
    from torchmetrics.functional import kl_divergence

    def fn(input: Any, target: Any, reduction: str = "mean", log_target: bool = False) -> Any:
        import torch

        x, t = _rows(torch, input, target, two_d=True)
        if log_target:
            rows = kl_divergence(t, x, log_prob=True, reduction="none")
        else:
            rows = kl_divergence(t, torch.exp(x), log_prob=False, reduction="none")
        batch = input.shape[0] if input.ndim else None
        return _reduce(torch, rows, reduction, batch, x.numel())

    return Implementation(
        "torchmetrics",
        fn,
        reductions=("sum", "batchmean"),
        backends=("torch", "torch_cuda"),
        not_applicable={**_NO_MEAN_WARNING, **_NO_ERRORS},
        description="torchmetrics.functional.kl_divergence(p, q) (2-D only, renormalises)",
    )


def _mlx() -> Implementation:
    import mlx.core as mx
    import mlx.nn.losses as losses

    def fn(input: Any, target: Any, reduction: str = "mean", log_target: bool = False) -> Any:
        xn, tn = _rows(np, np.asarray(input), np.asarray(target))
        rows = np.asarray(
            losses.kl_div_loss(mx.array(xn), mx.array(tn), axis=-1, reduction="none")
        )
        batch = np.shape(input)[0] if np.ndim(input) else None
        return np.asarray(_reduce(np, rows, reduction, batch, xn.size))

    # kl_div_loss takes log-targets only; feeding it log(t) would add NaN at t = 0
    # that is the adapter's, not mlx's.
    return Implementation(
        "mlx",
        fn,
        reductions=("sum", "batchmean"),
        log_targets=(True,),
        backends=("numpy",),
        not_applicable={**_NO_MEAN_WARNING, **_NO_ERRORS},
        differentiable=False,
        description="mlx.nn.losses.kl_div_loss (log-targets), rows summed by the adapter",
    )


def _paddle() -> Implementation:
    import paddle

    def fn(input: Any, target: Any, reduction: str = "mean", log_target: bool = False) -> Any:
        out = paddle.nn.functional.kl_div(
            paddle.to_tensor(np.asarray(input)),
            paddle.to_tensor(np.asarray(target)),
            reduction=reduction,
            log_target=log_target,
        )
        return np.asarray(out.numpy())

    return Implementation(
        "paddle",
        fn,
        backends=("numpy",),
        differentiable=False,
        description="paddle.nn.functional.kl_div (NumPy in and out)",
    )


#: Every adapter, by ``--impl`` name.
ADAPTERS: dict[str, Callable[[], Implementation]] = {
    "scipy-rel-entr": _scipy_rel_entr,
    "optax": _optax,
    "keras": _keras,
    "torchmetrics": _torchmetrics,
    "mlx": _mlx,
    "paddle": _paddle,
}


def load(name: str, /) -> Implementation:
    """Return the adapter called ``name``; ImportError if its library is not installed."""
    return ADAPTERS[name]()
