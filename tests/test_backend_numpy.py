"""The NumPy fast path (kldiv_spec.backends.numpy) against the reference.

Most tests shrink the block size and the size threshold so that small arrays
cross both (many blocks, several threads) and the tests stay fast. Every call is
made through the public functions; the fast path's protocol functions are spied
on (``fast_path``), so a test says whether the fast path took the call or declined it.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from _support import FastPathCalls, setenv, spy_fast_paths
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kldiv_spec
from kldiv_spec.backends import _blocks
from kldiv_spec.backends import numpy as fast

REDUCTIONS = ("none", "sum", "batchmean", "mean")
DTYPES = (np.float16, np.float32, np.float64)
EDGE = np.array([-np.inf, -2.0, -1e-30, -0.0, 0.0, 1e-40, 0.3, 1.0, 2.0, 700.0, np.inf, np.nan])
# The fast path's settings, as documented (docs/backends.md).
MIN_ELEMENTS_ENV = "KLDIV_SPEC_NUMPY_MIN_ELEMENTS"
THREADS_ENV = "KLDIV_SPEC_NUM_THREADS"
FUSED_ENV = "KLDIV_SPEC_NUMPY_FUSED"


@pytest.fixture
def fast_path(monkeypatch: pytest.MonkeyPatch) -> FastPathCalls:
    """The calls of the NumPy fast path's protocol functions during the test."""
    return spy_fast_paths(monkeypatch, [fast])


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 37 elements, a threshold of 16 elements, three threads."""
    monkeypatch.setattr(_blocks, "BLOCK_ELEMENTS", 37)
    setenv(monkeypatch, MIN_ELEMENTS_ENV, "16")
    setenv(monkeypatch, THREADS_ENV, "3")


def edge_grid(dtype: type, reps: int = 3) -> tuple[np.ndarray, np.ndarray]:
    x, t = np.meshgrid(EDGE, EDGE, indexing="ij")
    return (
        np.tile(x.ravel(), reps).reshape(reps * len(EDGE), len(EDGE)).astype(dtype),
        np.tile(t.ravel(), reps).reshape(reps * len(EDGE), len(EDGE)).astype(dtype),
    )


def call(f, *args, reference: bool = False, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the 'mean' warning
        if reference:
            with kldiv_spec.use_reference():
                return f(*args, **kwargs)
        return f(*args, **kwargs)


def taken(calls: FastPathCalls, f, *args, **kwargs):
    """``f(*args, **kwargs)`` through the public function, asserting the fast path took it."""
    calls.clear()
    out = call(f, *args, **kwargs)
    assert calls.calls and not calls.declined, calls
    return out


def declined(calls: FastPathCalls, f, *args, **kwargs):
    """``f(*args, **kwargs)``, asserting the fast path was asked and declined (reference)."""
    calls.clear()
    out = call(f, *args, **kwargs)
    assert calls.calls and not calls.taken, calls
    return out


def assert_identical(got, want) -> None:
    """Same type, dtype, shape, and the same values bit for bit (NaN where NaN)."""
    assert type(got) is type(want)
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want, strict=True)


def assert_close(got, want, rtol: float) -> None:
    assert type(got) is type(want)
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rtol, atol=0, equal_nan=True)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))


RTOL = {np.float16: 2e-3, np.float32: 2e-6, np.float64: 1e-13}


class _Subclass(np.ndarray):
    """An ndarray subclass: its operations may be overridden, so the fast path declines it."""


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_edge_values_forward(fast_path, dtype, log_target, reduction) -> None:
    x, t = edge_grid(dtype)
    options = {"reduction": reduction, "log_target": log_target}
    with np.errstate(all="ignore"):
        got = taken(fast_path, kldiv_spec.kl_div, x, t, **options)
    want = call(kldiv_spec.kl_div, x, t, reference=True, **options)
    if reduction == "none":  # every edge term, bit for bit
        assert_identical(got, want)
        return
    # The grid holds NaN terms: the blocked sum is NaN, as the reference's is.
    assert_identical(got, want)
    assert np.isnan(got)
    # Without the pairs whose term is NaN or infinite: the blocked sum of the finite terms
    # (several blocks, three threads) against the exact sum of the reference's terms.
    terms = call(kldiv_spec.kl_div, x, t, reduction="none", log_target=log_target, reference=True)
    finite = np.isfinite(terms)
    xf, tf = x[finite], t[finite]
    assert xf.size > 2 * 37
    got = taken(fast_path, kldiv_spec.kl_div, xf, tf, **options)
    want = call(kldiv_spec.kl_div, xf, tf, reference=True, **options)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape == ()
    divisor = 1 if reduction == "sum" else xf.size  # 1-d: 'batchmean' divides by the size
    exact = math.fsum(terms[finite].astype(np.float64)) / divisor
    if not np.isfinite(want):  # float16: the total overflows
        assert_identical(got, want)
        return
    bound = 16 * float(np.finfo(dtype).eps) * math.fsum(np.abs(terms[finite])) / divisor
    assert abs(float(got) - exact) <= bound, (got, exact, bound)
    assert abs(float(got) - float(want)) <= 2 * bound, (got, want, bound)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_edge_values_backward(fast_path, dtype, log_target, reduction) -> None:
    x, t = edge_grid(dtype)
    g = np.full(x.shape, 0.75, dtype) if reduction == "none" else np.asarray(0.75, dtype)
    got = taken(
        fast_path, kldiv_spec.kl_div_backward, g, x, t, reduction=reduction, log_target=log_target
    )
    want = call(
        kldiv_spec.kl_div_backward,
        g,
        x,
        t,
        reduction=reduction,
        log_target=log_target,
        reference=True,
    )
    for a, b in zip(got, want, strict=True):
        assert_identical(a, b)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "batchmean", "mean"])
def test_finite_reductions_close(fast_path, dtype, log_target, reduction) -> None:
    rng = np.random.default_rng(7)
    x = np.log(rng.dirichlet(np.ones(50), size=40) + 1e-3).astype(dtype)
    t = rng.dirichlet(np.ones(50), size=40) + 1e-3
    t = (np.log(t) if log_target else t).astype(dtype)
    t[::7, ::3] = -20 if log_target else 0  # exp(-inf) * -inf would be NaN
    got = taken(fast_path, kldiv_spec.kl_div, x, t, reduction=reduction, log_target=log_target)
    want = call(
        kldiv_spec.kl_div, x, t, reduction=reduction, log_target=log_target, reference=True
    )
    assert np.isfinite(want)
    assert_close(got, want, RTOL[dtype])


finite = st.floats(-30, 30, width=32)
positive = st.one_of(st.just(0.0), st.floats(0, 50, width=32))


@pytest.mark.usefixtures("small_blocks")
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # cleared per example
@given(
    shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=1, max_dims=3, max_side=9),
    dtypes=st.tuples(st.sampled_from(DTYPES), st.sampled_from(DTYPES)),
    log_target=st.booleans(),
    reduction=st.sampled_from(REDUCTIONS),
    strided=st.booleans(),
    data=st.data(),
)
def test_random_against_reference(
    fast_path, shapes, dtypes, log_target, reduction, strided, data
) -> None:
    shape_x, shape_t = shapes.input_shapes
    x = data.draw(hnp.arrays(dtypes[0], shape_x, elements=finite))
    t = data.draw(hnp.arrays(dtypes[1], shape_t, elements=finite if log_target else positive))
    if strided:  # non-contiguous views of the same values
        x = np.repeat(x, 2, axis=-1)[..., ::2]
        t = np.repeat(t, 2, axis=0)[::2]
    fast_path.clear()
    got = call(kldiv_spec.kl_div, x, t, reduction=reduction, log_target=log_target)
    # Below the threshold of 16 elements, or 0-d: the reference, asked first or not at all.
    shape = np.broadcast_shapes(x.shape, t.shape)
    size = math.prod(shape)
    assert fast_path.took("kl_div") == (size >= 16 and len(shape) > 0)
    want = call(
        kldiv_spec.kl_div, x, t, reduction=reduction, log_target=log_target, reference=True
    )
    if reduction == "none":
        assert_identical(got, want)
    else:
        dtype = np.result_type(x.dtype, t.dtype).type
        assert_close(got, want, 20 * RTOL[dtype])
    g = np.asarray(1.25, np.result_type(x.dtype, t.dtype))
    if reduction == "none":
        g = np.broadcast_to(g, np.broadcast_shapes(x.shape, t.shape))
    # errstate: the reference's final cast of a mixed-dtype gradient to its argument's
    # dtype (float32 -> float16) can overflow outside its own errstate (reported).
    with np.errstate(over="ignore"):
        got_g = call(
            kldiv_spec.kl_div_backward, g, x, t, reduction=reduction, log_target=log_target
        )
        want_g = call(
            kldiv_spec.kl_div_backward,
            g,
            x,
            t,
            reduction=reduction,
            log_target=log_target,
            reference=True,
        )
    for a, b in zip(got_g, want_g, strict=True):
        assert_identical(a, b)


@pytest.mark.usefixtures("small_blocks")
def test_strided_broadcast_and_readonly_inputs_are_not_modified(fast_path) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 1, 40))[:, :, ::2]  # strided, broadcast along axis 1
    t = rng.random((7, 20))
    x.flags.writeable = False
    t.flags.writeable = False
    x0, t0 = x.copy(), t.copy()
    got = taken(fast_path, kldiv_spec.kl_div, x, t, reduction="none")
    assert got.shape == (30, 7, 20) and got.flags.c_contiguous and got.flags.writeable
    assert not np.shares_memory(got, x) and not np.shares_memory(got, t)
    want = call(kldiv_spec.kl_div, x, t, reduction="none", reference=True)
    assert_identical(got, want)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(t, t0)


@pytest.mark.usefixtures("small_blocks")
def test_mixed_dtypes_compute_in_the_common_dtype(fast_path) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((20, 30)).astype(np.float32)
    t = rng.random((20, 30))  # float64
    for reduction in ("none", "sum"):
        got = taken(fast_path, kldiv_spec.kl_div, x, t, reduction=reduction)
        want = call(kldiv_spec.kl_div, x, t, reduction=reduction, reference=True)
        assert_identical(got, want) if reduction == "none" else assert_close(got, want, 1e-13)


@pytest.mark.parametrize(
    ("x", "t"),
    [
        pytest.param(np.ones((3, 4)), np.ones((3, 4)), id="small"),
        pytest.param(np.ones(0), np.ones(0), id="empty"),
        pytest.param(np.asarray(0.5), np.asarray(0.5), id="0-d"),
        pytest.param(np.ones(1 << 17), np.ones(1 << 17), id="large"),
    ],
)
def test_small_empty_and_0d_calls_are_left_to_the_reference(fast_path, x, t) -> None:
    """Small calls never reach the fast path (the front evaluates them); empty and 0-d
    ones reach it and are declined; large ones are taken."""
    fast_path.clear()
    got = call(kldiv_spec.kl_div, x, t, reduction="sum")
    want = call(kldiv_spec.kl_div, x, t, reduction="sum", reference=True)
    if x.size >= 1 << 16:
        assert fast_path.took("kl_div") == 1
    else:
        assert not fast_path.taken
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("x", "t"),
    [
        pytest.param(np.ones(1 << 17).view(_Subclass), np.ones(1 << 17), id="subclass"),
        pytest.param(np.ones(1 << 17, np.longdouble), np.ones(1 << 17, np.longdouble), id="f128"),
    ],
)
def test_subclasses_and_other_dtypes_are_declined(fast_path, x, t) -> None:
    got = declined(fast_path, kldiv_spec.kl_div, x, t, reduction="sum")
    want = call(kldiv_spec.kl_div, x, t, reduction="sum", reference=True)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_backward_with_broadcasting_is_left_to_the_reference(fast_path) -> None:
    x = np.zeros((1 << 16, 2))
    t = np.full((1, 2), 0.5)
    gx, gt = declined(fast_path, kldiv_spec.kl_div_backward, 1.0, x, t, reduction="sum")
    assert gx.shape == x.shape and gt.shape == t.shape
    np.testing.assert_allclose(gt, np.full((1, 2), (math.log(0.5) + 1) * (1 << 16)))


def test_default_sizes_take_the_fast_path_with_several_blocks(fast_path) -> None:
    n = 3 * _blocks.BLOCK_ELEMENTS + 5
    rng = np.random.default_rng(3)
    x = rng.standard_normal(n).astype(np.float32)
    t = rng.random(n).astype(np.float32)
    got = taken(fast_path, kldiv_spec.kl_div, x, t, reduction="none")
    assert_identical(got, call(kldiv_spec.kl_div, x, t, reduction="none", reference=True))


@pytest.mark.usefixtures("small_blocks")
def test_result_does_not_depend_on_the_number_of_threads(monkeypatch, fast_path) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((101, 13)).astype(np.float32)
    t = rng.random((101, 13)).astype(np.float32)
    results = []
    for threads in ("1", "2", "5"):
        setenv(monkeypatch, THREADS_ENV, threads)
        results.append(taken(fast_path, kldiv_spec.kl_div, x, t, reduction="sum"))
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_invalid_thread_count_is_an_error(monkeypatch, value) -> None:
    setenv(monkeypatch, MIN_ELEMENTS_ENV, "0")
    with pytest.raises(ValueError, match=THREADS_ENV):  # when read
        setenv(monkeypatch, THREADS_ENV, value)
        kldiv_spec.kl_div(np.zeros(8), np.ones(8), reduction="sum")


def test_blocks_tile_the_array_in_order() -> None:
    for shape, size in [((10,), 3), ((4, 5, 6), 7), ((3, 100), 40), ((2, 3, 4), 1000)]:
        seen = np.zeros(shape, int)
        order = []
        for index in _blocks.blocks(shape, size):
            assert seen[index].size <= size
            seen[index] += 1
            order.append(np.arange(math.prod(shape)).reshape(shape)[index].ravel())
        assert (seen == 1).all()
        np.testing.assert_array_equal(np.concatenate(order), np.arange(math.prod(shape)))


def test_float32_sum_error_is_within_the_bound(monkeypatch: pytest.MonkeyPatch, fast_path) -> None:
    """The ufunc kernels' summation, against math.fsum of the very same float32 terms.

    (The fused float32 pass has its own log, so tests/test_backend_numpy_fused.py
    holds it to the exact loss instead.)
    """
    setenv(monkeypatch, FUSED_ENV, "0")
    n = 1 << 21  # 32 default blocks
    rng = np.random.default_rng(5)
    x = np.log(rng.random(n, dtype=np.float32) + np.float32(1e-3))
    t = rng.random(n, dtype=np.float32)
    terms = call(kldiv_spec.kl_div, x, t, reduction="none", reference=True)
    exact = math.fsum(terms.astype(np.float64))
    got = float(taken(fast_path, kldiv_spec.kl_div, x, t, reduction="sum"))
    eps = float(np.finfo(np.float32).eps) / 2
    bound = (math.ceil(math.log2(_blocks.BLOCK_ELEMENTS)) + 1) * eps * math.fsum(abs(terms))
    half_ulp = float(np.spacing(np.float32(exact))) / 2
    assert abs(got - exact) <= bound + half_ulp
    # and no worse than NumPy's pairwise float32 sum of the whole array (+ the final rounding)
    numpy_error = abs(float(np.sum(terms)) - exact)
    assert abs(got - exact) <= numpy_error + half_ulp


def test_size_threshold_from_the_environment(monkeypatch, fast_path) -> None:
    x = np.log(np.full((2, 3), 0.25))
    t = np.full((2, 3), 0.5)
    kldiv_spec.kl_div(x, t, reduction="sum")
    assert not fast_path.taken  # below the default threshold
    setenv(monkeypatch, MIN_ELEMENTS_ENV, "6")
    got = taken(fast_path, kldiv_spec.kl_div, x, t, reduction="sum")
    assert_close(got, call(kldiv_spec.kl_div, x, t, reduction="sum", reference=True), 1e-15)
    setenv(monkeypatch, MIN_ELEMENTS_ENV, "7")
    fast_path.clear()
    kldiv_spec.kl_div(x, t, reduction="sum")
    assert not fast_path.taken
    setenv(monkeypatch, MIN_ELEMENTS_ENV, "0")
    zero_d = np.asarray(0.5)
    declined(fast_path, kldiv_spec.kl_div, zero_d, zero_d, reduction="sum")
    with pytest.raises(ValueError, match=MIN_ELEMENTS_ENV):  # when read
        setenv(monkeypatch, MIN_ELEMENTS_ENV, "-1")
        kldiv_spec.kl_div(x, t, reduction="sum")


# --------------------------------------------------------------------------- the thread pool


def _blocks_of(n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    n = n_blocks * _blocks.BLOCK_ELEMENTS
    rng = np.random.default_rng(n_blocks)
    t = rng.random(n, dtype=np.float32)
    return np.log(rng.random(n, dtype=np.float32) + np.float32(0.5)), t


def test_concurrent_calls_of_mixed_sizes_never_fail(monkeypatch) -> None:
    """Eight threads, arrays of 2, 3, 5 and 16 blocks, eight workers: every call succeeds.

    A pool keyed by ``min(threads, blocks)`` was shut down by one call while another
    thread submitted to it ("cannot schedule new futures after shutdown").
    """
    import concurrent.futures

    setenv(monkeypatch, THREADS_ENV, "8")
    cases = [_blocks_of(n) for n in (2, 3, 5, 16)]
    expected = [float(kldiv_spec.kl_div(x, t, reduction="sum")) for x, t in cases]

    def caller(seed: int) -> list[float]:
        order = np.random.default_rng(seed).permutation(np.repeat(np.arange(4), 5))
        return [float(kldiv_spec.kl_div(*cases[i], reduction="sum")) - expected[i] for i in order]

    with concurrent.futures.ThreadPoolExecutor(8) as callers:
        differences = [d for ds in callers.map(caller, range(8)) for d in ds]
    assert len(differences) == 160
    assert differences == [0.0] * 160


def test_calls_of_alternating_sizes_reuse_one_pool(monkeypatch) -> None:
    """The worker threads are made once, not per call (nor per change of block count)."""
    setenv(monkeypatch, THREADS_ENV, "4")
    cases = [_blocks_of(n) for n in (2, 3, 5)]
    kldiv_spec.kl_div(*cases[-1], reduction="sum")
    pool = _blocks._pool
    before = {t.ident for t in __import__("threading").enumerate()}
    for i in range(30):
        kldiv_spec.kl_div(*cases[i % 3], reduction="sum")
        assert _blocks._pool is pool
    after = {t.ident for t in __import__("threading").enumerate()}
    assert after <= before


def test_a_call_from_an_atexit_handler_works(tmp_path) -> None:
    """At interpreter exit no new work can be scheduled: the calling thread does it all."""
    import subprocess
    import sys

    script = tmp_path / "at_exit.py"
    script.write_text(
        "import atexit\n"
        "import numpy as np\n"
        "import kldiv_spec\n"
        "from kldiv_spec.backends import _blocks\n"
        "x = np.full(4 * _blocks.BLOCK_ELEMENTS, -1.0, np.float32)\n"
        "t = np.full(4 * _blocks.BLOCK_ELEMENTS, 0.5, np.float32)\n"
        "before = float(kldiv_spec.kl_div(x, t, reduction='sum'))\n"
        "def at_exit():\n"
        "    after = float(kldiv_spec.kl_div(x, t, reduction='sum'))\n"
        "    print('same' if after == before else f'differs: {after} {before}')\n"
        "atexit.register(at_exit)\n"
    )
    env = {**__import__("os").environ, THREADS_ENV: "4"}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "same", done.stderr
