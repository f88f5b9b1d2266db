r"""Triton kernels for ``kl_div_from_logits``: one program per row, an online softmax over tiles.

Each program owns one row (the classes of one sample or token) and walks it in
tiles of ``BLOCK`` classes. With :math:`w` the scaled logits of the weighting
distribution and :math:`o` those of the other one (forward direction:
:math:`w = t / T`, the teacher, :math:`o = s / T`, the student; reverse:
swapped), the kernel keeps, per distribution, the running maximum
:math:`m` and the running sum :math:`Z = \sum_j e^{x_j - m}`; a tile with a
larger maximum :math:`m'` rescales the sum by :math:`\alpha = e^{m - m'}`
(the online softmax). With the divergence wanted and no second pass to give
it, it also keeps

.. math::

    U = \sum_j e^{w_j - m_w} \bigl((w_j - m_w) - (o_j - m_o)\bigr), \qquad
    U' = \alpha_w \bigl(U + Z_w\,[(m_w - m_w') - (m_o - m_o')]\bigr)
         + \sum_{j \in \text{tile}} e^{w_j - m_w'} \bigl((w_j - m_w') - (o_j - m_o')\bigr),

so that at the end of the row

.. math::

    \mathrm{KL}(w \,\|\, o) = \sum_j p^w_j (\log p^w_j - \log p^o_j)
    = U / Z_w - \log Z_w + \log Z_o .

A term whose weight :math:`e^{w_j - m_w}` is 0 is 0 (an excluded class, also
where :math:`o_j = -\infty`). A maximum of ``-inf`` (every class so far
excluded) shifts by 0, as the reference does (:mod:`kldiv_spec._core_logits`).

**Edge rows.** A row whose one-pass divergence is not finite (NaN, ``+inf``:
rows with NaN, ``+inf``, only ``-inf``, a class excluded by the other
distribution only, or an overflowing rescale) is walked once more, inside the
same program, with the reference's own formula
:math:`\log p = (x - m) - \log Z`, :math:`e_j = 0` where :math:`p_j = 0`,
else :math:`p_j (\log p^w_j - \log p^o_j)`; so its value is the
specification's (a probability that underflows to 0 only after the division
by :math:`Z` is then excluded, as in the reference). Regular rows never take
that branch, and the host never synchronises.

**The gradient** (``WITH_GRAD``; reductions only, so the upstream gradient
:math:`G` is one scalar ``gw`` :math:`= g / D` for every row, 0 in masked
rows) takes a second pass over the row in the same program, with the final
:math:`m` and :math:`Z`:

.. math::

    \nabla_s = \bigl(G\,(q - p)\bigr)\,c \quad \text{(forward)}, \qquad
    \nabla_s = \bigl(G\,q \odot (\log q - \log p - \mathrm{KL})\bigr)\,c
    \quad \text{(reverse, 0 where } q = 0),

:math:`c = k / T`, in the reference's order of operations. In the forward
direction that pass also sums the reference's terms :math:`e_j`, which give the
row's divergence, so the first pass needs only :math:`m` and :math:`Z`.

**Traffic** per element, float32: the loss alone reads both logits once
(8 bytes); the loss with the gradient reads them twice (the second time
mostly from L2 at 32k classes) and writes the gradient once (16 + 4 bytes).
Per row, one float64 (the divergence) is written; the host adds them in
float64, rounds to the dtype and divides once (:func:`kldiv_spec._core.divide_total`),
all on the device.

Half-precision logits are loaded and computed in float32 (the reference's
compute dtype); the gradient is stored in the dtype of its buffer.
``exp``/``log`` are libdevice's on CUDA and NumPy's in Triton's interpreter
(:mod:`kldiv_spec.backends._triton_kernels`, whose ``interpreting()`` decides).
Importing this module raises ImportError when Triton is not installed.
"""

# ruff: noqa: N803  (Triton spells compile-time constants in capitals)
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from ._triton_kernels import _exp, _log, interpreting

__all__ = ["MAX_BLOCK", "block_for", "from_logits", "interpreting", "launch_rows", "num_warps_for"]

#: The largest tile (classes per iteration) for 32-bit and narrower logits; float64 uses half.
MAX_BLOCK = 4096
#: The smallest tile.
MIN_BLOCK = 16


def block_for(vocab: int, dtype: torch.dtype) -> int:
    """Return the tile for ``vocab`` classes: a power of 2, at most :data:`MAX_BLOCK`."""
    cap = MAX_BLOCK // 2 if dtype == torch.float64 else MAX_BLOCK
    return max(MIN_BLOCK, min(cap, triton.next_power_of_2(max(vocab, 1))))


def num_warps_for(block: int) -> int:
    """Return the warps per program for a tile: 8 from 2048 classes, 4 below."""
    return 8 if block >= 2048 else 4


@triton.jit
def _tile(ptr, offs, in_row, temperature, WIDE: tl.constexpr, SCALED: tl.constexpr):  # type: ignore[no-untyped-def]
    # One tile of scaled logits in the compute dtype; lanes past the row read -inf.
    x = tl.load(ptr + offs, mask=in_row, other=float("-inf"))
    # The quotient correctly rounded (div_rn: Triton's ``/`` is an approximate division
    # for float32 on CUDA), T rounded to the compute dtype first, as torch divides.
    if WIDE:
        x = x.to(tl.float64)
        if SCALED:
            x = x / temperature  # float64 division is IEEE on CUDA
    else:
        x = x.to(tl.float32)
        if SCALED:
            x = tl.math.div_rn(x, tl.cast(temperature, tl.float32))
    return x


@triton.jit
def _shift(m):  # type: ignore[no-untyped-def]
    # The reference's shift: the maximum, or 0 where it is -inf (nothing to shift by).
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _rescale(m, m_new):  # type: ignore[no-untyped-def]
    # alpha = e^(shift(m) - shift(m_new)); 0 while nothing was seen (the sums are 0 then).
    return tl.where(m == float("-inf"), 0.0, _exp(_shift(m) - _shift(m_new)))


@triton.jit
def _times_c(v, c, WIDE: tl.constexpr):  # type: ignore[no-untyped-def]
    # v * c in the compute dtype (c rounded to float32 for 32-bit and narrower logits).
    if WIDE:  # noqa: SIM108 (Triton: a constexpr branch)
        r = v * c
    else:
        r = v * tl.cast(c, tl.float32)
    return r


@triton.jit
def _from_logits_kernel(  # type: ignore[no-untyped-def]
    w_ptr,
    o_ptr,
    kept_ptr,
    gw_ptr,
    kl_ptr,
    grad_ptr,
    vocab,
    temperature: tl.float64,
    c: tl.float64,
    FORWARD: tl.constexpr,
    NEED_LOSS: tl.constexpr,
    WITH_GRAD: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WIDE: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * vocab
    cols = tl.arange(0, BLOCK)
    if HAS_MASK:  # noqa: SIM108 (Triton: a constexpr branch)
        kept = tl.load(kept_ptr + row) != 0
    else:
        kept = row >= 0  # True
    # A masked row does not walk its classes (it contributes 0 and a zero gradient).
    n = tl.where(kept, vocab, 0)
    # The divergence comes from the one-pass sum U unless the gradient pass sums the terms.
    need_kl: tl.constexpr = (NEED_LOSS and not (WITH_GRAD and FORWARD)) or (
        WITH_GRAD and not FORWARD
    )

    if WIDE:  # a 0-d 0 of the compute dtype
        zero = tl.sum(tl.zeros([BLOCK], dtype=tl.float64), axis=0)
    else:
        zero = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), axis=0)
    m_w = zero + float("-inf")
    m_o = zero + float("-inf")
    z_w = zero
    z_o = zero
    u = zero
    for start in range(0, n, BLOCK):
        offs = start + cols
        in_row = offs < n
        w = _tile(w_ptr + base, offs, in_row, temperature, WIDE, SCALED)
        o = _tile(o_ptr + base, offs, in_row, temperature, WIDE, SCALED)
        mw_new = tl.maximum(m_w, tl.max(w, axis=0))
        mo_new = tl.maximum(m_o, tl.max(o, axis=0))
        a_w = _rescale(m_w, mw_new)
        a_o = _rescale(m_o, mo_new)
        sw = _shift(mw_new)
        so = _shift(mo_new)
        e_w = _exp(w - sw)
        if need_kl:
            # Rescale the old terms to the new shifts; 0 when their weights underflow (the
            # guard only spares a walk: 0 * inf = NaN would send the row to the exact walk).
            delta = (_shift(m_w) - sw) - (_shift(m_o) - so)
            az = a_w * z_w
            old = a_w * u + tl.where(az == 0, 0.0, az * delta)
            d = (w - sw) - (o - so)
            u = tl.where(a_w == 0, 0.0, old) + tl.sum(tl.where(e_w == 0, 0.0, e_w * d), axis=0)
        z_w = z_w * a_w + tl.sum(e_w, axis=0)
        z_o = z_o * a_o + tl.sum(_exp(o - so), axis=0)
        m_w = mw_new
        m_o = mo_new

    sw = _shift(m_w)
    so = _shift(m_o)
    lz_w = _log(z_w)
    lz_o = _log(z_o)
    kl = zero
    if need_kl:
        kl = u / z_w - lz_w + lz_o
        if ((kl != kl) | (tl.abs(kl) == float("inf"))) & kept:
            # An edge row: the reference's terms, element by element.
            acc = tl.zeros([BLOCK], dtype=kl.dtype)
            for start in range(0, n, BLOCK):
                offs = start + cols
                in_row = offs < n
                w = _tile(w_ptr + base, offs, in_row, temperature, WIDE, SCALED)
                o = _tile(o_ptr + base, offs, in_row, temperature, WIDE, SCALED)
                lw = (w - sw) - lz_w
                lo = (o - so) - lz_o
                p = _exp(lw)
                acc += tl.where(p == 0, 0.0, p * (lw - lo))
            kl = tl.sum(acc, axis=0)

    if WITH_GRAD:
        gw = tl.where(kept, tl.load(gw_ptr).to(kl.dtype), 0.0)
        acc = tl.zeros([BLOCK], dtype=kl.dtype)
        # Every class of the row is written, masked rows included (with 0).
        for start in range(0, vocab, BLOCK):
            offs = start + cols
            in_row = offs < vocab
            ld = offs < n  # a masked row (n = 0) reads nothing
            w = _tile(w_ptr + base, offs, ld, temperature, WIDE, SCALED)
            o = _tile(o_ptr + base, offs, ld, temperature, WIDE, SCALED)
            lw = (w - sw) - lz_w
            lo = (o - so) - lz_o
            if FORWARD:
                # w: the teacher (p), o: the student (q)
                p = _exp(lw)
                if NEED_LOSS:
                    acc += tl.where(p == 0, 0.0, p * (lw - lo))
                g = _times_c(gw * (_exp(lo) - p), c, WIDE)
            else:
                # w: the student (q), o: the teacher (p)
                q = _exp(lw)
                g = _times_c(gw * tl.where(q == 0, 0.0, q * ((lw - lo) - kl)), c, WIDE)
            g = tl.where(kept, g, 0.0)
            tl.store(grad_ptr + base + offs, g, mask=in_row)
        if FORWARD and NEED_LOSS:
            kl = tl.sum(acc, axis=0)

    if NEED_LOSS:
        tl.store(kl_ptr + row, tl.where(kept, kl, 0.0).to(tl.float64))


def from_logits(
    s: torch.Tensor,
    t: torch.Tensor,
    /,
    *,
    temperature: float,
    direction: str,
    kept: torch.Tensor | None,
    gw: torch.Tensor | None,
    c: float,
    need_loss: bool = True,
    grad_dtype: torch.dtype | None = None,
    block: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    r"""Return the rows' divergences (float64, unscaled) and, if ``gw`` is given, the gradient.

    Parameters
    ----------
    s, t : torch.Tensor
        Student and teacher logits, 2-d ``(rows, classes)``, contiguous, of one
        floating dtype, non-empty, on a CUDA device (or the CPU in Triton's
        interpreter).
    temperature : float
        :math:`T`.
    direction : {'forward', 'reverse'}
        Which distribution weights the terms (the teacher's, forward).
    kept : torch.Tensor or None
        A contiguous ``(rows,)`` bool or uint8 tensor (True keeps a row): dropped
        rows get a 0 divergence and a zero gradient.
    gw : torch.Tensor or None
        The upstream gradient of every term, :math:`G = g / D`, a 0-d tensor on
        the device (read by the kernel: no synchronisation); None for no gradient.
    c : float
        :math:`k / T`, the gradient's factor.
    need_loss : bool
        False (with ``gw``) skips the divergences; the first result is then None.
    grad_dtype : torch.dtype, optional
        The gradient's dtype (default ``s.dtype``).
    block, num_warps : int, optional
        The tile and warps per program (default :func:`block_for`, :func:`num_warps_for`).

    Returns
    -------
    kl : torch.Tensor or None
        ``(rows,)`` float64: each row's divergence (0 for dropped rows).
    grad : torch.Tensor or None
        ``s``'s shape: :math:`\nabla_s` for the upstream gradient ``gw``.
    """
    forward = direction == "forward"
    w, o = (t, s) if forward else (s, t)
    return launch_rows(
        _from_logits_kernel,
        s,
        (w, o),
        (float(temperature), float(c)),
        {"FORWARD": forward},
        temperature=temperature,
        kept=kept,
        gw=gw,
        need_loss=need_loss,
        grad_dtype=grad_dtype,
        block=block,
        num_warps=num_warps,
    )


def launch_rows(
    kernel: Any,
    s: torch.Tensor,
    logits: tuple[torch.Tensor, torch.Tensor],
    scalars: tuple[float, ...],
    constexprs: dict[str, Any],
    *,
    temperature: float,
    kept: torch.Tensor | None,
    gw: torch.Tensor | None,
    need_loss: bool,
    grad_dtype: torch.dtype | None,
    block: int | None,
    num_warps: int | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Run a from-logits ``kernel`` (the KL's, the JSD's), one program per row of ``s``.

    Allocates the rows' float64 divergences (``need_loss``) and the gradient (``gw``
    given, in ``grad_dtype`` or ``s``'s dtype), and passes the kernels' shared arguments,
    ``(*logits, kept, gw, loss, grad, vocab, *scalars)``, with the shared constexprs
    and the kernel's own ``constexprs``. Returns ``(loss or None, grad or None)``.
    """
    rows, vocab = s.shape
    if block is None:
        block = block_for(vocab, s.dtype)
    if num_warps is None:
        num_warps = num_warps_for(block)
    loss = torch.empty(rows, dtype=torch.float64, device=s.device) if need_loss else None
    grad = None
    if gw is not None:
        grad = torch.empty(s.shape, dtype=grad_dtype or s.dtype, device=s.device)
    dummy = s
    flags: dict[str, Any] = {
        **constexprs,
        "NEED_LOSS": need_loss,
        "WITH_GRAD": grad is not None,
        "HAS_MASK": kept is not None,
        "WIDE": s.dtype == torch.float64,
        "SCALED": temperature != 1.0,
        "BLOCK": block,
    }
    args = (
        *logits,
        dummy if kept is None else kept,
        dummy if gw is None else gw,
        dummy if loss is None else loss,
        dummy if grad is None else grad,
        vocab,
        *scalars,
    )
    _launch(kernel, (rows,), s.device, args, flags, num_warps)
    return loss, grad


def _launch(
    kernel: Any,
    grid: tuple[int],
    device: torch.device,
    args: tuple[Any, ...],
    constexprs: dict[str, Any],
    num_warps: int,
) -> None:
    """Run ``kernel`` on ``grid``: compiled on CUDA, else in Triton's interpreter."""
    if device.type == "cuda":
        # No fused multiply-add, as in _triton_kernels: the reference's order of roundings.
        with torch.cuda.device(device):
            kernel[grid](*args, **constexprs, num_warps=num_warps, enable_fp_fusion=False)
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
