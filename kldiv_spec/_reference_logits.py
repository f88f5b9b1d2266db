"""The reference evaluation of the from-logits functions: the core, in the compute dtype.

Half precision is computed in float32 (:attr:`LogitsOperands.compute_dtype`) and the
result rounded once to the operands' dtype. On PyTorch and JAX the dispatcher attaches
the analytic backward to :func:`core_forward` (``_autodiff_logits_torch``,
``_autodiff_logits_jax``).
"""

from __future__ import annotations

from typing import Any

from . import _core_logits
from ._floating_point import quiet
from ._validation import LogitsOperands

__all__: list[str] = []

Array = Any


def forward(ops: LogitsOperands, /) -> Array:
    """Evaluate :func:`kldiv_spec.kl_div_from_logits` with the core."""
    xp = ops.xp
    s, t = (xp.astype(a, ops.compute_dtype, copy=False) for a in (ops.input, ops.target))
    with quiet(xp):
        out = core_forward(ops, s, t, ops.kept_mask())
        return xp.astype(out, ops.dtype, copy=False)


def backward(g: Array, ops: LogitsOperands, target_grad: bool, /) -> tuple[Array, Array | None]:
    """Evaluate the gradients with the core, each in its own argument's dtype."""
    xp = ops.xp
    s, t = (xp.astype(a, ops.compute_dtype, copy=False) for a in (ops.input, ops.target))
    g = xp.astype(g, ops.compute_dtype, copy=False)
    with quiet(xp):
        gs, gt = core_backward(ops, g, s, t, ops.kept_mask(), target_grad=target_grad)
        gs = xp.astype(gs, ops.input.dtype, copy=False)
        gt = None if gt is None else xp.astype(gt, ops.target.dtype, copy=False)
    return gs, gt


def core_forward(ops: LogitsOperands, s: Array, t: Array, mask: Array | None, /) -> Array:
    """Call :func:`kldiv_spec._core_logits.from_logits` with the options of ``ops``."""
    return _core_logits.from_logits(
        s,
        t,
        temperature=ops.temperature,
        factor=ops.factor,
        reduction=ops.reduction,
        axis=ops.axis,
        direction=ops.direction,
        mask=mask,
        xp=ops.xp,
        beta=ops.beta,
    )


def core_backward(
    ops: LogitsOperands, g: Array, s: Array, t: Array, mask: Array | None, /, target_grad: bool
) -> tuple[Array, Array | None]:
    """Call :func:`kldiv_spec._core_logits.from_logits_backward` with the options of ``ops``."""
    return _core_logits.from_logits_backward(
        g,
        s,
        t,
        temperature=ops.temperature,
        factor=ops.factor,
        reduction=ops.reduction,
        axis=ops.axis,
        direction=ops.direction,
        mask=mask,
        target_grad=target_grad,
        xp=ops.xp,
        beta=ops.beta,
    )
