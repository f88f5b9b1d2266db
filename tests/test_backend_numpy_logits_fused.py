"""The compiled float32 kernel of the NumPy from-logits fast path (backends/_fused_logits.c).

The kernel has its own ``exp`` (eight lanes at a time with AVX2) and sums in float64, so
it is held to bounds, not to the ufunc path's bits:

- its ``exp`` within the documented ulp bound of ``benchmarks/exp_sweep.py`` on a sample,
  and IEEE's values at the edges;
- each row's divergence, gradient and terms against a float64 evaluation from the same
  float32 shifted logits ``x = fl(fl(z / T) - m)`` the kernel forms, within the bounds
  derived in the kernel's header (a few units of float32 roundoff times the terms' sizes:
  any slip in the algebra is far outside them);
- every public call through the kernel against the exact oracle
  (``kldiv_spec.conformance.oracle_logits``) within the documented bound, on shapes with
  tails, one row and one class, unaligned buffers, both directions, temperatures, masks,
  every reduction, with and without a gradient, and the whole edge-value table;
- and that the kernel is taken where it should be, and the ufunc path where it is not
  built, not available or turned off.
"""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys
import types
import warnings
from typing import Any

import numpy as np
import pytest
from _support import (
    load_script,
    logits_fused_available,
    misaligned,
    setenv,
    spy_kernel_rows,
)

import kldiv_spec
from kldiv_spec import kl_div_from_logits, kl_div_from_logits_backward
from kldiv_spec.backends import _blocks_logits
from kldiv_spec.conformance import oracle_logits as oracle

pytestmark = pytest.mark.skipif(
    not logits_fused_available(),
    reason="the from-logits kernel is not built here, or this CPU has no AVX2",
)
F = _blocks_logits._fused_logits

inf, nan = math.inf, math.nan
U = 2.0**-24  # float32's unit roundoff
#: The documented bound on the kernel's exp (benchmarks/exp_sweep.py, every float32 x in
#: [-104, 89]: at most 0.7706 ulp, at x = -87.7053833, a subnormal result).
EXP_ULP_BOUND = 0.771
EXP_WORST_BITS, EXP_WORST_ULP = 0xC2AF6928, 0.7706
#: A bound on the exp's relative error on normal results (the sweep: at most 0.6832 ulp,
#: at x = 5.2317009; 1 ulp <= 2u), used in the row bounds.
ETA = 1.5 * U
TINY = float(np.finfo(np.float32).smallest_subnormal)
# The NumPy fast path's settings, as documented (docs/backends.md).
MIN_ELEMENTS_ENV = "KLDIV_SPEC_NUMPY_MIN_ELEMENTS"
THREADS_ENV = "KLDIV_SPEC_NUM_THREADS"
FUSED_ENV = "KLDIV_SPEC_NUMPY_FUSED"


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the rows of every block the compiled kernel evaluates."""
    return spy_kernel_rows(monkeypatch, _blocks_logits, "_fused_logits", "rows_f32")


def logits(shape: tuple[int, ...], seed: int, spread: float = 3.0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    s = rng.normal(0.0, spread, size=shape).astype(np.float32)
    t = (s + rng.normal(0.0, spread / 2, size=shape)).astype(np.float32)
    return s, t


def assert_close(got: Any, want: Any, tol: Any, what: str) -> None:
    """NaN and infinities exactly where ``want`` has them; elsewhere within ``tol``."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, what
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=what)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite], want[~finite], err_msg=what)
    with np.errstate(invalid="ignore"):
        err = np.where(finite, np.abs(got - want), 0.0)
    bad = finite & ~(err <= tol)
    assert not bad.any(), f"{what}: error {err[bad]} above {np.broadcast_to(tol, err.shape)[bad]}"


def reduced_options(reduction: str, mask: Any, shape: tuple[int, ...]) -> dict[str, Any]:
    """Options for a call; 'batchmean' with a mask only where it is allowed (2-d)."""
    if mask is not None and reduction == "batchmean" and len(shape) != 2:
        reduction = "rowmean"
    return {"reduction": reduction, "mask": mask}


def check_against_oracle(s: np.ndarray, t: np.ndarray, g: float = 0.75, **options: Any) -> Any:
    """The value (and, for a reduction, the student gradient) against the exact oracle."""
    mask = options.get("mask")
    out = kl_div_from_logits(s, t, **options)
    assert out.dtype == s.dtype
    exact = oracle.from_logits(s, t, grad_output=g, **options)
    if options.get("reduction", "batchmean") == "none":
        assert_close(out, exact.terms, oracle.pointwise_tolerance(exact), str(options))
        return out
    value, tol = oracle.reduce_logits(exact)
    assert_close(out, value, tol, str(options))
    gs, gt = kl_div_from_logits_backward(np.float32(g), s, t, **options)
    assert gt is None and gs.dtype == s.dtype
    tol_s, _ = oracle.gradient_tolerance(exact)
    assert_close(gs, exact.grad_input, tol_s, f"gradient {options}")
    if mask is not None:
        dropped = ~np.broadcast_to(np.asarray(mask), s.shape[:-1])
        assert (gs[dropped] == 0).all()
    return out


# --------------------------------------------------------------------------- exp


def exp_sweep() -> types.ModuleType:
    """benchmarks/exp_sweep.py, imported from the source tree (skip where it is absent)."""
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "exp_sweep.py"
    if not path.is_file():
        pytest.skip("benchmarks/exp_sweep.py is not in this tree")
    return load_script(path, "exp_sweep")


def test_exp_sweep_quick_stays_within_the_documented_bound() -> None:
    """Every 1009th float32 in [-104, 89] (the sweep's --quick), and the worst argument of
    the exhaustive sweep: if this changes, rerun benchmarks/exp_sweep.py and the docs."""
    sweep = exp_sweep()
    stats = sweep.sweep(stride=sweep.QUICK_STRIDE, workers=2)["kernel exp_f32"]
    assert stats.count > 2_000_000
    assert stats.max_ulp <= EXP_ULP_BOUND, stats.describe("kernel")
    assert stats.not_faithful == 0
    worst = sweep.sweep(ranges=((EXP_WORST_BITS, EXP_WORST_BITS),))["kernel exp_f32"]
    assert worst.max_ulp == pytest.approx(EXP_WORST_ULP, abs=5e-5)


def test_exp_edge_values_and_the_range_outside_the_sweep() -> None:
    big = float(np.finfo(np.float32).max)
    x = np.array([0.0, -0.0, inf, -inf, nan, 88.72284, 89.0, 1000.0, big, -104.0, -1000.0, -big])
    want = np.array([1.0, 1.0, inf, 0.0, nan, inf, inf, inf, inf, 0.0, 0.0, 0.0], np.float32)
    got = np.empty(x.size, np.float32)
    assert F.exp_f32(x.astype(np.float32), got) is None
    np.testing.assert_array_equal(got, want)  # NaN compares equal to NaN here
    assert not np.signbit(got).any()
    # the borders of the normal, subnormal and finite results: one of the two neighbours
    x = np.array([88.72283, -103.97, -103.9, -87.33655, -87.33654, 1e-30, -1e-30], np.float32)
    got = np.empty_like(x)
    F.exp_f32(x, got)
    exact = np.exp(x.astype(np.float64))
    below = np.nextafter(exact.astype(np.float32), np.float32(-inf))
    above = np.nextafter(exact.astype(np.float32), np.float32(inf))
    assert ((below <= got) & (got <= above)).all() and (got > 0).all()
    assert (got[-2:] == 1).all()
    # outside [-104, 89]: 0 and inf
    outside = np.concatenate(
        [np.arange(0x42B20001, 0x7F800000, 997), np.arange(0xC2D00001, 0xFF800000, 997)]
    ).astype(np.uint32)
    v = outside.view(np.float32)
    out = np.empty_like(v)
    F.exp_f32(v, out)
    assert (out[v > 0] == inf).all() and (out[v < 0] == 0).all()
    assert not np.signbit(out).any()


def test_exp_of_any_length_and_alignment() -> None:
    x = np.linspace(-110, 95, 1001, dtype=np.float32)
    want = np.empty_like(x)
    F.exp_f32(x, want)
    for n in (1, 7, 8, 9, 17, 1001):
        for offset in (1, 2, 3):
            got = misaligned(np.zeros(n, np.float32), offset)
            F.exp_f32(misaligned(x[:n], 4 - offset), got)
            np.testing.assert_array_equal(got, want[:n])


# --------------------------------------------------------------------------- the rows


def shifted(z: np.ndarray, temperature: float) -> np.ndarray:
    """The kernel's float32 x = fl(fl(z / T) - m), with T and every step in float32."""
    zb = z / np.float32(temperature)
    m = zb.max(axis=1, keepdims=True)
    return (zb - m).astype(np.float64)


def rows_in_float64(s: np.ndarray, t: np.ndarray, temperature: float, direction: str) -> Any:
    """The row quantities from the kernel's float32 x, in float64 (regular rows)."""
    xs, xt = shifted(s, temperature), shifted(t, temperature)
    zs, zt = np.exp(xs).sum(axis=1), np.exp(xt).sum(axis=1)
    q, p = np.exp(xs) / zs[:, None], np.exp(xt) / zt[:, None]
    if direction == "forward":
        w, d, c = p, xt - xs, np.log(zs) - np.log(zt)
    else:
        w, d, c = q, xs - xt, np.log(zt) - np.log(zs)
    kl = (w * d).sum(axis=1) + c
    return types.SimpleNamespace(q=q, p=p, w=w, d=d, c=c, kl=kl)


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
    grad = np.full(s.shape, -1.0, np.float32) if grad_scale is not None else None
    terms = np.full(s.shape, -1.0, np.float32) if factor is not None else None
    result = F.rows_f32(
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


SHAPES = [(1, 1), (3, 1), (1, 7), (4, 8), (5, 9), (6, 33), (3, 1001), (2, 4099)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7, 3.0])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_rows_within_the_derived_bounds(
    shape: tuple[int, int], temperature: float, direction: str
) -> None:
    """KL within (2 eta + 2u) sum w|d| + 2 eta (the header's bound, with margin); the
    gradient and the terms within a few u of their terms' sizes."""
    s, t = logits(shape, shape[1] + int(10 * temperature), spread=4.0)
    ref = rows_in_float64(s, t, temperature, direction)
    wd = (ref.w * np.abs(ref.d)).sum(axis=1)
    kl_tol = (2 * ETA + 3 * U) * wd + 3 * ETA + 1e-12 * np.abs(ref.kl)  # header: 2 eta + 2u
    cg, factor = -0.37, 2.5
    kl, grad, terms = run_rows(s, t, temperature, direction, grad_scale=cg, factor=factor)
    assert kl is not None and grad is not None and terms is not None
    assert_close(kl, ref.kl, kl_tol, "kl")
    if direction == "forward":
        want_grad = cg * (ref.q - ref.p)
        grad_tol = abs(cg) * (ref.q + ref.p) * (2 * ETA + 4 * U)
    else:
        k = ref.c - ref.kl
        want_grad = cg * ref.q * (ref.d + k[:, None])
        size = np.abs(ref.d) + np.abs(k)[:, None]
        grad_tol = abs(cg) * ref.q * (size * (2 * ETA + 5 * U) + kl_tol[:, None] + 2 * ETA)
    assert_close(grad, want_grad, grad_tol + 4 * TINY, "grad")
    want_terms = factor * ref.w * (ref.d + ref.c[:, None])
    size = np.abs(ref.d) + np.abs(ref.c)[:, None]
    terms_tol = factor * ref.w * (size * (2 * ETA + 5 * U) + 2 * ETA)
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
    """Logits spread over hundreds after scaling: exp's slow lanes (subnormal and zero
    results) in the same vectors as regular ones."""
    s, t = logits((7, 203), 5, spread=80.0)
    ref = rows_in_float64(s, t, 0.5, direction)
    kl, grad, terms = run_rows(s, t, 0.5, direction, grad_scale=1.0, factor=0.25)
    wd = (ref.w * np.abs(ref.d)).sum(axis=1)
    assert_close(kl, ref.kl, (2 * ETA + 3 * U) * wd + 3 * ETA, "kl")
    assert terms is not None and grad is not None
    assert (terms[ref.w == 0] == 0).all() and not np.signbit(terms[ref.w == 0]).any()
    assert np.isfinite(grad).all()


@pytest.mark.parametrize("vocab", [1, 7, 9, 33, 64, 1001])
def test_the_maximum_is_found_wherever_it_lies(vocab: int) -> None:
    """A logit 300 above the others at every position of the rows (the vector lanes, the
    tail, the first row of a call and the later ones, whose maxima the kernel finds
    during the previous row's second pass): a maximum missed would overflow exp."""
    rng = np.random.default_rng(vocab)
    rows = min(vocab, 40) + 1
    s = rng.normal(size=(rows, vocab)).astype(np.float32)
    t = rng.normal(size=(rows, vocab)).astype(np.float32)
    where = np.arange(rows) % vocab
    s[np.arange(rows), where] = 300.0
    t[np.arange(rows), (where * 7 + 3) % vocab] = 300.0
    for direction in ("forward", "reverse"):
        ref = rows_in_float64(s, t, 1.0, direction)
        kl, grad, _ = run_rows(s, t, 1.0, direction, grad_scale=1.0)
        wd = (ref.w * np.abs(ref.d)).sum(axis=1)
        assert_close(kl, ref.kl, (2 * ETA + 3 * U) * wd + 3 * ETA, direction)
        assert grad is not None and np.isfinite(grad).all()


def test_the_sums_are_float64() -> None:
    """2**22 classes: a float32 running sum would be off by far more than 1e-9 (about
    2**22 u relatively); from the kernel's own exp values, the float64 sums leave only the
    float64 roundings."""
    vocab = 1 << 22
    s = np.zeros((1, vocab), np.float32)
    t = np.zeros((1, vocab), np.float32)
    t[0, ::2] = np.float32(-1.0)
    e = np.empty(2, np.float32)
    F.exp_f32(np.array([0.0, -1.0], np.float32), e)
    z_t = vocab // 2 * (float(e[0]) + float(e[1]))
    want = -(vocab // 2) * float(e[1]) / z_t + math.log(vocab) - math.log(z_t)
    kl, _, _ = run_rows(s, t, 1.0, "forward")
    assert kl is not None
    assert abs(kl[0] - want) <= 1e-9


def edge_rows() -> tuple[np.ndarray, np.ndarray]:
    """Rows exercising every edge rule of docs/logits.md (4 classes each), in float32."""
    big = 3e38
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
            [200.0, -200.0, 1.0, 0.0],  # a weight that underflows
        ],
        np.float32,
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
            [199.0, -210.0, 2.0, 0.5],
        ],
        np.float32,
    )
    return s, t


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5, 3.0])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_the_kernel_leaves_exactly_the_rows_with_a_nan_or_plus_inf_quotient(
    temperature: float, direction: str
) -> None:
    """Rows holding NaN or +inf (or whose quotient z / T overflows to +inf) get the
    caller's marker (a NaN with the payload REDO_BITS) and go to the reference; -inf
    logits (an excluded class, a row of -inf only, a shift that overflows to -inf) are
    the kernel's: +inf, NaN (no softmax) or a finite value, never the marker."""
    s, t = edge_rows()
    kl, _, _ = run_rows(s, t, temperature, direction)
    assert kl is not None
    with np.errstate(over="ignore", invalid="ignore"):
        z = np.concatenate([s, t], axis=1) / np.float32(temperature)
    left = ~(np.isfinite(z) | (z == -inf)).all(axis=1)
    assert left[[3, 4]].all() and not left[[0, 1, 2, 6, 7, 8]].any()
    assert left[5] == (temperature < 1.0)  # 3e38 / T overflows
    marked = kl.view(np.uint64) == np.uint64(_blocks_logits.REDO_BITS)
    np.testing.assert_array_equal(marked, left)
    assert np.isnan(kl[[2, 6]]).all() and np.isfinite(kl[[0, 8]]).all()
    forward = direction == "forward"
    assert kl[1] == inf if forward else np.isfinite(kl[1])
    assert np.isfinite(kl[7]) if forward else kl[7] == inf


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_edge_table_through_the_kernel(
    direction: str, temperature: float, every_size: None, kernel_calls: list[int]
) -> None:
    s, t = edge_rows()
    s2, t2 = logits((5, 4), 18)
    s, t = np.concatenate([s, s2]), np.concatenate([t, t2])
    options = {"direction": direction, "temperature": temperature}
    terms = check_against_oracle(s, t, reduction="none", **options)
    with np.errstate(invalid="ignore"):
        rows = terms.sum(axis=1)
    assert np.isnan(rows[2:5]).all() and np.isnan(rows[6])
    assert np.isfinite(rows[8:]).all()
    assert np.isfinite(rows[5]) == (temperature >= 1.0)  # 3e38 / 0.5 overflows: +inf, NaN
    if direction == "forward":
        assert terms[0, 1] == 0.0 and terms[7, 2] == 0.0
        assert rows[1] == inf and np.isfinite(rows[7])
    else:
        assert terms[0, 1] == 0.0 and terms[1, 1] == 0.0
        assert np.isfinite(rows[1]) and rows[7] == inf
    mask = np.ones(len(s), bool)
    mask[[3, 8, 10]] = False
    for reduction in ("sum", "batchmean", "rowmean", "mean"):
        check_against_oracle(s, t, reduction=reduction, **options)
        check_against_oracle(s, t, reduction=reduction, mask=mask, **options)
    check_against_oracle(s, t, reduction="none", mask=mask, **options)
    assert kernel_calls


# --------------------------------------------------------------------------- gradient in place


def in_place_rows() -> tuple[np.ndarray, np.ndarray]:
    """The edge rows, dense rows, and rows long enough for several vectors and a tail."""
    s, t = edge_rows()
    s2, t2 = logits((4, 4), 31)
    wide_s, wide_t = logits((5, 1003), 32, spread=40.0)
    wide_s[1, 7] = wide_t[2, 900] = -inf  # an excluded class on each side
    wide_s[3, 1000] = nan  # the reference's row
    wide_t[4, :] = -inf  # no teacher softmax
    cols = wide_s.shape[1]
    pad = np.full((len(s) + len(s2), cols - 4), -inf, np.float32)  # excluded by both sides
    s = np.concatenate([np.concatenate([np.concatenate([s, s2]), pad], axis=1), wide_s])
    t = np.concatenate([np.concatenate([np.concatenate([t, t2]), pad], axis=1), wide_t])
    return s, t


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("outputs", ["loss and gradient", "gradient and terms", "gradient only"])
def test_a_gradient_written_over_the_logits_is_the_separate_buffers_bit_for_bit(
    temperature: float, direction: str, outputs: str
) -> None:
    """grad is s: the same divergences, gradient and terms, bit for bit, as with a
    separate gradient buffer; a row left to the reference (the marker) keeps its logits."""
    if outputs == "gradient only" and direction == "reverse":
        pytest.skip("the gradient alone is the forward direction's (softmax_only)")
    s, t = in_place_rows()
    rows, vocab = s.shape
    loss = outputs != "gradient only"
    kl = np.full(rows, -1.0) if loss else None
    grad = np.full(s.shape, -1.0, np.float32)
    terms = np.full(s.shape, -1.0, np.float32) if outputs == "gradient and terms" else None
    args = (temperature, 0.75, 1.5, direction == "reverse")
    F.rows_f32(s, t, vocab, kl, grad, terms, *args)
    kl2 = np.full(rows, -1.0) if loss else None
    terms2 = None if terms is None else np.full(s.shape, -1.0, np.float32)
    s_in_place = s.copy()
    F.rows_f32(s_in_place, t, vocab, kl2, s_in_place, terms2, *args)
    if kl is not None:
        assert kl2 is not None
        np.testing.assert_array_equal(kl2.view(np.uint64), kl.view(np.uint64))
        redo = kl.view(np.uint64) == np.uint64(_blocks_logits.REDO_BITS)
        assert redo[[3, 4, 16]].all()  # a NaN or +inf logit: the reference's rows
    else:
        redo = np.zeros(rows, bool)
    settled = ~redo
    np.testing.assert_array_equal(
        s_in_place[settled].view(np.uint32), grad[settled].view(np.uint32)
    )
    np.testing.assert_array_equal(s_in_place[redo].view(np.uint32), s[redo].view(np.uint32))
    if terms is not None:
        assert terms2 is not None
        np.testing.assert_array_equal(terms2.view(np.uint32), terms.view(np.uint32))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("masked", [False, True])
def test_from_logits_in_place_gives_the_separate_buffers_gradient(
    direction: str, masked: bool, every_size: None, kernel_calls: list[int]
) -> None:
    """``grad_out=s``: the kernel writes the gradient over ``s``; the reference's rows
    read their logits first; a masked row is 0. The same values as a fresh buffer."""
    s, t = in_place_rows()
    kept = None if not masked else np.arange(len(s)) % 4 != 1
    options = {"temperature": 2.0, "direction": direction, "kept": kept, "grad_scale": 0.5}
    kl, grad = _blocks_logits.from_logits(s, t, **options)
    assert grad is not None and not np.shares_memory(grad, s)
    assert _blocks_logits.takes_in_place(s.dtype, 2.0)
    s_in_place = s.copy()
    kl2, grad2 = _blocks_logits.from_logits(s_in_place, t, grad_out=s_in_place, **options)
    assert grad2 is not None and _blocks_logits.in_place(grad2, s_in_place)
    np.testing.assert_array_equal(kl2, kl)
    np.testing.assert_array_equal(grad2, grad)
    assert kernel_calls


def test_without_the_float32_kernel_an_in_place_request_gets_a_fresh_buffer(
    monkeypatch: pytest.MonkeyPatch, every_size: None
) -> None:
    """The ufuncs, float64 logits and wide temperatures write their gradients elsewhere:
    ``s`` is left as it was and the gradient returned is a new array."""
    s, t = in_place_rows()
    options = {"direction": "forward", "kept": None, "grad_scale": 1.0}
    for logits_dtype, temperature in ((np.float64, 2.0), (np.float32, 100.0)):
        sd, td = s.astype(logits_dtype), t.astype(logits_dtype)
        assert not _blocks_logits.takes_in_place(sd.dtype, temperature)
        before = sd.copy()
        _, grad = _blocks_logits.from_logits(sd, td, temperature=temperature, grad_out=sd,
                                             **options)  # fmt: skip
        assert grad is not None and not np.shares_memory(grad, sd)
        np.testing.assert_array_equal(sd, before)
    setenv(monkeypatch, FUSED_ENV, "0")
    assert not _blocks_logits.takes_in_place(s.dtype, 2.0)
    before = s.copy()
    _, grad = _blocks_logits.from_logits(s, t, temperature=2.0, grad_out=s, **options)
    assert grad is not None and not np.shares_memory(grad, s)
    np.testing.assert_array_equal(s, before)


# --------------------------------------------------------------------------- public calls


CASES = [
    {"reduction": "batchmean"},
    {"reduction": "sum", "temperature": 2.5, "direction": "reverse"},
    {"reduction": "none", "temperature": 0.5},
    {"reduction": "none", "temperature": 3.0, "direction": "reverse"},
    {"reduction": "mean", "scale_by_temperature_squared": False, "temperature": 3.0},
    {"reduction": "rowmean", "direction": "reverse", "temperature": 4.0},
    {"reduction": "sum", "temperature": 1.0, "direction": "reverse"},
]


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


@pytest.mark.parametrize("offset", [1, 2, 3])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_unaligned_arrays_give_the_aligned_results(
    offset: int, direction: str, every_size: None, kernel_calls: list[int]
) -> None:
    s, t = logits((7, 45), offset)
    s[2, 3] = -inf  # an edge row among them, evaluated again by the reference
    su, tu = misaligned(s, offset), misaligned(t, 4 - offset)
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
    calls = len(kernel_calls)
    check_against_oracle(su, tu, reduction="sum", direction=direction)
    assert len(kernel_calls) > calls


@pytest.mark.parametrize("offset", [1, 2, 3])
def test_unaligned_outputs_of_a_direct_call(offset: int) -> None:
    s, t = logits((3, 21), 40 + offset)
    for reverse in (False, True):
        want = [np.empty(3), np.empty_like(s), np.empty_like(s)]
        F.rows_f32(s, t, 21, *want, 2.0, 0.5, 4.0, reverse)
        got = [misaligned(np.zeros(3), offset), misaligned(s * 0, offset)]
        got.append(misaligned(s * 0, 4 - offset))
        F.rows_f32(misaligned(s, offset), misaligned(t, 3), 21, *got, 2.0, 0.5, 4.0, reverse)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


def test_the_torch_path_takes_the_kernel_forward_and_backward(
    every_size: None, kernel_calls: list[int]
) -> None:
    """A float32 CPU tensor that needs a gradient: loss and gradient in one kernel pass."""
    torch = pytest.importorskip("torch")
    s, t = logits((4, 50), 3)
    sa = torch.tensor(s, requires_grad=True)
    loss = kldiv_spec.kl_div_from_logits(sa, torch.tensor(t), temperature=2.0)
    loss.backward()
    assert kernel_calls
    exact = oracle.from_logits(s, t, temperature=2.0)
    value, tol = oracle.reduce_logits(exact)
    assert_close(float(loss.detach()), value, tol, "loss")
    tol_s, _ = oracle.gradient_tolerance(exact)
    assert_close(sa.grad.numpy(), exact.grad_input, tol_s, "gradient")


# --------------------------------------------------------------------------- accuracy


def test_at_least_as_accurate_as_the_ufunc_path(
    monkeypatch: pytest.MonkeyPatch, every_size: None
) -> None:
    """The configurations of benchmarks/logits_accuracy.py (float32, 'sum'): the kernel's
    largest error in units of eps * sum(W) is below 0.05 (measured 0.017; the ufunc path
    measures 0.131 there), and never above the ufunc path's largest."""
    rng = np.random.default_rng(0)
    worst = {"kernel": 0.0, "ufuncs": 0.0}
    for _ in range(12):
        vocab = int(rng.choice([16, 200, 1000]))
        spread = float(rng.choice([1.0, 5.0, 30.0]))
        temperature = float(rng.choice([0.5, 1.0, 2.0, 4.0]))
        direction = str(rng.choice(["forward", "reverse"]))
        s = rng.normal(0, spread, (4, vocab)).astype(np.float32)
        t = (s + rng.normal(0, spread, (4, vocab))).astype(np.float32)
        options = {"temperature": temperature, "reduction": "sum", "direction": direction}
        exact = oracle.from_logits(s, t, **options)
        value, _ = oracle.reduce_logits(exact)
        unit = U * float(exact.scale.sum())
        for name, switch in (("kernel", "1"), ("ufuncs", "0")):
            setenv(monkeypatch, FUSED_ENV, switch)
            got = float(kl_div_from_logits(s, t, **options))
            worst[name] = max(worst[name], abs(got - value) / unit)
    assert worst["kernel"] < 0.05, worst
    assert worst["kernel"] <= worst["ufuncs"], worst


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


def test_default_sizes_take_the_kernel_with_several_blocks(kernel_calls: list[int]) -> None:
    s, t = logits((40, 30000), 2)  # 1.2 M elements: above the size threshold, 3 blocks
    loss = kl_div_from_logits(s, t, temperature=2.0)
    assert len(kernel_calls) == 3
    ref = rows_in_float64(s, t, 2.0, "forward")
    assert abs(float(loss) - 4.0 * ref.kl.mean()) <= 1e-6 * float(loss)


@pytest.mark.parametrize("how", ["switched off", "not built"])
def test_without_the_kernel_the_ufunc_path_runs(
    how: str, monkeypatch: pytest.MonkeyPatch, every_size: None, kernel_calls: list[int]
) -> None:
    if how == "switched off":
        setenv(monkeypatch, FUSED_ENV, "0")
    else:
        monkeypatch.setattr(_blocks_logits, "_fused_logits", None)
    assert not logits_fused_available()
    s, t = logits((6, 37), 1)
    for options in CASES[:3]:
        check_against_oracle(s, t, **options)
    assert not kernel_calls


def test_float64_and_unusual_temperatures_are_not_the_float32_kernels(
    every_size: None, kernel_calls: list[int]
) -> None:
    s, t = logits((3, 11), 4)
    check_against_oracle(s.astype(np.float64), t.astype(np.float64), reduction="sum")
    assert not kernel_calls
    # float32(T) subnormal or infinite: the kernel does not take it
    for temperature in (1e-40, 1e39):
        assert _blocks_logits._float32_kernel(s, temperature) is None
    assert _blocks_logits._float32_kernel(s, 1e-30) is not None
    assert _blocks_logits._float32_kernel(s[:, :0], 1.0) is None


def test_an_install_without_the_extension_uses_the_ufuncs(tmp_path: pathlib.Path) -> None:
    """Where find_spec finds no extension (no C compiler at install time), the module loads
    with none and the path uses NumPy's ufuncs."""
    script = tmp_path / "hidden.py"
    script.write_text(
        "import importlib.util\n"
        "real = importlib.util.find_spec\n"
        "def find_spec(name, *args):\n"
        "    return None if name.endswith('._fused_logits') else real(name, *args)\n"
        "importlib.util.find_spec = find_spec\n"
        "import numpy as np, kldiv_spec\n"
        "from kldiv_spec.backends import _blocks_logits\n"
        "assert _blocks_logits._fused_logits is None\n"
        "assert not _blocks_logits.fused_available()\n"
        "rng = np.random.default_rng(0)\n"
        "s = rng.normal(size=(4, 9)).astype(np.float32)\n"
        "print(repr(float(kldiv_spec.kl_div_from_logits(s, s[::-1].copy(), reduction='sum'))))\n",
        encoding="utf-8",
    )
    env = dict(os.environ, **{MIN_ELEMENTS_ENV: "0"})
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    rng = np.random.default_rng(0)
    s = rng.normal(size=(4, 9)).astype(np.float32)
    exact = oracle.from_logits(s, s[::-1].copy(), reduction="sum")
    value, tol = oracle.reduce_logits(exact)
    assert abs(float(done.stdout.strip()) - value) <= tol


def test_bad_arguments_are_refused_by_name() -> None:
    s = np.ones((2, 4), np.float32)
    kl = np.zeros(2)
    with pytest.raises(TypeError, match="ten arguments"):
        F.rows_f32(s, s, 4)
    with pytest.raises(TypeError, match="t must be a C-contiguous float32 buffer"):
        F.rows_f32(s, s.astype(np.float64), 4, kl, None, None, 1.0, 0.0, 1.0, False)
    with pytest.raises(TypeError, match="kl must be a C-contiguous float64 buffer"):
        F.rows_f32(s, s, 4, kl.astype(np.float32), None, None, 1.0, 0.0, 1.0, False)
    read_only = np.empty_like(s)
    read_only.flags.writeable = False
    with pytest.raises(TypeError, match=r"grad must be a C-contiguous float32 buffer \(writ"):
        F.rows_f32(s, s, 4, kl, read_only, None, 1.0, 0.0, 1.0, False)
    with pytest.raises(TypeError, match="s must be"):
        F.rows_f32(np.ones((2, 8), np.float32)[:, ::2], s, 4, kl, None, None, 1.0, 0.0, 1.0, 0)
    with pytest.raises(ValueError, match="rows \\* vocab"):
        F.rows_f32(s, s, 3, kl, None, None, 1.0, 0.0, 1.0, False)
    with pytest.raises(ValueError, match="rows \\* vocab"):
        F.rows_f32(s, s, 4, np.empty(3), None, None, 1.0, 0.0, 1.0, False)
    with pytest.raises(ValueError, match="vocab must be at least 1"):
        F.rows_f32(s, s, 0, kl, None, None, 1.0, 0.0, 1.0, False)
    with pytest.raises(ValueError, match="temperature"):
        F.rows_f32(s, s, 4, kl, None, None, 1e-40, 0.0, 1.0, False)
    with pytest.raises(ValueError, match="only the forward gradient"):
        F.rows_f32(s, s, 4, None, np.empty_like(s), None, 1.0, 0.0, 1.0, True)
    with pytest.raises(ValueError, match="only the forward gradient"):
        F.rows_f32(s, s, 4, None, None, None, 1.0, 0.0, 1.0, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert F.rows_f32(s, s, 4, kl, None, None, 1.0, 0.0, 1.0, False) is None
    np.testing.assert_array_equal(kl, 0.0)
