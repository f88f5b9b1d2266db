r"""The compiled float32 kernel of the generalised Jensen-Shannon divergence (``beta``).

``backends/_fused_jsd.c`` evaluates the divergence, its student gradient and its
``'none'`` terms with its own ``exp`` and ``log`` and float64 sums, so it is held to
bounds, not to the reference's bits:

- each row against a float64 evaluation from the same float32 shifted logits
  ``x = fl(fl(z / T) - max)`` the kernel forms, within the bound derived in the
  kernel's header (:func:`row_bounds`);
- every public call through the kernel (NumPy and PyTorch on the CPU) against the
  exact oracle (``kldiv_spec.conformance.oracle_logits``) within its documented bound,
  on shapes with tails, one row and one class, several temperatures and ``beta``\ s,
  masks and every reduction;
- the edge values (a class one side excludes, both exclude, rows of ``-inf``, NaN,
  ``+inf``) exactly where the reference has them: the kernel settles the excluded
  classes itself and sends the rows without a softmax back to the reference;
- the gradient's derivation, :math:`(1 - \beta)\,q_j (r_j - \sum_i q_i r_i)` with
  :math:`r = \log q - \log m`, against the reference's backward;
- that the kernel is taken where it should be, and the reference where it is not
  (float64, the kernel turned off, ``beta`` out of its range, the teacher's gradient);
- the Triton kernel for CUDA (``backends/_triton_jsd.py``) in Triton's interpreter (a
  subprocess with ``TRITON_INTERPRET=1``): values and gradients against the oracle, the
  edge rows against the reference, half precision; and compiled for sm_90 (no GPU needed).
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import types
import warnings
from typing import Any

import numpy as np
import pytest
from _support import misaligned, setenv, spy_kernel_rows

import kldiv_spec
from kldiv_spec import _core_logits, kl_div_from_logits, kl_div_from_logits_backward
from kldiv_spec.backends import _blocks_jsd, _blocks_logits
from kldiv_spec.conformance import oracle_logits as oracle


def _interpreted() -> bool:
    """Whether this process runs Triton in its interpreter (the Triton tests' subprocess)."""
    if importlib.util.find_spec("triton") is None:
        return False
    from kldiv_spec.backends import _triton_kernels

    return _triton_kernels.interpreting()


INTERPRETED = _interpreted()
#: The tests of the compiled CPU kernel (in the interpreter's subprocess CPU tensors go to
#: Triton, so they run in the main process only).
needs_kernel = pytest.mark.skipif(
    INTERPRETED or not _blocks_jsd.fused_available(),
    reason="the Jensen-Shannon kernel is not built here, this CPU has no AVX2, or this is "
    "the Triton interpreter's subprocess",
)
F = _blocks_jsd._fused_jsd

inf, nan = math.inf, math.nan
U = 2.0**-24  # float32's unit roundoff
TINY = float(np.finfo(np.float32).smallest_subnormal)
THREADS_ENV = "KLDIV_SPEC_NUM_THREADS"
FUSED_ENV = "KLDIV_SPEC_NUMPY_FUSED"


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the rows of every block the compiled kernel evaluates."""
    return spy_kernel_rows(monkeypatch, _blocks_jsd, "_fused_jsd", "rows_f32")


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


def run_rows(
    s: np.ndarray,
    t: np.ndarray,
    temperature: float,
    beta: float,
    *,
    grad_scale: float | None = None,
    factor: float | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One direct call of the kernel: ``(jsd, grad or None, terms or None)``."""
    rows, vocab = s.shape
    jsd = np.empty(rows)
    grad = None if grad_scale is None else np.empty_like(s)
    terms = None if factor is None else np.empty_like(s)
    gs = 0.0 if grad_scale is None else grad_scale
    f = 1.0 if factor is None else factor
    assert F.rows_f32(s, t, vocab, jsd, grad, terms, temperature, gs, f, beta) is None
    return jsd, grad, terms


def rows_in_float64(s: np.ndarray, t: np.ndarray, temperature: float, beta: float) -> Any:
    """The row quantities in float64 from the float32 shifted logits the kernel forms."""

    def shifted(z: np.ndarray) -> np.ndarray:
        zq = (z / np.float32(temperature)).astype(np.float32)
        return (zq - zq.max(axis=1, keepdims=True)).astype(np.float32).astype(np.float64)

    xs, xt = shifted(s), shifted(t)
    ls = np.log(np.exp(xs).sum(axis=1, keepdims=True))
    lt = np.log(np.exp(xt).sum(axis=1, keepdims=True))
    lq, lp = xs - ls, xt - lt
    q, p = np.exp(lq), np.exp(lp)
    m = beta * p + (1 - beta) * q
    # a weight 0 (even in float64) contributes 0: its log-ratio is set to 0, and so is
    # the logarithm of a mixture of two zero weights
    lm = np.log(np.where(m == 0, 1.0, m))
    dp, dq = np.where(p == 0, 0.0, lp - lm), np.where(q == 0, 0.0, lq - lm)
    r = types.SimpleNamespace(p=p, q=q, lp=lp, lq=lq, lm=lm, dp=dp, dq=dq, ls=ls, lt=lt)
    r.jsd = (beta * p * dp + (1 - beta) * q * dq).sum(axis=1)
    r.big_r = (q * dq).sum(axis=1, keepdims=True)
    return r


def row_bounds(r: Any, beta: float, cg: float, factor: float) -> tuple[Any, Any, Any]:
    r"""The kernel header's bounds on the row divergence, the gradient and the terms.

    With :math:`E_p = u (9 + 3|\log p| + 4|\log m| + |L_t|)` the error of
    :math:`\log p - \log m` (:math:`E_q` the same for :math:`q`):

    - divergence: :math:`u \sum_i (\beta p_i + (1-\beta) q_i)(9 + 3|\log p_i| + 3|\log q_i|
      + 4|\log m_i| + |L_t| + |L_s| + |d_{p,i}| + |d_{q,i}|)`, plus the float64 sums';
    - gradient: :math:`|cG|(1-\beta) q_j (4u(|d_{q,j}| + |R|) + E_{q,j} + \sum_i q_i E_{q,i})`
      plus :math:`(|d_{q,j}| + |R| + 4)` least subnormals (a subnormal
      :math:`cG (1-\beta) E_{s,j} / Z_s` is rounded absolutely, then multiplied);
    - terms: :math:`k(\beta p_j (4u|d_{p,j}| + E_{p,j}) + (1-\beta) q_j (4u|d_{q,j}| + E_{q,j}))`
      plus :math:`(k(|d_{p,j}| + |d_{q,j}| + 4) + 4)` least subnormals.
    """
    w = beta * r.p + (1 - beta) * r.q
    magnitudes = 3 * np.abs(r.lp) + 3 * np.abs(r.lq) + 4 * np.abs(r.lm) + np.abs(r.dp)
    magnitudes += 9 + np.abs(r.lt) + np.abs(r.ls) + np.abs(r.dq)
    jsd_tol = U * (w * magnitudes).sum(axis=1) + 1e-12 * np.abs(r.jsd)
    ep = U * (9 + 3 * np.abs(r.lp) + 4 * np.abs(r.lm) + np.abs(r.lt))
    eq = U * (9 + 3 * np.abs(r.lq) + 4 * np.abs(r.lm) + np.abs(r.ls))
    size = np.abs(r.dq) + np.abs(r.big_r)
    grad_tol = abs(cg) * (1 - beta) * r.q * (4 * U * size + eq + (r.q * eq).sum(1, keepdims=True))
    grad_tol += (size + 4) * TINY
    terms_tol = beta * r.p * (4 * U * np.abs(r.dp) + ep)
    terms_tol += (1 - beta) * r.q * (4 * U * np.abs(r.dq) + eq)
    terms_tol = factor * terms_tol + (factor * (np.abs(r.dp) + np.abs(r.dq) + 4) + 4) * TINY
    return jsd_tol, grad_tol, terms_tol


def check_against_oracle(
    s: np.ndarray, t: np.ndarray, g: float = 0.75, **options: Any
) -> np.ndarray:
    """The value (and, for a reduction, the student gradient) against the exact oracle."""
    out = kl_div_from_logits(s, t, **options)
    assert out.dtype == np.float32
    exact = oracle.from_logits(s, t, grad_output=g, **options)
    if options.get("reduction", "batchmean") == "none":
        # A weight below float32's normal range is rounded absolutely (half a least
        # subnormal) and then multiplied by its log-ratio and k: the oracle's 2 ulp of a
        # subnormal term do not hold that, for the reference either (the edge table's row 8
        # at T = 2: 4.5e-44 from both, exactly 5.06e-44), so such terms get 16 k least
        # subnormals (log-ratios up to 16 in those rows).
        k = options.get("temperature", 1.0) ** 2
        if options.get("scale_by_temperature_squared") is False:
            k = 1.0
        tol = oracle.pointwise_tolerance(exact) + 16 * max(k, 1.0) * TINY
        assert_close(out, exact.terms, tol, str(options))
        return out
    value, tol = oracle.reduce_logits(exact)
    assert_close(out, value, tol, str(options))
    gs, gt = kl_div_from_logits_backward(np.float32(g), s, t, **options)
    assert gt is None and gs.dtype == np.float32
    tol_s, _ = oracle.gradient_tolerance(exact)
    assert_close(gs, exact.grad_input, tol_s, f"gradient {options}")
    mask = options.get("mask")
    if mask is not None:
        dropped = ~np.broadcast_to(np.asarray(mask), s.shape[:-1])
        assert (gs[dropped] == 0).all()
    return out


# --------------------------------------------------------------------------- rows


SHAPES = [(3, 1), (4, 7), (3, 8), (2, 9), (5, 64), (3, 1001)]


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7, 3.0])
@pytest.mark.parametrize("beta", [0.001, 0.1, 0.5, 0.9])
def test_rows_within_the_derived_bounds(
    shape: tuple[int, int], temperature: float, beta: float
) -> None:
    s, t = logits(shape, shape[1] + int(10 * temperature), spread=4.0)
    r = rows_in_float64(s, t, temperature, beta)
    cg, factor = -0.37, 2.5
    jsd, grad, terms = run_rows(s, t, temperature, beta, grad_scale=cg, factor=factor)
    jsd_tol, grad_tol, terms_tol = row_bounds(r, beta, cg, factor)
    assert_close(jsd, r.jsd, jsd_tol, "jsd")
    assert_close(grad, cg * (1 - beta) * r.q * (r.dq - r.big_r), grad_tol, "grad")
    want_terms = factor * (beta * r.p * r.dp + (1 - beta) * r.q * r.dq)
    assert_close(terms, want_terms, terms_tol, "terms")
    # each output alone is the same as all of them at once
    alone, _, _ = run_rows(s, t, temperature, beta)
    np.testing.assert_array_equal(alone, jsd)
    _, alone_grad, _ = run_rows(s, t, temperature, beta, grad_scale=cg)
    np.testing.assert_array_equal(alone_grad, grad)
    _, _, alone_terms = run_rows(s, t, temperature, beta, factor=factor)
    np.testing.assert_array_equal(alone_terms, terms)


@needs_kernel
@pytest.mark.parametrize("beta", [0.2, 0.7])
def test_rows_with_huge_spreads_and_underflowing_weights(beta: float) -> None:
    """Logits spread over hundreds after scaling: subnormal and zero weights, the slow
    lanes of exp and log, in the same vectors as regular ones."""
    s, t = logits((7, 203), 5, spread=80.0)
    r = rows_in_float64(s, t, 0.5, beta)
    jsd, grad, terms = run_rows(s, t, 0.5, beta, grad_scale=1.0, factor=0.25)
    jsd_tol, grad_tol, terms_tol = row_bounds(r, beta, 1.0, 0.25)
    assert_close(jsd, r.jsd, jsd_tol, "jsd")
    assert_close(grad, (1 - beta) * r.q * (r.dq - r.big_r), grad_tol, "grad")
    assert_close(terms, 0.25 * (beta * r.p * r.dp + (1 - beta) * r.q * r.dq), terms_tol, "terms")
    zero = (r.p == 0) & (r.q == 0)
    assert zero.any() and (terms[zero] == 0).all() and not np.signbit(terms[zero]).any()
    assert np.isfinite(grad).all() and (grad[r.q == 0] == 0).all()


@needs_kernel
@pytest.mark.parametrize("vocab", [1, 7, 9, 33, 1001])
def test_the_maximum_is_found_wherever_it_lies(vocab: int) -> None:
    """A logit 300 above the others at every position of the rows (the vector lanes, the
    tail, the first row and the later ones, whose maxima are found during the previous
    row's second pass): a maximum missed would overflow exp."""
    rows = min(vocab, 12)
    s, t = logits((rows, vocab), vocab)
    for i in range(rows):
        s[i, (3 * i) % vocab] += 300.0
        t[i, (5 * i + 1) % vocab] += 300.0
    jsd, grad, _ = run_rows(s, t, 1.0, 0.5, grad_scale=1.0)
    r = rows_in_float64(s, t, 1.0, 0.5)
    assert np.isfinite(jsd).all() and np.isfinite(grad).all()  # type: ignore[union-attr]
    assert_close(jsd, r.jsd, row_bounds(r, 0.5, 1.0, 1.0)[0], "jsd")


@needs_kernel
def test_the_gradient_is_the_derivative_of_the_divergence() -> None:
    """The kernel's gradient against the reference's backward in float64, and that against
    central differences of the float64 divergence: the derivation checked twice."""
    s, t = logits((3, 11), 7, spread=2.0)
    beta, temperature, cg = 0.35, 1.5, 0.8
    _, grad, _ = run_rows(s, t, temperature, beta, grad_scale=cg)
    s64, t64 = s.astype(np.float64), t.astype(np.float64)
    want, _ = _core_logits.from_logits_backward(
        np.asarray(cg),
        s64,
        t64,
        temperature=temperature,
        factor=temperature,  # c = k / T = 1: the kernel's grad_scale is cG itself
        reduction="sum",
        axis=1,
        direction="forward",
        mask=None,
        target_grad=False,
        xp=np,
        beta=beta,
    )
    np.testing.assert_allclose(grad, want, rtol=2e-5, atol=1e-7)

    def value(a: np.ndarray) -> float:
        e = _core_logits.from_logits(
            a,
            t64,
            temperature=temperature,
            factor=1.0,
            reduction="sum",
            axis=1,
            direction="forward",
            mask=None,
            xp=np,
            beta=beta,
        )
        return float(e)

    h = 1e-6
    fd = np.zeros_like(s64)
    for idx in np.ndindex(s64.shape):
        plus, minus = s64.copy(), s64.copy()
        plus[idx] += h
        minus[idx] -= h
        fd[idx] = (value(plus) - value(minus)) / (2 * h)
    # d/ds = (1/T) d/ds', and the kernel's gradient is w.r.t. s' times cG
    np.testing.assert_allclose(want, cg * temperature * fd, rtol=1e-6, atol=1e-9)


@needs_kernel
def test_the_sums_are_float64() -> None:
    """A row of 2^20 equal classes against a shifted copy: float32 sums would lose the
    divergence's low bits (2^20 u is 6%), float64 ones keep it to 1e-6."""
    vocab = 1 << 20
    s = np.zeros((1, vocab), np.float32)
    t = np.zeros((1, vocab), np.float32)
    t[0, : vocab // 2] = 1.0
    jsd, _, _ = run_rows(s, t, 1.0, 0.5)
    r = rows_in_float64(s, t, 1.0, 0.5)
    assert abs(jsd[0] - r.jsd[0]) <= 1e-6 * r.jsd[0]


# --------------------------------------------------------------------------- edge values


def edge_rows() -> tuple[np.ndarray, np.ndarray]:
    """Rows exercising the edge rules of docs/logits.md (4 classes each), in float32."""
    big = 3e38
    s = np.asarray(
        [
            [0.0, -inf, 1.0, 2.0],  # both exclude class 1: it contributes 0
            [0.0, -inf, 1.0, 2.0],  # the student excludes a class the teacher keeps: finite
            [-inf, -inf, -inf, -inf],  # the student excludes everything: NaN
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
            [-inf, -inf, -inf, -inf],  # the teacher excludes everything: NaN
            [4.0, 3.0, -inf, 1.0],  # the teacher excludes a class the student keeps: finite
            [199.0, -210.0, 2.0, 0.5],
        ],
        np.float32,
    )
    return s, t


@needs_kernel
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("beta", [0.3, 0.5])
def test_edge_table_through_the_kernel(
    temperature: float, beta: float, every_size: None, kernel_calls: list[int]
) -> None:
    s, t = edge_rows()
    s2, t2 = logits((5, 4), 18)
    s, t = np.concatenate([s, s2]), np.concatenate([t, t2])
    options = {"temperature": temperature, "beta": beta}
    terms = check_against_oracle(s, t, reduction="none", **options)
    with np.errstate(invalid="ignore"):
        rows = terms.sum(axis=1)
    assert np.isnan(rows[2:5]).all() and np.isnan(rows[6])
    assert np.isfinite(rows[[0, 1, 7, 8]]).all() and np.isfinite(rows[9:]).all()
    assert np.isfinite(rows[5]) == (temperature >= 1.0)  # 3e38 / 0.5 overflows: +inf, NaN
    assert terms[0, 1] == 0.0 and not np.signbit(terms[0, 1])  # both exclude it
    # one side excludes the class: the other's weight times log(1 / its share of m)
    k = temperature**2
    p = np.exp(_core_logits.log_softmax(t[1:2].astype(np.float64) / temperature, axis=1, xp=np))
    assert terms[1, 1] == pytest.approx(k * beta * p[0, 1] * -math.log(beta), rel=1e-5)
    q = np.exp(_core_logits.log_softmax(s[7:8].astype(np.float64) / temperature, axis=1, xp=np))
    assert terms[7, 2] == pytest.approx(k * (1 - beta) * q[0, 2] * -math.log1p(-beta), rel=1e-5)
    mask = np.ones(len(s), bool)
    mask[[3, 8, 10]] = False
    for reduction in ("sum", "batchmean", "rowmean", "mean"):
        check_against_oracle(s, t, reduction=reduction, **options)
        check_against_oracle(s, t, reduction=reduction, mask=mask, **options)
    check_against_oracle(s, t, reduction="none", mask=mask, **options)
    assert kernel_calls


@needs_kernel
def test_only_the_rows_without_a_softmax_go_back_to_the_reference() -> None:
    """The marker exactly on the rows with NaN, +inf or only -inf; excluded classes stay."""
    s, t = edge_rows()
    jsd, grad, terms = run_rows(s, t, 1.0, 0.4, grad_scale=1.0, factor=1.0)
    marked = jsd.view(np.uint64) == np.uint64(_blocks_jsd.REDO_BITS)
    np.testing.assert_array_equal(np.flatnonzero(marked), [2, 3, 4, 6])
    assert np.isnan(grad[marked]).all() and np.isnan(terms[marked]).all()  # type: ignore[index]
    assert np.isfinite(jsd[~marked]).all() and np.isfinite(grad[~marked]).all()  # type: ignore[index]
    assert grad[0, 1] == 0.0 and grad[1, 1] == 0.0  # type: ignore[index]  # q = 0


@needs_kernel
def test_the_edge_values_are_the_references(every_size: None, kernel_calls: list[int]) -> None:
    """Values, NaN patterns and gradients of the edge rows equal the reference's within
    float32 rounding (and its NaN exactly), with the kernel doing the regular rows."""
    s, t = edge_rows()
    for reduction in ("none", "sum"):
        got = kl_div_from_logits(s, t, beta=0.6, reduction=reduction, temperature=2.0)
        with kldiv_spec.use_reference():
            want = kl_div_from_logits(s, t, beta=0.6, reduction=reduction, temperature=2.0)
        assert_close(got, want, 1e-5 * (1 + np.abs(np.nan_to_num(want))), reduction)
    keep = np.asarray([True, True, False, False, False, True, False, True, True])
    got_g, _ = kl_div_from_logits_backward(1.0, s, t, beta=0.6, mask=keep, reduction="sum")
    with kldiv_spec.use_reference():
        want_g, _ = kl_div_from_logits_backward(1.0, s, t, beta=0.6, mask=keep, reduction="sum")
    assert np.isfinite(got_g).all() and (got_g[~keep] == 0).all()
    np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=1e-7)
    assert kernel_calls


# --------------------------------------------------------------------------- public calls


CASES = [
    {"reduction": "batchmean", "beta": 0.5},
    {"reduction": "sum", "temperature": 2.5, "beta": 0.1},
    {"reduction": "none", "temperature": 0.5, "beta": 0.9},
    {"reduction": "mean", "scale_by_temperature_squared": False, "temperature": 3.0, "beta": 0.3},
    {"reduction": "rowmean", "temperature": 4.0, "beta": 0.77},
]


@needs_kernel
@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("shape", [(6, 37), (1, 1), (5, 1), (1, 9), (2, 3, 17)], ids=str)
def test_public_calls_match_the_exact_oracle(
    options: dict[str, Any], shape: tuple[int, ...], every_size: None, kernel_calls: list[int]
) -> None:
    s, t = logits(shape, sum(shape))
    check_against_oracle(s, t, **options)
    rows = math.prod(shape[:-1])
    mask = np.arange(rows).reshape(shape[:-1]) % 3 != 1
    if options["reduction"] == "batchmean" and len(shape) != 2:
        options = {**options, "reduction": "rowmean"}
    check_against_oracle(s, t, mask=mask, **options)
    assert kernel_calls


@needs_kernel
@pytest.mark.parametrize("offset", [4, 12, 28])
def test_unaligned_arrays_give_the_aligned_results(
    offset: int, every_size: None, kernel_calls: list[int]
) -> None:
    s, t = logits((5, 29), offset)
    want = kl_div_from_logits(s, t, beta=0.4, reduction="none")
    want_g, _ = kl_div_from_logits_backward(1.0, s, t, beta=0.4)
    su, tu = misaligned(s, offset), misaligned(t, offset)
    np.testing.assert_array_equal(kl_div_from_logits(su, tu, beta=0.4, reduction="none"), want)
    np.testing.assert_array_equal(kl_div_from_logits_backward(1.0, su, tu, beta=0.4)[0], want_g)
    assert kernel_calls


@needs_kernel
def test_results_do_not_depend_on_threads_or_blocks(
    monkeypatch: pytest.MonkeyPatch, every_size: None
) -> None:
    s, t = logits((37, 300), 3)
    results = []
    for threads, block in (("1", 1 << 19), ("3", 1000), ("2", 1)):
        setenv(monkeypatch, THREADS_ENV, threads)
        monkeypatch.setattr(_blocks_logits, "BLOCK_ELEMENTS", block)
        loss = kl_div_from_logits(s, t, beta=0.5, temperature=2.0)
        grad, _ = kl_div_from_logits_backward(1.0, s, t, beta=0.5, temperature=2.0)
        results.append((loss, grad))
    for loss, grad in results[1:]:
        np.testing.assert_array_equal(loss, results[0][0])
        np.testing.assert_array_equal(grad, results[0][1])


@needs_kernel
def test_default_sizes_take_the_kernel_with_several_blocks(kernel_calls: list[int]) -> None:
    """Without lowering the threshold, a large call is the kernel's, in blocks of rows."""
    s, t = logits((80, 8000), 4)
    loss = kl_div_from_logits(s, t, beta=0.5)
    assert len(kernel_calls) >= 2 and sum(kernel_calls) == 80
    with kldiv_spec.use_reference():
        want = kl_div_from_logits(s, t, beta=0.5)
    assert abs(float(loss) - float(want)) <= 1e-5 * float(want)


# --------------------------------------------------------------------------- dispatch


@needs_kernel
@pytest.mark.checks_fast_path
def test_the_numpy_fast_path_takes_beta(evaluation: Any) -> None:
    """Through the ``evaluation`` fixture: the NumPy fast path takes the forward and the
    backward of a float32 ``beta``, and the reference gives the same within float32."""
    s, t = logits((4, 50), 8)
    loss = kl_div_from_logits(s, t, beta=0.4, temperature=2.0)
    grad, _ = kl_div_from_logits_backward(np.float32(1.0), s, t, beta=0.4, temperature=2.0)
    exact = oracle.from_logits(s, t, beta=0.4, temperature=2.0)
    value, tol = oracle.reduce_logits(exact)
    assert_close(loss, value, tol, "loss")
    assert_close(grad, exact.grad_input, oracle.gradient_tolerance(exact)[0], "gradient")
    if evaluation == "fast_path":
        assert evaluation.calls.took("logits_numpy.kl_div_from_logits") == 1
        assert evaluation.calls.took("logits_numpy.kl_div_from_logits_backward") == 1


@needs_kernel
def test_what_the_kernel_declines_goes_to_the_reference(
    monkeypatch: pytest.MonkeyPatch, every_size: None, kernel_calls: list[int]
) -> None:
    """float64, the other axes, a beta out of range, the teacher's gradient and the
    'none' backward are the reference's; so is everything with the kernel turned off."""
    s, t = logits((4, 20), 9)
    s64, t64 = s.astype(np.float64), t.astype(np.float64)
    with kldiv_spec.use_reference():
        want64 = kl_div_from_logits(s64, t64, beta=0.5)
    assert kl_div_from_logits(s64, t64, beta=0.5) == want64
    kl_div_from_logits(s, t, beta=0.5, axis=0)
    kl_div_from_logits(s, t, beta=1e-30)
    kl_div_from_logits_backward(1.0, s, t, beta=0.5, target_grad=True)
    kl_div_from_logits_backward(np.ones(s.shape, np.float32), s, t, beta=0.5, reduction="none")
    assert kernel_calls == []
    setenv(monkeypatch, FUSED_ENV, "0")
    assert not _blocks_jsd.fused_available()
    with kldiv_spec.use_reference():
        want = kl_div_from_logits(s, t, beta=0.5)
    assert kl_div_from_logits(s, t, beta=0.5) == want
    assert kernel_calls == []
    setenv(monkeypatch, FUSED_ENV, None)
    kl_div_from_logits(s, t, beta=0.5)
    assert kernel_calls == [4]


@needs_kernel
def test_bad_arguments_are_refused_by_name() -> None:
    s = np.ones((2, 4), np.float32)
    jsd = np.zeros(2)
    with pytest.raises(TypeError, match="ten arguments"):
        F.rows_f32(s, s, 4)
    with pytest.raises(TypeError, match="t must be a C-contiguous float32 buffer"):
        F.rows_f32(s, s.astype(np.float64), 4, jsd, None, None, 1.0, 0.0, 1.0, 0.5)
    with pytest.raises(TypeError, match="jsd must be a C-contiguous float64 buffer"):
        F.rows_f32(s, s, 4, jsd.astype(np.float32), None, None, 1.0, 0.0, 1.0, 0.5)
    with pytest.raises(ValueError, match="rows \\* vocab"):
        F.rows_f32(s, s, 3, jsd, None, None, 1.0, 0.0, 1.0, 0.5)
    for beta in (0.0, 1.0, nan):
        with pytest.raises(ValueError, match="beta"):
            F.rows_f32(s, s, 4, jsd, None, None, 1.0, 0.0, 1.0, beta)
    with pytest.raises(ValueError, match="temperature"):
        F.rows_f32(s, s, 4, jsd, None, None, 1e-40, 0.0, 1.0, 0.5)


# --------------------------------------------------------------------------- PyTorch


@needs_kernel
def test_the_torch_cpu_path_takes_the_kernel_forward_and_backward(
    every_size: None, kernel_calls: list[int]
) -> None:
    torch = pytest.importorskip("torch")
    s, t = logits((6, 37), 10)
    mask = np.asarray([True, False, True, True, False, True])
    options = {"temperature": 2.0, "beta": 0.3, "mask": mask}
    exact = oracle.from_logits(s, t, **options)
    value, tol = oracle.reduce_logits(exact)
    tol_s, _ = oracle.gradient_tolerance(exact)
    x, y = torch.tensor(s, requires_grad=True), torch.tensor(t)
    loss = kl_div_from_logits(x, y, temperature=2.0, beta=0.3, mask=torch.tensor(mask))
    assert type(loss.grad_fn).__name__ == "_FusedFromLogitsBackward"
    loss.backward()
    assert kernel_calls == [6]  # one pass: the backward reuses the forward's gradient
    assert_close(loss.detach().numpy(), value, tol, "loss")
    assert_close(x.grad.numpy(), exact.grad_input, tol_s, "gradient")
    # without autograd, and the backward function alone
    with torch.no_grad():
        plain = kl_div_from_logits(x, y, temperature=2.0, beta=0.3, mask=torch.tensor(mask))
    assert plain.item() == loss.item()
    gs, gt = kl_div_from_logits_backward(
        torch.tensor(1.0), x.detach(), y, temperature=2.0, beta=0.3, mask=torch.tensor(mask)
    )
    assert gt is None
    np.testing.assert_array_equal(gs.numpy(), x.grad.numpy())
    assert len(kernel_calls) == 3


@needs_kernel
def test_torch_teacher_gradient_and_double_backward_use_the_reference(
    every_size: None, kernel_calls: list[int]
) -> None:
    torch = pytest.importorskip("torch")
    s, t = logits((3, 9), 11)
    x, y = torch.tensor(s, requires_grad=True), torch.tensor(t, requires_grad=True)
    loss = kl_div_from_logits(x, y, beta=0.5)
    gx, gy = torch.autograd.grad(loss, (x, y), create_graph=True)
    (gx.square().sum() + gy.sum()).backward()  # double backward: the reference's formulas
    xr, yr = torch.tensor(s, requires_grad=True), torch.tensor(t, requires_grad=True)
    with kldiv_spec.use_reference():
        want = kl_div_from_logits(xr, yr, beta=0.5)
        wx, wy = torch.autograd.grad(want, (xr, yr), create_graph=True)
        (wx.square().sum() + wy.sum()).backward()
    np.testing.assert_allclose(gx.detach().numpy(), wx.detach().numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(gy.detach().numpy(), wy.detach().numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(x.grad.numpy(), xr.grad.numpy(), rtol=1e-4, atol=1e-7)
    assert kernel_calls == [3]  # the forward only
    # float64 tensors are the reference's
    kernel_calls.clear()
    kl_div_from_logits(
        torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64), beta=0.5
    )
    assert kernel_calls == []


# --------------------------------------------------------------------------- Triton (CUDA)
#
# The Triton kernel (backends/_triton_jsd.py) runs here in Triton's interpreter, which reads
# TRITON_INTERPRET=1 when triton is imported: test_triton_kernel_in_the_interpreter starts
# pytest on this file's Triton tests in a fresh process with the variable set, where CPU
# tensors take the Triton path of kldiv_spec.backends.logits_torch.

in_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="runs in a subprocess with TRITON_INTERPRET=1 (see above)"
)


@pytest.mark.skipif(INTERPRETED, reason="this is the subprocess")
def test_triton_kernel_in_the_interpreter() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    result = subprocess.run(
        [*command, "-k", "triton and not in_the_interpreter and not compiles_for_cuda"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
    assert " skipped" not in result.stdout  # every Triton test ran there


@pytest.fixture
def triton_launches(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Tiles of 16 classes (a few dozen classes span several), and the launches recorded."""
    from kldiv_spec.backends import _triton_jsd, _triton_logits

    monkeypatch.setattr(_triton_logits, "MAX_BLOCK", 16)
    seen: list[dict[str, Any]] = []
    original = _triton_jsd.from_logits

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(_triton_jsd, "from_logits", spy)
    return seen


TRITON_CASES = [
    ((6, 37), "float32", {"reduction": "batchmean", "temperature": 2.0, "beta": 0.5}),
    ((1, 1), "float32", {"reduction": "sum", "beta": 0.3}),
    ((2, 3, 17), "float64", {"reduction": "rowmean", "temperature": 0.7, "beta": 0.9}),
    (
        (5, 40),
        "float32",
        {"reduction": "mean", "scale_by_temperature_squared": False, "beta": 0.1},
    ),
]


@in_interpreter
@pytest.mark.parametrize("masked", [False, True], ids=["", "mask"])
@pytest.mark.parametrize(("shape", "dtype", "options"), TRITON_CASES, ids=str)
def test_triton_values_and_gradients_match_the_oracle(
    triton_launches: list[dict[str, Any]],
    shape: tuple[int, ...],
    dtype: str,
    options: dict[str, Any],
    masked: bool,
) -> None:
    import torch

    s_np, t_np = (a.astype(dtype) for a in logits(shape, sum(shape)))
    mask = np.arange(math.prod(shape[:-1])).reshape(shape[:-1]) % 3 != 1 if masked else None
    exact = oracle.from_logits(s_np, t_np, mask=mask, grad_output=0.75, **options)
    value, tol = oracle.reduce_logits(exact)
    tol_s, _ = oracle.gradient_tolerance(exact)
    s = torch.tensor(s_np, requires_grad=True)
    t = torch.tensor(t_np)
    m = None if mask is None else torch.tensor(mask)
    loss = kl_div_from_logits(s, t, mask=m, **options)
    assert type(loss.grad_fn).__name__ == "_TritonFromLogitsBackward"
    (grad,) = torch.autograd.grad(loss, s, torch.tensor(0.75, dtype=loss.dtype))
    assert_close(loss.detach().numpy(), value, tol, f"loss {options}")
    assert_close(grad.numpy(), exact.grad_input, tol_s, f"gradient {options}")
    with torch.no_grad():
        alone = kl_div_from_logits(s, t, mask=m, **options)
    assert alone.item() == loss.item()
    g = torch.tensor(0.75, dtype=s.dtype)
    grad_alone, none = kl_div_from_logits_backward(g, s.detach(), t, mask=m, **options)
    assert none is None
    assert_close(grad_alone.numpy(), exact.grad_input, tol_s, f"backward {options}")
    # the loss with its gradient, the loss alone, the backward alone: three launches
    assert [c["gw"] is not None for c in triton_launches] == [True, False, True]
    assert [c["need_loss"] for c in triton_launches] == [True, True, False]


@in_interpreter
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_triton_edge_rows_equal_the_reference(
    triton_launches: list[dict[str, Any]], temperature: float
) -> None:
    """Each edge row's divergence and gradient: NaN exactly where the reference has them,
    the same values elsewhere (float32 roundings apart)."""
    import torch

    from kldiv_spec.backends import _triton_jsd

    s_np, t_np = edge_rows()
    beta = 0.4
    jsd, grad = _triton_jsd.from_logits(
        torch.tensor(s_np),
        torch.tensor(t_np),
        temperature=temperature,
        beta=beta,
        kept=None,
        gw=torch.tensor(0.5),
        c=temperature,
    )
    assert jsd is not None and grad is not None
    with np.errstate(all="ignore"):
        lq, lp = _core_logits.log_probabilities(s_np, t_np, temperature=temperature, axis=1, xp=np)
        want = _core_logits.jsd_terms(lq, lp, beta, xp=np).astype(np.float64).sum(axis=1)
        want_g, _ = _core_logits.from_logits_backward(
            np.asarray(0.5, np.float32),
            s_np,
            t_np,
            temperature=temperature,
            factor=temperature**2,
            reduction="sum",
            axis=1,
            direction="forward",
            mask=None,
            target_grad=False,
            xp=np,
            beta=beta,
        )
    assert_close(jsd.numpy(), want, 1e-6 * (1 + np.abs(np.nan_to_num(want))), "jsd")
    assert_close(grad.numpy(), want_g, 1e-6, "gradient")
    assert (
        np.isnan(jsd.numpy()[[2, 3, 4, 6]]).all() and np.isfinite(jsd.numpy()[[0, 1, 7, 8]]).all()
    )


@in_interpreter
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_triton_half_precision_is_computed_in_float32(
    triton_launches: list[dict[str, Any]], dtype: str
) -> None:
    import torch

    dt = getattr(torch, dtype)
    s_np, t_np = logits((3, 40), 11)
    s = torch.tensor(s_np, dtype=dt, requires_grad=True)
    t = torch.tensor(t_np, dtype=dt)
    loss = kl_div_from_logits(s, t, temperature=2.0, beta=0.5)
    (grad,) = torch.autograd.grad(loss, s)
    with kldiv_spec.use_reference():
        want = kl_div_from_logits(s, t, temperature=2.0, beta=0.5)
        (want_grad,) = torch.autograd.grad(want, s)
    assert loss.dtype == grad.dtype == dt and triton_launches
    ulp = torch.finfo(dt).eps
    torch.testing.assert_close(loss, want, rtol=2 * ulp, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=4 * ulp, atol=1e-6)


@in_interpreter
def test_triton_what_goes_to_the_reference(triton_launches: list[dict[str, Any]]) -> None:
    """'none', the teacher's gradient and double backward are the reference's."""
    import torch

    s_np, t_np = logits((3, 9), 12)
    s, t = torch.tensor(s_np), torch.tensor(t_np, requires_grad=True)
    kl_div_from_logits(s, t.detach(), beta=0.5, reduction="none")
    kl_div_from_logits_backward(torch.tensor(1.0), s, t.detach(), beta=0.5, target_grad=True)
    assert triton_launches == []
    loss = kl_div_from_logits(s, t, beta=0.5)  # the teacher needs a gradient
    (gt,) = torch.autograd.grad(loss, t)  # recomputed by the reference's formulas
    with kldiv_spec.use_reference():
        (want,) = torch.autograd.grad(kl_div_from_logits(s, t, beta=0.5), t)
    torch.testing.assert_close(gt, want, rtol=1e-5, atol=1e-7)
    assert len(triton_launches) == 1


@pytest.mark.skipif(INTERPRETED, reason="the interpreter is on in this process")
def test_triton_jsd_compiles_for_cuda() -> None:
    """Compile the kernel for sm_90 (no GPU needed): what the interpreter cannot check."""
    pytest.importorskip("torch")
    triton = pytest.importorskip("triton", reason="triton is not installed")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kldiv_spec.backends import _triton_jsd

    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton without its CUDA backend")
    variants = [
        ("fp32", "fp32", {"NEED_LOSS": True, "WITH_GRAD": False, "HAS_MASK": False}),
        ("fp32", "fp32", {"NEED_LOSS": True, "WITH_GRAD": True, "HAS_MASK": True}),
        ("fp64", "fp64", {"NEED_LOSS": False, "WITH_GRAD": True, "HAS_MASK": False}),
        ("bf16", "fp32", {"NEED_LOSS": True, "WITH_GRAD": True, "HAS_MASK": True}),
    ]
    for dt, cdt, flags in variants:
        constexprs = {
            **flags,
            "WIDE": dt == "fp64",
            "SCALED": True,
            "BLOCK": 2048 if dt == "fp64" else 4096,
        }
        signature = {
            "s_ptr": f"*{dt}",
            "t_ptr": f"*{dt}",
            "kept_ptr": "*u8",
            "gw_ptr": f"*{cdt}",
            "jsd_ptr": "*fp64",
            "grad_ptr": f"*{dt}",
            "vocab": "i32",
            **dict.fromkeys(
                ("temperature", "c", "beta", "beta1", "log_beta", "log_beta1"), "fp64"
            ),
            **dict.fromkeys(constexprs, "constexpr"),
        }
        source = ASTSource(fn=_triton_jsd._jsd_kernel, signature=signature, constexprs=constexprs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Triton's notices about its own defaults
            compiled = triton.compile(
                source,
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": 8, "enable_fp_fusion": False},
            )
        ptx = compiled.asm["ptx"]
        if dt != "fp64":
            assert "div.rn.f32" in ptx  # the quotient by T is correctly rounded
