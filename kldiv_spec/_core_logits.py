r"""The executable specification of the KL divergence from logits.

Like :mod:`kldiv_spec._core`, everything here uses only functions of the Python
array API standard, reached through the namespace ``xp`` the caller passes in,
holds no argument checking (see :mod:`kldiv_spec._validation`) and no backend
branches. Reductions end with the one rounding rule of
:func:`kldiv_spec._core.divide_total`.

Notation (per row, the row being the slice along ``axis``): ``s = input / T``
and ``t = target / T`` the student's and teacher's scaled logits,

.. math::

    \log q = \operatorname{log\_softmax}(s), \qquad
    \log p = \operatorname{log\_softmax}(t), \qquad
    r = \log p - \log q,

and the elementwise term of the forward divergence
:math:`\mathrm{KL}(p \,\|\, q) = \sum_i e_i` is

.. math::

    e_i = \begin{cases} 0 & p_i = 0 \\ p_i\, r_i & \text{otherwise,} \end{cases}

(the reverse divergence :math:`\mathrm{KL}(q \,\|\, p)` swaps the roles of
:math:`p` and :math:`q`), multiplied by :math:`k = T^2` (Hinton's scaling) or
:math:`k = 1`. A class with :math:`p_i = 0` (a teacher logit of ``-inf``, or
one whose probability underflows) contributes exactly 0, also where the
student's :math:`\log q_i` is ``-inf``: the mathematical convention
:math:`0 \log(0/q) = 0`, where ``kl_div``'s composite gives ``0 * inf = NaN``.

The generalised Jensen-Shannon divergence (``beta``, :math:`0 < \beta < 1`)
mixes the two distributions, :math:`m = \beta p + (1 - \beta) q`, and has the
elementwise term

.. math::

    e_i = \beta\, p_i (\log p_i - \log m_i) + (1 - \beta)\, q_i (\log q_i - \log m_i),

each product 0 where its weight is 0, so that
:math:`\sum_i e_i = \beta\,\mathrm{KL}(p \,\|\, m) + (1 - \beta)\,\mathrm{KL}(q \,\|\, m)`.
:math:`\beta = 0` and :math:`\beta = 1` are not the formula's limit (0) but,
as in trl and Liger-Kernel, the forward and the reverse KL (:func:`resolve_beta`).
"""

from __future__ import annotations

import math
from typing import Any

from ._core import divide_total, divisor

Array = Any
Namespace = Any

__all__: list[str] = []


# --------------------------------------------------------------------------- log-sum-exp


def _shift(a: Array, /, *, axis: int, xp: Namespace) -> Array:
    """Return the row maxima (keepdims), replaced by 0 where they are not finite.

    A row of ``-inf`` (every class excluded), a row holding ``+inf`` or NaN is
    therefore not shifted, and ``exp`` gives 0, ``inf`` or NaN for it: the
    log-sum-exp is then ``-inf``, ``+inf`` or NaN, as the mathematics says.
    """
    m = xp.max(a, axis=axis, keepdims=True)
    return xp.where(xp.isfinite(m), m, xp.zeros_like(m))


def logsumexp(a: Array, /, *, axis: int, xp: Namespace) -> Array:
    r"""Return :math:`\log \sum_i e^{a_i}` along ``axis`` (kept, of size 1), without overflow.

    .. math::

        \operatorname{lse}(a) = m + \log \sum_i e^{a_i - m}, \qquad m = \max_i a_i

    (:math:`m = 0` where the maximum is not finite). A row of ``-inf`` gives
    ``-inf``, a row with ``+inf`` gives ``+inf``, a row with NaN gives NaN; an
    empty axis gives ``-inf`` (the empty sum is 0).
    """
    if math.prod(a.shape) == 0:  # no maximum to shift by; log of the empty sum is -inf
        return xp.log(xp.sum(xp.exp(a), axis=axis, keepdims=True))
    m = _shift(a, axis=axis, xp=xp)
    return m + xp.log(xp.sum(xp.exp(a - m), axis=axis, keepdims=True))


def log_softmax(a: Array, /, *, axis: int, xp: Namespace) -> Array:
    r"""Return :math:`a - \operatorname{lse}(a)` along ``axis``, as ``(a - m) - log Σ e^(a - m)``.

    Subtracting the maximum first makes the largest entry exactly
    :math:`-\log \sum_i e^{a_i - m}`. An excluded class (``-inf``) gives
    ``-inf``; a row of ``-inf`` only, or one holding ``+inf`` or NaN, gives
    NaN everywhere (its softmax is undefined).
    """
    if math.prod(a.shape) == 0:  # nothing to normalise (and no maximum of an empty row)
        return a
    m = xp.max(a, axis=axis, keepdims=True)
    # Only a row of -inf is not shifted (it has nothing to shift by); a row with +inf is
    # shifted by +inf, so that every entry is -inf or NaN and the normaliser NaN: the
    # whole row is NaN, its softmax undefined.
    m = xp.where(m == -math.inf, xp.zeros_like(m), m)
    shifted = a - m
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=axis, keepdims=True))


# --------------------------------------------------------------------------- from logits


def scaled(a: Array, temperature: float, /) -> Array:
    """Return ``a / temperature`` (``a`` itself for a temperature of 1: the quotient is exact)."""
    return a if temperature == 1.0 else a / temperature


def log_probabilities(
    s: Array, t: Array, /, *, temperature: float, axis: int, xp: Namespace
) -> tuple[Array, Array]:
    r"""Return :math:`(\log q, \log p)`, the log-softmax of ``s / T`` and ``t / T``."""
    lq = log_softmax(scaled(s, temperature), axis=axis, xp=xp)
    lp = log_softmax(scaled(t, temperature), axis=axis, xp=xp)
    return lq, lp


def _weighted(w: Array, d: Array, /, *, xp: Namespace) -> Array:
    """Return ``w * d``, and 0 wherever ``w == 0`` (``d`` may be infinite or NaN there).

    ``d`` is replaced by 0 where ``w == 0`` before the product, so ``0 * inf`` is
    never evaluated: no floating-point warning even where the evaluation is lazy
    (Dask computes outside any ``errstate``), and no NaN in autograd's backward.
    """
    zero = w == 0
    return w * xp.where(zero, xp.zeros_like(d), d)


def _log_ratio(lw: Array, lo: Array, /, *, xp: Namespace) -> Array:
    r"""Return :math:`\log w - \log o`, and 0 where :math:`\log w = -\infty` (weight 0).

    Such a class contributes 0 whatever :math:`\log o` is, so ``-inf - -inf`` is
    never evaluated (no floating-point warning, even where Dask evaluates
    lazily outside any ``errstate``).
    """
    excluded = xp.isinf(lw) & (lw < 0)
    zero = xp.zeros_like(lw)
    return xp.where(excluded, zero, lw) - xp.where(excluded, zero, lo)


def terms(lq: Array, lp: Array, /, *, direction: str, xp: Namespace) -> Array:
    r"""Return the elementwise terms :math:`e_i` (without the factor :math:`k`).

    ``direction='forward'``: :math:`p_i (\log p_i - \log q_i)`;
    ``'reverse'``: :math:`q_i (\log q_i - \log p_i)`; 0 where the weight
    (:math:`p_i`, resp. :math:`q_i`) is 0.
    """
    if direction == "forward":
        return _weighted(xp.exp(lp), _log_ratio(lp, lq, xp=xp), xp=xp)
    return _weighted(xp.exp(lq), _log_ratio(lq, lp, xp=xp), xp=xp)


def resolve_beta(beta: float | None, direction: str, /) -> tuple[str, float | None]:
    r"""Return ``(direction, beta)`` as evaluated: the endpoints of ``beta`` are the two KLs.

    ``beta=None`` keeps ``direction``; :math:`\beta = 0` is the forward
    divergence :math:`\mathrm{KL}(p \,\|\, q)` and :math:`\beta = 1` the reverse
    :math:`\mathrm{KL}(q \,\|\, p)` (trl's ``generalized_jsd_loss`` and
    Liger-Kernel's ``LigerJSD`` convention, although the mixture formula tends
    to 0 there); any other :math:`\beta` is returned for the mixture.
    """
    if beta is None:
        return direction, None
    if beta == 0.0:
        return "forward", None
    if beta == 1.0:
        return "reverse", None
    return direction, beta


def log_mixture(lq: Array, lp: Array, beta: float, /, *, xp: Namespace) -> Array:
    r"""Return :math:`\log m = \log(\beta p + (1 - \beta) q)` from the log-probabilities.

    A two-term log-sum-exp of :math:`a = \log\beta + \log p` and
    :math:`b = \log(1 - \beta) + \log q`:
    :math:`\log m = h + \operatorname{log1p}(e^{l - h})` with :math:`h` the larger
    and :math:`l` the smaller, so nothing overflows or underflows (a subnormal
    :math:`m` keeps its full relative precision) and a class only one
    distribution excludes has the other's finite log-weight. :math:`h` is
    clipped below at ``-finfo.max``: a class both exclude then gives that very
    negative finite value instead of ``-inf - -inf`` = NaN (its terms and
    gradients are 0 whatever it is, having zero weights), and every derivative
    stays finite for double backward. NaN propagates.
    """
    a = lp + math.log(beta)
    b = lq + math.log1p(-beta)
    floor = -float(xp.finfo(a.dtype).max)
    hi = xp.clip(xp.maximum(a, b), min=floor)
    return hi + xp.log1p(xp.exp(xp.minimum(a, b) - hi))


def jsd_terms(lq: Array, lp: Array, beta: float, /, *, xp: Namespace) -> Array:
    r"""Return the generalised Jensen-Shannon terms :math:`e_i` (without the factor :math:`k`).

    :math:`\beta\,p_i(\log p_i - \log m_i) + (1 - \beta)\,q_i(\log q_i - \log m_i)`,
    each product 0 where its weight is 0: the terms are finite wherever the
    row has a softmax (:math:`\log p_i - \log m_i \le -\log\beta`).
    """
    lm = log_mixture(lq, lp, beta, xp=xp)
    # A log-ratio is -inf only where its weight is exactly 0 (log p = -inf; m <= 1):
    # clipped to -finfo.max there, the product is 0 (not 0 * -inf = NaN). One pass,
    # where a comparison and a select would be two.
    floor = -float(xp.finfo(lm.dtype).max)
    teacher = xp.exp(lp) * xp.clip(lp - lm, min=floor)
    student = xp.exp(lq) * xp.clip(lq - lm, min=floor)
    return beta * teacher + (1.0 - beta) * student


def _masked(a: Array, mask: Array | None, /, *, xp: Namespace) -> Array:
    """Return ``a`` with the masked-out rows (``mask`` False, kept axis) set to 0."""
    if mask is None:
        return a
    return xp.where(mask, a, xp.zeros_like(a))


def count(mask: Array, /, *, dtype: Any, xp: Namespace) -> Array:
    """Return the number of True entries of ``mask`` as a 0-d array of ``dtype``.

    Summed in ``dtype`` itself (a 64-bit integer is not available everywhere,
    e.g. JAX without x64): exact up to :math:`2^{24}` kept rows in float32.
    """
    return xp.sum(xp.astype(mask, dtype))


def masked_divisor(
    reduction: str, mask: Array, /, *, vocab: int, dtype: Any, xp: Namespace
) -> Array:
    """Return the divisor of a masked reduction as a 0-d array (0 for no unmasked row).

    ``'sum'``: 1; ``'batchmean'`` and ``'rowmean'``: the number of unmasked rows;
    ``'mean'``: that number times the number of classes.
    """
    n = count(mask, dtype=dtype, xp=xp)
    if reduction == "sum":
        return xp.ones_like(n)
    if reduction == "mean":
        return n * vocab
    return n


def divide_masked(total: Array, d: Array, /, *, xp: Namespace) -> Array:
    r"""Return :math:`\operatorname{fl}(S / D)`, and 0 where :math:`D = 0` (every row masked).

    The masked counterpart of :func:`kldiv_spec._core.divide_total`: the
    divisor is data (the number of unmasked rows), so it is an array; a batch
    whose rows are all masked has nothing to average and gives 0, not NaN.
    """
    safe = xp.where(d == 0, xp.ones_like(d), d)
    return xp.where(d == 0, xp.zeros_like(total), total / safe)


def row_divisor(reduction: str, /, *, shape: tuple[int, ...], axis: int) -> int:
    """Return the unmasked divisor: kl_div's for sum, mean, batchmean; the rows for rowmean.

    ``'batchmean'`` divides by ``input.shape[0]``, exactly as the composition
    ``kl_div(log_softmax(s), softmax(t), reduction='batchmean')``; ``'rowmean'``
    by the number of rows (the product of the axes other than ``axis``).
    """
    if reduction == "rowmean":
        return math.prod(n for i, n in enumerate(shape) if i != axis)
    return divisor(reduction, output_shape=shape, batch_size=shape[0] if shape else None)


def from_logits(
    s: Array,
    t: Array,
    /,
    *,
    temperature: float,
    factor: float,
    reduction: str,
    axis: int,
    direction: str,
    mask: Array | None,
    xp: Namespace,
    beta: float | None = None,
) -> Array:
    r"""Return the divergence from logits, reduced; ``mask``: ``s``'s shape, ``axis`` of size 1.

    ``factor`` is :math:`k` (:math:`T^2` or 1); ``beta`` (not None) gives the
    generalised Jensen-Shannon terms (:func:`jsd_terms`, endpoints by
    :func:`resolve_beta`) instead of the KL's. With :math:`S` the sum of the
    terms of the unmasked rows and :math:`D` the divisor: ``'none'`` returns
    :math:`k\,e` (0 in masked rows); the reductions return
    :math:`\operatorname{fl}(\operatorname{fl}(S / D)\cdot k)`, the rounding of
    ``kl_div(...) * T**2``. Without a mask :math:`D` is
    :func:`row_divisor`'s; with one, :func:`masked_divisor`'s (and the result
    is 0 when every row is masked).
    """
    direction, beta = resolve_beta(beta, direction)
    lq, lp = log_probabilities(s, t, temperature=temperature, axis=axis, xp=xp)
    if beta is None:
        e = terms(lq, lp, direction=direction, xp=xp)
    else:
        e = jsd_terms(lq, lp, beta, xp=xp)
    e = _masked(e, mask, xp=xp)
    if reduction == "none":
        return e if factor == 1.0 else e * factor
    total = xp.sum(e)
    if mask is None:
        d = row_divisor(reduction, shape=tuple(s.shape), axis=axis)
        result = divide_total(total, d, xp=xp)
    else:
        d_arr = masked_divisor(reduction, mask, vocab=s.shape[axis], dtype=total.dtype, xp=xp)
        result = divide_masked(total, d_arr, xp=xp)
    return result if factor == 1.0 else result * factor


def row_gradient_weight(
    g: Array,
    /,
    *,
    reduction: str,
    shape: tuple[int, ...],
    axis: int,
    mask: Array | None,
    xp: Namespace,
) -> Array:
    """Return the upstream gradient of each term: ``g / D`` for the reductions, ``g`` for 'none'.

    Masked rows get 0.
    """
    if reduction != "none":
        if mask is None:
            g = divide_total(g, row_divisor(reduction, shape=shape, axis=axis), xp=xp)
        else:
            d_arr = masked_divisor(reduction, mask, vocab=shape[axis], dtype=g.dtype, xp=xp)
            g = divide_masked(g, d_arr, xp=xp)
    g = xp.broadcast_to(g, shape)
    return _masked(g, mask, xp=xp)


def from_logits_backward(
    g: Array,
    s: Array,
    t: Array,
    /,
    *,
    temperature: float,
    factor: float,
    reduction: str,
    axis: int,
    direction: str,
    mask: Array | None,
    target_grad: bool,
    xp: Namespace,
    beta: float | None = None,
) -> tuple[Array, Array | None]:
    r"""Return the gradients w.r.t. the student and (if ``target_grad``) the teacher logits.

    With :math:`G_i` the upstream gradient of term :math:`i` (``g / D`` for the
    reductions, 0 in masked rows) and :math:`c = k / T`, the forward divergence
    gives, per row,

    .. math::

        \nabla_s = c\,\bigl(q\,\textstyle\sum_j G_j p_j - G \odot p\bigr), \qquad
        \nabla_t = c\,\bigl(G \odot w - p \textstyle\sum_j G_j w_j\bigr), \quad
        w_j = p_j (r_j + 1),

    which for a constant :math:`G` along the row (every reduction) is
    :math:`c\,G\,(q - p)` and :math:`c\,G\,p \odot (r - \mathrm{KL})`, the
    forms evaluated then. The reverse divergence swaps :math:`p \leftrightarrow q`
    and :math:`s \leftrightarrow t`. Terms with weight :math:`p_j = 0` (resp.
    :math:`q_j = 0`) are 0, as in the forward, and so is the gradient w.r.t.
    that logit, also in a row whose loss is ``+inf`` (where
    :math:`w_j \sum_i G_i w_i (r_i + 1)` would be :math:`0 \cdot \infty`).
    ``beta`` (not None, not an endpoint) gives the gradients of the generalised
    Jensen-Shannon divergence (:func:`jsd_backward`).
    """
    shape = tuple(s.shape)
    direction, beta = resolve_beta(beta, direction)
    lq, lp = log_probabilities(s, t, temperature=temperature, axis=axis, xp=xp)
    gw = row_gradient_weight(g, reduction=reduction, shape=shape, axis=axis, mask=mask, xp=xp)
    c = factor / temperature
    if beta is not None:
        return jsd_backward(
            gw, lq, lp, beta, c=c, axis=axis, mask=mask, target_grad=target_grad, xp=xp
        )
    if direction == "forward":
        lw, lo = lp, lq  # the weighting distribution (p) and the other one (q)
    else:
        lw, lo = lq, lp
    w, o = xp.exp(lw), xp.exp(lo)
    r = _log_ratio(lw, lo, xp=xp)
    if reduction == "none":
        # the general chain rule, G varying along the row
        # 0 at a class of weight 0, also where the row sum is infinite (loss +inf)
        weight_grad = _weighted(w, r + 1, xp=xp)
        row_sum = xp.sum(gw * weight_grad, axis=axis, keepdims=True)
        grad_w = gw * weight_grad - _weighted(w, row_sum, xp=xp)
        grad_o = o * xp.sum(gw * w, axis=axis, keepdims=True) - gw * w
    else:
        kl = xp.sum(_weighted(w, r, xp=xp), axis=axis, keepdims=True)
        grad_w = gw * _weighted(w, r - kl, xp=xp)
        grad_o = gw * (o - w)
    grad_w, grad_o = (_masked(a, mask, xp=xp) for a in (grad_w, grad_o))
    if c != 1.0:
        grad_w, grad_o = grad_w * c, grad_o * c
    grad_s, grad_t = (grad_o, grad_w) if direction == "forward" else (grad_w, grad_o)
    return grad_s, (grad_t if target_grad else None)


def _softmax_chain(
    w: Array, h: Array, /, *, c: float, axis: int, mask: Array | None, xp: Namespace
) -> Array:
    r"""Return :math:`c\,w \odot (h - \sum_j w_j h_j)`, 0 in masked rows.

    ``h`` is the upstream gradient w.r.t. the probabilities ``w`` (a softmax
    along ``axis``); the result is the gradient w.r.t. its scaled logits, times ``c``.
    """
    out = w * (h - xp.sum(w * h, axis=axis, keepdims=True))
    out = _masked(out, mask, xp=xp)
    return out if c == 1.0 else out * c


def jsd_backward(
    gw: Array,
    lq: Array,
    lp: Array,
    beta: float,
    /,
    *,
    c: float,
    axis: int,
    mask: Array | None,
    target_grad: bool,
    xp: Namespace,
) -> tuple[Array, Array | None]:
    r"""Return the gradients of the generalised Jensen-Shannon divergence (``gw``: each term's).

    Per element :math:`e_i = \beta p_i \log p_i + (1 - \beta) q_i \log q_i - m_i \log m_i`,
    so :math:`\partial e_i / \partial q_i = (1 - \beta)(\log q_i - \log m_i)`
    and :math:`\partial e_i / \partial p_i = \beta(\log p_i - \log m_i)` (the
    :math:`+1`\ s cancel, and :math:`e_i` depends on no other class). With
    :math:`h = G \odot \partial e / \partial q` the softmax's chain rule gives

    .. math::

        \nabla_s = c\,q \odot \Bigl(h - \sum_j q_j h_j\Bigr), \qquad
        \nabla_t = c\,p \odot \Bigl(h' - \sum_j p_j h'_j\Bigr),
        \quad h' = G \odot \beta(\log p - \log m),

    :math:`c = k / T`. A class of zero weight gets a log-ratio factor of 0
    (selected: its :math:`\log q_i - \log m_i` is ``-inf``), so its gradient is
    0 and no ``0 * inf`` reaches the row sums.
    """
    lm = log_mixture(lq, lp, beta, xp=xp)
    q = xp.exp(lq)
    dq = xp.where(q == 0, xp.zeros_like(q), (1.0 - beta) * (lq - lm))
    grad_s = _softmax_chain(q, gw * dq, c=c, axis=axis, mask=mask, xp=xp)
    if not target_grad:
        return grad_s, None
    p = xp.exp(lp)
    dp = xp.where(p == 0, xp.zeros_like(p), beta * (lp - lm))
    grad_t = _softmax_chain(p, gw * dp, c=c, axis=axis, mask=mask, xp=xp)
    return grad_s, grad_t
