"""Group ``semantics``: PyTorch's behaviour beyond the formula.

The edge-value table (zeros, negative and > 1 targets, +-inf, NaN), empty and
0-d arrays, broadcasting (``batchmean`` divides by the *input's* first
dimension), dtype promotion, the result's library/dtype/shape, the errors for
a bad ``reduction`` and for integer arrays, and the ``mean`` warning.
The sign of a zero is compared by one SHOULD property only,
``semantics.signed_zeros``: no MUST property fails on it alone.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from hypothesis import strategies as st

from .checks_gradients import gradients_available, take_gradients
from .context import Context, assert_pointwise, assert_reduced, check_against_oracle
from .opinfo import samples
from .oracle import pointwise
from .properties import NotApplicable, register
from .strategies import (
    FLOATS,
    SPEC_EDGE_TABLE,
    Case,
    broadcast_cases,
    divisor_cases,
    edge_cases,
    edge_pairs,
    regular_cases,
)

__all__ = ["ARGUMENT_ERRORS", "DTYPE_ERRORS", "REDUCTION_ERRORS", "SHAPE_ERRORS"]


def _edge_grid(ctx: Context) -> list[Case]:
    """Every (input, target) pair of the table as one 'none' call, then each pair reduced."""
    cases = []
    for log_target in ctx.log_targets:
        pairs = edge_pairs(log_target)
        for dtype in (np.float64, np.float32):
            x = np.array([p[0] for p in pairs], dtype=dtype)
            t = np.array([p[1] for p in pairs], dtype=dtype)
            if "none" in ctx.reductions:
                cases.append(Case(x, t, "none", log_target))
        for xv, tv in pairs:
            for reduction in ctx.reductions:
                if reduction != "none":
                    x1 = np.array([xv, 0.0]) if reduction != "sum" else np.array([xv])
                    t1 = np.array([tv, 1.0 if not log_target else 0.0])[: x1.size]
                    cases.append(Case(x1, t1, reduction, log_target))
    return cases


@register(
    "semantics.edge_values",
    "every row of PyTorch's edge-value table (0, <0, >1, +-inf, NaN targets and inputs), "
    "each reduction",
    cases=_edge_grid,
)
def _edge_values(ctx: Context, case: Case) -> None:
    check_against_oracle(ctx, case)


@register(
    "semantics.edge_mixtures",
    "NaN and inf propagate into every reduction as in IEEE summation",
    strategy=lambda ctx: edge_cases(log_targets=ctx.log_targets, reductions=ctx.reductions),
)
def _edge_mixtures(ctx: Context, case: Case) -> None:
    for reduction in ctx.reductions:
        check_against_oracle(ctx, case, reduction)


def _empty(ctx: Context) -> list[Case]:
    shapes = [(0,), (0, 3), (3, 0), (2, 0, 4)]
    return [
        Case(np.zeros(s), np.zeros(s), r, lt)
        for s in shapes
        for r in ctx.reductions
        for lt in ctx.log_targets
    ]


@register(
    "semantics.empty",
    "empty arrays: sum 0, mean NaN, batchmean NaN iff input.shape[0] == 0, 'none' empty",
    cases=_empty,
)
def _empty_check(ctx: Context, case: Case) -> None:
    check_against_oracle(ctx, case)


@st.composite
def _zero_dim(draw: Any, ctx: Context) -> Case:
    case = draw(
        regular_cases(
            log_targets=ctx.log_targets, reductions=ctx.reductions, min_dims=1, max_dims=1
        )
    )
    which = draw(st.sampled_from(["both", "input", "target"]))
    x, t = case.input, case.target
    if which in ("both", "input"):
        x = x.reshape(-1)[:1].reshape(())
    if which in ("both", "target"):
        t = t.reshape(-1)[:1].reshape(())
    return Case(x, t, case.reduction, case.log_target)


@register(
    "semantics.zero_dim",
    "0-d input and/or target: 'none' keeps the broadcast shape, batchmean of 0-d input is the sum",
    strategy=lambda ctx: _zero_dim(ctx),
)
def _zero_dim_check(ctx: Context, case: Case) -> None:
    for reduction in ctx.reductions:
        check_against_oracle(ctx, case, reduction)


@register(
    "semantics.broadcasting",
    "input and target broadcast silently; batchmean divides by the input's first dimension",
    strategy=lambda ctx: broadcast_cases(log_targets=ctx.log_targets, reductions=ctx.reductions),
)
def _broadcasting(ctx: Context, case: Case) -> None:
    for reduction in ctx.reductions:
        check_against_oracle(ctx, case, reduction)


@register(
    "semantics.broadcast_divisors",
    "fixed broadcasts ((1,K)/(B,K), (K,)/(B,K), (B,1)/(1,K), 0-d/(B,K), both ways): "
    "batchmean divides by input.shape[0], mean by the result's numel",
    cases=lambda ctx: divisor_cases(
        log_targets=ctx.log_targets, reductions=ctx.some("sum", "batchmean", "mean")
    ),
)
def _broadcast_divisors(ctx: Context, case: Case) -> None:
    check_against_oracle(ctx, case)


#: The exception classes that signal an invalid argument, which a caller can
#: catch as a refusal. Any other exception (AttributeError, IndexError, KeyError,
#: ZeroDivisionError, ...) is a crash, not a refusal: a MUST failure.
ARGUMENT_ERRORS: tuple[type[Exception], ...] = (TypeError, ValueError, RuntimeError)
#: The class each kind of invalid call should raise: docs/spec.md's, or PyTorch's.
#: Raising another of :data:`ARGUMENT_ERRORS` is a SHOULD failure (``semantics.error_class``).
SHAPE_ERRORS: tuple[type[Exception], ...] = (ValueError, RuntimeError)
DTYPE_ERRORS: tuple[type[Exception], ...] = (TypeError, RuntimeError)
REDUCTION_ERRORS: tuple[type[Exception], ...] = (ValueError,)


def _names(classes: tuple[type[Exception], ...]) -> str:
    return " or ".join(e.__name__ for e in classes)


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _expect_refusal(ctx: Context, case: Case, what: str) -> None:
    """Assert that calling ``case`` raises an argument error; name what it did otherwise."""
    try:
        ctx.call(case, kind="error", errors=ARGUMENT_ERRORS)
    except ARGUMENT_ERRORS:
        return
    except Exception as exc:
        msg = (
            f"{what} raised {_first_line(exc)}: a crash, not an error for invalid "
            f"arguments ({_names(ARGUMENT_ERRORS)})"
        )
        raise AssertionError(msg) from exc
    msg = f"{what} did not raise (expected {_names(ARGUMENT_ERRORS)})"
    raise AssertionError(msg)


def _shape_what(case: Case) -> str:
    return f"shapes {case.input.shape} and {case.target.shape}"


def _dtype_what(case: Case) -> str:
    return f"input {case.input.dtype} and target {case.target.dtype}"


def _reduction_what(case: Case) -> str:
    return f"reduction={case.reduction!r}"


def _incompatible(ctx: Context) -> list[Case]:
    pairs = [((2, 3), (3, 2)), ((4,), (3,)), ((2, 3), (2,))]
    return [Case(np.zeros(a), np.full(b, 0.5), r) for a, b in pairs for r in ctx.reductions]


@register(
    "semantics.incompatible_shapes",
    "shapes that do not broadcast raise an error for invalid arguments, not a crash",
    cases=_incompatible,
)
def _incompatible_check(ctx: Context, case: Case) -> None:
    _expect_refusal(ctx, case, _shape_what(case))


def _dtype_cases(ctx: Context) -> list[Case]:
    dts = [np.float32, np.float64]
    if hasattr(ctx.backend.xp, "float16"):
        dts.append(np.float16)
    x = np.log(np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]]))
    t = np.array([[0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])
    return [
        Case(x.astype(a), (np.log(t) if lt else t).astype(b), r, lt)
        for a, b in itertools.product(dts, dts)
        for r in ctx.reductions
        for lt in ctx.log_targets
    ]


def _expect_dtype(ctx: Context, case: Case, result: Any) -> None:
    name = np.result_type(case.input.dtype, case.target.dtype).name
    want = getattr(ctx.backend.xp, name)
    if result.dtype != want:
        msg = (
            f"input {case.input.dtype} and target {case.target.dtype} gave a {result.dtype} "
            f"result, expected {name}"
        )
        raise AssertionError(msg)


@register(
    "semantics.dtypes",
    "the result has the promoted dtype of input and target (f32+f64 -> f64, f16+f32 -> f32)",
    cases=_dtype_cases,
)
def _dtypes(ctx: Context, case: Case) -> None:
    call = ctx.call(case)
    _expect_dtype(ctx, case, call.result)
    # PyTorch evaluates xlogy(t, t) in the target's own dtype before promoting, so
    # values are held to the bound of the less precise of the two dtypes.
    exact = ctx.exact(case)
    exact.dtype = min((case.input.dtype, case.target.dtype), key=lambda d: d.itemsize)
    ctx.judge_at_result(exact)
    if case.reduction == "none":
        assert_pointwise(call.value, exact)
    else:
        assert_reduced(call.value, exact, case.reduction, case.input.shape)


@register(
    "semantics.result",
    "the result is an array of the input's library, of the right shape and dtype",
    strategy=lambda ctx: st.one_of(
        regular_cases(
            log_targets=ctx.log_targets, reductions=ctx.reductions, min_dims=0, max_dims=5
        ),
        broadcast_cases(log_targets=ctx.log_targets, reductions=ctx.reductions),
    ),
)
def _result(ctx: Context, case: Case) -> None:
    call = ctx.call(case)
    out = call.result
    if not ctx.backend.is_array(out):
        kind = f"{type(out).__module__}.{type(out).__name__}"
        msg = f"the result is a {kind}, not a {ctx.backend.name} array"
        raise AssertionError(msg)
    want = np.broadcast_shapes(case.input.shape, case.target.shape)
    want = want if case.reduction == "none" else ()
    if tuple(out.shape) != want:
        msg = f"reduction={case.reduction!r}: result shape {tuple(out.shape)}, expected {want}"
        raise AssertionError(msg)
    _expect_dtype(ctx, case, out)


def _bad_reductions(ctx: Context) -> list[Case]:
    x, t = np.log(np.array([0.5, 0.5])), np.array([0.3, 0.7])
    return [Case(x, t, r) for r in ("batch_mean", "Mean", "avg", "max", "")]


@register(
    "semantics.bad_reduction",
    "an unknown reduction raises an error for invalid arguments, not a crash",
    cases=_bad_reductions,
)
def _bad_reduction(ctx: Context, case: Case) -> None:
    _expect_refusal(ctx, case, _reduction_what(case))


def _integer_cases(ctx: Context) -> list[Case]:
    f = np.array([0.25, 0.75])
    bad = [
        np.array([1, 0], dtype=np.int64),
        np.array([1, 0], dtype=np.int32),
        np.array([True, False]),
    ]
    if hasattr(ctx.backend.xp, "complex128"):
        bad.append(np.array([0.25 + 0j, 0.75 + 0j]))
    reduction = ctx.reductions[0]
    return [Case(i, f, reduction) for i in bad] + [Case(f, i, reduction) for i in bad]


@register(
    "semantics.non_float_input",
    "integer, boolean or complex input or target raises an error for invalid arguments",
    cases=_integer_cases,
)
def _integer_input(ctx: Context, case: Case) -> None:
    _expect_refusal(ctx, case, _dtype_what(case))


def _error_cases(ctx: Context) -> list[Case]:
    kinds = [
        (_incompatible(ctx), SHAPE_ERRORS, _shape_what),
        (_integer_cases(ctx), DTYPE_ERRORS, _dtype_what),
        (_bad_reductions(ctx), REDUCTION_ERRORS, _reduction_what),
    ]
    return [
        Case(c.input, c.target, c.reduction, c.log_target, extra={"want": want, "what": what})
        for cases, want, what in kinds
        for c in cases
    ]


@register(
    "semantics.error_class",
    "invalid calls raise the specified class: ValueError for shapes and reduction, TypeError "
    "for dtypes (PyTorch's RuntimeError accepted for shapes and dtypes)",
    cases=_error_cases,
    level="SHOULD",
)
def _error_class(ctx: Context, case: Case) -> None:
    """Judge the class of an argument error; no error, or a crash, is the MUST properties' case."""
    want: tuple[type[Exception], ...] = case.extra["want"]
    try:
        ctx.call(case, kind="error", errors=want)
    except want:
        return
    except ARGUMENT_ERRORS as exc:
        msg = f"{case.extra['what'](case)} raised {_first_line(exc)}, not {_names(want)}"
        raise AssertionError(msg) from exc
    except Exception:  # a crash: semantics.incompatible_shapes and the others report it
        return


def _warning_cases(ctx: Context) -> list[Case]:
    x, t = np.log(np.array([[0.5, 0.5]])), np.array([[0.3, 0.7]])
    return [Case(x, t, r, lt) for r in ctx.reductions for lt in ctx.log_targets]


@register(
    "semantics.mean_warning",
    "reduction='mean' warns (UserWarning naming 'batchmean'); no other reduction warns",
    cases=_warning_cases,
    level="SHOULD",
)
def _mean_warning(ctx: Context, case: Case) -> None:
    if "mean" not in ctx.reductions:
        raise NotApplicable(f"{ctx.impl.name} cannot express reduction 'mean'")
    caught = ctx.call(case, kind="warning").warnings
    users = [w for w in caught if issubclass(w.category, UserWarning)]
    if case.reduction == "mean":
        if not any("batchmean" in str(w.message) for w in users):
            msg = "reduction='mean' did not emit PyTorch's UserWarning about 'batchmean'"
            raise AssertionError(msg)
        if len(users) > 1:
            msg = f"reduction='mean' warned {len(users)} times"
            raise AssertionError(msg)
    elif caught:
        first = caught[0]
        msg = f"reduction={case.reduction!r} warned: {first.category.__name__}: {first.message}"
        raise AssertionError(msg)


def _opinfo(ctx: Context) -> list[Case]:
    return [
        c for c in samples() if c.reduction in ctx.reductions and c.log_target in ctx.log_targets
    ]


@register(
    "semantics.opinfo",
    "PyTorch's own OpInfo samples for nn.functional.kl_div (float32 and float64)",
    cases=_opinfo,
)
def _opinfo_check(ctx: Context, case: Case) -> None:
    check_against_oracle(ctx, case)


def _strided_applies(ctx: Context) -> str | None:
    if ctx.backend.library in ("numpy", "torch"):
        return None
    return f"{ctx.backend.name} arrays have no user-visible memory layout"


def _strided_view(be: Any, a: np.ndarray) -> Any:
    """Return a non-contiguous backend view holding the values of ``a``.

    ``a`` is written transposed into every other element of a larger array, moved
    to the backend, and viewed back: element strides ``(2, 2 n_0, ...)`` reversed.
    """
    big = np.zeros((*a.shape[::-1], 2), dtype=a.dtype)
    big[..., 0] = a.T
    return be.xp.permute_dims(be.asarray(big)[..., 0], tuple(reversed(range(a.ndim))))


@register(
    "semantics.layouts",
    "non-contiguous (transposed, strided) input and target give the same result",
    strategy=lambda ctx: regular_cases(
        log_targets=ctx.log_targets, reductions=ctx.reductions, min_dims=2, max_dims=3
    ),
    applies=_strided_applies,
)
def _layouts(ctx: Context, case: Case) -> None:
    be = ctx.backend
    x, t = _strided_view(be, case.input), _strided_view(be, case.target)
    got = ctx.call(case, input=x, target=t, kind="layout").value
    exact = ctx.judge_at_result(ctx.exact(case))
    try:
        if case.reduction == "none":
            assert_pointwise(got, exact)
        else:
            assert_reduced(got, exact, case.reduction, case.input.shape)
    except AssertionError as exc:
        msg = f"non-contiguous inputs: {exc}"
        raise AssertionError(msg) from None


def _signed_zero_cases(ctx: Context) -> list[Case]:
    """Return the rows of the specification's edge-value table: one 'none' call per form."""
    if "none" not in ctx.reductions:
        raise NotApplicable(f"{ctx.impl.name} cannot express reduction 'none'")
    cases = []
    for log_target in ctx.log_targets:
        rows = [r for r in SPEC_EDGE_TABLE if r[4] == log_target]
        for dtype in FLOATS:
            x = np.array([r[1] for r in rows], dtype=dtype)
            t = np.array([r[3] for r in rows], dtype=dtype)
            cases.append(Case(x, t, "none", log_target))
    return cases


def ieee_gradients(
    x: np.ndarray, t: np.ndarray, /, *, log_target: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Return PyTorch's evaluation of both pointwise gradients (upstream 1) in the dtype.

    Their zeros carry the sign PyTorch's order of operations gives: ``-(t g)``
    for the input, ``(g (t - x)) e^t + g e^t`` for a log-target. What
    ``semantics.signed_zeros`` and its reproductions compare signs with.
    """
    g = np.ones_like(x)
    with np.errstate(all="ignore"):
        if log_target:
            e = np.exp(t)
            return -(g * e), (g * (t - x)) * e + g * e
        ok = (t > 0) & np.isfinite(t)
        return -(t * g), np.where(ok, g * (np.log(np.where(ok, t, 1)) + 1 - x), np.nan)


def _assert_zero_signs(got: np.ndarray, want: np.ndarray, what: str, case: Case) -> None:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    differ = (got == 0) & (want == 0) & (np.signbit(got) != np.signbit(want))
    if differ.any():
        i = int(np.argmax(differ))
        msg = (
            f"{what}: the sign of a zero differs in {int(differ.sum())} of {differ.size} "
            f"elements; first at x = {case.input[i]!r}, t = {case.target[i]!r} "
            f"(log_target={case.log_target}): got {got[i]!r}, expected {want[i]!r}"
        )
        raise AssertionError(msg)


@register(
    "semantics.signed_zeros",
    "the zeros of the edge-value table carry PyTorch's sign (forward, and both gradients "
    "where they can be taken): -0.0 where it gives -0.0",
    cases=_signed_zero_cases,
    level="SHOULD",
)
def _signed_zeros(ctx: Context, case: Case) -> None:
    got = ctx.call(case, kind="signed_zeros").value
    want = pointwise(case.input, case.target, log_target=case.log_target).value
    _assert_zero_signs(got, want, "reduction='none'", case)
    if not gradients_available(ctx):
        return
    grads = take_gradients(ctx, case, np.ones_like(case.input))
    ctx.record(case, "signed_zeros_gradient", grad=np.ones_like(case.input))
    signs = ieee_gradients(case.input, case.target, log_target=case.log_target)
    for name, g, w in zip(("input", "target"), grads, signs, strict=True):
        _assert_zero_signs(g, w, f"gradient w.r.t. {name}", case)
