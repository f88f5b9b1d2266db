r"""Properties of the KL divergence from logits and of the Gaussian KL.

They check the implementation's ``from_logits`` and ``gaussian`` functions:
an :class:`~.implementations.Implementation` (or a callable given to
``--impl``) may carry them as attributes ``from_logits(input, target, **options)``
(``kldiv_spec.kl_div_from_logits``'s keywords) and ``gaussian(mu, logvar,
**options)``; for ``--impl reference`` they are ``kldiv_spec``'s own. Without
them these properties are n/a. Values are judged against the mpmath oracle of
:mod:`.oracle_logits` and its bounds; the composition property also calls the
implementation's ``kl_div`` on ``log_softmax`` / ``softmax`` of the logits.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from hypothesis import strategies as st

import kldiv_spec

from . import oracle_logits as oracle
from .context import Context, fmt
from .properties import NotApplicable, register
from .strategies import Case

__all__: list[str] = []

_REDUCTIONS = ("none", "batchmean", "sum", "mean", "rowmean")


def _from_logits(ctx: Context) -> Any:
    fn = getattr(ctx.impl, "from_logits", None) or getattr(ctx.impl.fn, "from_logits", None)
    if fn is None and ctx.impl.name == "reference":
        fn = kldiv_spec.kl_div_from_logits
    if fn is None:
        raise NotApplicable(f"{ctx.impl.name} has no from_logits function")
    return fn


def _gaussian(ctx: Context) -> Any:
    fn = getattr(ctx.impl, "gaussian", None) or getattr(ctx.impl.fn, "gaussian", None)
    if fn is None and ctx.impl.name == "reference":
        fn = kldiv_spec.gaussian_kl
    if fn is None:
        raise NotApplicable(f"{ctx.impl.name} has no gaussian function")
    return fn


def _applies_logits(ctx: Context) -> str | None:
    try:
        _from_logits(ctx)
    except NotApplicable as exc:
        return str(exc)
    return None


def _applies_gaussian(ctx: Context) -> str | None:
    try:
        _gaussian(ctx)
    except NotApplicable as exc:
        return str(exc)
    return None


@st.composite
def _logits_cases(draw: Any, ctx: Context, spreads: tuple[float, ...] = (1.0, 5.0, 40.0)) -> Case:
    rows, vocab = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    dtype = draw(st.sampled_from((np.float64, np.float32)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spread = draw(st.sampled_from(spreads))
    s = rng.normal(0.0, spread, size=(rows, vocab)).astype(dtype)
    t = (s + rng.normal(0.0, spread, size=(rows, vocab))).astype(dtype)
    options: dict[str, Any] = {
        "temperature": draw(st.sampled_from((0.5, 1.0, 2.0, 4.0))),
        "reduction": draw(st.sampled_from(_REDUCTIONS)),
        "direction": draw(st.sampled_from(("forward", "reverse"))),
        "scale_by_temperature_squared": draw(st.booleans()),
    }
    if draw(st.booleans()):
        options["mask"] = np.asarray(draw(st.lists(st.booleans(), min_size=rows, max_size=rows)))
    return Case(s, t, options["reduction"], False, extra=options)


def _describe(case: Case) -> str:
    options = {k: v for k, v in case.extra.items() if k != "mask"}
    mask = case.extra.get("mask")
    return (
        f"logits {case.input.dtype}{list(case.input.shape)}, {options}"
        + ("" if mask is None else f", mask={mask.tolist()}")
        + f"\n  input = {case.input.tolist()!r}\n  target = {case.target.tolist()!r}"
    )


def _call(ctx: Context, case: Case, /, **override: Any) -> np.ndarray:
    fn = _from_logits(ctx)
    options = {**case.extra, **override}
    mask = options.pop("mask", None)
    be = ctx.backend
    if mask is not None:
        options["mask"] = be.asarray(mask)
    try:
        out = fn(be.asarray(case.input), be.asarray(case.target), **options)
    except NotImplementedError as exc:
        # the implementation says it does not offer this option (a mask, 'rowmean', ...)
        raise NotApplicable(f"{ctx.impl.name} does not implement {options}: {exc}") from None
    return np.asarray(be.to_numpy(out), dtype=np.float64)


def _exact(case: Case, /, **override: Any) -> oracle.ExactLogits:
    return oracle.from_logits(case.input, case.target, **{**case.extra, **override})


def _assert_value(got: np.ndarray, case: Case, /, **override: Any) -> None:
    exact = _exact(case, **override)
    reduction = {**case.extra, **override}["reduction"]
    if reduction == "none":
        want, tol = exact.terms, oracle.pointwise_tolerance(exact)
    else:
        value, t = oracle.reduce_logits(exact)
        want, tol = np.asarray(value), np.asarray(t)
    _compare(got, want, tol, f"value, {_describe(case)}")


def _compare(got: np.ndarray, want: np.ndarray, tol: Any, what: str) -> None:
    if got.shape != want.shape:
        msg = f"shape {got.shape}, expected {want.shape}: {what}"
        raise AssertionError(msg)
    with np.errstate(invalid="ignore"):
        infinite = np.isinf(want)
        same_special = np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(
            got[infinite], want[infinite]
        )
        finite = np.isfinite(want)
        err = np.where(finite, np.abs(got - want), 0.0)
    if not same_special:
        msg = f"NaN/inf pattern {fmt(got)}, expected {fmt(want)}: {what}"
        raise AssertionError(msg)
    bound = np.broadcast_to(tol, err.shape)
    bad = finite & ~(err <= bound)
    if bad.any():
        msg = f"error {fmt(err[bad])} above the bound {fmt(bound[bad])}: {what}"
        raise AssertionError(msg)


@register(
    "accuracy.logits_oracle",
    "kl_div_from_logits agrees with the exact (mpmath) oracle within its bound, every option",
    strategy=_logits_cases,
    applies=_applies_logits,
    examples_scale=0.5,
)
def _logits_oracle(ctx: Context, case: Case) -> None:
    _assert_value(_call(ctx, case), case)


@register(
    "math.logits_zero_at_identity",
    "kl_div_from_logits(s, s) is 0 in both directions (every term's log-ratio is 0)",
    strategy=_logits_cases,
    applies=_applies_logits,
    examples_scale=0.5,
)
def _logits_zero(ctx: Context, case: Case) -> None:
    same = Case(case.input, case.input.copy(), case.reduction, False, extra=case.extra)
    got = _call(ctx, same)
    if not (np.abs(got) <= 0.0).all():
        msg = f"kl_div_from_logits(s, s) = {fmt(got)}, not 0: {_describe(same)}"
        raise AssertionError(msg)


@register(
    "math.logits_non_negative",
    "every reduction of kl_div_from_logits (and each row of 'none' summed) is >= -bound",
    strategy=_logits_cases,
    applies=_applies_logits,
    examples_scale=0.5,
)
def _logits_non_negative(ctx: Context, case: Case) -> None:
    got = _call(ctx, case)
    exact = _exact(case)
    if case.extra["reduction"] == "none":
        lows = got.sum(axis=-1)
        tol = oracle.pointwise_tolerance(exact).sum(axis=-1)
    else:
        lows, tol = got.reshape(1), np.asarray([oracle.reduce_logits(exact)[1]])
    if not (lows >= -tol).all():
        msg = f"negative divergence {fmt(lows)} (bound {fmt(tol)}): {_describe(case)}"
        raise AssertionError(msg)


def _log_softmax(a: np.ndarray) -> np.ndarray:
    m = a.max(axis=-1, keepdims=True)
    return (a - m) - np.log(np.exp(a - m).sum(axis=-1, keepdims=True))


@register(
    "math.logits_composition",
    "kl_div_from_logits equals T**2 * kl_div(log_softmax(s/T), softmax(t/T)) of the same "
    "implementation (no mask, forward)",
    strategy=_logits_cases,
    applies=_applies_logits,
    examples_scale=0.5,
)
def _logits_composition(ctx: Context, case: Case) -> None:
    reduction = case.extra["reduction"]
    if reduction == "rowmean":
        reduction = "batchmean"  # 2-d logits: the same divisor
    if reduction not in ctx.reductions:
        raise NotApplicable(f"{ctx.impl.name} cannot express reduction {reduction!r}")
    options = {**case.extra, "reduction": reduction, "direction": "forward", "mask": None}
    plain = Case(case.input, case.target, reduction, False, extra=options)
    got = _call(ctx, plain)
    temp = options["temperature"]
    k = temp * temp if options["scale_by_temperature_squared"] else 1.0
    with np.errstate(all="ignore"):
        log_q = _log_softmax(case.input.astype(np.float64) / temp).astype(case.input.dtype)
        p = np.exp(_log_softmax(case.target.astype(np.float64) / temp)).astype(case.input.dtype)
    be = ctx.backend
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the 'mean' warning
        composed = ctx.impl.fn(be.asarray(log_q), be.asarray(p), reduction=reduction)
    want = np.asarray(be.to_numpy(composed), dtype=np.float64) * k
    exact = _exact(plain)
    if reduction == "none":
        tol = 2 * oracle.pointwise_tolerance(exact)
        # the composition's own xlogy(p, p) - p log q cancels: allow its scale too
        tol = tol + 8 * float(np.finfo(case.input.dtype).eps) * k * np.abs(p * log_q)
    else:
        tol = 2 * oracle.reduce_logits(exact)[1] + 8 * float(
            np.finfo(case.input.dtype).eps
        ) * k * float(np.abs(p * log_q).sum())
    _compare(got, want, tol, f"against the composition, {_describe(plain)}")


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
        ]
    )
    cases = []
    for direction in ("forward", "reverse"):
        for reduction in ("none", "sum"):
            for i in range(len(s)):
                options = {
                    "temperature": 1.0,
                    "reduction": reduction,
                    "direction": direction,
                    "scale_by_temperature_squared": True,
                }
                cases.append(Case(s[i : i + 1], t[i : i + 1], reduction, False, extra=options))
        masked = {
            "temperature": 2.0,
            "reduction": "rowmean",
            "direction": direction,
            "scale_by_temperature_squared": True,
            "mask": np.asarray([True, False, False, False, False, True, False]),
        }
        cases.append(Case(s, t, "rowmean", False, extra=masked))
        cases.append(
            Case(
                s, t, "sum", False, extra={**masked, "reduction": "sum", "mask": np.zeros(7, bool)}
            )
        )
    return cases


@register(
    "semantics.logits_edge_values",
    "excluded classes (-inf), rows without a softmax (NaN, +inf, all -inf), masked rows",
    cases=_edge_cases,
    applies=_applies_logits,
)
def _logits_edges(ctx: Context, case: Case) -> None:
    _assert_value(_call(ctx, case), case)


def _logits_gradient(ctx: Context, case: Case, g: Any) -> np.ndarray:
    fn = _from_logits(ctx)
    be = ctx.backend
    options = dict(case.extra)
    mask = options.pop("mask", None)
    if mask is not None:
        options["mask"] = be.asarray(mask)
    if be.autograd == "torch" and ctx.impl.differentiable:
        import torch

        x = be.asarray(case.input).requires_grad_(True)
        try:
            out = fn(x, be.asarray(case.target), **options)
        except NotImplementedError as exc:
            raise NotApplicable(f"{ctx.impl.name} does not implement {options}: {exc}") from None
        gout = torch.as_tensor(np.asarray(g), dtype=out.dtype, device=out.device).expand(out.shape)
        (gx,) = torch.autograd.grad(out, (x,), gout)
        return gx.detach().cpu().numpy().astype(np.float64)
    if be.autograd == "jax" and ctx.impl.differentiable:
        import jax
        import jax.numpy as jnp

        out, vjp = jax.vjp(
            lambda a: fn(a, be.asarray(case.target), **options), be.asarray(case.input)
        )
        (gx,) = vjp(jnp.broadcast_to(jnp.asarray(g, dtype=out.dtype), out.shape))
        return np.asarray(gx, dtype=np.float64)
    if fn is not kldiv_spec.kl_div_from_logits:
        raise NotApplicable(f"{ctx.impl.name} has no from-logits backward on {be.name}")
    gb = g if isinstance(g, float) else be.asarray(np.asarray(g))
    gx, _ = kldiv_spec.kl_div_from_logits_backward(
        gb, be.asarray(case.input), be.asarray(case.target), **options
    )
    return np.asarray(be.to_numpy(gx), dtype=np.float64)


@register(
    "gradients.logits_oracle",
    "the gradient w.r.t. the student logits agrees with the exact oracle within its bound",
    strategy=_logits_cases,
    applies=_applies_logits,
    examples_scale=0.5,
)
def _logits_gradients(ctx: Context, case: Case) -> None:
    shape = case.input.shape
    g: Any = 0.75
    if case.extra["reduction"] == "none":
        g = (0.5 + (np.arange(math.prod(shape)) % 3)).reshape(shape).astype(case.input.dtype)
    got = _logits_gradient(ctx, case, g)
    exact = oracle.from_logits(case.input, case.target, grad_output=g, **case.extra)
    tol, _ = oracle.gradient_tolerance(exact)
    _compare(got, exact.grad_input, tol, f"gradient, {_describe(case)}")


# --------------------------------------------------------------------------- Gaussian


@st.composite
def _gaussian_cases(draw: Any, ctx: Context) -> Case:
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 5)))
    dtype = draw(st.sampled_from((np.float64, np.float32)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mu = rng.normal(0, 3, size=shape).astype(dtype)
    logvar = rng.normal(0, 2, size=shape).astype(dtype)
    options: dict[str, Any] = {"reduction": draw(st.sampled_from(ctx.reductions or ("sum",)))}
    if draw(st.booleans()):
        options["mu_prior"] = rng.normal(0, 1, size=shape[-1:]).astype(dtype)
        options["logvar_prior"] = rng.normal(0, 1, size=shape[-1:]).astype(dtype)
    return Case(mu, logvar, options["reduction"], False, extra=options)


def _gaussian_call(ctx: Context, case: Case, /, **override: Any) -> np.ndarray:
    be = ctx.backend
    options = {
        k: (be.asarray(v) if isinstance(v, np.ndarray) else v)
        for k, v in {**case.extra, **override}.items()
    }
    out = _gaussian(ctx)(be.asarray(case.input), be.asarray(case.target), **options)
    return np.asarray(be.to_numpy(out), dtype=np.float64)


@register(
    "math.gaussian_zero_at_identity",
    "gaussian_kl(mu, logvar, mu_prior=mu, logvar_prior=logvar) is exactly 0",
    strategy=_gaussian_cases,
    applies=_applies_gaussian,
    examples_scale=0.5,
)
def _gaussian_zero(ctx: Context, case: Case) -> None:
    got = _gaussian_call(ctx, case, mu_prior=case.input, logvar_prior=case.target)
    if not (got == 0).all():
        msg = f"the KL of a Gaussian from itself is {fmt(got)}, not exactly 0: {case.describe()}"
        raise AssertionError(msg)


@register(
    "accuracy.gaussian_oracle",
    "gaussian_kl agrees with the exact (mpmath) closed form within its bound, and is >= 0",
    strategy=_gaussian_cases,
    applies=_applies_gaussian,
    examples_scale=0.5,
)
def _gaussian_oracle(ctx: Context, case: Case) -> None:
    got = _gaussian_call(ctx, case)
    mu_p = case.extra.get("mu_prior", 0.0)
    lv_p = case.extra.get("logvar_prior", 0.0)
    value, scale = oracle.gaussian(case.input, case.target, mu_p, lv_p)
    eps = float(np.finfo(case.input.dtype).eps)
    reduction = case.extra["reduction"]
    floor = float(np.finfo(case.input.dtype).smallest_normal)
    if reduction == "none":
        want, tol = value, oracle.GAUSSIAN_ULPS * eps * scale + floor
    else:
        d = {"sum": 1, "batchmean": case.input.shape[0], "mean": value.size}[reduction]
        want = np.asarray(math.fsum(value.ravel()) / d)
        tol = (oracle.GAUSSIAN_ULPS + value.size) * eps * float(scale.sum()) / d + floor
    _compare(got, want, tol, f"gaussian_kl, {case.describe()}, {sorted(case.extra)}")
    if not (got >= 0).all():
        msg = f"negative Gaussian KL {fmt(got)}: {case.describe()}"
        raise AssertionError(msg)
