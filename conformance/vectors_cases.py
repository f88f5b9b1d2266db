r"""The cases of the golden vectors, and their expected values from the exact oracle.

Each :class:`Spec` is one call of ``kl_div`` or ``kl_div_backward`` on small
NumPy arrays, tagged with the conformance property it belongs to. Its data are
derived from its id alone (a :class:`random.Random` seeded with the id, and
:mod:`mpmath` for the logarithms and exponentials), so the same id gives the same
arrays whatever other cases are selected, and no platform's ``libm`` is involved.

:func:`expected` turns a spec into expected values with per-element absolute
tolerances:

* the values are the oracle's (:mod:`.oracle`) exact values, **correctly rounded**
  to the result's dtype (round to nearest, ties to even, from the exact value,
  never through float64 arithmetic: :func:`round_to_dtype`, :func:`round_exact`);
* the reductions follow the specification's rounding rule (``docs/spec.md``,
  "Rounding of the means"): the exact sum :math:`\Sigma` is rounded to the dtype,
  :math:`\hat\Sigma`, then :math:`\operatorname{fl}(\hat\Sigma / D)` is rounded
  once (for float16 the quotient is taken in float32 and then rounded);
* the tolerance of an element is the bound the conformance suite applies to the
  distance from the exact value, :math:`b` (:func:`.oracle.pointwise_tolerance`,
  :func:`.oracle.reduce`, :func:`.oracle.gradients`), widened by the distance of
  the stated, rounded value :math:`e` from the exact value :math:`y`:
  :math:`\mathrm{atol} = b + |e - y|`, rounded up to float64. By the triangle
  inequality, every result the suite accepts (:math:`|r - y| \le b`) satisfies
  :math:`|r - e| \le \mathrm{atol}`.

The from-logits cases of the generalised Jensen-Shannon divergence (``beta``) are
golden data of their own, not part of the exported document (whose format is
unchanged): :func:`logits_specs` and :func:`logits_expected`, from the exact oracle
of :mod:`.oracle_logits`.
"""

from __future__ import annotations

import itertools
import math
import random
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from . import oracle, oracle_logits
from .catalog import PROPERTIES
from .logits_cases import WEIGHT_EXCLUDES
from .strategies import SPEC_EDGE_TABLE

__all__ = [
    "EDGE_TABLE",
    "LOGITS_BETAS",
    "PROPERTY_INFO",
    "Expected",
    "LogitsExpected",
    "LogitsSpec",
    "Spec",
    "expected",
    "logits_expected",
    "logits_specs",
    "property_info",
    "round_exact",
    "round_to_dtype",
    "specs",
]

FLOAT_DTYPES: tuple[str, ...] = ("float16", "float32", "float64")
REDUCTIONS: tuple[str, ...] = ("none", "sum", "mean", "batchmean")

#: Properties of the vectors that the suite has no property of the same name for
#: (the suite checks both gradients per property; a vector case checks both at once).
PROPERTY_INFO: dict[str, tuple[str, str]] = {
    "gradients.edge_values": (
        "MUST",
        "both gradients on the edge-value table (NaN target gradient where t <= 0, -0 where "
        "the table has it)",
    ),
    "gradients.reductions": (
        "MUST",
        "both gradients under every reduction: the pointwise derivatives times g / D",
    ),
    "gradients.broadcasting": (
        "MUST",
        "gradients summed back to each argument's shape; batchmean divides by input.shape[0]",
    ),
    "gradients.zero_dim": ("MUST", "gradients of 0-d input and/or target"),
    "gradients.empty": ("MUST", "gradients of empty arrays are empty arrays of their shape"),
    "gradients.dtypes": (
        "MUST",
        "mixed dtypes: computed in the promoted dtype, each gradient in its argument's dtype",
    ),
    "gradients.subnormal": (
        "SHOULD",
        "gradients at subnormal targets within the bounds (PyTorch 2.13 misses them: its xlogy "
        "backward computes (g t) / t, whose g t underflows, and loses the + 1 of log t + 1)",
    ),
    "gradients.large_support": ("MUST", "gradients over supports of thousands of categories"),
}


def property_info(name: str, /) -> tuple[str, str, str]:
    """Return ``(group, level, description)`` of a property of the vectors.

    Names the conformance suite registers take its level and description (level
    ``'MUST'`` where the registry predates levels); the others come from
    :data:`PROPERTY_INFO`.
    """
    group = name.split(".", 1)[0]
    if name in PROPERTIES:
        prop = PROPERTIES[name]
        return group, getattr(prop, "level", "MUST"), prop.description
    level, description = PROPERTY_INFO[name]
    return group, level, description


@dataclass
class Spec:
    """One case before export: a call, the property it checks, and how it is compared.

    ``bound_dtype`` (mixed dtypes) holds the case to the bounds of the less
    precise operand dtype, as the suite's ``semantics.dtypes`` does: PyTorch
    evaluates ``xlogy(t, t)`` in the target's own dtype before promoting.
    ``signed_zeros`` asks that the sign of a zero be compared: only on the rows
    of the specification's edge-value table, which state it.
    """

    id: str
    property: str
    function: str
    input: np.ndarray
    target: np.ndarray
    reduction: str
    log_target: bool = False
    grad_output: np.ndarray | None = None
    expected_error: bool = False
    signed_zeros: bool = False
    description: str = ""
    bound_dtype: np.dtype | None = None

    def arrays(self) -> list[np.ndarray]:
        """Return the operand arrays (input, target and grad_output where there is one)."""
        out = [self.input, self.target]
        if self.grad_output is not None:
            out.append(self.grad_output)
        return out


@dataclass
class Expected:
    """An expected array: values in their dtype and the absolute tolerance per element."""

    value: np.ndarray
    atol: np.ndarray


# --------------------------------------------------------------------------------------
# Correct rounding to a dtype


def _even(a: np.ndarray) -> np.ndarray:
    """Return whether each (finite) value's last significand bit is 0."""
    bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    return (np.array(a, copy=True).view(bits) & 1) == 0


def round_to_dtype(values: np.ndarray, dtype: Any, /) -> np.ndarray:
    """Return ``values`` (``numpy.longdouble`` or float64) correctly rounded to ``dtype``.

    Round to nearest, ties to even, from the value as given: NumPy's cast from
    ``longdouble`` to ``float16`` goes through float64 and can round twice, so
    the cast's result is checked against the midpoints to its neighbours (exact
    in ``longdouble``) and moved where it is on the wrong side. Values beyond the
    range round to infinities as IEEE 754 says (at or above the largest finite
    number plus half its ULP).
    """
    dtype = np.dtype(dtype)
    values = np.asarray(values)
    wide = values.astype(np.longdouble)
    with np.errstate(all="ignore"):
        r = values.astype(dtype)
        finite = np.isfinite(wide) & np.isfinite(r)
        up = np.nextafter(r, dtype.type(np.inf))
        down = np.nextafter(r, dtype.type(-np.inf))
        mid_up = (r.astype(np.longdouble) + up.astype(np.longdouble)) / 2
        mid_down = (r.astype(np.longdouble) + down.astype(np.longdouble)) / 2
        go_up = finite & np.isfinite(up) & ((wide > mid_up) | ((wide == mid_up) & _even(up)))
        go_down = (
            finite & np.isfinite(down) & ((wide < mid_down) | ((wide == mid_down) & _even(down)))
        )
        r = np.where(go_up, up, np.where(go_down, down, r))
        info = np.finfo(dtype)
        top = np.longdouble(info.max)
        big = top + (top - np.longdouble(np.nextafter(info.max, dtype.type(0)))) / 2
        back = np.isinf(r) & np.isfinite(wide) & (np.abs(wide) < big)
        r = np.where(back, np.copysign(info.max, wide).astype(dtype), r)
    return r.astype(dtype)


def round_exact(value: Any, dtype: Any, /) -> float:
    """Return an exact number (``mpmath.mpf``, ``Fraction`` or float) rounded to ``dtype``.

    Round to nearest, ties to even, with gradual underflow and overflow to
    infinity, in integer arithmetic on the binary significand; the result is a
    Python float (every value of the float dtypes is one). NaN and infinities
    are returned as they are.
    """
    try:
        v = float(value)
    except OverflowError:  # a Fraction beyond float64's range
        return -math.inf if value < 0 else math.inf
    if not math.isfinite(v):
        return v  # NaN, an infinity, or an mpf beyond float64's range (which overflows)
    if hasattr(value, "man_exp"):  # an mpmath.mpf: |value| = man * 2**exp
        man, exp = (int(k) for k in value.man_exp)
        negative = value < 0
    else:
        q = Fraction(value)
        negative, q = q < 0, abs(q)
        if q == 0:
            return 0.0
        # 2**exp with enough bits below the rounding position: exact enough for the ties
        exp = q.numerator.bit_length() - q.denominator.bit_length() - 200
        num = q.numerator << -exp if exp < 0 else q.numerator
        den = q.denominator if exp < 0 else q.denominator << exp
        man, inexact = divmod(num, den)
        man = (man << 1) | (inexact != 0)  # a sticky bit keeps "just above a tie" above it
        exp -= 1
    if man == 0:
        return 0.0
    info = np.finfo(np.dtype(dtype))
    p = info.nmant + 1
    top = exp + man.bit_length() - 1  # 2**top <= |value| < 2**(top + 1)
    quantum = max(top, info.minexp) - (p - 1)
    shift = quantum - exp
    if shift <= 0:
        r = man << -shift
    else:
        r = man >> shift
        rest, half = man - (r << shift), 1 << (shift - 1)
        if rest > half or (rest == half and r & 1):
            r += 1
    if r == 0:
        return -0.0 if negative else 0.0
    if quantum + r.bit_length() - 1 >= info.maxexp:
        return -math.inf if negative else math.inf
    out = math.ldexp(r, quantum)
    return -out if negative else out


# --------------------------------------------------------------------------------------
# Deterministic data


def _rng(case_id: str) -> random.Random:
    return random.Random(zlib.crc32(case_id.encode()))


def _mp() -> Any:
    import mpmath

    ctx = mpmath.MPContext()
    ctx.prec = 80
    return ctx


_MPC: list[Any] = []


def _ctx() -> Any:
    if not _MPC:
        _MPC.append(_mp())
    return _MPC[0]


def _log(values: np.ndarray) -> np.ndarray:
    """Return the natural logarithm of each element, from mpmath (no platform libm)."""
    ctx = _ctx()
    flat = [float(ctx.log(ctx.mpf(float(v)))) if v > 0 else -math.inf for v in values.ravel()]
    return np.asarray(flat, dtype=np.float64).reshape(values.shape)


def _uniform(r: random.Random, lo: float, hi: float, shape: tuple[int, ...]) -> np.ndarray:
    n = math.prod(shape)
    return np.asarray([lo + (hi - lo) * r.random() for _ in range(n)]).reshape(shape)


def _probabilities(r: random.Random, shape: tuple[int, ...], kind: str) -> np.ndarray:
    r"""Return rows (last axis) of probabilities, float64, all > 0 unless one-hot.

    Weights :math:`(1 + u)\,2^k` with :math:`u` uniform in [0, 1) and :math:`k`
    a uniform integer in :math:`[-s, s]` (log-uniform, like a softmax of logits
    spread over :math:`\pm s \ln 2`; ``near_uniform`` varies by 1e-4 only),
    normalised by their sum: exact arithmetic, no transcendental function.
    """
    n = shape[-1]
    rows = math.prod(shape[:-1])
    out = np.zeros((rows, n))
    spread = {"softmax": 4, "peaked": 43, "tiny": 865, "near_uniform": 0}.get(kind, 0)
    for i in range(rows):
        if kind == "one_hot":
            out[i, r.randrange(n)] = 1.0
            continue
        if kind == "near_uniform":
            w = [1.0 + 1e-4 * (2 * r.random() - 1) for _ in range(n)]
        else:
            w = [math.ldexp(1.0 + r.random(), r.randint(-spread, spread)) for _ in range(n)]
        total = math.fsum(w)
        out[i] = [max(v / total, 2.2250738585072014e-308) for v in w]
    return out.reshape(shape)


_DISTS: dict[Any, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _dist(case_id: str, shape: tuple[int, ...], kind: str, dtype: str, log_target: bool):
    """Return (input, target) in ``dtype``: log q of a softmax-like q, and p (or log p).

    The float64 values depend on ``case_id``, ``shape``, ``kind`` and ``log_target``
    only; the last distribution is kept, so that one asked for in several dtypes
    in a row is computed once.
    """
    key = (case_id, shape, kind, log_target)
    if key not in _DISTS:
        r = _rng(case_id)
        p = _probabilities(r, shape, kind)
        q = _probabilities(r, shape, "softmax")
        _DISTS.clear()  # keep one: the callers ask for one distribution in several dtypes
        _DISTS[key] = (p, _log(q), _log(p) if log_target else p)
    p, log_q, log_p = _DISTS[key]
    x = log_q.astype(dtype)
    if log_target:
        t = log_p.astype(dtype)
    else:
        t = p.astype(dtype)
        if dtype != "float64":
            tiny = np.finfo(dtype).smallest_normal
            t = np.where(p > 0, np.maximum(t, tiny), 0).astype(dtype)
    return x, t


def _regular(case_id: str, sx, st_, dtype_x: str, dtype_t: str, log_target: bool):
    """Return (input, target) of the given shapes: x in [-8, 2], t in [0, 1] or [-8, 1]."""
    r = _rng(case_id)
    x = _uniform(r, -8.0, 2.0, sx).astype(dtype_x)
    lo, hi = (-8.0, 1.0) if log_target else (0.0, 1.0)
    t = _uniform(r, lo, hi, st_).astype(dtype_t)
    return x, t


def _grad_output(x: np.ndarray, t: np.ndarray, reduction: str, ones: bool = False) -> np.ndarray:
    """Return the upstream gradient: output-shaped 0.5, 1.5, 2.5, ... for 'none', else 0.75."""
    dtype = np.result_type(x.dtype, t.dtype)
    if reduction != "none":
        return np.asarray(1.0 if ones else 0.75, dtype=dtype)
    shape = np.broadcast_shapes(x.shape, t.shape)
    if ones:
        return np.ones(shape, dtype=dtype)
    return (0.5 + (np.arange(math.prod(shape)) % 3)).reshape(shape).astype(dtype)


def _lt(log_target: bool) -> str:
    return "log_target" if log_target else "prob_target"


def _shape(s: tuple[int, ...]) -> str:
    return "[" + ",".join(str(n) for n in s) + "]"


# --------------------------------------------------------------------------------------
# The families of cases

INF, NAN = math.inf, math.nan

#: The rows of the edge-value table of docs/spec.md: (x label, x, t label, t, log_target).
EDGE_TABLE = SPEC_EDGE_TABLE

#: The suite's grid of edge values (conformance.strategies), fixed here so that the
#: vectors of one version do not move when the suite's strategies do.
GRID_INPUTS: tuple[float, ...] = (-INF, INF, NAN, 0.0, -0.0, -1.5, 2.0, -1000.0)
GRID_TARGETS: tuple[float, ...] = (0.0, -0.0, 1e-30, -0.5, 0.3, 1.0, 1.7, 1e20, INF, NAN)
GRID_LOG_TARGETS: tuple[float, ...] = (-INF, -1000.0, -50.0, -1.2, 0.0, 0.5, 3.0, INF, NAN)

#: (input shape, target shape) pairs covering each divisor of a broadcast 'batchmean'.
BROADCASTS: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = (
    ((1, 4), (3, 4)),  # one input row against three target rows: B = 1
    ((3, 4), (1, 4)),  # B = 3
    ((4,), (3, 4)),  # a 1-d input: B = 4, the support
    ((3, 4), (4,)),
    ((3, 1), (1, 4)),  # B = 3, the output (3, 4)
    ((), (3, 4)),  # 0-d input: batchmean is the sum
    ((3, 4), ()),
)

Family = Callable[[int], Iterator[Spec]]


def _fwd_bwd(
    case_id: str,
    prop: str,
    grad_prop: str,
    functions: tuple[str, ...],
    *,
    ones: bool = False,
    **kw: Any,
) -> Iterator[Spec]:
    """Yield the forward and the backward spec of one call (those ``functions`` selects).

    The backward's upstream gradient is :func:`_grad_output` (all ones with ``ones``).
    """
    if "kl_div" in functions:
        yield Spec(f"{prop}/{case_id}", prop, "kl_div", **kw)
    if "kl_div_backward" in functions:
        g = _grad_output(kw["input"], kw["target"], kw["reduction"], ones=ones)
        yield Spec(f"{grad_prop}/{case_id}", grad_prop, "kl_div_backward", grad_output=g, **kw)


def _edge(functions: tuple[str, ...]) -> Iterator[Spec]:
    for i, (xl, xv, tl, tv, lt) in enumerate(EDGE_TABLE):
        x, t = np.asarray([xv]), np.asarray([tv])
        desc = f"edge table row {i + 1}: x = {xl}, t = {tl}, log_target={lt}"
        yield from _fwd_bwd(
            f"table/{i + 1:02d}",
            "semantics.edge_values",
            "gradients.edge_values",
            functions,
            input=x,
            target=t,
            reduction="none",
            log_target=lt,
            signed_zeros=True,
            description=desc,
            ones=True,
        )
    for lt in (False, True):
        targets = GRID_LOG_TARGETS if lt else GRID_TARGETS
        pairs = list(itertools.product(GRID_INPUTS, targets))
        for dtype in FLOAT_DTYPES:
            with np.errstate(over="ignore"):  # 1e20 is +inf in float16
                x = np.asarray([p[0] for p in pairs]).astype(dtype)
                t = np.asarray([p[1] for p in pairs]).astype(dtype)
            for red in REDUCTIONS:
                fns = functions if red == "none" else tuple(f for f in functions if f != "kl_div")
                yield from _fwd_bwd(
                    f"grid/{dtype}/{_lt(lt)}/{red}",
                    "semantics.edge_values",
                    "gradients.edge_values",
                    fns,
                    input=x,
                    target=t,
                    reduction=red,
                    log_target=lt,
                    description="every pair of the edge grid, one element each",
                )
        if "kl_div" not in functions:
            continue
        for j, (xv, tv) in enumerate(pairs):
            for red in ("sum", "mean", "batchmean"):
                x1 = np.asarray([xv, 0.0]) if red != "sum" else np.asarray([xv])
                t1 = np.asarray([tv, 0.0 if lt else 1.0])[: x1.size]
                yield Spec(
                    f"semantics.edge_values/pair/{_lt(lt)}/{j:02d}/{red}",
                    "semantics.edge_values",
                    "kl_div",
                    x1,
                    t1,
                    red,
                    lt,
                    description=f"x = {xv!r}, t = {tv!r} reduced (NaN/inf propagate)",
                )


def _reductions(functions: tuple[str, ...]) -> Iterator[Spec]:
    kinds = ("softmax", "one_hot", "near_uniform", "tiny", "peaked")
    for kind, lt, dtype in itertools.product(kinds, (False, True), FLOAT_DTYPES):
        if lt and kind == "one_hot":
            continue
        base = f"{kind}/{dtype}/{_lt(lt)}"
        x, t = _dist(f"{kind}/{_lt(lt)}", (3, 5), kind, dtype, lt)
        for red in REDUCTIONS:
            prop = "accuracy.pointwise" if red == "none" else "accuracy.reductions"
            yield from _fwd_bwd(
                f"{base}/{red}",
                prop,
                "gradients.reductions",
                functions,
                input=x,
                target=t,
                reduction=red,
                log_target=lt,
                description=f"3 rows of {kind} distributions over 5 categories",
            )


def _zero_dim(functions: tuple[str, ...]) -> Iterator[Spec]:
    for (sx, st_), dtype, lt in itertools.product(
        (((), ()), ((), (3,)), ((3,), ())), ("float32", "float64"), (False, True)
    ):
        base = f"{_shape(sx)}x{_shape(st_)}/{dtype}/{_lt(lt)}"
        x, t = _regular(base, sx, st_, dtype, dtype, lt)
        for red in REDUCTIONS:
            yield from _fwd_bwd(
                f"{base}/{red}",
                "semantics.zero_dim",
                "gradients.zero_dim",
                functions,
                input=x,
                target=t,
                reduction=red,
                log_target=lt,
            )


def _empty(functions: tuple[str, ...]) -> Iterator[Spec]:
    for s, lt in itertools.product(((0,), (0, 3), (3, 0), (2, 0, 4)), (False, True)):
        for red in REDUCTIONS:
            yield from _fwd_bwd(
                f"{_shape(s)}/{_lt(lt)}/{red}",
                "semantics.empty",
                "gradients.empty",
                functions,
                input=np.zeros(s),
                target=np.zeros(s),
                reduction=red,
                log_target=lt,
            )


def _broadcasting(functions: tuple[str, ...]) -> Iterator[Spec]:
    for (sx, st_), dtype, lt in itertools.product(
        BROADCASTS, ("float32", "float64"), (False, True)
    ):
        base = f"{_shape(sx)}x{_shape(st_)}/{dtype}/{_lt(lt)}"
        x, t = _regular(base, sx, st_, dtype, dtype, lt)
        for red in REDUCTIONS:
            yield from _fwd_bwd(
                f"{base}/{red}",
                "semantics.broadcasting",
                "gradients.broadcasting",
                functions,
                input=x,
                target=t,
                reduction=red,
                log_target=lt,
            )


def _dtypes(functions: tuple[str, ...]) -> Iterator[Spec]:
    for a, b in itertools.permutations(FLOAT_DTYPES, 2):
        for lt in (False, True):
            base = f"{a}x{b}/{_lt(lt)}"
            x, t = _dist(base, (2, 3), "softmax", "float64", lt)
            x, t = x.astype(a), t.astype(b)
            bound = min((x.dtype, t.dtype), key=lambda d: d.itemsize)
            for red in REDUCTIONS:
                yield from _fwd_bwd(
                    f"{base}/{red}",
                    "semantics.dtypes",
                    "gradients.dtypes",
                    functions,
                    input=x,
                    target=t,
                    reduction=red,
                    log_target=lt,
                    bound_dtype=bound,
                    description=f"input {a}, target {b}: result "
                    f"{np.result_type(x.dtype, t.dtype).name}",
                )


def _subnormal(functions: tuple[str, ...]) -> Iterator[Spec]:
    for dtype, lt in itertools.product(FLOAT_DTYPES, (False, True)):
        base = f"{dtype}/{_lt(lt)}"
        r = _rng(base)
        info = np.finfo(dtype)
        x = _uniform(r, -30.0, 30.0, (6,)).astype(dtype)
        if lt:
            lo = math.log(float(info.smallest_subnormal))
            hi = math.log(float(info.smallest_normal))
            t = _uniform(r, lo + 0.1, hi, (6,)).astype(dtype)
        else:
            bits = info.nmant  # subnormals: k * smallest_subnormal, 1 <= k < 2**nmant
            ks = [1, 2, 3] + [1 + r.randrange(2**bits - 1) for _ in range(3)]
            t = (np.asarray(ks, dtype=np.float64) * float(info.smallest_subnormal)).astype(dtype)
        # Backward only for probability targets: the oracle's log_target gradient multiplies
        # a subnormal e^t, rounded, by t - x + 1 and states no bound for that error.
        fns = tuple(f for f in functions if not (lt and f == "kl_div_backward"))
        for red in REDUCTIONS:
            yield from _fwd_bwd(
                f"{base}/{red}",
                "accuracy.subnormal",
                "gradients.subnormal",
                fns,
                input=x,
                target=t,
                reduction=red,
                log_target=lt,
                description="targets (or exp of log-targets) in the subnormal range",
            )


def _large(functions: tuple[str, ...], max_elements: int) -> Iterator[Spec]:
    """Yield one reduction per (support, dtype, log_target), the three in turn; one backward."""
    combos = itertools.product(
        ((2, 1000), (1, 4096), (2, 20000), (1, 100000)), (False, True), ("float32", "float64")
    )
    for k, (shape, lt, dtype) in enumerate(combos):
        if math.prod(shape) > max_elements:
            continue
        base = f"{_shape(shape)}/{dtype}/{_lt(lt)}"
        red = ("sum", "mean", "batchmean")[k % 3]
        x, t = _dist(f"{_shape(shape)}/{_lt(lt)}", shape, "softmax", dtype, lt)
        desc = f"{shape[0]} distribution(s) over {shape[1]} categories"
        fns = functions if (dtype, lt) == ("float32", False) else ("kl_div",)
        fns = tuple(f for f in fns if f in functions)
        if "kl_div" in fns:
            yield Spec(
                f"accuracy.large_support/{base}/{red}",
                "accuracy.large_support",
                "kl_div",
                x,
                t,
                red,
                lt,
                description=desc,
            )
        if "kl_div_backward" in fns:
            yield Spec(
                f"gradients.large_support/{base}/batchmean",
                "gradients.large_support",
                "kl_div_backward",
                x,
                t,
                "batchmean",
                lt,
                grad_output=_grad_output(x, t, "batchmean"),
                description=desc,
            )


def _errors(functions: tuple[str, ...]) -> Iterator[Spec]:
    x, t = np.log(np.asarray([0.5, 0.5])), np.asarray([0.3, 0.7])
    for fn in functions:
        back = fn == "kl_div_backward"
        g = np.asarray(1.0) if back else None
        for bad in ("batch_mean", "Mean", "avg", "max", ""):
            yield Spec(
                f"semantics.bad_reduction/{fn}/{bad or 'empty'}",
                "semantics.bad_reduction",
                fn,
                x,
                t,
                bad,
                grad_output=g,
                expected_error=True,
                description=f"reduction={bad!r}",
            )
        f = np.asarray([0.25, 0.75])
        bad_arrays = {
            "int64": np.asarray([1, 0], dtype=np.int64),
            "int32": np.asarray([1, 0], dtype=np.int32),
            "bool": np.asarray([True, False]),
        }
        for name, a in bad_arrays.items():
            for which in ("input", "target"):
                xi, ti = (a, f) if which == "input" else (f, a)
                yield Spec(
                    f"semantics.non_float_input/{fn}/{which}-{name}",
                    "semantics.non_float_input",
                    fn,
                    xi,
                    ti,
                    "sum",
                    grad_output=g,
                    expected_error=True,
                    description=f"{which} of dtype {name}",
                )
        for sx, st_ in (((2, 3), (3, 2)), ((4,), (3,)), ((2, 3), (2,))):
            for red in REDUCTIONS:
                go = None
                if back:
                    go = np.ones(sx) if red == "none" else np.asarray(1.0)
                yield Spec(
                    f"semantics.incompatible_shapes/{fn}/{_shape(sx)}x{_shape(st_)}/{red}",
                    "semantics.incompatible_shapes",
                    fn,
                    np.zeros(sx),
                    np.full(st_, 0.5),
                    red,
                    grad_output=go,
                    expected_error=True,
                    description=f"shapes {sx} and {st_} do not broadcast",
                )
        if back:
            for gs in ((3,), (2, 4, 1)):
                yield Spec(
                    f"semantics.incompatible_shapes/{fn}/grad_output{_shape(gs)}",
                    "semantics.incompatible_shapes",
                    fn,
                    np.zeros((2, 4)),
                    np.full((2, 4), 0.25),
                    "none",
                    grad_output=np.ones(gs),
                    expected_error=True,
                    description=f"grad_output of shape {gs} for an output of shape (2, 4)",
                )


def specs(
    *,
    functions: tuple[str, ...] = ("kl_div", "kl_div_backward"),
    dtypes: tuple[str, ...] = FLOAT_DTYPES,
    max_elements: int = 4096,
    groups: tuple[str, ...] | None = None,
) -> list[Spec]:
    """Return every case selected, in a fixed order.

    ``dtypes`` keeps the cases whose floating-point arrays all have one of them
    (an invalid-argument case's integer or boolean array does not count);
    ``max_elements`` drops cases with an array (operand or result) of more
    elements; ``groups`` keeps the cases of those property groups.
    """
    families = [
        _edge(functions),
        _reductions(functions),
        _zero_dim(functions),
        _empty(functions),
        _broadcasting(functions),
        _dtypes(functions),
        _subnormal(functions),
        _large(functions, max_elements),
        _errors(functions),
    ]
    out = []
    for spec in itertools.chain.from_iterable(families):
        floats = [a.dtype.name for a in spec.arrays() if a.dtype.kind == "f"]
        if any(d not in dtypes for d in floats):
            continue
        sizes = [a.size for a in spec.arrays()]
        if not spec.expected_error:
            sizes.append(math.prod(np.broadcast_shapes(spec.input.shape, spec.target.shape)))
        if max(sizes) > max_elements:
            continue
        if groups is not None and spec.property.split(".", 1)[0] not in groups:
            continue
        out.append(spec)
    return out


# --------------------------------------------------------------------------------------
# Expected values


def _up(a: np.ndarray) -> np.ndarray:
    """Return float64 values rounded up by one ULP (a safe upper bound after rounding)."""
    a = np.asarray(a, dtype=np.float64)
    return np.where(a > 0, np.nextafter(a, np.inf), a)


def _widen(tol: np.ndarray, rounded: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Return ``tol + |rounded - exact|`` where ``exact`` is finite, else 0, rounded up."""
    with np.errstate(all="ignore"):
        wide = np.asarray(exact).astype(np.longdouble)
        finite = np.isfinite(wide) & np.isfinite(rounded)
        diff = np.where(finite, np.abs(rounded.astype(np.longdouble) - wide), 0)
        tol = np.where(finite, np.broadcast_to(tol, wide.shape), 0.0)
        return _up((tol + diff).astype(np.float64))


_EXACT: list[Any] = []


def _exact_ctx() -> Any:
    """Return a 160-bit mpmath context: the exact values that are rounded to the dtypes."""
    if not _EXACT:
        import mpmath

        ctx = mpmath.MPContext()
        ctx.prec = 160
        _EXACT.append(ctx)
    return _EXACT[0]


def _refine(value: np.ndarray, atol: np.ndarray, tol: np.ndarray, exact: dict[int, Any]) -> None:
    """Set, in place, the elements ``exact`` gives (flat index -> value at 160 bits).

    Each becomes its exact value correctly rounded to ``value``'s dtype, with the
    tolerance ``tol`` widened by the distance between the two, rounded up. The
    oracle's extended precision (64 bits where ``long double`` is x87's) leaves too
    few bits after cancellation to round ``t log t - t x`` correctly to float64;
    160 bits do.
    """
    flat_v, flat_a = value.reshape(-1), atol.reshape(-1)
    flat_t = np.broadcast_to(tol, value.shape).reshape(-1)
    ctx = _exact_ctx()
    for i, m in exact.items():
        r = round_exact(m, value.dtype)
        flat_v[i] = r
        if math.isfinite(r):
            diff = float(abs(ctx.mpf(r) - m))
            bound = (float(flat_t[i]) + diff) * (1 + 2**-50)
            flat_a[i] = math.nextafter(bound, math.inf) if bound > 0 else bound
        else:
            flat_a[i] = 0.0


def _mp_pointwise(spec: Spec, exact: oracle.Exact) -> dict[int, Any]:
    """Return the exact loss at 160 bits of the oracle's regular elements (flat index -> mpf).

    Regular: computed by the oracle from the formula (a positive scale) with a
    finite nonzero value; the others (NaN, infinities, zeros, IEEE evaluation where
    a term overflows) are exact as the oracle has them.
    """
    ctx = _exact_ctx()
    xb, tb = np.broadcast_arrays(spec.input.astype(np.float64), spec.target.astype(np.float64))
    with np.errstate(all="ignore"):
        regular = (exact.scale > 0) & np.isfinite(exact.value) & (exact.value != 0)
    out = {}
    for i in np.flatnonzero(regular).tolist():
        mx, mt = ctx.mpf(float(xb.flat[i])), ctx.mpf(float(tb.flat[i]))
        out[i] = ctx.exp(mt) * (mt - mx) if spec.log_target else mt * ctx.log(mt) - mt * mx
    return out


def _forward(spec: Spec) -> Expected:
    exact = oracle.pointwise(spec.input, spec.target, log_target=spec.log_target)
    rdtype = np.result_type(spec.input.dtype, spec.target.dtype)
    if spec.bound_dtype is not None:
        exact.dtype = np.dtype(spec.bound_dtype)
    mp = _mp_pointwise(spec, exact)
    if spec.reduction == "none":
        tol = oracle.pointwise_tolerance(exact)
        value = round_to_dtype(exact.value, rdtype)
        atol = _widen(tol, value, exact.value)
        _refine(value, atol, tol, mp)
        return Expected(value, atol)
    _, tol = oracle.reduce(exact, spec.reduction, spec.input.shape)
    d = oracle.divisor(spec.reduction, spec.input.shape, exact.value.shape)
    with np.errstate(all="ignore"):
        plain = exact.value.astype(np.float64)
        if not np.isfinite(plain).all() or d == 0:  # NaN and infinities as in IEEE summation
            v = float(np.sum(plain)) / d if d else math.nan
            return Expected(np.asarray(v, dtype=rdtype), np.zeros(()))
    ctx = _exact_ctx()
    total = ctx.fsum(mp.get(i, ctx.mpf(float(v))) for i, v in enumerate(plain.ravel().tolist()))
    if total == 0 and plain.size and np.all(np.signbit(plain)):
        s = -0.0  # an IEEE sum of negative zeros
    else:
        s = round_exact(total, rdtype)
    with np.errstate(all="ignore"):
        if d == 1:
            value = np.asarray(s, dtype=rdtype)
        elif rdtype.itemsize < 4:
            value = np.asarray(np.float32(s) / np.float32(d)).astype(rdtype)
        else:
            value = np.asarray(rdtype.type(s) / rdtype.type(d), dtype=rdtype)
    if not np.isfinite(value):
        return Expected(value, np.zeros(()))
    diff = float(abs(total / d - ctx.mpf(float(value))))
    return Expected(value, _up(np.asarray((tol + diff) * (1 + 2**-50))))


def _mp_gradients(spec: Spec) -> tuple[dict[int, Any], dict[int, Any]]:
    """Return the exact gradients at 160 bits, summed to each argument (flat index -> mpf).

    Only for the argument elements all of whose broadcast copies are regular: finite
    operands and upstream gradient, a positive target (without ``log_target``), an
    ``e^t`` neither 0 nor infinite in the dtype (with it).
    """
    assert spec.grad_output is not None
    ctx = _exact_ctx()
    dtype = np.result_type(spec.input.dtype, spec.target.dtype)
    out_shape = np.broadcast_shapes(spec.input.shape, spec.target.shape)
    d = oracle.divisor(spec.reduction, spec.input.shape, out_shape)
    x, t, g = (
        np.broadcast_to(a.astype(np.float64), out_shape).ravel()
        for a in (spec.input, spec.target, spec.grad_output)
    )
    with np.errstate(all="ignore"):
        regular = np.isfinite(x) & np.isfinite(t) & np.isfinite(g) & (d > 0)
        if spec.log_target:
            e = np.exp(t.astype(dtype))
            regular &= (e != 0) & np.isfinite(e)
        else:
            regular &= t > 0
    sums: list[dict[int, list[Any]]] = [{}, {}]
    bad: list[set[int]] = [set(), set()]
    owners = [
        np.broadcast_to(np.arange(a.size).reshape(a.shape), out_shape).ravel()
        for a in (spec.input, spec.target)
    ]
    for i in range(x.size):
        if not regular[i]:
            bad[0].add(int(owners[0][i]))
            bad[1].add(int(owners[1][i]))
            continue
        gd = ctx.mpf(float(g[i])) / d
        mx, mt = ctx.mpf(float(x[i])), ctx.mpf(float(t[i]))
        if spec.log_target:
            em = ctx.exp(mt)
            pair = (-gd * em, gd * em * (mt - mx + 1))
        else:
            pair = (-gd * mt, gd * (ctx.log(mt) + 1 - mx))
        for k in (0, 1):
            sums[k].setdefault(int(owners[k][i]), []).append(pair[k])
    return tuple(  # type: ignore[return-value]
        {j: ctx.fsum(terms) for j, terms in sums[k].items() if j not in bad[k]} for k in (0, 1)
    )


def _ieee_gradients(spec: Spec) -> tuple[np.ndarray, np.ndarray]:
    """Return PyTorch's evaluation order of the pointwise gradients in the dtype ('none')."""
    dtype = np.result_type(spec.input.dtype, spec.target.dtype)
    assert spec.grad_output is not None
    g, x, t = (a.astype(dtype) for a in (spec.grad_output, spec.input, spec.target))
    with np.errstate(all="ignore"):
        if spec.log_target:
            e = np.exp(t)
            return -(g * e), (g * (t - x)) * e + g * e
        ok = (t > 0) & np.isfinite(t)
        return -(t * g), np.where(ok, g * (np.log(np.where(ok, t, 1)) + 1 - x), np.nan)


def _backward(spec: Spec) -> tuple[Expected, Expected]:
    assert spec.grad_output is not None
    (gx, tx), (gt, tt) = oracle.gradients(
        spec.grad_output.astype(np.float64),
        spec.input,
        spec.target,
        reduction=spec.reduction,
        log_target=spec.log_target,
    )
    if spec.bound_dtype is not None:
        # Mixed dtypes: the bounds of the less precise dtype, as for the forward (PyTorch's
        # autograd differentiates xlogy(t, t) in the target's own dtype).
        result = np.result_type(spec.input.dtype, spec.target.dtype)
        ratio = float(np.finfo(spec.bound_dtype).eps / np.finfo(result).eps)
        tiny = oracle.GRADIENT_ULPS * float(np.finfo(spec.bound_dtype).smallest_subnormal)
        tx, tt = tx * ratio + tiny, tt * ratio + tiny
    if spec.signed_zeros:
        # The sign of a zero gradient is that of PyTorch's evaluation order (docs/spec.md:
        # "+0 as in PyTorch" for the log_target target gradient where e^t underflows).
        for exact, ieee in zip((gx, gt), _ieee_gradients(spec), strict=True):
            zero = (exact == 0) & (ieee == 0)
            exact[zero] = np.copysign(0.0, ieee[zero])
    out = []
    for exact, tol, arg, mp in zip(
        (gx, gt), (tx, tt), (spec.input, spec.target), _mp_gradients(spec), strict=True
    ):
        value = round_to_dtype(exact, arg.dtype)
        atol = _widen(tol, value, exact)
        with np.errstate(all="ignore"):
            keep = np.isfinite(exact).ravel() & (exact != 0).ravel()
        _refine(value, atol, tol, {j: m for j, m in mp.items() if keep[j] and m != 0})
        out.append(Expected(value, atol))
    return out[0], out[1]


def expected(spec: Spec, /) -> Expected | tuple[Expected, Expected] | None:
    """Return the expected result of ``spec``: one array, the two gradients, or None (an error)."""
    if spec.expected_error:
        return None
    if spec.function == "kl_div":
        return _forward(spec)
    return _backward(spec)


# --------------------------------------------------------------------------------------
# From logits: the generalised Jensen-Shannon divergence (beta)
#
# The exported document (``specs``, ``"format": "kldiv-spec-vectors"``) holds ``kl_div``
# and ``kl_div_backward`` cases only, and is unchanged. The from-logits cases with a
# ``beta`` are golden data of their own, built and judged the same way (data from the
# id alone, expected values from the exact oracle, per-element tolerances): Python
# ports and the tests use them through :func:`logits_specs` and :func:`logits_expected`.

#: The values of ``beta`` the golden from-logits cases take: the endpoints (the forward
#: and the reverse KL), the symmetric mixture and an asymmetric one.
LOGITS_BETAS: tuple[float, ...] = (0.0, 0.3, 0.5, 1.0)


@dataclass
class LogitsSpec:
    """One golden call of ``kl_div_from_logits`` (and its backward) with ``beta``.

    ``options`` are the keywords (``beta``, ``temperature``, ``reduction``,
    ``direction``, ``scale_by_temperature_squared``); ``mask`` the row mask or
    None; ``grad_output`` the upstream gradient of the backward (0-d for the
    reductions).
    """

    id: str
    property: str
    input: np.ndarray
    target: np.ndarray
    options: dict[str, Any]
    grad_output: np.ndarray
    mask: np.ndarray | None = None
    description: str = ""


@dataclass
class LogitsExpected:
    """The expected value and gradients (student, teacher) of a :class:`LogitsSpec`."""

    value: Expected
    grad_input: Expected
    grad_target: Expected


def _logits_data(case_id: str, shape: tuple[int, ...], dtype: str) -> tuple[Any, Any]:
    """Return student and teacher logits from the id: Gaussian-like, spread 3, in ``dtype``."""
    r = _rng(case_id)
    n = math.prod(shape)
    s = np.asarray([3.0 * r.gauss(0.0, 1.0) for _ in range(n)]).reshape(shape)
    t = s + np.asarray([3.0 * r.gauss(0.0, 1.0) for _ in range(n)]).reshape(shape)
    return s.astype(dtype), t.astype(dtype)


def _logits_grad_output(
    case_id: str, shape: tuple[int, ...], reduction: str, dtype: str
) -> np.ndarray:
    if reduction != "none":
        return np.asarray(0.75, dtype)
    r = _rng(case_id + "/g")
    return np.asarray([0.5 + r.random() for _ in range(math.prod(shape))], dtype).reshape(shape)


def logits_specs() -> list[LogitsSpec]:
    """Return the golden from-logits cases with ``beta``, in a fixed order.

    Every beta of :data:`LOGITS_BETAS` in float16 (computed in float32, rounded once),
    float32 and float64 with each reduction (T = 2, the T**2 factor on and off), masked
    rows, and the edges: a class the student alone excludes (``+inf`` at ``beta=0``,
    finite in between), one the teacher alone excludes (``+inf`` at ``beta=1``), one
    both exclude (0), a row without a softmax (NaN), every row masked (0).
    """
    out: list[LogitsSpec] = []
    reductions = ("none", "sum", "batchmean", "rowmean", "mean")
    for k, beta in enumerate(LOGITS_BETAS):
        for dtype in ("float16", "float32", "float64"):
            for j, reduction in enumerate(reductions):
                cid = f"logits/beta={beta}/{dtype}/{reduction}"
                s, t = _logits_data(cid, (3, 6), dtype)
                options = {
                    "beta": beta,
                    "temperature": 2.0,
                    "reduction": reduction,
                    "direction": "forward",
                    "scale_by_temperature_squared": (j + k) % 2 == 0,
                }
                mask = np.asarray([True, False, True]) if reduction in ("rowmean", "sum") else None
                out.append(
                    LogitsSpec(
                        cid,
                        "accuracy.logits_options",
                        s,
                        t,
                        options,
                        _logits_grad_output(cid, s.shape, reduction, dtype),
                        mask,
                        f"beta={beta}, {reduction}, {dtype}",
                    )
                )
    inf, nan = math.inf, math.nan
    s_edge = np.asarray(
        [
            [0.0, -inf, 1.0, 2.0],
            [0.0, 1.0, 1.0, 2.0],
            [0.0, -inf, 1.0, -inf],
            [0.0, 1.0, nan, 2.0],
        ]
    )
    t_edge = np.asarray(
        [
            [1.0, 0.5, 0.0, 2.0],
            [1.0, -inf, 0.0, 2.0],
            [1.0, 0.5, -inf, -inf],
            [1.0, 0.5, 0.0, 2.0],
        ]
    )
    for beta in LOGITS_BETAS:
        options = {
            "beta": beta,
            "temperature": 1.0,
            "reduction": "none",
            "direction": "forward",
            "scale_by_temperature_squared": True,
        }
        cid = f"logits/beta={beta}/edges"
        out.append(
            LogitsSpec(
                cid,
                "semantics.logits_edge_values",
                s_edge,
                t_edge,
                options,
                _logits_grad_output(cid, s_edge.shape, "none", "float64"),
                None,
                "excluded by the student, the teacher, both; no softmax",
            )
        )
    # the weighting side keeps a class the other excludes and excludes the rest (+inf), and
    # excludes half of a uniform other's classes: 0 at each class it excludes, also there
    s_w = np.asarray([row[0] for row in WEIGHT_EXCLUDES])
    t_w = np.asarray([row[1] for row in WEIGHT_EXCLUDES])
    for beta in (0.0, 1.0):
        for reduction in ("none", "sum"):
            cid = f"logits/beta={beta}/weight_excludes/{reduction}"
            options = {
                "beta": beta,
                "temperature": 1.0,
                "reduction": reduction,
                "direction": "forward",
                "scale_by_temperature_squared": True,
            }
            out.append(
                LogitsSpec(
                    cid,
                    "gradients.logits_edge_values",
                    s_w,
                    t_w,
                    options,
                    _logits_grad_output(cid, s_w.shape, reduction, "float64"),
                    None,
                    "the weighting side excludes classes: their gradient is 0, also at +inf",
                )
            )
    for reduction in ("sum", "rowmean"):
        cid = f"logits/beta=0.3/fully_masked/{reduction}"
        options = {
            "beta": 0.3,
            "temperature": 2.0,
            "reduction": reduction,
            "direction": "forward",
            "scale_by_temperature_squared": True,
        }
        out.append(
            LogitsSpec(
                cid,
                "semantics.logits_fully_masked",
                s_edge,
                t_edge,
                options,
                np.asarray(0.75),
                np.zeros(4, bool),
                "every row masked: 0",
            )
        )
    return out


def _logits_exact(spec: LogitsSpec) -> Any:
    return oracle_logits.from_logits(
        spec.input, spec.target, mask=spec.mask, grad_output=spec.grad_output, **spec.options
    )


def _expected_array(exact: np.ndarray, tol: np.ndarray, dtype: np.dtype) -> Expected:
    """Return ``exact`` (float64, rounded once from the oracle) in ``dtype`` with its atol."""
    with np.errstate(all="ignore"):
        value = np.asarray(exact, np.float64).astype(dtype)
    return Expected(value, _widen(np.asarray(tol, np.float64), value, np.asarray(exact)))


def logits_expected(spec: LogitsSpec, /) -> LogitsExpected:
    """Return the expected value and gradients of ``spec`` with per-element tolerances.

    The values are the exact oracle's (:mod:`.oracle_logits`, float64 rounded
    once), rounded to the logits' dtype; the tolerance of an element is the
    suite's bound (:func:`.oracle_logits.reduce_logits`,
    :func:`~.oracle_logits.pointwise_tolerance`,
    :func:`~.oracle_logits.gradient_tolerance`) widened by the distance of the
    stated value from the exact one, as for the exported vectors.
    """
    exact = _logits_exact(spec)
    dtype = np.result_type(spec.input.dtype, spec.target.dtype)
    if spec.options["reduction"] == "none":
        value = _expected_array(exact.terms, oracle_logits.pointwise_tolerance(exact), dtype)
    else:
        v, tol = oracle_logits.reduce_logits(exact)
        value = _expected_array(np.asarray(v), np.asarray(tol), dtype)
    tol_s, tol_t = oracle_logits.gradient_tolerance(exact)
    return LogitsExpected(
        value,
        _expected_array(exact.grad_input, tol_s, dtype),
        _expected_array(exact.grad_target, tol_t, dtype),
    )
