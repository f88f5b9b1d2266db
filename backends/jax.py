r"""JAX fast path: ``jax.jit``-compiled forward and backward joined by a ``custom_vjp``.

One compiled function per static configuration ``(reduction, log_target)``
(and, as always with ``jit``, per shape and dtype): XLA fuses the pointwise
loss into the reduction, so no full-size temporary is made, and float32 losses
are accumulated in float64 when 64-bit types are enabled. The ``custom_vjp``
saves nothing but the two inputs; the backward is the reference's analytic
gradient (that of :func:`kldiv_spec._core.kl_div_backward`), compiled, so ``jax.grad``
gives the specified values, edge values included, eagerly and under an outer
``jax.jit`` (where the compiled functions are inlined).

Only float32 and float64 operands of one dtype and one shape are taken;
anything else (broadcasting, half precision) goes to the reference.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from kldiv_spec import _core
from kldiv_spec._validation import Operands

__all__ = ["kl_div", "kl_div_backward"]

_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))


def _accepts(ops: Operands) -> bool:
    return ops.input.dtype in _DTYPES and ops.same_shape_and_dtype


def _accumulator(dtype: Any) -> Any:
    """float64 for float32 losses when JAX has 64-bit types enabled (it costs nothing)."""
    return jnp.float64 if jax.config.read("jax_enable_x64") else dtype


def _loss(x: Any, t: Any, reduction: str, log_target: bool, divisor: int) -> Any:
    pointwise = _core.pointwise_loss(x, t, log_target=log_target, xp=jnp)
    if reduction == "none":
        return pointwise
    total = jnp.sum(pointwise, dtype=_accumulator(x.dtype)).astype(x.dtype)
    return _divide(total, divisor)


def _divide(total: Any, divisor: int) -> Any:
    """:func:`kldiv_spec._core.divide_total` for float32/float64 inside compiled code.

    XLA compiles a division by a constant as a multiplication by its rounded
    reciprocal, which can be one ulp away from the correctly rounded quotient
    that the rounding rule specifies; behind an optimisation barrier the
    divisor is not a constant, and the division stays a division.
    """
    if divisor in (0, 1):
        return _core.divide_total(total, divisor, xp=jnp)
    return total / jax.lax.optimization_barrier(jnp.asarray(divisor, dtype=total.dtype))


def _pointwise_gradients(g: Any, x: Any, t: Any, log_target: bool) -> tuple[Any, Any]:
    """Return the core's pointwise gradients, robust to XLA's flushing of subnormals.

    XLA on the CPU may compare a subnormal ``t`` as positive inside a fused
    kernel yet take its ``log`` as ``log 0 = -inf``; requiring a finite
    ``log t`` as well keeps the target gradient NaN there, as the op-by-op
    reference gives. Everywhere else this is :func:`kldiv_spec._core.pointwise_gradients`.
    """
    if log_target:
        return _core.pointwise_gradients(g, x, t, log_target=True, xp=jnp)
    log_t = jnp.log(t)
    regular = (t > 0) & (t < jnp.inf) & (log_t > -jnp.inf)
    grad_t = jnp.where(regular, g * (jnp.where(regular, log_t, 0) + 1 - x), jnp.nan)
    return -(t * g), grad_t


def _gradients(g: Any, x: Any, t: Any, log_target: bool, divisor: int) -> tuple[Any, Any]:
    g = _divide(g.astype(x.dtype), divisor)
    grad_x, grad_t = _pointwise_gradients(g, x, t, log_target)
    return jnp.broadcast_to(grad_x, x.shape), jnp.broadcast_to(grad_t, t.shape)


_forward_jit = jax.jit(_loss, static_argnums=(2, 3, 4))
_backward_jit = jax.jit(_gradients, static_argnums=(3, 4))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _kl_div(x: Any, t: Any, reduction: str, log_target: bool, divisor: int) -> Any:
    return _forward_jit(x, t, reduction, log_target, divisor)


def _kl_div_fwd(x: Any, t: Any, reduction: str, log_target: bool, divisor: int) -> tuple[Any, Any]:
    return _forward_jit(x, t, reduction, log_target, divisor), (x, t)


def _kl_div_bwd(
    reduction: str, log_target: bool, divisor: int, saved: Any, g: Any
) -> tuple[Any, Any]:
    x, t = saved
    return _backward_jit(g, x, t, log_target, divisor)


_kl_div.defvjp(_kl_div_fwd, _kl_div_bwd)


def kl_div(ops: Operands, /) -> Any:
    """Evaluate the loss with the compiled path, or return ``NotImplemented``."""
    if not _accepts(ops):
        return NotImplemented
    return _kl_div(ops.input, ops.target, ops.reduction, ops.log_target, ops.divisor)


def kl_div_backward(g: Any, ops: Operands, /) -> tuple[Any, Any] | Any:
    """Both gradients with the compiled backward, or ``NotImplemented``."""
    if not _accepts(ops):
        return NotImplemented
    x = ops.input
    g = jnp.broadcast_to(jnp.asarray(g), x.shape if ops.reduction == "none" else ())
    return _backward_jit(g, x, ops.target, ops.log_target, ops.divisor)
