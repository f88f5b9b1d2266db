"""The from-logits reference on PyTorch: the core's forward with its analytic backward.

:class:`torch.autograd.Function` s in the ``setup_context`` style, like
:mod:`kldiv_spec._autodiff_torch`: ``loss.backward()``, ``torch.autograd.grad``
and double backward (the backward is made of differentiable torch operations)
give the specified gradients, edge values included. The teacher's gradient is
computed only when autograd asks for it.
"""

from __future__ import annotations

from typing import Any

import torch

from ._reference_logits import core_backward, core_forward
from ._validation import LogitsOperands

__all__: list[str] = []


class _ReferenceFromLogits(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, t: torch.Tensor, ops: LogitsOperands) -> torch.Tensor:  # type: ignore[override]
        s, tt = x.to(ops.compute_dtype), t.to(ops.compute_dtype)
        return core_forward(ops, s, tt, ops.kept_mask()).to(ops.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, t, ops = inputs
        ctx.save_for_backward(x, t)
        ctx.ops = ops

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, t = ctx.saved_tensors
        ops: LogitsOperands = ctx.ops
        s, tt = x.to(ops.compute_dtype), t.to(ops.compute_dtype)
        gs, gt = core_backward(
            ops,
            grad.to(ops.compute_dtype),
            s,
            tt,
            ops.kept_mask(),
            target_grad=bool(ctx.needs_input_grad[1]),
        )
        return (
            gs.to(x.dtype) if ctx.needs_input_grad[0] else None,
            gt.to(t.dtype) if gt is not None else None,
            None,
        )


def from_logits_with_gradient(ops: LogitsOperands, /) -> Any:
    """Evaluate the reference on tensors with the analytic gradients attached."""
    return _ReferenceFromLogits.apply(ops.input, ops.target, ops)
