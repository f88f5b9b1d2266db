r"""Properties of the distillation loss from hidden states (``--kind from-hidden``).

They check an :class:`~.implementations.Implementation`'s ``from_hidden``
function: ``loss(h_s, W_s, h_t, W_t, *, student_bias, teacher_bias,
temperature, reduction, direction, scale_by_temperature_squared, mask)``, the
from-logits divergence (:func:`kldiv_spec.kl_div_from_logits`) of the logits

.. math::

    s = h_s W_s^\top + b_s, \qquad t = h_t W_t^\top + b_t

that fused-linear losses (Liger-Kernel's ``LigerFusedLinearJSDLoss``) compute
in chunks without holding them. Hidden states are ``(N, H)`` or ``(B, S, H)``,
weights ``(V, H)`` (the two models may differ in ``H``, not in ``V``), biases
``(V,)`` (drawn only when the implementation declares ``hidden_biases``). The
options come from the ``logits_*`` declarations the from-logits properties use,
and ``unsupported(options)`` makes one case n/a.

The exact value
---------------
The exact logits are formed in float64 from exact products (each
:math:`h_k W_{jk}` split into two doubles) summed by :func:`math.fsum`, so
that they are the exact :math:`h W^\top + b` rounded once; the mpmath oracle
of :mod:`.oracle_logits` then gives the divergence and its bound. The
implementation forms the logits in its own precision: with :math:`u` the unit
roundoff of the precision the result is judged at (the least precise of the
operands' dtype, the result's and a declared ``compute_dtype``, as the
from-logits properties judge) and :math:`n = H + 3` (+1 with a bias: the
:math:`H` products and sums, the rounding of the operands to that precision,
the float64 rounding of the exact logit), each logit carries an error

.. math::

    E_j \le \gamma_n \Bigl(\sum_k |h_k|\,|W_{jk}| + |b_j|\Bigr),
    \qquad \gamma_n = \frac{n u}{1 - n u}.

Its first-order effect on the log-probabilities is
:math:`|\delta \log q_j| \le A^s_j = (E^s_j + \sum_m q_m E^s_m) / T` (and
:math:`A^t_j` for the teacher, with :math:`p`), so that term :math:`j` of the
forward divergence, :math:`k\,p_j (\log p_j - \log q_j)`, moves by at most

.. math::

    k\,p_j\,\bigl(A^t_j (1 + |r_j|) + A^s_j\bigr), \qquad r_j = \log p_j - \log q_j

(the roles swapped in reverse), summed and divided by the reduction's divisor
for a reduction. Twice that (second order, and the float64 rounding of the
exact logits) is added to the oracle's bound. Note that the teacher's logits
matter through :math:`r_j` as well as through :math:`p_j`: the derivative of
the divergence w.r.t. a teacher logit is :math:`p_j (r_j - \mathrm{KL}) / T`,
not bounded by :math:`(p_j + q_j) / T`.

Gradients
---------
W.r.t. the student's hidden states, weight and bias, by the chain rule through
the exact student-logit gradient :math:`G` of the oracle:
:math:`\partial_h = G W_s`, :math:`\partial_W = \sum_i G_i^\top h_i`,
:math:`\partial_b = \sum_i G_i` (sums over rows, formed exactly). The bound of
:math:`G` is the oracle's plus the logit errors' effect,
:math:`2\,|c|\,g_{\max}\,a\,(p_j + q_j)(7 + |r_j| + 2 \sum_m (p_m + q_m) |r_m|)`
with :math:`c = k/T`, :math:`g_{\max}` the largest upstream gradient of the
row's terms and :math:`a = \operatorname{expm1}(\max_j \max(A^s_j, A^t_j))`;
the products then add :math:`\tau_G |W|` and :math:`\gamma_V |G|\,|W|` (for
:math:`\partial_h`; :math:`\gamma_R` over the :math:`R` rows for the others)
and two ulps. The teacher is frozen: with its operands requiring a gradient,
none must reach them (the SHOULD property ``gradients.hidden_teacher_frozen``:
PyTorch's composition differentiates through the teacher).

Levels are those of the from-logits properties: PyTorch's composition
``T**2 * kl_div(log_softmax(s / T), softmax(t / T))`` on the composed logits
passes every MUST property (its NaN for a fully masked mean is accepted).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import strategies as st

import kldiv_spec

from . import oracle_logits as oracle
from .assertions import dtype_name, to_numpy
from .checks_logits import (
    check_result,
    compare_values,
    failure_message,
    gradient_precision,
    undeclared,
)
from .context import Context
from .properties import NotApplicable, register
from .strategies import Case

__all__ = [
    "OPERANDS",
    "SAFETY",
    "assert_from_hidden",
    "assert_from_hidden_gradient",
    "assert_hidden_composition",
    "assert_teacher_frozen",
    "compose_hidden",
    "exact_hidden_gradients",
    "exact_logits",
    "hidden_case",
    "hidden_expected",
    "reproduction_lines",
]

#: The positional operands of a from-hidden call, in order.
OPERANDS: tuple[str, ...] = (
    "student_hidden",
    "student_weight",
    "teacher_hidden",
    "teacher_weight",
)
#: The factor on the first-order effect of the logits' rounding (second order, float64 rounding).
SAFETY = 2.0

_TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
#: The options of a call that a case carries (besides ``mask`` and the biases).
_OPTION_KEYS = ("reduction", "temperature", "direction", "scale_by_temperature_squared")
_BIASES = ("student_bias", "teacher_bias")
#: The options' defaults, as ``kl_div_from_logits``'s.
_DEFAULTS = {
    "reduction": "batchmean",
    "temperature": 1.0,
    "direction": "forward",
    "scale_by_temperature_squared": True,
}
#: How messages name the operands.
_NAMES = {
    "student_hidden": "student's hidden states",
    "student_weight": "student's weight",
    "teacher_hidden": "teacher's hidden states",
    "teacher_weight": "teacher's weight",
    "student_bias": "student's bias",
    "teacher_bias": "teacher's bias",
}
#: (direction, scale_by_temperature_squared), in the order the grids cycle through them.
_COMBOS = (("forward", True), ("reverse", False), ("forward", False), ("reverse", True))


# --------------------------------------------------------------------------- cases


def hidden_case(
    student_hidden: np.ndarray,
    student_weight: np.ndarray,
    teacher_hidden: np.ndarray,
    teacher_weight: np.ndarray,
    /,
    *,
    student_bias: np.ndarray | None = None,
    teacher_bias: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    **options: Any,
) -> Case:
    """Return the :class:`~.strategies.Case` of one from-hidden call.

    ``input`` and ``target`` are the student's and the teacher's hidden states;
    ``extra`` holds the weights, the biases and the mask (when given) and the
    options (``reduction``, ``temperature``, ``direction``,
    ``scale_by_temperature_squared``; defaults ``'batchmean'``, 1, ``'forward'``, True).
    """
    options = {**_DEFAULTS, **options}
    extra: dict[str, Any] = {**options}
    extra["student_weight"] = student_weight
    extra["teacher_weight"] = teacher_weight
    for name, value in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if value is not None:
            extra[name] = value
    if mask is not None:
        extra["mask"] = np.asarray(mask, bool)
    return Case(student_hidden, teacher_hidden, options["reduction"], False, extra=extra)


def _arrays(case: Case) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    e = case.extra
    return case.input, e["student_weight"], case.target, e["teacher_weight"]


def _keywords(case: Case) -> dict[str, Any]:
    """Return the case's keywords as NumPy: options, the biases and the mask (when given)."""
    found = {k: case.extra[k] for k in _OPTION_KEYS}
    for k in (*_BIASES, "mask"):
        if case.extra.get(k) is not None:
            found[k] = case.extra[k]
    return found


def _options(keywords: dict[str, Any]) -> dict[str, Any]:
    """Return the options of ``keywords``, defaults (as ``kl_div_from_logits``'s) filled in."""
    return {**_DEFAULTS, **{k: keywords[k] for k in _OPTION_KEYS if k in keywords}}


def _logits_shape(hidden: np.ndarray, weight: np.ndarray) -> tuple[int, ...]:
    return (*hidden.shape[:-1], weight.shape[0])


def _operand_dtype(arrays: list[Any]) -> np.dtype:
    return np.dtype(np.result_type(*(np.asarray(a).dtype for a in arrays if a is not None)))


# --------------------------------------------------------------------------- declarations


def _unexpressible(ctx: Context, keywords: dict[str, Any]) -> str | None:
    """Return why the implementation cannot express ``keywords``, or None if it can.

    The ``logits_*`` declarations first (:func:`.checks_logits.undeclared`), then
    ``hidden_biases``, then the implementation's ``unsupported(keywords)`` (the
    call's keywords: the options, and ``mask`` and the biases when given).
    """
    impl = ctx.impl
    why = undeclared(impl, keywords)
    if why is not None:
        return why
    if any(keywords.get(b) is not None for b in _BIASES) and not impl.hidden_biases:
        return "biases"
    if impl.unsupported is not None:
        why = impl.unsupported(dict(keywords))
        if why:
            return str(why)
    return None


def _skip_unsupported(ctx: Context, case: Case) -> None:
    why = _unexpressible(ctx, _keywords(case))
    if why is not None:
        raise NotApplicable(f"{ctx.impl.name} cannot express {why}")


def _expressible(ctx: Context, cases: list[Case]) -> list[Case]:
    kept = [c for c in cases if _unexpressible(ctx, _keywords(c)) is None]
    if not kept:
        why = _unexpressible(ctx, _keywords(cases[0])) if cases else "no case"
        raise NotApplicable(f"{ctx.impl.name} cannot express the cases ({why})")
    return kept


def _applies(ctx: Context) -> str | None:
    return None if ctx.impl.from_hidden is not None else "no from_hidden function"


def _compute_dtype(ctx: Context) -> Any:
    return getattr(ctx.impl, "compute_dtype", None)


# --------------------------------------------------------------------------- exact arithmetic


def _split(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Veltkamp's split: ``a = hi + lo`` with 26-bit halves (float64, no overflow)."""
    c = 134217729.0 * a  # 2**27 + 1
    hi = c - (c - a)
    return hi, a - hi


def _exact_products(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dekker's product: ``a * b = hi + lo`` exactly, elementwise (float64)."""
    hi = a * b
    a1, a2 = _split(a)
    b1, b2 = _split(b)
    lo = ((a1 * b1 - hi) + a1 * b2 + a2 * b1) + a2 * b2
    return hi, lo


def _exact_matmul(
    a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``a @ b.T (+ c)`` rounded once to float64, and ``|a| @ |b|.T (+ |c|)``.

    ``a`` is ``(R, n)``, ``b`` is ``(M, n)``, ``c`` is ``(M,)``: each entry is
    :func:`math.fsum` of the exact products (two doubles each) and ``c``.
    """
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with np.errstate(all="ignore"):
        hi, lo = _exact_products(a64[:, None, :], b64[None, :, :])
    parts = np.concatenate([hi, lo], axis=-1)
    scale = np.abs(a64) @ np.abs(b64).T
    if c is not None:
        c64 = np.asarray(c, np.float64)
        parts = np.concatenate(
            [parts, np.broadcast_to(c64[None, :, None], (*hi.shape[:2], 1))], -1
        )
        scale = scale + np.abs(c64)[None, :]
    out = np.empty(hi.shape[:2])
    for idx in np.ndindex(out.shape):
        out[idx] = math.fsum(parts[idx])
    return out, scale


def _gamma(n: int, u: float) -> float:
    return n * u / (1.0 - n * u)


def _unit_roundoff(dtype: np.dtype) -> float:
    return float(np.finfo(dtype).eps) / 2


def exact_logits(
    hidden: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, /, *, precision: Any
) -> tuple[np.ndarray, np.ndarray]:
    r"""Return the exact logits :math:`h W^\top + b` (float64) and each one's error bound.

    The bound is :math:`\gamma_n (\sum_k |h_k||W_{jk}| + |b_j|)`, :math:`n = H + 3`
    (+1 with a bias), :math:`u` the unit roundoff of ``precision``: what forming
    the logits in that precision may cost (see the module docstring).
    """
    width = hidden.shape[-1]
    shape = _logits_shape(hidden, weight)
    z, scale = _exact_matmul(hidden.reshape(-1, width), weight, bias)
    n = width + 3 + (bias is not None)
    err = _gamma(n, _unit_roundoff(np.dtype(precision))) * scale
    return z.reshape(shape), err.reshape(shape)


def _precision(got: Any, operands: np.dtype, compute_dtype: Any = None) -> np.dtype:
    """Return the least precise of the operands' dtype, the result's and ``compute_dtype``."""
    candidates = [np.dtype(operands)]
    dtype = getattr(got, "dtype", None)
    if dtype is not None and np.dtype(dtype).kind == "f":
        candidates.append(np.dtype(dtype))
    if compute_dtype is not None:
        candidates.append(np.dtype(dtype_name(compute_dtype)))
    return min(candidates, key=lambda d: (d.itemsize, d.name))


def _softmax64(z: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    a = z / temperature
    shifted = a - a.max(axis=-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return np.exp(logp), logp


@dataclasses.dataclass
class _Exact:
    """The exact call: the oracle at the judged precision, the logits and their effect."""

    exact: oracle.ExactLogits
    precision: np.dtype
    logits: tuple[np.ndarray, np.ndarray]
    term_bound: np.ndarray  # what the logits' rounding may move each term by
    grad_bound: np.ndarray  # ... and each entry of the student-logit gradient


def _exact(
    arrays: tuple[np.ndarray, ...],
    keywords: dict[str, Any],
    precision: Any,
    grad_output: Any = 1.0,
) -> _Exact:
    h_s, w_s, h_t, w_t = arrays
    options = _options(keywords)
    mask = keywords.get("mask")
    precision = np.dtype(precision)
    s, e_s = exact_logits(h_s, w_s, keywords.get("student_bias"), precision=precision)
    t, e_t = exact_logits(h_t, w_t, keywords.get("teacher_bias"), precision=precision)
    exact = oracle.from_logits(
        s, t, mask=mask, grad_output=grad_output, working=precision, **options
    )
    if precision.itemsize < exact.dtype.itemsize:
        exact = dataclasses.replace(exact, dtype=precision)
    temp = float(options["temperature"])
    k = temp * temp if options["scale_by_temperature_squared"] else 1.0
    q, lq = _softmax64(s, temp)
    p, lp = _softmax64(t, temp)
    a_s = (e_s + (q * e_s).sum(axis=-1, keepdims=True)) / temp  # |d log q_j|
    a_t = (e_t + (p * e_t).sum(axis=-1, keepdims=True)) / temp  # |d log p_j|
    if options["direction"] == "forward":
        w, r, a_w, a_o = p, lp - lq, a_t, a_s
    else:
        w, r, a_w, a_o = q, lq - lp, a_s, a_t
    r = np.abs(r)
    # a weight below the smallest normal number is rounded absolutely (or flushed to 0)
    tiny = float(np.finfo(precision).smallest_normal)
    term = SAFETY * k * (w * (np.expm1(a_w) * (1 + r) + np.expm1(a_o)) + (2 + r) * tiny)
    a = np.expm1(np.maximum(a_s, a_t).max(axis=-1, keepdims=True))
    spread = ((p + q) * r).sum(axis=-1, keepdims=True)
    if options["reduction"] == "none":
        g = np.abs(np.broadcast_to(np.asarray(grad_output, np.float64), s.shape))
        gmax = g.max(axis=-1, keepdims=True)
    else:
        d = exact.total[1]
        gmax = np.full((*s.shape[:-1], 1), abs(float(grad_output)) / d if d else 0.0)
    grad = SAFETY * (k / temp) * gmax * a * (p + q) * (7 + r + 2 * spread)
    if mask is not None:
        dropped = ~np.broadcast_to(np.asarray(mask, bool), s.shape[:-1])[..., None]
        term = np.where(dropped, 0.0, term)
        grad = np.where(dropped, 0.0, grad)
    return _Exact(exact, precision, (s, t), term, grad)


def hidden_expected(
    student_hidden: np.ndarray,
    student_weight: np.ndarray,
    teacher_hidden: np.ndarray,
    teacher_weight: np.ndarray,
    /,
    *,
    precision: Any = None,
    **keywords: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the exact value of a from-hidden call, its bound, and where NaN is accepted.

    ``keywords``: the options, and ``student_bias``, ``teacher_bias``, ``mask``.
    The bound is the oracle's at ``precision`` (default: the operands' dtype)
    plus the effect of forming the logits in it. NaN is accepted where
    PyTorch's composition gives it (a fully masked mean).
    """
    arrays = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    biases = [keywords.get(b) for b in _BIASES]
    if precision is None:
        precision = _operand_dtype([*arrays, *biases])
    found = _exact(arrays, keywords, precision)
    reduction = _options(keywords)["reduction"]
    exact = found.exact
    if reduction == "none":
        want, tol = exact.terms, oracle.pointwise_tolerance(exact) + found.term_bound
    else:
        value, tol0 = oracle.reduce_logits(exact)
        d = exact.total[1]
        extra = float(found.term_bound.sum()) / d if d else 0.0
        want, tol = np.asarray(value), np.asarray(tol0 + extra)
    return want, tol, oracle.composition_nan(exact, reduction)


# --------------------------------------------------------------------------- comparison


def _what(arrays: tuple[np.ndarray, ...], keywords: dict[str, Any]) -> str:
    """Describe a call in one line: shapes, dtype, options, which biases and mask."""
    h_s, w_s, h_t, w_t = arrays
    shown = ", ".join(f"{k}={v!r}" for k, v in _options(keywords).items())
    present = [b for b in _BIASES if keywords.get(b) is not None]
    mask = keywords.get("mask")
    return (
        f"from_hidden h_s {h_s.dtype}{list(h_s.shape)}, W_s {list(w_s.shape)}, "
        f"h_t {list(h_t.shape)}, W_t {list(w_t.shape)}, {shown}"
        + (f", {' and '.join(present)}" if present else ", no bias")
        + ("" if mask is None else f", mask={np.asarray(mask).tolist()!r}")
    )


def _hint(
    got: np.ndarray,
    arrays: tuple[np.ndarray, ...],
    keywords: dict[str, Any],
    precision: Any,
    tol: Any,
) -> str:
    """Return ``' (it matches NAME)'`` when ``got`` is what a common mistake gives."""
    options = _options(keywords)
    other = "reverse" if options["direction"] == "forward" else "forward"
    mistakes = [(f"direction={other!r} (the other KL)", {**keywords, "direction": other})]
    if options["temperature"] != 1.0:
        scaled = options["scale_by_temperature_squared"]
        name = "without the T**2 factor" if scaled else "with a T**2 factor"
        mistakes.append((name, {**keywords, "scale_by_temperature_squared": not scaled}))
    for bias in _BIASES:
        if keywords.get(bias) is not None:
            mistakes.append((f"the {bias.replace('_', ' ')} ignored", {**keywords, bias: None}))
    rtol = 64 * float(np.finfo(np.dtype(precision)).eps)
    for name, changed in mistakes:
        try:
            value = hidden_expected(*arrays, precision=precision, **changed)[0]
        except Exception:
            continue
        if value.shape != got.shape:
            continue
        with np.errstate(invalid="ignore"):
            close = np.abs(got - value) <= rtol * np.abs(value) + np.nan_to_num(tol)
        if bool((close | (np.isnan(got) & np.isnan(value))).all()):
            return f" (it matches {name})"
    return ""


def _check_dtype(got: Any, arrays: list[Any], what: str) -> None:
    dtype = getattr(got, "dtype", None)
    if dtype is None:
        return
    want = _operand_dtype(arrays).name
    if dtype_name(dtype) != want:
        head = f"result dtype {dtype_name(dtype)}, expected {want} (the hidden states' dtype)"
        raise AssertionError(failure_message(head, what))


def assert_from_hidden(
    got: Any,
    student_hidden: np.ndarray,
    student_weight: np.ndarray,
    teacher_hidden: np.ndarray,
    teacher_weight: np.ndarray,
    /,
    *,
    check_dtype: bool = True,
    compute_dtype: Any = None,
    **keywords: Any,
) -> None:
    """Assert ``got`` (the result as NumPy) agrees with the exact value within its bound.

    ``keywords`` are the call's: the options and ``student_bias``,
    ``teacher_bias``, ``mask``. Judged at the precision the result has (its
    dtype, the operands', a declared ``compute_dtype``: the least precise);
    PyTorch's composition's NaN for a fully masked mean is accepted.
    ``check_dtype`` then requires the operands' dtype. A mismatch names the
    common mistake it matches, if any.
    """
    arrays = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    operands = [*arrays, *(keywords.get(b) for b in _BIASES)]
    precision = _precision(got, _operand_dtype(operands), compute_dtype)
    want, tol, nan_ok = hidden_expected(*arrays, precision=precision, **keywords)
    what = _what(arrays, keywords)
    values = np.asarray(got, dtype=np.float64)
    try:
        compare_values(values, want, tol, what, nan_ok=nan_ok)
    except AssertionError:
        hint = _hint(values, arrays, keywords, precision, tol)
        compare_values(values, want, tol, what, hint, nan_ok=nan_ok)
    if check_dtype:
        _check_dtype(got, operands, what)


def compose_hidden(
    student_hidden: np.ndarray,
    student_weight: np.ndarray,
    teacher_hidden: np.ndarray,
    teacher_weight: np.ndarray,
    /,
    *,
    dtype: Any = None,
    **keywords: Any,
) -> np.ndarray:
    """Return ``kl_div_from_logits(h_s @ W_s.T + b_s, h_t @ W_t.T + b_t)`` as float64.

    The logits are formed by NumPy in ``dtype`` (default: the operands') and
    given to :func:`kldiv_spec.kl_div_from_logits` (NumPy) with the options and mask.
    """
    arrays = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    biases = [keywords.get(b) for b in _BIASES]
    dtype = np.dtype(_operand_dtype([*arrays, *biases]) if dtype is None else dtype)
    h_s, w_s, h_t, w_t = (np.asarray(a, dtype) for a in arrays)
    b_s, b_t = (None if b is None else np.asarray(b, dtype) for b in biases)
    with np.errstate(all="ignore"):
        s = np.matmul(h_s, w_s.T) + (0 if b_s is None else b_s)
        t = np.matmul(h_t, w_t.T) + (0 if b_t is None else b_t)
    mask = keywords.get("mask")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = kldiv_spec.kl_div_from_logits(
            s.astype(dtype), t.astype(dtype), mask=mask, **_options(keywords)
        )
    return np.asarray(out, dtype=np.float64)


def assert_hidden_composition(
    got: Any,
    student_hidden: np.ndarray,
    student_weight: np.ndarray,
    teacher_hidden: np.ndarray,
    teacher_weight: np.ndarray,
    /,
    *,
    compute_dtype: Any = None,
    **keywords: Any,
) -> None:
    """Assert ``got`` equals :func:`compose_hidden` at the result's precision within the bound.

    The composition forms the logits in the precision ``got`` is judged at;
    the bound is twice the exact value's (each of the two is within it),
    PyTorch's composition's NaN for a fully masked mean accepted on both sides.
    """
    arrays = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    operands = [*arrays, *(keywords.get(b) for b in _BIASES)]
    precision = _precision(got, _operand_dtype(operands), compute_dtype)
    composed = compose_hidden(*arrays, dtype=precision, **keywords)
    want, tol, nan_ok = hidden_expected(*arrays, precision=precision, **keywords)
    accepted = np.broadcast_to(nan_ok, want.shape)
    composed = np.where(accepted & np.isnan(composed), want, composed)
    what = "against kl_div_from_logits of the logits h @ W.T + b, " + _what(arrays, keywords)
    values = np.asarray(got, dtype=np.float64)
    try:
        compare_values(values, composed, 2 * tol, what, nan_ok=accepted)
    except AssertionError:
        hint = _hint(values, arrays, keywords, precision, 2 * tol)
        compare_values(values, composed, 2 * tol, what, hint, nan_ok=accepted)


def exact_hidden_gradients(
    student_hidden: np.ndarray,
    student_weight: np.ndarray,
    teacher_hidden: np.ndarray,
    teacher_weight: np.ndarray,
    /,
    *,
    grad_output: Any,
    precision: Any = None,
    **keywords: Any,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    r"""Return the exact student gradients and their bounds: ``{'hidden': (g, tol), ...}``.

    ``'hidden'`` :math:`G W_s`, ``'weight'`` :math:`\sum_i G_i^\top h_i` and,
    with a ``student_bias``, ``'bias'`` :math:`\sum_i G_i`, with :math:`G` the
    oracle's exact gradient w.r.t. the student logits (float64), each product
    formed exactly; the bounds at ``precision`` (default: the operands' dtype).
    """
    arrays = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    found = _exact_gradients(arrays, grad_output, precision, keywords)
    return found[0]


def _exact_gradients(
    arrays: tuple[np.ndarray, ...], grad_output: Any, precision: Any, keywords: dict[str, Any]
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """:func:`exact_hidden_gradients`, and where PyTorch's composition gives NaN instead.

    The second dict holds, per gradient, a bool array of its shape: True where the
    composition's gradient is NaN and the exact one a number. A row of the logits'
    gradient that the composition makes NaN (:func:`oracle_logits.composition_gradient_nan`:
    a probability of the weighting side that is or rounds to 0, a dropped row without a
    softmax) is NaN in that row of :math:`G W_s` and, through the sums over the rows,
    everywhere in the weight's and the bias's gradients.
    """
    student_hidden, student_weight = arrays[0], arrays[1]
    biases = [keywords.get(b) for b in _BIASES]
    if precision is None:
        precision = _operand_dtype([*arrays, *biases])
    precision = np.dtype(precision)
    found = _exact(arrays, keywords, precision, grad_output)
    tol_g = oracle.gradient_tolerance(found.exact)[0] + found.grad_bound
    vocab, width = student_weight.shape
    g2 = found.exact.grad_input.reshape(-1, vocab)
    t2 = tol_g.reshape(-1, vocab)
    h2 = np.asarray(student_hidden, np.float64).reshape(-1, width)
    w = np.asarray(student_weight, np.float64)
    u = _unit_roundoff(precision)
    rows = g2.shape[0]
    floor = float(np.finfo(precision).smallest_normal)

    def bound(value: np.ndarray, propagated: np.ndarray, rounding: np.ndarray, n: int) -> Any:
        with np.errstate(over="ignore"):
            ulp = np.spacing(np.abs(value).astype(precision)).astype(np.float64)
        return propagated + _gamma(n + 1, u) * rounding + 2 * ulp + floor

    grad_h, scale_h = _exact_matmul(g2, w.T)
    grad_w, scale_w = _exact_matmul(g2.T, h2.T)
    out = {
        "hidden": (
            grad_h.reshape(student_hidden.shape),
            bound(grad_h, t2 @ np.abs(w), scale_h, vocab).reshape(student_hidden.shape),
        ),
        "weight": (grad_w, bound(grad_w, t2.T @ np.abs(h2), scale_w, rows)),
    }
    if keywords.get("student_bias") is not None:
        grad_b, scale_b = _exact_matmul(g2.T, np.ones((1, rows)))
        grad_b, scale_b = grad_b[:, 0], scale_b[:, 0]
        out["bias"] = (grad_b, bound(grad_b, t2.sum(axis=0), scale_b, rows))
    nan_rows = oracle.composition_gradient_nan(found.exact).reshape(-1, vocab).any(axis=1)
    spread = bool(nan_rows.any())
    nan_ok = {
        "hidden": np.broadcast_to(nan_rows[:, None], (rows, width)).reshape(student_hidden.shape),
        "weight": np.full(grad_w.shape, spread),
        "bias": np.full((vocab,), spread),
    }
    return out, nan_ok


def assert_from_hidden_gradient(
    grads: Any,
    student_hidden: np.ndarray,
    student_weight: np.ndarray,
    teacher_hidden: np.ndarray,
    teacher_weight: np.ndarray,
    /,
    *,
    grad_output: Any,
    compute_dtype: Any = None,
    strict: bool = True,
    **keywords: Any,
) -> None:
    """Assert the gradients w.r.t. the student's hidden states, weight (and bias) are exact.

    ``grads`` is ``(grad_hidden, grad_weight, grad_bias)`` as NumPy (the bias's
    is required only with a ``student_bias``; a missing one, None, fails).
    Judged at the least precise of the gradients' dtype, the operands' and
    ``compute_dtype``, against :func:`exact_hidden_gradients`. Without ``strict``
    (MUST) PyTorch's composition's NaN is accepted where it differs (the rows of the
    hidden states' gradient whose logits' gradient it makes NaN, and then the whole
    weight's and bias's gradients), as for the logits.
    """
    arrays = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    operands = [*arrays, *(keywords.get(b) for b in _BIASES)]
    grads = [*list(grads), None, None, None][:3]
    first = next((g for g in grads if g is not None), None)
    precision = _precision(first, _operand_dtype(operands), compute_dtype)
    want, composition_nan = _exact_gradients(arrays, grad_output, precision, keywords)
    what = _what(arrays, keywords)
    for name, got in zip(("hidden", "weight", "bias"), grads, strict=True):
        if name not in want:
            continue
        value, tol = want[name]
        if got is None:
            head = f"no gradient w.r.t. the student {name} (None)"
            raise AssertionError(failure_message(head, what, ("expected", value)))
        nan_ok = None if strict else composition_nan[name]
        where = f"gradient w.r.t. the student {name}, {what}"
        compare_values(np.asarray(got), value, tol, where, nan_ok=nan_ok)


def assert_teacher_frozen(grads: dict[str, Any], /) -> None:
    """Assert no gradient reached the teacher's operands: each is None or all zeros."""
    for name, g in grads.items():
        if g is None:
            continue
        values = np.asarray(g, dtype=np.float64)
        if values.size and not bool((values == 0).all()):
            worst = float(np.nanmax(np.abs(values)))
            msg = (
                f"the {_NAMES.get(name, name)} got a gradient (largest "
                f"{worst:.6g}): the teacher is frozen, no gradient may reach it"
            )
            raise AssertionError(msg)


# --------------------------------------------------------------------------- calls


def _function(ctx: Context) -> Callable[..., Any]:
    fn = ctx.impl.from_hidden
    if fn is None:
        raise NotApplicable(f"{ctx.impl.name} has no from_hidden function")
    return fn


def _backend_arrays(ctx: Context, case: Case) -> tuple[list[Any], dict[str, Any]]:
    """Return the positional operands and the keywords of ``case`` on the backend."""
    be = ctx.backend
    positional = [be.asarray(a) for a in _arrays(case)]
    keywords = {
        k: (be.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in _keywords(case).items()
    }
    return positional, keywords


def _numpy_result(ctx: Context, out: Any) -> np.ndarray:
    try:
        return np.asarray(ctx.backend.to_numpy(out))
    except TypeError:  # a dtype NumPy lacks (bfloat16)
        return to_numpy(out).astype(np.float32)


def _result_shape(case: Case) -> tuple[int, ...]:
    if case.extra["reduction"] != "none":
        return ()
    return _logits_shape(case.input, case.extra["student_weight"])


def _invoke(ctx: Context, case: Case, positional: list[Any], keywords: dict[str, Any]) -> Any:
    fn = _function(ctx)
    _skip_unsupported(ctx, case)
    try:
        with warnings.catch_warnings(record=True):  # a composition's 'mean' UserWarning
            warnings.simplefilter("always")
            out = fn(*positional, **keywords)
    except NotImplementedError as exc:
        raise NotApplicable(f"{ctx.impl.name} does not implement this case: {exc}") from None
    check_result(ctx, out, _result_shape(case), "from_hidden")
    return out


def _call(ctx: Context, case: Case, kind: str = "hidden") -> np.ndarray:
    ctx.record(case, kind)
    positional, keywords = _backend_arrays(ctx, case)
    return _numpy_result(ctx, _invoke(ctx, case, positional, keywords))


def _grad_output(case: Case) -> Any:
    if case.extra["reduction"] != "none":
        return 0.75
    shape = _result_shape(case)
    return (0.5 + (np.arange(math.prod(shape)) % 3)).reshape(shape).astype(case.input.dtype)


def _forward_dtype(ctx: Context, case: Case, out: Any) -> None:
    check_result(ctx, out, _result_shape(case), "from_hidden")
    name = dtype_name(out.dtype)
    dtype = np.dtype(name) if name != "bfloat16" else None
    ctx.result_dtype = dtype if dtype is not None and dtype.kind == "f" else None


def _student_gradients(ctx: Context, case: Case, g: Any) -> list[Any]:
    """Return the gradients w.r.t. the student's hidden states, weight and bias (NumPy or None)."""
    ctx.result_dtype = None
    fn = _function(ctx)
    _skip_unsupported(ctx, case)
    ctx.record(case, "hidden_gradient", grad=g)
    be = ctx.backend
    positional, keywords = _backend_arrays(ctx, case)
    has_bias = "student_bias" in keywords
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            if be.autograd == "torch" and ctx.impl.differentiable:
                import torch

                leaves = [positional[0], positional[1]]
                if has_bias:
                    leaves.append(keywords["student_bias"])
                for leaf in leaves:
                    leaf.requires_grad_(True)
                out = fn(*positional, **keywords)
                _forward_dtype(ctx, case, out)
                gout = torch.as_tensor(np.asarray(g), dtype=out.dtype, device=out.device)
                found = torch.autograd.grad(out, leaves, gout.expand(out.shape), allow_unused=True)
                return [None if a is None else a.detach().cpu().numpy() for a in found]
            if be.autograd == "jax" and ctx.impl.differentiable:
                import jax
                import jax.numpy as jnp

                def f(*leaves: Any) -> Any:
                    bias = {"student_bias": leaves[2]} if has_bias else {}
                    return fn(leaves[0], leaves[1], *positional[2:], **{**keywords, **bias})

                leaves = [positional[0], positional[1]]
                if has_bias:
                    leaves.append(keywords["student_bias"])
                out, vjp = jax.vjp(f, *leaves)
                _forward_dtype(ctx, case, out)
                found = vjp(jnp.broadcast_to(jnp.asarray(g, dtype=out.dtype), out.shape))
                return [np.asarray(a) for a in found]
            backward = ctx.impl.from_hidden_backward
            if backward is None:
                raise NotApplicable(f"{ctx.impl.name} has no from-hidden backward on {be.name}")
            gb = g if np.ndim(g) == 0 else be.asarray(np.asarray(g))
            found = backward(gb, *positional, **keywords)
    except NotImplementedError as exc:
        raise NotApplicable(f"{ctx.impl.name} does not implement this case: {exc}") from None
    return [None if a is None else _numpy_result(ctx, a) for a in list(found)[:3]]


def _teacher_gradients(ctx: Context, case: Case) -> dict[str, Any]:
    """Return the gradients the teacher's operands got (None where none reached them)."""
    fn = _function(ctx)
    _skip_unsupported(ctx, case)
    ctx.record(case, "hidden_teacher")
    be = ctx.backend
    positional, keywords = _backend_arrays(ctx, case)
    names = ["student_hidden", "student_weight", "teacher_hidden", "teacher_weight"]
    names += [b for b in _BIASES if b in keywords]
    values = {**dict(zip(OPERANDS, positional, strict=True)), **keywords}
    teacher = [n for n in names if n.startswith("teacher")]

    def call(found: dict[str, Any]) -> Any:
        rest = {k: v for k, v in keywords.items() if k not in found}
        return fn(*(found[n] for n in OPERANDS), **rest, **{b: found[b] for b in names[4:]})

    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            if be.autograd == "torch":
                import torch

                leaves = {n: values[n].requires_grad_(True) for n in names}
                out = call(leaves)
                check_result(ctx, out, _result_shape(case), "from_hidden")
                if not out.requires_grad:  # no gradient reaches anything
                    return dict.fromkeys(teacher)
                gout = torch.ones_like(out)
                found = torch.autograd.grad(
                    out, [leaves[n] for n in teacher], gout, allow_unused=True
                )
                return {
                    n: None if a is None else a.detach().cpu().numpy()
                    for n, a in zip(teacher, found, strict=True)
                }
            import jax
            import jax.numpy as jnp

            out, vjp = jax.vjp(
                lambda *a: call(dict(zip(names, a, strict=True))), *(values[n] for n in names)
            )
            check_result(ctx, out, _result_shape(case), "from_hidden")
            found = vjp(jnp.ones_like(out))
            return {n: np.asarray(a) for n, a in zip(names, found, strict=True) if n in teacher}
    except NotImplementedError as exc:
        raise NotApplicable(f"{ctx.impl.name} does not implement this case: {exc}") from None


# --------------------------------------------------------------------------- cases drawn


def _values(rng: np.random.Generator, shape: tuple[int, ...], low: float, high: float) -> Any:
    """Return normal values times :math:`10^U`, :math:`U` uniform in ``[low, high]``."""
    return rng.normal(0.0, 1.0, size=shape) * 10.0 ** rng.uniform(low, high, size=shape)


def _operands(
    rng: np.random.Generator,
    rows: tuple[int, ...],
    widths: tuple[int, int],
    vocab: int,
    spread: float,
    dtype: Any,
) -> dict[str, np.ndarray]:
    """Return hidden states, weights and biases of both models (the biases all drawn)."""
    found = {}
    for who, width in zip(("student", "teacher"), widths, strict=True):
        found[f"{who}_hidden"] = _values(rng, (*rows, width), -2.0, 1.0).astype(dtype)
        weight = _values(rng, (vocab, width), -1.0, 0.0) * spread / math.sqrt(width)
        found[f"{who}_weight"] = weight.astype(dtype)
        found[f"{who}_bias"] = rng.normal(0.0, spread / 4, size=vocab).astype(dtype)
    return found


def _case(found: dict[str, np.ndarray], biases: tuple[bool, bool], **options: Any) -> Case:
    kept = {b: found[b] for b, keep in zip(_BIASES, biases, strict=True) if keep}
    return hidden_case(*(found[n] for n in OPERANDS), **kept, **options)


@st.composite
def _hidden_cases(draw: Any, ctx: Context) -> Case:
    impl = ctx.impl
    dtype = draw(st.sampled_from((np.float64, np.float32)))
    rows = draw(
        st.one_of(st.tuples(st.integers(1, 16)), st.tuples(st.integers(1, 3), st.integers(1, 5)))
    )
    vocab = draw(st.integers(2, 64))
    widths = (draw(st.integers(1, 24)), draw(st.integers(1, 24)))
    spread = draw(st.sampled_from((1.0, 4.0, 16.0)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    found = _operands(rng, rows, widths, vocab, spread, dtype)
    biases = (False, False)
    if impl.hidden_biases:
        # mostly with the student's bias: its gradient is checked
        biases = (draw(st.sampled_from((True, True, True, False))), draw(st.booleans()))
    options: dict[str, Any] = {
        "temperature": draw(st.sampled_from(_TEMPERATURES if impl.logits_temperature else (1.0,))),
        "reduction": draw(st.sampled_from(impl.logits_reductions)),
        "direction": draw(st.sampled_from(impl.logits_directions)),
        "scale_by_temperature_squared": draw(st.sampled_from(impl.logits_scalings)),
    }
    # 'batchmean' with a mask is defined for 2-d logits only (rows = batch)
    maskable = len(rows) == 1 or options["reduction"] != "batchmean"
    if impl.logits_masks and maskable and draw(st.booleans()):
        n = math.prod(rows)
        keep = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        options["mask"] = np.asarray(keep, bool).reshape(rows)
    return _case(found, biases, **options)


def _strategy(ctx: Context) -> Any:
    impl = ctx.impl
    if impl.from_hidden is None:
        raise NotApplicable(f"{impl.name} has no from_hidden function")
    if not (impl.logits_reductions and impl.logits_directions and impl.logits_scalings):
        raise NotApplicable(f"{impl.name} declares no from-logits option it can express")
    return _hidden_cases(ctx)


def _grid(ctx: Context) -> list[Case]:
    """Every pair of option values on fixed operands: reductions, masks, directions, T**2.

    2-d float64 hidden states of two widths, float32 ones, and 3-d ``(B, S, H)``
    ones, the biases cycling through both, the student's, the teacher's, none
    (only none without ``hidden_biases``).
    """
    cycle = ((True, True), (True, False), (False, True), (False, False))
    if not ctx.impl.hidden_biases:
        cycle = ((False, False),)
    two = _operands(np.random.default_rng(41), (4,), (5, 3), 6, 4.0, np.float64)
    keep = np.asarray([True, False, True, True])
    three = _operands(np.random.default_rng(42), (2, 3), (4, 6), 5, 4.0, np.float64)
    keep3 = np.asarray([[True, True, False], [False, True, True]])
    reductions = ("none", "batchmean", "sum", "mean", "rowmean")
    cases = []
    for i, reduction in enumerate(reductions):
        for j, mask in enumerate((None, keep)):
            # each reduction gets both directions and both scalings, each mask form
            # all four (direction, scaling) pairs: every pair of option values occurs
            direction, scaled = _COMBOS[2 * (i % 2) + (i // 2 + j) % 2]
            options = {
                "temperature": 2.0,
                "direction": direction,
                "scale_by_temperature_squared": scaled,
                "reduction": reduction,
                "mask": mask,
            }
            cases.append(_case(two, cycle[len(cases) % len(cycle)], **options))
    single = {k: v.astype(np.float32) for k, v in two.items()}
    for k, (direction, scaled) in enumerate(_COMBOS):
        reduction, mask = (("rowmean", keep), ("sum", None), ("none", keep), ("batchmean", None))[
            k
        ]
        options = {
            "temperature": (0.5, 1.0, 2.0, 4.0)[k],
            "direction": direction,
            "scale_by_temperature_squared": scaled,
        }
        cases.append(
            _case(single, cycle[k % len(cycle)], reduction=reduction, mask=mask, **options)
        )
    for k, (reduction, mask) in enumerate(
        (
            ("batchmean", None),
            ("rowmean", None),
            ("mean", None),
            ("rowmean", keep3),
            ("mean", keep3),
            ("sum", keep3),
        )
    ):
        direction, scaled = _COMBOS[k % 4]
        options = {
            "temperature": 2.0,
            "direction": direction,
            "scale_by_temperature_squared": scaled,
        }
        cases.append(
            _case(three, cycle[k % len(cycle)], reduction=reduction, mask=mask, **options)
        )
    return cases


def _option_cases(ctx: Context) -> list[Case]:
    return _expressible(ctx, _grid(ctx))


def _dtype_cases(ctx: Context) -> list[Case]:
    """float64 and float32 operands (and float16 where the library has it), each reduction."""
    found = _operands(np.random.default_rng(43), (3,), (4, 2), 5, 4.0, np.float64)
    dtypes: list[Any] = [np.float64, np.float32]
    if hasattr(ctx.backend.xp, "float16"):
        dtypes.append(np.float16)
    biases = (ctx.impl.hidden_biases, ctx.impl.hidden_biases)
    cases = []
    for i, reduction in enumerate(("none", "batchmean", "sum", "mean", "rowmean")):
        for j, dtype in enumerate(dtypes):
            direction, scaled = _COMBOS[(i + j) % 4]
            cast = {k: v.astype(dtype) for k, v in found.items()}
            options = {"direction": direction, "scale_by_temperature_squared": scaled}
            cases.append(_case(cast, biases, reduction=reduction, temperature=2.0, **options))
    return _expressible(ctx, cases)


def _edge_number_cases(ctx: Context) -> list[Case]:
    """Float32 operands whose second row's student probability rounds to 0, in reverse.

    Row 1's logits are ``[120.3, -120.1, 9.9]`` (no bias): at T = 1 and 2 the middle
    class's probability is below float32's smallest subnormal, and PyTorch's
    composition gives NaN across that row of the hidden states' gradient and in the
    whole weight's and bias's gradients; the exact gradients are numbers. Reverse KL,
    'none', 'sum', 'batchmean', a mask keeping and one dropping that row.
    """
    f32 = np.float32
    found = {
        "student_hidden": np.asarray([[0.5, -0.25], [16.0, 8.0], [-0.3, 0.7], [1.0, 1.0]], f32),
        "student_weight": np.asarray([[6.0, 3.0], [-6.0, -3.0], [0.5, 0.2]], f32),
        "teacher_hidden": np.asarray([[0.1, 0.2], [0.3, -0.1], [0.0, 0.5], [-0.4, 0.2]], f32),
        "teacher_weight": np.asarray([[1.0, 0.5], [0.2, -0.3], [-0.5, 1.0]], f32),
        "student_bias": np.asarray([0.1, -0.2, 0.3], f32),
        "teacher_bias": np.asarray([0.0, 0.25, -0.25], f32),
    }
    biases = (ctx.impl.hidden_biases, ctx.impl.hidden_biases)
    keep, drop = np.asarray([True, True, False, True]), np.asarray([True, False, True, True])
    cases = []
    for k, (reduction, mask) in enumerate(
        (("none", None), ("sum", None), ("batchmean", None), ("rowmean", keep), ("sum", drop))
    ):
        options = {"direction": "reverse", "scale_by_temperature_squared": k % 2 == 0}
        for temperature in (1.0, 2.0):
            cases.append(
                _case(found, biases, reduction=reduction, mask=mask, temperature=temperature,
                      **options)
            )  # fmt: skip
    return _expressible(ctx, cases)


# --------------------------------------------------------------------------- properties


def _check_value(ctx: Context, case: Case) -> None:
    got = _call(ctx, case)
    assert_from_hidden(
        got,
        *_arrays(case),
        check_dtype=False,
        compute_dtype=_compute_dtype(ctx),
        **_keywords(case),
    )


@register(
    "accuracy.hidden_oracle",
    "from_hidden agrees with the exact (mpmath) oracle on the exact logits h @ W.T + b, "
    "within its bound plus the logits' rounding, every option",
    strategy=_strategy,
    applies=_applies,
    examples_scale=0.5,
    subject="from_hidden",
)
def _hidden_oracle(ctx: Context, case: Case) -> None:
    _check_value(ctx, case)


@register(
    "accuracy.hidden_options",
    "from_hidden on fixed operands (every pair of direction, T**2 on/off, reduction, mask; "
    "each bias; float32; 3-d hidden states): the oracle's value",
    cases=_option_cases,
    applies=_applies,
    subject="from_hidden",
)
def _hidden_options(ctx: Context, case: Case) -> None:
    _check_value(ctx, case)


@register(
    "math.hidden_composition",
    "from_hidden equals kldiv_spec.kl_div_from_logits of the logits h @ W.T + b formed at "
    "the precision of its result, within twice the bound",
    strategy=_strategy,
    applies=_applies,
    examples_scale=0.5,
    subject="from_hidden",
)
def _hidden_composition(ctx: Context, case: Case) -> None:
    got = _call(ctx, case, "hidden_composition")
    assert_hidden_composition(
        got, *_arrays(case), compute_dtype=_compute_dtype(ctx), **_keywords(case)
    )


@register(
    "semantics.hidden_dtypes",
    "the result has the hidden states' floating dtype (float64 in, float64 out), each reduction",
    cases=_dtype_cases,
    applies=_applies,
    subject="from_hidden",
)
def _hidden_dtypes(ctx: Context, case: Case) -> None:
    got = _call(ctx, case)
    arrays = _arrays(case)
    keywords = _keywords(case)
    _check_dtype(got, [*arrays, *(keywords.get(b) for b in _BIASES)], _what(arrays, keywords))


@register(
    "gradients.hidden_oracle",
    "the gradients w.r.t. the student's hidden states, weight and bias agree with the chain "
    "rule of the oracle's exact logit gradient (G @ W, sum of G.T h, sum of G)",
    strategy=_strategy,
    applies=_applies,
    examples_scale=0.5,
    subject="from_hidden",
)
def _hidden_gradients(ctx: Context, case: Case) -> None:
    _check_hidden_gradient(ctx, case, strict=False)


def _check_hidden_gradient(ctx: Context, case: Case, /, *, strict: bool) -> None:
    """Judge the student's gradients of one call, at the forward's precision too.

    Without ``strict`` (MUST) PyTorch's composition's NaN is accepted where a
    probability rounds to 0 (:func:`assert_from_hidden_gradient`).
    """
    g = _grad_output(case)
    grads = _student_gradients(ctx, case, g)
    assert_from_hidden_gradient(
        grads,
        *_arrays(case),
        grad_output=g,
        compute_dtype=gradient_precision(ctx),
        strict=strict,
        **_keywords(case),
    )


@register(
    "gradients.hidden_edge_numbers",
    "the student gradients are the specification's numbers where PyTorch's composition "
    "gives NaN: float32 logits 240 apart in reverse, whose smallest probability rounds to 0 "
    "(the composition: NaN across that row of the hidden states' gradient and in the whole "
    "weight's and bias's)",
    cases=_edge_number_cases,
    applies=_applies,
    level="SHOULD",
    subject="from_hidden",
)
def _hidden_edge_numbers(ctx: Context, case: Case) -> None:
    _check_hidden_gradient(ctx, case, strict=True)


def _teacher_applies(ctx: Context) -> str | None:
    if ctx.impl.from_hidden is None:
        return "no from_hidden function"
    if ctx.backend.autograd not in ("torch", "jax") or not ctx.impl.differentiable:
        return f"no autograd on {ctx.backend.name}: from_hidden_backward gives the student's only"
    return None


def _teacher_cases(ctx: Context) -> list[Case]:
    return _expressible(ctx, _grid(ctx))[::5]


@register(
    "gradients.hidden_teacher_frozen",
    "with the teacher's hidden states, weight and bias requiring a gradient, none reaches "
    "them: the teacher is frozen (PyTorch's composition differentiates through it)",
    cases=_teacher_cases,
    applies=_teacher_applies,
    level="SHOULD",
    subject="from_hidden",
)
def _hidden_teacher(ctx: Context, case: Case) -> None:
    assert_teacher_frozen(_teacher_gradients(ctx, case))


@register(
    "hygiene.hidden_inputs_unmodified",
    "from_hidden (and its backward) leave the hidden states, weights, biases and mask unchanged",
    strategy=_strategy,
    applies=_applies,
    examples_scale=0.5,
    subject="from_hidden",
)
def _hidden_unmodified(ctx: Context, case: Case) -> None:
    be = ctx.backend
    ctx.record(case, "hidden_unmodified")
    positional, keywords = _backend_arrays(ctx, case)
    _invoke(ctx, case, positional, keywords)
    backward = ctx.impl.from_hidden_backward
    if backward is not None and not be.autograd:
        g = _grad_output(case)
        backward(g if np.ndim(g) == 0 else be.asarray(np.asarray(g)), *positional, **keywords)
    originals = {**dict(zip(OPERANDS, _arrays(case), strict=True)), **_keywords(case)}
    now = {**dict(zip(OPERANDS, positional, strict=True)), **keywords}
    for name, orig in originals.items():
        if not isinstance(orig, np.ndarray):
            continue
        after = np.asarray(be.to_numpy(now[name]))
        if after.shape != orig.shape or not np.array_equal(
            after, orig, equal_nan=orig.dtype.kind == "f"
        ):
            msg = f"the call of from_hidden modified its {_NAMES.get(name, name)}"
            raise AssertionError(msg)


# --------------------------------------------------------------------------- reproduction


def _literal(a: Any) -> str:
    """Return NumPy code that rebuilds ``a`` exactly: values, dtype and shape."""
    a = np.asarray(a)
    if a.dtype.kind == "b":
        return f"np.array({a.tolist()!r}, dtype=bool)"
    values = ", ".join(
        f"float({repr(float(v))!r})" if not np.isfinite(v) else repr(float(v))
        for v in a.ravel().astype(np.float64)
    )
    return f"np.array([{values}], dtype=np.{a.dtype.name}).reshape({tuple(a.shape)!r})"


def _grad_code(g: Any) -> str:
    return repr(float(g)) if np.ndim(g) == 0 else _literal(np.asarray(g))


_VERDICT = """\
try:
    {judge}
    print('verdict:  agrees')
except AssertionError as exc:
    print('verdict:  differs:', exc)"""

_SHOW = """\
def show(a):  # one line, 17 significant digits
    return np.array2string(np.asarray(a), max_line_width=10**6, threshold=64, precision=17)"""


def _forward_lines(kind: str) -> list[str]:
    lines = [
        "ops = [backend.asarray(a) for a in (h_s, W_s, h_t, W_t)]",
        "def call():",
        "    try:",
        "        return impl.from_hidden(*ops, **kw, **extra)",
        "    except Exception as exc:  # a crash is a result too",
        "        return exc",
        "got = call()",
    ]
    if kind == "hidden_unmodified":
        lines += [
            "if impl.from_hidden_backward is not None and not backend.autograd:",
            "    g = 0.75 if kw['reduction'] != 'none' else backend.asarray("
            "(0.5 + np.arange(np.prod(got.shape)) % 3).reshape(got.shape).astype(h_s.dtype))",
            "    impl.from_hidden_backward(g, *ops, **kw, **extra)",
            "before = dict(zip(['student_hidden', 'student_weight', 'teacher_hidden', "
            "'teacher_weight'], (h_s, W_s, h_t, W_t)), **exact_kw)",
            "after = dict(zip(['student_hidden', 'student_weight', 'teacher_hidden', "
            "'teacher_weight'], ops), **extra)",
            "changed = [k for k, v in before.items() if isinstance(v, np.ndarray) and not "
            "np.array_equal(backend.to_numpy(after[k]), v, equal_nan=v.dtype.kind == 'f')]",
            "if changed:",
            "    got = AssertionError(f'the call modified its {changed[0]}')",
        ]
    if kind == "hidden_composition":
        expected = "expected = judge.compose_hidden(h_s, W_s, h_t, W_t, **exact_kw)"
        judge = "judge.assert_hidden_composition(values, h_s, W_s, h_t, W_t, **exact_kw)"
    else:
        expected = "expected = judge.hidden_expected(h_s, W_s, h_t, W_t, **exact_kw)[0]"
        judge = "judge.assert_from_hidden(values, h_s, W_s, h_t, W_t, **exact_kw)"
    return [
        *lines,
        expected,
        "print('expected:', show(expected))",
        "if isinstance(got, Exception):",
        "    print('got:      raised', repr(got))",
        "    print('verdict:  differs')",
        "else:",
        "    values = backend.to_numpy(got)",
        "    print('got:     ', show(values), values.dtype)",
        *("    " + line for line in _VERDICT.format(judge=judge).splitlines()),
    ]


def _gradient_lines(record: Any, autograd: str | None) -> list[str]:
    lines = [
        f"g = {_grad_code(record.grad)}  # the upstream gradient",
        "student = [h_s, W_s] + ([b_s] if b_s is not None else [])",
        "def with_student(leaves):",
        "    bias = {'student_bias': leaves[2]} if len(leaves) > 2 else {}",
        "    return impl.from_hidden(leaves[0], leaves[1], backend.asarray(h_t), "
        "backend.asarray(W_t), **kw, **{**extra, **bias})",
    ]
    if autograd == "torch":
        lines += [
            "import torch",
            "leaves = [backend.asarray(a).requires_grad_(True) for a in student]",
            "out = with_student(leaves)",
            "gout = torch.as_tensor(np.asarray(g), dtype=out.dtype, device=out.device)",
            "grads = [None if a is None else a.detach().cpu().numpy() for a in "
            "torch.autograd.grad(out, leaves, gout.expand(out.shape), allow_unused=True)]",
        ]
    elif autograd == "jax":
        lines += [
            "import jax, jax.numpy as jnp",
            "out, vjp = jax.vjp(lambda *a: with_student(a), "
            "*[backend.asarray(a) for a in student])",
            "grads = [np.asarray(a) for a in "
            "vjp(jnp.broadcast_to(jnp.asarray(g, dtype=out.dtype), out.shape))]",
        ]
    else:
        lines += [
            "gb = g if np.ndim(g) == 0 else backend.asarray(g)",
            "ops = [backend.asarray(a) for a in (h_s, W_s, h_t, W_t)]",
            "grads = [None if a is None else backend.to_numpy(a) for a in "
            "list(impl.from_hidden_backward(gb, *ops, **kw, **extra))[:3]]",
        ]
    judge = (
        "judge.assert_from_hidden_gradient(grads, h_s, W_s, h_t, W_t, grad_output=g, **exact_kw)"
    )
    return [
        *lines,
        "want = judge.exact_hidden_gradients(h_s, W_s, h_t, W_t, grad_output=g, **exact_kw)",
        "for name, got in zip(('hidden', 'weight', 'bias'), grads):",
        "    if name in want:",
        "        print(f'got:      grad_{name}', None if got is None else show(got))",
        "        print(f'expected: grad_{name}', show(want[name][0]))",
        *_VERDICT.format(judge=judge).splitlines(),
    ]


def _teacher_lines(autograd: str | None) -> list[str]:
    lines = [
        "names = ['student_hidden', 'student_weight', 'teacher_hidden', 'teacher_weight']",
        "names += [k for k in ('student_bias', 'teacher_bias') if k in extra]",
        "values = dict(zip(names, [h_s, W_s, h_t, W_t] + [exact_kw[k] for k in names[4:]]))",
        "rest = {k: v for k, v in extra.items() if k not in names}",
        "def call(found):",
        "    return impl.from_hidden(*(found[n] for n in names[:4]), **kw, **rest, "
        "**{n: found[n] for n in names[4:]})",
        "teacher = [n for n in names if n.startswith('teacher')]",
    ]
    if autograd == "torch":
        lines += [
            "import torch",
            "leaves = {n: backend.asarray(v).requires_grad_(True) for n, v in values.items()}",
            "out = call(leaves)",
            "found = torch.autograd.grad(out, [leaves[n] for n in teacher], "
            "torch.ones_like(out), allow_unused=True)",
            "grads = {n: None if a is None else a.detach().cpu().numpy() "
            "for n, a in zip(teacher, found)}",
        ]
    else:
        lines += [
            "import jax, jax.numpy as jnp",
            "out, vjp = jax.vjp(lambda *a: call(dict(zip(names, a))), "
            "*[backend.asarray(values[n]) for n in names])",
            "grads = {n: np.asarray(a) for n, a in zip(names, vjp(jnp.ones_like(out))) "
            "if n in teacher}",
        ]
    return [
        *lines,
        "print('expected: no gradient (None or zeros) for', ', '.join(teacher))",
        "print('got:     ', {n: None if a is None else show(a) for n, a in grads.items()})",
        *_VERDICT.format(judge="judge.assert_teacher_frozen(grads)").splitlines(),
    ]


def reproduction_lines(record: Any, autograd: str | None, /) -> list[str]:
    """Return the body of a from-hidden failure's reproduction snippet.

    ``record`` is the :class:`~.context.Record` of the failing call (its kind
    starts with ``'hidden'``); the snippet's head has defined ``np``,
    ``backend`` and ``impl``. It rebuilds the operands exactly, replays the
    call (or takes the gradients: ``autograd`` ``'torch'``, ``'jax'`` or None
    for ``from_hidden_backward``), prints what it got beside what is expected
    and ends with ``verdict: agrees`` or ``verdict: differs: ...``, judged by
    this module's ``assert_*`` function the property uses (the dtype included).
    """
    case = record.case
    keywords = _keywords(case)
    options = ", ".join(f"{k}={keywords[k]!r}" for k in _OPTION_KEYS)
    lines = [
        "from kldiv_spec.conformance import checks_hidden as judge",
        f"h_s = {_literal(case.input)}  # the student's hidden states",
        f"W_s = {_literal(case.extra['student_weight'])}  # the student's weight (V, H)",
        f"h_t = {_literal(case.target)}  # the teacher's hidden states",
        f"W_t = {_literal(case.extra['teacher_weight'])}",
    ]
    for name, short in (("student_bias", "b_s"), ("teacher_bias", "b_t")):
        value = keywords.get(name)
        lines.append(f"{short} = {'None' if value is None else _literal(value)}")
    mask = keywords.get("mask")
    lines += [
        f"mask = {'None' if mask is None else _literal(mask)}  # True keeps a row",
        f"kw = dict({options})",
        "exact_kw = {**kw, **{k: v for k, v in dict(student_bias=b_s, teacher_bias=b_t, "
        "mask=mask).items() if v is not None}}",
        "extra = {k: backend.asarray(v) for k, v in exact_kw.items() "
        "if isinstance(v, np.ndarray)}",
        *_SHOW.splitlines(),
    ]
    if record.kind == "hidden_gradient":
        return lines + _gradient_lines(record, autograd)
    if record.kind == "hidden_teacher":
        return lines + _teacher_lines(autograd)
    return lines + _forward_lines(record.kind)
