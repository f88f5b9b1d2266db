r"""The cases of the from-logits properties: drawn logits and fixed grids of options.

:mod:`.checks_logits` judges these cases; this module builds them. A case is a
:class:`~.strategies.Case` whose ``input`` and ``target`` are the student and
the teacher logits and whose ``extra`` holds the call's options
(:data:`OPTION_KEYS`, and ``mask`` when the case has one).

Where behaviour is discrete (the options: temperature scaling, direction,
reduction, mask, class axis; the edge values) the cases are fixed grids, so a
bug there fails on every seed; elsewhere hypothesis draws the logits
(:func:`logits_strategy`). Each grid is built within what the implementation
declares it can express (``logits_reductions``, ``logits_directions``,
``logits_scalings``, ``logits_temperature``, ``logits_masks``, ``logits_axes``,
``logits_symmetric``, ``logits_beta``; :func:`undeclared`), then its
per-case ``unsupported(options)``: a case that needs more is not drawn, and a
property with no expressible case is n/a.

``beta`` (the generalised Jensen-Shannon divergence) is given only to an
implementation that declares ``logits_beta``: then the option grids, the drawn
cases and the edge cases also take 0, 0.3, 0.5, 1 (and a drawn value), where 0
and 1 are the forward and the reverse KL (trl's and Liger's convention) and the
mixture in between. The symmetric mix
:math:`r\,\mathrm{KL}(p \| q) + (1 - r)\,\mathrm{KL}(q \| p)` is given, with
the ratios 0.5, 0.25 and 1, only to one that declares ``logits_symmetric``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from hypothesis import strategies as st

from . import oracle_logits as oracle
from .context import Context
from .properties import NotApplicable
from .strategies import Case

__all__ = [
    "OPTION_KEYS",
    "WEIGHT_EXCLUDES",
    "as_declared",
    "axis_cases",
    "composition_gradient_nan_cases",
    "composition_teacher_gradient_nan_cases",
    "dtype_cases",
    "edge_cases",
    "excluded_by_both_cases",
    "fully_masked_cases",
    "gradient_edge_cases",
    "gradient_option_cases",
    "identity_cases",
    "logits_case",
    "logits_strategy",
    "option_cases",
    "options_of",
    "undeclared",
    "unexpressible",
]

#: The temperatures the drawn cases take (1 alone without ``logits_temperature``).
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
#: (direction, scale_by_temperature_squared), in the order the grids cycle through them.
_COMBOS = (("forward", True), ("reverse", False), ("forward", False), ("reverse", True))
#: Ratios of the symmetric mix r KL(p || q) + (1 - r) KL(q || p) (torchtune's default 0.5).
_RATIOS = (0.5, 0.25, 1.0)


# --------------------------------------------------------------------------- declarations


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


def unexpressible(ctx: Context, options: dict[str, Any]) -> str | None:
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


def as_declared(ctx: Context, case: Case, /) -> Case:
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
    cases = [as_declared(ctx, c) for c in cases]
    kept = [c for c in cases if unexpressible(ctx, c.extra) is None]
    if not kept:
        why = unexpressible(ctx, cases[0].extra) if cases else "no case"
        raise NotApplicable(f"{ctx.impl.name} cannot express the cases ({why})")
    return kept


# --------------------------------------------------------------------------- cases


def logits_case(s: np.ndarray, t: np.ndarray, **options: Any) -> Case:
    """Return the case of student logits ``s`` and teacher logits ``t`` with ``options``.

    Unset options take ``kl_div_from_logits``'s defaults ('batchmean', T = 1,
    forward, T**2 on); a ``mask`` of None is left out.
    """
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


def options_of(case: Case) -> dict[str, Any]:
    """Return the keywords of ``case``'s call (:data:`OPTION_KEYS`), without the mask."""
    return {k: case.extra[k] for k in OPTION_KEYS if k in case.extra}


# --------------------------------------------------------------------------- drawn


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


def logits_strategy(ctx: Context) -> Any:
    """Return the hypothesis strategy of drawn cases within the implementation's declarations.

    1 to 4 rows of 2 to 8 classes, float64 or float32, student logits of spread
    1, 5 or 40 and the teacher's as much again from them; a declared
    temperature, reduction, direction and T**2 setting; half the time a row mask
    (with ``logits_masks``), and half the time a ``beta`` (with ``logits_beta``).
    """
    impl = ctx.impl
    if impl.from_logits is None:
        raise NotApplicable(f"{impl.name} has no from_logits function")
    if not (impl.logits_reductions and impl.logits_directions and impl.logits_scalings):
        raise NotApplicable(f"{impl.name} declares no from-logits option it can express")
    return _logits_cases(ctx).map(lambda case: as_declared(ctx, case))


# --------------------------------------------------------------------------- fixed


def _grid_logits(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = rng.normal(0.0, 2.0, size=shape)
    return s, s + rng.normal(0.0, 2.0, size=shape)


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


def option_cases(ctx: Context) -> list[Case]:
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
                cases.append(logits_case(s, t, reduction=reduction, mask=mask, **options))
    s32, t32 = s.astype(np.float32), t.astype(np.float32)
    for k, (direction, scaled) in enumerate(_COMBOS):
        options = _case_options(direction, scaled)
        reduction, mask = (("rowmean", keep), ("sum", None), ("none", keep), ("batchmean", None))[
            k
        ]
        cases.append(logits_case(s32, t32, reduction=reduction, mask=mask, **options))
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
        cases.append(logits_case(s3, t3, reduction=reduction, mask=mask, **options))
    if ctx.impl.logits_beta:
        cases += _beta_option_cases(s, t, keep, s3, t3, keep3)
    if ctx.impl.logits_symmetric:
        cases += _symmetric_cases(s, t, keep, s3, t3, keep3)
    return _expressible(ctx, cases)


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
                cases.append(logits_case(a, b, reduction=reduction, mask=mask, **options))
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
        logits_case(
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
        cases.append(logits_case(s32, t32, reduction=cells[k][0], mask=cells[k][1], **options))
    for k, (reduction, mask) in enumerate((("rowmean", keep3), ("batchmean", None))):
        options = {**_case_options("forward", True), "beta": _BETAS[1 + k]}
        cases.append(logits_case(s3, t3, reduction=reduction, mask=mask, **options))
    return cases


def identity_cases(ctx: Context) -> list[Case]:
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
            cases.append(logits_case(s, s.copy(), reduction=reduction, mask=mask, **options))
    return _expressible(ctx, cases)


#: Rows where the side that weights the terms keeps a class the other excludes
#: (loss ``+inf``) and excludes others itself, and a row where it excludes
#: classes the other keeps (a finite loss): the student's gradient is 0 at each
#: class the weighting side excludes, NaN or infinite at the others
#: (``docs/logits.md``, edge values).
WEIGHT_EXCLUDES = (
    ([0.0, -math.inf, -math.inf, -math.inf], [-math.inf, 0.0, 0.0, 0.0]),
    ([-math.inf, 0.0, 0.0, 0.0], [0.0, -math.inf, -math.inf, -math.inf]),
    ([0.0, 0.0, -math.inf, -math.inf], [0.0, 0.0, 0.0, 0.0]),
)


def edge_cases(ctx: Context) -> list[Case]:
    """Return the edge values: excluded classes, rows without a softmax, masks, large logits.

    Rows one at a time in 'none', 'sum' and 'rowmean' and both directions;
    masked rows under both T**2 conventions; every row masked in every
    reduction; large float32 logits; a single class (KL 0).
    """
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
    rows = [(s[i : i + 1], t[i : i + 1]) for i in range(len(s))]
    rows += [(np.asarray([a]), np.asarray([b])) for a, b in WEIGHT_EXCLUDES]
    cases = []
    for direction in ("forward", "reverse"):
        common = {"temperature": 1.0, "direction": direction}
        for reduction in ("none", "sum", "rowmean"):
            for row_s, row_t in rows:
                cases.append(logits_case(row_s, row_t, reduction=reduction, **common))
            cases.append(logits_case(big_s, big_t, reduction=reduction, **common))
            cases.append(logits_case(one_s, one_t, reduction=reduction, **common))
        # masked rows under both T**2 conventions (a loss without T**2 takes them too)
        for scaled in (True, False):
            masked = {
                **common,
                "temperature": 2.0,
                "scale_by_temperature_squared": scaled,
                "mask": np.asarray([True, False, False, False, False, True, False, True]),
            }
            cases.append(logits_case(s, t, reduction="rowmean", **masked))
            # every row dropped, each reduction: 0 (PyTorch's ignore_index means: 0/0 = NaN)
            for reduction in ("none", "sum", "batchmean", "mean", "rowmean"):
                dropped = {**masked, "mask": np.zeros(len(s), bool)}
                cases.append(logits_case(s, t, reduction=reduction, **dropped))
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
                cases.append(logits_case(*row, reduction=reduction, **common))
        masked = {
            **common,
            "temperature": 2.0,
            "mask": np.asarray([True, False, True, False, True]),
        }
        cases.append(logits_case(s, t, reduction="rowmean", **masked))
    dropped = {"temperature": 2.0, "direction": "forward", "beta": 0.3}
    for reduction in ("none", "sum", "batchmean", "mean", "rowmean"):
        mask = np.zeros(len(s), bool)
        cases.append(logits_case(s, t, reduction=reduction, mask=mask, **dropped))
    return cases


def _composition_nan(case: Case) -> np.ndarray:
    """Where PyTorch's composition gives NaN for ``case`` and the specification a number."""
    exact = oracle.from_logits(
        case.input, case.target, mask=case.extra.get("mask"), **options_of(case)
    )
    return oracle.composition_nan(exact, case.extra["reduction"])


def excluded_by_both_cases(ctx: Context) -> list[Case]:
    """Return the edge cases with a class both distributions exclude (0 weight, -inf)."""
    cases = [c for c in edge_cases(ctx) if _composition_nan(c).any() and not _fully_masked(c)]
    if not cases:
        raise NotApplicable(f"{ctx.impl.name} cannot express the cases")
    return cases


def gradient_edge_cases(ctx: Context) -> list[Case]:
    """Return the edge cases that are not fully masked (with ``beta`` where declared).

    Their student gradients follow the edge-value table: NaN in rows without a
    softmax, 0 in dropped rows, exactly 0 at a class the weighting side excludes
    (and, inside ``(0, 1)``, at a class the student excludes).
    """
    cases = [c for c in edge_cases(ctx) if not _fully_masked(c)]
    if not cases:
        raise NotApplicable(f"{ctx.impl.name} cannot express the cases")
    return cases


def composition_gradient_nan_cases(ctx: Context) -> list[Case]:
    """Return the edge cases where the composition's student gradient is NaN, the spec's not.

    In reverse, a class the student excludes (PyTorch's composition gives NaN
    across the row, the specification 0 there and the chain rule's value
    elsewhere), and dropped rows without a softmax (the specification: zero
    gradients); :func:`oracle_logits.composition_gradient_nan`.
    """
    return _where_composition_nan(ctx, oracle.composition_gradient_nan)


def composition_teacher_gradient_nan_cases(ctx: Context) -> list[Case]:
    """Return the edge cases where the composition's teacher gradient is NaN, the spec's not.

    :func:`composition_gradient_nan_cases` for the teacher's logits
    (:func:`oracle_logits.composition_teacher_gradient_nan`): forward, a class the
    teacher excludes; dropped rows.
    """
    return _where_composition_nan(ctx, oracle.composition_teacher_gradient_nan)


def _where_composition_nan(ctx: Context, rule: Any) -> list[Case]:
    cases = []
    for case in gradient_edge_cases(ctx):
        exact = oracle.from_logits(
            case.input, case.target, mask=case.extra.get("mask"), **options_of(case)
        )
        if rule(exact).any():
            cases.append(case)
    if not cases:
        raise NotApplicable(f"{ctx.impl.name} cannot express the cases")
    return cases


def _fully_masked(case: Case) -> bool:
    mask = case.extra.get("mask")
    return mask is not None and not np.asarray(mask, bool).any()


def fully_masked_cases(ctx: Context) -> list[Case]:
    """Return the edge cases with every row masked (each reduction, both directions)."""
    cases = [c for c in edge_cases(ctx) if _fully_masked(c)]
    if not cases:
        raise NotApplicable(f"{ctx.impl.name} cannot express a mask")
    return cases


def dtype_cases(ctx: Context) -> list[Case]:
    """Return float64 and float32 logits (float16 where the library has it), each reduction."""
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
                logits_case(
                    s.astype(dtype),
                    t.astype(dtype),
                    reduction=reduction,
                    temperature=2.0,
                    **options,
                )
            )
    return _expressible(ctx, cases)


def axis_cases(ctx: Context) -> list[Case]:
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
                    case = logits_case(s, t, reduction=reduction, mask=mask, axis=axis, **options)
                    cases.append(case)
    if not cases:
        raise NotApplicable(f"no case for the axes {ctx.impl.name} declares ({declared})")
    return _expressible(ctx, cases)


def gradient_option_cases(ctx: Context) -> list[Case]:
    """Return the options on fixed logits: each reduction with and without a mask, T = 2."""
    s, t = _grid_logits((3, 4), 13)
    keep = np.asarray([True, False, True])
    cases = []
    for i, reduction in enumerate(("none", "batchmean", "sum", "mean", "rowmean")):
        for j, mask in enumerate((None, keep)):
            options = _case_options(*_COMBOS[(2 * i + j) % 4])
            cases.append(logits_case(s, t, reduction=reduction, mask=mask, **options))
    if ctx.impl.logits_beta:
        # each beta: 'none' (the general chain rule) with a mask, and two reductions
        cells = (("none", keep), ("batchmean", None), ("sum", keep))
        cases += _each_value(s, t, cells, "beta", _BETAS)
    if ctx.impl.logits_symmetric:
        cells = (("none", keep), ("batchmean", None), ("rowmean", keep))
        cases += _each_value(s, t, cells, "symmetric", _RATIOS)
    return _expressible(ctx, cases)
