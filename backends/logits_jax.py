"""The JAX fast path of ``kl_div_from_logits``: the reference's ``custom_vjp``, compiled.

The forward (with its analytic backward attached as a ``jax.custom_vjp``) is
``jax.jit``-compiled once per static configuration (temperature, reduction,
axis, direction, scaling, dtypes; and, as always with ``jit``, per shape), so
XLA fuses the log-softmaxes, the terms and the reduction into a few loops
over the logits instead of one dispatch per operation; the backward
(``kl_div_from_logits_backward``) is compiled the same way. Under an outer
``jax.jit`` the compiled functions are inlined. Every dtype and option is
taken; the values are the reference's formulas, evaluated by XLA.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

from kldiv_spec import _autodiff_logits_jax, _core_logits
from kldiv_spec._validation import LogitsOperands

__all__ = ["kl_div_from_logits", "kl_div_from_logits_backward"]


@functools.partial(jax.jit, static_argnums=(3,))
def _forward(x: Any, t: Any, m: Any, static: Any) -> Any:
    return _autodiff_logits_jax._from_logits(x, t, m, static)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _backward(g: Any, x: Any, t: Any, m: Any, static: Any, target_grad: bool) -> Any:
    xp, dt = static.xp, static.compute_dtype
    gs, gt = _core_logits.from_logits_backward(
        xp.astype(g, dt),
        xp.astype(x, dt),
        xp.astype(t, dt),
        mask=None if m is None else m != 0,
        target_grad=target_grad,
        **_autodiff_logits_jax._options(static),
    )
    return xp.astype(gs, x.dtype), (None if gt is None else xp.astype(gt, t.dtype))


def kl_div_from_logits(ops: LogitsOperands, /) -> Any:
    """Return the loss from the compiled forward (differentiable by ``jax.grad``)."""
    if ops.beta is not None:  # the Jensen-Shannon divergence: the reference only, for now
        return NotImplemented
    m, static = _autodiff_logits_jax.mask_and_static(ops)
    return _forward(ops.input, ops.target, m, static)


def kl_div_from_logits_backward(g: Any, ops: LogitsOperands, target_grad: bool, /) -> Any:
    """Return ``(grad_input, grad_target or None)`` from the compiled backward."""
    if ops.beta is not None:  # the Jensen-Shannon divergence: the reference only, for now
        return NotImplemented
    m, static = _autodiff_logits_jax.mask_and_static(ops)
    return _backward(g, ops.input, ops.target, m, static, target_grad)
