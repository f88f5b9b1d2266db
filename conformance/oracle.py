r"""The exact oracle: PyTorch's ``kl_div`` evaluated exactly, element by element.

Written from the mathematics and PyTorch's documented edge-value table, not from
``kldiv_spec``'s code. Finite values are computed in extended precision
(``numpy.longdouble`` where it has 64 or more significand bits, else ``mpmath``
at 128 bits), at least 11 bits beyond ``float64``, so the oracle's own error is
a small fraction of every bound below; non-finite cases follow
PyTorch's IEEE evaluation of its composite ``xlogy(t, t) - t * x`` (or
``exp(t) * (t - x)`` with ``log_target``).

Error bounds
------------
Let :math:`\varepsilon` be the machine epsilon of the result dtype and, for one
element, the *scale*

.. math::

    s = |t \log t| + |t\,x| \quad\text{or, with log\_target,}\quad
    s = e^{t}\,(|t| + |x|),

the magnitude of the terms that cancel in :math:`\ell = t \log t - t x`. A
correctly rounded composite evaluation has error below about
:math:`2\varepsilon s`, which cannot be stated in ULPs of :math:`\ell` itself
(at :math:`x = \log t` the terms cancel exactly). The bounds are:

- ``'none'``: :math:`|\hat\ell - \ell| \le` :data:`POINTWISE_ULPS` ULPs of
  :math:`s` (``numpy.spacing(s)``), plus :data:`POINTWISE_ULPS` ULPs of the
  smallest subnormal. Measured: the reference and PyTorch stay within 2.
- ``'sum'``, ``'mean'``, ``'batchmean'``: :math:`|\hat L - L| \le
  (\text{POINTWISE\_ULPS} + n)\,\varepsilon \sum_i s_i / D` for :math:`n`
  elements and divisor :math:`D`: the pointwise error plus the worst case of
  recursive summation (pairwise summation does much better). A float16
  accumulator (:math:`\varepsilon = 2^{-10}`) or an ``eps`` clamp of the target
  breaks it at once.
- Gradients: :data:`GRADIENT_ULPS` ULPs of the scale of the gradient's terms,
  with the same summation allowance where an argument was broadcast.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "GRADIENT_ULPS",
    "POINTWISE_ULPS",
    "Exact",
    "divisor",
    "exact_sum",
    "gradients",
    "pointwise",
    "reduce",
]

#: Bound for ``reduction='none'``, in ULPs of the element's scale (see the module docstring).
POINTWISE_ULPS = 4
#: Bound for the gradients, in ULPs of the scale of their terms.
GRADIENT_ULPS = 8

_MP: list[Any] = []


def _ctx() -> Any:
    """Return a 128-bit mpmath context (imported only where long double is not enough)."""
    if not _MP:
        import mpmath

        ctx = mpmath.MPContext()
        ctx.prec = 128
        _MP.append(ctx)
    return _MP[0]


#: Whether numpy.longdouble has at least 63 mantissa bits (x87 extended or quad).
_EXTENDED = np.finfo(np.longdouble).nmant >= 63


class Exact:
    """Exact elementwise values with the scale that bounds their rounding error.

    ``value`` is a ``numpy.longdouble`` array (NaN/inf where PyTorch gives them);
    ``scale`` a float64 array; ``dtype`` the result dtype; ``spread`` the factor
    by which an absolute error of one smallest subnormal in an intermediate
    (``exp(t)`` in the subnormal range) can be magnified.
    """

    def __init__(
        self, value: np.ndarray, scale: np.ndarray, dtype: np.dtype, spread: np.ndarray
    ) -> None:
        self.value = value
        self.scale = scale
        self.spread = spread
        #: The absolute error floor: the smallest subnormal, or the smallest normal
        #: number on backends that flush subnormals to zero.
        self.floor = float(np.finfo(dtype).smallest_subnormal)
        self.dtype = np.dtype(dtype)

    def as_float(self) -> np.ndarray:
        """Return the values rounded to float64."""
        with np.errstate(over="ignore"):
            return self.value.astype(np.float64)


def _mpf(v: float) -> Any:
    return _ctx().mpf(float(v))


def _pointwise_one(
    x: float, t: float, log_target: bool, dtype: np.dtype
) -> tuple[Any, float, float]:
    """Return (exact value or special float, scale, spread) for one element."""
    nan, inf = math.nan, math.inf
    if math.isnan(x) or math.isnan(t):
        return nan, 0.0, 1.0
    if log_target:
        if t == -inf:
            return nan, 0.0, 1.0  # exp(-inf) * (-inf - x) = 0 * -inf
        with np.errstate(all="ignore"):
            e = float(np.exp(np.asarray(t, dtype=dtype)))  # as evaluated in the dtype
            d = float(np.asarray(t, dtype=dtype) - np.asarray(x, dtype=dtype))
        if e == 0.0 or math.isinf(e) or math.isinf(d):
            with np.errstate(all="ignore"):
                return float(np.float64(e) * np.float64(d)), 0.0, 1.0
        e = _ctx().exp(_mpf(t))
        return e * (_mpf(t) - _mpf(x)), float(e * (abs(_mpf(t)) + abs(_mpf(x)))), abs(t) + abs(x)
    if t < 0:
        return nan, 0.0, 1.0
    if t == 0:
        return (0.0 if math.isfinite(x) else nan), 0.0, 1.0
    if t == inf:
        return (inf if x < 0 else nan), 0.0, 1.0
    mt, mx = _mpf(t), _mpf(x)
    tlogt = mt * _ctx().log(mt)
    a = _in_dtype(float(tlogt), dtype)
    b = _in_dtype(float(mt * mx) if math.isfinite(x) else x, dtype)
    if math.isinf(a) or math.isinf(b):
        return a - b, 0.0, 1.0  # a term overflows: IEEE arithmetic on the rounded terms
    return tlogt - mt * mx, float(abs(tlogt) + abs(mt * mx)), 1.0


def _in_dtype(v: float, dtype: np.dtype) -> float:
    """Return ``v`` rounded to ``dtype`` (infinite where it overflows), as a float."""
    with np.errstate(over="ignore"):
        return float(np.asarray(v, dtype=np.float64).astype(dtype))


def _extended_regular(
    xb: np.ndarray, tb: np.ndarray, log_target: bool, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (mask of regular elements, values, scales, spreads) in extended precision."""
    with np.errstate(all="ignore"):
        finite = np.isfinite(xb) & np.isfinite(tb)
        xl, tl = xb.astype(np.longdouble), tb.astype(np.longdouble)
        if log_target:
            tw = tb.astype(dtype)
            e_w = np.exp(tw)  # exp(t) as evaluated in the working dtype
            d_w = tw - xb.astype(dtype)
            mask = finite & (e_w != 0) & np.isfinite(e_w) & np.isfinite(d_w)
            e = np.exp(tl)
            value = e * (tl - xl)
            scale = e * (np.abs(tl) + np.abs(xl))
            spread = np.abs(tb) + np.abs(xb)
        else:
            tlogt = tl * np.log(tl)
            # a term that overflows in the dtype is left to IEEE arithmetic (_pointwise_one)
            a, b = tlogt.astype(dtype), (tl * xl).astype(dtype)
            mask = finite & (tb > 0) & np.isfinite(a) & np.isfinite(b)
            value = tlogt - tl * xl
            scale = np.abs(tlogt) + np.abs(tl * xl)
            spread = np.ones(xb.shape)
        return mask, value, scale.astype(np.float64), spread.astype(np.float64)


def pointwise(x: np.ndarray, t: np.ndarray, /, *, log_target: bool) -> Exact:
    r"""Return PyTorch's pointwise loss for NumPy arrays ``x`` and ``t``, exactly.

    Regular elements are computed in ``numpy.longdouble`` where it is the x87
    80-bit (or a wider) format, 11 or more bits beyond ``float64``; else, and
    for every special element, element by element with ``mpmath``. As in
    PyTorch's evaluation in the result dtype, a term (:math:`t \log t` or
    :math:`t x`) that overflows that dtype makes the result IEEE arithmetic on
    the rounded terms (``inf - inf`` is NaN), and an exact value beyond the
    dtype's range is the infinity it rounds to.
    """
    dtype = np.result_type(x.dtype, t.dtype)
    xb, tb = np.broadcast_arrays(x.astype(np.float64), t.astype(np.float64))
    value = np.zeros(xb.shape, dtype=np.longdouble)
    scale = np.zeros(xb.shape, dtype=np.float64)
    spread = np.ones(xb.shape, dtype=np.float64)
    if _EXTENDED:
        mask, v, sc, sp = _extended_regular(xb, tb, log_target, dtype)
        value[mask], scale[mask], spread[mask] = v[mask], sc[mask], sp[mask]
        rest = (tuple(int(i) for i in row) for row in np.argwhere(~mask))
    else:  # pragma: no cover - platforms whose long double is float64
        rest = np.ndindex(xb.shape)
    for idx in rest:
        v1, scale[idx], spread[idx] = _pointwise_one(
            float(xb[idx]), float(tb[idx]), log_target, dtype
        )
        value[idx] = float(v1)
    _overflow_to_inf(value, scale, dtype)
    return Exact(value, scale, dtype, spread)


def _overflow_to_inf(value: np.ndarray, scale: np.ndarray | None, dtype: np.dtype) -> None:
    """Replace, in place, finite values that round to an infinity in ``dtype`` by it."""
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = value.astype(dtype)
    over = np.isinf(rounded) & np.isfinite(value)
    if over.any():
        value[over] = rounded[over]
        if scale is not None:
            scale[over] = 0.0


def divisor(reduction: str, /, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int:
    """Return PyTorch's divisor: numel for ``mean``, ``input.shape[0]`` for ``batchmean``."""
    if reduction == "mean":
        return math.prod(output_shape)
    if reduction == "batchmean" and len(input_shape) > 0:
        return input_shape[0]
    return 1


def reduce(exact: Exact, /, reduction: str, input_shape: tuple[int, ...]) -> tuple[float, float]:
    """Return ``(value, tolerance)`` of a reduced loss, the value rounded to float64.

    NaN and infinities propagate as in IEEE summation; an empty sum is 0, so an
    empty ``mean`` (and ``batchmean`` of a zero-length batch) is NaN.
    """
    if reduction == "none":
        msg = "reduce() is for 'sum', 'mean' and 'batchmean'"
        raise ValueError(msg)
    values = exact.value.ravel()
    d = divisor(reduction, input_shape, exact.value.shape)
    n = values.size
    eps = float(np.finfo(exact.dtype).eps)
    with np.errstate(all="ignore"):
        total = np.sum(values, dtype=np.longdouble)
    if np.isnan(total) or np.isinf(total):
        return float(total) / (d or math.nan), 0.0
    if d == 0:
        return math.nan, 0.0
    tol = (POINTWISE_ULPS + n) * eps * float(np.sum(exact.scale)) / d
    tol += POINTWISE_ULPS * exact.floor * float(np.sum(exact.spread)) / d
    return float(total / d), tol


def exact_sum(exact: Exact, /) -> Any:
    r"""Return :math:`\sum_i \ell_i` of the exact pointwise values as a 128-bit mpmath number.

    Each ``numpy.longdouble`` value is split exactly into two float64 parts
    (:math:`v = h + l`, :math:`h` = ``float(v)``); ``math.fsum`` of all parts is
    the correctly rounded sum :math:`s`, and ``math.fsum`` of the parts and
    :math:`-s` its residual, so :math:`s + r` carries about 106 correct bits:
    no rounding error of the summation order, unlike :func:`reduce`'s
    ``numpy.sum``. NaN and infinities propagate as in IEEE summation.
    """
    values = exact.value.ravel()
    with np.errstate(all="ignore"):
        high = values.astype(np.float64)
        low = np.where(np.isfinite(high), values - high, 0.0).astype(np.float64)
    if not np.isfinite(high).all():
        with np.errstate(invalid="ignore"):
            return _ctx().mpf(float(np.sum(high)))  # NaN or an infinity, as in IEEE
    parts = np.concatenate([high, low])
    total = math.fsum(parts)
    residual = math.fsum(np.append(parts, -total))
    return _ctx().mpf(total) + _ctx().mpf(residual)


def pointwise_tolerance(exact: Exact, /) -> np.ndarray:
    """Return the elementwise bound for ``'none'``: POINTWISE_ULPS ULPs of the scale."""
    with np.errstate(over="ignore"):
        scale = exact.scale.astype(exact.dtype) if exact.dtype != np.float64 else exact.scale
        ulp = np.spacing(np.abs(scale)).astype(np.float64)
    return POINTWISE_ULPS * (ulp + exact.floor * exact.spread)


def _sum_to_shape(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    extra = a.ndim - len(shape)
    if extra > 0:
        a = a.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, (n, m) in enumerate(zip(shape, a.shape, strict=True)) if n == 1 != m)
    return a.sum(axis=axes, keepdims=True) if axes else a


def gradients(
    g: np.ndarray | float,
    x: np.ndarray,
    t: np.ndarray,
    /,
    *,
    reduction: str,
    log_target: bool,
    flush: bool = False,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    r"""Return ``((grad_x, tol_x), (grad_t, tol_t))``: PyTorch's gradients and their bounds.

    With :math:`D` the reduction's divisor, :math:`\partial L/\partial x = -g t / D`
    and :math:`\partial L/\partial t = g(\log t + 1 - x)/D`, NaN where ``t`` is
    not a positive finite number (PyTorch differentiates ``xlogy(t, t)``); with
    ``log_target``: :math:`-g e^t / D` and :math:`g e^t (t - x + 1) / D`. Each
    is summed back to its argument's shape. Values are computed in float64
    (with extended precision for the logarithm terms) and the bounds are
    :data:`GRADIENT_ULPS` ULPs of the summed term magnitudes in the result dtype
    (with an absolute floor of the smallest normal number when ``flush``; the
    upstream gradient's subnormal numbers are then zeros, as a backend that
    flushes them reads it). Where PyTorch's evaluation in the dtype overflows
    (with ``log_target``, its product rule :math:`g (t - x) e^t + g e^t`, NaN
    where ``e^t`` is infinite and ``t = x``) its non-finite value is the
    gradient, and a finite gradient beyond the dtype's range is an infinity.
    """
    dtype = np.result_type(x.dtype, t.dtype)
    out_shape = np.broadcast_shapes(x.shape, t.shape)
    d = divisor(reduction, x.shape, out_shape)
    xb, tb = (np.broadcast_to(a, out_shape).astype(np.float64) for a in (x, t))
    # d == 0 only for an empty batch, where there is nothing to divide
    g = np.asarray(g, dtype=np.float64)
    if flush:  # the backend reads a subnormal upstream gradient as a zero of its sign
        tiny = float(np.finfo(dtype).smallest_normal)
        g = np.where(np.abs(g) < tiny, np.copysign(0.0, g), g)
    gb = np.broadcast_to(g, out_shape) / (d or 1)
    with np.errstate(all="ignore"):
        if log_target:
            e = np.exp(tb.astype(dtype)).astype(np.float64)
            gx = -(gb * e)
            gt = gb * e * (tb - xb + 1)
            sx = np.abs(gx)
            st = np.abs(gb) * e * (np.abs(tb) + np.abs(xb) + 1)
            # Where PyTorch's own evaluation order in the dtype overflows (the product
            # rule: g (t - x) e^t + g e^t), its non-finite result is the gradient.
            gd, td, xd = (a.astype(dtype) for a in (gb, tb, xb))
            ed = np.exp(td)
            ieee_x = -(gd * ed)
            ieee_t = (gd * (td - xd)) * ed + gd * ed
            gx = np.where(np.isfinite(ieee_x), gx, ieee_x.astype(np.float64))
            gt = np.where(np.isfinite(ieee_t), gt, ieee_t.astype(np.float64))
            # Where e^t underflows the gradient is a zero whose sign is that of PyTorch's
            # sum of two products (+0 unless both are -0), not of the factored product.
            gt = np.where((gt == 0) & (ieee_t == 0), ieee_t.astype(np.float64), gt)
        else:
            gx = -(tb * gb)
            ok = (tb > 0) & np.isfinite(tb)
            gt = np.where(ok, gb * (np.log(np.where(ok, tb, 1.0)) + 1 - xb), math.nan)
            sx = np.abs(gx)
            st = np.abs(gb) * (np.abs(np.log(np.where(ok, tb, 1.0))) + 1 + np.abs(xb))
            # extended precision where log t + 1 - x cancels
            regular = ok & np.isfinite(xb) & np.isfinite(gb)
            if _EXTENDED:
                tl, xl = tb.astype(np.longdouble), xb.astype(np.longdouble)
                ext = gb.astype(np.longdouble) * (np.log(np.where(regular, tl, 1)) + 1 - xl)
                gt = np.where(regular, ext.astype(np.float64), gt)
            else:  # pragma: no cover - platforms whose long double is float64
                for row in np.argwhere(regular):
                    idx = tuple(int(i) for i in row)
                    mt = _mpf(tb[idx])
                    gt[idx] = float(_mpf(gb[idx]) * (_ctx().log(mt) + 1 - _mpf(xb[idx])))
        eps = float(np.finfo(dtype).eps)
        info = np.finfo(dtype)
        tiny = float(info.smallest_normal if flush else info.smallest_subnormal)
        out = []
        for grad, scale, shape in ((gx, sx, x.shape), (gt, st, t.shape)):
            n_summed = max(1, math.prod(out_shape) // max(1, math.prod(shape)))
            summed = _sum_to_shape(grad, shape)
            _overflow_to_inf(summed, None, dtype)
            tol = (GRADIENT_ULPS + n_summed) * eps * _sum_to_shape(np.nan_to_num(scale), shape)
            out.append((summed, tol + GRADIENT_ULPS * tiny))
    return out[0], out[1]
