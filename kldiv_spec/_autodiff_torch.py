"""The reference on PyTorch: the core's forward with its analytic derivatives.

A :class:`torch.autograd.Function` in the ``setup_context`` style, so it works
with ``loss.backward()``, double backward (its backward is built from
differentiable torch operations), forward-mode AD (``jvp``) and the
``torch.func`` transforms (``grad``, ``jacrev``, ``jvp``, ``vmap``).
"""

from __future__ import annotations

from typing import Any

import torch

from . import _core
from ._validation import Operands

__all__: list[str] = []


def _promoted(ops: Operands, x: torch.Tensor, t: torch.Tensor) -> tuple[Any, Any]:
    xp = ops.xp
    return xp.astype(x, ops.dtype, copy=False), xp.astype(t, ops.dtype, copy=False)


class _ReferenceKLDivCompiled(torch.autograd.Function):
    """The analytic forward and backward, without forward mode: what ``torch.compile`` traces.

    Dynamo traces a :class:`torch.autograd.Function` into the graph, forward and
    backward, but not one that defines ``jvp``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, t: torch.Tensor, ops: Operands) -> torch.Tensor:  # type: ignore[override]
        xs, ts = _promoted(ops, x, t)
        return _core.kl_div(xs, ts, reduction=ops.reduction, log_target=ops.log_target, xp=ops.xp)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, t, ops = inputs
        ctx.save_for_backward(x, t)
        ctx.save_for_forward(x, t)
        ctx.ops = ops

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, t = ctx.saved_tensors
        ops: Operands = ctx.ops
        xs, ts = _promoted(ops, x, t)
        grad_x, grad_t = _core.kl_div_backward(
            grad,
            xs,
            ts,
            reduction=ops.reduction,
            log_target=ops.log_target,
            output_shape=ops.output_shape,
            xp=ops.xp,
        )
        return (
            grad_x.to(x.dtype) if ctx.needs_input_grad[0] else None,
            grad_t.to(t.dtype) if ctx.needs_input_grad[1] else None,
            None,
        )


class _ReferenceKLDiv(_ReferenceKLDivCompiled):
    """The analytic forward and backward, and forward mode (``jvp``)."""

    generate_vmap_rule = True

    @staticmethod
    def jvp(ctx: Any, dx: Any, dt: Any, *_: Any) -> torch.Tensor:
        x, t = ctx.saved_tensors
        ops: Operands = ctx.ops
        xp = ops.xp
        xs, ts = _promoted(ops, x, t)
        ones = torch.ones((), dtype=ops.dtype, device=x.device)
        d_x, d_t = _core.pointwise_gradients(ones, xs, ts, log_target=ops.log_target, xp=xp)
        tangent = torch.zeros((), dtype=ops.dtype, device=x.device)
        if dx is not None:
            tangent = tangent + d_x * dx.to(ops.dtype)
        if dt is not None:
            tangent = tangent + d_t * dt.to(ops.dtype)
        tangent = torch.broadcast_to(tangent, ops.output_shape)
        return _core.reduce_loss(
            tangent, reduction=ops.reduction, batch_size=ops.batch_size, xp=xp
        )


def kl_div_with_gradient(ops: Operands, /) -> Any:
    """Evaluate the reference on tensors with the analytic derivatives attached."""
    if torch.compiler.is_compiling():
        return _ReferenceKLDivCompiled.apply(ops.input, ops.target, ops)
    return _ReferenceKLDiv.apply(ops.input, ops.target, ops)
