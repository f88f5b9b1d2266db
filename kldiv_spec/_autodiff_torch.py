"""The reference on PyTorch: the core's forward with its analytic backward.

A :class:`torch.autograd.Function` whose backward is built from differentiable
torch operations, so double backward (``gradgradcheck``) works too.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _core
from ._validation import Operands

__all__: list[str] = []


class _ReferenceKLDiv(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        t: torch.Tensor,
        ops: Operands,
        reduction: str,
        log_target: bool,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, t)
        ctx.ops, ctx.reduction, ctx.log_target = ops, reduction, log_target
        xp = ops.xp
        return _core.kl_div(
            xp.astype(x, ops.dtype, copy=False),
            xp.astype(t, ops.dtype, copy=False),
            reduction=reduction,
            log_target=log_target,
            xp=xp,
        )

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, t = ctx.saved_tensors
        ops: Operands = ctx.ops
        xp = ops.xp
        grad_x, grad_t = _core.kl_div_backward(
            grad,
            xp.astype(x, ops.dtype, copy=False),
            xp.astype(t, ops.dtype, copy=False),
            reduction=ctx.reduction,
            log_target=ctx.log_target,
            output_shape=ops.output_shape,
            xp=xp,
        )
        return (
            grad_x.to(x.dtype) if ctx.needs_input_grad[0] else None,
            grad_t.to(t.dtype) if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
        )


def kl_div_with_gradient(ops: Operands, /, *, reduction: str, log_target: bool) -> Any:
    """Evaluate the reference on tensors, attaching the analytic backward when needed."""
    x, t = ops.input, ops.target
    if torch.is_grad_enabled() and (x.requires_grad or t.requires_grad):
        return _ReferenceKLDiv.apply(x, t, ops, reduction, log_target)
    xp = ops.xp
    return _core.kl_div(
        xp.astype(x, ops.dtype, copy=False),
        xp.astype(t, ops.dtype, copy=False),
        reduction=reduction,
        log_target=log_target,
        xp=xp,
    )
