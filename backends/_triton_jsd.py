r"""Triton kernel of the generalised Jensen-Shannon divergence (``beta``) from logits.

One program per row, walking it in tiles of ``BLOCK`` classes, as the KL's kernel
(:mod:`kldiv_spec.backends._triton_logits`, whose tile loads, shifts and rescales
it reuses). With :math:`\bar s = s / T`, :math:`\bar t = t / T`:

1. the online softmax of both rows: the running maxima :math:`m_s, m_t` and sums
   :math:`Z = \sum_j e^{x_j - m}` (a tile with a larger maximum rescales the sum);
2. per class, the reference's quantities (:mod:`kldiv_spec._core_logits`):
   :math:`\log q = (\bar s - m_s) - \log Z_s`, :math:`\log p` alike,
   :math:`\log m = h + \log(1 + e^{l - h})` with :math:`h, l` the larger and the
   smaller of :math:`\log p + \log\beta` and :math:`\log q + \log(1 - \beta)`
   (no overflow or underflow: a class one side excludes has the other's finite
   log-weight), :math:`r_p = \log p - \log m` and :math:`r_q = \log q - \log m`,
   0 where their weight is 0; the row's divergence is the sum of the terms
   :math:`\beta p\,r_p + (1 - \beta) q\,r_q` and, for the gradient,
   :math:`S = \sum_j q_j h_j`, :math:`h = G (1 - \beta) r_q`;
3. with the gradient (reductions: one upstream gradient :math:`G` = ``gw`` for
   every row, 0 in masked rows), :math:`\nabla_s = c\,q \odot (h - S)`,
   :math:`c = k / T`, the reference's chain rule in its order of operations.

Edge values come out of the same arithmetic, with no second walk: a row holding
NaN or ``+inf``, or only ``-inf``, has a NaN :math:`Z` or :math:`\log Z = -\infty`,
so every log-probability, the divergence and the gradient are NaN, as in the
reference; an excluded class has weight 0 and contributes 0 (selected, never
``0 * inf``).

**Traffic** per element, float32: the loss reads both logits twice (the second
time mostly from L2 at 32k classes); with the gradient, three times, and writes the
gradient once. ``exp``/``log`` are libdevice's on CUDA and NumPy's in Triton's
interpreter (:mod:`kldiv_spec.backends._triton_kernels`). Half-precision logits are
computed in float32. Importing this module raises ImportError without Triton.
"""

# ruff: noqa: N803  (Triton spells compile-time constants in capitals)
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_kernels import _exp, _log, interpreting
from ._triton_logits import _rescale, _shift, _tile, _times_c, launch_rows

__all__ = ["from_logits", "interpreting"]


@triton.jit
def _log_probabilities(s, t, ss, st, ls, lt, log_beta, log_beta1):  # type: ignore[no-untyped-def]
    # log q, log p, and log m by the two-term log-sum-exp of the reference's log_mixture
    # (NaN propagates, as NumPy's maximum: a row without a softmax is NaN throughout).
    lq = (s - ss) - ls
    lp = (t - st) - lt
    a = lp + log_beta
    b = lq + log_beta1
    hi = tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)
    lo = tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)
    lm = hi + _log(1.0 + _exp(lo - hi))
    return lq, lp, lm


@triton.jit
def _jsd_kernel(  # type: ignore[no-untyped-def]
    s_ptr,
    t_ptr,
    kept_ptr,
    gw_ptr,
    jsd_ptr,
    grad_ptr,
    vocab,
    temperature: tl.float64,
    c: tl.float64,
    beta: tl.float64,
    beta1: tl.float64,
    log_beta: tl.float64,
    log_beta1: tl.float64,
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
    n = tl.where(kept, vocab, 0)  # a masked row walks nothing

    if WIDE:  # a 0-d 0 of the compute dtype
        zero = tl.sum(tl.zeros([BLOCK], dtype=tl.float64), axis=0)
    else:
        zero = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), axis=0)
    # beta, 1 - beta, log beta and log(1 - beta), each rounded once to the compute dtype
    # (as the reference's Python floats meet its arrays)
    b = (zero + beta).to(zero.dtype)
    b1 = (zero + beta1).to(zero.dtype)
    lb = (zero + log_beta).to(zero.dtype)
    lb1 = (zero + log_beta1).to(zero.dtype)

    # 1. the online softmax of both rows
    m_s = zero + float("-inf")
    m_t = zero + float("-inf")
    z_s = zero
    z_t = zero
    for start in range(0, n, BLOCK):
        offs = start + cols
        in_row = offs < n
        s = _tile(s_ptr + base, offs, in_row, temperature, WIDE, SCALED)
        t = _tile(t_ptr + base, offs, in_row, temperature, WIDE, SCALED)
        ms_new = tl.maximum(m_s, tl.max(s, axis=0))
        mt_new = tl.maximum(m_t, tl.max(t, axis=0))
        z_s = z_s * _rescale(m_s, ms_new) + tl.sum(_exp(s - _shift(ms_new)), axis=0)
        z_t = z_t * _rescale(m_t, mt_new) + tl.sum(_exp(t - _shift(mt_new)), axis=0)
        m_s = ms_new
        m_t = mt_new
    ss = _shift(m_s)
    st = _shift(m_t)
    ls = _log(z_s)
    lt = _log(z_t)

    # 2. the terms and, for the gradient, S = sum q h
    if WITH_GRAD:  # noqa: SIM108 (Triton: a constexpr branch)
        gw = tl.where(kept, tl.load(gw_ptr).to(zero.dtype), 0.0)
    else:
        gw = zero
    acc_e = tl.zeros([BLOCK], dtype=zero.dtype)
    acc_qh = tl.zeros([BLOCK], dtype=zero.dtype)
    for start in range(0, n, BLOCK):
        offs = start + cols
        in_row = offs < n
        s = _tile(s_ptr + base, offs, in_row, temperature, WIDE, SCALED)
        t = _tile(t_ptr + base, offs, in_row, temperature, WIDE, SCALED)
        lq, lp, lm = _log_probabilities(s, t, ss, st, ls, lt, lb, lb1)
        q = _exp(lq)
        if NEED_LOSS:
            p = _exp(lp)
            tp = tl.where(p == 0, 0.0, p * (lp - lm))
            tq = tl.where(q == 0, 0.0, q * (lq - lm))
            acc_e += b * tp + b1 * tq
        if WITH_GRAD:
            h = gw * tl.where(q == 0, 0.0, b1 * (lq - lm))
            acc_qh += q * h
    jsd = tl.sum(acc_e, axis=0)
    sum_qh = tl.sum(acc_qh, axis=0)

    # 3. the gradient c q (h - S); every class is written, masked rows with 0
    if WITH_GRAD:
        for start in range(0, vocab, BLOCK):
            offs = start + cols
            in_row = offs < vocab
            ld = offs < n
            s = _tile(s_ptr + base, offs, ld, temperature, WIDE, SCALED)
            t = _tile(t_ptr + base, offs, ld, temperature, WIDE, SCALED)
            lq, lp, lm = _log_probabilities(s, t, ss, st, ls, lt, lb, lb1)
            q = _exp(lq)
            h = gw * tl.where(q == 0, 0.0, b1 * (lq - lm))
            g = _times_c(q * (h - sum_qh), c, WIDE)
            g = tl.where(kept, g, 0.0)
            tl.store(grad_ptr + base + offs, g, mask=in_row)

    if NEED_LOSS:
        tl.store(jsd_ptr + row, tl.where(kept, jsd, 0.0).to(tl.float64))


def from_logits(
    s: torch.Tensor,
    t: torch.Tensor,
    /,
    *,
    temperature: float,
    beta: float,
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
    beta : float
        :math:`0 < \beta < 1`, the teacher's weight in the mixture.
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
        The tile and warps per program (default: the KL kernel's choices).

    Returns
    -------
    jsd : torch.Tensor or None
        ``(rows,)`` float64: each row's divergence (0 for dropped rows).
    grad : torch.Tensor or None
        ``s``'s shape: :math:`\nabla_s` for the upstream gradient ``gw``.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must lie strictly between 0 and 1, got {beta!r}")
    scalars = (float(temperature), float(c), float(beta), 1.0 - beta)
    scalars += (math.log(beta), math.log1p(-beta))
    return launch_rows(
        _jsd_kernel,
        s,
        (s, t),
        scalars,
        {},
        temperature=temperature,
        kept=kept,
        gw=gw,
        need_loss=need_loss,
        grad_dtype=grad_dtype,
        block=block,
        num_warps=num_warps,
    )
