"""The compiled float64 kernel of the NumPy from-logits fast path (backends/_fused_logits64.c).

``rows_f64`` has ``rows_f32``'s contract on float64 buffers (the float32 kernel is held to it
by tests/test_backend_numpy_logits_fused.py); its own ``exp`` and compensated sums are held
to bounds:

- its ``exp`` within the documented ulp bound on a sweep of the whole range (the subnormal
  results included), and IEEE's values at the edges;
- each row's divergence against the exact divergence (mpmath, 50 digits) of the float64
  shifted logits ``x = fl(fl(z / T) - m)`` it forms (the reference's), within the bound of
  the kernel's header; the gradient and terms within a few units of roundoff of their sizes;
- the edge rows: every pattern of ``-inf`` stays in the kernel, NaN and ``+inf`` rows are
  marked and end up the reference's, through every public call against the exact oracle;
- unaligned buffers, huge and tiny temperatures, logits near the float64 limits;
- and that float64 logits (and the wide float32 and half-precision ones) take it, and the
  ufunc path where it is not built, not available or turned off.
"""

from __future__ import annotations

import math
import types
from typing import Any

import numpy as np
import pytest
from _support import misaligned, setenv, spy_kernel_rows
from test_backend_numpy_logits_fused import (
    CASES,
    assert_close,
    check_against_oracle,
    reduced_options,
)

from kldiv_spec import kl_div_from_logits, kl_div_from_logits_backward
from kldiv_spec.backends import _blocks_logits
from kldiv_spec.conformance import oracle_logits as oracle

F: Any = _blocks_logits._fused_logits64
pytestmark = pytest.mark.skipif(
    F is None or not F.available(),
    reason="the float64 from-logits kernel is not built here, or this CPU has no AVX2",
)

mpmath = pytest.importorskip("mpmath")

inf, nan = math.inf, math.nan
U = 2.0**-53  # float64's unit roundoff
#: The documented bound on the kernel's exp (benchmarks/logits64_bench.py --exp-sweep: at
#: most 0.7852 ulp, on a subnormal result; 0.6982 ulp over the normal results).
EXP_ULP_BOUND = 0.80
#: The exp's relative error on normal results (<= 0.70 ulp <= 1.4 u), used in the bounds.
ETA = 1.4 * U
#: The compensated sums' bound, relative to the sum of the magnitudes (the header: 8u).
SUM = 8 * U
TINY = float(np.finfo(np.float64).smallest_subnormal)
THREADS_ENV = "KLDIV_SPEC_NUM_THREADS"
FUSED_ENV = "KLDIV_SPEC_NUMPY_FUSED"


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the rows of every block the compiled float64 kernel evaluates."""
    return spy_kernel_rows(monkeypatch, _blocks_logits, "_fused_logits64", "rows_f64")


def without_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send float64 logits to the ufunc path."""
    monkeypatch.setattr(_blocks_logits, "_fused_logits64", None)


def logits(shape: tuple[int, ...], seed: int, spread: float = 3.0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    s = rng.normal(0.0, spread, size=shape)
    t = s + rng.normal(0.0, spread / 2, size=shape)
    return s, t


def shifted(z: np.ndarray, temperature: float) -> np.ndarray:
    """The kernel's (and the reference's) float64 x = fl(fl(z / T) - m)."""
    zb = z if temperature == 1.0 else z / temperature
    return zb - zb.max(axis=1, keepdims=True)


def rows_in_float64(s: np.ndarray, t: np.ndarray, temperature: float, direction: str) -> Any:
    """The row quantities from the kernel's x, in float64 (regular rows)."""
    xs, xt = shifted(s, temperature), shifted(t, temperature)
    zs, zt = np.exp(xs).sum(axis=1), np.exp(xt).sum(axis=1)
    q, p = np.exp(xs) / zs[:, None], np.exp(xt) / zt[:, None]
    if direction == "forward":
        w, d, c = p, xt - xs, np.log(zs) - np.log(zt)
    else:
        w, d, c = q, xs - xt, np.log(zt) - np.log(zs)
    kl = (w * d).sum(axis=1) + c
    return types.SimpleNamespace(q=q, p=p, w=w, d=d, c=c, kl=kl, zs=zs, zt=zt)


def exact_kl(s: np.ndarray, t: np.ndarray, temperature: float, direction: str) -> np.ndarray:
    """Each row's exact divergence of the float64 shifted logits (mpmath, 50 digits)."""
    xs, xt = shifted(s, temperature), shifted(t, temperature)
    if direction == "reverse":
        xs, xt = xt, xs  # x_o, x_w
    out = np.empty(len(xs))
    with mpmath.workdps(50):
        for r in range(len(xs)):
            eo = [mpmath.exp(mpmath.mpf(float(v))) for v in xs[r]]
            ew = [mpmath.exp(mpmath.mpf(float(v))) for v in xt[r]]
            zo, zw = mpmath.fsum(eo), mpmath.fsum(ew)
            d = [
                mpmath.mpf(float(a)) - mpmath.mpf(float(b))
                for a, b in zip(xt[r], xs[r], strict=True)
            ]
            sw = mpmath.fsum(e * v for e, v in zip(ew, d, strict=True))
            out[r] = float(sw / zw + mpmath.log(zo) - mpmath.log(zw))
    return out


def kl_bound(ref: Any) -> np.ndarray:
    """The header's bound on a row's divergence (with the float64 evaluation's sizes)."""
    wd = (ref.w * np.abs(ref.d)).sum(axis=1)
    logs = np.abs(np.log(ref.zs)) + np.abs(np.log(ref.zt)) + np.abs(ref.kl)
    return (2 * ETA + 18 * U) * wd + 2 * (ETA + SUM) + 2 * U * logs


def run_rows(
    s: np.ndarray,
    t: np.ndarray,
    temperature: float,
    direction: str,
    *,
    loss: bool = True,
    grad_scale: float | None = None,
    factor: float | None = None,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """One direct call of the kernel over all of ``s`` and ``t``: (kl, grad, terms)."""
    rows, vocab = s.shape
    kl = np.full(rows, -1.0) if loss else None
    grad = np.full(s.shape, -1.0) if grad_scale is not None else None
    terms = np.full(s.shape, -1.0) if factor is not None else None
    result = F.rows_f64(
        s,
        t,
        vocab,
        kl,
        grad,
        terms,
        temperature,
        0.0 if grad_scale is None else grad_scale,
        1.0 if factor is None else factor,
        direction == "reverse",
    )
    assert result is None
    return kl, grad, terms


def marked(kl: np.ndarray) -> np.ndarray:
    return kl.view(np.uint64) == np.uint64(_blocks_logits.REDO_BITS)


# --------------------------------------------------------------------------- exp


def ulp_error(x: np.ndarray, got: np.ndarray) -> np.ndarray:
    """|got - e^x| in ulps of e^x, from long double (x87: 11 bits more) where e^x is finite."""
    exact = np.exp(x.astype(np.longdouble))
    unit = np.where(
        exact >= 2.0**-1022,
        np.ldexp(np.longdouble(1), (np.frexp(exact)[1] - 53).astype(np.int64)),
        np.longdouble(TINY),
    )
    return np.asarray(np.abs(got.astype(np.longdouble) - exact) / unit, dtype=np.float64)


def sweep_arguments(n: int, seed: int) -> np.ndarray:
    """Arguments over [-745.2, 709.78]: uniform, the subnormal results, every binade near 0."""
    rng = np.random.default_rng(seed)
    near_zero = rng.choice([-1.0, 1.0], n // 8) * 2.0 ** rng.uniform(-60, 0, n // 8)
    return np.concatenate(
        [
            rng.uniform(-745.2, 709.78, n // 2),
            rng.uniform(-745.13, -708.39, n // 4),  # subnormal results
            near_zero,
            rng.uniform(-1.0, 1.0, n // 8) * 30,
        ]
    )


@pytest.mark.skipif(np.finfo(np.longdouble).nmant < 60, reason="no extended long double")
def test_exp_sweep_stays_within_the_documented_bound() -> None:
    x = sweep_arguments(1 << 21, 0)
    got = np.empty_like(x)
    assert F.exp_f64(x, got) is None
    err = ulp_error(x, got)
    assert err.max() <= EXP_ULP_BOUND, (err.max(), x[np.argmax(err)])
    normal = np.exp(x.astype(np.longdouble)) >= 2.0**-1022
    assert err[normal].max() <= 0.72, (err[normal].max(), x[normal][np.argmax(err[normal])])


def test_exp_against_mpmath() -> None:
    """A sample, and the worst arguments of the long double sweep, against mpmath."""
    x = np.concatenate([sweep_arguments(4000, 1), [-708.4985523997203, -273.8896601386715]])
    got = np.empty_like(x)
    F.exp_f64(x, got)
    worst = 0.0
    with mpmath.workdps(40):
        for v, g in zip(x, got, strict=True):
            exact = mpmath.exp(mpmath.mpf(float(v)))
            unit = 2.0 ** (math.frexp(float(exact))[1] - 53) if exact >= 2.0**-1022 else TINY
            worst = max(worst, float(abs(mpmath.mpf(float(g)) - exact) / unit))
    assert worst <= EXP_ULP_BOUND


def test_exp_edge_values() -> None:
    big = float(np.finfo(np.float64).max)
    x = np.array([0.0, -0.0, inf, -inf, nan, 709.79, 710.0, 1e4, big, -745.2, -746.0, -1e4, -big])
    want = np.array([1.0, 1.0, inf, 0.0, nan, inf, inf, inf, inf, 0.0, 0.0, 0.0, 0.0])
    got = np.empty_like(x)
    F.exp_f64(x, got)
    np.testing.assert_array_equal(got, want)
    assert not np.signbit(got).any()
    # the borders: one of the two neighbours of the exact value, and positive
    x = np.array([709.78, 709.782712893, -708.39, -708.4, -745.1, -745.13, 1e-300, -1e-300])
    got = np.empty_like(x)
    F.exp_f64(x, got)
    assert (ulp_error(x, got) < 1).all() and (got > 0).all()
    assert (got[-2:] == 1).all()


def test_exp_of_any_length_and_alignment() -> None:
    x = np.linspace(-750, 712, 1001)
    want = np.empty_like(x)
    F.exp_f64(x, want)
    for n in (1, 3, 4, 5, 7, 9, 1001):
        for offset in (1, 4, 7):
            got = misaligned(np.zeros(n), offset)
            F.exp_f64(misaligned(x[:n], 8 - offset), got)
            np.testing.assert_array_equal(got, want[:n])


# --------------------------------------------------------------------------- the rows


SHAPES = [(1, 1), (3, 1), (2, 2), (2, 3), (1, 4), (2, 5), (2, 6), (1, 7), (4, 8), (5, 9)]
SHAPES += [(3, 15), (3, 16), (3, 17), (6, 33), (3, 1001), (2, 4099)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7, 3.0])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_rows_within_the_derived_bounds(
    shape: tuple[int, int], temperature: float, direction: str
) -> None:
    """KL within the header's bound of the exact divergence of the kernel's x (mpmath); the
    gradient and the terms within a few u of their terms' sizes of a float64 evaluation."""
    s, t = logits(shape, shape[1] + int(10 * temperature), spread=4.0)
    ref = rows_in_float64(s, t, temperature, direction)
    cg, factor = -0.37, 2.5
    kl, grad, terms = run_rows(s, t, temperature, direction, grad_scale=cg, factor=factor)
    assert kl is not None and grad is not None and terms is not None
    kl_tol = kl_bound(ref)
    if shape[1] <= 1001:
        assert_close(kl, exact_kl(s, t, temperature, direction), kl_tol, "kl")
    # against the float64 ufunc formula: its own error is within a few u of the same sizes
    assert_close(kl, ref.kl, 2 * kl_tol + 40 * U * (ref.w * np.abs(ref.d)).sum(axis=1), "kl64")
    many = 2 * ETA + 24 * U  # both sides' roundings, the ufunc formula's included
    # C = log Z_o - log Z_w on both sides: u |log Z| each, and the sums' relative errors
    c_tol = (4 * U * (np.abs(np.log(ref.zs)) + np.abs(np.log(ref.zt))) + 4 * (ETA + SUM))[:, None]
    if direction == "forward":
        want_grad = cg * (ref.q - ref.p)
        grad_tol = abs(cg) * (ref.q + ref.p) * many
    else:
        k = ref.c - ref.kl
        want_grad = cg * ref.q * (ref.d + k[:, None])
        size = np.abs(ref.d) + np.abs(k)[:, None]
        grad_tol = abs(cg) * ref.q * (size * many + 2 * kl_tol[:, None] + c_tol)
    assert_close(grad, want_grad, grad_tol + 4 * TINY, "grad")
    want_terms = factor * ref.w * (ref.d + ref.c[:, None])
    size = np.abs(ref.d) + np.abs(ref.c)[:, None]
    terms_tol = factor * ref.w * (size * many + c_tol)
    assert_close(terms, want_terms, terms_tol + 4 * TINY, "terms")
    # each output alone is the same as all of them at once
    alone_kl, _, _ = run_rows(s, t, temperature, direction)
    np.testing.assert_array_equal(alone_kl, kl)
    _, alone_grad, _ = run_rows(s, t, temperature, direction, grad_scale=cg)
    np.testing.assert_array_equal(alone_grad, grad)
    _, _, alone_terms = run_rows(s, t, temperature, direction, factor=factor)
    np.testing.assert_array_equal(alone_terms, terms)
    if direction == "forward":  # the backward alone: no divergence
        _, softmax_grad, _ = run_rows(s, t, temperature, direction, loss=False, grad_scale=cg)
        np.testing.assert_array_equal(softmax_grad, grad)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_rows_with_huge_spreads_and_underflowing_weights(direction: str) -> None:
    """Logits spread over thousands after scaling: exp's slow lanes (subnormal and zero
    results) in the same vectors as regular ones."""
    s, t = logits((7, 203), 5, spread=600.0)
    ref = rows_in_float64(s, t, 0.5, direction)
    kl, grad, terms = run_rows(s, t, 0.5, direction, grad_scale=1.0, factor=0.25)
    assert_close(kl, exact_kl(s, t, 0.5, direction), kl_bound(ref), "kl")
    assert terms is not None and grad is not None
    assert (terms[ref.w == 0] == 0).all() and not np.signbit(terms[ref.w == 0]).any()
    assert np.isfinite(grad).all()


@pytest.mark.parametrize("vocab", [1, 3, 5, 7, 9, 33, 64, 1001])
def test_the_maximum_is_found_wherever_it_lies(vocab: int) -> None:
    """A logit 3000 above the others at every position of the rows (the lanes, the tail, the
    first row of a call and the later ones, whose maxima come from the previous row's
    second pass): a maximum missed would overflow exp."""
    rng = np.random.default_rng(vocab)
    rows = min(vocab, 40) + 1
    s = rng.normal(size=(rows, vocab))
    t = rng.normal(size=(rows, vocab))
    where = np.arange(rows) % vocab
    s[np.arange(rows), where] = 3000.0
    t[np.arange(rows), (where * 7 + 3) % vocab] = 3000.0
    for direction in ("forward", "reverse"):
        ref = rows_in_float64(s, t, 1.0, direction)
        kl, grad, _ = run_rows(s, t, 1.0, direction, grad_scale=1.0)
        assert_close(kl, ref.kl, 2 * kl_bound(ref) + 1e-300, direction)
        assert grad is not None and np.isfinite(grad).all()


def test_the_sums_are_compensated() -> None:
    """2**22 classes: the kernel's sums of its own exp values within a few u of the exact
    sums (a plain float64 running sum would be off by about 2**22 u relatively)."""
    vocab = 1 << 22
    s = np.zeros((1, vocab))
    t = np.zeros((1, vocab))
    t[0, ::2] = -1.0 / 3.0
    e = np.empty(2)
    F.exp_f64(np.array([0.0, -1.0 / 3.0]), e)
    with mpmath.workdps(40):
        half = vocab // 2
        z_t = half * (mpmath.mpf(float(e[0])) + mpmath.mpf(float(e[1])))
        sw = -half * mpmath.mpf(float(e[1])) / 3  # d = -1/3 rounded: exact below
        sw = half * mpmath.mpf(float(e[1])) * mpmath.mpf(-1.0 / 3.0)
        want = float(sw / z_t + mpmath.log(vocab) - mpmath.log(z_t))
    kl, _, _ = run_rows(s, t, 1.0, "forward")
    assert kl is not None
    assert abs(kl[0] - want) <= 16 * U


def big_rows() -> tuple[np.ndarray, np.ndarray]:
    """Rows exercising every edge rule of docs/logits.md (4 classes each), in float64."""
    big = 1e308
    s = np.asarray(
        [
            [0.0, -inf, 1.0, 2.0],  # teacher and student exclude class 1: it contributes 0
            [0.0, -inf, 1.0, 2.0],  # student excludes a class the teacher keeps: +inf
            [-inf, -inf, -inf, -inf],  # student excludes everything: NaN
            [0.0, 1.0, nan, 2.0],  # NaN: NaN
            [0.0, inf, 1.0, 2.0],  # +inf: NaN
            [big, -big, 0.0, 5.0],  # huge but finite: stable
            [0.0, 0.0, 0.0, 0.0],
            [1.0, 2.0, 3.0, 4.0],
            [2000.0, -2000.0, 1.0, 0.0],  # a weight that underflows
            [-inf, -inf, 3.0, -inf],  # all but one excluded, on both sides
        ]
    )
    t = np.asarray(
        [
            [1.0, -inf, 0.0, 2.0],
            [1.0, 0.5, 0.0, 2.0],
            [1.0, 0.5, 0.0, 2.0],
            [1.0, 0.5, 0.0, 2.0],
            [1.0, 0.5, 0.0, 2.0],
            [big, -big, 1.0, 3.0],
            [-inf, -inf, -inf, -inf],  # teacher excludes everything: NaN
            [4.0, 3.0, -inf, 1.0],  # teacher excludes a class: it contributes 0
            [1990.0, -2100.0, 2.0, 0.5],
            [-inf, -inf, -1.0, -inf],
        ]
    )
    return s, t


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5, 3.0])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_the_kernel_leaves_exactly_the_rows_with_a_nan_or_plus_inf_quotient(
    temperature: float, direction: str
) -> None:
    """Rows holding NaN or +inf (or whose quotient z / T overflows to +inf) get the marker;
    -inf logits (an excluded class, a row of -inf only, a shift that overflows to -inf) are
    the kernel's: +inf, NaN (no softmax) or a finite value, never the marker."""
    s, t = big_rows()
    kl, grad, terms = run_rows(s, t, temperature, direction, grad_scale=1.0, factor=1)
    assert kl is not None and grad is not None and terms is not None
    with np.errstate(over="ignore", invalid="ignore"):
        z = np.concatenate([s, t], axis=1) / temperature
    left = ~(np.isfinite(z) | (z == -inf)).all(axis=1)
    assert left[[3, 4]].all() and not left[[0, 1, 2, 6, 7, 8, 9]].any()
    assert left[5] == (temperature < 1.0)  # 1e308 / T overflows
    np.testing.assert_array_equal(marked(kl), left)
    assert np.isnan(grad[left]).all() and np.isnan(terms[left]).all()
    assert np.isnan(kl[[2, 6]]).all() and np.isfinite(kl[[0, 8, 9]]).all()
    forward = direction == "forward"
    assert kl[1] == inf if forward else np.isfinite(kl[1])
    assert np.isfinite(kl[7]) if forward else kl[7] == inf


def edge_table() -> tuple[np.ndarray, np.ndarray]:
    s, t = big_rows()
    s2, t2 = logits((5, 4), 18)
    return np.concatenate([s, s2]), np.concatenate([t, t2])


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_edge_table_through_the_kernel(
    direction: str, temperature: float, every_size: None, kernel_calls: list[int]
) -> None:
    s, t = edge_table()
    options = {"direction": direction, "temperature": temperature}
    terms = check_against_oracle(s, t, reduction="none", **options)
    with np.errstate(invalid="ignore"):
        rows = terms.sum(axis=1)
    assert np.isnan(rows[2:5]).all() and np.isnan(rows[6])
    assert np.isfinite(rows[[8, 9]]).all() and np.isfinite(rows[10:]).all()
    if direction == "forward":
        assert terms[0, 1] == 0.0 and terms[7, 2] == 0.0
        assert rows[1] == inf and np.isfinite(rows[7])
    else:
        assert terms[0, 1] == 0.0 and terms[1, 1] == 0.0
        assert np.isfinite(rows[1]) and rows[7] == inf
    mask = np.ones(len(s), bool)
    mask[[3, 8, 12]] = False
    for reduction in ("sum", "batchmean", "rowmean", "mean"):
        check_against_oracle(s, t, reduction=reduction, **options)
        check_against_oracle(s, t, reduction=reduction, mask=mask, **options)
    check_against_oracle(s, t, reduction="none", mask=mask, **options)
    assert kernel_calls


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_nan_and_inf_rows_end_up_the_references(
    direction: str, monkeypatch: pytest.MonkeyPatch, every_size: None
) -> None:
    """The rows the kernel marks are evaluated by the reference, as on the ufunc path (which
    sends them there too): the same bits."""
    s, t = edge_table()
    options = {"direction": direction, "temperature": 0.5}
    got = [kl_div_from_logits(s, t, reduction="none", **options)]
    got.append(kl_div_from_logits_backward(0.5, s, t, reduction="sum", **options)[0])
    without_kernel(monkeypatch)
    want = [kl_div_from_logits(s, t, reduction="none", **options)]
    want.append(kl_div_from_logits_backward(0.5, s, t, reduction="sum", **options)[0])
    rows = [3, 4, 5]  # NaN, +inf, and 1e308 / 0.5
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a[rows], b[rows])
        assert_close(a, b, 1e-13 * (np.abs(b) + 1), "ufuncs")


def excluded_patterns(seed: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of every -inf pattern: a class excluded by one side, the other, both, a whole
    side, all but one class, random masks of either side."""
    s, t = logits((12, vocab), seed)
    rng = np.random.default_rng(seed)
    s[0, 1 % vocab] = -inf
    t[1, 2 % vocab] = -inf
    s[2, 0] = t[2, 0] = -inf
    s[3] = -inf
    t[4] = -inf
    s[5] = t[5] = -inf
    s[6, 1:] = -inf
    t[7, :-1] = -inf
    s[8, 1:] = t[8, 1:] = -inf
    s[9][rng.random(vocab) < 0.5] = -inf
    t[10][rng.random(vocab) < 0.7] = -inf
    both = rng.random(vocab) < 0.6
    s[11][both] = -inf
    t[11][both] = -inf
    return s, t


@pytest.mark.parametrize("vocab", [1, 2, 3, 5, 8, 13, 67])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_every_exclusion_pattern_matches_the_oracle(
    vocab: int, direction: str, every_size: None, kernel_calls: list[int]
) -> None:
    s, t = excluded_patterns(vocab, vocab)
    for reduction in ("none", "sum", "rowmean"):
        check_against_oracle(s, t, reduction=reduction, direction=direction, temperature=1.5)
    kl, _, _ = run_rows(s, t, 1.5, direction, grad_scale=1.0, factor=1.0)
    assert kl is not None and not marked(kl).any()  # -inf stays in the kernel
    assert kernel_calls


# --------------------------------------------------------------------------- public calls


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("shape", [(6, 37), (1, 1), (5, 1), (1, 9), (2, 3, 17)], ids=str)
def test_public_calls_match_the_exact_oracle(
    options: dict[str, Any], shape: tuple[int, ...], every_size: None, kernel_calls: list[int]
) -> None:
    s, t = logits(shape, sum(shape))
    check_against_oracle(s, t, **options)
    rows = math.prod(shape[:-1])
    mask = (np.arange(rows) % 3 != 1).reshape(shape[:-1])
    masked = dict(options, **reduced_options(options["reduction"], mask, shape))
    s_garbage = s.copy()
    s_garbage[~mask] = nan  # dropped rows contribute 0, whatever they hold
    check_against_oracle(s_garbage, t, **masked)
    assert sum(kernel_calls) >= 2 * rows


@pytest.mark.parametrize("temperature", [2.0**-1000, 1e-300, 3e-5, 1e5, 1e300, 2.0**1023])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_huge_and_tiny_temperatures(temperature: float, direction: str) -> None:
    """The quotient z / T is the reference's at every scale (multiplied by 1 / T only where
    that is exact): rows far from and near the limits of float64."""
    scale = min(1e300, temperature * 30)
    s, t = logits((4, 19), 7, spread=scale / 30)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = rows_in_float64(s, t, temperature, direction)
        kl, grad, _ = run_rows(s, t, temperature, direction, grad_scale=0.5)
    assert kl is not None and grad is not None
    assert not marked(kl).any()
    assert_close(kl, exact_kl(s, t, temperature, direction), kl_bound(ref), "kl")
    assert np.isfinite(grad).all()


def test_logits_near_the_float64_limits(
    monkeypatch: pytest.MonkeyPatch, every_size: None, kernel_calls: list[int]
) -> None:
    """Logits of +-1e308: shifts that overflow to -inf (excluded classes on both paths),
    products and sums that overflow (such rows go to the reference), against the ufunc
    path, which sends its non-finite rows to the reference too. (Where the student's
    probability is 1 on a class the teacher excludes, the reference's reverse gradient is
    NaN there and the exact oracle's 0: the reference's rule, on both paths.)"""
    rng = np.random.default_rng(3)
    s = rng.choice([-1.0, 1.0], (6, 9)) * rng.uniform(1e307, 1.7e308, (6, 9))
    t = s.copy()
    t[::2] = -t[::2]
    s = np.concatenate([s, [[1.7e308, -1.7e308, 1.6e308, 0.0] * 2 + [1.0]]])
    t = np.concatenate([t, [[-1.7e308, 1.7e308, 1.0, -1.6e308] * 2 + [2.0]]])
    got, want = [], []
    for out, kernel in ((got, True), (want, False)):
        if not kernel:
            without_kernel(monkeypatch)
        for direction in ("forward", "reverse"):
            for reduction in ("none", "sum"):
                options = {"reduction": reduction, "direction": direction}
                out.append(kl_div_from_logits(s, t, **options))
                if reduction == "sum":
                    out.append(kl_div_from_logits_backward(1.0, s, t, **options)[0])
    assert kernel_calls
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, 1e-13 * (np.abs(b) + 1), "ufuncs")


@pytest.mark.parametrize("offset", [1, 3, 4, 7])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_unaligned_arrays_give_the_aligned_results(
    offset: int, direction: str, every_size: None, kernel_calls: list[int]
) -> None:
    s, t = logits((7, 45), offset)
    s[2, 3] = -inf
    s[4, 5] = nan  # an edge row, evaluated again by the reference
    su, tu = misaligned(s, offset), misaligned(t, 8 - offset)
    assert not su.flags.aligned and not tu.flags.aligned
    for reduction in ("none", "sum", "rowmean"):
        options = {"reduction": reduction, "direction": direction, "temperature": 1.5}
        want = kl_div_from_logits(s, t, **options)
        got = kl_div_from_logits(su, tu, **options)
        np.testing.assert_array_equal(got, want)
        if reduction != "none":
            gw, _ = kl_div_from_logits_backward(1.0, s, t, **options)
            gu, _ = kl_div_from_logits_backward(1.0, su, tu, **options)
            np.testing.assert_array_equal(gu, gw)
    assert kernel_calls


@pytest.mark.parametrize("offset", [1, 2, 5])
def test_unaligned_outputs_of_a_direct_call(offset: int) -> None:
    s, t = logits((3, 21), 40 + offset)
    for reverse in (False, True):
        want = [np.empty(3), np.empty_like(s), np.empty_like(s)]
        F.rows_f64(s, t, 21, *want, 2.0, 0.5, 4.0, reverse)
        got = [misaligned(np.zeros(3), offset), misaligned(s * 0, offset)]
        got.append(misaligned(s * 0, 8 - offset))
        F.rows_f64(misaligned(s, offset), misaligned(t, 3), 21, *got, 2.0, 0.5, 4.0, reverse)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    # a bytearray-backed view at an odd offset
    raw = bytearray(s.nbytes + 8)
    view = np.frombuffer(raw, np.uint8)[offset : offset + s.nbytes].view(np.float64)
    view[...] = s.ravel()
    kl = np.empty(3)
    F.rows_f64(view.reshape(s.shape), t, 21, kl, None, None, 2.0, 0.0, 1.0, False)
    np.testing.assert_array_equal(kl, run_rows(s, t, 2.0, "forward")[0])


# --------------------------------------------------------------------------- accuracy


def test_at_least_as_accurate_as_the_ufunc_path(
    monkeypatch: pytest.MonkeyPatch, every_size: None
) -> None:
    """float64, 'sum', against the exact oracle: the kernel's largest error in units of
    u * sum(W) is small (measured 0.07: the final roundings of the loss) and within the
    size of those roundings of the ufunc path's largest (about as small)."""
    rng = np.random.default_rng(0)
    worst = {"kernel": 0.0, "ufuncs": 0.0}
    for _ in range(12):
        vocab = int(rng.choice([16, 200, 1000]))
        spread = float(rng.choice([1.0, 5.0, 30.0]))
        temperature = float(rng.choice([0.5, 1.0, 2.0, 4.0]))
        direction = str(rng.choice(["forward", "reverse"]))
        s = rng.normal(0, spread, (4, vocab))
        t = s + rng.normal(0, spread, (4, vocab))
        options = {"temperature": temperature, "reduction": "sum", "direction": direction}
        exact = oracle.from_logits(s, t, **options)
        value, _ = oracle.reduce_logits(exact)
        unit = U * float(exact.scale.sum())
        for name, switch in (("kernel", "1"), ("ufuncs", "0")):
            setenv(monkeypatch, FUSED_ENV, switch)
            got = float(kl_div_from_logits(s, t, **options))
            worst[name] = max(worst[name], abs(got - value) / unit)
    assert worst["kernel"] < 0.25, worst
    assert worst["kernel"] <= worst["ufuncs"] + 0.05, worst


# --------------------------------------------------------------------------- dispatch


def test_results_do_not_depend_on_threads_or_blocks(
    monkeypatch: pytest.MonkeyPatch, every_size: None, kernel_calls: list[int]
) -> None:
    s, t = logits((37, 129), 9)
    seen = set()
    for threads, block in (("1", 1 << 19), ("2", 129 * 5), ("3", 1)):
        setenv(monkeypatch, THREADS_ENV, threads)
        monkeypatch.setattr(_blocks_logits, "BLOCK_ELEMENTS", block)
        loss = kl_div_from_logits(s, t, temperature=2.0, direction="reverse")
        grad, _ = kl_div_from_logits_backward(1.0, s, t, temperature=2.0, direction="reverse")
        seen.add((float(loss), grad.tobytes()))
    assert len(seen) == 1
    assert len(kernel_calls) >= 2 * (1 + 8 + 37)


@pytest.mark.parametrize("how", ["switched off", "not built"])
def test_without_the_kernel_the_ufunc_path_runs(
    how: str, monkeypatch: pytest.MonkeyPatch, every_size: None
) -> None:
    calls: list[int] = []
    if how == "switched off":
        setenv(monkeypatch, FUSED_ENV, "0")
        fake = types.SimpleNamespace(rows_f64=lambda *a: calls.append(1), available=lambda: 1)
        monkeypatch.setattr(_blocks_logits, "_fused_logits64", fake)
    else:
        without_kernel(monkeypatch)
    s, t = logits((6, 37), 1)
    assert _blocks_logits._float64_kernel(s, 1.0) is None
    for options in CASES[:3]:
        check_against_oracle(s, t, **options)
    assert not calls


def test_which_logits_and_temperatures_take_the_kernel() -> None:
    s, _ = logits((3, 11), 4)
    take = _blocks_logits._float64_kernel
    top = _blocks_logits.KERNEL64_TEMPERATURE
    assert take(s, 1.0) is not None and take(s, 1e-300) is not None
    assert take(s, top) is not None and take(s, np.nextafter(top, inf)) is None
    for temperature in (1e-310, inf, nan, 1e300):  # subnormal, infinite, huge: the ufuncs
        assert take(s, temperature) is None
    assert take(s[:, :0], 1.0) is None
    s32 = s.astype(np.float32)
    assert take(s32, 2.0) is None  # the float32 kernel's
    assert take(s32, _blocks_logits.WIDE_TEMPERATURE) is None
    # evaluated in float64 (wide): the float64 kernel on float64 copies, up to its limit
    assert take(s32, _blocks_logits.WIDE_TEMPERATURE * 2) is not None
    assert take(s.astype(np.float16), 100.0) is not None
    assert take(s32, 2 * top) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_wide_temperatures_run_the_kernel_on_float64_copies(
    dtype: Any, direction: str, every_size: None, kernel_calls: list[int]
) -> None:
    """float32 and float16 logits at 64 < T <= KERNEL64_TEMPERATURE: the float64 kernel on
    float64 copies, the gradient and terms rounded once to the dtype: the float64 logits'
    values rounded, bit for bit (tests/test_extreme_inputs.py holds every path to it)."""
    s, t = logits((9, 70), 11, spread=30.0)
    s, t = s.astype(dtype), t.astype(dtype)
    s[3, 4] = -inf
    t[5, 6] = nan
    wide64 = s.astype(np.float64), t.astype(np.float64)
    for options in (
        {"direction": direction, "temperature": 100.0, "reduction": "none"},
        {"direction": direction, "temperature": 3000.0, "reduction": "sum"},
    ):
        got = kl_div_from_logits(s, t, **options)
        want = kl_div_from_logits(*wide64, **options)
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(got, np.asarray(want).astype(dtype))
        if options["reduction"] != "none":
            g, _ = kl_div_from_logits_backward(dtype(1), s, t, **options)
            w, _ = kl_div_from_logits_backward(1.0, *wide64, **options)
            np.testing.assert_array_equal(g, w.astype(dtype))
    assert kernel_calls
    calls = len(kernel_calls)
    # above KERNEL64_TEMPERATURE (here T = 2**63, where the ufuncs' loss cancels to 0 and
    # the kernel's would be about -1e19: -inf in float16), the ufuncs
    assert np.isfinite(kl_div_from_logits(s[:3], t[:3], temperature=2.0**63))
    assert len(kernel_calls) == calls


def test_bad_arguments_are_refused_by_name() -> None:
    s = np.ones((2, 4))
    kl = np.zeros(2)
    with pytest.raises(TypeError, match="ten arguments"):
        F.rows_f64(s, s, 4)
    with pytest.raises(TypeError, match="t must be a C-contiguous float64 buffer"):
        F.rows_f64(s, s.astype(np.float32), 4, kl, None, None, 1.0, 0.0, 1.0, False)
    with pytest.raises(TypeError, match="kl must be a C-contiguous float64 buffer"):
        F.rows_f64(s, s, 4, kl.astype(np.float32), None, None, 1.0, 0.0, 1.0, False)
    read_only = np.empty_like(s)
    read_only.flags.writeable = False
    with pytest.raises(TypeError, match=r"grad must be a C-contiguous float64 buffer \(writ"):
        F.rows_f64(s, s, 4, kl, read_only, None, 1.0, 0.0, 1.0, False)
    with pytest.raises(TypeError, match="s must be"):
        F.rows_f64(np.ones((2, 8))[:, ::2], s, 4, kl, None, None, 1.0, 0.0, 1.0, 0)
    with pytest.raises(ValueError, match="rows \\* vocab"):
        F.rows_f64(s, s, 3, kl, None, None, 1.0, 0.0, 1.0, False)
    with pytest.raises(ValueError, match="rows \\* vocab"):
        F.rows_f64(s, s, 4, np.empty(3), None, None, 1.0, 0.0, 1.0, False)
    with pytest.raises(ValueError, match="vocab must be at least 1"):
        F.rows_f64(s, s, 0, kl, None, None, 1.0, 0.0, 1.0, False)
    for temperature in (1e-310, 0.0, -1.0, inf, nan):
        with pytest.raises(ValueError, match="temperature"):
            F.rows_f64(s, s, 4, kl, None, None, temperature, 0.0, 1.0, False)
    with pytest.raises(ValueError, match="only the forward gradient"):
        F.rows_f64(s, s, 4, None, np.empty_like(s), None, 1.0, 0.0, 1.0, True)
    with pytest.raises(ValueError, match="only the forward gradient"):
        F.rows_f64(s, s, 4, None, None, None, 1.0, 0.0, 1.0, False)
    with pytest.raises(TypeError, match="two buffers"):
        F.exp_f64(s)
    assert F.rows_f64(s, s, 4, kl, None, None, 1.0, 0.0, 1.0, False) is None
    np.testing.assert_array_equal(kl, 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_exp_entry_points_check_their_buffers_alike(dtype: Any) -> None:
    """exp_f32 and exp_f64 share one parser (``kl_exp_buffers``): the same checks, each
    naming the argument, and nothing written on a refusal."""
    from kldiv_spec.backends import _compiled

    module = _compiled.fused_logits if dtype == np.float32 else _compiled.fused_logits64
    if module is None:
        pytest.skip("the kernel of this dtype is not built here")
    exp = module.exp_f32 if dtype == np.float32 else module.exp_f64
    other = np.float64 if dtype == np.float32 else np.float32
    name = exp.__name__
    x, out = np.zeros(5, dtype), np.full(5, 7.0, dtype)
    with pytest.raises(TypeError, match=f"{name}\\(src, dst\\) takes two buffers"):
        exp(x)
    with pytest.raises(TypeError, match="src must be a C-contiguous"):
        exp(x.astype(other), out)
    with pytest.raises(TypeError, match="dst must be a C-contiguous"):
        exp(x, out.astype(other))
    with pytest.raises(TypeError, match=r"dst must be a C-contiguous .* buffer \(writable\)"):
        exp(x, np.frombuffer(bytes(out), dtype))
    with pytest.raises(TypeError, match="src must be a C-contiguous"):
        exp(np.zeros(10, dtype)[::2], out)
    with pytest.raises(ValueError, match="same length"):
        exp(np.zeros(4, dtype), out)
    np.testing.assert_array_equal(out, 7.0)
    assert exp(x, out) is None
    np.testing.assert_array_equal(out, 1.0)
