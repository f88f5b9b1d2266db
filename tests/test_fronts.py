"""The per-call fronts: the common call without the full validation, same answers and errors.

NumPy: small plain arrays are evaluated with the reference's operations directly,
bit for bit the reference's. PyTorch: small tensors go to ATen's ``torch.kl_div``
(PyTorch's own kernel), whose values are PyTorch's and whose input gradient is the
analytic one bit for bit; large CPU tensors go to the NumPy kernels on the same
memory. Whatever a front does not take goes through the full route, with its errors.

Which route a call took is seen from the outside: the full route asks the library's
fast path (its protocol functions are spied on, ``fast_path``), a front does not.
"""

from __future__ import annotations

import math
import warnings
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from _support import (
    FastPathCalls,
    numpy_fused_available,
    reread_settings,
    setenv,
    spy_fast_paths,
)
from hypothesis import given
from hypothesis import strategies as st

import kldiv_spec
from kldiv_spec.backends import numpy as numpy_fast

try:
    import torch
except ImportError:  # the NumPy tests run without it
    torch = None

requires_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")
requires_fused = pytest.mark.skipif(
    not numpy_fused_available(), reason="no fused float32 sum here (not built, or no AVX2)"
)

REDUCTIONS = ("none", "sum", "mean", "batchmean")
SPECIAL = [0.0, -0.0, 1e-45, 1e-300, 0.3, 1.0, 2.0, -0.5, math.inf, -math.inf, math.nan, -1000.0]
MIN_ELEMENTS_ENV = "KLDIV_SPEC_NUMPY_MIN_ELEMENTS"
FUSED_ENV = "KLDIV_SPEC_NUMPY_FUSED"


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


def outcome(f: Any, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """``("value", result)`` or ``("error", (exception class, message))``, warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            return "value", f(*args, **kwargs)
        except Exception as exc:  # the error is the outcome
            return "error", (type(exc), str(exc))


@pytest.fixture
def fast_path(monkeypatch: pytest.MonkeyPatch) -> FastPathCalls:
    """The calls of the NumPy (and, where imported, PyTorch) fast paths' protocol functions."""
    modules = [numpy_fast]
    if torch is not None:
        from kldiv_spec.backends import torch as torch_fast

        modules.append(torch_fast)
    return spy_fast_paths(monkeypatch, modules)


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
    fused = numpy_fused_available() and dtype == np.float32 and not log_target
    with pytest.MonkeyPatch.context() as patch:
        calls = spy_fast_paths(patch, [numpy_fast])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            got = kldiv_spec.kl_div(x, t, reduction=reduction, log_target=log_target)
            assert not calls.calls  # the front took it: the full route was not asked
            with kldiv_spec.use_reference():
                want = kldiv_spec.kl_div(x, t, reduction=reduction, log_target=log_target)
            if fused and reduction != "none" and n:
                # The fused float32 pass: the blocked fast path's answer, bit for bit.
                setenv(patch, MIN_ELEMENTS_ENV, "1")
                want = kldiv_spec.kl_div(x, t, reduction=reduction, log_target=log_target)
                assert calls.took("kl_div") == 1
    reread_settings()  # the environment is restored: for the next example
    assert type(got) is np.ndarray
    assert same_bits(got, want)


@requires_fused
def test_numpy_front_takes_the_fused_sum_for_small_float32_reductions(
    monkeypatch: pytest.MonkeyPatch, fast_path: FastPathCalls
) -> None:
    """Small float32 sums are the fused pass (float64 accumulation), not the float32 ufuncs;
    the front steps aside while the reference is forced, by the context or the environment."""
    # 2**24 + 1 + 1 - 1 - 1 ...: a float32 running sum loses the ones, a float64 one does not.
    t = np.ones(4097, np.float32)
    x = np.full(4097, -1.0, np.float32)
    x[0] = -(2.0**24)
    fused = np.float32(2.0**24 + 4096)

    def total() -> float:
        out = kldiv_spec.kl_div(x, t, reduction="sum")
        assert out.dtype == np.float32
        return float(out)

    assert total() == fused
    with kldiv_spec.use_reference():
        reference = total()
        assert reference != fused  # the two routes can be told apart
        with kldiv_spec.use_reference(False):
            assert total() == fused
    assert total() == fused
    setenv(monkeypatch, "KLDIV_SPEC_REFERENCE", "1")
    assert total() == reference
    setenv(monkeypatch, "KLDIV_SPEC_REFERENCE", "0")
    assert total() == fused
    setenv(monkeypatch, "KLDIV_SPEC_REFERENCE", "1")
    assert total() == reference
    setenv(monkeypatch, "KLDIV_SPEC_REFERENCE", None)
    assert total() == fused
    assert not fast_path.calls  # all of it in the front
    setenv(monkeypatch, FUSED_ENV, "0")  # off: the reference's float32 pairwise sum
    assert same_bits(kldiv_spec.kl_div(x, t, reduction="sum"), np.float32(reference))


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
def test_numpy_front_declines_without_raising(
    args: tuple[Any, ...], fast_path: FastPathCalls
) -> None:
    """What it declines takes the full route: the fast path is asked (and takes the large
    call), or the full validation raises the specified error, the reference's own."""
    x, t, reduction, log_target = args
    got = outcome(kldiv_spec.kl_div, x, t, reduction=reduction, log_target=log_target)
    if got[0] == "value":
        assert fast_path.calls  # the full route asked the fast path
        assert fast_path.took("kl_div") == (x.size >= 1 << 16)
    else:
        assert not fast_path.calls  # the validation raised first
    with kldiv_spec.use_reference():
        want = outcome(kldiv_spec.kl_div, x, t, reduction=reduction, log_target=log_target)
    assert got[0] == want[0]
    if got[0] == "value":
        np.testing.assert_array_equal(got[1], want[1])
    else:
        assert got[1] == want[1]


def test_numpy_front_follows_the_fast_path_threshold(
    monkeypatch: pytest.MonkeyPatch, fast_path: FastPathCalls
) -> None:
    x, t = np.zeros(100), np.ones(100)
    kldiv_spec.kl_div(x, t, reduction="sum")
    assert not fast_path.calls  # the front's
    setenv(monkeypatch, MIN_ELEMENTS_ENV, "0")
    kldiv_spec.kl_div(x, t, reduction="sum")
    assert fast_path.took("kl_div") == 1
    setenv(monkeypatch, MIN_ELEMENTS_ENV, "101")
    fast_path.clear()
    kldiv_spec.kl_div(x, t, reduction="sum")
    assert not fast_path.calls
    with pytest.raises(ValueError, match=MIN_ELEMENTS_ENV):  # when read
        setenv(monkeypatch, MIN_ELEMENTS_ENV, "-1")
        kldiv_spec.kl_div(x, t, reduction="sum")


def test_fast_paths_step_aside_while_the_reference_is_forced(
    monkeypatch: pytest.MonkeyPatch, fast_path: FastPathCalls
) -> None:
    """``use_reference()`` (nested, and undone by ``use_reference(False)``) and
    ``$KLDIV_SPEC_REFERENCE``, read on every call, set and unset at run time."""
    x, t = np.zeros(1 << 16), np.full(1 << 16, 0.5)

    def taken() -> bool:
        fast_path.clear()
        kldiv_spec.kl_div(x, t, reduction="sum")
        return bool(fast_path.taken)

    assert taken()
    with kldiv_spec.use_reference():
        assert not taken()
        with kldiv_spec.use_reference(False):
            assert taken()
        assert not taken()
    assert taken()
    setenv(monkeypatch, "KLDIV_SPEC_REFERENCE", "1")
    assert not taken()
    with kldiv_spec.use_reference(False):  # the context wins over the environment
        assert taken()
    setenv(monkeypatch, "KLDIV_SPEC_REFERENCE", "0")
    assert taken()
    setenv(monkeypatch, "KLDIV_SPEC_REFERENCE", "1")
    assert not taken()
    setenv(monkeypatch, "KLDIV_SPEC_REFERENCE", None)
    assert taken()


def test_mean_warning_points_at_the_caller_on_the_front() -> None:
    x = np.log(np.full(4, 0.25))
    with pytest.warns(UserWarning, match="'mean' divides") as record:
        kldiv_spec.kl_div(x, np.full(4, 0.25))
    assert record[0].filename == __file__


# --- PyTorch ----------------------------------------------------------------------------

TORCH_DTYPES = ["float32", "float64"]


@pytest.fixture
def kt() -> ModuleType:
    """``kldiv_spec.torch`` (imported here: the module's NumPy tests run without torch)."""
    import kldiv_spec.torch

    return kldiv_spec.torch


@pytest.fixture
def torch_fast() -> ModuleType:
    """The PyTorch fast path, for its size threshold ``MIN_ELEMENTS``."""
    from kldiv_spec.backends import torch as fast

    return fast


@requires_torch
@pytest.mark.parametrize("kind", ["Tensor", "Parameter"])
def test_torch_front_takes_tensors_and_parameters(kind: str, fast_path: FastPathCalls) -> None:
    x = torch.log(torch.tensor([[0.2, 0.8], [0.5, 0.5]]))
    t = torch.tensor([[0.3, 0.7], [0.0, 1.0]])
    if kind == "Parameter":
        x = torch.nn.Parameter(x)
    loss = kldiv_spec.kl_div(x, t, reduction="sum")
    assert not fast_path.calls  # the front's (ATen's kernel), not the full route
    want = torch.nn.functional.kl_div(x.detach(), t, reduction="sum")
    assert same_bits(loss.detach().numpy(), want.numpy())
    if kind == "Parameter":
        assert loss.grad_fn is not None and "KLDiv" not in type(loss.grad_fn).__name__


@requires_torch
@pytest.mark.parametrize("dtype_name", TORCH_DTYPES)
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_small_calls_are_pytorch_values_with_analytic_input_gradients(
    dtype_name: str,
    log_target: bool,
    reduction: str,
    kt: ModuleType,
    torch_fast: ModuleType,
    fast_path: FastPathCalls,
) -> None:
    dtype = getattr(torch, dtype_name)
    targets = [v for v in SPECIAL if not (log_target and v == 1e-300)]
    t, x = torch.meshgrid(
        torch.tensor(targets, dtype=dtype),
        torch.tensor([-1.0, 0.0, -math.inf, math.inf, math.nan, 2.0], dtype=dtype),
        indexing="ij",
    )
    x, t = x.contiguous(), t.contiguous()
    assert x.numel() < torch_fast.MIN_ELEMENTS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        xg = x.clone().requires_grad_()
        got = kt.kl_div(xg, t, reduction=reduction, log_target=log_target)
        want = torch.nn.functional.kl_div(x, t, reduction=reduction, log_target=log_target)
        g = torch.linspace(0.5, 1.5, got.numel(), dtype=dtype).reshape(got.shape)
        got.backward(g)
        assert not fast_path.calls  # the front's route
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


@requires_torch
def test_torch_target_gradient_is_the_analytic_one(
    kt: ModuleType, fast_path: FastPathCalls
) -> None:
    """A target that needs a gradient is declined by ATen's route (its rounding differs)."""
    x = torch.log(torch.tensor([[0.2, 0.8], [0.5, 0.5]]))
    t = torch.tensor([[0.3, 0.7], [0.0, 1.0]], requires_grad=True)
    loss = kt.kl_div(x, t, reduction="sum")
    assert fast_path.calls  # declined by the front: the full route asked the fast path
    loss.backward()
    _, want = kldiv_spec.kl_div_backward(1.0, x, t.detach(), reduction="sum")
    assert same_bits(t.grad.numpy(), want.numpy())
    fast_path.clear()
    with torch.no_grad():  # no gradient wanted: ATen's route again
        kt.kl_div(x, t, reduction="sum")
    assert not fast_path.calls


TORCH_DECLINED = {
    "mixed": lambda: (torch.zeros(3), torch.ones(3, dtype=torch.float64)),
    "broadcast": lambda: (torch.zeros(2, 3), torch.ones(3)),
    "f16": lambda: (torch.zeros(3, dtype=torch.float16),) * 2,
    "int": lambda: (torch.zeros(3, dtype=torch.int64),) * 2,
    "numpy target": lambda: (torch.zeros(3), np.ones(3, np.float32)),
    "devices": lambda: (torch.zeros(3), torch.zeros(3, device="meta")),
    "sparse": lambda: (torch.zeros(3).to_sparse(), torch.ones(3)),
}


@requires_torch
@pytest.mark.parametrize("case", list(TORCH_DECLINED))
def test_torch_front_declines_without_raising(case: str, fast_path: FastPathCalls) -> None:
    """What the front declines takes the full route: the fast path is asked, or the full
    validation raises the specified error, the reference's own."""
    x, t = TORCH_DECLINED[case]()
    got = outcome(kldiv_spec.kl_div, x, t, reduction="sum")
    if got[0] == "value":
        assert fast_path.calls  # the full route asked the fast path
    with kldiv_spec.use_reference():
        want = outcome(kldiv_spec.kl_div, x, t, reduction="sum")
    assert got[0] == want[0]
    if got[0] == "value":
        assert same_bits(got[1].detach().float().numpy(), want[1].detach().float().numpy())
    else:
        assert got[1] == want[1]


@requires_torch
@pytest.mark.parametrize(
    ("reduction", "log_target"), [("avg", False), (["sum"], False), ("sum", 0)]
)
def test_torch_front_leaves_bad_options_to_the_validation(
    reduction: Any, log_target: Any, fast_path: FastPathCalls
) -> None:
    options = {"reduction": reduction, "log_target": log_target}
    got = outcome(kldiv_spec.kl_div, torch.zeros(3), torch.ones(3), **options)
    with kldiv_spec.use_reference():
        want = outcome(kldiv_spec.kl_div, torch.zeros(3), torch.ones(3), **options)
    assert got[0] == "error" and got[1] == want[1]
    assert not fast_path.calls


@requires_torch
def test_torch_front_errors_are_the_specified_ones(kt: ModuleType) -> None:
    with pytest.raises(ValueError, match="cannot be broadcast"):
        kt.kl_div(torch.zeros(2, 3), torch.ones(2, 4), reduction="sum")
    with pytest.raises(TypeError, match="real floating-point"):
        kt.kl_div(torch.zeros(3, dtype=torch.int64), torch.ones(3), reduction="sum")
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        kt.kl_div(torch.zeros(3), torch.ones(3), reduction="avg")


@requires_torch
def test_torch_zero_dim_promotes_by_the_array_api(kt: ModuleType) -> None:
    """0-d float64 target with a float32 vector: float64 (the spec's deliberate difference)."""
    x = torch.log(torch.tensor([0.25, 0.75]))
    t = torch.tensor(0.5, dtype=torch.float64)
    assert kt.kl_div(x, t, reduction="none").dtype == torch.float64


@requires_torch
@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
def test_torch_empty_means_are_nan_with_a_graph(reduction: str, kt: ModuleType) -> None:
    x = torch.zeros(0, 3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loss = kt.kl_div(x, torch.zeros(0, 3), reduction=reduction)
    assert torch.isnan(loss) and loss.grad_fn is not None
    loss.backward()
    assert x.grad.shape == (0, 3)


@requires_torch
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_large_cpu_tensors_take_the_numpy_kernels(
    reduction: str,
    log_target: bool,
    kt: ModuleType,
    torch_fast: ModuleType,
    fast_path: FastPathCalls,
) -> None:
    """Same memory, the NumPy path's kernels: the same values as NumPy's fast path."""
    gen = torch.Generator().manual_seed(0)
    x = torch.log_softmax(torch.randn(40, 2000, generator=gen), dim=1)
    t = torch.softmax(torch.randn(40, 2000, generator=gen), dim=1)
    if log_target:
        t = t.log()
    assert x.numel() >= torch_fast.MIN_ELEMENTS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        xg = x.clone().requires_grad_()
        got = kt.kl_div(xg, t, reduction=reduction, log_target=log_target)
        assert fast_path.took("torch.kl_div") == 1
        want = kldiv_spec.kl_div(x.numpy(), t.numpy(), reduction=reduction, log_target=log_target)
        assert fast_path.took("numpy.kl_div") == 1
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
    fast_path.clear()
    bx, bt = kldiv_spec.kl_div_backward(g, x, t, reduction=reduction, log_target=log_target)
    assert fast_path.took("torch.kl_div_backward") == 1
    assert same_bits(bx.numpy(), gx) and same_bits(bt.numpy(), gt)


@requires_torch
def test_torch_requires_grad_input_memory_is_shared_not_copied(
    kt: ModuleType, torch_fast: ModuleType
) -> None:
    x = torch.zeros(300, 300, requires_grad=True)
    t = torch.full((300, 300), 0.5)
    assert torch_fast._numpy(x).__array_interface__["data"][0] == x.data_ptr()
    loss = kt.kl_div(x, t, reduction="sum")
    torch.testing.assert_close(loss, torch.tensor(90_000 * 0.5 * math.log(0.5)))
