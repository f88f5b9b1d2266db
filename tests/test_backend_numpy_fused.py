"""The compiled fused float32 sum of the NumPy fast path (backends/_fused.c).

Its ``log`` is its own (eight lanes at a time with AVX2), so it is held to
accuracy bounds against float64, not to NumPy's bits: the ``log`` within 1 ulp
of the exact value on a sample, and within the documented 0.83 ulp on the sweep of
``benchmarks/log_sweep.py`` (exhaustively with ``KLDIV_SPEC_SLOW=1``), the sums
within the reductions' bound, and NaN, infinities and zeros exactly where the
reference has them; any alignment of the buffers.
"""

from __future__ import annotations

import ctypes
import math
import os
import pathlib
import sys
import warnings
from types import ModuleType

import numpy as np
import pytest
from _support import load_script, misaligned, numpy_fused_available, setenv

import kldiv_spec
from kldiv_spec.backends import _blocks

pytestmark = pytest.mark.skipif(
    not numpy_fused_available(),
    reason="the fused float32 sum is not built here, or this CPU has no AVX2",
)
_fused = _blocks._fused
THREADS_ENV = "KLDIV_SPEC_NUM_THREADS"
FUSED_ENV = "KLDIV_SPEC_NUMPY_FUSED"


def exact_sum(x: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """The float64 sum of the loss of float32 ``x``, ``t``, and the sum of the terms' sizes."""
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    with np.errstate(all="ignore"):
        xlogy = np.where(t64 == 0, 0.0, t64 * np.log(t64))
        terms = xlogy - t64 * x64
        scale = np.abs(xlogy) + np.abs(t64 * x64)
    return math.fsum(terms.ravel()), math.fsum(scale.ravel())


def fused_sum(x: np.ndarray, t: np.ndarray) -> float:
    return float(kldiv_spec.kl_div(x, t, reduction="sum"))


def bits(a: np.ndarray) -> np.ndarray:
    """The bit patterns of float32 ``a`` (so that NaN compares by payload too)."""
    return np.ascontiguousarray(a).view(np.uint32)


class _CountingFused:
    """The compiled module, its fused sum counted (``calls``: the length of each call)."""

    def __init__(self, real: ModuleType) -> None:
        self._real = real
        self.calls: list[int] = []

    def loss_sum_f32(self, x: object, t: object) -> float:
        self.calls.append(len(memoryview(x)))  # type: ignore[arg-type]
        return self._real.loss_sum_f32(x, t)

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The calls of the compiled fused sum during the test (the elements of each)."""
    counting = _CountingFused(_fused)
    monkeypatch.setattr(_blocks, "_fused", counting)
    return counting.calls


def test_log_is_within_one_ulp_of_the_exact_value() -> None:
    # every 1009th positive finite float32, subnormals included, and the powers of two
    bits = np.concatenate(
        [np.arange(1, 0x7F800000, 1009, dtype=np.uint32), np.arange(1, 255, dtype=np.uint32) << 23]
    )
    v = bits.view(np.float32)
    got = np.empty_like(v)
    assert _fused.log_f32(v, got) is None
    exact = np.log(v.astype(np.float64))
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    error = np.abs(got.astype(np.float64) - exact) / ulp
    assert error.max() <= 1.0, v[np.argmax(error)]
    assert got[v == 1][0] == 0.0


def test_log_edge_values_are_numpys() -> None:
    v = np.array([0.0, -0.0, -1e-45, -1.0, -np.inf, np.inf, np.nan, 1e-45, 1.0], np.float32)
    got = np.empty_like(v)
    _fused.log_f32(v, got)
    with np.errstate(all="ignore"):
        want = np.log(v)
    np.testing.assert_array_equal(got, want)  # NaN compares equal to NaN here
    assert not np.signbit(got[-1])  # log 1 = +0


def test_product_is_rounded_before_the_subtraction() -> None:
    """Each term is fl(t log t) - fl(t x), as the reference rounds it, never a fused
    multiply-add (which a build without -ffp-contract=off could produce)."""
    rng = np.random.default_rng(7)
    t = rng.random(4000, dtype=np.float32) + np.float32(0.01)
    log_t = np.empty_like(t)
    _fused.log_f32(t, log_t)
    x = np.nextafter(log_t, np.float32(np.inf))  # the two products nearly cancel
    xlogy = t * log_t
    separate = xlogy - t * x  # float32 throughout: the reference's roundings
    contracted = (xlogy.astype(np.float64) - t.astype(np.float64) * x).astype(np.float32)
    differ = np.flatnonzero(separate != contracted)
    assert differ.size > 1000  # the check below can tell the two apart
    for i in differ[:300]:
        assert _fused.loss_sum_f32(x[i : i + 1], t[i : i + 1]) == float(separate[i])
        block = np.zeros(40, np.float32), np.zeros(40, np.float32)
        block[0][17], block[1][17] = x[i], t[i]  # a lane of a full vector, not the tail
        assert _fused.loss_sum_f32(*block) == float(separate[i])
        block[1][:] = np.where(np.arange(40) == 17, t[i], 1)  # t = 1, x = 0: loss 0, and
        assert _fused.loss_sum_f32(*block) == float(separate[i])  # every lane is regular


@pytest.mark.parametrize("n", [1, 7, 8, 15, 16, 17, 40, (1 << 16) + 7, 3 * (1 << 16)])
def test_sum_of_any_length_is_accurate(n: int, every_size: None, fused_calls: list[int]) -> None:
    rng = np.random.default_rng(n)
    logits = rng.standard_normal(n)
    x = (logits - np.log(np.exp(logits).sum())).astype(np.float32)
    t = rng.dirichlet(np.ones(n)).astype(np.float32)
    t[:: max(1, n // 5)] = 0  # zero targets: 0 log 0 = 0
    want, scale = exact_sum(x, t)
    # each term: two products and a difference rounded (3 u), the log within 1 ulp (2 u)
    bound = 5 * float(np.finfo(np.float32).eps) / 2 * scale + 1e-300
    assert abs(fused_sum(x, t) - float(np.float32(want))) <= bound + np.spacing(np.float32(want))
    assert sum(fused_calls) == n  # every element, in the fused pass


@pytest.mark.parametrize("where", [0, 3, 70000])
@pytest.mark.parametrize(
    ("t_value", "x_value"),
    [
        (-0.5, -1.0),  # log of a negative target: NaN
        (np.nan, -1.0),
        (0.3, np.nan),
        (np.inf, -1.0),  # inf * log inf - inf * x = inf - (-inf) = inf
        (np.inf, 1.0),  # inf - inf = NaN
        (0.3, -np.inf),  # - t * x = +inf
        (0.3, np.inf),  # -inf
        (0.0, -np.inf),  # 0 - 0 * -inf = NaN
        (0.0, 5.0),  # 0 log 0 = 0
        (1e-45, 0.0),  # a subnormal target
        (-0.0, 2.0),
    ],
)
def test_edge_values_propagate_as_in_the_reference(
    t_value: float, x_value: float, where: int, every_size: None, fused_calls: list[int]
) -> None:
    n = 100_000
    x = np.full(n, -9.0, np.float32)
    t = np.full(n, 1e-4, np.float32)
    x[where], t[where] = x_value, t_value
    got = fused_sum(x, t)
    assert sum(fused_calls) == n
    with kldiv_spec.use_reference():
        want = float(kldiv_spec.kl_div(x, t, reduction="sum"))
    if math.isnan(want) or math.isinf(want):
        assert got == want or (math.isnan(got) and math.isnan(want))
    else:
        assert math.isclose(got, want, rel_tol=1e-6)


def test_sum_is_at_least_as_accurate_as_numpys() -> None:
    """Against the exact loss of the float32 inputs: no worse than the reference's np.sum."""
    rng = np.random.default_rng(5)
    t = rng.dirichlet(np.ones(1000), size=2000).astype(np.float32)
    x = np.log(rng.dirichlet(np.ones(1000), size=2000).astype(np.float32))
    want, _ = exact_sum(x, t)
    with kldiv_spec.use_reference():
        reference = float(kldiv_spec.kl_div(x, t, reduction="sum"))
    half_ulp = float(np.spacing(np.float32(want))) / 2
    assert abs(fused_sum(x, t) - want) <= abs(reference - want) + half_ulp


@pytest.mark.parametrize(
    ("x_shape", "t_shape", "step"),
    [((), (70000,), 1), ((70000,), (), 1), ((1, 70000), (3, 1), 1), ((140000,), (140000,), 2)],
)
def test_broadcast_and_strided_operands_take_the_ufunc_kernels(
    x_shape: tuple[int, ...], t_shape: tuple[int, ...], step: int, fused_calls: list[int]
) -> None:
    """Only contiguous operands of the output's shape go through the fused pass."""
    rng = np.random.default_rng(3)
    x = np.log(np.asarray(rng.random(x_shape, dtype=np.float32)) + np.float32(0.01))
    t = np.asarray(rng.random(t_shape, dtype=np.float32))
    if step > 1:
        x, t = x[::step], t[::step]
    got = fused_sum(x, t)
    assert not fused_calls
    with kldiv_spec.use_reference():
        want = float(kldiv_spec.kl_div(x, t, reduction="sum"))
    assert math.isclose(got, want, rel_tol=1e-5)


def test_an_all_zero_sum_is_positive_zero(every_size: None, fused_calls: list[int]) -> None:
    x = np.full(1000, 3.0, np.float32)
    t = np.zeros(1000, np.float32)
    t[::2] = -0.0
    got = fused_sum(x, t)
    assert fused_calls == [1000]
    assert got == 0.0 and not math.copysign(1.0, got) < 0


def test_result_does_not_depend_on_threads(
    monkeypatch: pytest.MonkeyPatch, fused_calls: list[int]
) -> None:
    rng = np.random.default_rng(1)
    x = np.log(rng.random(5 * (1 << 16) + 3, dtype=np.float32) + np.float32(1e-3))
    t = rng.random(x.size, dtype=np.float32)
    results = set()
    for threads in ("1", "2", "3"):
        setenv(monkeypatch, THREADS_ENV, threads)
        results.add(fused_sum(x, t))
    assert len(results) == 1
    assert sum(fused_calls) == 3 * x.size


def test_switched_off_the_ufunc_kernels_sum(
    monkeypatch: pytest.MonkeyPatch, fused_calls: list[int]
) -> None:
    rng = np.random.default_rng(2)
    x = np.log(rng.random(1 << 17, dtype=np.float32) + np.float32(1e-3))
    t = rng.random(x.size, dtype=np.float32)
    fused = fused_sum(x, t)
    assert sum(fused_calls) == x.size
    setenv(monkeypatch, FUSED_ENV, "0")
    assert not numpy_fused_available()
    ufuncs = fused_sum(x, t)
    assert sum(fused_calls) == x.size  # no more calls
    want, scale = exact_sum(x, t)
    for got in (fused, ufuncs):
        assert abs(got - want) <= 20 * float(np.finfo(np.float32).eps) * scale


def test_read_only_inputs_are_read(every_size: None, fused_calls: list[int]) -> None:
    x = np.log(np.full(50, 0.02, np.float32))
    t = np.full(50, 0.02, np.float32)
    x.flags.writeable = t.flags.writeable = False
    assert fused_sum(x, t) == 0.0
    assert fused_calls == [50]


def test_bad_buffers_are_refused_by_name() -> None:
    f32 = np.ones(8, np.float32)
    with pytest.raises(TypeError, match="t must be a C-contiguous float32 buffer"):
        _fused.loss_sum_f32(f32, np.ones(8))
    with pytest.raises(TypeError, match="x must be a C-contiguous float32 buffer"):
        _fused.loss_sum_f32(np.ones(8, np.int32), f32)
    with pytest.raises(ValueError, match="same length"):
        _fused.loss_sum_f32(f32, f32[:4])
    with pytest.raises(TypeError, match="x must be a C-contiguous float32 buffer"):
        _fused.loss_sum_f32(np.ones(16, np.float32)[::2], f32)
    with pytest.raises(TypeError, match="x must be"):
        _fused.loss_sum_f32([1.0] * 8, f32)
    read_only = np.ones(8, np.float32)
    read_only.flags.writeable = False
    with pytest.raises(TypeError, match=r"dst must be a C-contiguous float32 buffer \(writable\)"):
        _fused.log_f32(f32, read_only)
    with pytest.raises(TypeError, match="two buffers"):
        _fused.loss_sum_f32(f32)


# Lengths: within one vector, the tail alone, full vectors plus a tail, and blocks' sizes.
UNALIGNED_LENGTHS = [1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 1001, (1 << 16) + 5, (1 << 17) + 3]


def regular_and_special_values(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Float32 ``x`` (log-probabilities) and ``t`` of length ``n``, ``t`` with some zeros and
    subnormals (the lanes' slow path), every value finite so that the sum is too."""
    rng = np.random.default_rng(seed)
    t = rng.random(n, dtype=np.float32)
    x = np.log(rng.random(n, dtype=np.float32) + np.float32(1e-3))
    t[::5] = 0
    t[1::7] = np.float32(3e-39)  # subnormal
    return x, t


@pytest.mark.parametrize("offset", [1, 2, 3])
@pytest.mark.parametrize("n", UNALIGNED_LENGTHS)
def test_unaligned_buffers_give_the_aligned_results(n: int, offset: int) -> None:
    """Regression: an unaligned float32 array exports the buffer format '=f', once refused
    with "t must be a C-contiguous float32 buffer". Every start, tail included, is read."""
    x, t = regular_and_special_values(n, n + offset)
    want = _fused.loss_sum_f32(x, t)
    xu, tu = misaligned(x, offset), misaligned(t, (offset + 1) % 4)
    assert memoryview(xu).format == "=f" and not xu.flags.aligned
    assert _fused.loss_sum_f32(xu, tu) == want  # the same arithmetic, bit for bit
    assert _fused.loss_sum_f32(xu, t) == want
    assert _fused.loss_sum_f32(x, tu) == want
    # the log, unaligned source and destination, with every special value among regular ones
    special = np.array(
        [0.0, -0.0, 1e-45, 3e-39, -1.0, -1e-45, np.inf, -np.inf, np.nan, 1.0], np.float32
    )
    v = t.copy()
    v[::3] = np.resize(special, v[::3].size)
    want_log = np.empty_like(v)
    _fused.log_f32(v, want_log)
    got_log = misaligned(np.full(n, 7, np.float32), offset)
    _fused.log_f32(misaligned(v, 3 - offset + 1), got_log)
    np.testing.assert_array_equal(bits(got_log), bits(want_log))


def reduced(x: np.ndarray, t: np.ndarray, reduction: str) -> np.ndarray:
    """``kl_div(x, t, reduction=reduction)``, without PyTorch's warning about 'mean'."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "reduction: 'mean'", UserWarning)
        return kldiv_spec.kl_div(x, t, reduction=reduction)


def reference_and_bound(x: np.ndarray, t: np.ndarray, reduction: str) -> tuple[float, float]:
    """The reference's loss and how far a correct fused result may lie from it.

    Against the exact loss: the reference's np.sum is within ceil(log2 n) u M, its terms
    within 3 u plus NumPy's float32 log (3.6 ulp, at most 7.2 u); the fused pass's terms
    within 5 u (tests above); each result is then rounded to float32 and divided.
    """
    with kldiv_spec.use_reference():
        want = float(reduced(x, t, reduction))
    _, scale = exact_sum(x.ravel(), t.ravel())
    divisor = {"sum": 1, "mean": x.size, "batchmean": x.shape[0]}[reduction]
    u = float(np.finfo(np.float32).eps) / 2
    bound = (math.ceil(math.log2(x.size)) + 3 + 8 + 5) * u * scale / divisor
    return want, bound + 2 * float(np.spacing(np.float32(want)))


@pytest.mark.parametrize("offset", [1, 2, 3])
@pytest.mark.parametrize("shape", [((1 << 17) + 3,), (257, 513)])
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_unaligned_arrays_take_the_fused_pass(
    reduction: str, shape: tuple[int, ...], offset: int, fused_calls: list[int]
) -> None:
    """Regression: kl_div of unaligned float32 arrays of >= 65,536 elements raised TypeError."""
    x, t = regular_and_special_values(math.prod(shape), offset)
    x, t = x.reshape(shape), t.reshape(shape)
    xu, tu = misaligned(x, offset), misaligned(t, offset)
    got = reduced(xu, tu, reduction)
    assert got.dtype == np.float32
    assert sum(fused_calls) == x.size  # every element, in the fused pass
    assert got == reduced(x, t, reduction)  # alignment changes nothing
    want, bound = reference_and_bound(x, t, reduction)
    assert abs(float(got) - want) <= bound


def test_native_byte_order_formats_are_accepted_and_others_refused() -> None:
    values = [0.25, 1.0, 2.0, 0.0, 3.0, 0.5, 1e-3, 4.0, 0.75]
    t = np.array(values, np.float32)
    x = np.full(t.size, -1.5, np.float32)
    want = _fused.loss_sum_f32(x, t)
    if sys.byteorder == "little":
        ours, theirs, c_float = "<", ">", ctypes.c_float.__ctype_le__
    else:
        ours, theirs, c_float = ">", "<", ctypes.c_float.__ctype_be__
    c_ours = (c_float * t.size)(*values)  # a buffer of format "<f" (or ">f")
    assert memoryview(c_ours).format == f"{ours}f"
    assert _fused.loss_sum_f32(x, c_ours) == want
    swapped = t.astype(t.dtype.newbyteorder(theirs))
    assert memoryview(swapped).format == f"{theirs}f"
    with pytest.raises(TypeError, match="t must be a C-contiguous float32 buffer"):
        _fused.loss_sum_f32(x, swapped)
    with pytest.raises(TypeError, match="x must be a C-contiguous float32 buffer"):
        _fused.loss_sum_f32(swapped, t)
    with pytest.raises(TypeError, match="dst must be a C-contiguous float32 buffer"):
        _fused.log_f32(t, swapped)


@pytest.mark.parametrize("which", ["x", "t", "both"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_byte_swapped_arrays_give_the_right_loss(reduction: str, which: str) -> None:
    """A float32 array of the other byte order never reaches the fused pass as native data:
    the public function still gives the native arrays' loss."""
    x, t = regular_and_special_values(3 * (1 << 16) + 7, 11)
    x, t = x.reshape(-1, 5), t.reshape(-1, 5)
    other = np.dtype(np.float32).newbyteorder("S")
    xs = x.astype(other) if which in ("x", "both") else x
    ts = t.astype(other) if which in ("t", "both") else t
    got = reduced(xs, ts, reduction)
    want, bound = reference_and_bound(x, t, reduction)
    assert abs(float(got) - want) <= bound


#: The documented bound on the fused log's error (docs/accuracy.md, docs/benchmarks.md):
#: the exhaustive sweep of benchmarks/log_sweep.py measures 0.8265 ulp at t = 0x3fb4f239.
LOG_ULP_BOUND = 0.83
LOG_WORST_BITS, LOG_WORST_ULP = 0x3FB4F239, 0.8265


def log_sweep() -> ModuleType:
    """benchmarks/log_sweep.py, imported from the source tree (skip where it is absent)."""
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "log_sweep.py"
    if not path.is_file():
        pytest.skip("benchmarks/log_sweep.py is not in this tree")
    return load_script(path, "log_sweep")


def test_log_sweep_quick_stays_within_the_documented_bound() -> None:
    """Every 1009th positive finite float32 (the sweep's --quick), and the worst argument of
    the exhaustive sweep: if this changes, rerun benchmarks/log_sweep.py and update the docs."""
    sweep = log_sweep()
    stats = sweep.sweep(stride=sweep.QUICK_STRIDE, workers=2)["fused log_f32"]
    assert stats.count == -(-(sweep.LAST - sweep.FIRST + 1) // sweep.QUICK_STRIDE)
    assert stats.max_ulp < LOG_ULP_BOUND, stats.describe("fused")
    assert stats.not_faithful == 0
    worst = sweep.sweep(first=LOG_WORST_BITS, last=LOG_WORST_BITS)["fused log_f32"]
    assert worst.max_ulp == pytest.approx(LOG_WORST_ULP, abs=5e-5)
    assert worst.not_correctly_rounded == 1 and worst.not_faithful == 0


def test_log_sweep_errors_follow_the_ulp_convention() -> None:
    """ulp(E) = 2**(floor(log2|E|) - 23); at t = 1 the error is 0 for y = 0, else inf;
    faithful results are the two float32 values around E."""
    sweep = log_sweep()
    t = np.array([1.0, 1.0, np.e, np.e, np.e], np.float32)
    e = math.log(float(t[2]))  # just below 1: its binade's ulp is 2**-24
    nearest = np.float32(e)
    up = np.float32(np.inf if float(nearest) < e else -np.inf)  # towards the other neighbour
    other = np.nextafter(nearest, up)
    away = np.nextafter(nearest, -up)
    y = np.array([0.0, 1e-7, nearest, other, away], np.float32)
    ulps, correct, faithful = sweep.errors(t, y)
    assert ulps[0] == 0 and ulps[1] == np.inf
    assert ulps[2] == abs(float(nearest) - e) * 2.0**24 <= 0.5
    assert 0.5 <= ulps[3] <= 1 < ulps[4] <= 1.5
    assert correct.tolist() == [True, False, True, False, False]
    assert faithful.tolist() == [True, False, True, True, False]


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("KLDIV_SPEC_SLOW") != "1",
    reason="the exhaustive log sweep takes minutes: run it with KLDIV_SPEC_SLOW=1 "
    "(or python benchmarks/log_sweep.py)",
)
def test_log_sweep_over_every_positive_finite_float32() -> None:
    stats = log_sweep().sweep()["fused log_f32"]
    assert stats.count == 2**31 - 2**23 - 1
    assert stats.max_ulp < LOG_ULP_BOUND
    assert stats.argmax == LOG_WORST_BITS
    assert stats.max_ulp == pytest.approx(LOG_WORST_ULP, abs=5e-5)
    assert stats.not_faithful == 0
