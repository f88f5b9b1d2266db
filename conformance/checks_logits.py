r"""Properties of the KL divergence from logits and of the Gaussian KL.

They check an :class:`~.implementations.Implementation`'s ``from_logits`` and
``gaussian`` functions (``--impl reference``: ``kldiv_spec``'s own; ``kldiv-spec
check --impl MODULE:FUNCTION --kind from-logits`` or ``--kind gaussian``: a user's),
within what the implementation declares it can express (``logits_reductions``,
``logits_directions``, ``logits_scalings``, ``logits_temperature``,
``logits_masks``, ``gaussian_reductions``, ``gaussian_priors``): a case that needs
more is not drawn, and a property with no expressible case is n/a. Without the
function the properties are n/a.

Values are judged against the mpmath oracle of :mod:`.oracle_logits` and its
bounds. Where behaviour is discrete (the options: temperature scaling,
direction, reduction, mask; the edge values) the cases are fixed, so a bug there
fails on every seed; hypothesis draws the logits. A failing value is compared
with what common mistakes give (the other direction, a missing or extra
:math:`T^2`, the cross-entropy :math:`-\sum_i p_i \log q_i` instead of the KL,
masked rows counted in a divisor) and the message names the one it matches.

``beta`` (the generalised Jensen-Shannon divergence) is passed only to an
implementation that declares ``logits_beta``: then the option grids, the drawn
cases and the edge cases also take 0, 0.3, 0.5, 1 (and a drawn value), where 0
and 1 must be exactly the forward and the reverse KL (trl's and Liger's
convention) and the mixture in between; ``"beta"`` is then one of the options a
reproduction replays.

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
unchanged (``hygiene.logits_inputs_unmodified``, ``hygiene.gaussian_inputs_unmodified``).

The ``assert_*`` functions are the judgements the properties make; the
reproduction snippets of failures call them too, with their defaults: the
strict judgement (the SHOULD guarantees) and the dtype checked, so that a
SHOULD or a dtype failure replays as a difference.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from hypothesis import strategies as st

import kldiv_spec

from . import oracle_logits as oracle
from .assertions import dtype_name, to_numpy
from .context import Context, fmt
from .properties import NotApplicable, register
from .strategies import Case

__all__ = [
    "OPTION_KEYS",
    "assert_composition",
    "assert_from_logits",
    "assert_from_logits_gradient",
    "assert_from_logits_non_negative",
    "assert_from_logits_zero",
    "assert_gaussian",
    "assert_gaussian_gradient",
    "assert_gaussian_zero",
    "check_result",
    "compare_values",
    "compose",
    "composition_kl_div",
    "describe",
    "exact_gaussian_gradients",
    "failure_message",
    "gaussian_expected",
    "undeclared",
]

_TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
#: The options of a from-logits call that a case carries (besides ``mask``), in the
#: order reproductions show them.
OPTION_KEYS = (
    "reduction",
    "temperature",
    "direction",
    "scale_by_temperature_squared",
    "beta",
    "axis",
    "symmetric",
)
#: The values of ``beta`` the fixed cases take (for an implementation with ``logits_beta``):
#: the two endpoints (the forward and the reverse KL), the symmetric mixture, and an
#: asymmetric one (where swapping beta and 1 - beta in the mixture shows).
_BETAS = (0.0, 0.5, 0.3, 1.0)


# --------------------------------------------------------------------------- helpers


def _function(ctx: Context, subject: str) -> Any:
    fn = ctx.impl.function(subject)
    if fn is None:
        raise NotApplicable(f"{ctx.impl.name} has no {subject} function")
    return fn


def undeclared(impl: Any, options: Mapping[str, Any], /) -> str | None:
    """Return which of ``options`` the implementation's ``logits_*`` fields do not declare.

    None when they declare all of them: the reduction, direction, T**2 setting,
    temperature, mask, class axis, symmetric mix and ``beta``. The from-logits
    and from-hidden properties share these declarations.
    """
    if options["reduction"] not in impl.logits_reductions:
        return f"reduction {options['reduction']!r}"
    if options["direction"] not in impl.logits_directions:
        return f"direction {options['direction']!r}"
    if options["scale_by_temperature_squared"] not in impl.logits_scalings:
        return f"scale_by_temperature_squared={options['scale_by_temperature_squared']}"
    if options["temperature"] != 1.0 and not impl.logits_temperature:
        return "temperatures other than 1"
    if options.get("mask") is not None and not impl.logits_masks:
        return "a mask"
    if options.get("axis", -1) not in (-1, *impl.logits_axes):
        return f"axis={options['axis']}"
    if options.get("symmetric") is not None and not impl.logits_symmetric:
        return "the symmetric mix of the two directions"
    if options.get("beta") is not None and not impl.logits_beta:
        return "beta (the generalised Jensen-Shannon divergence)"
    return None


def _unexpressible(ctx: Context, options: dict[str, Any]) -> str | None:
    """Return why the implementation cannot express ``options``, or None if it can.

    The declared ``logits_*`` fields are consulted first (:func:`undeclared`),
    then the implementation's per-case ``unsupported(options)`` (with the call's
    keywords, ``mask`` included when the case has one).
    """
    impl = ctx.impl
    why = undeclared(impl, options)
    if why is not None:
        return why
    if impl.unsupported is not None:
        keywords = {k: options[k] for k in (*OPTION_KEYS, "mask") if k in options}
        why = impl.unsupported(keywords)
        if why:
            return str(why)
    return None


def _as_declared(ctx: Context, case: Case, /) -> Case:
    """Return ``case`` with the T**2 setting the implementation declares, where T is 1.

    At a temperature of 1 the factor :math:`T^2` is 1, so both values of
    ``scale_by_temperature_squared`` give the same divergence: a case there is
    expressible by an implementation of either convention, and is called with the
    value it declares (the reproduction replays that call).
    """
    options = case.extra
    scalings = ctx.impl.logits_scalings
    scaled = options.get("scale_by_temperature_squared")
    if options.get("temperature") != 1.0 or scaled is None or scaled in scalings or not scalings:
        return case
    extra = {**options, "scale_by_temperature_squared": scalings[0]}
    return dataclasses.replace(case, extra=extra)


def _expressible(ctx: Context, cases: list[Case]) -> list[Case]:
    """Keep the cases the implementation can express; NotApplicable if none."""
    cases = [_as_declared(ctx, c) for c in cases]
    kept = [c for c in cases if _unexpressible(ctx, c.extra) is None]
    if not kept:
        why = _unexpressible(ctx, cases[0].extra) if cases else "no case"
        raise NotApplicable(f"{ctx.impl.name} cannot express the cases ({why})")
    return kept


def _skip_unsupported(ctx: Context, case: Case) -> None:
    """Raise NotApplicable for this case alone when the implementation cannot express it."""
    why = _unexpressible(ctx, case.extra)
    if why is not None:
        raise NotApplicable(f"{ctx.impl.name} cannot express {why}")


def _logits_case(s: np.ndarray, t: np.ndarray, **options: Any) -> Case:
    options = {
        "reduction": "batchmean",
        "temperature": 1.0,
        "direction": "forward",
        "scale_by_temperature_squared": True,
        **options,
    }
    if options.get("mask") is None:
        options.pop("mask", None)
    return Case(s, t, options["reduction"], False, extra=options)


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


def _options(case: Case) -> dict[str, Any]:
    return {k: case.extra[k] for k in OPTION_KEYS if k in case.extra}


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
    fn = _function(ctx, "from_logits")
    _skip_unsupported(ctx, case)
    options = _options(case)
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
    return describe(_logits_case(s, t, mask=mask, **options))


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
    **options: Any,
) -> None:
    """Assert the gradient w.r.t. the student logits agrees with the oracle within its bound.

    The bound is that of the gradient's precision (its dtype, or ``compute_dtype``).
    """
    exact = oracle.from_logits(input, target, grad_output=grad_output, mask=mask, **options)
    precision = _precision(grad, np.result_type(input.dtype, target.dtype), compute_dtype)
    tol, _ = oracle.gradient_tolerance(_at(exact, precision))
    what = f"gradient w.r.t. the student logits, {_what(input, target, mask, options)}"
    compare_values(grad, exact.grad_input, tol, what)


# --------------------------------------------------------------------------- from logits


@st.composite
def _logits_cases(draw: Any, ctx: Context, spreads: tuple[float, ...] = (1.0, 5.0, 40.0)) -> Case:
    impl = ctx.impl
    rows, vocab = draw(st.integers(1, 4)), draw(st.integers(2, 8))  # vocab 1: an edge case
    dtype = draw(st.sampled_from((np.float64, np.float32)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spread = draw(st.sampled_from(spreads))
    s = rng.normal(0.0, spread, size=(rows, vocab)).astype(dtype)
    t = (s + rng.normal(0.0, spread, size=(rows, vocab))).astype(dtype)
    options: dict[str, Any] = {
        "temperature": draw(st.sampled_from(_TEMPERATURES if impl.logits_temperature else (1.0,))),
        "reduction": draw(st.sampled_from(impl.logits_reductions)),
        "direction": draw(st.sampled_from(impl.logits_directions)),
        "scale_by_temperature_squared": draw(st.sampled_from(impl.logits_scalings)),
    }
    if impl.logits_masks and draw(st.booleans()):
        options["mask"] = np.asarray(draw(st.lists(st.booleans(), min_size=rows, max_size=rows)))
    if getattr(impl, "logits_beta", False) and draw(st.booleans()):
        # the endpoints (the two KLs), the symmetric mixture, or a drawn one in (0, 1)
        drawn = st.floats(0.01, 0.99).map(lambda b: float(np.round(b, 6)))
        options["beta"] = draw(st.one_of(st.sampled_from((0.0, 0.5, 1.0)), drawn))
        options["direction"] = "forward"  # beta chooses the divergence
    return Case(s, t, options["reduction"], False, extra=options)


def _strategy(ctx: Context) -> Any:
    impl = ctx.impl
    if impl.from_logits is None:
        raise NotApplicable(f"{impl.name} has no from_logits function")
    if not (impl.logits_reductions and impl.logits_directions and impl.logits_scalings):
        raise NotApplicable(f"{impl.name} declares no from-logits option it can express")
    return _logits_cases(ctx).map(lambda case: _as_declared(ctx, case))


def _applies(subject: str) -> Any:
    def applies(ctx: Context) -> str | None:
        return None if ctx.impl.function(subject) is not None else f"no {subject} function"

    return applies


def _compute_dtype(ctx: Context) -> Any:
    """Return the dtype the implementation declares it computes in (``compute_dtype``)."""
    return getattr(ctx.impl, "compute_dtype", None)


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
        **_options(case),
    )


@register(
    "accuracy.logits_oracle",
    "kl_div_from_logits agrees with the exact (mpmath) oracle within its bound, every option",
    strategy=_strategy,
    applies=_applies("from_logits"),
    examples_scale=0.5,
    subject="from_logits",
)
def _logits_oracle(ctx: Context, case: Case) -> None:
    _check_value(ctx, case)


def _grid_logits(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = rng.normal(0.0, 2.0, size=shape)
    return s, s + rng.normal(0.0, 2.0, size=shape)


#: (direction, scale_by_temperature_squared), in the order the grids cycle through them.
_COMBOS = (("forward", True), ("reverse", False), ("forward", False), ("reverse", True))


def _pairwise(reduction: int, masked: int) -> tuple[tuple[str, bool], ...]:
    """Return two (direction, T**2) combinations for one (reduction, mask) cell of a grid.

    Over the grid's cells every pair of option values occurs: both directions
    and both scalings with each reduction and each mask form, and all four
    (direction, scaling) combinations; JAX compiles each case, so the grid is
    pairwise rather than the full product.
    """
    first = 0 if (reduction + masked) % 2 == 0 else 2
    return _COMBOS[first], _COMBOS[first + 1]


def _case_options(direction: str, scaled: bool) -> dict[str, Any]:
    return {"temperature": 2.0, "direction": direction, "scale_by_temperature_squared": scaled}


def _option_cases(ctx: Context) -> list[Case]:
    """Return the options on fixed logits: every pair of values, float32, (B, S, V) logits."""
    s, t = _grid_logits((4, 5), 11)
    keep = np.asarray([True, False, True, True])
    s3, t3 = _grid_logits((2, 3, 4), 12)
    keep3 = np.asarray([[True, True, False], [False, True, True]])
    reductions = ("none", "batchmean", "sum", "mean", "rowmean")
    cases = []
    for i, reduction in enumerate(reductions):
        for j, mask in enumerate((None, keep)):
            for direction, scaled in _pairwise(i, j):
                options = _case_options(direction, scaled)
                cases.append(_logits_case(s, t, reduction=reduction, mask=mask, **options))
    s32, t32 = s.astype(np.float32), t.astype(np.float32)
    for k, (direction, scaled) in enumerate(_COMBOS):
        options = _case_options(direction, scaled)
        reduction, mask = (("rowmean", keep), ("sum", None), ("none", keep), ("batchmean", None))[
            k
        ]
        cases.append(_logits_case(s32, t32, reduction=reduction, mask=mask, **options))
    # (batch, seq, vocab): 'batchmean' divides by the batch, 'rowmean' by the tokens
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
        options = _case_options(*_COMBOS[k % 4])
        cases.append(_logits_case(s3, t3, reduction=reduction, mask=mask, **options))
    if ctx.impl.logits_beta:
        cases += _beta_option_cases(s, t, keep, s3, t3, keep3)
    if ctx.impl.logits_symmetric:
        cases += _symmetric_cases(s, t, keep, s3, t3, keep3)
    return _expressible(ctx, cases)


#: Ratios of the symmetric mix r KL(p || q) + (1 - r) KL(q || p) (torchtune's default 0.5).
_RATIOS = (0.5, 0.25, 1.0)


def _symmetric_cases(
    s: np.ndarray,
    t: np.ndarray,
    keep: np.ndarray,
    s3: np.ndarray,
    t3: np.ndarray,
    keep3: np.ndarray,
) -> list[Case]:
    """Return the symmetric mix's cases: each ratio, each reduction, a mask, 3-d logits."""
    cases = []
    for k, ratio in enumerate(_RATIOS):
        for j, reduction in enumerate(("none", "batchmean", "sum", "mean", "rowmean")):
            for m, (a, b, mask) in enumerate(((s, t, None), (s, t, keep), (s3, t3, keep3))):
                if mask is not None and reduction == "batchmean":
                    continue
                options = {**_case_options("forward", (j + k + m) % 2 == 0), "symmetric": ratio}
                cases.append(_logits_case(a, b, reduction=reduction, mask=mask, **options))
    return cases


def _each_value(
    s: np.ndarray,
    t: np.ndarray,
    cells: tuple[tuple[str, Any], ...],
    key: str,
    values: tuple[float, ...],
) -> list[Case]:
    """Return a forward case for each of ``values`` of option ``key`` in each (reduction, mask).

    T = 2, with the :math:`T^2` factor on and off in turn.
    """
    return [
        _logits_case(
            s,
            t,
            reduction=reduction,
            mask=mask,
            **{**_case_options("forward", (j + k) % 2 == 0), key: value},
        )
        for k, value in enumerate(values)
        for j, (reduction, mask) in enumerate(cells)
    ]


def _beta_option_cases(
    s: np.ndarray,
    t: np.ndarray,
    keep: np.ndarray,
    s3: np.ndarray,
    t3: np.ndarray,
    keep3: np.ndarray,
) -> list[Case]:
    """Return the fixed cases with ``beta``: each of :data:`_BETAS` with every reduction.

    The endpoints 0 and 1 must be the forward and the reverse KL, 0.5 and 0.3 the
    mixture's divergence; T = 2 with the T**2 factor on and off, masks, float32
    and (batch, seq, vocab) logits.
    """
    cells = (("none", None), ("batchmean", keep), ("sum", None), ("rowmean", keep), ("mean", None))
    cases = _each_value(s, t, cells, "beta", _BETAS)
    s32, t32 = s.astype(np.float32), t.astype(np.float32)
    for k, beta in enumerate(_BETAS):
        options = {**_case_options("forward", k % 2 == 1), "beta": beta}
        cases.append(_logits_case(s32, t32, reduction=cells[k][0], mask=cells[k][1], **options))
    for k, (reduction, mask) in enumerate((("rowmean", keep3), ("batchmean", None))):
        options = {**_case_options("forward", True), "beta": _BETAS[1 + k]}
        cases.append(_logits_case(s3, t3, reduction=reduction, mask=mask, **options))
    return cases


@register(
    "accuracy.logits_options",
    "the options on fixed logits (every pair of direction, T**2 on/off, reduction, mask; "
    "float32; 3-d): the oracle's value",
    cases=_option_cases,
    applies=_applies("from_logits"),
    subject="from_logits",
)
def _logits_options(ctx: Context, case: Case) -> None:
    _check_value(ctx, case)


@register(
    "math.logits_zero_at_identity",
    "kl_div_from_logits(s, s) is 0 within the oracle's bound in both directions (PyTorch's "
    "composition rounds; a fully masked mean may be its 0/0 = NaN)",
    strategy=_strategy,
    applies=_applies("from_logits"),
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
        **_options(case),
    )


def _identity_cases(ctx: Context) -> list[Case]:
    """Return s = t on fixed logits: every reduction, both directions, T**2 on/off, a mask."""
    cases = []
    for k, (shape, seed, dtype) in enumerate(
        (((3, 5), 21, np.float64), ((2, 7), 22, np.float32), ((2, 3, 4), 23, np.float64))
    ):
        rng = np.random.default_rng(seed)
        s = rng.normal(0.0, (1.0, 5.0, 30.0)[k], size=shape).astype(dtype)
        keep = np.ones(shape[:-1], bool)
        keep.flat[0] = False  # some rows kept, one dropped
        for i, reduction in enumerate(("none", "batchmean", "sum", "mean", "rowmean")):
            if reduction == "batchmean" and len(shape) != 2:
                mask = None
            else:
                mask = keep if i % 2 else None
            direction, scaled = _COMBOS[(i + k) % 4]
            options = {
                "temperature": (1.0, 2.0, 0.5)[(i + k) % 3],
                "direction": direction,
                "scale_by_temperature_squared": scaled,
            }
            cases.append(_logits_case(s, s.copy(), reduction=reduction, mask=mask, **options))
    return _expressible(ctx, cases)


@register(
    "math.logits_exact_zero_at_identity",
    "kl_div_from_logits(s, s) is exactly 0, not 0 up to rounding (every log-ratio is 0; "
    "PyTorch's composition gives about -1e-16)",
    cases=_identity_cases,
    applies=_applies("from_logits"),
    level="SHOULD",
    subject="from_logits",
)
def _logits_exact_zero(ctx: Context, case: Case) -> None:
    got = _call(ctx, case, "logits_zero")
    assert_from_logits_zero(got, case.input, mask=case.extra.get("mask"), **_options(case))


@register(
    "math.logits_non_negative",
    "every reduction of kl_div_from_logits (and each row of 'none' summed) is >= -bound",
    strategy=_strategy,
    applies=_applies("from_logits"),
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
        **_options(case),
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
    strategy=_strategy,
    applies=_applies("from_logits"),
    examples_scale=0.5,
    subject="from_logits",
)
def _logits_composition(ctx: Context, case: Case) -> None:
    reduction = case.extra["reduction"]
    if "forward" not in ctx.impl.logits_directions:
        raise NotApplicable(f"{ctx.impl.name} has no forward direction")
    if ctx.impl.fn is not None and _kl_div_reduction(reduction) not in ctx.reductions:
        raise NotApplicable(f"{ctx.impl.name} cannot express reduction {reduction!r}")
    options = {**_options(case), "direction": "forward"}
    options.pop("beta", None)  # the composition is the KL's
    plain = _as_declared(ctx, _logits_case(case.input, case.target, **options))
    if _unexpressible(ctx, plain.extra) is not None:
        raise NotApplicable(f"{ctx.impl.name} cannot express {options}")
    got = _call(ctx, plain, "logits_composition")
    composed = compose(
        composition_kl_div(ctx.impl), ctx.backend, case.input, case.target, **options
    )
    assert_composition(
        got, composed, case.input, case.target, compute_dtype=_compute_dtype(ctx), **options
    )


def _edge_cases(ctx: Context) -> list[Case]:
    inf, nan = math.inf, math.nan
    s = np.asarray(
        [
            [0.0, -inf, 1.0, 2.0],
            [0.0, -inf, 1.0, 2.0],
            [-inf, -inf, -inf, -inf],
            [0.0, 1.0, nan, 2.0],
            [0.0, inf, 1.0, 2.0],
            [1e300, -1e300, 0.0, 5.0],
            [0.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 1.0, 2.0],
        ]
    )
    t = np.asarray(
        [
            [1.0, -inf, 0.0, 2.0],
            [1.0, 0.5, 0.0, 2.0],
            [1.0, 0.5, 0.0, 2.0],
            [1.0, 0.5, 0.0, 2.0],
            [1.0, 0.5, 0.0, 2.0],
            [1e300, -1e300, 1.0, 3.0],
            [-inf, -inf, -inf, -inf],
            [1.0, -inf, 0.0, 2.0],  # the teacher alone excludes a class (a top-k teacher)
        ]
    )
    # large finite float32 logits: exp overflows unless the log-sum-exp is shifted
    big_s = np.asarray([[120.0, 100.0, 0.0, -30.0]], np.float32)
    big_t = np.asarray([[110.0, 115.0, -5.0, 0.0]], np.float32)
    one_s, one_t = np.asarray([[3.0], [-1.0]]), np.asarray([[0.5], [2.0]])  # one class: KL 0
    cases = []
    for direction in ("forward", "reverse"):
        common = {"temperature": 1.0, "direction": direction}
        for reduction in ("none", "sum", "rowmean"):
            for i in range(len(s)):
                cases.append(
                    _logits_case(s[i : i + 1], t[i : i + 1], reduction=reduction, **common)
                )
            cases.append(_logits_case(big_s, big_t, reduction=reduction, **common))
            cases.append(_logits_case(one_s, one_t, reduction=reduction, **common))
        # masked rows under both T**2 conventions (a loss without T**2 takes them too)
        for scaled in (True, False):
            masked = {
                **common,
                "temperature": 2.0,
                "scale_by_temperature_squared": scaled,
                "mask": np.asarray([True, False, False, False, False, True, False, True]),
            }
            cases.append(_logits_case(s, t, reduction="rowmean", **masked))
            # every row dropped, each reduction: 0 (PyTorch's ignore_index means: 0/0 = NaN)
            for reduction in ("none", "sum", "batchmean", "mean", "rowmean"):
                dropped = {**masked, "mask": np.zeros(len(s), bool)}
                cases.append(_logits_case(s, t, reduction=reduction, **dropped))
    if ctx.impl.logits_beta:
        cases += _beta_edge_cases()
    return _expressible(ctx, cases)


def _beta_edge_cases() -> list[Case]:
    r"""Return the edge cases of ``beta``: classes excluded by one side or both, masks.

    At the endpoints they are the KLs' edges (``beta=0``: ``+inf`` where the
    student alone excludes a class; ``beta=1``: where the teacher alone does);
    in between the mixture keeps every term finite: a class one side excludes
    has the other's finite log-ratio :math:`-\log \beta` or
    :math:`-\log(1 - \beta)`, one both exclude contributes 0 (a composition
    ``beta * kl_div(log m, p) + (1 - beta) * kl_div(log m, q)``: ``0 * inf`` = NaN,
    accepted by the MUST properties), and a row without a softmax is NaN.
    """
    inf, nan = math.inf, math.nan
    s = np.asarray(
        [
            [0.0, -inf, 1.0, 2.0],  # the student alone excludes class 1
            [0.0, 1.0, 1.0, 2.0],  # the teacher alone excludes class 1
            [0.0, -inf, 1.0, -inf],  # class 1: the student; class 3: both
            [0.0, 1.0, nan, 2.0],  # no softmax
            [120.0, 100.0, 0.0, -30.0],  # large logits
        ]
    )
    t = np.asarray(
        [
            [1.0, 0.5, 0.0, 2.0],
            [1.0, -inf, 0.0, 2.0],
            [1.0, 0.5, -inf, -inf],
            [1.0, 0.5, 0.0, 2.0],
            [110.0, 115.0, -5.0, 0.0],
        ]
    )
    cases = []
    for beta in _BETAS:
        common = {"temperature": 1.0, "direction": "forward", "beta": beta}
        for reduction in ("none", "sum"):
            for i in range(len(s)):
                row = (s[i : i + 1], t[i : i + 1])
                cases.append(_logits_case(*row, reduction=reduction, **common))
        masked = {
            **common,
            "temperature": 2.0,
            "mask": np.asarray([True, False, True, False, True]),
        }
        cases.append(_logits_case(s, t, reduction="rowmean", **masked))
    dropped = {"temperature": 2.0, "direction": "forward", "beta": 0.3}
    for reduction in ("none", "sum", "batchmean", "mean", "rowmean"):
        mask = np.zeros(len(s), bool)
        cases.append(_logits_case(s, t, reduction=reduction, mask=mask, **dropped))
    return cases


@register(
    "semantics.logits_edge_values",
    "excluded classes (-inf), rows without a softmax (NaN, +inf, all -inf), masked rows, "
    "every reduction fully masked, large float32 logits, one class (PyTorch's composition's "
    "NaN accepted where both distributions exclude a class and for a fully masked mean)",
    cases=_edge_cases,
    applies=_applies("from_logits"),
    subject="from_logits",
)
def _logits_edges(ctx: Context, case: Case) -> None:
    _check_value(ctx, case)


def _composition_nan(case: Case) -> np.ndarray:
    """Where PyTorch's composition gives NaN for ``case`` and the specification a number."""
    exact = _exact(case.input, case.target, case.extra.get("mask"), _options(case))
    return oracle.composition_nan(exact, case.extra["reduction"])


def _excluded_by_both(ctx: Context) -> list[Case]:
    """Return the edge cases with a class both distributions exclude (0 weight, -inf)."""
    cases = [c for c in _edge_cases(ctx) if _composition_nan(c).any() and not _fully_masked(c)]
    if not cases:
        raise NotApplicable(f"{ctx.impl.name} cannot express the cases")
    return cases


def _fully_masked(case: Case) -> bool:
    mask = case.extra.get("mask")
    return mask is not None and not np.asarray(mask, bool).any()


@register(
    "semantics.logits_excluded_by_both",
    "a class both distributions exclude contributes exactly 0 (PyTorch's composition: "
    "0 * inf = NaN), in 'none' and every reduction",
    cases=_excluded_by_both,
    applies=_applies("from_logits"),
    level="SHOULD",
    subject="from_logits",
)
def _logits_excluded_by_both(ctx: Context, case: Case) -> None:
    _check_value(ctx, case, strict=True)


def _masked_out(ctx: Context) -> list[Case]:
    cases = [c for c in _edge_cases(ctx) if _fully_masked(c)]
    if not cases:
        raise NotApplicable(f"{ctx.impl.name} cannot express a mask")
    return cases


@register(
    "semantics.logits_fully_masked",
    "every row masked gives 0 for every reduction, the empty sum over no tokens (PyTorch's "
    "ignore_index means: 0/0 = NaN for 'batchmean', 'rowmean', 'mean')",
    cases=_masked_out,
    applies=_applies("from_logits"),
    level="SHOULD",
    subject="from_logits",
)
def _logits_fully_masked(ctx: Context, case: Case) -> None:
    _check_value(ctx, case, strict=True)


def _dtype_cases(ctx: Context) -> list[Case]:
    """float64 and float32 logits (and float16 where the library has it), each reduction."""
    s, t = _grid_logits((3, 4), 31)
    dtypes = [np.float64, np.float32]
    if hasattr(ctx.backend.xp, "float16"):
        dtypes.append(np.float16)
    cases = []
    # every combination (small calls): whatever an implementation declares, each of its
    # reductions meets every dtype
    for reduction in ("none", "batchmean", "sum", "mean", "rowmean"):
        for dtype, (direction, scaled) in itertools.product(dtypes, _COMBOS):
            options = {"direction": direction, "scale_by_temperature_squared": scaled}
            cases.append(
                _logits_case(
                    s.astype(dtype),
                    t.astype(dtype),
                    reduction=reduction,
                    temperature=2.0,
                    **options,
                )
            )
    return _expressible(ctx, cases)


@register(
    "semantics.logits_dtypes",
    "the result has the logits' floating dtype (float64 in, float64 out: not a float32 "
    "result); its values are then judged at the precision the result has",
    cases=_dtype_cases,
    applies=_applies("from_logits"),
    subject="from_logits",
)
def _logits_dtypes(ctx: Context, case: Case) -> None:
    got = _call(ctx, case)
    what = _what(case.input, case.target, case.extra.get("mask"), _options(case))
    _check_dtype(got, case.input, case.target, what)


@register(
    "hygiene.logits_inputs_unmodified",
    "from_logits (and its backward) leave the student and teacher logits and the mask unchanged",
    strategy=_strategy,
    applies=_applies("from_logits"),
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
        options = _options(case)
        if m is not None:
            options["mask"] = m
        g = _grad_output(case)
        backward(g if np.ndim(g) == 0 else be.asarray(np.asarray(g)), x, t, **options)
    operands = [("student logits", x, case.input), ("teacher logits", t, case.target)]
    if m is not None:
        operands.append(("mask", m, mask))
    _assert_unchanged(be, operands, "from_logits")


def _grad_output(case: Case) -> Any:
    if case.extra["reduction"] != "none":
        return 0.75
    shape = case.input.shape
    return (0.5 + (np.arange(math.prod(shape)) % 3)).reshape(shape).astype(case.input.dtype)


def _assert_unchanged(be: Any, operands: list[tuple[str, Any, np.ndarray]], fn: str) -> None:
    """Assert each backend operand still holds its original values (NaN equal to NaN)."""
    for name, arr, orig in operands:
        now = np.asarray(be.to_numpy(arr))
        if now.shape != orig.shape or not np.array_equal(
            now, orig, equal_nan=orig.dtype.kind == "f"
        ):
            msg = f"the call of {fn} modified its {name}"
            raise AssertionError(msg)


def _logits_gradient(ctx: Context, case: Case, g: Any) -> np.ndarray:
    with warnings.catch_warnings(record=True):  # a composition's 'mean' UserWarning
        warnings.simplefilter("always")
        return _take_logits_gradient(ctx, case, g)


def _forward_dtype(ctx: Context, case: Case, out: Any) -> None:
    """Check the forward result of a gradient call and keep its dtype in ``ctx.result_dtype``."""
    shape = case.input.shape if case.extra["reduction"] == "none" else ()
    check_result(ctx, out, shape, "from_logits")
    dtype = np.dtype(dtype_name(out.dtype)) if dtype_name(out.dtype) != "bfloat16" else None
    ctx.result_dtype = dtype if dtype is not None and dtype.kind == "f" else None


def _take_logits_gradient(ctx: Context, case: Case, g: Any) -> np.ndarray:
    ctx.result_dtype = None
    fn = _function(ctx, "from_logits")
    _skip_unsupported(ctx, case)
    be = ctx.backend
    ctx.record(case, "logits_gradient", grad=g)
    options = _options(case)
    if case.extra.get("mask") is not None:
        options["mask"] = be.asarray(case.extra["mask"])
    try:
        if be.autograd == "torch" and ctx.impl.differentiable:
            import torch

            x = be.asarray(case.input).requires_grad_(True)
            out = fn(x, be.asarray(case.target), **options)
            _forward_dtype(ctx, case, out)
            gout = torch.as_tensor(np.asarray(g), dtype=out.dtype, device=out.device)
            (gx,) = torch.autograd.grad(out, (x,), gout.expand(out.shape))
            return np.asarray(gx.detach().cpu().numpy())
        if be.autograd == "jax" and ctx.impl.differentiable:
            import jax
            import jax.numpy as jnp

            out, vjp = jax.vjp(
                lambda a: fn(a, be.asarray(case.target), **options), be.asarray(case.input)
            )
            _forward_dtype(ctx, case, out)
            (gx,) = vjp(jnp.broadcast_to(jnp.asarray(g, dtype=out.dtype), out.shape))
            return np.asarray(gx)
        backward = ctx.impl.from_logits_backward
        if backward is None:
            raise NotApplicable(f"{ctx.impl.name} has no from-logits backward on {be.name}")
        gb = g if isinstance(g, float) else be.asarray(np.asarray(g))
        gx = backward(gb, be.asarray(case.input), be.asarray(case.target), **options)[0]
    except NotImplementedError as exc:
        raise NotApplicable(f"{ctx.impl.name} does not implement {options}: {exc}") from None
    return _numpy_result(ctx, gx)


def _check_gradient(ctx: Context, case: Case) -> None:
    g = _grad_output(case)
    got = _logits_gradient(ctx, case, g)
    # judged at the forward's precision too: a float32 loss of float64 logits has a
    # float64 gradient (autograd casts it back) computed in float32
    declared = [_compute_dtype(ctx), ctx.result_dtype]
    found = [np.dtype(dtype_name(d)) for d in declared if d is not None]
    assert_from_logits_gradient(
        got,
        case.input,
        case.target,
        grad_output=g,
        mask=case.extra.get("mask"),
        compute_dtype=min(found, key=lambda d: d.itemsize) if found else None,
        **_options(case),
    )


@register(
    "gradients.logits_oracle",
    "the gradient w.r.t. the student logits agrees with the exact oracle within its bound",
    strategy=_strategy,
    applies=_applies("from_logits"),
    examples_scale=0.5,
    subject="from_logits",
)
def _logits_gradients(ctx: Context, case: Case) -> None:
    _check_gradient(ctx, case)


def _axis_cases(ctx: Context) -> list[Case]:
    """Return cases with the classes on another axis than the last, for each one declared.

    2-d logits with the classes on axis 0 and 3-d ones on axis 0 or 1 (as
    torchdistill's ``KDLoss`` takes them, the softmax over dim 1), each reduction
    in both directions, a row mask of the rows' shape (the logits' shape
    without ``axis``) where the reduction takes one.
    """
    declared = [a for a in ctx.impl.logits_axes if a != -1]
    if not declared:
        raise NotApplicable(f"{ctx.impl.name} takes the classes on the last axis only")
    impl = ctx.impl
    # the (direction, T**2) settings it declares (each reduction meets every axis)
    combos = [
        c for c in _COMBOS if c[0] in impl.logits_directions and c[1] in impl.logits_scalings
    ] or list(_COMBOS)
    cases = []
    for shape, seed in (((4, 3), 41), ((2, 5, 3), 43)):
        s, t = _grid_logits(shape, seed)
        for axis in declared:
            if not -len(shape) <= axis < len(shape) or axis % len(shape) == len(shape) - 1:
                continue
            rows = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
            keep = (np.arange(math.prod(rows)) % 3 != 1).reshape(rows)
            for i, reduction in enumerate(("none", "batchmean", "sum", "mean", "rowmean")):
                for j, mask in enumerate((None, keep)):
                    if mask is not None and reduction == "batchmean":
                        continue  # with a mask, 'batchmean' takes 2-d logits on axis 1 only
                    options = _case_options(*combos[(i + 2 * j) % len(combos)])
                    case = _logits_case(s, t, reduction=reduction, mask=mask, axis=axis, **options)
                    cases.append(case)
    if not cases:
        raise NotApplicable(f"no case for the axes {ctx.impl.name} declares ({declared})")
    return _expressible(ctx, cases)


@register(
    "accuracy.logits_axis",
    "the classes on another axis than the last (as the implementation declares in "
    "logits_axes): the oracle's value, each reduction, masks of the rows' shape",
    cases=_axis_cases,
    applies=_applies("from_logits"),
    subject="from_logits",
)
def _logits_axis(ctx: Context, case: Case) -> None:
    _check_value(ctx, case)


@register(
    "gradients.logits_axis",
    "the student gradient with the classes on another axis than the last agrees with the oracle",
    cases=_axis_cases,
    applies=_applies("from_logits"),
    subject="from_logits",
)
def _logits_axis_gradient(ctx: Context, case: Case) -> None:
    _check_gradient(ctx, case)


def _gradient_option_cases(ctx: Context) -> list[Case]:
    """Return the options on fixed logits: each reduction with and without a mask, T = 2."""
    s, t = _grid_logits((3, 4), 13)
    keep = np.asarray([True, False, True])
    cases = []
    for i, reduction in enumerate(("none", "batchmean", "sum", "mean", "rowmean")):
        for j, mask in enumerate((None, keep)):
            options = _case_options(*_COMBOS[(2 * i + j) % 4])
            cases.append(_logits_case(s, t, reduction=reduction, mask=mask, **options))
    if ctx.impl.logits_beta:
        # each beta: 'none' (the general chain rule) with a mask, and two reductions
        cells = (("none", keep), ("batchmean", None), ("sum", keep))
        cases += _each_value(s, t, cells, "beta", _BETAS)
    if ctx.impl.logits_symmetric:
        cells = (("none", keep), ("batchmean", None), ("rowmean", keep))
        cases += _each_value(s, t, cells, "symmetric", _RATIOS)
    return _expressible(ctx, cases)


@register(
    "gradients.logits_options",
    "the student gradient on fixed logits (each reduction with and without a mask, both "
    "directions, T**2 on/off) agrees with the oracle",
    cases=_gradient_option_cases,
    applies=_applies("from_logits"),
    subject="from_logits",
)
def _logits_gradient_options(ctx: Context, case: Case) -> None:
    _check_gradient(ctx, case)


# --------------------------------------------------------------------------- Gaussian


@st.composite
def _gaussian_cases(draw: Any, ctx: Context) -> Case:
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 5)))
    dtype = draw(st.sampled_from((np.float64, np.float32)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mu = rng.normal(0, 3, size=shape).astype(dtype)
    logvar = rng.normal(0, 2, size=shape).astype(dtype)
    options: dict[str, Any] = {"reduction": draw(st.sampled_from(ctx.impl.gaussian_reductions))}
    if ctx.impl.gaussian_priors and draw(st.booleans()):
        options["mu_prior"] = rng.normal(0, 1, size=shape[-1:]).astype(dtype)
        options["logvar_prior"] = rng.normal(0, 1, size=shape[-1:]).astype(dtype)
    return Case(mu, logvar, options["reduction"], False, extra=options)


def _gaussian_strategy(ctx: Context) -> Any:
    if ctx.impl.gaussian is None:
        raise NotApplicable(f"{ctx.impl.name} has no gaussian function")
    if not ctx.impl.gaussian_reductions:
        raise NotApplicable(f"{ctx.impl.name} declares no reduction for gaussian")
    return _gaussian_cases(ctx)


def _gaussian_shape(case: Case) -> tuple[int, ...]:
    """Return a Gaussian KL's result shape: the operands' broadcast for 'none', else ()."""
    if case.extra["reduction"] != "none":
        return ()
    shapes = [case.input.shape, case.target.shape]
    shapes += [np.shape(case.extra[k]) for k in ("mu_prior", "logvar_prior") if k in case.extra]
    return tuple(np.broadcast_shapes(*shapes))


def _call_gaussian(ctx: Context, case: Case, mu: Any, logvar: Any, options: dict[str, Any]) -> Any:
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        out = _function(ctx, "gaussian")(mu, logvar, **options)
    check_result(ctx, out, _gaussian_shape(case), "gaussian")
    return out


def _gaussian_options(ctx: Context, case: Case) -> dict[str, Any]:
    be = ctx.backend
    return {k: (be.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in case.extra.items()}


def _gaussian_call(ctx: Context, case: Case, kind: str = "gaussian") -> np.ndarray:
    be = ctx.backend
    ctx.record(case, kind)
    options = _gaussian_options(ctx, case)
    out = _call_gaussian(ctx, case, be.asarray(case.input), be.asarray(case.target), options)
    return np.asarray(to_numpy(out), dtype=np.float64)


def _gaussian_what(mu: np.ndarray, logvar: np.ndarray, options: dict[str, Any]) -> str:
    return describe(Case(mu, logvar, options["reduction"], False, extra=options))


def assert_gaussian_zero(got: Any, mu: np.ndarray, logvar: np.ndarray, /, **options: Any) -> None:
    """Assert ``gaussian_kl(mu, logvar, mu_prior=mu, logvar_prior=logvar)`` gave exactly 0."""
    got = np.asarray(got, dtype=np.float64)
    if not (got == 0).all():
        head = "the KL of a Gaussian from itself is not exactly 0"
        what = _gaussian_what(mu, logvar, options)
        raise AssertionError(failure_message(head, what, ("got", got)))


def gaussian_expected(
    mu: np.ndarray, logvar: np.ndarray, /, **options: Any
) -> tuple[np.ndarray, Any]:
    """Return the exact Gaussian KL (float64) for ``options`` and its bound."""
    mu_p = options.get("mu_prior", 0.0)
    lv_p = options.get("logvar_prior", 0.0)
    value, scale = oracle.gaussian(mu, logvar, mu_p, lv_p)
    eps = float(np.finfo(mu.dtype).eps)
    reduction = options["reduction"]
    floor = float(np.finfo(mu.dtype).smallest_normal)
    if reduction == "none":
        return value, oracle.GAUSSIAN_ULPS * eps * scale + floor
    d = {"sum": 1, "batchmean": mu.shape[0] if mu.ndim else 1, "mean": value.size}[reduction]
    want = np.asarray(math.fsum(value.ravel()) / d if d else math.nan)
    tol = (oracle.GAUSSIAN_ULPS + value.size) * eps * float(scale.sum()) / max(d, 1) + floor
    return want, tol


def assert_gaussian(got: Any, mu: np.ndarray, logvar: np.ndarray, /, **options: Any) -> None:
    """Assert ``got`` agrees with the exact closed form within its bound, and is >= 0.

    ``options``: ``reduction`` and, optionally, ``mu_prior`` and ``logvar_prior``.
    """
    got = np.asarray(got, dtype=np.float64)
    want, tol = gaussian_expected(mu, logvar, **options)
    what = f"gaussian_kl, {_gaussian_what(mu, logvar, options)}"
    hint = ""
    if "mu_prior" in options:
        plain = {"reduction": options["reduction"]}
        ignored = gaussian_expected(mu, logvar, **plain)[0]
        if ignored.shape == got.shape and np.allclose(got, ignored, rtol=1e-5, atol=0):
            hint = " (it matches the standard normal prior: the prior is ignored)"
    compare_values(got, want, tol, what, hint)
    if not (got >= 0).all():
        raise AssertionError(failure_message("negative Gaussian KL", what, ("got", got)))


@register(
    "math.gaussian_zero_at_identity",
    "gaussian_kl(mu, logvar, mu_prior=mu, logvar_prior=logvar) is exactly 0",
    strategy=_gaussian_strategy,
    applies=_applies("gaussian"),
    examples_scale=0.5,
    subject="gaussian",
)
def _gaussian_zero(ctx: Context, case: Case) -> None:
    if not ctx.impl.gaussian_priors:
        raise NotApplicable(f"{ctx.impl.name} takes no prior")
    options = {**case.extra, "mu_prior": case.input, "logvar_prior": case.target}
    same = Case(case.input, case.target, case.reduction, False, extra=options)
    got = _gaussian_call(ctx, same, "gaussian_zero")
    assert_gaussian_zero(got, case.input, case.target, **options)


@register(
    "accuracy.gaussian_oracle",
    "gaussian_kl agrees with the exact (mpmath) closed form within its bound, and is >= 0",
    strategy=_gaussian_strategy,
    applies=_applies("gaussian"),
    examples_scale=0.5,
    subject="gaussian",
)
def _gaussian_oracle(ctx: Context, case: Case) -> None:
    got = _gaussian_call(ctx, case)
    assert_gaussian(got, case.input, case.target, **case.extra)


@register(
    "hygiene.gaussian_inputs_unmodified",
    "gaussian (and its backward) leave mu, logvar and the priors unchanged",
    strategy=_gaussian_strategy,
    applies=_applies("gaussian"),
    examples_scale=0.5,
    subject="gaussian",
)
def _gaussian_unmodified(ctx: Context, case: Case) -> None:
    be = ctx.backend
    ctx.record(case, "gaussian")
    mu, logvar = be.asarray(case.input), be.asarray(case.target)
    options = _gaussian_options(ctx, case)
    _call_gaussian(ctx, case, mu, logvar, options)
    backward = ctx.impl.gaussian_backward
    if backward is not None and not be.autograd:
        g = _grad_output(case)
        backward(g if np.ndim(g) == 0 else be.asarray(np.asarray(g)), mu, logvar, **options)
    operands = [("mu", mu, case.input), ("logvar", logvar, case.target)]
    operands += [
        (k, options[k], case.extra[k])
        for k in ("mu_prior", "logvar_prior")
        if isinstance(case.extra.get(k), np.ndarray)
    ]
    _assert_unchanged(be, operands, "gaussian")


def exact_gaussian_gradients(
    mu: np.ndarray, logvar: np.ndarray, /, *, grad_output: Any, **options: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r"""Return the exact gradients w.r.t. ``mu`` and ``logvar`` and their bounds (float64).

    :math:`\partial_\mu = \frac{g}{D} (\mu - \mu_0) e^{-\lambda_0}` and
    :math:`\partial_\lambda = \frac{g}{D} \tfrac12 (e^{\lambda - \lambda_0} - 1)`,
    at :data:`.oracle_logits.PRECISION` bits (``mu`` and ``logvar`` of the output's
    shape, as the suite draws them).
    """
    mp = oracle._mp()
    reduction = options["reduction"]
    arrays = np.broadcast_arrays(
        *(
            np.asarray(a, np.float64)
            for a in (
                mu,
                logvar,
                options.get("mu_prior", 0.0),
                options.get("logvar_prior", 0.0),
                grad_output,
            )
        )
    )
    d = {"none": 1, "sum": 1, "batchmean": mu.shape[0] if mu.ndim else 1, "mean": mu.size}[
        reduction
    ]
    g_mu, g_lv = np.empty(arrays[0].shape), np.empty(arrays[0].shape)
    s_mu, s_lv = np.empty(arrays[0].shape), np.empty(arrays[0].shape)
    for idx in np.ndindex(g_mu.shape):
        m, lv, m0, lv0, g = (mp.mpf(float(a[idx])) for a in arrays)
        gd = g / d
        inv = mp.exp(-lv0)
        em1 = mp.expm1(lv - lv0)
        g_mu[idx] = float(gd * (m - m0) * inv)
        g_lv[idx] = float(gd * em1 / 2)
        s_mu[idx] = float(abs(gd) * (abs(m - m0) + abs(m) + abs(m0)) * inv * (1 + abs(lv0)))
        s_lv[idx] = float(abs(gd) * (abs(em1) + (1 + abs(em1)) * (abs(lv) + abs(lv0))))
    return g_mu, g_lv, s_mu, s_lv


def assert_gaussian_gradient(
    grads: tuple[Any, Any],
    mu: np.ndarray,
    logvar: np.ndarray,
    /,
    *,
    grad_output: Any,
    **options: Any,
) -> None:
    """Assert the gradients w.r.t. ``mu`` and ``logvar`` agree with the exact closed form."""
    g_mu, g_lv, s_mu, s_lv = exact_gaussian_gradients(
        mu, logvar, grad_output=grad_output, **options
    )
    eps = float(np.finfo(mu.dtype).eps)
    floor = float(np.finfo(mu.dtype).smallest_normal)
    what = _gaussian_what(mu, logvar, options)
    for name, got, want, scale in (
        ("mu", grads[0], g_mu, s_mu),
        ("logvar", grads[1], g_lv, s_lv),
    ):
        with np.errstate(over="ignore"):
            ulp = np.spacing(np.abs(want).astype(mu.dtype)).astype(np.float64)
        tol = oracle.GAUSSIAN_ULPS * eps * scale + 2 * ulp + floor
        compare_values(got, want, tol, f"gradient w.r.t. {name}, gaussian_kl, {what}")


def _gaussian_gradient(ctx: Context, case: Case, g: Any) -> tuple[np.ndarray, np.ndarray]:
    fn = _function(ctx, "gaussian")
    be = ctx.backend
    ctx.record(case, "gaussian_gradient", grad=g)
    options = {
        k: (be.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in case.extra.items()
    }
    if be.autograd == "torch" and ctx.impl.differentiable:
        import torch

        m = be.asarray(case.input).requires_grad_(True)
        lv = be.asarray(case.target).requires_grad_(True)
        out = fn(m, lv, **options)
        gout = torch.as_tensor(np.asarray(g), dtype=out.dtype, device=out.device)
        gm, glv = torch.autograd.grad(out, (m, lv), gout.expand(out.shape))
        return tuple(a.detach().cpu().numpy().astype(np.float64) for a in (gm, glv))  # type: ignore[return-value]
    if be.autograd == "jax" and ctx.impl.differentiable:
        import jax
        import jax.numpy as jnp

        out, vjp = jax.vjp(
            lambda a, b: fn(a, b, **options), be.asarray(case.input), be.asarray(case.target)
        )
        gm, glv = vjp(jnp.broadcast_to(jnp.asarray(g, dtype=out.dtype), out.shape))
        return np.asarray(gm, dtype=np.float64), np.asarray(glv, dtype=np.float64)
    backward = ctx.impl.gaussian_backward
    if backward is None:
        raise NotApplicable(f"{ctx.impl.name} has no gaussian backward on {be.name}")
    gb = g if isinstance(g, float) else be.asarray(np.asarray(g))
    out = backward(gb, be.asarray(case.input), be.asarray(case.target), **options)
    return (
        np.asarray(be.to_numpy(out[0]), dtype=np.float64),
        np.asarray(be.to_numpy(out[1]), dtype=np.float64),
    )


@register(
    "gradients.gaussian_oracle",
    "the gradients of gaussian_kl w.r.t. mu and logvar agree with the exact closed form",
    strategy=_gaussian_strategy,
    applies=_applies("gaussian"),
    examples_scale=0.5,
    subject="gaussian",
)
def _gaussian_gradients(ctx: Context, case: Case) -> None:
    g = _grad_output(case)
    got = _gaussian_gradient(ctx, case, g)
    assert_gaussian_gradient(got, case.input, case.target, grad_output=g, **case.extra)
