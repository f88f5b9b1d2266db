r"""An independent, plain-NumPy implementation of PyTorch's ``kl_div``.

It shares no code with ``kldiv_spec``: the suite's tests use it as a second
correct implementation that must pass every property (a suite that rejects it
is wrong, not the implementation). Pointwise
:math:`\ell = t \log t - t x` (:math:`0 \log 0 = 0`) or :math:`e^t (t - x)`.
It imports nothing from the suite either: :mod:`.implementations` wraps it as
the ``numpy`` implementation and :mod:`.mutants` breaks it one piece at a time.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

__all__ = ["kl_div", "kl_div_backward"]

_REDUCTIONS = ("none", "batchmean", "sum", "mean")


def _check(input: Any, target: Any, reduction: str) -> tuple[np.ndarray, np.ndarray]:
    if reduction not in _REDUCTIONS:
        msg = f"{reduction} is not a valid value for reduction"
        raise ValueError(msg)
    x, t = np.asarray(input), np.asarray(target)
    for a in (x, t):
        if a.dtype.kind != "f":
            msg = "kl_div: Integral inputs not supported."
            raise TypeError(msg)
    dtype = np.result_type(x.dtype, t.dtype)
    return x.astype(dtype, copy=False), t.astype(dtype, copy=False)


def _divisor(reduction: str, x: np.ndarray, out_shape: tuple[int, ...]) -> int:
    if reduction == "mean":
        return int(np.prod(out_shape, dtype=np.int64))
    if reduction == "batchmean" and x.ndim:
        return x.shape[0]
    return 1


def kl_div(
    input: Any, target: Any, reduction: str = "mean", log_target: bool = False
) -> np.ndarray:
    """Return PyTorch's ``kl_div`` of NumPy arrays."""
    x, t = _check(input, target, reduction)
    if reduction == "mean":
        warnings.warn("'mean' is not 'batchmean'", UserWarning, stacklevel=2)
    with np.errstate(all="ignore"):
        if log_target:
            loss = np.exp(t) * (t - x)
        else:
            loss = np.where(t == 0, 0, t * np.log(t)).astype(t.dtype) - t * x
        loss = np.asarray(loss)
        if reduction == "none":
            return loss
        total = np.asarray(loss.sum(dtype=loss.dtype))
        d = _divisor(reduction, x, loss.shape)
        return total if d == 1 else np.asarray(total / np.asarray(d, dtype=loss.dtype))


def _sum_to(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    while a.ndim > len(shape):
        a = a.sum(axis=0)
    for i, n in enumerate(shape):
        if n == 1 and a.shape[i] != 1:
            a = a.sum(axis=i, keepdims=True)
    return a


def kl_div_backward(
    grad_output: Any,
    input: Any,
    target: Any,
    reduction: str = "mean",
    log_target: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the gradients of :func:`kl_div` w.r.t. input and target."""
    x, t = _check(input, target, reduction)
    # each gradient has its own argument's dtype, not the common one
    x_dtype, t_dtype = np.asarray(input).dtype, np.asarray(target).dtype
    out_shape = np.broadcast_shapes(x.shape, t.shape)
    with np.errstate(all="ignore"):
        g = np.asarray(grad_output, dtype=x.dtype) / _divisor(reduction, x, out_shape)
        if log_target:
            p = np.exp(t)
            gx = -(g * p)
            gt = (g * (t - x)) * p + g * p  # PyTorch's order: a +0, not -0, where e^t underflows
        else:
            gx = -t * g
            ok = (t > 0) & (t < np.inf)
            gt = np.where(ok, (np.log(np.where(ok, t, 1)) + 1 - x) * g, np.nan)
        gx = _sum_to(np.broadcast_to(gx, out_shape), x.shape).astype(x_dtype)
        gt = _sum_to(np.broadcast_to(gt, out_shape), t.shape).astype(t_dtype)
    return gx, gt
