"""Two KL-divergence implementations for ``validate_my_impl.py`` to check.

Both take PyTorch's functional signature ``kl_div(input, target, reduction=...,
log_target=...)`` on NumPy arrays, which is what ``kldiv-spec check --impl
MODULE:FUNCTION`` expects; a ``backward`` attribute, when present, gives the
gradients on libraries without autograd.

* ``kl_div`` follows the specification; its ``backward`` attribute
  (``kl_div_backward``) gives both gradients.
* ``kl_div_clamped`` clamps the target into ``[1e-10, 1]`` before the log, as
  several libraries do: a zero target then contributes ``1e-10 * (log 1e-10 - x)``
  instead of 0, and targets above 1 are cut. The suite must reject it.
"""

from __future__ import annotations

import warnings

import numpy as np

REDUCTIONS = ("none", "batchmean", "sum", "mean")
MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support "
    "size.'batchmean' divides only by the batch size, and aligns with the KL div math "
    "definition.'mean' will be changed to behave the same as 'batchmean' in the next "
    "major release."
)


def _operands(input: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check the dtypes and return both operands in their common dtype."""
    for name, a in (("input", input), ("target", target)):
        if np.asarray(a).dtype.kind != "f":
            msg = f"{name} must have a real floating-point dtype"
            raise TypeError(msg)
    dtype = np.result_type(input, target)
    return np.asarray(input, dtype=dtype), np.asarray(target, dtype=dtype)


def _divisor(input: np.ndarray, output_size: int, reduction: str) -> int:
    if reduction == "mean":
        return output_size
    if reduction == "batchmean" and input.ndim > 0:
        return input.shape[0]
    return 1


def _reduce(loss: np.ndarray, input: np.ndarray, reduction: str) -> np.ndarray:
    if reduction not in REDUCTIONS:
        msg = f"{reduction} is not a valid value for reduction"
        raise ValueError(msg)
    if reduction == "none":
        return loss
    if reduction == "mean":
        warnings.warn(MEAN_WARNING, UserWarning, stacklevel=3)
    return loss.sum() / _divisor(input, loss.size, reduction)


def kl_div(
    input: np.ndarray, target: np.ndarray, reduction: str = "mean", log_target: bool = False
) -> np.ndarray:
    """KL divergence loss with PyTorch's semantics, in plain NumPy."""
    x, t = _operands(input, target)
    with np.errstate(all="ignore"):
        if log_target:
            loss = np.exp(t) * (t - x)
        else:
            loss = np.where(t == 0, 0.0, t * np.log(t)).astype(x.dtype) - t * x
        return np.asarray(_reduce(loss, x, reduction), dtype=x.dtype)


def kl_div_backward(
    grad_output: np.ndarray | float,
    input: np.ndarray,
    target: np.ndarray,
    reduction: str = "mean",
    log_target: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of ``kl_div`` with respect to ``input`` and ``target``."""
    x, t = _operands(input, target)
    shape = np.broadcast_shapes(x.shape, t.shape)
    g = np.asarray(grad_output, dtype=x.dtype) / _divisor(x, int(np.prod(shape)), reduction)
    with np.errstate(all="ignore"):
        if log_target:
            p = np.exp(t)
            grad_x, grad_t = -(g * p), g * (t - x) * p + g * p
        else:
            regular = (t > 0) & (t < np.inf)
            grad_x = -(t * g)
            grad_t = np.where(regular, g * (np.log(np.where(regular, t, 1.0)) + 1 - x), np.nan)
    return _sum_to(np.broadcast_to(grad_x, shape), x), _sum_to(np.broadcast_to(grad_t, shape), t)


def _sum_to(grad: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Sum a gradient over the axes along which ``like`` was broadcast."""
    extra = grad.ndim - like.ndim
    grad = grad.sum(axis=tuple(range(extra))) if extra else grad
    axes = tuple(i for i, n in enumerate(like.shape) if n == 1 and grad.shape[i] != 1)
    return np.asarray(grad.sum(axis=axes, keepdims=True) if axes else grad, dtype=like.dtype)


kl_div.backward = kl_div_backward  # type: ignore[attr-defined]


def kl_div_clamped(
    input: np.ndarray, target: np.ndarray, reduction: str = "mean", log_target: bool = False
) -> np.ndarray:
    """Like ``kl_div`` but with the target clamped into [1e-10, 1]: not conforming."""
    if not log_target and np.asarray(target).dtype.kind == "f":
        target = np.clip(target, np.asarray(1e-10, dtype=target.dtype), 1)
    return kl_div(input, target, reduction=reduction, log_target=log_target)
