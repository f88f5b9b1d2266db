r"""Group ``math``: what holds for every correct KL divergence of valid distributions.

Tolerances are the oracle's bounds (see :mod:`.oracle`): a property "holds"
when it holds up to the rounding error a correct float evaluation may make.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import strategies as st

from .context import Context, fmt
from .oracle import pointwise, reduce
from .properties import register
from .strategies import Case, distributions

__all__: list[str] = []


def _valid(ctx: Context, **kwargs: Any) -> Any:
    return distributions(log_targets=ctx.log_targets, reductions=ctx.reductions, **kwargs)


def _row_sums(values: np.ndarray) -> np.ndarray:
    flat = values.reshape(-1, values.shape[-1]) if values.ndim else values.reshape(1, 1)
    return np.array([math.fsum(r) for r in flat])


def _bound(case: Case, reduction: str, ctx: Context | None = None) -> float:
    """Return the oracle's bound of ``case``'s ``reduction`` ('none': of its sum).

    With ``ctx`` the bound is that of the precision of the last result
    (:meth:`.context.Context.precision`): a float32 result of float64 operands
    is held to float32's bound.
    """
    exact = pointwise(case.input, case.target, log_target=case.log_target)
    if ctx is not None:
        exact.dtype = ctx.precision(exact.dtype)
    exact.floor = float(np.finfo(exact.dtype).smallest_normal)
    return reduce(exact, "sum" if reduction == "none" else reduction, case.input.shape)[1]


@register(
    "math.non_negative",
    "sum/batchmean/mean (and each row of 'none' summed) are >= 0 for valid distributions",
    strategy=_valid,
)
def _non_negative(ctx: Context, case: Case) -> None:
    for reduction in ctx.some("sum", "batchmean", "mean", "none"):
        got = ctx.value(case, reduction)
        tol = _bound(case, reduction, ctx)
        lows = _row_sums(got) if reduction == "none" else got.reshape(1)
        if not (lows >= -tol).all():
            msg = f"reduction={reduction!r}: negative KL divergence {fmt(lows)} (bound {tol:.3g})"
            raise AssertionError(msg)


@register(
    "math.zero_at_identity",
    "kl_div(log p, p) is 0 for every reduction and p > 0 (exactly 0 with log_target)",
    # p = 0 is excluded: there log p = -inf and PyTorch gives 0 * inf = NaN
    strategy=lambda ctx: _valid(ctx, kinds=("softmax", "peaked", "tiny", "near_uniform")),
)
def _zero_at_identity(ctx: Context, case: Case) -> None:
    p = case.target
    if case.log_target:
        same = Case(p, p, case.reduction, True)
    else:
        with np.errstate(divide="ignore"):
            same = Case(np.log(p), p, case.reduction, False)
    exact = pointwise(same.input, same.target, log_target=same.log_target)
    for reduction in ctx.reductions:
        got = ctx.value(same, reduction)
        if same.log_target:
            ok, tol = bool((got == 0).all()), 0.0
        else:
            exact.dtype = ctx.precision(p.dtype)
            tol = (
                reduce(exact, reduction, same.input.shape)[1]
                if reduction != "none"
                else float(np.max(exact.scale, initial=0.0))
                * 8
                * float(np.finfo(ctx.precision(p.dtype)).eps)
            )
            ok = bool((np.abs(got) <= tol).all())
        if not ok:
            msg = (
                f"reduction={reduction!r}: kl_div(log p, p) = {fmt(got)}, not 0 (bound {tol:.3g})"
            )
            raise AssertionError(msg)


@st.composite
def _perturbed(draw: Any, ctx: Context) -> Case:
    shape = (draw(st.integers(1, 4)), draw(st.integers(2, 8)))
    kinds = ("softmax", "peaked", "near_uniform")
    case = draw(_valid(ctx, shape=shape, kinds=kinds, dtypes=(np.float64,)))
    p = np.exp(case.target) if case.log_target else case.target
    noise = draw(st.floats(0.05, 1.0))
    q = p * np.exp(noise * np.sin(np.arange(p.size).reshape(p.shape) * 1.7 + 0.3))
    q = q / q.sum(axis=-1, keepdims=True)
    return Case(np.log(q), case.target, case.reduction, case.log_target)


def _gibbs_bound(case: Case) -> np.ndarray:
    r"""Lower bound of each row's sum: :math:`P \log(P/Q) + \tfrac{P}{2}\|p/P - q/Q\|_1^2`.

    With :math:`P = \sum p`, :math:`Q = \sum e^{x}` (rounding makes neither exactly 1):
    :math:`\sum p \log(p/q) = P\,[\mathrm{KL}(p/P \,\|\, q/Q) + \log(P/Q)]`, and Pinsker's
    inequality bounds the KL term.
    """
    p = np.exp(case.target) if case.log_target else case.target
    q = np.exp(case.input)
    p2, q2 = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
    out = []
    for pr, qr in zip(p2, q2, strict=True):
        big_p, big_q = math.fsum(pr), math.fsum(qr)
        diff = math.fsum([*pr, *(-qr)])
        l1 = float(np.abs(pr / big_p - qr / big_q).sum())
        out.append(big_p * math.log1p(diff / big_q) + 0.5 * big_p * l1**2 - 8e-16 * big_p)
    return np.array(out)


@register(
    "math.gibbs_pinsker",
    "for q != p each row's sum is >= (1/2)||p - q||_1^2 > 0 (Gibbs' inequality, Pinsker's bound)",
    strategy=lambda ctx: _perturbed(ctx),
)
def _gibbs(ctx: Context, case: Case) -> None:
    rows_bound = _gibbs_bound(case)
    for reduction in ctx.some("none", "sum", "batchmean"):
        got = ctx.value(case, reduction)
        tol = _bound(case, reduction, ctx)
        if reduction == "none":
            rows, bound = _row_sums(got), rows_bound
        else:
            divisor = case.input.shape[0] if reduction == "batchmean" else 1
            rows, bound = np.array([float(got) * divisor]), np.array([math.fsum(rows_bound)])
        if not (rows >= bound - tol).all():
            msg = (
                f"reduction={reduction!r}: KL(p || q) = {fmt(rows)} is below Gibbs' and "
                f"Pinsker's lower bound {fmt(bound)} for q != p"
            )
            raise AssertionError(msg)


@st.composite
def _two_batches(draw: Any, ctx: Context) -> Case:
    n = draw(st.integers(1, 6))
    a = draw(_valid(ctx, shape=(draw(st.integers(1, 3)), n), dtypes=(np.float64,)))
    b = draw(
        distributions(
            shape=(draw(st.integers(1, 3)), n), log_targets=(a.log_target,), dtypes=(np.float64,)
        )
    )
    return Case(a.input, a.target, a.reduction, a.log_target, extra={"b": b})


@register(
    "math.additivity",
    "the loss of a concatenated batch is the sum of the losses of its parts",
    strategy=lambda ctx: _two_batches(ctx),
)
def _additivity(ctx: Context, case: Case) -> None:
    b: Case = case.extra["b"]
    both = Case(
        np.concatenate([case.input, b.input]),
        np.concatenate([case.target, b.target]),
        case.reduction,
        case.log_target,
    )
    if "none" in ctx.reductions:
        whole = ctx.value(both, "none")
        parts = np.concatenate([ctx.value(case, "none"), ctx.value(b, "none")])
        if not np.array_equal(whole, parts, equal_nan=True):
            msg = "reduction='none' of a concatenated batch differs from the concatenated parts"
            raise AssertionError(msg)
    weights = {
        "sum": lambda c: 1,
        "batchmean": lambda c: c.input.shape[0],
        "mean": lambda c: c.input.size,
    }
    for reduction in ctx.some("sum", "batchmean", "mean", "none"):
        if reduction == "none":
            continue
        w = weights[reduction]
        whole = float(ctx.value(both, reduction)) * w(both)
        parts = float(ctx.value(case, reduction)) * w(case) + float(ctx.value(b, reduction)) * w(b)
        tol = (
            _bound(both, reduction, ctx) + _bound(case, reduction, ctx) + _bound(b, reduction, ctx)
        ) * w(both)
        if not abs(whole - parts) <= tol:
            msg = (
                f"reduction={reduction!r}: whole batch gives {whole!r} (times its divisor), "
                f"the parts {parts!r}"
            )
            raise AssertionError(msg)


@register(
    "math.permutation_invariance",
    "permuting the support permutes 'none' and leaves the reductions unchanged",
    strategy=lambda ctx: st.tuples(_valid(ctx), st.randoms(use_true_random=False)).map(
        lambda cr: Case(*_permuted(cr[0], cr[1]))
    ),
)
def _permutation(ctx: Context, case: Case) -> None:
    perm = case.extra["perm"]
    shuffled = Case(case.input[..., perm], case.target[..., perm], case.reduction, case.log_target)
    for reduction in ctx.reductions:
        a, b = ctx.value(case, reduction), ctx.value(shuffled, reduction)
        if reduction == "none":
            if not np.array_equal(a[..., perm], b, equal_nan=True):
                msg = "reduction='none' is not permuted along with the support"
                raise AssertionError(msg)
        elif not abs(float(a) - float(b)) <= 2 * _bound(case, reduction, ctx):
            msg = f"reduction={reduction!r}: {float(a)!r} before, {float(b)!r} after permuting"
            raise AssertionError(msg)


def _permuted(case: Case, rnd: Any) -> tuple[Any, ...]:
    perm = list(range(case.input.shape[-1]))
    rnd.shuffle(perm)
    return case.input, case.target, case.reduction, case.log_target, None, {"perm": perm}


@register(
    "math.reductions_agree",
    "sum == fsum(none), mean == sum / numel, batchmean == sum / input.shape[0]",
    strategy=_valid,
)
def _reductions_agree(ctx: Context, case: Case) -> None:
    ctx.need("sum")
    total = float(ctx.value(case, "sum"))
    tol = _bound(case, "sum")
    expected = {
        "none": lambda v: math.fsum(v.ravel()),
        "mean": lambda v: float(v) * case.input.size,
        "batchmean": lambda v: float(v) * case.input.shape[0],
    }
    for reduction in ctx.some("sum", "none", "mean", "batchmean"):
        if reduction == "sum":
            continue
        got = expected[reduction](ctx.value(case, reduction))
        if not abs(got - total) <= 2 * tol * max(1, case.input.size):
            msg = (
                f"reduction={reduction!r} (times its divisor) gives {got!r}, 'sum' gives {total!r}"
            )
            raise AssertionError(msg)
