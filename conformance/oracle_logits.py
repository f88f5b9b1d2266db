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
  working dtype is 0, whatever the other distribution says there;
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
    "composition_nan",
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
    ``-inf`` or NaN), in kept rows.
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
) -> ExactLogits:
    """Return the exact terms and gradients of ``kl_div_from_logits`` for NumPy logits.

    ``grad_output`` is the upstream gradient of the gradients (0-d for the
    reductions, broadcastable to the logits' shape for ``'none'``).
    """
    mp = _mp()
    dtype = np.result_type(input.dtype, target.dtype)
    work = _working(dtype)
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
    total = mp.mpf(0)
    zero = mp.mpf(0)
    for i in range(rows):
        if not kept[i]:
            continue
        lq, lse_s = _log_softmax_row(list(s2[i]), temp, work)
        lp, lse_t = _log_softmax_row(list(t2[i]), temp, work)
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
        grad_w = [c * (gg[j] * wg[j] - w[j] * sum_gwg) for j in range(vocab)]
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
    )


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
    with np.errstate(over="ignore"):
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
        with np.errstate(over="ignore"):
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
