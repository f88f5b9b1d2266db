"""Values, NaN/inf patterns, dtypes and shapes of ``kl_div``, with PyTorch as the oracle.

Every backend of the ``xp`` fixture is compared with ``torch.nn.functional.kl_div``
evaluated on the same numbers in the same (promoted) dtype: on an edge-value grid
(subnormals, +-inf, NaN, -0.0, targets above 1 and below 0, overflowing
``exp``), on 0-d, empty and broadcast shapes, and on hypothesis-drawn cases.
Each test runs both through whatever fast path exists and through the reference
(:func:`kldiv_spec.use_reference`).
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

RTOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}


# --------------------------------------------------------------------------- helpers


def kl_div(x: Any, t: Any, *, reduction: str, log_target: bool) -> Any:
    """Call ``kldiv_spec.kl_div`` with the ``'mean'`` UserWarning silenced (test_api checks it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="reduction: 'mean'", category=UserWarning)
        return kldiv_spec.kl_div(x, t, reduction=reduction, log_target=log_target)


def dtype_name(dtype: Any) -> str:
    """Return ``'float32'`` for any library's float32 dtype object, and so on."""
    return str(dtype).rsplit(".", 1)[-1]


def to_numpy(a: Any) -> np.ndarray:
    """Return the values of an array of any backend as a float64 NumPy array."""
    if array_api_compat.is_torch_array(a):
        return a.detach().cpu().to(torch.float64).numpy()
    if array_api_compat.is_dask_array(a):
        # Dask computes later, outside kl_div's errstate: see test_lazy.py for that.
        with np.errstate(all="ignore"):
            a = a.compute(scheduler="synchronous")
    if array_api_compat.is_cupy_array(a):
        a = a.get()
    return np.asarray(a, dtype=np.float64)


def oracle(
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


def assert_matches(
    actual: Any,
    expected: np.ndarray,
    *,
    rtol: float,
    atol: float | np.ndarray = 0.0,
    signed_zeros: bool,
) -> None:
    """Shape, NaN and inf pattern (with sign) exactly; finite values to ``rtol``/``atol``.

    ``signed_zeros`` also requires ``-0.0`` where PyTorch gives ``-0.0`` and ``+0.0``
    where it gives ``+0.0``.
    """
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
    if signed_zeros:
        zero = expected == 0
        np.testing.assert_array_equal(
            np.signbit(got[zero]), np.signbit(expected[zero]), err_msg="sign of zero"
        )


def compiled_rounding(x: np.ndarray, t: np.ndarray, *, log_target: bool, dtype: str) -> np.ndarray:
    """Absolute error that XLA's compiled code may add: 4 ULPs of the terms' size.

    Under ``jax.jit`` XLA contracts ``a * b - c`` into one fused multiply-add and
    uses its own ``log``, so where the two terms of the loss cancel (``x = log t``)
    the result is their rounding residual (about 1e-17) rather than PyTorch's 0.
    """
    with np.errstate(all="ignore"):
        if log_target:
            scale = np.exp(t) * (np.abs(t) + np.abs(x))
        else:
            scale = np.abs(t * np.log(np.abs(t))) + np.abs(t * x)
    return 4 * np.finfo(dtype).eps * np.nan_to_num(scale, nan=0.0, posinf=0.0)


def sum_tolerance(x: np.ndarray, t: np.ndarray, *, log_target: bool, rtol: float) -> float:
    """Absolute tolerance for a reduced loss: ``rtol`` times the sum of |pointwise loss|."""
    pointwise = np.abs(oracle(x, t, reduction="none", log_target=log_target))
    scale = float(np.sum(pointwise)) if pointwise.size else 0.0
    return rtol * scale if math.isfinite(scale) else 0.0


def dtype_of(xp: Any, name: str) -> Any:
    return getattr(xp, name)


# --------------------------------------------------------------------------- edge grid


def edge_values(dtype: str) -> tuple[list[float], list[float]]:
    """Edge values of ``dtype`` for the input and the target (both log_target forms)."""
    fi = torch.finfo(getattr(torch, dtype))
    big = fi.max / 4
    tiny = fi.smallest_normal
    sub = tiny / 4  # a subnormal, exactly representable
    exp_overflow = math.log(fi.max) + 1
    inf, nan = math.inf, math.nan
    x = [-inf, -big, -30.0, -1.0, -0.0, 0.0, sub, tiny, 0.5, 2.0, big, inf, nan]
    t = [-inf, -1000.0, -1.0, -sub, -0.0, 0.0, sub, tiny, 0.25, 1.0, 2.5]
    t += [exp_overflow, big, inf, nan]
    return x, t


def edge_grid(dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Every (input, target) pair of edge values, as two flat float64 arrays."""
    xs, ts = edge_values(dtype)
    x, t = np.meshgrid(np.asarray(xs), np.asarray(ts), indexing="ij")
    return x.ravel(), t.ravel()


def finite_edge_grid(dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Pairs whose pointwise loss is finite: non-negative finite targets, moderate inputs."""
    fi = torch.finfo(getattr(torch, dtype))
    sub = fi.smallest_normal / 4
    xs = [-30.0, -1.0, -0.0, 0.0, sub, 0.5, 2.0]
    ts = [0.0, -0.0, sub, fi.smallest_normal, 0.25, 1.0, 2.5]
    x, t = np.meshgrid(np.asarray(xs), np.asarray(ts), indexing="ij")
    return x.ravel(), t.ravel()


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_edge_grid_pointwise(xp, evaluation, dtype, log_target):
    x, t = edge_grid(dtype)
    out = kl_div(
        xp.asarray(x, dtype=dtype_of(xp, dtype)),
        xp.asarray(t, dtype=dtype_of(xp, dtype)),
        reduction="none",
        log_target=log_target,
    )
    assert dtype_name(out.dtype) == dtype
    x, t = as_computed(xp, x, dtype), as_computed(xp, t, dtype)
    expected = oracle(x, t, reduction="none", log_target=log_target, dtype=dtype)
    # Values below the smallest normal number are rounding noise, whatever the formula.
    atol = torch.finfo(getattr(torch, dtype)).smallest_normal
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
    assert_matches(
        out,
        expected,
        rtol=RTOL[dtype],
        atol=atol,
        # The specification (the reference) also gets the sign of zero right.
        signed_zeros=evaluation == "reference",
    )


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_edge_grid_reduced(xp, evaluation, dtype, log_target):
    cast = dtype_of(xp, dtype)
    grid, finite = edge_grid(dtype), finite_edge_grid(dtype)
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
        expected = oracle(x, t, reduction=reduction, log_target=log_target, dtype=dtype)
        assert_matches(out, expected, rtol=RTOL[dtype], signed_zeros=False)
        # ... and where everything is finite, the reduced values agree.
        x, t = (a.reshape(7, 7) for a in finite)
        out = kl_div(
            xp.asarray(x, dtype=cast),
            xp.asarray(t, dtype=cast),
            reduction=reduction,
            log_target=log_target,
        )
        x, t = as_computed(xp, x, dtype), as_computed(xp, t, dtype)
        expected = oracle(x, t, reduction=reduction, log_target=log_target, dtype=dtype)
        atol = sum_tolerance(x, t, log_target=log_target, rtol=RTOL[dtype])
        assert_matches(out, expected, rtol=RTOL[dtype], atol=atol, signed_zeros=False)


def test_edge_grid_has_the_documented_values(xp):
    """A few entries of the edge table spelled out, so the oracle itself is pinned."""
    inf, nan = math.inf, math.nan
    x = xp.asarray([1.0, -inf, inf, nan, -inf, 0.5, 3.0], dtype=xp.float64)
    t = xp.asarray([0.0, 0.0, 0.0, 0.0, 0.5, -1.0, 2.0], dtype=xp.float64)
    got = to_numpy(kl_div(x, t, reduction="none", log_target=False))
    expected = [0.0, nan, nan, nan, inf, nan, 2.0 * math.log(2.0) - 6.0]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    lt = xp.asarray([-inf, inf, -1000.0], dtype=xp.float64)
    got = to_numpy(kl_div(xp.zeros(3, dtype=xp.float64), lt, reduction="none", log_target=True))
    np.testing.assert_array_equal(np.isnan(got), [True, False, False])
    assert got[1] == inf
    assert got[2] == 0.0


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_torch(evaluation, dtype, log_target):
    tdtype = getattr(torch, dtype)
    x, t = edge_grid(dtype)
    out = kl_div(
        torch.from_numpy(x).to(tdtype),
        torch.from_numpy(t).to(tdtype),
        reduction="none",
        log_target=log_target,
    )
    assert out.dtype == tdtype
    expected = oracle(x, t, reduction="none", log_target=log_target, dtype=dtype)
    atol = torch.finfo(tdtype).smallest_normal
    assert_matches(out, expected, rtol=RTOL[dtype], atol=atol, signed_zeros=False)
    x, t = finite_edge_grid(dtype)
    for reduction in ("batchmean", "sum", "mean"):
        out = kl_div(
            torch.from_numpy(x.reshape(7, 7)).to(tdtype),
            torch.from_numpy(t.reshape(7, 7)).to(tdtype),
            reduction=reduction,
            log_target=log_target,
        )
        assert out.dtype == tdtype
        expected = oracle(
            x.reshape(7, 7),
            t.reshape(7, 7),
            reduction=reduction,
            log_target=log_target,
            dtype=dtype,
        )
        atol = sum_tolerance(x, t, log_target=log_target, rtol=RTOL[dtype])
        assert_matches(out, expected, rtol=RTOL[dtype], atol=atol, signed_zeros=False)


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


def random_operands(
    x_shape: tuple[int, ...], t_shape: tuple[int, ...], *, log_target: bool, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Log-probability-like inputs and probability (or log-probability) targets."""
    rng = np.random.default_rng(seed)
    x = np.log(rng.uniform(0.01, 1.0, size=x_shape))
    t = rng.uniform(0.0, 1.0, size=t_shape)
    return np.asarray(x), np.asarray(np.log(t) if log_target else t)


def test_shapes_and_broadcasting(xp, evaluation):
    for x_shape, t_shape in few_shapes_on_jax(xp, SHAPES):
        broadcast = np.broadcast_shapes(x_shape, t_shape)
        for reduction, log_target in CONFIGURATIONS:
            x, t = random_operands(x_shape, t_shape, log_target=log_target)
            note = f"shapes {x_shape}, {t_shape}, {reduction=}, {log_target=}"
            out = kl_div(xp.asarray(x), xp.asarray(t), reduction=reduction, log_target=log_target)
            assert tuple(out.shape) == (broadcast if reduction == "none" else ()), note
            expected = oracle(x, t, reduction=reduction, log_target=log_target)
            try:
                assert_matches(out, expected, rtol=1e-12, atol=1e-14, signed_zeros=False)
            except AssertionError as error:
                raise AssertionError(note) from error


BATCHMEAN_CASES = [((3,), (2, 3), 3), ((1, 3), (4, 3), 1), ((4, 3), (3,), 4), ((2, 1), (2, 5), 2)]


def test_batchmean_divides_by_the_inputs_first_dimension(xp, evaluation):
    for x_shape, t_shape, divisor in BATCHMEAN_CASES:
        x, t = random_operands(x_shape, t_shape, log_target=False, seed=1)
        total = kl_div(xp.asarray(x), xp.asarray(t), reduction="sum", log_target=False)
        out = kl_div(xp.asarray(x), xp.asarray(t), reduction="batchmean", log_target=False)
        np.testing.assert_allclose(to_numpy(out), to_numpy(total) / divisor, rtol=1e-13)
        # PyTorch agrees: the divisor is input.shape[0], not the output's first dimension.
        expected = oracle(x, t, reduction="batchmean", log_target=False)
        np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-12)


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


def test_empty_reductions(xp, evaluation):
    for shape, reduction, expected in EMPTY_CASES:
        zeros = xp.zeros(shape, dtype=xp.float64)
        out = kl_div(zeros, zeros, reduction=reduction, log_target=False)
        if expected is None:
            assert tuple(out.shape) == shape
        else:
            assert out.shape == ()
            np.testing.assert_array_equal(to_numpy(out), expected, err_msg=str(shape))


def test_zero_d_batchmean_is_the_sum(xp, evaluation):
    x, t = xp.asarray(-0.5, dtype=xp.float64), xp.asarray(0.25, dtype=xp.float64)
    for reduction in REDUCTIONS:
        out = kl_div(x, t, reduction=reduction, log_target=False)
        assert out.shape == ()
        np.testing.assert_allclose(to_numpy(out), 0.25 * math.log(0.25) + 0.125, rtol=1e-14)


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
        xa = xp.asarray(x, dtype=dtype_of(xp, x_dtype))
        ta = xp.asarray(t, dtype=dtype_of(xp, t_dtype))
        expected_dtype = "float64" if "float64" in (x_dtype, t_dtype) else "float32"
        for reduction in REDUCTIONS:
            out = kl_div(xa, ta, reduction=reduction, log_target=False)
            assert out.dtype == xp.result_type(xa.dtype, ta.dtype)
            assert dtype_name(out.dtype) == expected_dtype
            # The oracle sees the same (already rounded) values, promoted the same way.
            expected = oracle(
                to_numpy(xa),
                to_numpy(ta),
                reduction=reduction,
                log_target=False,
                dtype=expected_dtype,
            )
            assert_matches(out, expected, rtol=RTOL[expected_dtype], atol=1e-6, signed_zeros=False)


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
def test_torch_mixed_precision_promotes_like_torch(evaluation, x_dtype, t_dtype):
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


def test_zero_d_operand_promotes_per_the_array_api_not_torch(evaluation):
    """Documented deviation: PyTorch keeps float32 when the float64 operand is 0-d.

    The array API standard promotes 0-d arrays like any other, so kldiv-spec
    returns float64 here. If PyTorch ever changes its rule this test tells us.
    """
    x = torch.log(torch.tensor([0.25, 0.75], dtype=torch.float32))
    t = torch.tensor(0.5, dtype=torch.float64)
    ours = kl_div(x, t, reduction="none", log_target=False)
    theirs = torch.nn.functional.kl_div(x, t, reduction="none")
    assert theirs.dtype == torch.float32
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours.to(torch.float32), theirs)


def test_zero_d_operand_promotes_per_the_array_api(xp, evaluation):
    x = xp.log(xp.asarray([0.25, 0.75], dtype=xp.float32))
    t = xp.asarray(0.5, dtype=xp.float64)
    for a, b in ((x, t), (t, x)):
        out = kl_div(a, b, reduction="sum", log_target=False)
        assert dtype_name(out.dtype) == "float64"


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
def test_random_cases_match_torch(xp, data):
    case = data.draw(cases(jax=array_api_compat.is_jax_namespace(xp)), label="case")
    dtype, reduction, log_target = case["dtype"], case["reduction"], case["log_target"]
    x, t = case["x"], case["t"]
    cast = dtype_of(xp, dtype)
    with kldiv_spec.use_reference(case["reference"]):
        out = kl_div(
            xp.asarray(x, dtype=cast),
            xp.asarray(t, dtype=cast),
            reduction=reduction,
            log_target=log_target,
        )
    assert dtype_name(out.dtype) == dtype
    x, t = as_computed(xp, x, dtype), as_computed(xp, t, dtype)
    expected = oracle(x, t, reduction=reduction, log_target=log_target, dtype=dtype)
    atol = sum_tolerance(x, t, log_target=log_target, rtol=RTOL[dtype]) + 1e-30
    assert_matches(out, expected, rtol=RTOL[dtype], atol=atol, signed_zeros=False)
