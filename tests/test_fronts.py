"""The per-call fronts: the common call without the full validation, same answers and errors.

NumPy: small plain arrays are evaluated with the reference's operations directly,
bit for bit the reference's. PyTorch: small tensors go to ATen's ``torch.kl_div``
(PyTorch's own kernel), whose values are PyTorch's and whose input gradient is the
analytic one bit for bit; large CPU tensors go to the NumPy kernels on the same
memory. Whatever a front does not take goes through the full route, with its errors.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kldiv_spec
from kldiv_spec import _dispatch, _functional
from kldiv_spec.backends import _blocks

REDUCTIONS = ("none", "sum", "mean", "batchmean")
SPECIAL = [0.0, -0.0, 1e-45, 1e-300, 0.3, 1.0, 2.0, -0.5, math.inf, -math.inf, math.nan, -1000.0]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and values, NaN for NaN (of either sign) and the sign of every zero."""
    a, b = np.asarray(a), np.asarray(b)
    numbers = ~np.isnan(a)
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and np.array_equal(a, b, equal_nan=True)
        and np.array_equal(np.signbit(a[numbers]), np.signbit(b[numbers]))
    )


# --- NumPy ------------------------------------------------------------------------------


@given(
    data=st.data(),
    shape=st.sampled_from([(1,), (7,), (3, 5), (0, 4), (4, 0), (2, 3, 4)]),
    dtype=st.sampled_from([np.float32, np.float64]),
    log_target=st.booleans(),
    reduction=st.sampled_from(REDUCTIONS),
)
def test_numpy_front_is_the_reference_bit_for_bit(
    data: st.DataObject, shape: tuple[int, ...], dtype: type, log_target: bool, reduction: str
) -> None:
    n = math.prod(shape)
    values = st.one_of(st.sampled_from(SPECIAL), st.floats(-30, 30, width=32))
    x = np.asarray(data.draw(st.lists(values, min_size=n, max_size=n)), dtype).reshape(shape)
    t = np.asarray(data.draw(st.lists(values, min_size=n, max_size=n)), dtype).reshape(shape)
    assert _functional._numpy_front(x, t, reduction, log_target) is not NotImplemented
    fused = _blocks.fused_available() and dtype == np.float32 and not log_target
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        got = kldiv_spec.kl_div(x, t, reduction=reduction, log_target=log_target)
        with kldiv_spec.use_reference():
            want = kldiv_spec.kl_div(x, t, reduction=reduction, log_target=log_target)
        if fused and reduction != "none":
            # The fused float32 pass: the blocked fast path's answer, bit for bit.
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv(_blocks.MIN_ELEMENTS_ENV, "1")
                want = kldiv_spec.kl_div(x, t, reduction=reduction, log_target=log_target)
    assert type(got) is np.ndarray
    assert same_bits(got, want)


@pytest.mark.skipif(not _blocks.fused_available(), reason="no fused float32 sum here")
def test_numpy_front_takes_the_fused_sum_for_small_float32_reductions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Small float32 sums are the fused pass (float64 accumulation), not the float32 ufuncs."""
    # 2**24 + 1 + 1 - 1 - 1 ...: a float32 running sum loses the ones, a float64 one does not.
    t = np.ones(4097, np.float32)
    x = np.full(4097, -1.0, np.float32)
    x[0] = -(2.0**24)
    got = kldiv_spec.kl_div(x, t, reduction="sum")
    assert got.dtype == np.float32
    assert float(got) == np.float32(2.0**24 + 4096)
    monkeypatch.setenv(_blocks.FUSED_ENV, "0")  # off: the reference's float32 pairwise sum
    with kldiv_spec.use_reference():
        want = kldiv_spec.kl_div(x, t, reduction="sum")
    assert same_bits(kldiv_spec.kl_div(x, t, reduction="sum"), want)


def test_numpy_front_float32_overflow_rounds_without_a_warning() -> None:
    """A float64 total beyond float32's range becomes inf, as the fast path's does."""
    x = np.full(4, -3e38, np.float32)
    t = np.ones(4, np.float32)
    got = kldiv_spec.kl_div(x, t, reduction="batchmean")  # warnings are errors here
    assert got.dtype == np.float32 and got == np.inf


@pytest.mark.parametrize(
    "args",
    [
        pytest.param((np.zeros(3, np.float32), np.ones(3, np.float64), "sum", False), id="mixed"),
        pytest.param((np.zeros(3), np.ones((2, 3)), "sum", False), id="broadcast"),
        pytest.param((np.zeros(()), np.ones(()), "sum", False), id="0-d"),
        pytest.param((np.zeros(3, np.float16), np.ones(3, np.float16), "sum", False), id="f16"),
        pytest.param((np.zeros(3), [1.0, 1.0, 1.0], "sum", False), id="list"),
        pytest.param((np.zeros(3), np.ones(3), "avg", False), id="reduction"),
        pytest.param((np.zeros(3), np.ones(3), ["sum"], False), id="unhashable"),
        pytest.param((np.zeros(3), np.ones(3), "sum", 1), id="log_target"),
        pytest.param((np.zeros(3, np.int64), np.ones(3, np.int64), "sum", False), id="int"),
        pytest.param((np.zeros(1 << 16), np.ones(1 << 16), "sum", False), id="large"),
    ],
)
def test_numpy_front_declines_without_raising(args: tuple[object, ...]) -> None:
    """What it declines (the full route raises the errors or takes the fast path)."""
    assert _functional._numpy_front(*args) is NotImplemented


def test_numpy_front_follows_the_fast_path_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    from kldiv_spec.backends import _blocks

    x, t = np.zeros(100), np.ones(100)
    assert _functional._numpy_front(x, t, "sum", False) is not NotImplemented
    monkeypatch.setenv(_blocks.MIN_ELEMENTS_ENV, "0")
    assert _functional._numpy_front(x, t, "sum", False) is NotImplemented
    monkeypatch.setenv(_blocks.MIN_ELEMENTS_ENV, "-1")
    with pytest.raises(ValueError, match=_blocks.MIN_ELEMENTS_ENV):
        kldiv_spec.kl_div(x, t, reduction="sum")


def test_fronts_step_aside_while_the_reference_is_forced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x = np.zeros(3)
    assert _dispatch.front(x) is not None
    with kldiv_spec.use_reference():
        assert _dispatch.front(x) is None
        with kldiv_spec.use_reference(False):
            assert _dispatch.front(x) is not None
    assert _dispatch.front(x) is not None
    monkeypatch.setenv("KLDIV_SPEC_REFERENCE", "1")
    assert _dispatch.front(x) is None
    monkeypatch.setenv("KLDIV_SPEC_REFERENCE", "0")
    assert _dispatch.front(x) is not None


def test_getenv_sees_changes_made_at_run_time(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "KLDIV_SPEC_TEST_GETENV"
    monkeypatch.delenv(name, raising=False)
    assert _dispatch.getenv(name) == ""
    monkeypatch.setenv(name, "x1")
    assert _dispatch.getenv(name) == "x1"
    monkeypatch.delenv(name)
    assert _dispatch.getenv(name) == ""


def test_mean_warning_points_at_the_caller_on_the_front() -> None:
    x = np.log(np.full(4, 0.25))
    with pytest.warns(UserWarning, match="'mean' divides") as record:
        kldiv_spec.kl_div(x, np.full(4, 0.25))
    assert record[0].filename == __file__


# --- PyTorch ----------------------------------------------------------------------------

torch = pytest.importorskip("torch")

import kldiv_spec.torch as kt  # noqa: E402
from kldiv_spec.backends import torch as fast  # noqa: E402


def test_torch_front_is_registered_for_tensors_and_parameters() -> None:
    assert _dispatch.FRONTS[torch.Tensor] is fast.front
    assert _dispatch.FRONTS[torch.nn.Parameter] is fast.front


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_small_calls_are_pytorch_values_with_analytic_input_gradients(
    dtype: torch.dtype, log_target: bool, reduction: str
) -> None:
    targets = [v for v in SPECIAL if not (log_target and v == 1e-300)]
    t, x = torch.meshgrid(
        torch.tensor(targets, dtype=dtype),
        torch.tensor([-1.0, 0.0, -math.inf, math.inf, math.nan, 2.0], dtype=dtype),
        indexing="ij",
    )
    x, t = x.contiguous(), t.contiguous()
    assert x.numel() < fast.MIN_ELEMENTS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        xg = x.clone().requires_grad_()
        got = kt.kl_div(xg, t, reduction=reduction, log_target=log_target)
        want = torch.nn.functional.kl_div(x, t, reduction=reduction, log_target=log_target)
        g = torch.linspace(0.5, 1.5, got.numel(), dtype=dtype).reshape(got.shape)
        got.backward(g)
        with kldiv_spec.use_reference():
            ref_gx, _ = kldiv_spec.kl_div_backward(
                g, x, t, reduction=reduction, log_target=log_target
            )
            ref_value = kt.kl_div(x, t, reduction=reduction, log_target=log_target)
    assert got.grad_fn is not None and "KLDiv" not in type(got.grad_fn).__name__  # ATen's
    assert same_bits(got.detach().numpy(), want.numpy())  # PyTorch's own values
    assert same_bits(xg.grad.numpy(), ref_gx.numpy())  # the analytic gradient, bit for bit
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.detach(), ref_value, rtol=8 * eps, atol=0.0, equal_nan=True)


def test_torch_target_gradient_is_the_analytic_one() -> None:
    """A target that needs a gradient is declined by ATen's route (its rounding differs)."""
    x = torch.log(torch.tensor([[0.2, 0.8], [0.5, 0.5]]))
    t = torch.tensor([[0.3, 0.7], [0.0, 1.0]], requires_grad=True)
    assert fast.front(x, t, "sum", False) is NotImplemented
    loss = kt.kl_div(x, t, reduction="sum")
    loss.backward()
    _, want = kldiv_spec.kl_div_backward(1.0, x, t.detach(), reduction="sum")
    assert same_bits(t.grad.numpy(), want.numpy())
    with torch.no_grad():  # no gradient wanted: ATen's route again
        assert fast.front(x, t, "sum", False) is not NotImplemented


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: (torch.zeros(3), torch.ones(3, dtype=torch.float64)), id="mixed"),
        pytest.param(lambda: (torch.zeros(2, 3), torch.ones(3)), id="broadcast"),
        pytest.param(lambda: (torch.zeros(3, dtype=torch.float16),) * 2, id="f16"),
        pytest.param(lambda: (torch.zeros(3, dtype=torch.int64),) * 2, id="int"),
        pytest.param(lambda: (torch.zeros(3), np.ones(3, np.float32)), id="numpy target"),
        pytest.param(lambda: (torch.zeros(3), torch.zeros(3, device="meta")), id="devices"),
        pytest.param(lambda: (torch.zeros(3).to_sparse(), torch.ones(3)), id="sparse"),
    ],
)
def test_torch_front_declines_without_raising(make: object) -> None:
    x, t = make()  # type: ignore[operator]
    assert fast.front(x, t, "sum", False) is NotImplemented
    assert fast.front(torch.zeros(3), torch.ones(3), "avg", False) is NotImplemented
    assert fast.front(torch.zeros(3), torch.ones(3), ["sum"], False) is NotImplemented
    assert fast.front(torch.zeros(3), torch.ones(3), "sum", 0) is NotImplemented


def test_torch_front_errors_are_the_specified_ones() -> None:
    with pytest.raises(ValueError, match="cannot be broadcast"):
        kt.kl_div(torch.zeros(2, 3), torch.ones(2, 4), reduction="sum")
    with pytest.raises(TypeError, match="real floating-point"):
        kt.kl_div(torch.zeros(3, dtype=torch.int64), torch.ones(3), reduction="sum")
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        kt.kl_div(torch.zeros(3), torch.ones(3), reduction="avg")


def test_torch_zero_dim_promotes_by_the_array_api() -> None:
    """0-d float64 target with a float32 vector: float64 (the spec's deliberate difference)."""
    x = torch.log(torch.tensor([0.25, 0.75]))
    t = torch.tensor(0.5, dtype=torch.float64)
    assert kt.kl_div(x, t, reduction="none").dtype == torch.float64


@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
def test_torch_empty_means_are_nan_with_a_graph(reduction: str) -> None:
    x = torch.zeros(0, 3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loss = kt.kl_div(x, torch.zeros(0, 3), reduction=reduction)
    assert torch.isnan(loss) and loss.grad_fn is not None
    loss.backward()
    assert x.grad.shape == (0, 3)


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_large_cpu_tensors_take_the_numpy_kernels(reduction: str, log_target: bool) -> None:
    """Same memory, the NumPy path's kernels: the same values as NumPy's fast path."""
    gen = torch.Generator().manual_seed(0)
    x = torch.log_softmax(torch.randn(40, 2000, generator=gen), dim=1)
    t = torch.softmax(torch.randn(40, 2000, generator=gen), dim=1)
    if log_target:
        t = t.log()
    assert x.numel() >= fast.MIN_ELEMENTS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        xg = x.clone().requires_grad_()
        got = kt.kl_div(xg, t, reduction=reduction, log_target=log_target)
        want = kldiv_spec.kl_div(x.numpy(), t.numpy(), reduction=reduction, log_target=log_target)
    assert type(got.grad_fn).__name__ == "_BlockedKLDivBackward"
    assert same_bits(got.detach().numpy(), want)
    g = torch.ones_like(got)
    got.backward(g)
    gx, gt = kldiv_spec.kl_div_backward(
        g.numpy(), x.numpy(), t.numpy(), reduction=reduction, log_target=log_target
    )
    if log_target and reduction != "none":
        # the input gradient alone is -(g e^t) with ATen's exp (multithreaded), not NumPy's
        eps = torch.finfo(x.dtype).eps
        torch.testing.assert_close(xg.grad, torch.from_numpy(gx), rtol=4 * eps, atol=0.0)
    else:
        assert same_bits(xg.grad.numpy(), gx)
    bx, bt = kldiv_spec.kl_div_backward(g, x, t, reduction=reduction, log_target=log_target)
    assert same_bits(bx.numpy(), gx) and same_bits(bt.numpy(), gt)


def test_torch_requires_grad_input_memory_is_shared_not_copied() -> None:
    x = torch.zeros(300, 300, requires_grad=True)
    t = torch.full((300, 300), 0.5)
    assert fast._numpy(x).__array_interface__["data"][0] == x.data_ptr()
    loss = kt.kl_div(x, t, reduction="sum")
    torch.testing.assert_close(loss, torch.tensor(90_000 * 0.5 * math.log(0.5)))
