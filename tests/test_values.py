"""Values, NaN/inf patterns, dtypes and shapes of ``kl_div``, against the exact oracle.

Every backend of the ``xp`` fixture is compared with :mod:`kldiv_spec.conformance.oracle`
(PyTorch's ``kl_div`` evaluated exactly on the same numbers, in the same promoted
dtype) through :func:`kldiv_spec.conformance.assertions.assert_loss`: the dtype,
the shape, the NaN and signed-infinity pattern exactly and the finite values
within the oracle's bound, on an edge-value grid (subnormals, +-inf, NaN, -0.0,
targets above 1 and below 0, overflowing ``exp`` and products), on 0-d, empty
and broadcast shapes, and on hypothesis-drawn cases. Each test runs both through
whatever fast path exists and through the reference (:func:`kldiv_spec.use_reference`).
No test here needs PyTorch; the comparisons with PyTorch itself are in
``test_torch_agreement.py``.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import numpy as np
import pytest
from _support import (
    CONFIGURATIONS,
    JAX_SHAPES,
    edge_grid,
    exact,
    few_shapes_on_jax,
    finite_edge_grid,
    kl_div,
    random_operands,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kldiv_spec
from kldiv_spec import REDUCTIONS
from kldiv_spec.conformance import oracle
from kldiv_spec.conformance.assertions import assert_loss, dtype_name, to_numpy

# The fast_path runs fail unless a fast path took a call (conftest.py).
pytestmark = pytest.mark.checks_fast_path


def reference_only_on(backend: Any, evaluation: str, names: tuple[str, ...], why: str) -> None:
    """Skip the ``fast_path`` run where these libraries' fast paths decline the inputs by design.

    That run would only repeat the reference; the ``reference`` run (and the other
    libraries' ``fast_path`` runs, whose fast paths do take the inputs) still check them.
    """
    if evaluation == "fast_path" and backend.spec.name in names:
        pytest.skip(f"no fast path applies: the {backend.spec.name} fast path declines {why}")


# --------------------------------------------------------------------------- edge grid


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_edge_grid_pointwise(xp, evaluation, dtype, log_target):
    x, t = edge_grid(np.finfo(dtype))
    out = kl_div(
        xp.asarray(x, dtype=getattr(xp, dtype)),
        xp.asarray(t, dtype=getattr(xp, dtype)),
        reduction="none",
        log_target=log_target,
    )
    want = exact(xp, x, t, log_target=log_target, dtype=dtype)
    if array_api_compat.is_jax_namespace(xp) and evaluation == "fast_path":
        # Documented deviation (docs/backends.md): where t*x overflows, XLA's
        # compiled code can give -inf where eager evaluation and PyTorch give
        # NaN (inf - inf). Any non-finite value is accepted in exactly those cells.
        with np.errstate(all="ignore"):
            overflow = (
                np.isinf(t.astype(dtype) * x.astype(dtype)) & np.isfinite(x) & np.isfinite(t)
            )
        got = to_numpy(out)
        accept = overflow & ~np.isfinite(got) & np.isnan(want.value)
        want.value = np.where(accept, got, want.value)
    # The specification (the reference) also gets the sign of zero right.
    assert_loss(out, want, "none", dtype=dtype, signed_zeros=evaluation == "reference")


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_edge_grid_reduced(xp, evaluation, dtype, log_target):
    cast = getattr(xp, dtype)
    finfo = np.finfo(dtype)
    # NaN and inf propagate into every reduction as in PyTorch; where everything
    # is finite, the reduced values agree within the oracle's bound.
    for x, t in (edge_grid(finfo), tuple(a.reshape(7, 7) for a in finite_edge_grid(finfo))):
        want = exact(xp, x, t, log_target=log_target, dtype=dtype)
        for reduction in ("batchmean", "sum", "mean"):
            out = kl_div(
                xp.asarray(x, dtype=cast),
                xp.asarray(t, dtype=cast),
                reduction=reduction,
                log_target=log_target,
            )
            assert_loss(out, want, reduction, x.shape, dtype=dtype)


def test_edge_grid_has_the_documented_values(xp):
    """A few entries of the edge table spelled out, so the oracle itself is pinned."""
    inf, nan = math.inf, math.nan
    x = xp.asarray([1.0, -inf, inf, nan, -inf, 0.5, 3.0], dtype=xp.float64)
    t = xp.asarray([0.0, 0.0, 0.0, 0.0, 0.5, -1.0, 2.0], dtype=xp.float64)
    got = to_numpy(kl_div(x, t, reduction="none", log_target=False))
    expected = [0.0, nan, nan, nan, inf, nan, 2.0 * math.log(2.0) - 6.0]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(
        oracle.pointwise(to_numpy(x), to_numpy(t), log_target=False).as_float(),
        expected,
        rtol=1e-15,
    )
    lt = xp.asarray([-inf, inf, -1000.0], dtype=xp.float64)
    got = to_numpy(kl_div(xp.zeros(3, dtype=xp.float64), lt, reduction="none", log_target=True))
    np.testing.assert_array_equal(np.isnan(got), [True, False, False])
    assert got[1] == inf
    assert got[2] == 0.0


# --------------------------------------------------------------------------- shapes

SHAPES = [
    ((), ()),
    ((3,), ()),
    ((), (3,)),
    ((0,), (0,)),
    ((0, 3), (0, 3)),
    ((3, 0), (3, 0)),
    ((0,), ()),
    ((), (0,)),
    ((2, 0), (1,)),
    ((2, 3), (2, 3)),
    ((2, 3), (3,)),
    ((3,), (2, 3)),
    ((4, 1), (1, 3)),
    ((1, 3), (4, 3)),
    ((4, 3), (1, 3)),
    ((2, 1, 3), (4, 1)),
    ((1,), (5,)),
    ((5,), (1,)),
]


def test_shapes_and_broadcasting(xp, evaluation):
    shapes = few_shapes_on_jax(xp, SHAPES)
    if array_api_compat.is_jax_namespace(xp):
        # JAX's few shapes all broadcast, which its fast path declines: one pair of
        # equal shapes lets its fast path take calls too.
        shapes = [*shapes, ((2, 3), (2, 3))]
    for x_shape, t_shape in shapes:
        for reduction, log_target in CONFIGURATIONS:
            x, t = random_operands(x_shape, t_shape, log_target=log_target)
            out = kl_div(xp.asarray(x), xp.asarray(t), reduction=reduction, log_target=log_target)
            # 'none' has the broadcast shape, the reductions are 0-d (assert_loss checks both)
            assert_loss(
                out,
                exact(xp, x, t, log_target=log_target),
                reduction,
                x_shape,
                dtype="float64",
                what=f"shapes {x_shape}, {t_shape}, {reduction=}, {log_target=}",
            )


# The last case broadcasts nothing: the PyTorch and JAX fast paths, which decline
# broadcasting, take that one.
BATCHMEAN_CASES = [
    ((3,), (2, 3), 3),
    ((1, 3), (4, 3), 1),
    ((4, 3), (3,), 4),
    ((2, 1), (2, 5), 2),
    ((4, 3), (4, 3), 4),
]


def test_batchmean_divides_by_the_inputs_first_dimension(xp, evaluation):
    for x_shape, t_shape, divisor in BATCHMEAN_CASES:
        x, t = random_operands(x_shape, t_shape, log_target=False, seed=1)
        total = kl_div(xp.asarray(x), xp.asarray(t), reduction="sum", log_target=False)
        out = kl_div(xp.asarray(x), xp.asarray(t), reduction="batchmean", log_target=False)
        np.testing.assert_allclose(to_numpy(out), to_numpy(total) / divisor, rtol=1e-13)
        # As in PyTorch, the divisor is input.shape[0], not the output's first dimension.
        assert oracle.divisor("batchmean", x_shape, np.broadcast_shapes(x_shape, t_shape)) == (
            divisor
        )
        assert_loss(out, exact(xp, x, t, log_target=False), "batchmean", x_shape, dtype="float64")


EMPTY_CASES = [
    ((0,), "sum", 0.0),
    ((0,), "none", None),
    ((0,), "mean", math.nan),
    ((0,), "batchmean", math.nan),
    ((0, 3), "batchmean", math.nan),
    ((3, 0), "batchmean", 0.0),
    ((3, 0), "mean", math.nan),
    ((3, 0), "sum", 0.0),
]


def test_empty_reductions(backend, xp, evaluation):
    reference_only_on(backend, evaluation, ("numpy", "torch", "dask"), "empty arrays")
    for shape, reduction, expected in EMPTY_CASES:
        zeros = xp.zeros(shape, dtype=xp.float64)
        out = kl_div(zeros, zeros, reduction=reduction, log_target=False)
        if expected is None:
            assert tuple(out.shape) == shape
        else:
            assert out.shape == ()
            np.testing.assert_array_equal(to_numpy(out), expected, err_msg=str(shape))
        z = np.zeros(shape)
        assert_loss(out, exact(xp, z, z, log_target=False), reduction, shape, dtype="float64")


def test_zero_d_batchmean_is_the_sum(backend, xp, evaluation):
    reference_only_on(backend, evaluation, ("numpy", "torch", "dask"), "0-d operands")
    x, t = xp.asarray(-0.5, dtype=xp.float64), xp.asarray(0.25, dtype=xp.float64)
    want = exact(xp, np.asarray(-0.5), np.asarray(0.25), log_target=False)
    for reduction in REDUCTIONS:
        out = kl_div(x, t, reduction=reduction, log_target=False)
        assert out.shape == ()
        np.testing.assert_allclose(to_numpy(out), 0.25 * math.log(0.25) + 0.125, rtol=1e-14)
        assert_loss(out, want, reduction, (), dtype="float64")


# --------------------------------------------------------------------------- dtypes


DTYPE_PAIRS = [
    ("float32", "float32"),
    ("float64", "float64"),
    ("float32", "float64"),
    ("float64", "float32"),
]


def test_dtype_promotion_follows_the_array_api(xp, evaluation):
    x, t = random_operands((2, 3), (2, 3), log_target=False, seed=2)
    for x_dtype, t_dtype in DTYPE_PAIRS:
        xa = xp.asarray(x, dtype=getattr(xp, x_dtype))
        ta = xp.asarray(t, dtype=getattr(xp, t_dtype))
        expected_dtype = "float64" if "float64" in (x_dtype, t_dtype) else "float32"
        # The oracle sees the same (already rounded) values, promoted the same way.
        want = oracle.pointwise(x.astype(x_dtype), t.astype(t_dtype), log_target=False)
        assert want.dtype == np.dtype(expected_dtype)
        for reduction in REDUCTIONS:
            out = kl_div(xa, ta, reduction=reduction, log_target=False)
            assert out.dtype == xp.result_type(xa.dtype, ta.dtype)
            assert_loss(out, want, reduction, x.shape, dtype=expected_dtype)


def test_zero_d_operand_promotes_per_the_array_api(backend, xp, evaluation):
    reference_only_on(
        backend, evaluation, ("torch", "jax"), "broadcasting and mixed dtypes (0-d float64)"
    )
    x = xp.log(xp.asarray([0.25, 0.75], dtype=xp.float32))
    t = xp.asarray(0.5, dtype=xp.float64)
    for a, b in ((x, t), (t, x)):
        out = kl_div(a, b, reduction="sum", log_target=False)
        assert dtype_name(out.dtype) == "float64"
        want = oracle.pointwise(
            np.asarray(to_numpy(a), dtype=np.dtype(dtype_name(a.dtype))),
            np.asarray(to_numpy(b), dtype=np.dtype(dtype_name(b.dtype))),
            log_target=False,
        )
        assert_loss(out, want, "sum", tuple(a.shape), dtype="float64")


# --------------------------------------------------------------------------- randomised


@st.composite
def cases(draw: st.DrawFn, jax: bool = False) -> dict[str, Any]:
    if jax:
        x_shape, t_shape = draw(st.sampled_from(JAX_SHAPES))
        shapes = hnp.BroadcastableShapes(
            input_shapes=(x_shape, t_shape), result_shape=np.broadcast_shapes(x_shape, t_shape)
        )
    else:
        shapes = draw(
            hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=4)
        )
    x_shape, t_shape = shapes.input_shapes
    dtype = draw(st.sampled_from(["float32", "float64"]))
    width = 32 if dtype == "float32" else 64
    log_target = draw(st.booleans())
    x = draw(hnp.arrays(np.float64, x_shape, elements=st.floats(-30, 5, width=width)))
    if log_target:
        t_elements = st.floats(-30, 3, width=width)
    else:
        t_elements = st.one_of(st.just(0.0), st.floats(0, 3, width=width))
    t = draw(hnp.arrays(np.float64, t_shape, elements=t_elements))
    return {
        "x": x,
        "t": t,
        "dtype": dtype,
        "log_target": log_target,
        "reduction": draw(st.sampled_from(REDUCTIONS)),
        "reference": draw(st.booleans()),
    }


@settings(max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_cases_match_the_oracle(xp, data):
    case = data.draw(cases(jax=array_api_compat.is_jax_namespace(xp)), label="case")
    dtype, reduction, log_target = case["dtype"], case["reduction"], case["log_target"]
    x, t = case["x"], case["t"]
    cast = getattr(xp, dtype)
    with kldiv_spec.use_reference(case["reference"]):
        out = kl_div(
            xp.asarray(x, dtype=cast),
            xp.asarray(t, dtype=cast),
            reduction=reduction,
            log_target=log_target,
        )
    want = exact(xp, x, t, log_target=log_target, dtype=dtype)
    assert_loss(out, want, reduction, x.shape, dtype=dtype)
