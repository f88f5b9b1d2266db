r"""The PyTorch fast path of ``kl_div_from_hidden`` (CPU, CUDA): chunks of rows, never the logits.

The rows (tokens) are walked in chunks of :func:`chunk_rows` rows. Per chunk of
student hidden states :math:`h_c` (and the teacher's, or its logits):

1. the chunk's logits :math:`s_c = h_c W_s^\top + b_s` and :math:`t_c` by one matrix
   product each (``torch.mm``, the bias added after it, as the reference does; in
   float32 on the CPU by blocks of :data:`COLUMN_BLOCK` classes, :func:`_mm_transposed`);
2. the fused from-logits kernel (on the CPU the C kernel,
   :func:`kldiv_spec.backends._blocks_logits.from_logits` on zero-copy NumPy views; on
   CUDA the Triton kernel, :func:`kldiv_spec.backends._triton_logits.from_logits`, its
   row sums kept on the device) gives the rows' divergences and the logits' gradient
   :math:`G_c = c\,(q - p)` (forward KL; :math:`c = k / (T D)`, :math:`D` the
   reduction's divisor) in one pass;
3. :math:`\partial h_c = G_c W_s` is written into its rows of the hidden states'
   gradient, :math:`\partial W_s \mathrel{+}= G_c^\top h_c` (``addmm_``, in place) and
   :math:`\partial b_s \mathrel{+}= \sum_i G_{c,i}`;

then the chunk's logits and :math:`G_c` are dropped. So the gradients are computed
in the forward (as Liger-Kernel's fused linear losses do) and the backward only
multiplies them, in place, by the upstream gradient. Extra memory beyond the
operands and the gradients: one chunk's temporaries (:func:`bytes_per_row` times the
chunk's rows, at most the memory budget) and, under autocast, the weights' copies in
the autocast dtype.

**The gradient over the student's logits.** Where the C kernel evaluates a chunk in
float32 (:func:`gradient_in_place`), it writes the logits' gradient over the chunk's
student logits, which it reads for the last time in that pass (bit for bit the values
of a separate buffer: ``backends/_fused_logits.c``); elsewhere the gradient has a
buffer of its own.

**The chunk rule.** ``rows = clamp(budget // bytes_per_row(V), 1, R)``, evened out
over the chunks (:func:`chunk_rows`): the budget divided by the bytes one row's
temporaries take (both logits in the product's dtype, their copies in the kernel's
dtype where it differs, the gradient where it has its own buffer, and its copy in the
weight's dtype where it differs: 8 bytes per class for float32 on the CPU, 12 with
the gradient's own buffer). The budget is ``memory_budget=`` when
given; by default the larger of :data:`DEFAULT_MEMORY_BUDGET` (128 MiB) and
:data:`MIN_ROWS` (512) rows' worth, since the matrix products of fewer rows read the
weights more often per row and run slower per row on a CPU (2x to 3x at 64 rows against
512, 5% at 342: ``docs/hidden.md``). The chunk's temporaries are allocated once per call and reused
by every chunk (:class:`_Buffers`).

**Dtypes.** The logits are formed in each model's dtype (as the reference does), or
in the autocast dtype under ``torch.autocast("cpu")`` (bfloat16 matrix products, as
autocast runs ``matmul``; not for float64; the bias added in the promoted dtype, as
the reference's ``matmul(h, W.T) + b``), then converted per chunk to the
kernel's dtype, the compute dtype of the result (float32 for half precision, float64
if any operand is float64). The gradient products run in the weight's dtype
(float32 under autocast with float32 weights: the gradients are accumulated over
every chunk) and the loss is the operands' common dtype, float32 for float32
parameters under autocast.

**Tracing.** The work is one ``torch.library.custom_op``
(``kldiv_spec::from_hidden``) with a fake implementation and a registered autograd
formula, so ``torch.compile(fullgraph=True)`` records it as one opaque call (no graph
break) and the compiled step never holds the logits either. Eagerly, the operator
runs inside an ``autograd.Function`` that hands its gradients to autograd once
(:class:`_Eager`): through the operator's own autograd, ``AccumulateGrad`` would copy
the weight's gradient, a weight-sized peak. ``beta`` 0 and 1 are the two KLs; any
other ``beta`` (the generalised Jensen-Shannon divergence) takes the Jensen-Shannon
kernels per chunk (:mod:`kldiv_spec.backends._blocks_jsd` for a float32 evaluation on
the CPU, :mod:`kldiv_spec.backends._triton_jsd` on CUDA). Declined (left to the
reference, which materialises the logits): ``beta`` with a float64 evaluation on the
CPU (or a temperature above 64, or ``beta`` within 2**-60 of an endpoint: the kernel's
ranges), ``reduction='none'``, tensors on other devices
(CUDA without Triton, MPS, ...), operands on several devices, empty operands,
``torch.func`` transforms, forward-mode AD, TorchScript. The backward is not
differentiable again (no double backward), as in the fused linear losses.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.autograd import forward_ad

from kldiv_spec._core_logits import resolve_beta, row_divisor
from kldiv_spec._validation import HiddenOperands

from . import _blocks_jsd, _blocks_logits

__all__ = [
    "COLUMN_BLOCK",
    "DEFAULT_MEMORY_BUDGET",
    "MIN_ROWS",
    "bytes_per_row",
    "chunk_rows",
    "gradient_in_place",
    "kl_div_from_hidden",
    "kl_div_from_hidden_backward",
    "on_triton",
]

#: The default budget of one chunk's temporaries: 128 MiB (or :data:`MIN_ROWS` rows).
DEFAULT_MEMORY_BUDGET = 128 << 20
#: The fewest rows a chunk takes under the default budget.
MIN_ROWS = 512
#: The columns (classes) of one block of a chunk's logits product, float32 on the CPU.
COLUMN_BLOCK = 512

_HALF = (torch.float16, torch.bfloat16)
_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def on_triton(device: torch.device) -> bool:
    """Return whether a chunk's logits on ``device`` go to the Triton kernel.

    CUDA devices where Triton is installed, and the CPU when Triton's interpreter is on
    (``TRITON_INTERPRET=1``: the tests of the CUDA path); otherwise the CPU takes the C
    kernel and other devices the reference.
    """
    from . import logits_torch

    if device.type == "cuda":
        return logits_torch._triton_importable()
    return device.type == "cpu" and logits_torch._interpreted()


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def bytes_per_row(
    vocab: int,
    /,
    *,
    student_dtype: torch.dtype,
    teacher_dtype: torch.dtype,
    kernel_dtype: torch.dtype,
    weight_dtype: torch.dtype,
    gradient_in_place: bool = False,
) -> int:
    """Return the bytes of one row's temporaries in a chunk.

    The student's and the teacher's logits in their product dtypes, their copies in
    ``kernel_dtype`` where it differs, the logits' gradient (``kernel_dtype``; none
    with ``gradient_in_place``, written over the student's logits by the kernel:
    :func:`gradient_in_place`) and its copies in ``weight_dtype`` and in the
    accumulation dtype (float32 for half-precision weights) where they differ, for
    ``vocab`` classes.
    """
    k = _size(kernel_dtype)
    per_class = 0 if gradient_in_place else k  # the gradient
    for dt in (student_dtype, teacher_dtype):
        per_class += _size(dt) + (k if dt != kernel_dtype else 0)
    if weight_dtype != kernel_dtype:
        per_class += _size(weight_dtype)
        if weight_dtype in _HALF and kernel_dtype != torch.float32:
            per_class += 4  # and in the float32 the weight's gradient accumulates in
    return max(vocab, 1) * per_class


def gradient_in_place(
    device: torch.device, kernel_dtype: torch.dtype, beta: float | None, temperature: float
) -> bool:
    """Return whether a chunk's logits' gradient is written over the student's logits.

    Where the C kernel evaluates the chunk in float32 (the CPU without Triton's
    interpreter, a float32 evaluation, the KL, a temperature the float32 kernel takes:
    :func:`kldiv_spec.backends._blocks_logits.takes_in_place`): the student's logits of
    a chunk are the operator's own temporaries, read for the last time by the kernel.
    """
    if device.type != "cpu" or on_triton(device) or beta is not None:
        return False
    if kernel_dtype != torch.float32:
        return False
    return _blocks_logits.takes_in_place(np.float32, temperature)


def chunk_rows(rows: int, per_row: int, budget: int | None, /) -> int:
    """Return the rows per chunk: ``c = clamp(budget // per_row, 1, rows)``, evened out.

    ``budget`` None is ``max(DEFAULT_MEMORY_BUDGET, MIN_ROWS * per_row)``. The
    ``ceil(rows / c)`` chunks then share the rows evenly, ``ceil(rows / ceil(rows / c))``
    each (at most ``c``): 2048 rows in chunks of at most 384 are five of 342 and one of
    338, not five of 384 and a last one of 128, whose matrix products run slower per row.
    """
    b = max(DEFAULT_MEMORY_BUDGET, MIN_ROWS * per_row) if budget is None else budget
    rows = max(rows, 1)
    most = max(1, min(rows, b // max(per_row, 1)))
    chunks = -(-rows // most)
    return -(-rows // chunks)


# --------------------------------------------------------------------------- the operator


class _Buffers:
    """One chunk's temporaries, allocated at the first chunk and reused by the others.

    A chunk's logits take tens of megabytes, above glibc's largest ``mmap`` threshold
    (32 MiB): allocated afresh per chunk, every chunk would page-fault its logits and
    gradient in again (about 5% of a 2048 x 1024 x 32,000 step on a 2-core CPU). Each
    buffer has ``rows`` rows; a chunk of ``n`` rows takes the first ``n`` (C-contiguous).
    """

    def __init__(self, rows: int, vocab: int, device: torch.device) -> None:
        self._shape = (rows, vocab)
        self._device = device
        self._held: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, name: str, dtype: torch.dtype, n: int) -> torch.Tensor:
        key = (name, dtype)
        if key not in self._held:
            self._held[key] = torch.empty(self._shape, dtype=dtype, device=self._device)
        return self._held[key][:n]

    def convert(self, name: str, a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Return ``a`` in ``dtype`` and C-contiguous, copied into buffer ``name`` if need be."""
        if a.dtype == dtype and a.is_contiguous():
            return a
        return self.take(name, dtype, a.shape[0]).copy_(a)


def _product(
    h: torch.Tensor,
    w: torch.Tensor,
    w_m: torch.Tensor,
    b: torch.Tensor | None,
    out: torch.Tensor,
) -> torch.Tensor:
    r"""Return :math:`h W^\top (+ b)` as the reference forms it.

    The product in ``w_m``'s dtype (the operands' common dtype, or autocast's), into
    ``out`` (that dtype); the bias then added in the common dtype of the product and
    every operand, as the reference's ``matmul(h, W.T) + b`` promotes.
    """
    z = _mm_transposed(h if h.dtype == w_m.dtype else h.to(w_m.dtype), w_m, out)
    if b is None:
        return z
    dt = _common([z, h, w, b])
    z = z if z.dtype == dt else z.to(dt)
    return z.add_(b if b.dtype == dt else b.to(dt))


def _mm_transposed(h: torch.Tensor, w: torch.Tensor, out: torch.Tensor, /) -> torch.Tensor:
    r"""Write :math:`h W^\top` into ``out``: on the CPU in float32, by blocks of columns.

    ``out[:, v:v + COLUMN_BLOCK] = h @ W[v:v + COLUMN_BLOCK].T`` for each block: each
    product's output (``rows x COLUMN_BLOCK``, 1 MiB at 512 rows) stays in the core's
    cache while the product sums over ``H`` in its steps, where one product over all
    ``V`` columns writes and reads its ``rows x V`` output (tens of megabytes) again at
    each step. Each element is still one product's sum over ``H``; on the benchmarks'
    CPU (MKL) the values were bit for bit the single product's. Elsewhere
    (float64, whose MKL kernels measured slower by blocks, half precision, CUDA) one
    product.
    """
    vocab = w.shape[0]
    if h.device.type != "cpu" or w.dtype != torch.float32 or vocab <= COLUMN_BLOCK:
        return torch.mm(h, w.T, out=out)
    for v in range(0, vocab, COLUMN_BLOCK):
        u = min(v + COLUMN_BLOCK, vocab)
        torch.mm(h, w[v:u].T, out=out[:, v:u])
    return out


def _loss(
    total: float | torch.Tensor,
    d: int,
    masked: bool,
    factor: float,
    kd: torch.dtype,
    out: torch.dtype,
) -> torch.Tensor:
    """Round the float64 total to ``kd``, divide by ``d`` once, times ``factor``, to ``out``.

    ``total`` a float (the CPU kernel's) or a 0-d float64 tensor on the device (the
    Triton kernel's, never synchronised). The from-logits rule
    (``kldiv_spec.backends.logits_numpy``): ``d = 0`` gives 0 with a mask (no kept row)
    and NaN without (an empty ``'mean'``).
    """
    if isinstance(total, torch.Tensor):
        result, device = total.to(kd), total.device
    else:
        result, device = torch.tensor(total, dtype=kd), torch.device("cpu")
    if d == 0:
        result = torch.full((), 0.0 if masked else math.nan, dtype=kd, device=device)
    elif d != 1:
        result = result / d
    if factor != 1.0:
        result = result * factor
    return result.to(out)


def _divisor(reduction: str, divisor: int, kept: torch.Tensor | None, vocab: int) -> int:
    if kept is None:
        return divisor
    n = int(torch.count_nonzero(kept))  # on a GPU: the call's one synchronisation
    return n * vocab if reduction == "mean" else (1 if reduction == "sum" else n)


@torch.library.custom_op("kldiv_spec::from_hidden", mutates_args=())
def _from_hidden(
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    b_s: torch.Tensor | None,
    h_t: torch.Tensor | None,
    w_t: torch.Tensor | None,
    b_t: torch.Tensor | None,
    t_logits: torch.Tensor | None,
    kept: torch.Tensor | None,
    temperature: float,
    factor: float,
    reverse: bool,
    beta: float | None,
    reduction: str,
    divisor: int,
    student_dtype: torch.dtype,
    teacher_dtype: torch.dtype,
    kernel_dtype: torch.dtype,
    result_dtype: torch.dtype,
    chunk: int,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the chunked loss and the student's gradients for a unit upstream gradient.

    ``h_s`` ``(R, H_s)``, ``w_s`` ``(V, H_s)``; the teacher as ``h_t``/``w_t``/``b_t``
    or ``t_logits`` ``(R, V)``; ``kept`` a bool ``(R,)`` or None. Returns ``(loss,
    grad_h, grad_w, grad_b)``, each gradient empty ``(0,)`` unless asked for.
    """
    with torch.autocast(h_s.device.type, enabled=False), torch.no_grad():
        return _chunked(
            h_s.detach(),
            w_s.detach(),
            None if b_s is None else b_s.detach(),
            (h_t, w_t, b_t, t_logits),
            None if kept is None else kept.detach(),
            temperature=temperature,
            factor=factor,
            direction="reverse" if reverse else "forward",
            beta=beta,
            reduction=reduction,
            divisor=divisor,
            dtypes=(student_dtype, teacher_dtype, kernel_dtype, result_dtype),
            chunk=chunk,
            need=(need_h, need_w, need_b),
        )


def _chunked(
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    b_s: torch.Tensor | None,
    teacher: tuple[torch.Tensor | None, ...],
    kept: torch.Tensor | None,
    *,
    temperature: float,
    factor: float,
    direction: str,
    beta: float | None,
    reduction: str,
    divisor: int,
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype, torch.dtype],
    chunk: int,
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    sd, td, kd, out = dtypes
    need_h, need_w, need_b = need
    rows, width = h_s.shape
    vocab = w_s.shape[0]
    h_t, w_t, b_t, t_logits = (None if a is None else a.detach() for a in teacher)
    ws_m = w_s if w_s.dtype == sd else w_s.to(sd)  # the autocast copy, if any
    wt_m = None if w_t is None else (w_t if w_t.dtype == td else w_t.to(td))
    acc = torch.float32 if w_s.dtype in _HALF else w_s.dtype
    # the operator's outputs must not alias one another: one empty tensor each
    gh = h_s.new_empty((rows, width)) if need_h else h_s.new_empty((0,))
    gw = h_s.new_empty((vocab, width), dtype=acc) if need_w else h_s.new_empty((0,))
    gb = h_s.new_zeros((vocab,), dtype=acc) if need_b else h_s.new_empty((0,))
    any_grad = need_h or need_w or need_b
    d = _divisor(reduction, divisor, kept, vocab)
    scale = (0.0 if d == 0 else factor / temperature / d) if any_grad else None
    triton = on_triton(h_s.device)
    total: float | torch.Tensor = 0.0
    unit = None  # the Triton kernel's upstream gradient of every term, 1 / d
    if triton:
        total = h_s.new_zeros((), dtype=torch.float64)
        if any_grad:
            unit = h_s.new_full((), 0.0 if d == 0 else 1.0 / d, dtype=kd)
    buffers = _Buffers(min(chunk, rows), vocab, h_s.device)
    in_place = gradient_in_place(h_s.device, kd, beta, temperature)
    for i in range(0, rows, chunk):
        j = min(i + chunk, rows)
        n = j - i
        hs = h_s[i:j]
        s = _product(hs, w_s, ws_m, b_s, buffers.take("s", ws_m.dtype, n))
        if t_logits is not None:
            t = t_logits[i:j]
        else:
            assert h_t is not None and w_t is not None and wt_m is not None
            t = _product(h_t[i:j], w_t, wt_m, b_t, buffers.take("t", wt_m.dtype, n))
        # Triton reads half-precision logits of one dtype as they are and widens them in
        # registers (exactly, as the conversion would); the C kernel takes kd
        read = s.dtype if triton and s.dtype == t.dtype and s.dtype in _HALF else kd
        s = buffers.convert("s, kernel", s, read)
        t = buffers.convert("t, kernel", t, read)
        kept_c = None if kept is None else kept[i:j]
        grad_out = None
        if any_grad and not triton:  # the kernel writes over s where it can (in_place)
            grad_out = s if in_place else buffers.take("grad", kd, n)
        part, g = _evaluate(
            s, t, kept_c, grad_out, temperature=temperature, factor=factor,
            direction=direction, beta=beta, scale=scale, unit=unit, kd=kd, triton=triton,
        )  # fmt: skip
        total += part
        del s, t
        if g is None:
            continue
        gm = buffers.convert("grad", g, w_s.dtype) if need_h or acc == w_s.dtype else g
        if need_h:
            if gh.dtype == gm.dtype:
                torch.mm(gm, w_s, out=gh[i:j])
            else:
                gh[i:j] = torch.mm(gm, w_s)
        if need_w:
            ga = gm if gm.dtype == acc else buffers.convert("grad", g, acc)
            ha = hs if hs.dtype == acc else hs.to(acc)
            if i == 0:  # the first chunk writes the gradient: no zero fill beforehand
                torch.mm(ga.T, ha, out=gw)
            else:
                gw.addmm_(ga.T, ha)
            del ga, ha
        if need_b:
            gb += g.sum(0, dtype=acc)
        del g, gm
    loss = _loss(total, d, kept is not None, factor, kd, out)
    if need_w and gw.dtype != w_s.dtype:
        gw = gw.to(w_s.dtype)
    if need_b and b_s is not None and gb.dtype != b_s.dtype:
        gb = gb.to(b_s.dtype)
    return loss, gh, gw, gb


def _evaluate(
    s: torch.Tensor,
    t: torch.Tensor,
    kept: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    *,
    temperature: float,
    factor: float,
    direction: str,
    beta: float | None,
    scale: float | None,
    unit: torch.Tensor | None,
    kd: torch.dtype,
    triton: bool,
) -> tuple[float | torch.Tensor, torch.Tensor | None]:
    """One chunk's fused kernel: ``(the sum of its rows' divergences, the logits' gradient)``.

    On the Triton route (CUDA, or the CPU in Triton's interpreter) the sum is a 0-d
    float64 tensor on the device (no synchronisation) and ``unit`` is the upstream
    gradient of every term; on the CPU the C kernels on zero-copy NumPy views, the sum
    a float and the gradient written into ``grad_out``. ``beta`` (strictly between 0
    and 1) takes the Jensen-Shannon kernels, float32 on the CPU (``_accepts``).
    """
    if triton:
        from . import _triton_jsd, _triton_logits

        common = {"temperature": temperature, "kept": kept, "gw": unit}
        common |= {"c": factor / temperature, "grad_dtype": kd}
        if beta is None:
            kl_t, g = _triton_logits.from_logits(s, t, direction=direction, **common)
        else:
            kl_t, g = _triton_jsd.from_logits(s, t, beta=beta, **common)
        assert kl_t is not None
        return kl_t.sum(), g
    options: dict[str, Any] = {"temperature": temperature, "grad_scale": scale}
    options["kept"] = None if kept is None else kept.numpy()
    options["grad_out"] = None if grad_out is None else grad_out.numpy()
    if beta is None:
        kl, grad = _blocks_logits.from_logits(s.numpy(), t.numpy(), direction=direction, **options)
    else:
        kl, grad = _blocks_jsd.from_logits(s.numpy(), t.numpy(), beta=beta, **options)
    return float(np.add.reduce(kl)), (None if grad is None else torch.from_numpy(grad))


@_from_hidden.register_fake
def _(
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    b_s: torch.Tensor | None,
    h_t: torch.Tensor | None,
    w_t: torch.Tensor | None,
    b_t: torch.Tensor | None,
    t_logits: torch.Tensor | None,
    kept: torch.Tensor | None,
    temperature: float,
    factor: float,
    reverse: bool,
    beta: float | None,
    reduction: str,
    divisor: int,
    student_dtype: torch.dtype,
    teacher_dtype: torch.dtype,
    kernel_dtype: torch.dtype,
    result_dtype: torch.dtype,
    chunk: int,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss = h_s.new_empty((), dtype=result_dtype)
    gh = h_s.new_empty(h_s.shape) if need_h else h_s.new_empty((0,))
    gw = w_s.new_empty(w_s.shape) if need_w else h_s.new_empty((0,))
    gb = b_s.new_empty(b_s.shape) if need_b and b_s is not None else h_s.new_empty((0,))
    return loss, gh, gw, gb


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _, gh, gw, gb = output
    ctx.mark_non_differentiable(gh, gw, gb)
    ctx.save_for_backward(gh, gw, gb)
    ctx.need = inputs[-3:]


def _backward(ctx: Any, grad: torch.Tensor, *_: Any) -> tuple[Any, ...]:
    """Scale the saved gradients, in place, by the upstream gradient (used once)."""
    gh, gw, gb = ctx.saved_tensors
    need_h, need_w, need_b = ctx.need
    out: list[Any] = [None] * 22
    if need_h:
        out[0] = gh.mul_(grad.to(gh.dtype))
    if need_w:
        out[1] = gw.mul_(grad.to(gw.dtype))
    if need_b:
        out[2] = gb.mul_(grad.to(gb.dtype))
    return tuple(out)


_from_hidden.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- dispatch


def _tensors(ops: HiddenOperands) -> list[Any]:
    names = ("student_hidden", "student_weight", "student_bias", "teacher_hidden")
    names += ("teacher_weight", "teacher_bias", "teacher_logits", "mask", "labels")
    return [a for a in (getattr(ops, n) for n in names) if a is not None]


def _accepts(ops: HiddenOperands) -> bool:
    """Return whether the chunked operator takes the call (else the reference does)."""
    if ops.reduction == "none":
        return False
    _, beta = resolve_beta(ops.beta, ops.direction)
    if beta is not None and not _takes_beta(ops, beta):
        return False
    tensors = _tensors(ops)
    device = ops.student_hidden.device
    if any(a.device != device for a in tensors):
        return False
    if device.type != "cpu" and not on_triton(device):
        return False
    if ops.student_hidden.numel() == 0 or ops.vocab == 0:
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    if forward_ad._current_level >= 0:
        return False
    if torch.compiler.is_compiling():
        return True  # traced tensors (fake, functional): the operator has a fake kernel
    if any(type(a) not in _PLAIN_TYPES or a.layout != torch.strided for a in tensors):
        return False
    return not any(_is_wrapped(a) for a in tensors)


def _takes_beta(ops: HiddenOperands, beta: float) -> bool:
    """Return whether the Jensen-Shannon kernel takes ``beta`` with these operands.

    On CUDA (Triton) always; on the CPU where the compiled kernel runs, for a float32
    evaluation (the compute dtype) with its temperature and ``beta`` ranges
    (:func:`kldiv_spec.backends._blocks_jsd.takes_options`); float64 goes to the reference.
    """
    if on_triton(ops.student_hidden.device):
        return True
    return ops.compute_dtype == torch.float32 and _blocks_jsd.takes_options(ops.temperature, beta)


def _product_dtype(dtype: torch.dtype, device: str) -> torch.dtype:
    """Return the dtype a model's logits are formed in: autocast's, else ``dtype``."""
    if dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return dtype


def _call(
    ops: HiddenOperands, need: tuple[bool, bool, bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    h, w, b = ops.student_hidden, ops.student_weight, ops.student_bias
    direction, beta = resolve_beta(ops.beta, ops.direction)  # beta 0 and 1: the KLs
    width = w.shape[1]
    h2 = h.reshape(-1, width)
    rows = h2.shape[0]
    h_t = w_t = t2 = None
    if ops.teacher_logits is not None:
        t2 = ops.teacher_logits.reshape(rows, ops.vocab)
        td = t2.dtype
    else:
        assert ops.teacher_hidden is not None and ops.teacher_weight is not None
        h_t = ops.teacher_hidden.reshape(rows, ops.teacher_weight.shape[1])
        w_t = ops.teacher_weight
        parts = [h_t, w_t] if ops.teacher_bias is None else [h_t, w_t, ops.teacher_bias]
        td = _product_dtype(_common(parts), h.device.type)
    sd = _product_dtype(_common([h, w] if b is None else [h, w, b]), h.device.type)
    kd = ops.compute_dtype
    kept = ops.row_mask()
    if kept is not None:
        kept = torch.broadcast_to(kept, ops.row_shape).reshape(rows).contiguous()
    per_row = bytes_per_row(
        ops.vocab,
        student_dtype=sd,
        teacher_dtype=td,
        kernel_dtype=kd,
        weight_dtype=w.dtype,
        gradient_in_place=gradient_in_place(h.device, kd, beta, ops.temperature),
    )
    shape = ops.logits_shape
    return torch.ops.kldiv_spec.from_hidden(
        h2,
        w,
        b,
        h_t,
        w_t,
        ops.teacher_bias,
        t2,
        kept,
        ops.temperature,
        ops.factor,
        direction == "reverse",
        beta,
        ops.reduction,
        row_divisor(ops.reduction, shape=shape, axis=len(shape) - 1),
        sd,
        td,
        kd,
        ops.dtype,
        chunk_rows(rows, per_row, ops.memory_budget),
        *need,
    )


def _common(tensors: list[torch.Tensor]) -> torch.dtype:
    dt = tensors[0].dtype
    for a in tensors[1:]:
        dt = torch.promote_types(dt, a.dtype)
    return dt


def kl_div_from_hidden(ops: HiddenOperands, /) -> Any:
    """Return the loss, with the student's gradients attached, or NotImplemented."""
    if not _accepts(ops):
        return NotImplemented
    grad = torch.is_grad_enabled()
    h, w, b = ops.student_hidden, ops.student_weight, ops.student_bias
    need = (
        grad and h.requires_grad,
        grad and w.requires_grad,
        grad and b is not None and b.requires_grad,
    )
    if not any(need):
        loss, *_ = _call(ops, need)
        return loss
    if torch.compiler.is_compiling():
        loss, *_ = _call(ops, need)  # the operator's registered autograd
        return loss
    return _Eager.apply(h, w, b, ops)


class _Eager(torch.autograd.Function):
    """The operator eagerly, its gradients kept on ``ctx`` and handed over once.

    Autograd then takes each gradient as the parameter's ``.grad`` without a copy: the
    operator's registered autograd keeps a second reference to its saved outputs, and
    ``AccumulateGrad`` copies a gradient referenced elsewhere (a weight-sized copy at
    the backward's peak).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        ops: HiddenOperands,
    ) -> torch.Tensor:
        need = tuple(bool(n) for n in ctx.needs_input_grad[:3])
        loss, gh, gw, gb = _call(ops, need)  # type: ignore[arg-type]
        ctx.grads = (gh.reshape(h.shape) if need[0] else None, gw if need[1] else None,
                     gb if need[2] else None)  # fmt: skip
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            msg = (
                "kl_div_from_hidden's gradients were handed over by an earlier backward "
                "through this graph: compute the loss again (no retain_graph reuse)"
            )
            raise RuntimeError(msg)
        return (*(None if g is None else g.mul_(grad.to(g.dtype)) for g in grads), None)


def kl_div_from_hidden_backward(g: Any, ops: HiddenOperands, /) -> Any:
    """Return the student's gradients for upstream ``g`` (0-d), or NotImplemented."""
    if not _accepts(ops) or type(g) not in _PLAIN_TYPES or g.device.type != "cpu":
        return NotImplemented
    h, b = ops.student_hidden, ops.student_bias
    with torch.no_grad():
        _, gh, gw, gb = _call(ops, (True, True, b is not None))
        gh = gh.reshape(h.shape).mul_(g.to(gh.dtype))
        gw = gw.mul_(g.to(gw.dtype))
        return gh, gw, (None if b is None else gb.mul_(g.to(gb.dtype)))
