"""PyTorch itself: the oracle and kldiv-spec agree with it; checks only PyTorch can run.

:mod:`kldiv_spec.conformance.oracle` is the oracle of ``test_values.py`` and
``test_gradients.py``; here it is pinned to ``torch.nn.functional.kl_div`` and
its autograd on the edge grids, and every backend of the ``xp`` fixture is also
compared with PyTorch evaluated on the same numbers in the same (promoted) dtype,
with PyTorch's own rounding, through the same assertion helper. Then what only
PyTorch has: half precision, its mixed-precision promotion, autograd through
``kldiv_spec.torch``, ``gradcheck``/``gradgradcheck`` and double backward.
The whole module is skipped where torch is not installed.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import array_api_compat
import numpy as np
import pytest
from _support import as_computed, edge_grid, finite_edge_grid, gradient_edge_grid, kl_div

import kldiv_spec
from kldiv_spec import REDUCTIONS
from kldiv_spec.conformance import oracle
from kldiv_spec.conformance.assertions import (
    assert_gradients,
    assert_loss,
    assert_matches,
    to_numpy,
)

torch = pytest.importorskip("torch")

# The fast_path runs fail unless a fast path took a call (conftest.py).
pytestmark = pytest.mark.checks_fast_path

RTOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}


def torch_kl_div(
    x: np.ndarray, t: np.ndarray, *, reduction: str, log_target: bool, dtype: str = "float64"
) -> np.ndarray:
    """PyTorch's ``kl_div`` of ``x`` and ``t`` (float64 values) evaluated in ``dtype``."""
    tdtype = getattr(torch, dtype)
    tx = torch.from_numpy(np.array(x, dtype=np.float64)).to(tdtype)
    tt = torch.from_numpy(np.array(t, dtype=np.float64)).to(tdtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = torch.nn.functional.kl_div(tx, tt, reduction=reduction, log_target=log_target)
    return out.to(torch.float64).numpy()


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


def assert_close_to_torch(
    actual: Any,
    expected: np.ndarray,
    *,
    rtol: float,
    atol: float | np.ndarray = 0.0,
    signed_zeros: bool = False,
    dtype: Any = None,
    what: str = "result",
) -> None:
    """Dtype, shape, NaN and signed-inf pattern exactly; finite values to atol + rtol |expected|.

    PyTorch's own result is the expected value here, so the bound is relative
    to it; :func:`~kldiv_spec.conformance.assertions.assert_matches` does the rest.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        bound = atol + rtol * np.abs(np.nan_to_num(expected, nan=0.0, posinf=0.0, neginf=0.0))
    assert_matches(actual, expected, bound, dtype=dtype, signed_zeros=signed_zeros, what=what)


def compiled_rounding(
    x: np.ndarray, t: np.ndarray, *, log_target: bool, dtype: str, g: Any = None
) -> np.ndarray:
    """Absolute error that XLA's compiled code may add: 4 ULPs of the terms' size.

    Under ``jax.jit`` XLA contracts ``a * b - c`` into one fused multiply-add and
    uses its own ``log``, so where the two terms of the loss (or of a gradient)
    cancel the result is their rounding residual rather than PyTorch's exact 0.
    With ``g`` the scale is that of the gradient's terms.
    """
    with np.errstate(all="ignore"):
        if g is not None and log_target:
            scale = np.abs(g) * np.exp(t) * (np.abs(t - x) + 1)
        elif g is not None:
            scale = np.abs(g) * (np.abs(np.log(np.abs(t))) + 1 + np.abs(x))
        elif log_target:
            scale = np.exp(t) * (np.abs(t) + np.abs(x))
        else:
            scale = np.abs(t * np.log(np.abs(t))) + np.abs(t * x)
    return 4 * np.finfo(dtype).eps * np.nan_to_num(scale, nan=0.0, posinf=0.0)


def sum_tolerance(x: np.ndarray, t: np.ndarray, *, log_target: bool, rtol: float) -> float:
    """Absolute tolerance for a reduced loss: ``rtol`` times the sum of |pointwise loss|."""
    pointwise = np.abs(torch_kl_div(x, t, reduction="none", log_target=log_target))
    scale = float(np.sum(pointwise)) if pointwise.size else 0.0
    return rtol * scale if math.isfinite(scale) else 0.0


# --------------------------------------------------------------------------- the oracle is PyTorch


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_oracle_agrees_with_torch_on_the_edge_grid(dtype, log_target):
    """PyTorch's own results lie within the oracle's bounds, NaN, infinities and zeros' signs too.

    The grid includes products and exponentials that overflow the dtype, where
    PyTorch's IEEE evaluation (``inf - inf``) decides the result.
    """
    finfo = np.finfo(dtype)
    x, t = (a.astype(dtype) for a in edge_grid(finfo))
    tx, tt = (torch.from_numpy(a).requires_grad_() for a in (x, t))
    out = torch.nn.functional.kl_div(tx, tt, reduction="none", log_target=log_target)
    exact = oracle.pointwise(x, t, log_target=log_target)
    assert_loss(out, exact, "none", dtype=dtype, signed_zeros=True)
    g = np.linspace(-1.0, 2.0, x.size).astype(dtype)
    got = torch.autograd.grad(out, (tx, tt), torch.from_numpy(g))
    want = oracle.gradients(g, x, t, reduction="none", log_target=log_target)
    assert_gradients(got, want, dtypes=(dtype, dtype))
    for x, t in (edge_grid(finfo), tuple(a.reshape(7, 7) for a in finite_edge_grid(finfo))):
        x, t = x.astype(dtype), t.astype(dtype)
        exact = oracle.pointwise(x, t, log_target=log_target)
        for reduction in ("batchmean", "sum", "mean"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = torch.nn.functional.kl_div(
                    torch.from_numpy(x),
                    torch.from_numpy(t),
                    reduction=reduction,
                    log_target=log_target,
                )
            assert_loss(out, exact, reduction, x.shape, dtype=dtype)
        for reduction in REDUCTIONS:
            g = np.linspace(-1.0, 2.0, x.size).reshape(x.shape) if reduction == "none" else 0.75
            got = torch_gradients(g, x, t, reduction=reduction, log_target=log_target, dtype=dtype)
            want = oracle.gradients(
                np.asarray(g, dtype=dtype), x, t, reduction=reduction, log_target=log_target
            )
            assert_gradients(got, want, what=reduction)


# --------------------------------------------------------------------------- values, every backend


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_edge_grid_pointwise_matches_torch(xp, evaluation, dtype, log_target):
    x, t = edge_grid(np.finfo(dtype))
    out = kl_div(
        xp.asarray(x, dtype=getattr(xp, dtype)),
        xp.asarray(t, dtype=getattr(xp, dtype)),
        reduction="none",
        log_target=log_target,
    )
    x, t = as_computed(xp, x, dtype), as_computed(xp, t, dtype)
    expected = torch_kl_div(x, t, reduction="none", log_target=log_target, dtype=dtype)
    # Values below the smallest normal number are rounding noise, whatever the formula.
    atol = float(np.finfo(dtype).smallest_normal)
    if array_api_compat.is_jax_namespace(xp) and evaluation == "fast_path":
        atol = np.maximum(atol, compiled_rounding(x, t, log_target=log_target, dtype=dtype))
        # Documented deviation (docs/backends.md): where t*x overflows, XLA's
        # compiled code can give -inf where eager evaluation and PyTorch give
        # NaN (inf - inf). Any non-finite value is accepted in exactly those cells.
        with np.errstate(all="ignore"):
            overflow = (
                np.isinf(t.astype(dtype) * x.astype(dtype)) & np.isfinite(x) & np.isfinite(t)
            )
        got = to_numpy(out)
        expected = np.where(overflow & ~np.isfinite(got) & np.isnan(expected), got, expected)
    assert_close_to_torch(
        out,
        expected,
        rtol=RTOL[dtype],
        atol=atol,
        dtype=dtype,
        # The specification (the reference) also gets the sign of zero right.
        signed_zeros=evaluation == "reference",
    )


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_edge_grid_reduced_matches_torch(xp, evaluation, dtype, log_target):
    cast = getattr(xp, dtype)
    finfo = np.finfo(dtype)
    grid, finite = edge_grid(finfo), finite_edge_grid(finfo)
    for reduction in ("batchmean", "sum", "mean"):
        # NaN and inf propagate into every reduction as in PyTorch ...
        x, t = grid
        out = kl_div(
            xp.asarray(x, dtype=cast),
            xp.asarray(t, dtype=cast),
            reduction=reduction,
            log_target=log_target,
        )
        x, t = as_computed(xp, x, dtype), as_computed(xp, t, dtype)
        expected = torch_kl_div(x, t, reduction=reduction, log_target=log_target, dtype=dtype)
        assert_close_to_torch(out, expected, rtol=RTOL[dtype], dtype=dtype)
        # ... and where everything is finite, the reduced values agree.
        x, t = (a.reshape(7, 7) for a in finite)
        out = kl_div(
            xp.asarray(x, dtype=cast),
            xp.asarray(t, dtype=cast),
            reduction=reduction,
            log_target=log_target,
        )
        x, t = as_computed(xp, x, dtype), as_computed(xp, t, dtype)
        expected = torch_kl_div(x, t, reduction=reduction, log_target=log_target, dtype=dtype)
        atol = sum_tolerance(x, t, log_target=log_target, rtol=RTOL[dtype])
        assert_close_to_torch(out, expected, rtol=RTOL[dtype], atol=atol, dtype=dtype)


# --------------------------------------------------------------------------- torch dtypes


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_torch(dtype, log_target):
    # Run once, through the public API: these arrays are below the fast path's size
    # threshold (tests/test_half_precision_kl_div.py holds its half-precision route).
    tdtype = getattr(torch, dtype)
    finfo = torch.finfo(tdtype)
    x, t = edge_grid(finfo)
    out = kl_div(
        torch.from_numpy(x).to(tdtype),
        torch.from_numpy(t).to(tdtype),
        reduction="none",
        log_target=log_target,
    )
    assert out.dtype == tdtype
    expected = torch_kl_div(x, t, reduction="none", log_target=log_target, dtype=dtype)
    atol = finfo.smallest_normal
    assert_close_to_torch(out, expected, rtol=RTOL[dtype], atol=atol, dtype=dtype)
    x, t = finite_edge_grid(finfo)
    for reduction in ("batchmean", "sum", "mean"):
        out = kl_div(
            torch.from_numpy(x.reshape(7, 7)).to(tdtype),
            torch.from_numpy(t.reshape(7, 7)).to(tdtype),
            reduction=reduction,
            log_target=log_target,
        )
        expected = torch_kl_div(
            x.reshape(7, 7),
            t.reshape(7, 7),
            reduction=reduction,
            log_target=log_target,
            dtype=dtype,
        )
        atol = sum_tolerance(x, t, log_target=log_target, rtol=RTOL[dtype])
        assert_close_to_torch(out, expected, rtol=RTOL[dtype], atol=atol, dtype=dtype)


@pytest.mark.parametrize(
    ("x_dtype", "t_dtype"),
    [
        ("float16", "float32"),
        ("bfloat16", "float16"),
        ("bfloat16", "float64"),
        ("float16", "float16"),
        ("float32", "bfloat16"),
    ],
)
def test_torch_mixed_precision_promotes_like_torch(x_dtype, t_dtype):
    # Run once, through the public API: PyTorch's fast path declines mixed and half
    # dtypes (and these 4 elements are below its threshold), so the reference answers.
    x = torch.log(torch.tensor([[0.25, 0.75], [0.5, 0.5]])).to(getattr(torch, x_dtype))
    t = torch.tensor([[0.5, 0.5], [0.1, 0.9]]).to(getattr(torch, t_dtype))
    for reduction in REDUCTIONS:
        out = kl_div(x, t, reduction=reduction, log_target=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = torch.nn.functional.kl_div(x, t, reduction=reduction)
        assert out.dtype == expected.dtype
        # PyTorch rounds some intermediates to the narrower operand's dtype; we promote
        # first, so agree to that dtype's precision.
        rtol = max(RTOL[x_dtype], RTOL[t_dtype])
        torch.testing.assert_close(out, expected, rtol=rtol, atol=rtol, equal_nan=True)


def test_zero_d_operand_promotes_per_the_array_api_not_torch():
    """Documented deviation: PyTorch keeps float32 when the float64 operand is 0-d.

    The array API standard promotes 0-d arrays like any other, so kldiv-spec
    returns float64 here. If PyTorch ever changes its rule this test tells us.
    Run once, through the public API: PyTorch's fast path declines a 0-d (broadcast)
    operand and mixed dtypes.
    """
    x = torch.log(torch.tensor([0.25, 0.75], dtype=torch.float32))
    t = torch.tensor(0.5, dtype=torch.float64)
    ours = kl_div(x, t, reduction="none", log_target=False)
    theirs = torch.nn.functional.kl_div(x, t, reduction="none")
    assert theirs.dtype == torch.float32
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours.to(torch.float32), theirs)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_edge_grid_matches_torch_autograd(xp, evaluation, dtype):
    x, t = gradient_edge_grid(np.finfo(dtype))
    cast = getattr(xp, dtype)
    xa, ta = xp.asarray(x, dtype=cast), xp.asarray(t, dtype=cast)
    xc, tc = as_computed(xp, x, dtype), as_computed(xp, t, dtype)
    atol = float(np.finfo(dtype).smallest_normal)
    g_none = np.linspace(-1.0, 2.0, x.size)
    for log_target in (False, True):
        for reduction in REDUCTIONS:
            g = g_none if reduction == "none" else np.asarray(0.75)
            ga = xp.asarray(g, dtype=cast)
            gx, gt = kldiv_spec.kl_div_backward(
                ga, xa, ta, reduction=reduction, log_target=log_target
            )
            ex, et = torch_gradients(
                g, xc, tc, reduction=reduction, log_target=log_target, dtype=dtype
            )
            note = f"{reduction=}, {log_target=}"
            tolerance: Any = atol
            if array_api_compat.is_jax_namespace(xp) and evaluation == "fast_path":
                divisor = {"mean": x.size, "batchmean": x.shape[0]}.get(reduction, 1)
                rounding = compiled_rounding(
                    xc, tc, log_target=log_target, dtype=dtype, g=g / divisor
                )
                tolerance = np.maximum(atol, rounding)
            for got, expected, name in ((gx, ex, "input"), (gt, et, "target")):
                assert_close_to_torch(
                    got,
                    expected,
                    rtol=RTOL[dtype],
                    atol=tolerance,
                    dtype=dtype,
                    what=f"grad_{name}, {note}",
                )


def test_log_target_gradient_where_exp_overflows_like_torch(xp, evaluation):
    big = np.finfo(np.float64).max / 4
    x = np.asarray([big, big, math.inf, math.inf])
    t = np.asarray([710.0, big, 710.0, big])
    _, gt = kldiv_spec.kl_div_backward(
        1.0, xp.asarray(x), xp.asarray(t), reduction="sum", log_target=True
    )
    _, expected = torch_gradients(1.0, x, t, reduction="sum", log_target=True)
    assert np.isnan(expected).all()
    assert_close_to_torch(gt, expected, rtol=1e-12)


def test_edge_grid_through_torch_autograd(evaluation):
    """Autograd through ``kldiv_spec.kl_div`` on torch equals autograd through PyTorch's."""
    x, t = gradient_edge_grid(np.finfo(np.float64))
    for log_target in (False, True):
        for reduction in REDUCTIONS:
            tx = torch.tensor(x, requires_grad=True)
            tt = torch.tensor(t, requires_grad=True)
            out = kl_div(tx, tt, reduction=reduction, log_target=log_target)
            g = torch.linspace(-1.0, 2.0, x.size, dtype=torch.float64)
            g = g if reduction == "none" else torch.tensor(0.75, dtype=torch.float64)
            gx, gt = torch.autograd.grad(out, (tx, tt), g)
            ex, et = torch_gradients(g.numpy(), x, t, reduction=reduction, log_target=log_target)
            assert_close_to_torch(gx, ex, rtol=1e-12)
            assert_close_to_torch(gt, et, rtol=1e-12)
            want = oracle.gradients(g.numpy(), x, t, reduction=reduction, log_target=log_target)
            assert_gradients((gx, gt), want, dtypes=("float64", "float64"), what=reduction)


def test_torch_gradients_keep_their_dtypes_through_autograd():
    # Run once, through the public API: PyTorch's fast path declines mixed dtypes.
    x = torch.log(torch.tensor([0.25, 0.75])).requires_grad_()
    t = torch.tensor([0.5, 0.5], dtype=torch.float64, requires_grad=True)
    kl_div(x, t, reduction="batchmean").backward()
    assert x.grad.dtype == torch.float32
    assert t.grad.dtype == torch.float64


# Forward-mode AD loads torch's own decompositions once, through torch.jit.script.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
# A broadcast target (4,) is declined by PyTorch's fast path, so that case runs through
# the reference only; a target of the input's shape is taken by it, and runs both ways.
@pytest.mark.parametrize(
    ("t_shape", "evaluation"),
    [((3, 4), "fast_path"), ((3, 4), "reference"), ((4,), "reference")],
    indirect=["evaluation"],
    ids=str,
)
def test_gradcheck_and_gradgradcheck(evaluation, t_shape, reduction, log_target):
    import kldiv_spec.torch as kt

    gen = torch.Generator().manual_seed(0)
    x = torch.log(torch.rand(3, 4, generator=gen, dtype=torch.float64) + 0.1)
    t = torch.rand(t_shape, generator=gen, dtype=torch.float64) + 0.1
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


def test_jax_grad_edge_values_under_jit_match_torch(evaluation):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    x, t = gradient_edge_grid(np.finfo(np.float64))
    x, t = as_computed(jnp, x, "float64"), as_computed(jnp, t, "float64")
    for log_target in (False, True):

        def total(a: Any, b: Any, log_target: bool = log_target) -> Any:
            return kldiv_spec.kl_div(a, b, reduction="sum", log_target=log_target)

        gx, gt = jax.jit(jax.grad(total, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(t))
        ex, et = torch_gradients(1.0, x, t, reduction="sum", log_target=log_target)
        atol = float(np.finfo(np.float64).smallest_normal)
        assert_close_to_torch(gx, ex, rtol=1e-12, atol=atol)
        assert_close_to_torch(gt, et, rtol=1e-12, atol=atol)
