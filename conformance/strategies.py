"""Hypothesis strategies for the cases the properties check.

Every strategy yields a :class:`Case`: NumPy arrays (so the oracle sees exact
values) plus the call's options. Valid distributions are softmaxes of random
logits; the other families are one-hot, near-uniform, tiny probabilities (down
to the smallest normal number, and subnormals separately), large supports,
broadcasting shapes, 0-d and empty arrays, and PyTorch's edge values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

__all__ = [
    "DIVISOR_SHAPES",
    "EDGE_INPUTS",
    "EDGE_LOG_TARGETS",
    "EDGE_TARGETS",
    "SPEC_EDGE_ROWS",
    "SPEC_EDGE_TABLE",
    "Case",
    "broadcast_cases",
    "distributions",
    "divisor_cases",
    "edge_cases",
    "edge_pairs",
    "regular_cases",
    "subnormal_cases",
]

#: Inputs of the edge-value table: infinities, NaN, zero, ordinary and large values.
EDGE_INPUTS: tuple[float, ...] = (-math.inf, math.inf, math.nan, 0.0, -0.0, -1.5, 2.0, -1000.0)
#: Targets of the edge-value table (``log_target=False``): zero, tiny, negative, > 1, inf, NaN.
EDGE_TARGETS: tuple[float, ...] = (
    0.0,
    -0.0,
    1e-30,
    -0.5,
    0.3,
    1.0,
    1.7,
    1e20,
    math.inf,
    math.nan,
)
#: Targets of the edge-value table (``log_target=True``): -inf, very negative, +inf, NaN.
EDGE_LOG_TARGETS: tuple[float, ...] = (
    -math.inf,
    -1000.0,
    -50.0,
    -1.2,
    0.0,
    0.5,
    3.0,
    math.inf,
    math.nan,
)

FLOATS = (np.float32, np.float64)

#: The rows of the edge-value table of docs/spec.md (and docs/gradients.md), as they are
#: printed there: ``(label of input, input, label of target, target, log_target)``. The
#: one copy: the suite's fixed cases, the golden vectors and docs/_tools/edge_table.py
#: read it; ``tests/test_conformance_v2.py`` checks that every row printed is here.
SPEC_EDGE_TABLE: tuple[tuple[str, float, str, float, bool], ...] = (
    ("log 0.25", math.log(0.25), "0.5", 0.5, False),
    ("0", 0.0, "1", 1.0, False),
    ("0", 0.0, "0.5", 0.5, False),
    ("-1", -1.0, "0", 0.0, False),
    ("-inf", -math.inf, "0", 0.0, False),
    ("+inf", math.inf, "0", 0.0, False),
    ("NaN", math.nan, "0", 0.0, False),
    ("-inf", -math.inf, "0.5", 0.5, False),
    ("+inf", math.inf, "0.5", 0.5, False),
    ("NaN", math.nan, "0.5", 0.5, False),
    ("-1", -1.0, "-0.5", -0.5, False),
    ("-1", -1.0, "2", 2.0, False),
    ("-1", -1.0, "+inf", math.inf, False),
    ("-1", -1.0, "NaN", math.nan, False),
    ("-1", -1.0, "1e-300", 1e-300, False),
    ("log 0.25", math.log(0.25), "log 0.5", math.log(0.5), True),
    ("-1", -1.0, "-inf", -math.inf, True),
    ("-inf", -math.inf, "-inf", -math.inf, True),
    ("-inf", -math.inf, "0", 0.0, True),
    ("-1", -1.0, "+inf", math.inf, True),
    ("-1", -1.0, "-1000", -1000.0, True),
    ("-1", -1.0, "NaN", math.nan, True),
    ("NaN", math.nan, "log 0.5", math.log(0.5), True),
    ("0", 0.0, "1", 1.0, True),
)

#: :data:`SPEC_EDGE_TABLE` without the labels: ``(input, target, log_target)``.
SPEC_EDGE_ROWS: tuple[tuple[float, float, bool], ...] = tuple(
    (x, t, log_target) for _, x, _, t, log_target in SPEC_EDGE_TABLE
)


def edge_pairs(log_target: bool, /) -> list[tuple[float, float]]:
    """Return every ``(input, target)`` pair of the edge-value grid, in a fixed order.

    The grid is every :data:`EDGE_INPUTS` value against every target value
    (:data:`EDGE_TARGETS`, or :data:`EDGE_LOG_TARGETS` with ``log_target``), then
    the rows of docs/spec.md's table (:data:`SPEC_EDGE_ROWS`).
    """
    targets = EDGE_LOG_TARGETS if log_target else EDGE_TARGETS
    pairs = [(x, t) for x in EDGE_INPUTS for t in targets]
    pairs += [(x, t) for x, t, lt in SPEC_EDGE_ROWS if lt == log_target]
    return pairs


#: ``(input shape, target shape)`` pairs that separate the divisors: with B = 3
#: rows and K = 4 columns, ``'batchmean'`` divides by ``input.shape[0]`` (1, 3, 4,
#: 3, 3, 1 or, for a 0-d input, 1), which differs from the broadcast result's
#: rows (always 3) in half of them; ``'mean'`` divides by the broadcast result's
#: numel (12), which differs from the input's numel in all but two.
DIVISOR_SHAPES: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = (
    ((1, 4), (3, 4)),
    ((3, 4), (1, 4)),
    ((4,), (3, 4)),
    ((3, 4), (4,)),
    ((3, 1), (1, 4)),
    ((1, 4), (3, 1)),
    ((), (3, 4)),
    ((3, 4), ()),
)


def divisor_cases(
    *, log_targets: Sequence[bool] = (False, True), reductions: Sequence[str] = ("batchmean",)
) -> list[Case]:
    """Return fixed broadcasting cases: every :data:`DIVISOR_SHAPES` pair, option and reduction.

    Inputs are logarithms of values in (0, 1), targets values in (0, 1) (or
    their logarithms), all distinct, so every divisor gives a distinct result.
    The dtype alternates between float32 and float64 from one case to the next
    (dtypes are checked elsewhere; a divisor does not depend on them).
    """
    cases = []
    for i, (xs, ts) in enumerate(DIVISOR_SHAPES):
        x = np.log(np.linspace(0.15, 0.85, math.prod(xs))).reshape(xs)
        p = np.linspace(0.9, 0.05, math.prod(ts)).reshape(ts)
        for j, log_target in enumerate(log_targets):
            dtype = FLOATS[(i + j) % 2]
            t = np.log(p) if log_target else p
            for reduction in reductions:
                cases.append(Case(x.astype(dtype), t.astype(dtype), reduction, log_target))
    return cases


@dataclass
class Case:
    """One call: ``fn(input, target, reduction=reduction, log_target=log_target)``.

    ``grad`` is the upstream gradient used by the gradient properties (the
    output's shape for ``'none'``, a float otherwise).
    """

    input: np.ndarray
    target: np.ndarray
    reduction: str = "sum"
    log_target: bool = False
    grad: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """Return a short one-line description for reports."""
        return (
            f"input {self.input.dtype}{list(self.input.shape)}, target "
            f"{self.target.dtype}{list(self.target.shape)}, reduction={self.reduction!r}, "
            f"log_target={self.log_target}"
        )


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@st.composite
def _probabilities(draw: Any, shape: tuple[int, ...], kind: str) -> np.ndarray:
    """Draw probability vectors along the last axis (float64, all > 0 unless one-hot)."""
    n = shape[-1]
    if kind == "one_hot":
        hot = draw(hnp.arrays(np.int64, shape[:-1], elements=st.integers(0, n - 1)))
        return (np.arange(n) == hot[..., None]).astype(np.float64)
    if kind == "near_uniform":
        eps = draw(st.sampled_from([1e-12, 1e-8, 1e-4]))
        noise = draw(hnp.arrays(np.float64, shape, elements=st.floats(-1, 1)))
        p = (1 + eps * noise) / n
        return p / p.sum(axis=-1, keepdims=True)
    spread = {"softmax": 3.0, "peaked": 30.0, "tiny": 600.0}[kind]
    logits = draw(hnp.arrays(np.float64, shape, elements=st.floats(-1, 1)))
    p = _softmax(spread * logits)
    return np.maximum(p, np.finfo(np.float64).smallest_normal)


KINDS = ("softmax", "peaked", "tiny", "one_hot", "near_uniform")


@st.composite
def distributions(
    draw: Any,
    *,
    shape: tuple[int, ...] | None = None,
    kinds: Sequence[str] = KINDS,
    dtypes: Sequence[Any] = FLOATS,
    log_targets: Sequence[bool] = (False, True),
    reductions: Sequence[str] = ("sum",),
    max_batch: int = 4,
    max_support: int = 8,
) -> Case:
    """Draw valid distributions: input ``log q``, target ``p`` (or ``log p``), q and p > 0.

    ``p`` is one of :data:`KINDS`; ``q`` is always a softmax (so ``log q`` is
    finite). With ``log_target`` a one-hot ``p`` is replaced by a softmax.
    """
    if shape is None:
        shape = (draw(st.integers(1, max_batch)), draw(st.integers(1, max_support)))
    dtype = draw(st.sampled_from(list(dtypes)))
    log_target = draw(st.sampled_from(list(log_targets)))
    kind = draw(st.sampled_from([k for k in kinds if not (log_target and k == "one_hot")]))
    p = draw(_probabilities(shape, kind))
    q = draw(_probabilities(shape, draw(st.sampled_from(["softmax", "peaked", "near_uniform"]))))
    with np.errstate(divide="ignore"):
        x = np.log(q).astype(dtype)
        t = (np.log(p) if log_target else p).astype(dtype)
    if dtype != np.float64 and not log_target:
        t = np.where(p > 0, np.maximum(t, np.finfo(dtype).smallest_normal), 0).astype(dtype)
    reduction = draw(st.sampled_from(list(reductions)))
    return Case(x, t, reduction, log_target, extra={"kind": kind})


@st.composite
def regular_cases(
    draw: Any,
    *,
    dtypes: Sequence[Any] = FLOATS,
    log_targets: Sequence[bool] = (False, True),
    reductions: Sequence[str] = ("none",),
    min_dims: int = 1,
    max_dims: int = 3,
) -> Case:
    """Draw finite inputs and targets that need not be distributions (t > 1 included)."""
    shape = draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=5))
    dtype = draw(st.sampled_from(list(dtypes)))
    log_target = draw(st.sampled_from(list(log_targets)))
    x = draw(hnp.arrays(np.float64, shape, elements=st.floats(-60, 60, width=32)))
    lo, hi = (-60.0, 5.0) if log_target else (0.0, 50.0)
    t = draw(hnp.arrays(np.float64, shape, elements=st.floats(lo, hi, width=32)))
    return Case(
        x.astype(dtype), t.astype(dtype), draw(st.sampled_from(list(reductions))), log_target
    )


@st.composite
def subnormal_cases(
    draw: Any,
    *,
    log_targets: Sequence[bool] = (False, True),
    reductions: Sequence[str] = ("none",),
) -> Case:
    """Draw targets (or ``exp`` of log-targets) in the subnormal range of the dtype."""
    dtype = draw(st.sampled_from(list(FLOATS)))
    info = np.finfo(dtype)
    n = draw(st.integers(1, 6))
    log_target = draw(st.sampled_from(list(log_targets)))
    x = draw(hnp.arrays(np.float64, (n,), elements=st.floats(-30, 30))).astype(dtype)
    if log_target:
        lo = math.log(float(info.smallest_subnormal))
        hi = math.log(float(info.smallest_normal))
        t = draw(hnp.arrays(np.float64, (n,), elements=st.floats(lo + 0.1, hi))).astype(dtype)
    else:
        exps = draw(hnp.arrays(np.float64, (n,), elements=st.floats(0, 1)))
        sub = float(info.smallest_subnormal)
        t = (sub * np.exp2(exps * math.log2(float(info.smallest_normal) / sub))).astype(dtype)
        t = np.maximum(t, info.smallest_subnormal)
    return Case(x, t, draw(st.sampled_from(list(reductions))), log_target)


@st.composite
def edge_cases(
    draw: Any,
    *,
    log_targets: Sequence[bool] = (False, True),
    reductions: Sequence[str] = ("none",),
) -> Case:
    """Draw small arrays mixing the edge values with ordinary ones."""
    log_target = draw(st.sampled_from(list(log_targets)))
    targets = EDGE_LOG_TARGETS if log_target else EDGE_TARGETS
    n = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(list(FLOATS)))
    x = draw(hnp.arrays(np.float64, (n,), elements=st.sampled_from(EDGE_INPUTS)))
    t = draw(hnp.arrays(np.float64, (n,), elements=st.sampled_from(targets)))
    return Case(
        x.astype(dtype), t.astype(dtype), draw(st.sampled_from(list(reductions))), log_target
    )


@st.composite
def broadcast_cases(
    draw: Any,
    *,
    log_targets: Sequence[bool] = (False, True),
    reductions: Sequence[str] = ("none",),
) -> Case:
    """Draw an input and a target of different shapes that broadcast together."""
    shapes = draw(
        hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=4)
    ).input_shapes
    log_target = draw(st.sampled_from(list(log_targets)))
    dtype = draw(st.sampled_from(list(FLOATS)))
    x = draw(hnp.arrays(np.float64, shapes[0], elements=st.floats(-8, 2, width=32)))
    lo, hi = (-8.0, 1.0) if log_target else (0.0, 1.0)
    t = draw(hnp.arrays(np.float64, shapes[1], elements=st.floats(lo, hi, width=32)))
    return Case(
        x.astype(dtype), t.astype(dtype), draw(st.sampled_from(list(reductions))), log_target
    )
