r"""Group ``accuracy``: every result against the exact oracle, within the documented bounds.

The bounds (see :mod:`.oracle`): ``'none'`` within ``POINTWISE_ULPS`` ULPs of the
element's scale :math:`|t \log t| + |t x|`; the reductions within
``(POINTWISE_ULPS + n)`` epsilons of the summed scales, over the divisor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from .context import Context, check_against_oracle
from .properties import register
from .strategies import Case, distributions, regular_cases, subnormal_cases

__all__: list[str] = []


def _all(ctx: Context) -> Any:
    return st.one_of(
        distributions(log_targets=ctx.log_targets, reductions=ctx.reductions),
        regular_cases(log_targets=ctx.log_targets, reductions=ctx.reductions),
    )


@register(
    "accuracy.pointwise",
    "'none' within 4 ULPs of the exact value's scale (softmax, one-hot, uniform, tiny, t > 1)",
    strategy=_all,
)
def _pointwise(ctx: Context, case: Case) -> None:
    ctx.need("none")
    check_against_oracle(ctx, case, "none")


@register(
    "accuracy.reductions",
    "sum/mean/batchmean within (4 + n) eps of the summed scales of the exact sum",
    strategy=_all,
)
def _reductions(ctx: Context, case: Case) -> None:
    for reduction in ctx.some("sum", "mean", "batchmean"):
        check_against_oracle(ctx, case, reduction)


@st.composite
def _large(draw: Any, ctx: Context) -> Case:
    n = draw(st.sampled_from([1000, 4096, 20000]))
    rows = draw(st.integers(1, 2))
    return draw(
        distributions(shape=(rows, n), log_targets=ctx.log_targets, reductions=ctx.reductions)
    )


@register(
    "accuracy.large_support",
    "supports of 1000 to 20000 categories, every reduction against the exact oracle",
    strategy=lambda ctx: _large(ctx),
    examples_scale=0.15,
)
def _large_support(ctx: Context, case: Case) -> None:
    # Each example is checked in every log_target form the implementation takes (the
    # drawn targets, and the same distribution as log-probabilities or probabilities):
    # with the few examples this costly property runs, a drawn form alone could miss one.
    forms = [case]
    other = not case.log_target
    if other in ctx.log_targets:
        with np.errstate(divide="ignore"):
            target = np.log(case.target) if other else np.exp(case.target)
        forms.append(Case(case.input, target.astype(case.target.dtype), case.reduction, other))
    for form in forms:
        for reduction in ctx.reductions:
            check_against_oracle(ctx, form, reduction)


def _subnormals_work(ctx: Context) -> str | None:
    if not ctx.backend.subnormals:
        return f"{ctx.backend.name} flushes subnormal numbers to zero on this device"
    return None


@register(
    "accuracy.subnormal",
    "targets (or exp of log-targets) down to the smallest subnormal, against the exact oracle",
    strategy=lambda ctx: subnormal_cases(log_targets=ctx.log_targets, reductions=ctx.reductions),
    applies=_subnormals_work,
)
def _subnormal(ctx: Context, case: Case) -> None:
    check_against_oracle(ctx, case)


@register(
    "accuracy.float32",
    "float32 results are computed in float32 or better (not float16 or bfloat16)",
    strategy=lambda ctx: distributions(
        dtypes=(np.float32,),
        log_targets=ctx.log_targets,
        reductions=ctx.reductions,
        kinds=("softmax", "near_uniform"),
        max_support=64,
    ),
)
def _float32(ctx: Context, case: Case) -> None:
    check_against_oracle(ctx, case)
