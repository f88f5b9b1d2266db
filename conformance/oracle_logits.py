r"""The exact oracle of the KL divergence from logits and of the Gaussian KL.

Written from the mathematics and the edge-value rules of ``docs/logits.md``,
not from ``kldiv_spec``'s code: every value is computed with ``mpmath`` at
:data:`PRECISION` bits, the quotient ``z / T`` and the log-sum-exp included,
and only the rounding to float64 at the end is inexact.

Edge rules (per row, the row being the slice along the class axis):

- a row whose logits hold NaN or ``+inf``, or are all ``-inf``, has no
  softmax: its log-probabilities are all NaN;
- otherwise a ``-inf`` logit has log-probability ``-inf`` (probability 0);
- a term whose weight (:math:`p_i` forward, :math:`q_i` reverse) is 0 in the
  working dtype is 0, whatever the other distribution says there, and so is
  the gradient w.r.t. that side's logit (the student's in reverse, the
  teacher's forward), even in a row whose loss is ``+inf``;
- masked rows contribute 0 and get zero gradients; an empty class axis gives 0.

PyTorch's composition ``T**2 * kl_div(log_softmax(s / T), softmax(t / T))``
differs from these rules in two places, which :attr:`ExactLogits.composition_nan`
and :func:`composition_nan` record: a term of weight 0 whose other
log-probability is ``-inf`` (both distributions exclude the class) or NaN is
``0 * inf`` = NaN there, and a fully masked mean (every row dropped) is
:math:`0/0` = NaN, as ``F.cross_entropy`` with every target ignored.

Error bound
-----------
With :math:`\varepsilon` the unit roundoff of the working dtype (float32 for
half precision), :math:`\bar t = t / T`, :math:`\bar s = s / T`, the
log-sum-exps :math:`\Lambda_t, \Lambda_s` of a row and

.. math::

    A_i = 1 + |\bar t_i| + |\bar s_i| + |\Lambda_t| + |\Lambda_s|
          + \sum_j p_j |\bar t_j| + \sum_j q_j |\bar s_j|,
    \qquad
    W_i = w_i (1 + |r_i|) A_i

(:math:`w` the weighting distribution, :math:`r = \log w - \log o`): a
backward-stable evaluation (each logit perturbed by a relative
:math:`O(\varepsilon)`, each log-sum-exp by :math:`O(\varepsilon A)`) has error
of order :math:`\varepsilon W_i` in term :math:`i`. The bounds are

- ``'none'``: :math:`|\hat e_i - e_i| \le k\,(C \varepsilon W_i) + 2\,\mathrm{ulp}(e_i)`;
- reductions: :math:`k\,(C \varepsilon \sum_i W_i + n \varepsilon \sum_i |e_i|) / D
  + 2\,\mathrm{ulp}(L)` over the :math:`n` unmasked terms;

with :math:`C` = :data:`LOGITS_ULPS`. The measured ratio
:math:`|\hat L - L| / (\varepsilon \sum W)` is reported in ``docs/logits.md``.

The generalised Jensen-Shannon divergence (``beta`` strictly between 0 and 1;
0 and 1 are the forward and the reverse KL) has the same bounds with its own
scale :math:`W_j` (:func:`_jsd_row`): the mixture's terms weighted by
:math:`1 + |\log p_j - \log m_j|` and :math:`1 + |\log q_j - \log m_j|`, times
:math:`A_j + |\log m_j| + |\log \beta| + |\log(1 - \beta)|`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "GAUSSIAN_ULPS",
    "LOGITS_ULPS",
    "PRECISION",
    "ExactLogits",
    "composition_gradient_nan",
    "composition_nan",
    "composition_teacher_gradient_nan",
    "from_logits",
    "gaussian",
    "reduce_logits",
]

#: Bits of every mpmath computation.
PRECISION = 160
#: The constant :math:`C` of the bound (see the module docstring).
LOGITS_ULPS = 8
#: Bound of the Gaussian KL, in ULPs of the scale of its terms.
GAUSSIAN_ULPS = 8

_MP: list[Any] = []


def _mp() -> Any:
    if not _MP:
        import mpmath

        ctx = mpmath.MPContext()
        ctx.prec = PRECISION
        _MP.append(ctx)
    return _MP[0]


def _working(dtype: np.dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.itemsize < 4 else dtype


@dataclass
class ExactLogits:
    r"""Exact terms, their error scales, and exact gradients of one call.

    ``terms``: float64 array of the logits' shape (the exact :math:`k\,e_i`,
    rounded once; 0 in masked rows). ``scale``: :math:`k W_i` (float64).
    ``grad_input`` / ``grad_target`` and their ``*_scale``: exact gradients of
    the reduction given to :func:`from_logits`, rounded once, and their scales.
    ``masked``: whether a mask was given. ``composition_nan``: bool array of
    the terms' shape, True where the term is 0 here but PyTorch's composition
    gives ``0 * inf`` = NaN (a weight of 0 against a log-probability of
    ``-inf`` or NaN), in kept rows. ``composition_grad_nan``: likewise for the
    student gradient (:func:`composition_gradient_nan`), and
    ``composition_target_grad_nan`` for the teacher's
    (:func:`composition_teacher_gradient_nan`).
    """

    terms: np.ndarray
    scale: np.ndarray
    total: Any
    n_kept: int
    dtype: np.dtype
    grad_input: np.ndarray
    grad_target: np.ndarray
    grad_input_scale: np.ndarray
    grad_target_scale: np.ndarray
    masked: bool = False
    composition_nan: np.ndarray | None = None
    composition_grad_nan: np.ndarray | None = None
    composition_target_grad_nan: np.ndarray | None = None


def _scaled(v: float, temperature: Any, work: np.dtype) -> Any:
    """Return ``v / T`` exactly, or the infinity it rounds to in the working dtype."""
    mp = _mp()
    if not math.isfinite(v):
        return mp.mpf(v)
    q = mp.mpf(v) / temperature
    with np.errstate(over="ignore"):
        rounded = float(np.asarray(float(q), np.float64).astype(work))
    return mp.mpf(rounded) if math.isinf(rounded) else q


def _log_softmax_row(z: list[float], temperature: Any, work: np.dtype) -> tuple[list[Any], Any]:
    """Return exact (log-probabilities, log-sum-exp) of one row; NaN for no softmax.

    A logit whose quotient by ``T`` overflows the working dtype is that infinity,
    as in the dtype's evaluation.
    """
    mp = _mp()
    nan = mp.mpf("nan")
    a = [_scaled(v, temperature, work) for v in z]
    if any(mp.isnan(v) or v == mp.inf for v in a) or all(v == -mp.inf for v in a):
        return [nan] * len(z), nan
    finite = [v for v in a if v != -mp.inf]
    m = max(finite)
    lse = m + mp.log(mp.fsum(mp.exp(v - m) for v in finite))
    return [v if v == -mp.inf else v - lse for v in a], lse


def from_logits(
    input: np.ndarray,
    target: np.ndarray,
    /,
    *,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    axis: int = -1,
    direction: str = "forward",
    scale_by_temperature_squared: bool = True,
    mask: np.ndarray | None = None,
    grad_output: np.ndarray | float = 1.0,
    beta: float | None = None,
    symmetric: float | None = None,
    working: Any = None,
) -> ExactLogits:
    r"""Return the exact terms and gradients of ``kl_div_from_logits`` for NumPy logits.

    ``symmetric`` (a ratio :math:`r`, not None) gives torchtune's symmetric mix
    :math:`r\,\mathrm{KL}(p \,\|\, q) + (1 - r)\,\mathrm{KL}(q \,\|\, p)`
    (:func:`_mixed`), whatever ``direction`` says.

    ``grad_output`` is the upstream gradient of the gradients (0-d for the
    reductions, broadcastable to the logits' shape for ``'none'``). ``beta``
    (not None) gives the generalised Jensen-Shannon divergence
    (:func:`_jsd_row`); ``beta=0`` is the forward KL and ``beta=1`` the reverse
    KL, whatever ``direction`` says.

    ``working`` is the dtype the checked computation runs in (default: the logits'
    dtype; half precision runs in float32). It decides which quotients by ``T``
    overflow and which probabilities round to 0 (a weight of 0, and where PyTorch's
    composition gives NaN): exact float64 logits of a float32 computation (the
    from-hidden oracle's) are judged at float32.
    """
    if symmetric is not None:
        options = {
            "temperature": temperature,
            "reduction": reduction,
            "axis": axis,
            "scale_by_temperature_squared": scale_by_temperature_squared,
            "mask": mask,
            "grad_output": grad_output,
            "working": working,
        }
        forward = from_logits(input, target, direction="forward", **options)
        reverse = from_logits(input, target, direction="reverse", **options)
        return _mixed(forward, reverse, float(symmetric))
    if beta is not None:
        beta = float(beta)
        if beta in (0.0, 1.0):
            direction, beta = ("forward" if beta == 0.0 else "reverse"), None
    mp = _mp()
    dtype = np.result_type(input.dtype, target.dtype)
    work = _working(dtype if working is None else working)
    shape = input.shape
    ax = axis % input.ndim
    s2 = np.moveaxis(input.astype(np.float64), ax, -1).reshape(-1, shape[ax])
    t2 = np.moveaxis(target.astype(np.float64), ax, -1).reshape(-1, shape[ax])
    rows, vocab = s2.shape
    row_shape = tuple(n for i, n in enumerate(shape) if i != ax)
    kept = (
        np.ones(rows, bool)
        if mask is None
        else np.broadcast_to(np.asarray(mask, bool), row_shape).reshape(-1)
    )
    temp = mp.mpf(temperature)
    k = temp * temp if scale_by_temperature_squared else mp.mpf(1)
    n_kept = int(kept.sum())
    d = _divisor(reduction, shape, ax, n_kept, mask is not None)
    g_full = np.broadcast_to(
        np.asarray(grad_output, np.float64), shape if reduction == "none" else ()
    )
    g2 = (
        np.moveaxis(np.broadcast_to(g_full, shape), ax, -1).reshape(-1, vocab)
        if reduction == "none"
        else None
    )
    terms = np.zeros((rows, vocab))
    scale = np.zeros((rows, vocab))
    gin = np.zeros((rows, vocab))
    gtg = np.zeros((rows, vocab))
    gin_s = np.zeros((rows, vocab))
    gtg_s = np.zeros((rows, vocab))
    comp_nan = np.zeros((rows, vocab), bool)
    comp_grad_nan = np.zeros((rows, vocab), bool)
    comp_target_nan = np.zeros((rows, vocab), bool)
    total = mp.mpf(0)
    zero = mp.mpf(0)
    for i in range(rows):
        lq, lse_s = _log_softmax_row(list(s2[i]), temp, work)
        lp, lse_t = _log_softmax_row(list(t2[i]), temp, work)
        kl = beta is None
        student, teacher = direction == "reverse" or not kl, direction == "forward" or not kl
        comp_grad_nan[i, :] = _composition_nan_row(lq, lp, kept[i], student, kl, work)
        comp_target_nan[i, :] = _composition_nan_row(lp, lq, kept[i], teacher, kl, work)
        if not kept[i]:
            continue
        if beta is not None:
            if reduction == "none":
                gg = [mp.mpf(float(v)) for v in g2[i]]  # type: ignore[index]
            else:
                gg = [mp.mpf(float(g_full)) / d if d != 0 else zero] * vocab
            out = _jsd_row(
                lq, lp, (lse_s, lse_t), (list(s2[i]), list(t2[i])), mp.mpf(beta), temp, k, gg, work
            )
            row_terms, row_scale, g_s, g_t, g_scale, nan_row = out
            for j in range(vocab):
                terms[i, j], scale[i, j] = float(row_terms[j]), float(row_scale[j])
                gin[i, j], gtg[i, j] = float(g_s[j]), float(g_t[j])
                gin_s[i, j] = gtg_s[i, j] = float(g_scale[j])
                comp_nan[i, j] = nan_row[j]
            total += _fsum_special(row_terms) / k
            continue
        if direction == "forward":
            lw, lo = lp, lq
        else:
            lw, lo = lq, lp
        w = [mp.exp(v) for v in lw]
        o = [mp.exp(v) for v in lo]
        # the weight is 0 where it is 0 in the working dtype (a -inf logit, or underflow)
        zero_w = [
            (not mp.isnan(v)) and np.asarray(float(v), np.float64).astype(work) == 0 for v in w
        ]
        row = []
        for j in range(vocab):
            if zero_w[j]:
                comp_nan[i, j] = bool(mp.isnan(lo[j]) or lo[j] == -mp.inf)
                row.append(zero)
            else:
                row.append(w[j] * (lw[j] - lo[j]))
        for j, e in enumerate(row):
            terms[i, j] = float(k * e)
        total += _fsum_special(row)
        # error scales
        tb = [abs(mp.mpf(v) / temp) if math.isfinite(v) else zero for v in t2[i]]
        sb = [abs(mp.mpf(v) / temp) if math.isfinite(v) else zero for v in s2[i]]
        p = w if direction == "forward" else o
        q = o if direction == "forward" else w
        fin = all(mp.isfinite(v) for v in (lse_s, lse_t))
        if fin:
            extra = (
                1
                + abs(lse_t)
                + abs(lse_s)
                + mp.fsum(pj * tj for pj, tj in zip(p, tb, strict=True))
                + mp.fsum(qj * sj for qj, sj in zip(q, sb, strict=True))
            )
            a_row = [extra + tb[j] + sb[j] for j in range(vocab)]
            r = [(lw[j] - lo[j]) if mp.isfinite(lw[j] - lo[j]) else zero for j in range(vocab)]
            wsc = [w[j] * (1 + abs(r[j])) * a_row[j] for j in range(vocab)]
            for j in range(vocab):
                scale[i, j] = float(k * wsc[j])
        # gradients: the general chain rule with G_j = g / D (reductions) or g_j ('none')
        c = k / temp
        if reduction == "none":
            gg = [mp.mpf(float(v)) for v in g2[i]]  # type: ignore[index]
        else:
            gval = mp.mpf(float(g_full)) / d if d != 0 else zero
            gg = [gval] * vocab
        wg = [zero if zero_w[j] else w[j] * (lw[j] - lo[j] + 1) for j in range(vocab)]
        sum_gwg = _fsum_special([gg[j] * wg[j] for j in range(vocab)])
        sum_gw = mp.fsum(gg[j] * w[j] for j in range(vocab))
        # a class the weighting side excludes gets exactly 0, also where the row's
        # loss is +inf (sum_gwg infinite: there w_j * sum_gwg would be 0 * inf)
        grad_w = [
            zero if zero_w[j] else c * (gg[j] * wg[j] - w[j] * sum_gwg) for j in range(vocab)
        ]
        grad_o = [c * (o[j] * sum_gw - gg[j] * w[j]) for j in range(vocab)]
        gs, gt = (grad_o, grad_w) if direction == "forward" else (grad_w, grad_o)
        for j in range(vocab):
            gin[i, j], gtg[i, j] = float(gs[j]), float(gt[j])
        if fin:
            gmax = max((abs(v) for v in gg), default=zero)
            kl = abs(_fsum_special(row)) if mp.isfinite(_fsum_special(row)) else zero
            sum_w = mp.fsum(
                abs(gg[j]) * (w[j] + o[j]) * (1 + abs(r[j])) * a_row[j] for j in range(vocab)
            )
            for j in range(vocab):
                common = (w[j] + o[j]) * ((1 + abs(r[j]) + kl) * a_row[j] * gmax + sum_w)
                gin_s[i, j] = gtg_s[i, j] = float(abs(c) * common)
    back = _unflatten(shape, ax)
    return ExactLogits(
        terms=back(terms),
        scale=back(scale),
        total=(k * total, d),
        n_kept=n_kept,
        dtype=np.dtype(dtype),
        grad_input=back(gin),
        grad_target=back(gtg),
        grad_input_scale=back(gin_s),
        grad_target_scale=back(gtg_s),
        masked=mask is not None,
        composition_nan=back(comp_nan),
        composition_grad_nan=back(comp_grad_nan),
        composition_target_grad_nan=back(comp_target_nan),
    )


def _mixed(forward: ExactLogits, reverse: ExactLogits, ratio: float, /) -> ExactLogits:
    r"""Return :math:`r\,F + (1 - r)\,R` of two exact results: each field is linear.

    The terms and gradients are combined in float64 (one more rounding, within
    the ``2 ulp`` of the bounds), the error scales and totals exactly; a ratio
    of 0 or 1 is that direction alone.
    """
    if ratio in (0.0, 1.0):
        return forward if ratio == 1.0 else reverse
    mp = _mp()
    r, q = ratio, 1.0 - ratio

    def mix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", over="ignore"):
            return r * a + q * b

    (kf, d), (kr, _) = forward.total, reverse.total
    nan = [x for x in (forward.composition_nan, reverse.composition_nan) if x is not None]
    return ExactLogits(
        terms=mix(forward.terms, reverse.terms),
        scale=mix(forward.scale, reverse.scale),
        total=(mp.mpf(r) * kf + mp.mpf(q) * kr, d),
        n_kept=forward.n_kept,
        dtype=forward.dtype,
        grad_input=mix(forward.grad_input, reverse.grad_input),
        grad_target=mix(forward.grad_target, reverse.grad_target),
        grad_input_scale=mix(forward.grad_input_scale, reverse.grad_input_scale),
        grad_target_scale=mix(forward.grad_target_scale, reverse.grad_target_scale),
        masked=forward.masked,
        composition_nan=np.logical_or(*nan) if len(nan) == 2 else None,
        composition_grad_nan=np.logical_or(
            _or_false(forward.composition_grad_nan, forward.terms),
            _or_false(reverse.composition_grad_nan, reverse.terms),
        ),
        composition_target_grad_nan=np.logical_or(
            _or_false(forward.composition_target_grad_nan, forward.terms),
            _or_false(reverse.composition_target_grad_nan, reverse.terms),
        ),
    )


def _rounds_to_zero(v: Any, work: np.dtype) -> bool:
    """Whether the probability ``v`` (not NaN) is 0 in the working dtype."""
    mp = _mp()
    return (not mp.isnan(v)) and np.asarray(float(v), np.float64).astype(work) == 0


def _composition_nan_row(
    own: list[Any], other: list[Any], kept: bool, weights: bool, kl: bool, work: np.dtype
) -> bool:
    r"""Whether the composition's gradient w.r.t. one side is NaN across a row, the spec's not.

    ``own`` and ``other`` are that side's log-probabilities and the other side's;
    ``weights`` says whether that side's distribution weights terms (the student in
    reverse, the teacher forward, both in the generalised JSD), ``kl`` whether the
    call is a KL (not the mixture).

    - Where the side weights terms, a class it excludes: ``kl_div``'s derivative
      w.r.t. :math:`w_j = 0` is ``-inf`` (:math:`\log 0`; with ``log_target=True``,
      :math:`e^{\log w_j}(\log w_j - \log m_j)` gives :math:`0 \cdot \infty`), and the
      softmax's backward sums :math:`w_j` times it: NaN, in kept and dropped rows (a
      mask's zero upstream gradient times ``-inf`` is NaN too).
    - A dropped row without a softmax (NaN, ``+inf``, a side of ``-inf`` only): the
      mask's zero upstream gradient meets the row's NaN in the log-softmax's
      backward; for a KL also a dropped row where the other side excludes a class
      (the zero upstream gradient times :math:`-\log o_j = \infty`). The
      specification gives the dropped row zero gradients.
    """
    mp = _mp()
    if any(mp.isnan(v) for v in own + other):
        return not kept
    if not weights:
        return False
    if any(_rounds_to_zero(mp.exp(v), work) for v in own):
        return True
    return kl and not kept and any(_rounds_to_zero(mp.exp(v), work) for v in other)


def _jsd_row(
    lq: list[Any],
    lp: list[Any],
    lses: tuple[Any, Any],
    logits: tuple[list[float], list[float]],
    beta: Any,
    temp: Any,
    k: Any,
    gg: list[Any],
    work: np.dtype,
) -> tuple[list[Any], list[Any], list[Any], list[Any], list[Any], list[bool]]:
    r"""Return one row of the generalised Jensen-Shannon divergence, exactly, with its bounds.

    With :math:`m = \beta p + (1 - \beta) q` (in mpmath), the terms
    :math:`k\,e_j`, :math:`e_j = \beta p_j (\log p_j - \log m_j) + (1 - \beta) q_j
    (\log q_j - \log m_j)`, each product 0 where its weight is 0 in the working
    dtype; the gradients :math:`c\,q \odot (h - \sum q h)`,
    :math:`h = G (1 - \beta)(\log q - \log m)` (the student's) and
    :math:`c\,p \odot (h' - \sum p h')`, :math:`h' = G \beta (\log p - \log m)`,
    :math:`c = k / T`. The error scale of term :math:`j` is

    .. math::

        W_j = \bigl(\beta p_j (1 + |\log p_j - \log m_j|)
              + (1 - \beta) q_j (1 + |\log q_j - \log m_j|)\bigr)
              \bigl(A_j + |\log m_j| + |\log\beta| + |\log(1 - \beta)|\bigr),

    :math:`A_j` the KL's (module docstring): the probabilities carry relative
    errors of order :math:`\varepsilon A_j`, the log-ratios absolute ones, and
    the mixture's log-sum-exp adds those of :math:`\log m_j` and of the two
    logarithms of the weights. Also returns where a torch composition
    ``beta * kl_div(log m, p) + (1 - beta) * kl_div(log m, q)`` gives ``0 * inf``
    = NaN: a class both distributions exclude.
    """
    mp = _mp()
    zero = mp.mpf(0)
    vocab = len(lq)
    p = [mp.exp(v) for v in lp]
    q = [mp.exp(v) for v in lq]

    def rounds_to_zero(v: Any) -> bool:
        return (not mp.isnan(v)) and np.asarray(float(v), np.float64).astype(work) == 0

    zero_p = [rounds_to_zero(v) for v in p]
    zero_q = [rounds_to_zero(v) for v in q]
    lm = []
    for j in range(vocab):
        if mp.isnan(p[j]) or mp.isnan(q[j]):
            lm.append(mp.mpf("nan"))
        else:
            mix = beta * p[j] + (1 - beta) * q[j]
            lm.append(mp.log(mix) if mix > 0 else -mp.inf)
    rp = [zero if zero_p[j] else lp[j] - lm[j] for j in range(vocab)]
    rq = [zero if zero_q[j] else lq[j] - lm[j] for j in range(vocab)]
    e = [
        beta * (zero if zero_p[j] else p[j] * rp[j])
        + (1 - beta) * (zero if zero_q[j] else q[j] * rq[j])
        for j in range(vocab)
    ]
    terms = [k * v for v in e]
    nan_row = [zero_p[j] and zero_q[j] for j in range(vocab)]
    c = k / temp
    hq = [gg[j] * (1 - beta) * rq[j] for j in range(vocab)]
    hp = [gg[j] * beta * rp[j] for j in range(vocab)]
    sum_q = _fsum_special([q[j] * hq[j] for j in range(vocab)])
    sum_p = _fsum_special([p[j] * hp[j] for j in range(vocab)])
    g_s = [c * q[j] * (hq[j] - sum_q) for j in range(vocab)]
    g_t = [c * p[j] * (hp[j] - sum_p) for j in range(vocab)]
    scale = [zero] * vocab
    g_scale = [zero] * vocab
    lse_s, lse_t = lses
    if not all(mp.isfinite(v) for v in (lse_s, lse_t)):
        return terms, scale, g_s, g_t, g_scale, nan_row
    tb = [abs(mp.mpf(v) / temp) if math.isfinite(v) else zero for v in logits[1]]
    sb = [abs(mp.mpf(v) / temp) if math.isfinite(v) else zero for v in logits[0]]
    extra = (
        1
        + abs(lse_t)
        + abs(lse_s)
        + mp.fsum(pj * tj for pj, tj in zip(p, tb, strict=True))
        + mp.fsum(qj * sj for qj, sj in zip(q, sb, strict=True))
        + abs(mp.log(beta))
        + abs(mp.log(1 - beta))
    )
    a_row = [
        extra + tb[j] + sb[j] + (abs(lm[j]) if mp.isfinite(lm[j]) else zero) for j in range(vocab)
    ]
    ratio = [1 + abs(rp[j]) + abs(rq[j]) for j in range(vocab)]
    scale = [
        k * (beta * p[j] * (1 + abs(rp[j])) + (1 - beta) * q[j] * (1 + abs(rq[j]))) * a_row[j]
        for j in range(vocab)
    ]
    gmax = max((abs(v) for v in gg), default=zero)
    value = abs(mp.fsum(e))
    sum_w = mp.fsum(abs(gg[j]) * (p[j] + q[j]) * ratio[j] * a_row[j] for j in range(vocab))
    g_scale = [
        abs(c) * (p[j] + q[j]) * ((ratio[j] + value) * a_row[j] * gmax + sum_w)
        for j in range(vocab)
    ]
    return terms, scale, g_s, g_t, g_scale, nan_row


def _fsum_special(values: list[Any]) -> Any:
    mp = _mp()
    if any(mp.isnan(v) for v in values):
        return mp.mpf("nan")
    infs = {v for v in values if mp.isinf(v)}
    if infs:
        return mp.mpf("nan") if len(infs) > 1 else next(iter(infs))
    return mp.fsum(values)


def _unflatten(shape: tuple[int, ...], ax: int) -> Any:
    moved = (*(n for i, n in enumerate(shape) if i != ax), shape[ax])

    def back(a: np.ndarray) -> np.ndarray:
        return np.moveaxis(a.reshape(moved), -1, ax)

    return back


def _divisor(reduction: str, shape: tuple[int, ...], ax: int, n_kept: int, masked: bool) -> int:
    vocab = shape[ax]
    if reduction in ("none", "sum"):
        return 1
    if masked:
        return n_kept * vocab if reduction == "mean" else n_kept
    if reduction == "mean":
        return math.prod(shape)
    if reduction == "batchmean":
        return shape[0]
    return math.prod(n for i, n in enumerate(shape) if i != ax)  # rowmean


def composition_nan(exact: ExactLogits, /, reduction: str) -> np.ndarray:
    """Return where PyTorch's composition gives NaN and this oracle a number.

    For ``'none'`` a bool array of the terms' shape (:attr:`ExactLogits.composition_nan`);
    for a reduction a 0-d bool: True when a kept term is such a ``0 * inf``, or
    when every row is masked and the reduction divides by the kept rows
    (``'batchmean'``, ``'rowmean'``, ``'mean'``: :math:`0/0`).
    """
    terms = (
        np.zeros(exact.terms.shape, bool)
        if exact.composition_nan is None
        else np.asarray(exact.composition_nan, bool)
    )
    if reduction == "none":
        return terms
    fully_masked = exact.masked and exact.total[1] == 0
    return np.asarray(bool(terms.any()) or fully_masked)


def composition_gradient_nan(exact: ExactLogits, /) -> np.ndarray:
    r"""Where PyTorch's composition's student gradient is NaN and the specification's is not.

    A bool array of the logits' shape, True across the rows where the composition's
    gradient is NaN (:func:`_composition_nan_row`: in reverse or the
    generalised JSD, a class the student excludes; a dropped row without a
    softmax) and the specification's value is not: 0 at the excluded classes and
    the chain rule's value at the others, zero gradients in dropped rows.
    """
    nan = _or_false(exact.composition_grad_nan, exact.terms)
    return nan & ~np.isnan(np.asarray(exact.grad_input, np.float64))


def composition_teacher_gradient_nan(exact: ExactLogits, /) -> np.ndarray:
    """Where PyTorch's composition's teacher gradient is NaN and the specification's is not.

    :func:`composition_gradient_nan` for the teacher's logits
    (:func:`_composition_nan_row`, the sides swapped).
    """
    nan = _or_false(exact.composition_target_grad_nan, exact.terms)
    return nan & ~np.isnan(np.asarray(exact.grad_target, np.float64))


def _or_false(flags: np.ndarray | None, like: np.ndarray, /) -> np.ndarray:
    return np.zeros(np.shape(like), bool) if flags is None else np.asarray(flags, bool)


def reduce_logits(exact: ExactLogits, /) -> tuple[float, float]:
    """Return ``(value, tolerance)`` of the reduced loss (the reduction of :func:`from_logits`).

    A divisor of 0 gives NaN without a mask (an empty batch, as ``kl_div``)
    and 0 with one (every row masked).
    """
    mp = _mp()
    ktotal, d = exact.total
    work = _working(exact.dtype)
    eps = float(np.finfo(work).eps) / 2
    if mp.isnan(ktotal) or mp.isinf(ktotal):
        return float(ktotal), 0.0
    if d == 0:
        return (0.0 if exact.masked else math.nan), 0.0
    value = float(ktotal / d)
    n = max(1, int(np.count_nonzero(exact.terms)) or 1)
    tol = (
        LOGITS_ULPS * eps * float(np.sum(exact.scale))
        + n * eps * float(np.sum(np.abs(exact.terms)))
    ) / d
    tol += 2 * float(np.spacing(np.abs(np.asarray(value, dtype=np.dtype(exact.dtype)))))
    return value, tol


def pointwise_tolerance(exact: ExactLogits, /) -> np.ndarray:
    """Return the elementwise bound for ``'none'``."""
    eps = float(np.finfo(_working(exact.dtype)).eps) / 2
    with np.errstate(over="ignore", invalid="ignore"):  # the spacing of inf: NaN
        ulp = np.spacing(np.abs(exact.terms).astype(exact.dtype)).astype(np.float64)
    return (
        LOGITS_ULPS * eps * exact.scale + 2 * ulp + float(np.finfo(exact.dtype).smallest_subnormal)
    )


def gradient_tolerance(exact: ExactLogits, /) -> tuple[np.ndarray, np.ndarray]:
    """Return the elementwise bounds of the student and teacher gradients."""
    eps = float(np.finfo(_working(exact.dtype)).eps) / 2
    floor = float(np.finfo(exact.dtype).smallest_normal)
    out = []
    for grad, scale in (
        (exact.grad_input, exact.grad_input_scale),
        (exact.grad_target, exact.grad_target_scale),
    ):
        with np.errstate(over="ignore", invalid="ignore"):
            ulp = np.spacing(np.abs(grad).astype(exact.dtype)).astype(np.float64)
        out.append(LOGITS_ULPS * eps * scale + 2 * ulp + floor)
    return out[0], out[1]


# --------------------------------------------------------------------------- Gaussian


def gaussian(
    mu: np.ndarray,
    logvar: np.ndarray,
    mu_prior: np.ndarray | float = 0.0,
    logvar_prior: np.ndarray | float = 0.0,
    /,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Return the exact elementwise Gaussian KL (float64) and its error scale.

    :math:`\tfrac12 (e^{d} - 1 - d + (\mu - \mu_0)^2 e^{-\lambda_0})`,
    :math:`d = \lambda - \lambda_0`, at :data:`PRECISION` bits; the scale is
    :math:`\tfrac12 (|e^d - 1| + |d| + (\mu - \mu_0)^2 e^{-\lambda_0})
    + |\mu - \mu_0|\,(|\mu| + |\mu_0|) e^{-\lambda_0}` (the terms and the
    rounding of :math:`\mu - \mu_0` squared).
    """
    mp = _mp()
    arrays = np.broadcast_arrays(
        *(np.asarray(a, np.float64) for a in (mu, logvar, mu_prior, logvar_prior))
    )
    value = np.empty(arrays[0].shape)
    scale = np.empty(arrays[0].shape)
    for idx in np.ndindex(value.shape):
        m, lv, m0, lv0 = (a[idx] for a in arrays)
        if not all(math.isfinite(v) for v in (m, lv, m0, lv0)):
            with np.errstate(all="ignore"):
                d = lv - lv0
                diff = m - m0
                value[idx] = 0.5 * ((np.expm1(d) - d) + diff * diff / np.exp(lv0))
            scale[idx] = 0.0
            continue
        d = mp.mpf(lv) - mp.mpf(lv0)
        diff = mp.mpf(m) - mp.mpf(m0)
        inv = mp.exp(-mp.mpf(lv0))
        em1 = mp.expm1(d)
        value[idx] = float((em1 - d + diff * diff * inv) / 2)
        scale[idx] = float(
            (abs(em1) + abs(d) + diff * diff * inv) / 2
            + abs(diff) * (abs(mp.mpf(m)) + abs(mp.mpf(m0))) * inv
            + abs(em1) * (abs(mp.mpf(lv)) + abs(mp.mpf(lv0)))
        )
    return value, scale
