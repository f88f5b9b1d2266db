r"""Fused Triton kernels for the PyTorch fast path on CUDA (and in Triton's interpreter).

Three kernels over the flattened, contiguous operands, one program per block
of ``BLOCK`` elements:

- ``_forward_partial_kernel``: reads each input once, computes the pointwise
  loss :math:`\ell = \operatorname{xlogy}(t, t) - t x` (or :math:`e^t (t - x)`)
  in the operands' dtype and writes one float64 partial sum per block; the
  partials (``n / BLOCK`` of them) are then summed in float64, the total is
  rounded to the operands' dtype and only then divided by the reduction's
  divisor in that dtype (the reductions' one rounding rule, as the reference
  does it), all on the device (no host synchronisation).
- ``_forward_none_kernel``: the same pointwise loss, written once.
- ``_backward_kernel``: reads ``t`` (and ``x`` only when the target gradient
  is needed), the scalar ``g / D`` or the per-element ``g``, and writes each
  requested gradient once: :math:`-t g` and
  :math:`g(\log t + 1 - x)` (NaN unless :math:`0 < t < \infty`), or with
  ``log_target`` :math:`-g e^t` and :math:`(g (t - x)) e^t + g e^t` (PyTorch's
  autograd order: written :math:`g e^t (t - x + 1)` it would give inf, not NaN,
  where :math:`e^t` overflows).

Masked-off lanes load ``x = t = 0``, whose loss is exactly 0, so partial sums
need no extra mask.

``log`` and ``exp`` are CUDA's libdevice functions (``logf`` within 1 ulp,
``expf`` within 2), as in PyTorch's CUDA kernels; ``tl.log``/``tl.exp`` may
compile to the ``lg2.approx``/``ex2.approx`` instructions, whose error in
``exp(t)`` grows with ``|t|``. Triton's interpreter has no libdevice, so there
the kernels use ``tl.log``/``tl.exp``, which it evaluates with NumPy.

Each kernel is a ``@triton.jit`` function, launched with its compile-time
constants (``LOG_TARGET``, ``BLOCK``, ...) by keyword. They are compiled for
CUDA tensors; for CPU tensors the same Python source runs in Triton's
interpreter when ``TRITON_INTERPRET=1`` was set as this module was imported,
which is how the tests check them without a GPU.
Importing this module raises ImportError when Triton is not installed.
"""

# ruff: noqa: N803  (Triton spells compile-time constants in capitals)
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

try:
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - Triton without the CUDA extras
    libdevice = None

__all__ = ["BLOCK", "NUM_WARPS", "backward", "forward", "interpreting"]

#: Elements per program.
BLOCK = 4096
#: Warps per program on CUDA (Triton's default).
NUM_WARPS = 4


# ``@triton.jit`` makes an interpreted function or a compiled one by the setting at the
# time it decorates, that is when this module is imported: the decision is fixed then.
_INTERPRETING = bool(triton.knobs.runtime.interpret)


def interpreting() -> bool:
    """Return whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRETING


if interpreting() or libdevice is None:

    @triton.jit
    def _log(x):  # type: ignore[no-untyped-def]
        return tl.log(x)

    @triton.jit
    def _exp(x):  # type: ignore[no-untyped-def]
        return tl.exp(x)

else:  # pragma: no cover - compiled for a GPU

    @triton.jit
    def _log(x):  # type: ignore[no-untyped-def]
        return libdevice.log(x)

    @triton.jit
    def _exp(x):  # type: ignore[no-untyped-def]
        return libdevice.exp(x)


@triton.jit
def _pointwise_loss(x, t, LOG_TARGET: tl.constexpr):  # type: ignore[no-untyped-def]
    # The reference's pointwise loss, operation for operation; inlined into both
    # forward kernels. One return after a constexpr branch, as Triton compiles it.
    if LOG_TARGET:  # noqa: SIM108 (Triton: a constexpr branch)
        loss = _exp(t) * (t - x)
    else:
        loss = tl.where(t == 0, 0.0, t * _log(t)) - t * x
    return loss


@triton.jit
def _forward_partial_kernel(
    x_ptr, t_ptr, partial_ptr, n, LOG_TARGET: tl.constexpr, BLOCK: tl.constexpr
):  # type: ignore[no-untyped-def]
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0)
    loss = _pointwise_loss(x, t, LOG_TARGET)
    tl.store(partial_ptr + pid, tl.sum(loss.to(tl.float64), axis=0))


@triton.jit
def _forward_none_kernel(  # type: ignore[no-untyped-def]
    x_ptr, t_ptr, out_ptr, n, LOG_TARGET: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0)
    loss = _pointwise_loss(x, t, LOG_TARGET)
    tl.store(out_ptr + offs, loss, mask=mask)


@triton.jit
def _backward_kernel(  # type: ignore[no-untyped-def]
    g_ptr,
    x_ptr,
    t_ptr,
    gx_ptr,
    gt_ptr,
    n,
    G_PER_ELEMENT: tl.constexpr,
    NEED_X: tl.constexpr,
    NEED_T: tl.constexpr,
    LOG_TARGET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t = tl.load(t_ptr + offs, mask=mask, other=1.0)
    if G_PER_ELEMENT:  # noqa: SIM108 (Triton: a constexpr branch)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    else:
        g = tl.load(g_ptr)
    if LOG_TARGET:
        p = _exp(t)
        gp = g * p
        if NEED_X:
            # -gp: Triton compiles unary minus as 0 - v, which turns -0 into +0.
            tl.store(gx_ptr + offs, gp * -1.0, mask=mask)
        if NEED_T:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0)
            tl.store(gt_ptr + offs, (g * (t - x)) * p + gp, mask=mask)
    else:
        if NEED_X:
            tl.store(gx_ptr + offs, (t * g) * -1.0, mask=mask)  # -(t * g), sign of 0 kept
        if NEED_T:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0)
            regular = (t > 0) & (t < float("inf"))
            safe_t = tl.where(regular, t, 1.0)
            grad_t = tl.where(regular, g * (_log(safe_t) + 1.0 - x), float("nan"))
            tl.store(gt_ptr + offs, grad_t, mask=mask)


def _launch(
    kernel: Any, grid: tuple[int], device: torch.device, *args: Any, **constexprs: Any
) -> None:
    """Run ``kernel`` (a ``@triton.jit`` function) on ``grid``; ``constexprs`` by keyword."""
    if device.type == "cuda":
        # No fused multiply-add: the reference rounds ``t * x`` before it subtracts, and
        # a contracted ``xlogy - t * x`` differs from it where the two terms cancel.
        kernel[grid](*args, **constexprs, num_warps=NUM_WARPS, enable_fp_fusion=False)
        return
    if not interpreting():
        msg = (
            "Triton kernels run on CPU tensors only in Triton's interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported"
        )
        raise RuntimeError(msg)
    # The interpreter computes with NumPy, which would warn where CUDA is silent.
    with np.errstate(all="ignore"):
        kernel[grid](*args, **constexprs)


def forward(
    x: torch.Tensor, t: torch.Tensor, /, *, reduction: str, log_target: bool, divisor: int
) -> torch.Tensor:
    """Return the reduced loss of contiguous same-shape, same-dtype ``x`` and ``t``."""
    n = x.numel()
    grid = (triton.cdiv(n, BLOCK),)
    if reduction == "none":
        out = torch.empty_like(x)
        _launch(
            _forward_none_kernel, grid, x.device, x, t, out, n, LOG_TARGET=log_target, BLOCK=BLOCK
        )
        return out
    partial = torch.empty(grid[0], dtype=torch.float64, device=x.device)
    _launch(
        _forward_partial_kernel,
        grid,
        x.device,
        x,
        t,
        partial,
        n,
        LOG_TARGET=log_target,
        BLOCK=BLOCK,
    )
    # The one rounding rule of the reductions: the float64 total is rounded to the
    # operands' dtype first, then divided by the divisor in that dtype.
    total = partial.sum().to(x.dtype)
    return total / divisor if divisor != 1 else total


def backward(
    g: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor,
    /,
    *,
    log_target: bool,
    need: tuple[bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Return the requested gradients; ``g`` is ``grad / D``, 0-d or of ``x``'s shape."""
    n = x.numel()
    grad_x = torch.empty_like(x) if need[0] else None
    grad_t = torch.empty_like(t) if need[1] else None
    dummy = x  # never written: its store is compiled out when not needed
    _launch(
        _backward_kernel,
        (triton.cdiv(n, BLOCK),),
        x.device,
        g.contiguous(),
        x,
        t,
        dummy if grad_x is None else grad_x,
        dummy if grad_t is None else grad_t,
        n,
        G_PER_ELEMENT=g.ndim > 0,
        NEED_X=need[0],
        NEED_T=need[1],
        LOG_TARGET=log_target,
        BLOCK=BLOCK,
    )
    return grad_x, grad_t
