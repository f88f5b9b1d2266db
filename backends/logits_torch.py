"""The PyTorch fast paths of ``kl_div_from_logits``: Triton on CUDA, the NumPy kernels on the CPU.

**CUDA** (and CPU tensors while Triton runs in its interpreter,
``TRITON_INTERPRET=1``, which is how the tests drive it): contiguous float16,
bfloat16, float32 and float64 logits with the classes on the last axis go to
the Triton kernel of :mod:`kldiv_spec.backends._triton_logits`, one program per
row with an online softmax; half precision is computed in float32, as the
reference does. The rows' divergences are added in float64 on the device,
rounded to the compute dtype and divided once (with a mask, by the number of
kept rows counted on the device): no host synchronisation. The forward of a
loss whose student logits require a gradient writes that gradient (for a unit
upstream gradient) in the same launch, in a second pass over each row, and
keeps it; the backward multiplies it, in place, by the upstream gradient.

**CPU**: contiguous float32/float64 tensors (plain ``torch.Tensor``, classes
on the last axis) are handed to :mod:`kldiv_spec.backends._blocks_logits` as
NumPy views of their storage, without a copy; the results are wrapped back
with ``torch.from_numpy``, again without a copy, with the same fused
forward-and-gradient scheme. float16 and bfloat16 tensors too, where the
compiled kernel runs (bfloat16 as the int16 view of its bits): the kernel
reads them in their own width, computes in float32 and rounds the gradient once
to the dtype; the loss is computed in float32 and rounded once. The kept gradient is
for an upstream gradient of 1; a backward with another one evaluates the
gradient again with it in the kernel's scale, so that it is rounded once.
So a distillation step holds the gradient and scratch of a few rows, where the composition
``kl_div(log_softmax(s / T), softmax(t / T))`` holds several arrays of the
logits' size.

The generalised Jensen-Shannon divergence (``0 < beta < 1``; 0 and 1 are the two
KLs, above) takes its own kernels: Triton on CUDA
(:mod:`kldiv_spec.backends._triton_jsd`) and, for contiguous float32 CPU tensors,
the compiled kernel of :mod:`kldiv_spec.backends._blocks_jsd`, with the same
forward-and-gradient scheme.

The teacher's gradient, double backward (``create_graph=True``), a second
backward through the same graph, and everything the kernels do not take
(other axes, strided or mixed-dtype operands, empty operands, ``'none'``
(forward with a gradient, and its backward), half precision on a CPU
without the compiled kernel, tracing, ``torch.compile``, ``torch.func``
transforms, forward-mode AD, tensor subclasses) go to the reference's analytic formulas.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from typing import Any

import numpy as np
import torch
from torch.autograd import forward_ad

from kldiv_spec import _core_logits, _settings
from kldiv_spec._core import divide_total
from kldiv_spec._reference_logits import core_backward
from kldiv_spec._validation import LogitsOperands

from . import _blocks, _blocks_logits
from .logits_numpy import evaluate

__all__ = ["kl_div_from_logits", "kl_div_from_logits_backward"]

_DTYPES = (torch.float32, torch.float64)
#: Half precision on the CPU: computed in float32 by the compiled kernel, where it runs.
_HALF_DTYPES = (torch.float16, torch.bfloat16)
#: The dtypes of the Triton kernel (half precision computed in float32).
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain(ops: LogitsOperands) -> bool:
    """Return whether these are plain strided tensors outside tracing and transforms."""
    x, t, m = ops.input, ops.target, ops.mask
    tensors = (x, t) if m is None else (x, t, m)
    if any(type(a) not in _PLAIN_TYPES for a in tensors):
        return False
    if any(a.layout != torch.strided for a in tensors):
        return False
    if not (x.is_contiguous() and t.is_contiguous()) or t.dtype != x.dtype:
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if forward_ad._current_level >= 0:
        return False
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not any(is_wrapped(a) for a in tensors)


def _accepts(ops: LogitsOperands) -> bool:
    """Return whether the NumPy kernels may see these tensors (else the reference takes them)."""
    x = ops.input
    if ops.mask is not None and ops.mask.device.type != "cpu":
        return False
    if x.device.type != "cpu" or not _plain(ops):
        return False
    return x.dtype in _DTYPES or (x.dtype in _HALF_DTYPES and _blocks_logits.fused_available())


@functools.cache
def _triton_importable() -> bool:
    """Return whether Triton is installed (then the kernels must import: no fall-back)."""
    if importlib.util.find_spec("triton") is None:
        return False
    from . import _triton_logits  # noqa: F401  (an error here is ours, and propagates)

    return True


@functools.cache
def _interpreted() -> bool:
    """Return whether CPU tensors go to the Triton kernels (Triton's interpreter is on)."""
    if not _settings.current.triton_interpret:
        return False
    if not _triton_importable():
        return False
    from . import _triton_logits

    return _triton_logits.interpreting()


def _on_triton(ops: LogitsOperands) -> bool:
    """Return whether the Triton kernel takes the call (CUDA, or the CPU when interpreted)."""
    x = ops.input
    device = x.device.type
    if device == "cuda":
        if not _triton_importable():
            return False
    elif device != "cpu" or not _interpreted():
        return False
    if x.dtype not in _TRITON_DTYPES or ops.axis != len(ops.shape) - 1 or x.numel() == 0:
        return False
    return _plain(ops)


def _view(a: torch.Tensor) -> np.ndarray:
    """Return the NumPy array on ``a``'s memory (zero-copy): int16 bits for bfloat16."""
    a = a.detach()
    return (a.view(torch.int16) if a.dtype == torch.bfloat16 else a).numpy()


def _tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Return the tensor on ``a``'s memory (zero-copy) read as ``dtype`` (bfloat16 bits)."""
    out = torch.from_numpy(a)
    return out.view(torch.bfloat16) if dtype == torch.bfloat16 else out


def _loss(loss: Any, dtype: torch.dtype) -> torch.Tensor:
    """Return the kernels' loss as a ``dtype`` tensor.

    For bfloat16 a reduced loss comes in float32 (rounded here) and the ``'none'``
    terms as the int16 bits the kernel wrote (read as bfloat16, zero-copy).
    """
    out = np.asarray(loss)
    if out.dtype == np.int16:
        return _tensor(out, dtype)
    return torch.from_numpy(out).to(dtype)


def _evaluate(ops: LogitsOperands, /, **options: Any) -> tuple[Any, Any] | None:
    """:func:`evaluate` on the tensors' memory: ``(loss, gradient)`` as tensors, or None."""
    x, t = ops.input, ops.target
    bf16 = x.dtype == torch.bfloat16
    done = evaluate(_masked_ops(ops), _view(x), _view(t), bfloat16=bf16, **options)
    if done is None:
        return None
    loss, grad = done
    return _loss(loss, x.dtype), (None if grad is None else _tensor(grad, x.dtype))


def _masked_ops(ops: LogitsOperands) -> LogitsOperands:
    """Return ``ops`` with the mask as a NumPy view (what the NumPy kernels read)."""
    if ops.mask is None:
        return ops
    return dataclasses.replace(ops, mask=_view(ops.mask))


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    """Return the input gradients of both fused Functions: the kept one scaled by ``grad``.

    The forward keeps the student gradient of a unit upstream gradient (``ctx.grad``);
    it serves one backward. A second backward, a graph being built through it
    (double backward) or a target that needs a gradient recompute with
    :func:`kldiv_spec._reference_logits.core_backward`. Gradients come back in the operands'
    dtypes.
    """
    x, t = ctx.saved_tensors
    ops: LogitsOperands = ctx.ops
    need_x, need_t = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    kept, ctx.grad = ctx.grad, None  # used once: a second backward recomputes
    if kept is None or torch.is_grad_enabled() or need_t:
        cdt = ops.compute_dtype  # core_backward computes in its arguments' dtype
        gx, gt = core_backward(
            ops, grad.to(cdt), x.to(cdt), t.to(cdt), ops.kept_mask(), target_grad=need_t
        )
        return (
            gx.to(x.dtype) if need_x else None,
            None if gt is None else gt.to(t.dtype),
            None,
        )
    if not need_x:
        return (None, None, None)
    if kept.dtype in _HALF_DTYPES and not bool(grad == 1.0):
        # the kept half-precision gradient is for an upstream gradient of 1: another one is
        # put into the kernel's scale, so that the gradient is rounded once
        done = _evaluate(ops, with_grad=True, need_loss=False, upstream=float(grad))
        assert done is not None
        return (done[1], None, None)
    return (kept.mul_(grad.to(kept.dtype)).to(x.dtype), None, None)


class _FusedFromLogits(torch.autograd.Function):
    """Forward and student gradient in one blocked pass; the backward scales the gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, t: torch.Tensor, ops: LogitsOperands
    ) -> torch.Tensor:
        if ops.beta is None:
            done = _evaluate(ops, with_grad=True)
        else:
            done = _jsd_evaluate(ops, with_grad=True)
        assert done is not None  # checked by kl_div_from_logits
        loss, grad = done
        ctx.save_for_backward(x, t)
        ctx.ops = ops
        ctx.grad = grad
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return _backward(ctx, grad)


# --------------------------------------------------------------------------- Triton


def _rows(ops: LogitsOperands) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return 2-d ``(rows, classes)`` views of the logits and the kept rows (uint8) or None."""
    vocab = ops.shape[-1]
    rows = math.prod(ops.shape[:-1])
    s2 = ops.input.detach().reshape(rows, vocab)
    t2 = ops.target.detach().reshape(rows, vocab)
    kept = None
    if ops.mask is not None:
        full = torch.broadcast_to(ops.mask.detach(), ops.row_shape)
        kept = full.reshape(rows).contiguous().view(torch.uint8)
    return s2, t2, kept


def _per_term(ops: LogitsOperands, g: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """Return :math:`G = g / D` (0-d, compute dtype, on the device): the reference's weight.

    ``D`` is the reduction's divisor; with a mask, the number of kept rows counted
    on the device (0 kept rows give 0), as
    :func:`kldiv_spec._core_logits.row_gradient_weight` does.
    """
    g = g.to(ops.compute_dtype)
    if kept is None:
        d = _core_logits.row_divisor(ops.reduction, shape=ops.shape, axis=ops.axis)
        return divide_total(g, d, xp=ops.xp)
    n = _core_logits.masked_divisor(
        ops.reduction, kept.view(torch.bool), vocab=ops.vocab, dtype=g.dtype, xp=ops.xp
    )
    return _core_logits.divide_masked(g, n, xp=ops.xp)


def _reduced(ops: LogitsOperands, kl: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """Return the loss from the rows' float64 divergences, by the reference's rounding rule.

    The float64 total is rounded to the compute dtype, divided once by the divisor
    (:func:`kldiv_spec._core.divide_total`; with a mask the number of kept rows,
    0 when there is none), multiplied by :math:`k`, then rounded to the result dtype.
    """
    cdt = ops.compute_dtype
    total = kl.sum().to(cdt)
    if kept is None:
        d = _core_logits.row_divisor(ops.reduction, shape=ops.shape, axis=ops.axis)
        result = divide_total(total, d, xp=ops.xp)
    else:
        n = _core_logits.masked_divisor(
            ops.reduction, kept.view(torch.bool), vocab=ops.vocab, dtype=cdt, xp=ops.xp
        )
        result = _core_logits.divide_masked(total, n, xp=ops.xp)
    if ops.factor != 1.0:
        result = result * ops.factor
    return result.to(ops.dtype)


def _triton_call(
    ops: LogitsOperands, g: torch.Tensor | None, /, *, need_loss: bool, grad_dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Run the kernel: ``(loss or None, student gradient for upstream ``g`` or None)``.

    The KL's (:mod:`._triton_logits`), or with ``beta`` the Jensen-Shannon
    divergence's (:mod:`._triton_jsd`).
    """
    s2, t2, kept = _rows(ops)
    gw = None if g is None else _per_term(ops, g, kept)
    common = {
        "temperature": ops.temperature,
        "kept": kept,
        "gw": gw,
        "c": ops.factor / ops.temperature,
        "need_loss": need_loss,
        "grad_dtype": grad_dtype,
    }
    if ops.beta is None:
        from . import _triton_logits

        kl, grad = _triton_logits.from_logits(s2, t2, direction=ops.direction, **common)
    else:
        from . import _triton_jsd

        kl, grad = _triton_jsd.from_logits(s2, t2, beta=ops.beta, **common)
    loss = None if kl is None else _reduced(ops, kl, kept)
    return loss, (None if grad is None else grad.reshape(ops.shape))


class _TritonFromLogits(torch.autograd.Function):
    """The Triton forward, with the student gradient from the same launch when it is needed."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, t: torch.Tensor, ops: LogitsOperands
    ) -> torch.Tensor:
        unit = None
        if x.requires_grad:
            unit = torch.ones((), dtype=ops.compute_dtype, device=x.device)
        loss, grad = _triton_call(ops, unit, need_loss=True, grad_dtype=ops.compute_dtype)
        assert loss is not None
        ctx.save_for_backward(x, t)
        ctx.ops = ops
        ctx.grad = grad
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return _backward(ctx, grad)


def _triton_forward(ops: LogitsOperands) -> Any:
    x, t = ops.input, ops.target
    if torch.is_grad_enabled() and (x.requires_grad or t.requires_grad):
        if ops.reduction == "none":
            return NotImplemented
        return _TritonFromLogits.apply(x, t, ops)
    if ops.reduction == "none":
        return NotImplemented
    loss, _ = _triton_call(ops, None, need_loss=True, grad_dtype=x.dtype)
    return loss


# --------------------------------------------------------------------------- Jensen-Shannon


def _jsd_operands(ops: LogitsOperands) -> tuple[LogitsOperands, Any, Any] | None:
    """Return ``(ops, s, t)`` with NumPy views for the JSD kernel, or None where it declines.

    CPU float32 tensors that :func:`_accepts`, and that
    :func:`kldiv_spec.backends._blocks_jsd.takes_call` takes (classes last, size,
    ``beta`` in range, kernel built); everything else is the reference's.
    """
    from . import _blocks_jsd

    if ops.input.dtype != torch.float32 or not _accepts(ops):
        return None
    np_ops = _masked_ops(ops)
    s, t = _view(ops.input), _view(ops.target)
    return (np_ops, s, t) if _blocks_jsd.takes_call(np_ops, s, t) else None


def _jsd_evaluate(
    ops: LogitsOperands, /, *, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Run the JSD kernel on the tensors' memory: ``(loss, unit-upstream gradient)``, or None."""
    from . import _blocks_jsd

    arranged = _jsd_operands(ops)
    if arranged is None:
        return None
    done = _blocks_jsd.evaluate(*arranged, with_grad=with_grad)
    if done is None:
        return None
    loss, grad = done
    return torch.from_numpy(np.asarray(loss)), (None if grad is None else torch.from_numpy(grad))


def _jsd_forward(ops: LogitsOperands) -> Any:
    """Return the loss of ``beta`` on the CPU kernel (the gradient attached), or NotImplemented."""
    x, t = ops.input, ops.target
    if torch.is_grad_enabled() and (x.requires_grad or t.requires_grad):
        if ops.reduction == "none" or _jsd_operands(ops) is None:
            return NotImplemented
        return _FusedFromLogits.apply(x, t, ops)
    done = _jsd_evaluate(ops, with_grad=False)
    return NotImplemented if done is None else done[0]


def _jsd_backward(g: Any, ops: LogitsOperands) -> Any:
    """Return ``(grad_input, None)`` of ``beta`` from the CPU kernel, or NotImplemented."""
    done = _jsd_evaluate(ops, with_grad=True)
    if done is None or done[1] is None:
        return NotImplemented
    grad = done[1]
    return grad.mul_(g.to(grad.dtype)), None


# --------------------------------------------------------------------------- dispatch


def kl_div_from_logits(ops: LogitsOperands, /) -> Any:
    """Return the loss (with the fused gradient attached when needed), or NotImplemented."""
    ops = ops.evaluated()
    if _on_triton(ops):  # the KL's or (beta) the Jensen-Shannon divergence's kernel
        return _triton_forward(ops)
    if ops.beta is not None:  # the Jensen-Shannon divergence: its own CPU kernel
        return _jsd_forward(ops)
    if not _accepts(ops):
        return NotImplemented
    x, t = ops.input, ops.target
    if torch.is_grad_enabled() and (x.requires_grad or t.requires_grad):
        if ops.reduction == "none" or not _takes(ops):
            return NotImplemented
        return _FusedFromLogits.apply(x, t, ops)
    done = _evaluate(ops, with_grad=False)
    return NotImplemented if done is None else done[0]


def _takes(ops: LogitsOperands) -> bool:
    """Return whether the NumPy kernels take a call that :func:`_accepts` (axis and size)."""
    return ops.axis == len(ops.shape) - 1 and math.prod(ops.shape) >= max(
        _blocks.min_elements(), 1
    )


def kl_div_from_logits_backward(g: Any, ops: LogitsOperands, target_grad: bool, /) -> Any:
    """Return ``(grad_input, None)`` from one pass (one launch with Triton), or NotImplemented."""
    ops = ops.evaluated()
    if target_grad or ops.reduction == "none":
        return NotImplemented
    if _on_triton(ops):
        x = ops.input
        # Written in the dtype on CUDA (rounded to nearest); Triton's interpreter truncates
        # to bfloat16, so there the gradient is rounded by torch.
        direct = x.device.type == "cuda"
        dt = x.dtype if direct else ops.compute_dtype
        _, grad = _triton_call(ops, g, need_loss=False, grad_dtype=dt)
        assert grad is not None
        return (grad if direct else grad.to(x.dtype)), None
    if ops.beta is not None:  # the Jensen-Shannon divergence: its own CPU kernel
        return _jsd_backward(g, ops)
    if not _accepts(ops):
        return NotImplemented
    if ops.input.dtype in _HALF_DTYPES:  # the upstream gradient in the scale: one rounding
        done = _evaluate(ops, with_grad=True, need_loss=False, upstream=float(g))
        return NotImplemented if done is None else (done[1], None)
    done = _evaluate(ops, with_grad=True, need_loss=False)
    if done is None:
        return NotImplemented
    grad = done[1]
    return grad.mul_(g.to(grad.dtype)), None
