r"""PyTorch fast path: blocked CPU kernels and fused Triton kernels on CUDA.

The forward never materialises a full-size temporary for ``'sum'``, ``'mean'``
and ``'batchmean'``: the flattened operands are walked in cache-sized blocks of
:data:`BLOCK_BYTES` per operand, each block's pointwise loss is written into
one small scratch buffer with ``out=`` / in-place ATen operations (which ATen
runs on all intra-op threads) and summed, and the block sums are accumulated
in float64. ``'none'`` writes each block straight into the one output array.

The pointwise loss is PyTorch's, rewritten so that it needs one ``log`` and no
``xlogy`` (ATen's ``xlogy`` is not vectorised)::

    a = max(log t, -FLT_MAX)     # log 0 = -inf becomes a finite number, NaN stays NaN
    a = t * a + 0.0              # = xlogy(t, t): 0 * finite = +-0, "+ 0.0" makes it +0
                                 # (skipped for the reductions, where -0.0 sums alike)
    l = a - t * x                # the same two roundings as the reference

which equals ``xlogy(t, t) - t * x`` bit for bit (log t is finite for every
positive t, subnormals included), so NaN and inf land where PyTorch puts them.

Accuracy of the reductions: each block of :math:`m` values is summed by ATen's
cascade sum in the operands' dtype (error at most about
:math:`\lceil\log_2 m\rceil\,\varepsilon \sum |\ell|` within a block) and the
block sums are added in float64, so the total is at least as accurate as NumPy's
pairwise sum of the whole array, and more accurate than PyTorch's float32 sum.

Autograd: :class:`_BlockedKLDiv` saves only ``input`` and ``target``. Its
backward writes each requested gradient in one blocked pass into a
preallocated tensor. With ``create_graph=True`` (double backward) it computes
the same gradients with differentiable operations instead
(:func:`kldiv_spec._core.kl_div_backward`), so higher derivatives are exact.
Forward-mode AD, ``torch.func`` transforms, tracing, ``torch.compile``,
tensor subclasses, broadcasting, mixed or half dtypes, non-contiguous and
small tensors are declined (``NotImplemented``) and go to the reference, which
handles them all.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import array_api_compat.torch as _xp
import torch
from torch.autograd import forward_ad

from kldiv_spec import _core
from kldiv_spec._validation import Operands

__all__ = ["BLOCK_BYTES", "MIN_ELEMENTS", "kl_div", "kl_div_backward"]

#: Bytes of each operand processed per block on the CPU: the block's four arrays (two
#: operands, two scratch buffers) stay in the last-level cache, and blocks are large enough
#: that the few thread synchronisations per ATen operation do not dominate (smaller blocks
#: measured up to 8x slower on a loaded 2-core machine, where a waiting thread may be
#: descheduled at every synchronisation).
BLOCK_BYTES = 1 << 22
#: Smaller calls go to the reference, whose per-call overhead is lower.
MIN_ELEMENTS = 1 << 15

_DTYPES = (torch.float32, torch.float64)
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _accepts(ops: Operands) -> bool:
    """Return whether the fast path handles these operands (else the reference does)."""
    x, t = ops.input, ops.target
    if type(x) not in _PLAIN_TYPES or type(t) not in _PLAIN_TYPES:
        return False
    if x.dtype not in _DTYPES or not ops.same_shape_and_dtype:
        return False
    if x.layout != torch.strided or not (x.is_contiguous() and t.is_contiguous()):
        return False
    if x.numel() < MIN_ELEMENTS:
        return False
    if x.device.type == "cuda":
        if not _triton_available():
            return False
    elif x.device.type != "cpu":
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if forward_ad._current_level >= 0:  # inside forward-mode AD: the reference has jvp
        return False
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not (is_wrapped(x) or is_wrapped(t))


@functools.cache
def _triton_available() -> bool:
    """Return whether Triton is installed (then the CUDA kernels must import: no fall-back)."""
    if importlib.util.find_spec("triton") is None:
        return False
    from . import _triton_kernels  # noqa: F401  (an error here is ours, and propagates)

    return True


def _block_elements(dtype: torch.dtype) -> int:
    return max(64, BLOCK_BYTES // torch.finfo(dtype).bits * 8 // 64 * 64)


def _cpu_forward(
    x: torch.Tensor, t: torch.Tensor, reduction: str, log_target: bool, divisor: int
) -> Any:
    xf, tf = x.reshape(-1), t.reshape(-1)
    n = xf.numel()
    step = _block_elements(x.dtype)
    scratch = torch.empty(step, dtype=x.dtype)
    if reduction == "none":
        out = torch.empty_like(xf)
        for start in range(0, n, step):
            stop = min(start + step, n)
            block, s = out[start:stop], scratch[: stop - start]
            _pointwise_block(block, xf[start:stop], tf[start:stop], log_target, s, exact=True)
        return out.view(x.shape)
    work = torch.empty(step, dtype=x.dtype)
    total = 0.0
    for start in range(0, n, step):
        stop = min(start + step, n)
        block, s = work[: stop - start], scratch[: stop - start]
        _pointwise_block(block, xf[start:stop], tf[start:stop], log_target, s, exact=False)
        total += block.sum().item()
    return _core.divide_total(torch.tensor(total, dtype=x.dtype), divisor, xp=_xp)


def _pointwise_block(
    out: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor,
    log_target: bool,
    scratch: torch.Tensor,
    *,
    exact: bool,
) -> None:
    """Write the pointwise loss of one block into ``out`` (``scratch``: same length).

    ``exact=True`` rounds ``t * x`` on its own, as the reference does, so that
    every element equals the reference's; ``exact=False`` fuses ``a - t * x``
    into one ``addcmul`` (ATen uses a fused multiply-add there: at most one
    rounding less, which only a reduction may use).
    """
    if log_target:
        torch.exp(t, out=scratch)
        torch.sub(t, x, out=out)
        out.mul_(scratch)  # exp(t) * (t - x): multiplication commutes exactly
        return
    torch.log(t, out=out)
    out.clamp_(min=-torch.finfo(out.dtype).max)
    out.mul_(t)
    if exact:
        out.add_(0.0)  # -0.0 (from t = 0) becomes +0.0 as in xlogy; a sum does not care
        out.sub_(torch.mul(t, x, out=scratch))
    else:
        out.addcmul_(t, x, value=-1)


def _cpu_backward(
    g: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor,
    log_target: bool,
    need: tuple[bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Both gradients, ``g`` already divided by the divisor (0-d, or of ``x``'s shape)."""
    xf, tf = x.reshape(-1), t.reshape(-1)
    per_element = g.ndim > 0
    gf = g.reshape(-1) if per_element else g
    n = xf.numel()
    grad_x = torch.empty_like(xf) if need[0] else None
    grad_t = torch.empty_like(tf) if need[1] else None
    if not log_target and grad_t is None and not per_element:
        assert grad_x is not None
        torch.mul(tf, -gf, out=grad_x)  # one pass; t * (-g) is -(t * g) bit for bit
        return grad_x.view(x.shape), None
    step = _block_elements(x.dtype)
    scratch = torch.empty(step, dtype=x.dtype)
    p_scratch = torch.empty(step if log_target else 0, dtype=x.dtype)
    for start in range(0, n, step):
        stop = min(start + step, n)
        gb = gf[start:stop] if per_element else gf
        xb, tb = xf[start:stop], tf[start:stop]
        s = scratch[: stop - start]
        if log_target:
            p = torch.exp(tb, out=p_scratch[: stop - start])
            torch.mul(p, gb, out=s)  # gp = g * exp(t)
            if grad_x is not None:
                torch.neg(s, out=grad_x[start:stop])
            if grad_t is not None:
                # PyTorch's autograd order: (g * (t - x)) * p + g * p
                gt = torch.sub(tb, xb, out=grad_t[start:stop])
                gt.mul_(gb).mul_(p).add_(s)
            continue
        if grad_x is not None:
            torch.mul(tb, gb, out=grad_x[start:stop]).neg_()
        if grad_t is not None:
            # log t + t / t - x: t / t is 1 for positive finite t and NaN for 0 and inf,
            # so the NaN of PyTorch's xlogy derivative comes without a mask.
            gt = torch.div(tb, tb, out=grad_t[start:stop])
            gt.add_(torch.log(tb, out=s)).sub_(xb)
            torch.mul(gb, gt, out=gt)
    return (
        None if grad_x is None else grad_x.view(x.shape),
        None if grad_t is None else grad_t.view(t.shape),
    )


def _forward(ops: Operands) -> Any:
    x, t = ops.input, ops.target
    if x.device.type == "cuda":
        from . import _triton_kernels

        return _triton_kernels.forward(
            x, t, reduction=ops.reduction, log_target=ops.log_target, divisor=ops.divisor
        )
    return _cpu_forward(x, t, ops.reduction, ops.log_target, ops.divisor)


def _backward(
    g: torch.Tensor, x: torch.Tensor, t: torch.Tensor, log_target: bool, need: tuple[bool, bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if x.device.type == "cuda":
        from . import _triton_kernels

        return _triton_kernels.backward(g, x, t, log_target=log_target, need=need)
    return _cpu_backward(g, x, t, log_target, need)


def _scaled_grad(grad: torch.Tensor, ops: Operands) -> torch.Tensor | None:
    """Return ``grad / D`` ready for the kernels, or None when it needs the reference."""
    x = ops.input
    if ops.reduction == "none":
        if grad.shape != x.shape or not grad.is_contiguous() or type(grad) not in _PLAIN_TYPES:
            return None
    elif grad.ndim != 0:
        return None
    return _core.divide_total(grad.to(x.dtype), ops.divisor, xp=_xp)


class _BlockedKLDiv(torch.autograd.Function):
    """Blocked forward; one-pass backward saving only the inputs; exact double backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, t: torch.Tensor, ops: Operands
    ) -> torch.Tensor:
        ctx.save_for_backward(x, t)
        ctx.ops = ops
        return _forward(ops)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, t = ctx.saved_tensors
        ops: Operands = ctx.ops
        need = (bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]))
        g = None if torch.is_grad_enabled() else _scaled_grad(grad, ops)
        if g is None:
            # create_graph=True (or an unusual grad): differentiable ops give exact
            # higher derivatives.
            grad_x, grad_t = _core.kl_div_backward(
                grad,
                x,
                t,
                reduction=ops.reduction,
                log_target=ops.log_target,
                output_shape=ops.output_shape,
                xp=ops.xp,
            )
        else:
            grad_x, grad_t = _backward(g, x, t, ops.log_target, need)
        return (grad_x if need[0] else None, grad_t if need[1] else None, None)


def kl_div(ops: Operands, /) -> torch.Tensor | Any:
    """Evaluate the loss on tensors, or return ``NotImplemented`` to use the reference."""
    if not _accepts(ops):
        return NotImplemented
    x, t = ops.input, ops.target
    if torch.is_grad_enabled() and (x.requires_grad or t.requires_grad):
        return _BlockedKLDiv.apply(x, t, ops)
    return _forward(ops)


def kl_div_backward(g: torch.Tensor, ops: Operands, /) -> tuple[torch.Tensor, torch.Tensor] | Any:
    """Both gradients in one blocked pass each, or ``NotImplemented`` for the reference."""
    if not _accepts(ops) or type(g) not in _PLAIN_TYPES:
        return NotImplemented
    x, t = ops.input, ops.target
    if ops.reduction == "none" and g.shape != x.shape:
        g = torch.broadcast_to(g, x.shape).contiguous()
    scaled = _scaled_grad(g, ops)
    if scaled is None or scaled.device != x.device:
        return NotImplemented
    with torch.no_grad():
        grad_x, grad_t = _backward(scaled, x, t, ops.log_target, (True, True))
    assert grad_x is not None and grad_t is not None
    return grad_x, grad_t
