"""Gradients: ``kl_div_backward`` and autograd through ``kldiv_spec`` against PyTorch's autograd.

The oracle is PyTorch's autograd through ``torch.nn.functional.kl_div`` on float64
copies of the operands (promoted first, as the array API does), each gradient then
cast to its own argument's dtype. Also: ``gradcheck``/``gradgradcheck`` on torch,
``jax.grad`` (eager and under ``jax.jit``) and central finite differences on NumPy.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import array_api_compat
import numpy as np
import pytest
from _support import CONFIGURATIONS, JAX_SHAPES, as_computed, few_shapes_on_jax
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kldiv_spec
from kldiv_spec import REDUCTIONS

torch = pytest.importorskip("torch")

RTOL = {"float64": 1e-12, "float32": 1e-5}


def quiet_mean() -> warnings.catch_warnings:
    """Silence the ``'mean'`` UserWarning (test_api checks it)."""
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.filterwarnings("ignore", message="reduction: 'mean'", category=UserWarning)
    return context


def kl_div(x: Any, t: Any, **options: Any) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="reduction: 'mean'", category=UserWarning)
        return kldiv_spec.kl_div(x, t, **options)


def dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def to_numpy(a: Any) -> np.ndarray:
    """Return the values of an array of any backend as a float64 NumPy array."""
    if array_api_compat.is_torch_array(a):
        return a.detach().cpu().to(torch.float64).numpy()
    if array_api_compat.is_dask_array(a):
        with np.errstate(all="ignore"):
            a = a.compute(scheduler="synchronous")
    if array_api_compat.is_cupy_array(a):
        a = a.get()
    return np.asarray(a, dtype=np.float64)


def torch_gradients(
    g: Any,
    x: np.ndarray,
    t: np.ndarray,
    *,
    reduction: str,
    log_target: bool,
    dtype: str = "float64",
) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's autograd gradients of ``kl_div`` at ``x``, ``t`` (in ``dtype``) for ``g``."""
    tdtype = getattr(torch, dtype)
    tx = torch.tensor(np.array(x, dtype=np.float64), dtype=tdtype, requires_grad=True)
    tt = torch.tensor(np.array(t, dtype=np.float64), dtype=tdtype, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = torch.nn.functional.kl_div(tx, tt, reduction=reduction, log_target=log_target)
    grad = torch.broadcast_to(torch.tensor(np.array(g, dtype=np.float64), dtype=tdtype), out.shape)
    gx, gt = torch.autograd.grad(out, (tx, tt), grad)
    return gx.to(torch.float64).numpy(), gt.to(torch.float64).numpy()


def assert_matches(
    actual: Any, expected: np.ndarray, *, rtol: float, atol: float | np.ndarray = 0.0
) -> None:
    """Shape, NaN and signed-inf pattern exactly; finite values to ``rtol``/``atol``."""
    assert tuple(actual.shape) == expected.shape
    got = to_numpy(actual)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), err_msg="NaN pattern")
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(expected), err_msg="+inf")
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected), err_msg="-inf")
    finite = np.isfinite(expected)
    # Per-element absolute tolerances: assert_allclose only takes a scalar, so it
    # reports (and fails on) the elements outside their own tolerance.
    atol = np.broadcast_to(atol, expected.shape)[finite]
    got, expected = got[finite], expected[finite]
    outside = ~(np.abs(got - expected) <= atol + rtol * np.abs(expected))
    np.testing.assert_allclose(
        got[outside], expected[outside], rtol=rtol, atol=float(np.min(atol, initial=0.0))
    )


def compiled_rounding(
    g: np.ndarray, x: np.ndarray, t: np.ndarray, *, log_target: bool, dtype: str
) -> np.ndarray:
    """Absolute error XLA's compiled code may add to a gradient: 4 ULPs of its terms' size.

    Under ``jax.jit`` XLA contracts ``a * b + c`` into a fused multiply-add and
    uses its own ``log``, so where the gradient's terms cancel the result is
    their rounding residual rather than PyTorch's exact 0.
    """
    with np.errstate(all="ignore"):
        if log_target:
            scale = np.abs(g) * np.exp(t) * (np.abs(t - x) + 1)
        else:
            scale = np.abs(g) * (np.abs(np.log(np.abs(t))) + 1 + np.abs(x))
    return 4 * np.finfo(dtype).eps * np.nan_to_num(scale, nan=0.0, posinf=0.0)


# --------------------------------------------------------------------------- edge grid


def edge_grid(dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Every (input, target) pair of edge values, flat, as float64 arrays."""
    fi = torch.finfo(getattr(torch, dtype))
    big, tiny = fi.max / 4, fi.smallest_normal
    sub = tiny / 4
    inf, nan = math.inf, math.nan
    xs = [-inf, -big, -30.0, -1.0, -0.0, 0.0, sub, 0.5, 2.0, big, inf, nan]
    ts = [-inf, -1000.0, -1.0, -0.0, 0.0, sub, tiny, 0.25, 1.0, 2.5]
    ts += [math.log(fi.max) + 1, big, inf, nan]
    x, t = np.meshgrid(np.asarray(xs), np.asarray(ts), indexing="ij")
    return x.ravel(), t.ravel()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_edge_grid_matches_torch_autograd(xp, evaluation, dtype):
    x, t = edge_grid(dtype)
    cast = getattr(xp, dtype)
    xa, ta = xp.asarray(x, dtype=cast), xp.asarray(t, dtype=cast)
    xc, tc = as_computed(xp, x, dtype), as_computed(xp, t, dtype)
    atol = torch.finfo(getattr(torch, dtype)).smallest_normal
    g_none = np.linspace(-1.0, 2.0, x.size)
    for log_target in (False, True):
        for reduction in REDUCTIONS:
            g = g_none if reduction == "none" else np.asarray(0.75)
            ga = xp.asarray(g, dtype=cast)
            gx, gt = kldiv_spec.kl_div_backward(
                ga, xa, ta, reduction=reduction, log_target=log_target
            )
            assert dtype_name(gx.dtype) == dtype
            assert dtype_name(gt.dtype) == dtype
            ex, et = torch_gradients(
                g, xc, tc, reduction=reduction, log_target=log_target, dtype=dtype
            )
            note = f"{reduction=}, {log_target=}"
            tolerance = atol
            if array_api_compat.is_jax_namespace(xp) and evaluation == "fast_path":
                divisor = {"mean": x.size, "batchmean": x.shape[0]}.get(reduction, 1)
                rounding = compiled_rounding(
                    g / divisor, xc, tc, log_target=log_target, dtype=dtype
                )
                tolerance = np.maximum(atol, rounding)
            for got, expected, name in ((gx, ex, "input"), (gt, et, "target")):
                try:
                    assert_matches(got, expected, rtol=RTOL[dtype], atol=tolerance)
                except AssertionError as error:
                    raise AssertionError(f"grad_{name}, {note}") from error


def test_log_target_gradient_where_exp_overflows(xp, evaluation):
    big = np.finfo(np.float64).max / 4
    x = np.asarray([big, big, math.inf, math.inf])
    t = np.asarray([710.0, big, 710.0, big])
    _, gt = kldiv_spec.kl_div_backward(
        1.0, xp.asarray(x), xp.asarray(t), reduction="sum", log_target=True
    )
    _, expected = torch_gradients(1.0, x, t, reduction="sum", log_target=True)
    assert np.isnan(expected).all()
    assert_matches(gt, expected, rtol=1e-12)


def test_edge_grid_through_torch_autograd(evaluation):
    """Autograd through ``kldiv_spec.kl_div`` on torch equals autograd through PyTorch's."""
    x, t = edge_grid("float64")
    for log_target in (False, True):
        for reduction in REDUCTIONS:
            tx = torch.tensor(x, requires_grad=True)
            tt = torch.tensor(t, requires_grad=True)
            out = kl_div(tx, tt, reduction=reduction, log_target=log_target)
            g = torch.linspace(-1.0, 2.0, x.size, dtype=torch.float64)
            g = g if reduction == "none" else torch.tensor(0.75, dtype=torch.float64)
            gx, gt = torch.autograd.grad(out, (tx, tt), g)
            ex, et = torch_gradients(g.numpy(), x, t, reduction=reduction, log_target=log_target)
            assert_matches(gx, ex, rtol=1e-12)
            assert_matches(gt, et, rtol=1e-12)


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


def test_broadcast_gradients_are_summed_back(xp, evaluation):
    rng = np.random.default_rng(3)
    for x_shape, t_shape in few_shapes_on_jax(xp, BROADCAST):
        x = np.log(rng.uniform(0.05, 1.0, size=x_shape))
        t = rng.uniform(0.05, 1.0, size=t_shape)
        out_shape = np.broadcast_shapes(x_shape, t_shape)
        for reduction, log_target in CONFIGURATIONS:
            tv = np.log(t) if log_target else t
            g = rng.uniform(-1, 1, size=out_shape) if reduction == "none" else 1.5
            gx, gt = kldiv_spec.kl_div_backward(
                xp.asarray(np.asarray(g)),
                xp.asarray(x),
                xp.asarray(tv),
                reduction=reduction,
                log_target=log_target,
            )
            ex, et = torch_gradients(g, x, tv, reduction=reduction, log_target=log_target)
            note = f"{x_shape}, {t_shape}, {reduction=}, {log_target=}"
            assert tuple(gx.shape) == x_shape, note
            assert tuple(gt.shape) == t_shape, note
            try:
                assert_matches(gx, ex, rtol=1e-12, atol=1e-15)
                assert_matches(gt, et, rtol=1e-12, atol=1e-15)
            except AssertionError as error:
                raise AssertionError(note) from error


def test_each_gradient_has_its_own_arguments_dtype(xp, evaluation):
    x = xp.log(xp.asarray([[0.25, 0.75], [0.5, 0.5]], dtype=xp.float32))
    t = xp.asarray([[0.5, 0.5], [0.1, 0.9]], dtype=xp.float64)
    for a, b in ((x, t), (t, x)):
        for reduction in REDUCTIONS:
            g = xp.ones((2, 2), dtype=xp.float64) if reduction == "none" else 1.0
            ga, gb = kldiv_spec.kl_div_backward(g, a, b, reduction=reduction)
            assert ga.dtype == a.dtype
            assert gb.dtype == b.dtype
            ex, et = torch_gradients(
                np.ones((2, 2)) if reduction == "none" else 1.0,
                to_numpy(a),
                to_numpy(b),
                reduction=reduction,
                log_target=False,
            )
            assert_matches(ga, ex.astype(np.float32) if a is x else ex, rtol=1e-6)
            assert_matches(gb, et.astype(np.float32) if b is x else et, rtol=1e-6)


def test_float32_grad_output_with_float64_operands(xp, evaluation):
    x = xp.log(xp.asarray([0.25, 0.75], dtype=xp.float64))
    t = xp.asarray([0.5, 0.5], dtype=xp.float64)
    gx, gt = kldiv_spec.kl_div_backward(xp.asarray(2.0, dtype=xp.float32), x, t, reduction="sum")
    assert dtype_name(gx.dtype) == "float64"
    assert dtype_name(gt.dtype) == "float64"
    np.testing.assert_allclose(to_numpy(gx), [-1.0, -1.0])


def test_torch_gradients_keep_their_dtypes_through_autograd(evaluation):
    x = torch.log(torch.tensor([0.25, 0.75])).requires_grad_()
    t = torch.tensor([0.5, 0.5], dtype=torch.float64, requires_grad=True)
    kl_div(x, t, reduction="batchmean").backward()
    assert x.grad.dtype == torch.float32
    assert t.grad.dtype == torch.float64


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
def test_random_cases_match_torch_autograd(xp, data):
    case = data.draw(cases(jax=array_api_compat.is_jax_namespace(xp)), label="case")
    x, t, g = case["x"], case["t"], case["g"]
    reduction, log_target = case["reduction"], case["log_target"]
    with kldiv_spec.use_reference(case["reference"]):
        gx, gt = kldiv_spec.kl_div_backward(
            xp.asarray(g),
            xp.asarray(x),
            xp.asarray(t),
            reduction=reduction,
            log_target=log_target,
        )
    xc, tc = as_computed(xp, x, "float64"), as_computed(xp, t, "float64")
    ex, et = torch_gradients(g, xc, tc, reduction=reduction, log_target=log_target)
    scale = 1e-12 * (1 + float(np.sum(np.abs(g))) * 1e3)
    assert_matches(gx, ex, rtol=1e-10, atol=scale)
    assert_matches(gt, et, rtol=1e-10, atol=scale)


# --------------------------------------------------------------------------- torch checks


# Forward-mode AD loads torch's own decompositions once, through torch.jit.script.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_and_gradgradcheck(evaluation, reduction, log_target):
    import kldiv_spec.torch as kt

    gen = torch.Generator().manual_seed(0)
    x = torch.log(torch.rand(3, 4, generator=gen, dtype=torch.float64) + 0.1)
    t = torch.rand(4, generator=gen, dtype=torch.float64) + 0.1
    if log_target:
        t = torch.log(t)
    x.requires_grad_()
    t.requires_grad_()
    module = kt.KLDivLoss(reduction=reduction, log_target=log_target)

    def functional(a: Any, b: Any) -> Any:
        return kl_div(a, b, reduction=reduction, log_target=log_target)

    def through_module(a: Any, b: Any) -> Any:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="reduction: 'mean'")
            return module(a, b)

    assert torch.autograd.gradcheck(functional, (x, t), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(functional, (x, t))
    assert torch.autograd.gradcheck(through_module, (x, t))
    assert torch.autograd.gradgradcheck(through_module, (x, t))


def test_double_backward_matches_torch(evaluation):
    x = torch.log(torch.tensor([[0.2, 0.8], [0.6, 0.4]], dtype=torch.float64)).requires_grad_()
    t = torch.tensor([[0.3, 0.7], [0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    results = []
    for f in (kl_div, torch.nn.functional.kl_div):
        out = f(x, t, reduction="batchmean")
        gx, gt = torch.autograd.grad(out, (x, t), create_graph=True)
        hessian_row = torch.autograd.grad((gx.sum() + (gt**2).sum()), (x, t))
        results.append((gx, gt, *hessian_row))
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs)


# --------------------------------------------------------------------------- JAX


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_jax_grad_matches_kl_div_backward(evaluation, jit):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    rng = np.random.default_rng(4)
    x = np.log(rng.uniform(0.05, 1.0, size=(3, 4)))
    p = rng.uniform(0.05, 1.0, size=(4,))
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


def test_jax_grad_edge_values_under_jit(evaluation):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    x, t = edge_grid("float64")
    x, t = as_computed(jnp, x, "float64"), as_computed(jnp, t, "float64")
    for log_target in (False, True):

        def total(a: Any, b: Any, log_target: bool = log_target) -> Any:
            return kldiv_spec.kl_div(a, b, reduction="sum", log_target=log_target)

        gx, gt = jax.jit(jax.grad(total, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(t))
        ex, et = torch_gradients(1.0, x, t, reduction="sum", log_target=log_target)
        atol = np.finfo(np.float64).smallest_normal
        assert_matches(gx, ex, rtol=1e-12, atol=atol)
        assert_matches(gt, et, rtol=1e-12, atol=atol)


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
