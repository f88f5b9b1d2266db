"""The CuPy fast path's fused kernels.

Without a GPU, the kernels' C++ expressions are checked through a line-by-line
NumPy emulation against the reference on the edge grid (the emulation is tied
to the source by the string checks). With a GPU, the compiled kernels are
checked against the reference on CuPy arrays.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _support import cupy_skip_reason

import kldiv_spec
from kldiv_spec._validation import operands
from kldiv_spec.backends import cupy as fast

REDUCTIONS = ("none", "sum", "mean", "batchmean")
TARGETS = [0.0, -0.0, 1e-45, 1e-40, 0.3, 1.0, 2.0, -0.5, math.inf, -math.inf, math.nan, -1000.0]
INPUTS = [math.log(1e-40), -100.0, -1.0, 0.0, 0.5, math.inf, -math.inf, math.nan, -0.0, 3e38]


GPU_REASON = cupy_skip_reason()
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=GPU_REASON or "")


# --- NumPy emulation of the C++ (one line per C++ line) -------------------------------


def emulate_loss(x: np.ndarray, t: np.ndarray, log_target: bool) -> np.ndarray:
    dtype = x.dtype.type
    if log_target:
        return np.exp(t) * (t - x)  # exp(t) * (t - x)
    xlogy = np.where(t == dtype(0), dtype(0), t * np.log(t))  # (t == 0) ? 0 : t * log(t)
    return xlogy - t * x  # xlogy - t * x


def emulate_gradient(
    x: np.ndarray, t: np.ndarray, g: np.ndarray, log_target: bool
) -> tuple[np.ndarray, np.ndarray]:
    dtype = x.dtype.type
    if log_target:
        p = np.exp(t)  # T p = exp(t);
        gp = g * p  # T gp = g * p;
        return -gp, (g * (t - x)) * p + gp  # gx = -gp; gt = (g * (t - x)) * p + gp;
    gx = -(t * g)  # gx = -(t * g);
    regular = (t > dtype(0)) & (t < dtype(np.inf))  # (t > 0 && t < inf)
    gt = np.where(regular, g * (np.log(t) + dtype(1) - x), dtype(np.nan))  # ? ... : NaN
    return gx, gt


def test_emulation_follows_the_kernel_source() -> None:
    assert "(t == (T)0) ? (T)0 : t * log(t)" in fast.PREAMBLE
    assert "return xlogy - t * x;" in fast.PREAMBLE
    assert "return exp(t) * (t - x);" in fast.PREAMBLE
    assert "gx = -(t * g);" in fast.GRADIENT[False]
    assert (
        "(t > (T)0 && t < kl_inf<T>()) ? g * (log(t) + (T)1 - x) : kl_nan<T>()"
        in (fast.GRADIENT[False])
    )
    assert fast.GRADIENT[True].split("\n") == [
        "T p = exp(t);",
        "T gp = g * p;",
        "gx = -gp;",
        "gt = (g * (t - x)) * p + gp;",
    ]
    assert fast._OPTIONS == ("--fmad=false",)  # no contraction: the reference's rounding


def grid(dtype: type, log_target: bool) -> tuple[np.ndarray, np.ndarray]:
    t, x = np.meshgrid(np.array(TARGETS, dtype), np.array(INPUTS, dtype), indexing="ij")
    return x, t


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("log_target", [False, True])
def test_emulated_kernels_match_the_reference(dtype: type, log_target: bool) -> None:
    x, t = grid(dtype, log_target)
    g = np.linspace(0.5, 1.5, x.size, dtype=dtype).reshape(x.shape)
    with kldiv_spec.use_reference(), np.errstate(all="ignore"):
        want = kldiv_spec.kl_div(x, t, reduction="none", log_target=log_target)
        want_x, want_t = kldiv_spec.kl_div_backward(
            g, x, t, reduction="none", log_target=log_target
        )
        got = emulate_loss(x, t, log_target)
        got_x, got_t = emulate_gradient(x, t, g, log_target)
    for a, b in ((got, want), (got_x, want_x), (got_t, want_t)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)  # NaN where NaN, same values
        finite = ~np.isnan(b)
        np.testing.assert_array_equal(np.signbit(a[finite]), np.signbit(b[finite]))


def test_module_imports_without_cupy() -> None:
    """The kernel source is reviewable on any machine: CuPy is imported on first use."""
    assert callable(fast.kl_div) and "cupy" not in fast.__dict__


# --- the compiled kernels ------------------------------------------------------------


def assert_close(got: object, want: object) -> None:
    import cupy

    a, b = cupy.asnumpy(got), cupy.asnumpy(want)
    assert a.dtype == b.dtype and a.shape == b.shape
    eps = float(np.finfo(a.dtype).eps)
    tiny = float(np.finfo(a.dtype).smallest_subnormal)
    np.testing.assert_allclose(a, b, rtol=8 * eps, atol=4 * tiny, equal_nan=True)


@needs_gpu
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kernels_match_the_reference_on_the_gpu(
    dtype: type, log_target: bool, reduction: str
) -> None:
    import cupy

    xn, tn = grid(dtype, log_target)
    x, t = cupy.asarray(xn), cupy.asarray(tn)
    shape = x.shape if reduction == "none" else ()
    g = cupy.linspace(0.5, 1.5, math.prod(shape), dtype=dtype).reshape(shape)
    assert fast.kl_div(operands(x, t, reduction=reduction, log_target=log_target)) is not (
        NotImplemented
    )
    got = kldiv_spec.kl_div(x, t, reduction=reduction, log_target=log_target)
    got_x, got_t = kldiv_spec.kl_div_backward(g, x, t, reduction=reduction, log_target=log_target)
    with kldiv_spec.use_reference():
        want = kldiv_spec.kl_div(x, t, reduction=reduction, log_target=log_target)
        want_x, want_t = kldiv_spec.kl_div_backward(
            g, x, t, reduction=reduction, log_target=log_target
        )
    for a, b in ((got, want), (got_x, want_x), (got_t, want_t)):
        assert_close(a, b)


@needs_gpu
def test_large_float32_sum_is_accumulated_in_float64() -> None:
    import cupy

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 100_000))
    xn = (logits - np.log(np.exp(logits).sum(1, keepdims=True))).astype(np.float32)
    tn = rng.dirichlet(np.ones(100_000), size=8).astype(np.float32)
    got = kldiv_spec.kl_div(cupy.asarray(xn), cupy.asarray(tn), reduction="sum")
    terms = tn.astype(np.float64) * np.log(tn.astype(np.float64)) - tn.astype(
        np.float64
    ) * xn.astype(np.float64)
    assert got.dtype == np.float32
    bound = 2 * float(np.finfo(np.float32).eps) * float(np.abs(terms).sum())
    assert abs(float(got) - float(terms.sum())) <= bound


@pytest.mark.parametrize(
    "n", [0, 1, 1023, 1024, 4095, 4096 * 1024, 4096 * 1024 + 1, 4096 * 32000, 10**9 + 7]
)
def test_split_keeps_every_multiprocessor_busy(n: int) -> None:
    """The first pass has many rows (thread blocks), each long enough, and a short tail."""
    rows, cols = fast.split(n)
    assert rows * cols <= n and n - rows * cols < cols
    assert rows <= fast.MAX_PARTIALS and cols >= fast.MIN_COLUMNS
    if n >= fast.MAX_PARTIALS * fast.MIN_COLUMNS:
        assert rows > fast.MAX_PARTIALS // 2


@needs_gpu
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
@pytest.mark.parametrize("n", [1500, 1024 * 4096, 1024 * 4096 + 777])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("log_target", [False, True])
def test_two_pass_sum_matches_the_reference(n: int, contiguous: bool, log_target: bool) -> None:
    """Rows, tail and the non-contiguous one-pass fallback all give the reference's sums."""
    import cupy

    rng = np.random.default_rng(n)
    xn = np.log(rng.dirichlet(np.ones(n))).astype(np.float64)
    tn = rng.dirichlet(np.ones(n)).astype(np.float64)
    if log_target:
        tn = np.log(tn)
    x, t = cupy.asarray(xn), cupy.asarray(tn)
    if not contiguous:
        x, t = cupy.asarray(np.stack([xn, xn]))[:, ::2], cupy.asarray(np.stack([tn, tn]))[:, ::2]
    for reduction in ("sum", "mean", "batchmean"):
        got = kldiv_spec.kl_div(x, t, reduction=reduction, log_target=log_target)
        with kldiv_spec.use_reference():
            want = kldiv_spec.kl_div(x, t, reduction=reduction, log_target=log_target)
        terms = cupy.abs(kldiv_spec.kl_div(x, t, reduction="none", log_target=log_target))
        bound = 4 * float(np.finfo(np.float64).eps) * float(terms.sum())
        assert abs(float(got) - float(want)) <= bound
