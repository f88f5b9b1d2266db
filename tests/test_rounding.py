"""The one rounding rule of the reductions, on every backend and route.

``'mean'`` and ``'batchmean'`` are the sum :math:`S`, rounded to the result
dtype, divided by the integer :math:`D` and rounded once more
(:func:`kldiv_spec._core.divide_total`; docs/spec.md, "Reductions"). So the
reduced value must equal, bit for bit, the ``'sum'`` the same route returns,
divided by :math:`D` with one rounding; half precision divides in float32, as
PyTorch does, so :math:`D > 65504` does not overflow float16.
"""

from __future__ import annotations

import numpy as np
import pytest
from _support import kl_div, to_numpy

# The fast_path runs fail unless a fast path took a call (conftest.py).
pytestmark = pytest.mark.checks_fast_path

# (rows, columns): a batch of odd size, large enough for every fast path's threshold.
SHAPES = [(7, 10_007), (1_001, 71)]


def _divided_once(total: np.ndarray, d: int) -> np.ndarray:
    """``fl(total / d)``: exact in float64 for these operands, then one rounding."""
    dtype = total.dtype
    return np.asarray(np.float64(total) / d).astype(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mean_and_batchmean_are_the_rounded_sum_divided_once(xp, evaluation, shape, dtype):
    rng = np.random.default_rng(sum(shape))
    x = np.log(rng.dirichlet(np.ones(shape[1]), size=shape[0])).astype(dtype)
    t = rng.dirichlet(np.ones(shape[1]) * 0.5, size=shape[0]).astype(dtype)
    xs, ts = xp.asarray(x), xp.asarray(t)
    total = to_numpy(kl_div(xs, ts, reduction="sum"))
    assert total.dtype == np.dtype(dtype)
    for reduction, d in (("batchmean", shape[0]), ("mean", shape[0] * shape[1])):
        got = to_numpy(kl_div(xs, ts, reduction=reduction))
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, _divided_once(total, d), strict=True)


def test_float16_mean_over_more_elements_than_float16_can_count(backend, xp, evaluation):
    """``D = 70000`` overflows float16: dividing in float16 would give 0 (or NaN)."""
    if not hasattr(xp, "float16"):
        pytest.skip("this library has no float16")
    if evaluation == "fast_path" and backend.spec.name == "jax":
        # NumPy's, Dask's and PyTorch's (CPU) fast paths take float16; JAX's does not.
        pytest.skip("no fast path applies: the jax fast path declines float16")
    x = xp.asarray(np.full(70_000, -1.0, np.float16))
    t = xp.asarray(np.full(70_000, 0.5, np.float16))
    total = to_numpy(kl_div(x, t, reduction="sum"))
    got = to_numpy(kl_div(x, t, reduction="mean"))
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, np.float16(np.float32(total) / np.float32(70_000)))
    assert 0.15 < float(got) < 0.16


def test_a_total_that_rounds_differently_from_its_quotient(xp, evaluation):
    """A float64-accumulated total whose quotient rounds apart from the rounded total's.

    With ``log_target=True`` and ``t = 0`` the pointwise loss is ``-x``: the loss is
    ``a`` at the start and ``delta`` (3/8 of an ulp of ``a``) a million elements later,
    in another block of every blocked path. ``fl(a + delta) = a``, but ``a + delta``
    divided by 3 (or by the 2,100,003 elements) rounds to another float32 than ``a``
    divided by it: a path that divides its float64 total before rounding it fails.
    """
    rows, cols = 3, 700_001
    a = np.nextafter(np.nextafter(np.float32(1), np.float32(2)), np.float32(2))
    delta = np.float32(float(np.spacing(a)) * 3 / 8)
    x = np.zeros((rows, cols), np.float32)
    x[0, 0], x[2, 0] = -a, -delta
    for d in (rows, rows * cols):  # the case tells the two orders apart
        assert np.float32((float(a) + float(delta)) / d) != np.float32(float(a) / d)
    xs, ts = xp.asarray(x), xp.asarray(np.zeros_like(x))
    results = {
        r: kl_div(xs, ts, reduction=r, log_target=True) for r in ("sum", "batchmean", "mean")
    }
    total = to_numpy(results["sum"])
    assert total == a  # a + delta, rounded to float32
    for reduction, d in (("batchmean", rows), ("mean", rows * cols)):
        np.testing.assert_array_equal(
            to_numpy(results[reduction]), _divided_once(total, d), strict=True
        )
