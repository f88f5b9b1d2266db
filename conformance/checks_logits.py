r"""Properties of the KL divergence from logits: the calls, the judgements, the diagnosis.

They check an :class:`~.implementations.Implementation`'s ``from_logits``
function (``--impl reference``: ``kldiv_spec``'s own; ``kldiv-spec check --impl
MODULE:FUNCTION --kind from-logits``: a user's) on the cases of
:mod:`.logits_cases`, which are built within what the implementation declares
it can express (``logits_reductions``, ``logits_directions``,
``logits_scalings``, ``logits_temperature``, ``logits_masks``, ...): a case that
needs more is not drawn, and a property with no expressible case is n/a.
Without the function the properties are n/a.

Values are judged against the mpmath oracle of :mod:`.oracle_logits` and its
bounds. Where behaviour is discrete (the options: temperature scaling,
direction, reduction, mask; the edge values) the cases are fixed, so a bug there
fails on every seed; hypothesis draws the logits. A failing value is compared
with what common mistakes give (the other direction, a missing or extra
:math:`T^2`, the cross-entropy :math:`-\sum_i p_i \log q_i` instead of the KL,
masked rows counted in a divisor) and the message names the one it matches.

``beta`` (the generalised Jensen-Shannon divergence) is passed only to an
implementation that declares ``logits_beta``: 0 and 1 must be exactly the
forward and the reverse KL (trl's and Liger's convention) and the mixture in
between; a failing value is also compared with the mixture's weights swapped;
``"beta"`` is then one of the options a reproduction replays.

Levels: PyTorch is the behavioural reference. What its own functions composed
give, ``T**2 * kl_div(log_softmax(s / T), softmax(t / T))`` with a mask treated
as ``ignore_index`` treats dropped targets, is MUST: the MUST properties accept
the composition's NaN where both distributions exclude a class (``0 * inf``)
and for a fully masked mean (``0/0``), and 0 up to the bound at ``s == t``. The
stricter guarantees of ``kl_div_from_logits`` (exactly 0 at identity, 0 in
those two places) are the SHOULD properties ``math.logits_exact_zero_at_identity``,
``semantics.logits_excluded_by_both`` and ``semantics.logits_fully_masked``.

Precision: the result must have the logits' floating dtype
(``semantics.logits_dtypes``, the one dtype finding); every value property
judges the values, and the hints, at the precision the result has (its dtype,
or a declared ``compute_dtype``), the gradient properties at that of the
forward result. A result that is not an array of the backend with the expected
shape fails naming what came back (:func:`check_result`); the operands must be
unchanged (``hygiene.logits_inputs_unmodified``).

The ``assert_*`` functions are the judgements the properties make; the
reproduction snippets of failures call them too, with their defaults: the
strict judgement (the SHOULD guarantees) and the dtype checked, so that a
SHOULD or a dtype failure replays as a difference. The helpers of the first
section (:func:`check_result`, :func:`compare_values`, :func:`describe`, ...)
serve the Gaussian KL's properties (:mod:`.checks_gaussian`) and the
from-hidden ones (:mod:`.checks_hidden`) too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from typing import Any

import numpy as np

import kldiv_spec

from . import oracle_logits as oracle
from .assertions import dtype_name, to_numpy
from .context import Context, fmt
from .logits_cases import (
    OPTION_KEYS,
    as_declared,
    axis_cases,
    composition_gradient_nan_cases,
    composition_teacher_gradient_nan_cases,
    dtype_cases,
    edge_cases,
    excluded_by_both_cases,
    fully_masked_cases,
    gradient_edge_cases,
    gradient_option_cases,
    identity_cases,
    logits_case,
    logits_strategy,
    option_cases,
    options_of,
    undeclared,
    unexpressible,
)
from .properties import NotApplicable, register
from .strategies import Case

__all__ = [
    # OPTION_KEYS and undeclared are logits_cases', named here too for the reproductions
    # (runner) and checks_hidden
    "OPTION_KEYS",
    "assert_composition",
    "assert_from_logits",
    "assert_from_logits_gradient",
    "assert_from_logits_non_negative",
    "assert_from_logits_zero",
    "assert_unchanged",
    "check_result",
    "compare_values",
    "compose",
    "composition_kl_div",
    "describe",
    "failure_message",
    "grad_output",
    "gradient_precision",
    "needs_function",
    "require_function",
    "undeclared",
]


# --------------------------------------------------------------------------- helpers


def require_function(ctx: Context, subject: str) -> Any:
    """Return the implementation's ``subject`` function; NotApplicable if it has none."""
    fn = ctx.impl.function(subject)
    if fn is None:
        raise NotApplicable(f"{ctx.impl.name} has no {subject} function")
    return fn


def needs_function(subject: str) -> Any:
    """Return a property's ``applies``: n/a when the implementation has no ``subject``."""

    def applies(ctx: Context) -> str | None:
        return None if ctx.impl.function(subject) is not None else f"no {subject} function"

    return applies


def grad_output(case: Case) -> Any:
    """Return the upstream gradient of ``case``'s result: 0.75, or 0.5, 1.5, 2.5, ... ('none')."""
    if case.extra["reduction"] != "none":
        return 0.75
    shape = case.input.shape
    return (0.5 + (np.arange(math.prod(shape)) % 3)).reshape(shape).astype(case.input.dtype)


def assert_unchanged(be: Any, operands: list[tuple[str, Any, np.ndarray]], fn: str) -> None:
    """Assert each backend operand still holds its original values (NaN equal to NaN)."""
    for name, arr, orig in operands:
        now = np.asarray(be.to_numpy(arr))
        if now.shape != orig.shape or not np.array_equal(
            now, orig, equal_nan=orig.dtype.kind == "f"
        ):
            msg = f"the call of {fn} modified its {name}"
            raise AssertionError(msg)


def _skip_unsupported(ctx: Context, case: Case) -> None:
    """Raise NotApplicable for this case alone when the implementation cannot express it."""
    why = unexpressible(ctx, case.extra)
    if why is not None:
        raise NotApplicable(f"{ctx.impl.name} cannot express {why}")


def describe(case: Case, /) -> str:
    """Return a from-logits or Gaussian case's options and operands, for reports."""
    options = {k: v for k, v in case.extra.items() if not isinstance(v, np.ndarray)}
    arrays = {k: v.tolist() for k, v in case.extra.items() if isinstance(v, np.ndarray)}
    shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
    extra = "".join(f", {k}={v!r}" for k, v in arrays.items())
    return (
        f"{case.input.dtype}{list(case.input.shape)}, {shown}{extra}"
        f"\n  input = {case.input.tolist()!r}\n  target = {case.target.tolist()!r}"
    )


def check_result(ctx: Context, out: Any, shape: tuple[int, ...], /, what: str = "") -> None:
    """Assert ``out`` is an array of the backend with ``shape``; name what came back if not.

    Raises AssertionError such as ``from_logits: returned a tuple, expected a
    numpy array of shape (1,)`` or ``returned shape (2,), expected shape ()``,
    before any of the suite's code reshapes or reads the result (see
    :meth:`.context.Context.check_result`).
    """
    try:
        ctx.check_result(out, shape)
    except AssertionError as exc:
        msg = f"{what}: {exc}" if what else str(exc)
        raise AssertionError(msg) from None


def _numpy_result(ctx: Context, out: Any) -> np.ndarray:
    """Return the result's values as NumPy, in its own dtype (float32 for bfloat16)."""
    try:
        return np.asarray(ctx.backend.to_numpy(out))
    except TypeError:  # a dtype NumPy lacks (bfloat16)
        return to_numpy(out).astype(np.float32)


def _call_logits(ctx: Context, case: Case, x: Any, t: Any, mask: Any) -> Any:
    """Call ``from_logits`` on backend arrays ``x``, ``t`` (and ``mask``): ``case``'s options."""
    fn = require_function(ctx, "from_logits")
    _skip_unsupported(ctx, case)
    options = options_of(case)
    if mask is not None:
        options["mask"] = mask
    try:
        with warnings.catch_warnings(record=True):  # a composition's 'mean' UserWarning
            warnings.simplefilter("always")
            out = fn(x, t, **options)
    except NotImplementedError as exc:
        # the implementation says it does not offer this option (a mask, 'rowmean', ...)
        raise NotApplicable(f"{ctx.impl.name} does not implement {options}: {exc}") from None
    shape = case.input.shape if case.extra["reduction"] == "none" else ()
    check_result(ctx, out, shape, "from_logits")
    return out


def _call(ctx: Context, case: Case, /, kind: str = "logits") -> np.ndarray:
    """Call ``from_logits`` on ``case``; return the result as NumPy in the result's dtype."""
    ctx.record(case, kind)
    be = ctx.backend
    mask = case.extra.get("mask")
    out = _call_logits(
        ctx,
        case,
        be.asarray(case.input),
        be.asarray(case.target),
        None if mask is None else be.asarray(mask),
    )
    return _numpy_result(ctx, out)


def _exact(s: np.ndarray, t: np.ndarray, mask: Any, options: dict[str, Any]) -> Any:
    return oracle.from_logits(s, t, mask=mask, **options)


def _precision(got: Any, operands: np.dtype, compute_dtype: Any = None) -> np.dtype:
    """Return the dtype whose bounds judge ``got``.

    The least precise of the operands' dtype, the result's own (when it is a
    floating dtype) and a declared ``compute_dtype``.
    """
    candidates = [np.dtype(operands)]
    dtype = getattr(got, "dtype", None)
    if dtype is not None and np.dtype(dtype).kind == "f":
        candidates.append(np.dtype(dtype))
    if compute_dtype is not None:
        candidates.append(np.dtype(dtype_name(compute_dtype)))
    return min(candidates, key=lambda d: (d.itemsize, d.name))


def _at(exact: Any, dtype: np.dtype) -> Any:
    """Return ``exact`` with its bounds those of ``dtype`` when that is less precise."""
    if np.dtype(dtype).itemsize < np.dtype(exact.dtype).itemsize:
        return dataclasses.replace(exact, dtype=np.dtype(dtype))
    return exact


def _want(exact: Any, reduction: str) -> tuple[np.ndarray, Any]:
    if reduction == "none":
        return exact.terms, oracle.pointwise_tolerance(exact)
    value, tol = oracle.reduce_logits(exact)
    return np.asarray(value), np.asarray(tol)


def failure_message(head: str, what: str, *shown: tuple[str, Any]) -> str:
    """Return ``head: <what's first line>``, then the arrays ``shown``, then the rest of ``what``.

    The first line is the report's reason: it holds what differs and the
    options, whatever the size of the arrays.
    """
    first, _, rest = what.partition("\n")
    lines = [f"{head}: {first}"]
    lines += [f"  {name:<8} {fmt(np.asarray(a))}" for name, a in shown]
    return "\n".join(lines) + ("\n" + rest if rest else "")


def compare_values(
    got: Any, want: np.ndarray, tol: Any, what: str, hint: str = "", nan_ok: Any = None
) -> None:
    """Compare values: the NaN/inf pattern exactly, finite values within ``tol``.

    Where ``nan_ok`` is True a NaN is accepted in place of the expected value
    (PyTorch's composition gives NaN there; see ``oracle_logits.composition_nan``).
    The message (:func:`failure_message`) names ``what`` and ends with ``hint``.
    """
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        msg = f"shape {got.shape}, expected {want.shape}: {what}"
        raise AssertionError(msg)
    if nan_ok is not None:
        accepted = np.broadcast_to(np.asarray(nan_ok, bool), got.shape) & np.isnan(got)
        if accepted.any():
            got = np.where(accepted, want, got)
    with np.errstate(invalid="ignore"):
        infinite = np.isinf(want)
        same_special = np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(
            got[infinite], want[infinite]
        )
        finite = np.isfinite(want)
        err = np.where(finite, np.abs(got - want), 0.0)
    if not same_special:
        head = f"NaN/inf pattern differs{hint}"
        raise AssertionError(failure_message(head, what, ("got", got), ("expected", want)))
    bound = np.broadcast_to(tol, err.shape)
    bad = finite & ~(err <= bound)
    if bad.any():
        worst = int(np.argmax(np.where(bad, err, -1.0)))
        head = (
            f"{int(bad.sum())} of {bad.size} value(s) off, by up to {err.flat[worst]:.6g} "
            f"(bound {bound.flat[worst]:.3g}){hint}"
        )
        shown = (("got", got[bad]), ("expected", want[bad]), ("error", err[bad]))
        raise AssertionError(failure_message(head, what, *shown))


def _what(s: np.ndarray, t: np.ndarray, mask: Any, options: dict[str, Any]) -> str:
    return describe(logits_case(s, t, mask=mask, **options))


def _check_dtype(got: Any, input: np.ndarray, target: np.ndarray, what: str) -> None:
    """Assert the result has the operands' floating dtype (when ``got`` carries a dtype)."""
    dtype = getattr(got, "dtype", None)
    if dtype is None:
        return
    want = np.result_type(input.dtype, target.dtype).name
    if dtype_name(dtype) != want:
        head = f"result dtype {dtype_name(dtype)}, expected {want} (the logits' dtype)"
        raise AssertionError(failure_message(head, what))


# --------------------------------------------------------------------------- diagnosis


def _softmax64(z: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Return float64 (p, log p) of ``softmax(z / T)`` along the last axis (NaN rows kept)."""
    with np.errstate(all="ignore"):
        a = z.astype(np.float64) / temperature
        m = np.max(a, axis=-1, keepdims=True)
        shifted = a - m
        logp = shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
        return np.exp(logp), logp


def _alternatives(
    s: np.ndarray, t: np.ndarray, mask: Any, options: dict[str, Any]
) -> list[tuple[str, np.ndarray]]:
    """Return what common mistakes give for this call: ``(name, value)`` pairs."""
    if options.get("beta") is not None:
        return _jsd_alternatives(s, t, mask, options)
    reduction, temperature = options["reduction"], options["temperature"]
    scaled = options["scale_by_temperature_squared"]
    out = []
    other = "reverse" if options["direction"] == "forward" else "forward"
    out.append((f"direction={other!r} (the other KL)", {**options, "direction": other}, mask))
    if temperature != 1.0:
        name = "without the T**2 factor" if scaled else "with a T**2 factor"
        out.append((name, {**options, "scale_by_temperature_squared": not scaled}, mask))
    found = []
    for name, opts, m in out:
        try:
            found.append((name, _want(_exact(s, t, m, opts), reduction)[0]))
        except Exception:
            continue
    exact = _exact(s, t, mask, options)
    k = temperature**2 if scaled else 1.0
    weights, log_weights = _softmax64(t if options["direction"] == "forward" else s, temperature)
    with np.errstate(all="ignore"):
        entropy = -np.where(weights > 0, weights * log_weights, 0.0) * k
    if mask is not None:
        rows = np.broadcast_to(np.asarray(mask, bool), s.shape[:-1])
        entropy = np.where(rows[..., None], entropy, 0.0)
    cross = exact.terms + entropy
    name = "the cross-entropy -sum(p * log q), not the KL (it adds the entropy of p)"
    if options["direction"] == "reverse":
        name = "the cross-entropy -sum(q * log p), not the KL (it adds the entropy of q)"
    d = exact.total[1]
    if reduction == "none":
        found.append((name, cross))
    elif d:
        found.append((name, np.asarray(math.fsum(cross.ravel()) / d)))
    if mask is not None and reduction in ("batchmean", "rowmean", "mean") and d:
        unmasked = _exact(s, t, None, {**options, "reduction": reduction}).total[1]
        total = float(exact.total[0])
        found.append(("masked rows counted in the divisor", np.asarray(total / unmasked)))
    return found


def _jsd_alternatives(
    s: np.ndarray, t: np.ndarray, mask: Any, options: dict[str, Any]
) -> list[tuple[str, np.ndarray]]:
    """Return what common mistakes give for a call with ``beta``: ``(name, value)`` pairs.

    The two KLs (``beta`` taken for an endpoint, or ignored), the mixture's
    weights swapped (``1 - beta``), and the :math:`T^2` factor left out or added.
    """
    beta = float(options["beta"])
    plain = {k: v for k, v in options.items() if k != "beta"}
    out = [
        ("the forward KL (beta treated as the endpoint 0)", {**plain, "direction": "forward"}),
        ("the reverse KL (beta treated as the endpoint 1)", {**plain, "direction": "reverse"}),
    ]
    if 0.0 < beta < 1.0:
        name = "beta and 1 - beta swapped (the teacher's and the student's weights)"
        out.append((name, {**options, "beta": 1 - beta}))
    if options["temperature"] != 1.0:
        scaled = options["scale_by_temperature_squared"]
        name = "without the T**2 factor" if scaled else "with a T**2 factor"
        out.append((name, {**options, "scale_by_temperature_squared": not scaled}))
    found = []
    for name, opts in out:
        try:
            found.append((name, _want(_exact(s, t, mask, opts), options["reduction"])[0]))
        except Exception:
            continue
    if beta in (0.0, 1.0):
        zero = np.zeros(s.shape if options["reduction"] == "none" else ())
        found.append(("0, the mixture's formula at an endpoint (not the KL there)", zero))
    else:
        name = "the mixture with beta and 1 - beta swapped, (1 - beta) p + beta q"
        found.append((name, _swapped_mixture(s, t, mask, options)))
    return found


def _swapped_mixture(
    s: np.ndarray, t: np.ndarray, mask: Any, options: dict[str, Any]
) -> np.ndarray:
    """Return, in float64, the divergence with the mixture's weights swapped (the rest kept)."""
    beta, temperature = float(options["beta"]), options["temperature"]
    p, log_p = _softmax64(t, temperature)
    q, log_q = _softmax64(s, temperature)
    with np.errstate(all="ignore"):
        log_m = np.log((1.0 - beta) * p + beta * q)
        terms = beta * np.where(p > 0, p * (log_p - log_m), 0.0) + (1.0 - beta) * np.where(
            q > 0, q * (log_q - log_m), 0.0
        )
    terms = terms * (temperature**2 if options["scale_by_temperature_squared"] else 1.0)
    if mask is not None:
        rows = np.broadcast_to(np.asarray(mask, bool), s.shape[:-1])
        terms = np.where(rows[..., None], terms, 0.0)
    if options["reduction"] == "none":
        return terms
    d = _exact(s, t, mask, options).total[1]
    return np.asarray(math.fsum(terms.ravel()) / d if d else math.nan)


def _hint(
    got: Any,
    s: np.ndarray,
    t: np.ndarray,
    mask: Any,
    options: dict[str, Any],
    precision: Any = None,
    tol: Any = 0.0,
) -> str:
    """Return ``' (it matches NAME)'`` when ``got`` is what a common mistake gives.

    The match is judged at ``precision`` (the dtype the result is judged in:
    by default the operands'): within 64 of its epsilons relative, plus ``tol``
    (the oracle's bound at that precision) absolute.
    """
    if options.get("axis", -1) % s.ndim != s.ndim - 1 or options.get("symmetric") is not None:
        return ""  # the alternatives take one direction, the classes on the last axis
    got = np.asarray(got, dtype=np.float64)
    dtype = np.dtype(np.result_type(s.dtype, t.dtype) if precision is None else precision)
    rtol = 64 * float(np.finfo(np.float32 if dtype.itemsize < 4 else dtype).eps)
    try:
        alternatives = _alternatives(s, t, mask, options)
    except Exception:
        return ""
    for name, value in alternatives:
        if value.shape != got.shape:
            continue
        # where the oracle's value is infinite so is its bound: no tolerance there (an
        # infinite one would make every alternative "match" a finite result)
        bound = np.asarray(tol, np.float64)
        atol = np.broadcast_to(np.where(np.isfinite(bound), bound, 0.0), got.shape)
        finite = np.isfinite(value) & np.isfinite(got)
        with np.errstate(invalid="ignore"):
            close = finite & (np.abs(got - value) <= rtol * np.abs(value) + atol)
        same = close | (np.isnan(got) & np.isnan(value)) | (got == value)
        # a match needs a number that agrees: NaN for NaN or inf for inf alone is no evidence
        if same.all() and finite.any():
            return f" (it matches {name})"
    return ""


# --------------------------------------------------------------------------- judgements


def assert_from_logits(
    got: Any,
    input: np.ndarray,
    target: np.ndarray,
    /,
    *,
    mask: Any = None,
    strict: bool = True,
    check_dtype: bool = True,
    compute_dtype: Any = None,
    **options: Any,
) -> None:
    """Assert ``got`` (the result as NumPy) agrees with the oracle within its bound.

    ``options`` are ``kl_div_from_logits``'s keywords (``reduction``,
    ``temperature``, ``direction``, ``scale_by_temperature_squared``). The
    values are judged at the precision the result has (its dtype, when less
    precise than the logits', or a declared ``compute_dtype``). ``strict``
    (``kl_div_from_logits``'s guarantees) requires 0 where both distributions
    exclude a class and for a fully masked mean; without it PyTorch's
    composition's NaN is accepted there. ``check_dtype`` then requires the
    logits' dtype. On a mismatch the message says which common mistake the
    result matches, if any.
    """
    dtype = np.result_type(input.dtype, target.dtype)
    precision = _precision(got, dtype, compute_dtype)
    exact = _at(_exact(input, target, mask, options), precision)
    reduction = options["reduction"]
    want, tol = _want(exact, reduction)
    nan_ok = None if strict else oracle.composition_nan(exact, reduction)
    what = _what(input, target, mask, options)
    try:
        compare_values(got, want, tol, what, nan_ok=nan_ok)
    except AssertionError:
        hint = _hint(got, input, target, mask, options, precision, tol)
        compare_values(got, want, tol, what, hint, nan_ok=nan_ok)
    if check_dtype:
        _check_dtype(got, input, target, what)


def assert_from_logits_zero(
    got: Any,
    input: np.ndarray,
    /,
    *,
    strict: bool = True,
    compute_dtype: Any = None,
    **options: Any,
) -> None:
    """Assert ``kl_div_from_logits(input, input)`` is 0 (every log-ratio is 0).

    ``strict``: exactly 0 (``kl_div_from_logits``'s guarantee). Otherwise 0
    within the oracle's bound at the result's precision (the rounding PyTorch's
    composition makes), NaN accepted where the composition gives NaN (a fully
    masked mean).
    """
    mask = options.pop("mask", None)
    values = np.asarray(got, dtype=np.float64)
    precision = _precision(got, input.dtype, compute_dtype)
    exact = _at(_exact(input, input, mask, options), precision)
    want, tol = _want(exact, options["reduction"])
    if strict:
        ok = bool((np.abs(values) <= 0.0).all())
    else:
        accepted = oracle.composition_nan(exact, options["reduction"]) & np.isnan(values)
        with np.errstate(invalid="ignore"):
            ok = bool((accepted | (np.abs(values - want) <= tol)).all())
    if not ok:
        with np.errstate(invalid="ignore"):
            rounding = bool((np.isnan(values) | (np.abs(values - want) <= tol)).all())
        if strict and rounding:  # within the bound: every mistake is 0 up to rounding too
            hint = " (0 up to rounding, as PyTorch's composition gives)"
        else:
            hint = _hint(values, input, input, mask, options, precision, tol)
        how = " exactly" if strict else " within the bound"
        head = f"kl_div_from_logits(s, s) is not 0{how}{hint}"
        shown = [("got", values)] if strict else [("got", values), ("bound", tol)]
        raise AssertionError(failure_message(head, _what(input, input, mask, options), *shown))


def assert_from_logits_non_negative(
    got: Any,
    input: np.ndarray,
    target: np.ndarray,
    /,
    *,
    mask: Any = None,
    strict: bool = True,
    compute_dtype: Any = None,
    **options: Any,
) -> None:
    """Assert every reduction (each row of ``'none'`` summed) is at least minus the bound.

    Without ``strict`` a NaN is accepted where PyTorch's composition gives one.
    """
    values = np.asarray(got, dtype=np.float64)
    precision = _precision(got, np.result_type(input.dtype, target.dtype), compute_dtype)
    exact = _at(_exact(input, target, mask, options), precision)
    nan_ok = oracle.composition_nan(exact, options["reduction"])
    if options["reduction"] == "none":
        lows = values.sum(axis=-1)
        tol = oracle.pointwise_tolerance(exact).sum(axis=-1)
        nan_ok = nan_ok.any(axis=-1)
    else:
        lows, tol = values.reshape(1), np.asarray([oracle.reduce_logits(exact)[1]])
        nan_ok = nan_ok.reshape(1)
    ok = lows >= -tol
    if not strict:
        ok |= nan_ok & np.isnan(lows)
    if not ok.all():
        hint = _hint(
            values, input, target, mask, options, precision, _want(exact, options["reduction"])[1]
        )
        head = f"negative divergence{hint}"
        what = _what(input, target, mask, options)
        raise AssertionError(failure_message(head, what, ("got", lows), ("bound", -tol)))


def _log_softmax(a: np.ndarray) -> np.ndarray:
    m = a.max(axis=-1, keepdims=True)
    return (a - m) - np.log(np.exp(a - m).sum(axis=-1, keepdims=True))


def _kl_div_reduction(reduction: str) -> str:
    """``kl_div``'s reduction for a from-logits one: 'rowmean' of 2-d logits is 'batchmean'."""
    return "batchmean" if reduction == "rowmean" else reduction


def compose(
    kl_div: Any, backend: Any, input: np.ndarray, target: np.ndarray, /, **options: Any
) -> np.ndarray:
    """Return ``k * kl_div(log_softmax(input / T), softmax(target / T))`` as float64 NumPy.

    ``kl_div`` is an implementation's ``kl_div`` (PyTorch's signature) on
    ``backend``'s arrays; ``k`` is :math:`T^2` or 1 as ``options`` say. For 2-d
    logits ``'rowmean'`` is composed as ``'batchmean'`` (the same divisor).
    """
    temp = options["temperature"]
    k = temp * temp if options["scale_by_temperature_squared"] else 1.0
    with np.errstate(all="ignore"):
        log_q = _log_softmax(input.astype(np.float64) / temp).astype(input.dtype)
        p = np.exp(_log_softmax(target.astype(np.float64) / temp)).astype(input.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the 'mean' warning
        composed = kl_div(
            backend.asarray(log_q),
            backend.asarray(p),
            reduction=_kl_div_reduction(options["reduction"]),
        )
    return np.asarray(backend.to_numpy(composed), dtype=np.float64) * k


def assert_composition(
    got: Any,
    composed: Any,
    input: np.ndarray,
    target: np.ndarray,
    /,
    *,
    compute_dtype: Any = None,
    **options: Any,
) -> None:
    """Assert ``got`` equals the composition :func:`compose` gave within the bound.

    The bound is that of the result's precision (see :func:`assert_from_logits`).
    """
    temp = options["temperature"]
    k = temp * temp if options["scale_by_temperature_squared"] else 1.0
    with np.errstate(all="ignore"):
        log_q = _log_softmax(input.astype(np.float64) / temp)
        p = np.exp(_log_softmax(target.astype(np.float64) / temp))
    precision = _precision(got, input.dtype, compute_dtype)
    exact = _at(_exact(input, target, None, options), precision)
    eps = float(np.finfo(precision).eps)
    # the composition's own xlogy(p, p) - p log q cancels: allow its scale too
    if options["reduction"] == "none":
        tol = 2 * oracle.pointwise_tolerance(exact) + 8 * eps * k * np.abs(p * log_q)
    else:
        tol = 2 * oracle.reduce_logits(exact)[1] + 8 * eps * k * float(np.abs(p * log_q).sum())
    what = f"against the composition, {_what(input, target, None, options)}"
    composed = np.asarray(composed, dtype=np.float64)
    try:
        compare_values(got, composed, tol, what)
    except AssertionError:
        hint = _hint(got, input, target, None, options, precision, tol)
        compare_values(got, composed, tol, what, hint)


def assert_from_logits_gradient(
    grad: Any,
    input: np.ndarray,
    target: np.ndarray,
    /,
    *,
    grad_output: Any,
    mask: Any = None,
    compute_dtype: Any = None,
    strict: bool = True,
    teacher: bool = False,
    **options: Any,
) -> None:
    """Assert a gradient w.r.t. the student (or teacher) logits agrees with the oracle's.

    The bound is that of the gradient's precision (its dtype, or ``compute_dtype``).
    Without ``strict`` a NaN is accepted where PyTorch's composition gives one
    (:func:`oracle_logits.composition_gradient_nan`). ``teacher``: ``grad`` is the
    gradient w.r.t. the teacher logits (:func:`oracle_logits.composition_teacher_gradient_nan`).
    """
    exact = oracle.from_logits(input, target, grad_output=grad_output, mask=mask, **options)
    precision = _precision(grad, np.result_type(input.dtype, target.dtype), compute_dtype)
    tol_s, tol_t = oracle.gradient_tolerance(_at(exact, precision))
    who = "teacher" if teacher else "student"
    what = f"gradient w.r.t. the {who} logits, {_what(input, target, mask, options)}"
    nan_rule = (
        oracle.composition_teacher_gradient_nan if teacher else oracle.composition_gradient_nan
    )
    nan_ok = None if strict else nan_rule(exact)
    want, tol = (exact.grad_target, tol_t) if teacher else (exact.grad_input, tol_s)
    compare_values(grad, want, tol, what, nan_ok=nan_ok)


# --------------------------------------------------------------------------- from logits


def _compute_dtype(ctx: Context) -> Any:
    """Return the dtype the implementation declares it computes in (``compute_dtype``)."""
    return getattr(ctx.impl, "compute_dtype", None)


def gradient_precision(ctx: Context) -> Any:
    """Return the dtype a gradient is judged at besides its own: the least precise declared.

    The implementation's ``compute_dtype`` and the dtype of the forward's result (read
    after the gradient was taken): a float32 loss of float64 logits has a float64
    gradient (autograd casts it back) computed in float32. None if neither is known.
    """
    declared = [_compute_dtype(ctx), ctx.result_dtype]
    found = [np.dtype(dtype_name(d)) for d in declared if d is not None]
    return min(found, key=lambda d: d.itemsize) if found else None


def _check_value(ctx: Context, case: Case, /, *, strict: bool = False) -> None:
    """Judge one call's values at the precision of its result.

    Without ``strict`` (MUST) PyTorch's composition's NaN is accepted where it
    differs; the dtype is ``semantics.logits_dtypes``' finding, not this one's.
    """
    got = _call(ctx, case)
    assert_from_logits(
        got,
        case.input,
        case.target,
        mask=case.extra.get("mask"),
        strict=strict,
        check_dtype=False,
        compute_dtype=_compute_dtype(ctx),
        **options_of(case),
    )


@register(
    "accuracy.logits_oracle",
    "kl_div_from_logits agrees with the exact (mpmath) oracle within its bound, every option",
    strategy=logits_strategy,
    applies=needs_function("from_logits"),
    examples_scale=0.5,
    subject="from_logits",
)
def _logits_oracle(ctx: Context, case: Case) -> None:
    _check_value(ctx, case)


@register(
    "accuracy.logits_options",
    "the options on fixed logits (every pair of direction, T**2 on/off, reduction, mask; "
    "float32; 3-d): the oracle's value",
    cases=option_cases,
    applies=needs_function("from_logits"),
    subject="from_logits",
)
def _logits_options(ctx: Context, case: Case) -> None:
    _check_value(ctx, case)


@register(
    "math.logits_zero_at_identity",
    "kl_div_from_logits(s, s) is 0 within the oracle's bound in both directions (PyTorch's "
    "composition rounds; a fully masked mean may be its 0/0 = NaN)",
    strategy=logits_strategy,
    applies=needs_function("from_logits"),
    examples_scale=0.5,
    subject="from_logits",
)
def _logits_zero(ctx: Context, case: Case) -> None:
    same = Case(case.input, case.input.copy(), case.reduction, False, extra=case.extra)
    got = _call(ctx, same, "logits_zero")
    assert_from_logits_zero(
        got,
        same.input,
        mask=case.extra.get("mask"),
        strict=False,
        compute_dtype=_compute_dtype(ctx),
        **options_of(case),
    )


@register(
    "math.logits_exact_zero_at_identity",
    "kl_div_from_logits(s, s) is exactly 0, not 0 up to rounding (every log-ratio is 0; "
    "PyTorch's composition gives about -1e-16)",
    cases=identity_cases,
    applies=needs_function("from_logits"),
    level="SHOULD",
    subject="from_logits",
)
def _logits_exact_zero(ctx: Context, case: Case) -> None:
    got = _call(ctx, case, "logits_zero")
    assert_from_logits_zero(got, case.input, mask=case.extra.get("mask"), **options_of(case))


@register(
    "math.logits_non_negative",
    "every reduction of kl_div_from_logits (and each row of 'none' summed) is >= -bound",
    strategy=logits_strategy,
    applies=needs_function("from_logits"),
    examples_scale=0.5,
    subject="from_logits",
)
def _logits_non_negative(ctx: Context, case: Case) -> None:
    got = _call(ctx, case, "logits_non_negative")
    assert_from_logits_non_negative(
        got,
        case.input,
        case.target,
        mask=case.extra.get("mask"),
        strict=False,
        compute_dtype=_compute_dtype(ctx),
        **options_of(case),
    )


def composition_kl_div(impl: Any) -> Any:
    """Return the ``kl_div`` the composition uses: the implementation's, else the reference's."""
    if impl.fn is not None:
        return impl.fn
    return kldiv_spec.kl_div


@register(
    "math.logits_composition",
    "kl_div_from_logits equals T**2 * kl_div(log_softmax(s/T), softmax(t/T)) of the same "
    "implementation (kldiv_spec.kl_div if it has none; no mask, forward)",
    strategy=logits_strategy,
    applies=needs_function("from_logits"),
    examples_scale=0.5,
    subject="from_logits",
)
def _logits_composition(ctx: Context, case: Case) -> None:
    reduction = case.extra["reduction"]
    if "forward" not in ctx.impl.logits_directions:
        raise NotApplicable(f"{ctx.impl.name} has no forward direction")
    if ctx.impl.fn is not None and _kl_div_reduction(reduction) not in ctx.reductions:
        raise NotApplicable(f"{ctx.impl.name} cannot express reduction {reduction!r}")
    options = {**options_of(case), "direction": "forward"}
    options.pop("beta", None)  # the composition is the KL's
    plain = as_declared(ctx, logits_case(case.input, case.target, **options))
    if unexpressible(ctx, plain.extra) is not None:
        raise NotApplicable(f"{ctx.impl.name} cannot express {options}")
    got = _call(ctx, plain, "logits_composition")
    composed = compose(
        composition_kl_div(ctx.impl), ctx.backend, case.input, case.target, **options
    )
    assert_composition(
        got, composed, case.input, case.target, compute_dtype=_compute_dtype(ctx), **options
    )


@register(
    "semantics.logits_edge_values",
    "excluded classes (-inf), rows without a softmax (NaN, +inf, all -inf), masked rows, "
    "every reduction fully masked, large float32 logits, one class (PyTorch's composition's "
    "NaN accepted where both distributions exclude a class and for a fully masked mean)",
    cases=edge_cases,
    applies=needs_function("from_logits"),
    subject="from_logits",
)
def _logits_edges(ctx: Context, case: Case) -> None:
    _check_value(ctx, case)


@register(
    "semantics.logits_excluded_by_both",
    "a class both distributions exclude contributes exactly 0 (PyTorch's composition: "
    "0 * inf = NaN), in 'none' and every reduction",
    cases=excluded_by_both_cases,
    applies=needs_function("from_logits"),
    level="SHOULD",
    subject="from_logits",
)
def _logits_excluded_by_both(ctx: Context, case: Case) -> None:
    _check_value(ctx, case, strict=True)


@register(
    "semantics.logits_fully_masked",
    "every row masked gives 0 for every reduction, the empty sum over no tokens (PyTorch's "
    "ignore_index means: 0/0 = NaN for 'batchmean', 'rowmean', 'mean')",
    cases=fully_masked_cases,
    applies=needs_function("from_logits"),
    level="SHOULD",
    subject="from_logits",
)
def _logits_fully_masked(ctx: Context, case: Case) -> None:
    _check_value(ctx, case, strict=True)


@register(
    "semantics.logits_dtypes",
    "the result has the logits' floating dtype (float64 in, float64 out: not a float32 "
    "result); its values are then judged at the precision the result has",
    cases=dtype_cases,
    applies=needs_function("from_logits"),
    subject="from_logits",
)
def _logits_dtypes(ctx: Context, case: Case) -> None:
    got = _call(ctx, case)
    what = _what(case.input, case.target, case.extra.get("mask"), options_of(case))
    _check_dtype(got, case.input, case.target, what)


@register(
    "hygiene.logits_inputs_unmodified",
    "from_logits (and its backward) leave the student and teacher logits and the mask unchanged",
    strategy=logits_strategy,
    applies=needs_function("from_logits"),
    examples_scale=0.5,
    subject="from_logits",
)
def _logits_unmodified(ctx: Context, case: Case) -> None:
    be = ctx.backend
    mask = case.extra.get("mask")
    x, t = be.asarray(case.input), be.asarray(case.target)
    m = None if mask is None else be.asarray(mask)
    ctx.record(case, "logits")
    _call_logits(ctx, case, x, t, m)
    backward = ctx.impl.from_logits_backward
    if backward is not None and not be.autograd:
        options = options_of(case)
        if m is not None:
            options["mask"] = m
        g = grad_output(case)
        backward(g if np.ndim(g) == 0 else be.asarray(np.asarray(g)), x, t, **options)
    operands = [("student logits", x, case.input), ("teacher logits", t, case.target)]
    if m is not None:
        operands.append(("mask", m, mask))
    assert_unchanged(be, operands, "from_logits")


def _logits_gradient(ctx: Context, case: Case, g: Any, teacher: bool = False) -> np.ndarray:
    with warnings.catch_warnings(record=True):  # a composition's 'mean' UserWarning
        warnings.simplefilter("always")
        return _take_logits_gradient(ctx, case, g, teacher)


def _forward_dtype(ctx: Context, case: Case, out: Any) -> None:
    """Check the forward result of a gradient call and keep its dtype in ``ctx.result_dtype``."""
    shape = case.input.shape if case.extra["reduction"] == "none" else ()
    check_result(ctx, out, shape, "from_logits")
    dtype = np.dtype(dtype_name(out.dtype)) if dtype_name(out.dtype) != "bfloat16" else None
    ctx.result_dtype = dtype if dtype is not None and dtype.kind == "f" else None


def _take_logits_gradient(ctx: Context, case: Case, g: Any, teacher: bool) -> np.ndarray:
    """Return the gradient w.r.t. the student logits, or the teacher's (``teacher``).

    Through the backend's autograd (both logits differentiable) or the declared
    backward. An implementation that gives the teacher no gradient (autograd's
    None, from JAX a zero gradient everywhere where the exact one is not, a
    backward's None) treats the teacher as a constant: its teacher properties are
    n/a.
    """
    ctx.result_dtype = None
    fn = require_function(ctx, "from_logits")
    _skip_unsupported(ctx, case)
    be = ctx.backend
    ctx.record(case, "logits_teacher_gradient" if teacher else "logits_gradient", grad=g)
    options = options_of(case)
    if case.extra.get("mask") is not None:
        options["mask"] = be.asarray(case.extra["mask"])
    constant = NotApplicable(f"{ctx.impl.name} gives the teacher logits no gradient")
    try:
        if be.autograd == "torch" and ctx.impl.differentiable:
            import torch

            x = be.asarray(case.input).requires_grad_(True)
            t = be.asarray(case.target).requires_grad_(teacher)
            out = fn(x, t, **options)
            _forward_dtype(ctx, case, out)
            gout = torch.as_tensor(np.asarray(g), dtype=out.dtype, device=out.device)
            wrt = (x, t) if teacher else (x,)
            grads = torch.autograd.grad(out, wrt, gout.expand(out.shape), allow_unused=True)
            if grads[-1] is None:
                raise constant
            return np.asarray(grads[-1].detach().cpu().numpy())
        if be.autograd == "jax" and ctx.impl.differentiable:
            import jax
            import jax.numpy as jnp

            out, vjp = jax.vjp(
                lambda a, b: fn(a, b, **options), be.asarray(case.input), be.asarray(case.target)
            )
            _forward_dtype(ctx, case, out)
            gx, gt = vjp(jnp.broadcast_to(jnp.asarray(g, dtype=out.dtype), out.shape))
            if teacher and not np.any(np.asarray(gt)) and _teacher_moves(case, g):
                raise constant  # stop_gradient, as far as a zero gradient can tell
            return np.asarray(gt if teacher else gx)
        backward = ctx.impl.from_logits_backward
        if backward is None:
            raise NotApplicable(f"{ctx.impl.name} has no from-logits backward on {be.name}")
        gb = g if isinstance(g, float) else be.asarray(np.asarray(g))
        grads = backward(gb, be.asarray(case.input), be.asarray(case.target), **options)
        grad = grads[1] if teacher else grads[0]
        if grad is None:
            raise constant
    except NotImplementedError as exc:
        raise NotApplicable(f"{ctx.impl.name} does not implement {options}: {exc}") from None
    return _numpy_result(ctx, grad)


def _teacher_moves(case: Case, g: Any) -> bool:
    """Whether the exact teacher gradient of ``case`` is nonzero somewhere."""
    exact = oracle.from_logits(
        case.input, case.target, grad_output=g, mask=case.extra.get("mask"), **options_of(case)
    )
    return bool(np.any(np.asarray(exact.grad_target) != 0))


def _check_gradient(
    ctx: Context, case: Case, *, strict: bool = False, teacher: bool = False
) -> None:
    """Judge one call's student (or ``teacher``) gradient against the oracle.

    Without ``strict`` (MUST) PyTorch's composition's NaN is accepted where it
    differs (:func:`oracle_logits.composition_gradient_nan`: a class the weighting
    side excludes, or whose probability rounds to 0 at the working precision, e.g.
    float32 logits 200 apart); ``strict`` (the SHOULD properties) wants the
    specification's number there.
    """
    g = grad_output(case)
    got = _logits_gradient(ctx, case, g, teacher)
    assert_from_logits_gradient(
        got,
        case.input,
        case.target,
        grad_output=g,
        mask=case.extra.get("mask"),
        compute_dtype=gradient_precision(ctx),
        strict=strict,
        teacher=teacher,
        **options_of(case),
    )


@register(
    "gradients.logits_oracle",
    "the gradient w.r.t. the student logits agrees with the exact oracle within its bound "
    "(PyTorch's composition's NaN accepted across a row where a probability of the "
    "weighting side is 0 or rounds to 0, e.g. float32 logits 200 apart in reverse; "
    "gradients.logits_edge_numbers asks for the number)",
    strategy=logits_strategy,
    applies=needs_function("from_logits"),
    examples_scale=0.5,
    subject="from_logits",
)
def _logits_gradients(ctx: Context, case: Case) -> None:
    _check_gradient(ctx, case)


@register(
    "gradients.logits_edge_values",
    "the student gradient on the edge values: NaN in rows without a softmax, 0 in masked "
    "rows, 0 at a class the weighting side excludes, also where the loss is +inf "
    "(PyTorch's composition's NaN accepted in rows where the student excludes a class, in "
    "reverse or with beta inside (0, 1), and in dropped rows without a softmax or, in "
    "reverse, with a class the teacher excludes)",
    cases=gradient_edge_cases,
    applies=needs_function("from_logits"),
    subject="from_logits",
)
def _logits_edge_gradients(ctx: Context, case: Case) -> None:
    _check_gradient(ctx, case)


def _teacher_cases(ctx: Context) -> list[Case]:
    """Return the fixed option cases and the edge cases that are not fully masked.

    Either set alone may be n/a (a function without a temperature expresses no
    option case, and still every edge case at T = 1).
    """
    cases: list[Case] = []
    for make in (gradient_option_cases, gradient_edge_cases):
        with contextlib.suppress(NotApplicable):
            cases += make(ctx)
    if not cases:
        raise NotApplicable(f"{ctx.impl.name} cannot express the cases")
    return cases


@register(
    "gradients.logits_teacher",
    "the gradient w.r.t. the teacher logits, for an implementation that gives one: the "
    "oracle's within its bound on the option grid and the edge rows (PyTorch's "
    "composition's NaN accepted where the teacher excludes a class, forward or in the "
    "mixture, and in dropped rows without a softmax or, forward, with a class the student "
    "excludes); n/a where the teacher is a constant",
    cases=_teacher_cases,
    applies=needs_function("from_logits"),
    subject="from_logits",
)
def _logits_teacher_gradient(ctx: Context, case: Case) -> None:
    _check_gradient(ctx, case, teacher=True)


@register(
    "gradients.logits_edge_numbers",
    "the student gradient is the specification's number where PyTorch's composition gives "
    "NaN: in reverse (or with beta inside (0, 1)), exactly 0 at a class the student excludes "
    "and the chain rule's value at the others (the composition: 0 * inf across the row); "
    "zero gradients in a dropped row whatever it holds (the composition: the mask's 0 times "
    "the row's NaN)",
    cases=composition_gradient_nan_cases,
    applies=needs_function("from_logits"),
    level="SHOULD",
    subject="from_logits",
)
def _logits_edge_numbers(ctx: Context, case: Case) -> None:
    _check_gradient(ctx, case, strict=True)


@register(
    "gradients.logits_teacher_edge_numbers",
    "the teacher gradient, for an implementation that gives one, is the specification's "
    "number where PyTorch's composition gives NaN: forward (or with beta inside (0, 1)), "
    "exactly 0 at a class the teacher excludes and the chain rule's value at the others; "
    "zero gradients in a dropped row whatever it holds",
    cases=composition_teacher_gradient_nan_cases,
    applies=needs_function("from_logits"),
    level="SHOULD",
    subject="from_logits",
)
def _logits_teacher_edge_numbers(ctx: Context, case: Case) -> None:
    _check_gradient(ctx, case, strict=True, teacher=True)


@register(
    "accuracy.logits_axis",
    "the classes on another axis than the last (as the implementation declares in "
    "logits_axes): the oracle's value, each reduction, masks of the rows' shape",
    cases=axis_cases,
    applies=needs_function("from_logits"),
    subject="from_logits",
)
def _logits_axis(ctx: Context, case: Case) -> None:
    _check_value(ctx, case)


@register(
    "gradients.logits_axis",
    "the student gradient with the classes on another axis than the last agrees with the oracle",
    cases=axis_cases,
    applies=needs_function("from_logits"),
    subject="from_logits",
)
def _logits_axis_gradient(ctx: Context, case: Case) -> None:
    _check_gradient(ctx, case)


@register(
    "gradients.logits_options",
    "the student gradient on fixed logits (each reduction with and without a mask, both "
    "directions, T**2 on/off) agrees with the oracle",
    cases=gradient_option_cases,
    applies=needs_function("from_logits"),
    subject="from_logits",
)
def _logits_gradient_options(ctx: Context, case: Case) -> None:
    _check_gradient(ctx, case)
