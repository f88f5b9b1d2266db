"""The PyTorch CPU fast path of ``kl_div_from_logits``: the NumPy kernels on zero-copy views.

Contiguous float32/float64 CPU tensors (plain ``torch.Tensor``, classes on the
last axis) are handed to :mod:`kldiv_spec.backends._blocks_logits` as NumPy
views of their storage, without a copy; the results are wrapped back with
``torch.from_numpy``, again without a copy. The forward of a loss whose
student logits require a gradient computes that gradient in the same blocked
pass (for a unit upstream gradient) and keeps it; the backward multiplies it,
in place, by the upstream gradient. So a distillation step holds the gradient
and scratch of a few rows, where the composition
``kl_div(log_softmax(s / T), softmax(t / T))`` holds several arrays of the
logits' size.

The teacher's gradient, double backward (``create_graph=True``), a second
backward through the same graph, and everything the kernels do not take
(CUDA, half precision, other axes, ``'none'`` with a gradient, tracing,
``torch.compile``, ``torch.func`` transforms, forward-mode AD, tensor
subclasses) go to the reference's analytic formulas.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch.autograd import forward_ad

from kldiv_spec._logits import LogitsOperands, core_backward

from . import _blocks
from .logits_numpy import evaluate

__all__ = ["kl_div_from_logits", "kl_div_from_logits_backward"]

_DTYPES = (torch.float32, torch.float64)
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _accepts(ops: LogitsOperands) -> bool:
    """Return whether the kernels may see these tensors (else the reference takes them)."""
    x, t, m = ops.input, ops.target, ops.mask
    tensors = (x, t) if m is None else (x, t, m)
    if any(type(a) not in _PLAIN_TYPES for a in tensors):
        return False
    if any(a.device.type != "cpu" or a.layout != torch.strided for a in tensors):
        return False
    if x.dtype not in _DTYPES or t.dtype != x.dtype:
        return False
    if not (x.is_contiguous() and t.is_contiguous()):
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if forward_ad._current_level >= 0:
        return False
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not any(is_wrapped(a) for a in tensors)


def _view(a: torch.Tensor) -> np.ndarray:
    return a.detach().numpy()


def _masked_ops(ops: LogitsOperands) -> LogitsOperands:
    """Return ``ops`` with the mask as a NumPy view (what the NumPy kernels read)."""
    if ops.mask is None:
        return ops
    return dataclasses.replace(ops, mask=_view(ops.mask))


class _FusedFromLogits(torch.autograd.Function):
    """Forward and student gradient in one blocked pass; the backward scales the gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, t: torch.Tensor, ops: LogitsOperands
    ) -> torch.Tensor:
        done = evaluate(_masked_ops(ops), _view(x), _view(t), with_grad=True)
        assert done is not None  # checked by kl_div_from_logits
        loss, grad = done
        ctx.save_for_backward(x, t)
        ctx.ops = ops
        ctx.grad = torch.from_numpy(grad)
        return torch.from_numpy(np.asarray(loss))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, t = ctx.saved_tensors
        ops: LogitsOperands = ctx.ops
        need_x, need_t = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
        kept, ctx.grad = ctx.grad, None  # used once: a second backward recomputes
        if kept is None or torch.is_grad_enabled() or need_t:
            gx, gt = core_backward(
                ops, grad.to(ops.compute_dtype), x, t, ops.kept_mask(), target_grad=need_t
            )
            return (gx if need_x else None, gt, None)
        return (kept.mul_(grad.to(kept.dtype)) if need_x else None, None, None)


def kl_div_from_logits(ops: LogitsOperands, /) -> Any:
    """Return the loss (with the fused gradient attached when needed), or NotImplemented."""
    if not _accepts(ops):
        return NotImplemented
    x, t = ops.input, ops.target
    if torch.is_grad_enabled() and (x.requires_grad or t.requires_grad):
        if ops.reduction == "none" or not _takes(ops):
            return NotImplemented
        return _FusedFromLogits.apply(x, t, ops)
    done = evaluate(_masked_ops(ops), _view(x), _view(t), with_grad=False)
    if done is None:
        return NotImplemented
    return torch.from_numpy(np.asarray(done[0]))


def _takes(ops: LogitsOperands) -> bool:
    """Return whether the NumPy kernels take a call that :func:`_accepts` (axis and size)."""
    return ops.axis == len(ops.shape) - 1 and math.prod(ops.shape) >= max(
        _blocks.min_elements(), 1
    )


def kl_div_from_logits_backward(g: Any, ops: LogitsOperands, target_grad: bool, /) -> Any:
    """Return ``(grad_input, None)`` from one blocked pass, or NotImplemented."""
    if target_grad or ops.reduction == "none" or not _accepts(ops):
        return NotImplemented
    done = evaluate(
        _masked_ops(ops), _view(ops.input), _view(ops.target), with_grad=True, need_loss=False
    )
    if done is None:
        return NotImplemented
    grad = torch.from_numpy(done[1])
    return grad.mul_(g.to(grad.dtype)), None
