"""Lazy backends: JAX under ``jax.jit`` and Dask, which must stay lazy.

Dask calls run under a scheduler that fails on any compute, so these tests prove
that ``kl_div`` and ``kl_div_backward`` only build a graph; the values are then
computed and compared with NumPy's.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
from _support import CONFIGURATIONS

import kldiv_spec
from kldiv_spec import REDUCTIONS

# The fast_path runs fail unless a fast path took a call (conftest.py).
pytestmark = pytest.mark.checks_fast_path


def kl_div(x: Any, t: Any, **options: Any) -> Any:
    """``kldiv_spec.kl_div`` with the ``'mean'`` UserWarning silenced (test_api checks it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="reduction: 'mean'", category=UserWarning)
        return kldiv_spec.kl_div(x, t, **options)


def edge_operands() -> tuple[np.ndarray, np.ndarray]:
    inf, nan = math.inf, math.nan
    xs = np.asarray([-inf, -30.0, -1.0, -0.0, 0.0, 0.5, 2.0, inf, nan])
    ts = np.asarray([-inf, -1000.0, -1.0, 0.0, 1e-300, 0.25, 1.0, 2.5, 710.0, inf, nan])
    x, t = np.meshgrid(xs, ts, indexing="ij")
    return x, t


def numpy_reference(x: np.ndarray, t: np.ndarray, **options: Any) -> Any:
    with kldiv_spec.use_reference():
        return kl_div(x, t, **options)


# --------------------------------------------------------------------------- JAX


@pytest.fixture
def jnp() -> Any:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    return jax.numpy


def test_jax_jit_gives_the_eager_values(jnp, evaluation):
    import jax

    x, t = edge_operands()
    xa, ta = jnp.asarray(x), jnp.asarray(t)
    for reduction, log_target in CONFIGURATIONS:
        options = {"reduction": reduction, "log_target": log_target}
        eager = kl_div(xa, ta, **options)
        jitted = jax.jit(lambda a, b, options=options: kl_div(a, b, **options))(xa, ta)
        # XLA may fuse differently under jit: the same values to a few ulps, same NaN/inf.
        np.testing.assert_allclose(
            np.asarray(jitted), np.asarray(eager), rtol=1e-14, err_msg=reduction
        )
        assert jitted.dtype == eager.dtype
        assert jitted.shape == eager.shape
        expected = numpy_reference(x, t, **options)
        np.testing.assert_allclose(
            np.asarray(jitted), expected, rtol=1e-13, err_msg=f"{reduction=}, {log_target=}"
        )


# A broadcast target (2,) is declined by JAX's fast path, so that case runs through the
# reference only; a target of the input's shape is taken by it, and runs both ways.
@pytest.mark.parametrize(
    ("broadcast", "evaluation"),
    [(False, "fast_path"), (False, "reference"), (True, "reference")],
    indirect=["evaluation"],
    ids=["same_shape-fast_path", "same_shape-reference", "broadcast-reference"],
)
def test_jax_jit_backward_gives_the_eager_gradients(jnp, evaluation, broadcast):
    import jax

    x = np.log(np.asarray([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]))
    xa = jnp.asarray(x)
    for reduction, log_target in CONFIGURATIONS:
        t = np.asarray([0.0, 1.0]) if broadcast else np.asarray([[0.0, 1.0]] * 3)
        ta = jnp.asarray(np.log(t + 0.5) if log_target else t)
        g = jnp.ones((3, 2)) if reduction == "none" else jnp.asarray(1.0)

        def backward(g: Any, a: Any, b: Any, options: Any = (reduction, log_target)) -> Any:
            return kldiv_spec.kl_div_backward(g, a, b, reduction=options[0], log_target=options[1])

        eager = backward(g, xa, ta)
        jitted = jax.jit(backward)(g, xa, ta)
        for got, want in zip(jitted, eager, strict=True):
            np.testing.assert_allclose(
                np.asarray(got), np.asarray(want), rtol=1e-14, err_msg=reduction
            )
            assert got.shape == want.shape


def test_jax_jit_of_a_call_to_kldivloss(jnp, evaluation):
    import jax

    loss = kldiv_spec.KLDivLoss(reduction="batchmean")
    x = jnp.log(jnp.asarray([[0.2, 0.8], [0.6, 0.4]]))
    t = jnp.asarray([[0.5, 0.5], [0.1, 0.9]])
    jitted = jax.jit(lambda a, b: loss(a, b))(x, t)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(loss(x, t)), rtol=1e-14)


def test_jax_jit_of_kldivloss_itself(jnp):
    import jax

    loss = kldiv_spec.KLDivLoss(reduction="sum")
    x = jnp.log(jnp.asarray([0.2, 0.8]))
    t = jnp.asarray([0.5, 0.5])
    np.testing.assert_allclose(np.asarray(jax.jit(loss)(x, t)), np.asarray(loss(x, t)))


# --------------------------------------------------------------------------- Dask


@pytest.fixture
def da() -> Any:
    return pytest.importorskip("dask.array")


def _refuse_to_compute(*args: Any, **kwargs: Any) -> Any:
    msg = "Dask computed something inside kldiv_spec"
    raise AssertionError(msg)


def no_compute() -> Any:
    """A context in which any Dask compute fails the test."""
    import dask

    return dask.config.set(scheduler=_refuse_to_compute)


def test_the_refusing_scheduler_refuses(da):
    with no_compute(), pytest.raises(AssertionError, match="Dask computed"):
        da.ones(3).sum().compute()


DASK_CASES = [
    ((5, 7), (2, 3), (5, 7), (3, 4)),
    ((5, 7), (2, 3), (7,), (4,)),
    ((5, 1), (2, 1), (1, 7), (1, 3)),
    ((6,), (6,), (6,), (6,)),
    ((), (), (4, 3), (2, 2)),
    ((0, 3), (1, 3), (3,), (2,)),
]


@pytest.mark.parametrize(
    ("x_shape", "x_chunks", "t_shape", "t_chunks", "evaluation"),
    [
        (*case, evaluation)
        for case in DASK_CASES
        for evaluation in ("fast_path", "reference")
        # Dask's fast path declines empty arrays: those run through the reference only.
        if evaluation == "reference" or 0 not in case[0]
    ],
    indirect=["evaluation"],
    ids=str,
)
def test_dask_stays_lazy_and_matches_numpy(da, evaluation, x_shape, x_chunks, t_shape, t_chunks):
    rng = np.random.default_rng(6)
    x = np.log(rng.uniform(0.05, 1.0, size=x_shape))
    xd = da.from_array(x, chunks=x_chunks)
    out_shape = np.broadcast_shapes(x_shape, t_shape)
    # Each reduction once with each log_target value.
    for reduction, log_target in CONFIGURATIONS:
        t = rng.uniform(0.0, 1.0, size=t_shape)
        t = np.log(t) if log_target else t
        td = da.from_array(t, chunks=t_chunks)
        g = np.linspace(-1, 1, math.prod(out_shape)).reshape(out_shape)
        g = g if reduction == "none" else np.asarray(0.5)
        with no_compute():
            out = kl_div(xd, td, reduction=reduction, log_target=log_target)
            gx, gt = kldiv_spec.kl_div_backward(
                da.from_array(g), xd, td, reduction=reduction, log_target=log_target
            )
        for lazy in (out, gx, gt):
            assert isinstance(lazy, da.Array)
        expected = numpy_reference(x, t, reduction=reduction, log_target=log_target)
        with kldiv_spec.use_reference():
            ex, et = kldiv_spec.kl_div_backward(
                g, x, t, reduction=reduction, log_target=log_target
            )
        assert out.shape == np.shape(expected)
        assert gx.shape == x_shape
        assert gt.shape == t_shape
        assert (out.dtype, gx.dtype, gt.dtype) == (np.float64,) * 3
        # Values here; whether computing warns is test_dask_compute_is_silent_*'s job.
        with np.errstate(all="ignore"):
            got, got_x, got_t = (a.compute(scheduler="synchronous") for a in (out, gx, gt))
        np.testing.assert_allclose(
            got, expected, rtol=1e-12, atol=1e-15, err_msg=f"{reduction=}, {log_target=}"
        )
        np.testing.assert_allclose(
            got_x, ex, rtol=1e-12, atol=1e-15, err_msg=f"{reduction=}, {log_target=}"
        )
        np.testing.assert_allclose(
            got_t, et, rtol=1e-12, atol=1e-15, err_msg=f"{reduction=}, {log_target=}"
        )


def test_dask_mixed_dtypes_stay_lazy(da, evaluation):
    x = da.from_array(np.log(np.full((4, 3), 0.25, dtype=np.float32)), chunks=2)
    t = da.from_array(np.full((4, 3), 0.5), chunks=3)
    with no_compute():
        out = kl_div(x, t, reduction="sum")
        gx, gt = kldiv_spec.kl_div_backward(1.0, x, t, reduction="sum")
    assert out.dtype == np.float64
    assert gx.dtype == np.float32
    assert gt.dtype == np.float64
    np.testing.assert_allclose(out.compute(), 12 * 0.5 * (math.log(0.5) - math.log(0.25)))


REFERENCE_WARNS = (
    "the reference on Dask builds a graph of plain NumPy operations, which run (in Dask's "
    "worker threads) outside kldiv_spec's np.errstate, so compute() emits RuntimeWarning; "
    "the Dask fast path wraps each chunk in errstate"
)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_dask_compute_is_silent_on_edge_values(request, da, evaluation, reduction):
    """PyTorch returns NaN/inf without a warning; so must a Dask result when computed.

    Computed with Dask's default (threaded) scheduler, where NumPy's error state
    of the calling thread does not apply; warnings are errors in this suite.
    """
    if evaluation == "reference":
        request.applymarker(
            pytest.mark.xfail(strict=True, raises=RuntimeWarning, reason=REFERENCE_WARNS)
        )
    x, t = edge_operands()
    xd, td = da.from_array(x, chunks=(4, 5)), da.from_array(t, chunks=(4, 5))
    for log_target in (False, True):
        out = kl_div(xd, td, reduction=reduction, log_target=log_target)
        gx, gt = kldiv_spec.kl_div_backward(
            da.ones(out.shape), xd, td, reduction=reduction, log_target=log_target
        )
        got = out.compute()
        expected = numpy_reference(x, t, reduction=reduction, log_target=log_target)
        np.testing.assert_allclose(got, expected, rtol=1e-12)
        gx.compute()
        gt.compute()


@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
def test_dask_empty_mean_computes_silently(da, reduction):
    empty = da.zeros((0, 3), chunks=1)
    out = kl_div(empty, empty, reduction=reduction)
    assert math.isnan(out.compute())


def test_dask_unknown_chunk_sizes_give_a_clear_error(da, evaluation):
    x = da.from_array(np.log(np.asarray([0.5, 0.25, 0.25, 0.5])), chunks=2)
    unknown = x[x > -1.0]  # a data-dependent shape: (nan,)
    known = da.from_array(np.full(4, 0.25), chunks=2)
    assert math.isnan(unknown.shape[0])
    with no_compute():
        for a, b in ((unknown, known), (known, unknown), (unknown, da.asarray(0.5))):
            with pytest.raises(ValueError, match=r"unknown size.*compute_chunk_sizes"):
                kl_div(a, b, reduction="sum")
            with pytest.raises(ValueError, match=r"unknown size.*compute_chunk_sizes"):
                kldiv_spec.kl_div_backward(1.0, a, b, reduction="sum")
    # After compute_chunk_sizes() the same call works.
    sized = unknown.compute_chunk_sizes()
    out = kl_div(sized, da.full(sized.shape, 0.25), reduction="sum")
    assert np.isfinite(out.compute())
