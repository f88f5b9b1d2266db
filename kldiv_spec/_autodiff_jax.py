"""The reference on JAX: the core's forward with its analytic backward as a ``custom_vjp``.

``jax.grad`` then gives the specified gradients, edge values included, eagerly
and under ``jax.jit``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

from . import _core
from ._validation import Operands

__all__: list[str] = []


def _static(ops: Operands) -> tuple[Any, Any, tuple[int, ...]]:
    return ops.xp, ops.dtype, ops.output_shape


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _kl_div(x: Any, t: Any, static: Any, reduction: str, log_target: bool) -> Any:
    xp, dtype, _ = static
    return _core.kl_div(
        xp.astype(x, dtype),
        xp.astype(t, dtype),
        reduction=reduction,
        log_target=log_target,
        xp=xp,
    )


def _forward(x: Any, t: Any, static: Any, reduction: str, log_target: bool) -> Any:
    return _kl_div(x, t, static, reduction, log_target), (x, t)


def _backward(static: Any, reduction: str, log_target: bool, saved: Any, g: Any) -> Any:
    xp, dtype, output_shape = static
    x, t = saved
    grad_x, grad_t = _core.kl_div_backward(
        g,
        xp.astype(x, dtype),
        xp.astype(t, dtype),
        reduction=reduction,
        log_target=log_target,
        output_shape=output_shape,
        xp=xp,
    )
    return xp.astype(grad_x, x.dtype), xp.astype(grad_t, t.dtype)


_kl_div.defvjp(_forward, _backward)


def kl_div_with_gradient(ops: Operands, /) -> Any:
    """Evaluate the reference on JAX arrays with the analytic gradient attached."""
    return _kl_div(ops.input, ops.target, _static(ops), ops.reduction, ops.log_target)
