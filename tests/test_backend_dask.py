"""The Dask fast path (kldiv_spec.backends.dask): lazy, warning-free, equal to the reference."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from _support import FastPathCalls, setenv, spy_fast_paths

import kldiv_spec

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

from kldiv_spec.backends import _blocks  # noqa: E402
from kldiv_spec.backends import dask as fast  # noqa: E402
from kldiv_spec.backends import numpy as numpy_fast  # noqa: E402

REDUCTIONS = ("none", "sum", "batchmean", "mean")
MIN_ELEMENTS_ENV = "KLDIV_SPEC_NUMPY_MIN_ELEMENTS"
EDGE = np.array([-np.inf, -2.0, -1e-30, -0.0, 0.0, 1e-40, 0.3, 1.0, 2.0, np.inf, np.nan])


def _refuse_to_compute(*args, **kwargs):
    raise AssertionError("kl_div computed a Dask graph")


def edge_grid(dtype) -> tuple[np.ndarray, np.ndarray]:
    x, t = np.meshgrid(EDGE, EDGE, indexing="ij")
    return np.tile(x, (4, 2)).astype(dtype), np.tile(t, (4, 2)).astype(dtype)


def numpy_reference(f, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the 'mean' warning
        with kldiv_spec.use_reference():
            return f(*args, **kwargs)


def lazy(f, *args, **kwargs):
    """Call ``f`` on Dask arrays with a scheduler that fails on any compute."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with dask.config.set(scheduler=_refuse_to_compute):
            return f(*args, **kwargs)


def assert_matches(got, want, rtol: float) -> None:
    """Computed with warnings as errors; then same dtype, shape, NaN pattern and values."""
    assert isinstance(got, da.Array)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = np.asarray(got.compute(scheduler="threads"))
    want = np.asarray(want)
    assert value.dtype == want.dtype and value.shape == want.shape
    np.testing.assert_array_equal(np.isnan(value), np.isnan(want))
    np.testing.assert_allclose(value, want, rtol=rtol, atol=0, equal_nan=True)


@pytest.fixture
def fast_paths(monkeypatch: pytest.MonkeyPatch) -> FastPathCalls:
    """The calls of the Dask fast path's and the NumPy fast path's protocol functions."""
    return spy_fast_paths(monkeypatch, [fast, numpy_fast])


@pytest.fixture(params=[False, True], ids=["reference-chunks", "blocked-chunks"])
def chunk_path(request, monkeypatch: pytest.MonkeyPatch, fast_paths) -> Iterator[None]:
    """Chunks evaluated by the reference, or (tiny threshold) by the NumPy fast path:
    the Dask fast path takes the call either way, and the NumPy one every chunk or none."""
    if request.param:
        monkeypatch.setattr(_blocks, "BLOCK_ELEMENTS", 29)
        setenv(monkeypatch, MIN_ELEMENTS_ENV, "8")
    yield
    assert fast_paths.took("dask.kl_div") and fast_paths.took("dask.kl_div_backward")
    chunks = fast_paths.took("numpy.kl_div") + fast_paths.took("numpy.kl_div_backward")
    assert bool(chunks) == request.param, fast_paths


@pytest.mark.usefixtures("chunk_path")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_edge_values_lazy_and_quiet(dtype, log_target, reduction) -> None:
    x, t = edge_grid(dtype)
    # different, uneven chunks for the two operands
    dx, dt = da.from_array(x, chunks=(13, 9)), da.from_array(t, chunks=(20, 7))
    got = lazy(kldiv_spec.kl_div, dx, dt, reduction=reduction, log_target=log_target)
    want = numpy_reference(kldiv_spec.kl_div, x, t, reduction=reduction, log_target=log_target)
    assert_matches(got, want, rtol=1e-6)

    g = np.full(x.shape, 0.5, dtype) if reduction == "none" else 0.5
    dg = da.from_array(g, chunks=(11, 22)) if reduction == "none" else g
    got_g = lazy(
        kldiv_spec.kl_div_backward, dg, dx, dt, reduction=reduction, log_target=log_target
    )
    want_g = numpy_reference(
        kldiv_spec.kl_div_backward, g, x, t, reduction=reduction, log_target=log_target
    )
    for a, b in zip(got_g, want_g, strict=True):
        assert_matches(a, b, rtol=1e-6)


@pytest.mark.usefixtures("chunk_path")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_broadcasting_and_mixed_dtypes(reduction) -> None:
    rng = np.random.default_rng(0)
    x = np.log(rng.random((12, 1, 6)) + 0.01).astype(np.float32)
    t = rng.random((5, 6))
    dx, dt = da.from_array(x, chunks=(5, 1, 4)), da.from_array(t, chunks=(2, 3))
    got = lazy(kldiv_spec.kl_div, dx, dt, reduction=reduction)
    want = numpy_reference(kldiv_spec.kl_div, x, t, reduction=reduction)
    assert_matches(got, want, rtol=1e-12)
    g = np.ones((12, 5, 6)) if reduction == "none" else 2.0
    dg = da.from_array(g, chunks=4) if reduction == "none" else g
    got_g = lazy(kldiv_spec.kl_div_backward, dg, dx, dt, reduction=reduction)
    want_g = numpy_reference(kldiv_spec.kl_div_backward, g, x, t, reduction=reduction)
    assert got_g[0].shape == x.shape and got_g[1].shape == t.shape
    for a, b in zip(got_g, want_g, strict=True):
        assert_matches(a, b, rtol=1e-6)


def test_the_fast_path_takes_the_call_and_builds_a_graph(fast_paths) -> None:
    dx = da.zeros((10, 4), chunks=3)
    dt = da.full((10, 4), 0.25, chunks=3)
    out = lazy(kldiv_spec.kl_div, dx, dt, reduction="sum")
    assert fast_paths.took("dask.kl_div") == 1
    assert isinstance(out, da.Array) and out.shape == ()
    np.testing.assert_allclose(out.compute(), 40 * 0.25 * np.log(0.25))


@pytest.mark.parametrize("shape", [(), (0, 3)], ids=["0-d", "empty"])
def test_zero_d_and_empty_are_left_to_the_reference(shape, fast_paths) -> None:
    dx, dt = da.zeros(shape), da.ones(shape)
    out = lazy(kldiv_spec.kl_div, dx, dt, reduction="sum")
    grads = lazy(kldiv_spec.kl_div_backward, da.asarray(1.0), dx, dt, reduction="sum")
    assert fast_paths.declined.count("dask.kl_div") == 1
    assert fast_paths.declined.count("dask.kl_div_backward") == 1
    assert not fast_paths.taken
    assert float(out.compute()) == 0.0
    assert [g.shape for g in grads] == [shape, shape]


# --- on a dask.distributed cluster -------------------------------------------------------
#
# One LocalCluster for the module (starting one costs seconds): two worker processes of
# one thread each, bounded memory, and KLDIV_SPEC_NUMPY_MIN_ELEMENTS=0 in the workers so
# that every NumPy chunk, however small, takes the NumPy fast path (blocked kernels, and
# the fused pass for float32 sums) rather than the reference.


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """A client of a two-process LocalCluster, closed (with the cluster) after the module."""
    distributed = pytest.importorskip(
        "distributed", reason="dask.distributed is not installed (pip install distributed)"
    )
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            memory_limit="1GiB",
            dashboard_address=":0",  # a free port: 8787 may be taken
            env={MIN_ELEMENTS_ENV: "0"},
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as c,
    ):
        workers = c.run(os.getenv, MIN_ELEMENTS_ENV)  # in the workers
        assert len(workers) == 2 and set(workers.values()) == {"0"}, workers
        yield c


def on_cluster(client: Any, *lazy_results: Any) -> list[np.ndarray]:
    """Compute the lazy results together on the cluster, as NumPy arrays."""
    futures = client.compute(list(lazy_results))
    return [np.asarray(f.result(timeout=120)) for f in futures]


def edge_problem(dtype: Any, log_target: bool) -> tuple[np.ndarray, np.ndarray]:
    """A 96 x 88 problem: the edge grid tiled in, amid regular log-probabilities."""
    rng = np.random.default_rng(4)
    x = np.log(rng.dirichlet(np.ones(88), size=96))
    t = rng.dirichlet(np.ones(88), size=96)
    if log_target:
        t = np.log(t)
    else:
        t[::5, ::7] = 0  # 0 log 0 = 0
    ex, et = edge_grid(np.float64)  # 44 x 22
    x[20:64, 30:52], t[20:64, 30:52] = ex, et
    return x.astype(dtype), t.astype(dtype)


@pytest.mark.slow  # the module's cluster: about 5 s to start
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("log_target", [False, True])
def test_every_reduction_and_the_backward_on_a_cluster(client, dtype, log_target) -> None:
    """Loss (every reduction) and both gradients, computed by worker processes on different,
    uneven chunks of the two operands: equal to the NumPy reference; elementwise results
    bit for bit (the blocked kernels are the reference's operations)."""
    x, t = edge_problem(dtype, log_target)
    dx, dt = da.from_array(x, chunks=(40, 30)), da.from_array(t, chunks=(25, 88))
    kw = {"log_target": log_target}
    losses = [lazy(kldiv_spec.kl_div, dx, dt, reduction=r, **kw) for r in REDUCTIONS]
    g_none = np.full(x.shape, 0.5, dtype)
    grads = [
        lazy(
            kldiv_spec.kl_div_backward,
            da.from_array(g_none, chunks=32) if r == "none" else 0.5,
            dx,
            dt,
            reduction=r,
            **kw,
        )
        for r in REDUCTIONS
    ]
    computed = on_cluster(client, *losses, *(g for pair in grads for g in pair))
    for r, got in zip(REDUCTIONS, computed[:4], strict=True):
        want = np.asarray(numpy_reference(kldiv_spec.kl_div, x, t, reduction=r, **kw))
        assert got.dtype == want.dtype and got.shape == want.shape, r
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        if r == "none":
            np.testing.assert_array_equal(got, want)
        else:  # NaN here (the edge grid), so also on the finite part alone:
            np.testing.assert_allclose(got, want, rtol=1e-6, equal_nan=True)
    finite = (slice(0, 20), slice(None))  # rows without edge values
    sums = on_cluster(
        client,
        *(
            lazy(kldiv_spec.kl_div, dx[finite], dt[finite], reduction=r, **kw)
            for r in REDUCTIONS[1:]
        ),
    )
    for r, got in zip(REDUCTIONS[1:], sums, strict=True):
        want = numpy_reference(kldiv_spec.kl_div, x[finite], t[finite], reduction=r, **kw)
        assert np.isfinite(got) and got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-13)
    for i, r in enumerate(REDUCTIONS):
        g = g_none if r == "none" else 0.5
        want_pair = numpy_reference(kldiv_spec.kl_div_backward, g, x, t, reduction=r, **kw)
        for got, want in zip(computed[4 + 2 * i : 6 + 2 * i], want_pair, strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_broadcasting_and_mixed_dtypes_on_a_cluster(client, reduction) -> None:
    """A float32 (12, 1, 6) input against a float64 (5, 6) target: float64 results of the
    broadcast shape, and each gradient summed back to its operand's shape and dtype."""
    rng = np.random.default_rng(0)
    x = np.log(rng.random((12, 1, 6)) + 0.01).astype(np.float32)
    t = rng.random((5, 6))
    dx, dt = da.from_array(x, chunks=(5, 1, 4)), da.from_array(t, chunks=(2, 3))
    g = np.ones((12, 5, 6)) if reduction == "none" else 2.0
    dg = da.from_array(g, chunks=4) if reduction == "none" else g
    loss = lazy(kldiv_spec.kl_div, dx, dt, reduction=reduction)
    grad_x, grad_t = lazy(kldiv_spec.kl_div_backward, dg, dx, dt, reduction=reduction)
    got, got_x, got_t = on_cluster(client, loss, grad_x, grad_t)
    want = numpy_reference(kldiv_spec.kl_div, x, t, reduction=reduction)
    want_x, want_t = numpy_reference(kldiv_spec.kl_div_backward, g, x, t, reduction=reduction)
    assert got.dtype == np.float64 and got.shape == np.shape(want)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert (got_x.dtype, got_x.shape, got_t.dtype, got_t.shape) == (
        np.float32,
        x.shape,
        np.float64,
        t.shape,
    )
    np.testing.assert_allclose(got_x, want_x, rtol=1e-6)
    np.testing.assert_allclose(got_t, want_t, rtol=1e-12)


@pytest.mark.slow
def test_float32_chunks_on_a_distributed_cluster(client) -> None:
    """Regression: chunks deserialised in a dask.distributed worker process may start at
    any byte (seen at offsets 61 and 63), and an unaligned float32 chunk of >= 65,536
    elements made the NumPy fast path's fused sum raise "t must be a C-contiguous
    float32 buffer". Two worker processes, 512 x 512 chunks (each takes the fused pass)."""
    rng = np.random.default_rng(8)
    x = np.log(rng.dirichlet(np.ones(512), size=2048)).astype(np.float32)
    t = rng.dirichlet(np.ones(512), size=2048).astype(np.float32)
    t[::7, ::3] = 0  # zero targets: 0 log 0 = 0
    dx, dt = da.from_array(x, chunks=512), da.from_array(t, chunks=512)
    losses = {r: kldiv_spec.kl_div(dx, dt, reduction=r) for r in ("sum", "batchmean")}
    grads = kldiv_spec.kl_div_backward(0.5, dx, dt, reduction="batchmean")
    computed = on_cluster(client, *losses.values(), *grads)
    for (reduction, lazy_loss), got in zip(losses.items(), computed, strict=False):
        # the same graph on the local scheduler: the same chunk sums in the same order
        assert got == np.asarray(lazy_loss.compute(scheduler="sync"))
        want = kldiv_spec.kl_div(x, t, reduction=reduction)
        assert got.dtype == want.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5)
    for got, want in zip(
        computed[2:], kldiv_spec.kl_div_backward(0.5, x, t, reduction="batchmean"), strict=True
    ):
        np.testing.assert_array_equal(got, want)  # elementwise: the same operations
