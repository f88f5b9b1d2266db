"""Gradients: ``kl_div_backward`` and autograd through ``kldiv_spec`` against the exact oracle.

On every backend of the ``xp`` fixture the gradients are compared with
:func:`kldiv_spec.conformance.oracle.gradients` (PyTorch's derivatives of its
composite, NaN target gradient where ``t <= 0``, each summed back to its
argument's shape) through :func:`kldiv_spec.conformance.assertions.assert_gradients`:
dtype, shape, NaN and signed-infinity pattern exactly, finite values within the
oracle's bound. Also: ``jax.grad`` (eager and under ``jax.jit``) and central
finite differences on NumPy. No test here needs PyTorch; ``gradcheck``,
``gradgradcheck`` and the comparisons with PyTorch's autograd are in
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
    as_computed,
    few_shapes_on_jax,
    flushes_subnormals,
    gradient_edge_grid,
    kl_div,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kldiv_spec
from kldiv_spec import REDUCTIONS
from kldiv_spec.conformance import oracle
from kldiv_spec.conformance.assertions import assert_gradients, dtype_name, to_numpy

# The fast_path runs fail unless a fast path took a call (conftest.py).
pytestmark = pytest.mark.checks_fast_path


def reference_only_on(backend: Any, evaluation: str, names: tuple[str, ...], why: str) -> None:
    """Skip the ``fast_path`` run where these libraries' fast paths decline the inputs by design.

    That run would only repeat the reference; the ``reference`` run (and the other
    libraries' ``fast_path`` runs, whose fast paths do take the inputs) still check them.
    """
    if evaluation == "fast_path" and backend.spec.name in names:
        pytest.skip(f"no fast path applies: the {backend.spec.name} fast path declines {why}")


def exact_gradients(
    xp: Any,
    g: Any,
    x: np.ndarray,
    t: np.ndarray,
    *,
    reduction: str,
    log_target: bool,
    dtype: str = "float64",
) -> Any:
    """The oracle's gradients at ``x``, ``t`` rounded to ``dtype``, as ``xp`` computes them."""
    xc, tc = (as_computed(xp, np.asarray(a, dtype=np.float64), dtype) for a in (x, t))
    return oracle.gradients(
        g,
        xc.astype(dtype),
        tc.astype(dtype),
        reduction=reduction,
        log_target=log_target,
        flush=flushes_subnormals(xp, dtype),
    )


# --------------------------------------------------------------------------- edge grid


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_edge_grid_gradients_match_the_oracle(xp, evaluation, dtype):
    x, t = gradient_edge_grid(np.finfo(dtype))
    cast = getattr(xp, dtype)
    xa, ta = xp.asarray(x, dtype=cast), xp.asarray(t, dtype=cast)
    g_none = np.linspace(-1.0, 2.0, x.size)
    for log_target in (False, True):
        for reduction in REDUCTIONS:
            g = g_none if reduction == "none" else np.asarray(0.75)
            got = kldiv_spec.kl_div_backward(
                xp.asarray(g, dtype=cast), xa, ta, reduction=reduction, log_target=log_target
            )
            want = exact_gradients(
                xp, g.astype(dtype), x, t, reduction=reduction, log_target=log_target, dtype=dtype
            )
            assert_gradients(got, want, dtypes=(dtype, dtype), what=f"{reduction=}, {log_target=}")


def test_log_target_gradient_where_exp_overflows(xp, evaluation):
    big = np.finfo(np.float64).max / 4
    x = np.asarray([big, big, math.inf, math.inf])
    t = np.asarray([710.0, big, 710.0, big])
    got = kldiv_spec.kl_div_backward(
        1.0, xp.asarray(x), xp.asarray(t), reduction="sum", log_target=True
    )
    want = exact_gradients(xp, 1.0, x, t, reduction="sum", log_target=True)
    # PyTorch's product rule g (t - x) e^t + g e^t is inf - inf (or 0 * inf) here.
    assert np.isnan(want[1][0]).all()
    assert_gradients(got, want, dtypes=("float64", "float64"), which=(1,))


def test_target_gradient_edge_values(xp, evaluation):
    """The documented target gradients: NaN where t is 0, negative, +inf or NaN."""
    x = xp.zeros(6, dtype=xp.float64)
    t = xp.asarray([0.0, -0.0, -1.0, math.inf, math.nan, 1.0], dtype=xp.float64)
    gx, gt = kldiv_spec.kl_div_backward(1.0, x, t, reduction="sum")
    got_t = to_numpy(gt)
    np.testing.assert_array_equal(np.isnan(got_t), [True] * 5 + [False])
    assert got_t[5] == 1.0
    got_x = to_numpy(gx)
    np.testing.assert_array_equal(got_x[[0, 1, 2, 3, 5]], [-0.0, 0.0, 1.0, -math.inf, -1.0])
    assert np.signbit(got_x[0])
    want = exact_gradients(xp, 1.0, to_numpy(x), to_numpy(t), reduction="sum", log_target=False)
    assert_gradients((gx, gt), want, dtypes=("float64", "float64"))


# --------------------------------------------------------------------------- broadcasting, dtypes

BROADCAST = [
    ((3,), ()),
    ((), (3,)),
    ((3,), (2, 3)),
    ((4, 1), (1, 3)),
    ((1, 3), (4, 3)),
    ((2, 1, 3), (4, 1)),
    ((2, 0), (1,)),
]


def test_broadcast_gradients_are_summed_back(backend, xp, evaluation):
    reference_only_on(backend, evaluation, ("numpy", "torch", "jax"), "broadcasting in a backward")
    rng = np.random.default_rng(3)
    for x_shape, t_shape in few_shapes_on_jax(xp, BROADCAST):
        x = np.log(rng.uniform(0.05, 1.0, size=x_shape))
        t = rng.uniform(0.05, 1.0, size=t_shape)
        out_shape = np.broadcast_shapes(x_shape, t_shape)
        for reduction, log_target in CONFIGURATIONS:
            tv = np.log(t) if log_target else t
            g = rng.uniform(-1, 1, size=out_shape) if reduction == "none" else 1.5
            got = kldiv_spec.kl_div_backward(
                xp.asarray(np.asarray(g)),
                xp.asarray(x),
                xp.asarray(tv),
                reduction=reduction,
                log_target=log_target,
            )
            # assert_gradients checks each gradient has its own argument's shape
            assert_gradients(
                got,
                exact_gradients(xp, g, x, tv, reduction=reduction, log_target=log_target),
                dtypes=("float64", "float64"),
                what=f"{x_shape}, {t_shape}, {reduction=}, {log_target=}",
            )


def test_each_gradient_has_its_own_arguments_dtype(backend, xp, evaluation):
    reference_only_on(backend, evaluation, ("numpy", "torch", "jax"), "mixed dtypes in a backward")
    x = xp.log(xp.asarray([[0.25, 0.75], [0.5, 0.5]], dtype=xp.float32))
    t = xp.asarray([[0.5, 0.5], [0.1, 0.9]], dtype=xp.float64)
    for a, b in ((x, t), (t, x)):
        for reduction in REDUCTIONS:
            g = xp.ones((2, 2), dtype=xp.float64) if reduction == "none" else 1.0
            got = kldiv_spec.kl_div_backward(g, a, b, reduction=reduction)
            assert got[0].dtype == a.dtype
            assert got[1].dtype == b.dtype
            # The oracle's float64 gradients, each rounded to its own argument's
            # dtype: its bound grows by half an ULP of that dtype.
            an, bn = (np.asarray(to_numpy(v), dtype=np.dtype(dtype_name(v.dtype))) for v in (a, b))
            want = oracle.gradients(
                np.ones((2, 2)) if reduction == "none" else 1.0,
                an,
                bn,
                reduction=reduction,
                log_target=False,
            )
            rounded = tuple(
                (value, tol + np.spacing(np.abs(value).astype(arg.dtype)) / 2)
                for (value, tol), arg in zip(want, (an, bn), strict=True)
            )
            assert_gradients(got, rounded, dtypes=(an.dtype, bn.dtype), what=reduction)


def test_float32_grad_output_with_float64_operands(xp, evaluation):
    x = xp.log(xp.asarray([0.25, 0.75], dtype=xp.float64))
    t = xp.asarray([0.5, 0.5], dtype=xp.float64)
    got = kldiv_spec.kl_div_backward(xp.asarray(2.0, dtype=xp.float32), x, t, reduction="sum")
    np.testing.assert_allclose(to_numpy(got[0]), [-1.0, -1.0])
    want = oracle.gradients(2.0, to_numpy(x), to_numpy(t), reduction="sum", log_target=False)
    assert_gradients(got, want, dtypes=("float64", "float64"))


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
            hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=3)
        )
    x_shape, t_shape = shapes.input_shapes
    log_target = draw(st.booleans())
    # No subnormals: PyTorch rounds g * t / t there (see the edge-grid tests).
    x = draw(hnp.arrays(np.float64, x_shape, elements=st.floats(-20, 3, allow_subnormal=False)))
    lo = -20 if log_target else 0
    t = draw(hnp.arrays(np.float64, t_shape, elements=st.floats(lo, 3, allow_subnormal=False)))
    reduction = draw(st.sampled_from(REDUCTIONS))
    g_shape = shapes.result_shape if reduction == "none" else ()
    g = draw(hnp.arrays(np.float64, g_shape, elements=st.floats(-2, 2)))
    return {
        "x": x,
        "t": t,
        "g": g,
        "log_target": log_target,
        "reduction": reduction,
        "reference": draw(st.booleans()),
    }


@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_cases_match_the_oracle(xp, data):
    case = data.draw(cases(jax=array_api_compat.is_jax_namespace(xp)), label="case")
    x, t, g = case["x"], case["t"], case["g"]
    reduction, log_target = case["reduction"], case["log_target"]
    with kldiv_spec.use_reference(case["reference"]):
        got = kldiv_spec.kl_div_backward(
            xp.asarray(g),
            xp.asarray(x),
            xp.asarray(t),
            reduction=reduction,
            log_target=log_target,
        )
    want = exact_gradients(xp, g, x, t, reduction=reduction, log_target=log_target)
    assert_gradients(got, want, dtypes=("float64", "float64"))


# --------------------------------------------------------------------------- JAX


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
# A broadcast target (4,) is declined by JAX's fast path, so that case runs through the
# reference only; a target of the input's shape is taken by it, and runs both ways.
@pytest.mark.parametrize(
    ("p_shape", "evaluation"),
    [((3, 4), "fast_path"), ((3, 4), "reference"), ((4,), "reference")],
    indirect=["evaluation"],
    ids=str,
)
def test_jax_grad_matches_kl_div_backward(evaluation, p_shape, jit):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    rng = np.random.default_rng(4)
    x = np.log(rng.uniform(0.05, 1.0, size=(3, 4)))
    p = rng.uniform(0.05, 1.0, size=p_shape)
    g = rng.uniform(-1, 1, size=(3, 4))
    for reduction, log_target in CONFIGURATIONS:
        t = np.log(p) if log_target else p

        def scalar(
            a: Any, b: Any, reduction: str = reduction, log_target: bool = log_target
        ) -> Any:
            out = kl_div(a, b, reduction=reduction, log_target=log_target)
            return jnp.sum(out * g) if reduction == "none" else out

        grad = jax.grad(scalar, argnums=(0, 1))
        if jit:
            grad = jax.jit(grad)
        gx, gt = grad(jnp.asarray(x), jnp.asarray(t))
        with kldiv_spec.use_reference():
            ex, et = kldiv_spec.kl_div_backward(
                g if reduction == "none" else 1.0,
                x,
                t,
                reduction=reduction,
                log_target=log_target,
            )
        np.testing.assert_allclose(np.asarray(gx), ex, rtol=1e-12, err_msg=reduction)
        np.testing.assert_allclose(np.asarray(gt), et, rtol=1e-12, err_msg=reduction)
        want = exact_gradients(
            jnp,
            g if reduction == "none" else 1.0,
            x,
            t,
            reduction=reduction,
            log_target=log_target,
        )
        assert_gradients((gx, gt), want, dtypes=("float64", "float64"), what=reduction)


def test_jax_grad_edge_values_under_jit(evaluation):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    x, t = gradient_edge_grid(np.finfo(np.float64))
    x, t = as_computed(jnp, x, "float64"), as_computed(jnp, t, "float64")
    for log_target in (False, True):

        def total(a: Any, b: Any, log_target: bool = log_target) -> Any:
            return kldiv_spec.kl_div(a, b, reduction="sum", log_target=log_target)

        got = jax.jit(jax.grad(total, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(t))
        want = exact_gradients(jnp, 1.0, x, t, reduction="sum", log_target=log_target)
        assert_gradients(got, want, dtypes=("float64", "float64"), what=f"{log_target=}")


# --------------------------------------------------------------------------- finite differences


@pytest.mark.parametrize("log_target", [False, True])
def test_central_differences_on_numpy(evaluation, log_target):
    rng = np.random.default_rng(5)
    x = np.log(rng.uniform(0.1, 1.0, size=(2, 3)))
    t = rng.uniform(0.1, 1.0, size=(3,))
    t = np.log(t) if log_target else t
    h = 1e-6
    for reduction in ("batchmean", "sum", "mean"):

        def f(a: np.ndarray, b: np.ndarray, reduction: str = reduction) -> float:
            return float(kl_div(a, b, reduction=reduction, log_target=log_target))

        gx, gt = kldiv_spec.kl_div_backward(1.0, x, t, reduction=reduction, log_target=log_target)
        for value, grad, other_first in ((x, gx, False), (t, gt, True)):
            numeric = np.empty_like(value)
            for i in np.ndindex(value.shape):
                up, down = value.copy(), value.copy()
                up[i] += h
                down[i] -= h
                if other_first:
                    numeric[i] = (f(x, up) - f(x, down)) / (2 * h)
                else:
                    numeric[i] = (f(up, t) - f(down, t)) / (2 * h)
            np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8, err_msg=reduction)
