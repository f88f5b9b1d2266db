r"""PyTorch fast path: ATen's kernel for small calls; NumPy's blocked kernels, or Triton on CUDA.

Three routes, chosen per call by :func:`front` (exported in :data:`FRONTS` for the
dispatcher) and :func:`kl_div`:

- **Small calls** (fewer than ``$KLDIV_SPEC_TORCH_MIN_ELEMENTS``, by default
  :data:`MIN_ELEMENTS`, elements) **and everything under
  torch.compile**: ATen's own ``torch.kl_div`` (``'sum'`` or ``'none'``, then the
  divisor), the kernel ``torch.nn.functional.kl_div`` runs, when the operands share
  one dtype (float32, float64), shape and device and the target needs no gradient.
  Its pointwise loss is the specification's, ``xlogy(t, t) - t * x`` (or
  ``exp(t) * (t - x)``), and autograd's input gradient through it is the analytic
  :math:`-(g/D)\,t` (or :math:`-(g/D)\,e^t`) bit for bit; ``torch.compile``
  fuses it with its neighbours.
- **Large CPU tensors**: the NumPy fast path's kernels
  (:mod:`kldiv_spec.backends._blocks`) on the tensors' own memory (``Tensor.numpy()``
  of a detached view: zero-copy): blocked and multithreaded, sums accumulated in
  float64 per block, and for contiguous float32 sums without ``log_target`` the one
  compiled AVX2 pass per block (``backends/_fused.c``) where it was built. Their
  error bounds are in :mod:`kldiv_spec.backends._blocks`. bfloat16 and float16 tensors
  (every reduction, ``'none'`` included, with or without ``log_target``) take the compiled
  half-precision kernel of ``backends/_fused.c`` on the same memory (bfloat16 as its
  ``int16`` bits): the reference's terms, each operation rounded to the dtype where the
  reference rounds it; a reduction's float64 total is rounded once to the dtype, then
  divided in float32 (:func:`kldiv_spec._core.divide_total`). Where that kernel does not
  run (not built, no AVX2, switched off) the same values come from the reference's ATen
  operations, summed in float64.
- **Large CUDA tensors**: fused Triton kernels (:mod:`kldiv_spec.backends._triton_kernels`).

Autograd: :class:`_BlockedKLDiv` saves only ``input`` and ``target``. Its
backward writes the input gradient alone in one or two multithreaded ATen passes
(``t * (-g/D)``, or ``e^t * (g/D)`` negated; in half precision too, where they are the
reference's operations in the dtype, bit for bit), and both gradients in one blocked
pass of the NumPy kernels (or one Triton kernel). With ``create_graph=True``
(double backward) it computes the same gradients with differentiable operations
instead (:func:`kldiv_spec._core.kl_div_backward`), so higher derivatives are exact.

Forward-mode AD, ``torch.func`` transforms, tracing, tensor subclasses,
broadcasting, mixed dtypes, half dtypes on CUDA (outside autocast) and non-contiguous
tensors are declined (``NotImplemented``) and go to the reference, which handles them
all. A target that needs a gradient is declined by the ATen route (the target gradient
through ATen's ``xlogy`` is not the analytic one's rounding) and by the half-precision
route (there is no half blocked backward), and taken by the others; so is
:func:`kl_div_backward` (both gradients) in half precision.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable
from typing import Any

import array_api_compat.torch as _xp
import torch
from torch.autograd import forward_ad

from kldiv_spec import _core, _settings
from kldiv_spec._validation import Operands

from . import _blocks
from ._protocol import CompilerHooks, Recast

__all__ = [
    "COMPILER",
    "FRONTS",
    "MIN_ELEMENTS",
    "front",
    "kl_div",
    "kl_div_backward",
]

#: The default size threshold (``$KLDIV_SPEC_TORCH_MIN_ELEMENTS``,
#: :mod:`kldiv_spec._settings`): smaller calls go to ATen's own ``kl_div`` (through
#: :func:`front`), whose per-call cost is lower.
MIN_ELEMENTS = _settings.TORCH_MIN_ELEMENTS

_DTYPES = (torch.float32, torch.float64)
#: The half dtypes of the compiled half-precision sum, and its name for each.
_HALF = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _accepts(ops: Operands) -> bool:
    """Return whether the fast path handles these operands (else the reference does)."""
    x, t = ops.input, ops.target
    if type(x) not in _PLAIN_TYPES or type(t) not in _PLAIN_TYPES:
        return False
    if not ops.same_shape_and_dtype:
        return False
    if x.dtype in _HALF:
        if not _half_accepts(ops):
            return False
    elif x.dtype not in _DTYPES:
        return False
    if x.layout != torch.strided or not (x.is_contiguous() and t.is_contiguous()):
        return False
    n = x.numel()
    if n < _settings.current.torch_min_elements or n == 0 or x.ndim == 0:
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


def _half_accepts(ops: Operands) -> bool:
    """Return whether the half-precision route takes a bfloat16 or float16 call.

    CPU tensors whose target needs no gradient: the forward is :func:`_half_forward`, the
    input gradient the reference's operations in the dtype (ATen's ``t * (-g/D)``). The
    rest (the target's gradient, both gradients of :func:`kl_div_backward`, CUDA tensors)
    is the reference's.
    """
    x, t = ops.input, ops.target
    if x.device.type != "cpu":
        return False
    return not (t.requires_grad and torch.is_grad_enabled())


@functools.cache
def _triton_available() -> bool:
    """Return whether Triton is installed (then the CUDA kernels must import: no fall-back)."""
    if importlib.util.find_spec("triton") is None:
        return False
    from . import _triton_kernels  # noqa: F401  (an error here is ours, and propagates)

    return True


def _numpy(a: torch.Tensor) -> Any:
    """Return the NumPy array on ``a``'s memory (zero-copy; ``a``: a contiguous CPU tensor)."""
    return a.detach().numpy()


def _half_bits(a: torch.Tensor) -> Any:
    """Return the flat NumPy view of a contiguous half CPU tensor the half kernel reads.

    float16: the float16 array itself; bfloat16 (which NumPy has no dtype for): its bits,
    as int16. Zero-copy either way.
    """
    a = a.detach()
    if a.dtype == torch.bfloat16:
        a = a.view(torch.int16)
    return a.numpy().reshape(-1)


def _half_forward(
    x: torch.Tensor, t: torch.Tensor, reduction: str, log_target: bool, divisor: int
) -> torch.Tensor:
    r"""Return the loss of half CPU tensors: :math:`\operatorname{fl}(R(\sum_{64} \ell) / D)`.

    The terms :math:`\ell` are the reference's (each operation rounded to the dtype).
    ``'none'`` returns them (:func:`.._blocks.half_none`); a reduction sums them in
    float64 (:func:`.._blocks.half_sum`), rounds the total once to the dtype
    (:func:`.._blocks.round_half`), then divides it by the divisor in float32 and rounds
    (:func:`kldiv_spec._core.divide_total`). Where the compiled kernel does not run (not
    built, no AVX2, ``$KLDIV_SPEC_NUMPY_FUSED=0``) the terms are the reference's own ATen
    operations, full size, and the sum ``torch.sum`` in float64: the same values, slower.
    """
    format = _HALF[x.dtype]
    if not _blocks.half_available():
        with torch.no_grad():
            terms = _core.pointwise_loss(x, t, log_target=log_target, xp=_xp)
            if reduction == "none":
                return terms
            total = float(torch.sum(terms, dtype=torch.float64))
    else:
        xb, tb = _half_bits(x), _half_bits(t)
        if reduction == "none":
            out = torch.empty(x.shape, dtype=x.dtype)
            _blocks.half_none(xb, tb, _half_bits(out), format=format, log_target=log_target)
            return out
        total = _blocks.half_sum(xb, tb, format=format, log_target=log_target)
    rounded = torch.tensor(_blocks.round_half(total, format), dtype=x.dtype)  # exact
    return _core.divide_total(rounded, divisor, xp=_xp)


def _cpu_forward(
    x: torch.Tensor, t: torch.Tensor, reduction: str, log_target: bool, divisor: int
) -> Any:
    """Evaluate with the NumPy fast path's kernels (:mod:`.._blocks`) on the tensors' memory."""
    if x.dtype in _HALF:
        return _half_forward(x, t, reduction, log_target, divisor)
    xn, tn = _numpy(x), _numpy(t)
    shape = tuple(x.shape)
    if reduction == "none":
        out = _blocks.loss_none(xn, tn, shape=shape, dtype=xn.dtype, log_target=log_target)
        return torch.from_numpy(out)
    total = _blocks.loss_sum(xn, tn, shape=shape, dtype=xn.dtype, log_target=log_target)
    return _core.divide_total(torch.tensor(total, dtype=x.dtype), divisor, xp=_xp)


def _cpu_backward(
    g: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor,
    log_target: bool,
    need: tuple[bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Both gradients, ``g`` already divided by the divisor (0-d, or of ``x``'s shape).

    The input gradient alone (the common case: the target is data) is one or two
    multithreaded ATen passes; otherwise the NumPy fast path's one blocked pass
    writes both.
    """
    if need == (True, False) and (g.ndim == 0 or x.dtype in _HALF):
        with torch.no_grad():
            if log_target:  # -(g e^t): g * p, then the exact negation
                return torch.exp(t).mul_(g).neg_(), None
            return torch.mul(t, -g), None  # t * (-g) is -(t * g) bit for bit
    if x.dtype in _HALF:  # no blocked half backward: the reference's operations
        with torch.no_grad():
            gx, gt = _core.pointwise_gradients(g, x, t, log_target=log_target, xp=_xp)
        return (gx if need[0] else None, gt if need[1] else None)
    gn = _numpy(g.contiguous())
    xn, tn = _numpy(x), _numpy(t)
    gx, gt = _blocks.gradients(
        gn, xn, tn, shape=tuple(x.shape), dtype=xn.dtype, log_target=log_target
    )
    return (
        torch.from_numpy(gx) if need[0] else None,
        torch.from_numpy(gt) if need[1] else None,
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
    if x.dtype in _HALF:  # both gradients: the reference's (no half blocked backward)
        return NotImplemented
    if ops.reduction == "none" and g.shape != x.shape:
        g = torch.broadcast_to(g, x.shape).contiguous()
    scaled = _scaled_grad(g, ops)
    if scaled is None or scaled.device != x.device:
        return NotImplemented
    with torch.no_grad():
        grad_x, grad_t = _backward(scaled, x, t, ops.log_target, (True, True))
    assert grad_x is not None and grad_t is not None
    return grad_x, grad_t


# --- the front: the common call without the full validation and dispatch --------------------

#: ATen's reduction enum (``torch.nn._reduction``): what ``torch.kl_div`` is called with.
_NONE, _MEAN, _SUM = 0, 1, 2
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_any_autocast = torch._C._is_any_autocast_enabled


def front(input: Any, target: Any, reduction: Any, log_target: Any, /) -> Any:
    r"""Evaluate the common call on tensors cheaply, or return ``NotImplemented``.

    Exported in :data:`FRONTS` for ``torch.Tensor`` and ``torch.nn.Parameter``. It
    takes plain tensors of one dtype (float32 or float64), shape, layout (strided) and
    device, a valid ``reduction`` and a bool ``log_target``: the calls on which
    :func:`kldiv_spec._validation.operands` passes with nothing to promote or broadcast,
    so no check is skipped. Anything else goes
    back (``NotImplemented``) to the full route, which raises the specified errors.

    Under autocast (``torch.autocast``, CPU or CUDA) the operands are first cast as
    PyTorch's autocast casts those of ``kl_div``, which is on its float32 list: every
    floating tensor of the autocast's device type other than float64 becomes float32.

    Routes, each giving the specified values and analytic gradients:

    - large CPU and CUDA tensors (``$KLDIV_SPEC_TORCH_MIN_ELEMENTS`` and more),
      eagerly: the blocked (CPU) or Triton (CUDA) kernels of :func:`kl_div`;
    - everything else it takes, and everything under ``torch.compile``: ATen's own
      ``torch.kl_div`` with ``reduction='sum'`` (or ``'none'``), divided by the
      divisor :math:`D` with the one rounding rule (:func:`_core.divide_total`),
      which is what ``torch.nn.functional.kl_div`` runs. Its pointwise loss is
      :math:`\operatorname{xlogy}(t, t) - t x` (or :math:`e^t (t - x)`), the
      specification's; autograd differentiates it w.r.t. the input only (this route
      is not taken when the target needs a gradient), as :math:`-(g/D)\,t` (or
      :math:`-(g/D)\,e^t`), the analytic gradient bit for bit. Under
      ``torch.compile`` Inductor fuses it with its neighbours.

    Declined: a target that needs a gradient (its analytic gradient is the
    :class:`torch.autograd.Function`'s), forward-mode AD and ``torch.func`` transforms
    (the reference has their rules), tensor subclasses, mixed dtypes, broadcasting,
    float16 and bfloat16 outside autocast (the full route gives large CPU tensors to the
    half-precision kernel of :func:`kl_div`, and the rest to the reference).
    """
    return _with_autocast(_eager, input, target, reduction, log_target)


def traced_front(input: Any, target: Any, reduction: Any, log_target: Any, /) -> Any:
    """:func:`front` in code ``torch.compile`` traces: ATen's kernel, or ``NotImplemented``.

    Exported in :data:`COMPILER` for the dispatcher. Traced operands
    are fake or functional tensors (subclasses), and traced calls always take ATen's
    kernel, which Inductor compiles with its neighbours: what
    ``torch.nn.functional.kl_div`` runs for any tensor type. So the type is not
    checked, and the blocked and Triton kernels are not used.
    """
    return _with_autocast(_aten, input, target, reduction, log_target)


def _with_autocast(
    route: Callable[[Any, Any, Any, Any], Any],
    input: Any,
    target: Any,
    reduction: Any,
    log_target: Any,
    /,
) -> Any:
    """Return ``route``'s result, on the operands autocast would cast, if it is on.

    Under autocast, the operands are cast as autocast casts ``kl_div``'s, and a call
    ``route`` declines takes the full route on them (a :class:`Recast`).
    """
    if not _any_autocast():
        return route(input, target, reduction, log_target)
    input, target = _autocast(input), _autocast(target)
    result = route(input, target, reduction, log_target)
    if result is not NotImplemented:
        return result
    return Recast(input, target)


def _eager(x: Any, t: Any, reduction: Any, log_target: Any, /) -> Any:
    """Evaluate an eager call: large plain tensors by the blocked or Triton kernels.

    Other plain tensors by ATen's kernel (:func:`_aten`); ``NotImplemented`` for tensor
    subclasses, forward-mode AD and ``torch.func`` transforms.
    """
    if type(x) not in _PLAIN_TYPES or type(t) not in _PLAIN_TYPES:
        return NotImplemented
    if forward_ad._current_level >= 0 or _is_wrapped(x) or _is_wrapped(t):
        return NotImplemented
    if x.numel() >= _settings.current.torch_min_elements and _aten_takes(
        x, t, reduction, log_target
    ):
        result = kl_div(_operands(x, t, reduction, log_target))
        if result is not NotImplemented:
            return result
    return _aten(x, t, reduction, log_target)


def _aten(x: Any, t: Any, reduction: Any, log_target: Any, /) -> Any:
    """Return :func:`_native`'s result if :func:`_aten_takes` the call, else NotImplemented."""
    if _aten_takes(x, t, reduction, log_target):
        return _native(x, t, reduction, log_target)
    return NotImplemented


def _aten_takes(x: Any, t: Any, reduction: Any, log_target: Any, /) -> bool:
    """Return whether ATen's kernel gives the specified value and gradient for this call.

    Tensors of one dtype (float32 or float64), shape, strided layout and device, a target
    that needs no gradient, a valid ``reduction`` (a ``str``) and a bool ``log_target``:
    the calls on which :func:`kldiv_spec._validation.operands` passes with nothing to
    promote or broadcast.
    """
    if type(log_target) is not bool or type(reduction) is not str:
        return False
    if reduction not in ("none", "batchmean", "sum", "mean"):
        return False
    dtype = x.dtype
    if dtype is not torch.float32 and dtype is not torch.float64:
        return False
    if t.dtype is not dtype or x.layout is not torch.strided:
        return False
    if t.layout is not torch.strided or x.shape != t.shape:
        return False
    if not (x.is_cpu and t.is_cpu) and x.device != t.device:  # is_cpu: no device objects
        return False
    return not (t.requires_grad and torch.is_grad_enabled())


def _native(x: torch.Tensor, t: torch.Tensor, reduction: str, log_target: bool) -> torch.Tensor:
    """``torch.kl_div`` (ATen's kernel, as ``F.kl_div`` calls it), then the divisor."""
    if reduction == "none":
        return torch.kl_div(x, t, _NONE, log_target=log_target)
    if reduction == "mean" and x.is_cpu:
        # ATen's CPU mean is its sum rounded to the dtype, then divided by N
        # (sum_out(...).div_(N)): divide_total's rule, in one call.
        return torch.kl_div(x, t, _MEAN, log_target=log_target)
    total = torch.kl_div(x, t, _SUM, log_target=log_target)
    if reduction == "sum" or x.ndim == 0:
        return total
    d = x.shape[0] if reduction == "batchmean" else x.numel()
    if d == 1:
        return total
    if d == 0:  # empty: the total is 0, and NaN * 0 keeps the graph (gradients: empty)
        return total * math.nan
    return total / d


def _operands(x: torch.Tensor, t: torch.Tensor, reduction: str, log_target: bool) -> Operands:
    """Return the :class:`Operands` of a call :func:`_front` took (its checks: operands()'s)."""
    shape = tuple(x.shape)
    batch = shape[0] if shape else None
    return Operands(
        xp=_xp,
        input=x,
        target=t,
        dtype=x.dtype,
        output_shape=shape,
        reduction=reduction,
        log_target=log_target,
        batch_size=batch,
        divisor=_core.divisor(reduction, output_shape=shape, batch_size=batch),
    )


def _autocast(a: Any) -> Any:
    """Cast ``a`` as autocast casts the operands of an op on its float32 list.

    A floating tensor other than float64, of a device type (CPU, CUDA) whose autocast
    is on, becomes float32 (differentiably, as autocast's own cast); anything else is
    returned as is.
    """
    if not isinstance(a, torch.Tensor) or not a.is_floating_point() or a.dtype == torch.float64:
        return a
    device_type = a.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return a.to(torch.float32)
    return a


#: The fronts of tensors (:mod:`kldiv_spec.backends._protocol`).
FRONTS = {torch.Tensor: front, torch.nn.Parameter: front}

#: What the dispatcher needs from ``torch.compile``. It records the public entry points
#: as calls in its graph (``allow_in_graph``), as it records
#: ``torch.nn.functional.kl_div``, instead of tracing their Python; AOTAutograd then
#: traces them (to :func:`traced_front`'s ATen operations) when it compiles the graph.
#: Dynamo traces the Python it enters, and guards the compiled code on every function
#: and global it reads: about 40 checks of this package's modules on every call, 3-4% of
#: a compiled 8x10 training step.
COMPILER = CompilerHooks(
    is_compiling=torch.compiler.is_compiling,
    traced_front=traced_front,
    constant_result=torch.compiler.assume_constant_result,
    allow_in_graph=torch.compiler.allow_in_graph,
)
