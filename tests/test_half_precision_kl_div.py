"""``kl_div`` in half precision (bfloat16, float16): the compiled kernel of backends/_fused.c.

The kernel forms every term with the reference's operations, each rounded to the half
dtype where the reference (op by op in that dtype) rounds it, so its pointwise values
are the reference's bit for bit wherever its ``log`` and ``exp``, rounded to the dtype,
are the library's: checked for every one of the 65536 targets of each dtype. Its sums
are float64 sums of those values, rounded once: checked against ``math.fsum``. Edge
values, every tail length, unaligned and read-only buffers, untouched inputs, the
gradients, the threads, the refusals of wrong buffers, and that the fast paths take the
calls (the kernel is spied on).
"""

from __future__ import annotations

import importlib.util
import math
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from _support import edge_grid, kl_div, set_torch_min_elements, setenv, spy_fast_paths

import kldiv_spec
from kldiv_spec.backends import _blocks

pytestmark = pytest.mark.skipif(
    not _blocks.half_available(),
    reason="the compiled half-precision kernel is not built here, or this CPU has no AVX2/F16C",
)

FORMATS = ("bfloat16", "float16")
#: Inputs paired with every target in the exhaustive checks (edge values included).
XS = (0.0, -0.0, -1.0, -3.5, 2.0, -100.0, 1e-6, math.inf, -math.inf, math.nan)


def _torch() -> Any:
    return pytest.importorskip("torch")


def bits(a: Any) -> np.ndarray:
    """The 16-bit patterns of a half tensor or array (a copy, so NaN compares by payload)."""
    if hasattr(a, "detach"):
        torch = _torch()
        return a.detach().contiguous().view(torch.int16).numpy().copy()
    return np.ascontiguousarray(a).view(np.int16).copy()


def assert_same_values(got: Any, want: Any) -> None:
    """Equal bit for bit (zeros' signs included), NaN where the other has NaN (any payload)."""
    g, w = bits(got), bits(want)
    exp_mask = 0x7F80 if _dtype_name(got) == "bfloat16" else 0x7C00
    g_nan = ((g & exp_mask) == exp_mask) & ((g & ~np.int16(-32768) & ~exp_mask) != 0)
    w_nan = ((w & exp_mask) == exp_mask) & ((w & ~np.int16(-32768) & ~exp_mask) != 0)
    np.testing.assert_array_equal(g_nan, w_nan)
    np.testing.assert_array_equal(np.where(g_nan, 0, g), np.where(w_nan, 0, w))


def _dtype_name(a: Any) -> str:
    return str(a.dtype).replace("torch.", "")


def kernel_view(a: Any) -> np.ndarray:
    """The flat NumPy view the kernel reads: float16 itself, bfloat16's bits as int16."""
    if hasattr(a, "detach"):
        torch = _torch()
        a = a.detach()
        if a.dtype == torch.bfloat16:
            a = a.view(torch.int16)
        return a.numpy().reshape(-1)
    return np.asarray(a).reshape(-1)


def torch_half(values: Any, format: str) -> Any:
    torch = _torch()
    return torch.as_tensor(np.asarray(values, np.float32)).to(getattr(torch, format))


def every_half(format: str) -> Any:
    """Every one of the 65536 values of ``format``, as a torch tensor."""
    torch = _torch()
    patterns = torch.from_numpy(np.arange(65536, dtype=np.uint16).view(np.int16))
    return patterns.view(getattr(torch, format))


def reference(x: Any, t: Any, **options: Any) -> Any:
    with kldiv_spec.use_reference():
        return kl_div(x, t, **options)


def kernel_terms(x: Any, t: Any, format: str, log_target: bool) -> Any:
    """The kernel's pointwise loss of two half tensors (or float16 arrays), same kind."""
    out = x.clone() if hasattr(x, "clone") else np.empty_like(x)
    _blocks._fused.loss_half(kernel_view(x), kernel_view(t), kernel_view(out), format, log_target)
    return out


class _Counting:
    """The compiled module with its half kernels' calls recorded (name, elements)."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.calls: list[tuple[str, int]] = []

    def loss_sum_half(self, x: Any, t: Any, *args: Any) -> Any:
        self.calls.append(("loss_sum_half", len(memoryview(x))))
        return self._real.loss_sum_half(x, t, *args)

    def loss_half(self, x: Any, t: Any, out: Any, *args: Any) -> Any:
        self.calls.append(("loss_half", len(memoryview(x))))
        return self._real.loss_half(x, t, out, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """The calls of the compiled half kernels during the test."""
    counting = _Counting(_blocks._fused)
    monkeypatch.setattr(_blocks, "_fused", counting)
    return counting.calls


@pytest.fixture
def every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every call, however small, to the NumPy and PyTorch fast paths."""
    setenv(monkeypatch, "KLDIV_SPEC_NUMPY_MIN_ELEMENTS", "0")
    if importlib.util.find_spec("torch") is not None:  # (the NumPy-only CI has no torch)
        set_torch_min_elements(monkeypatch, 1)


# --- the kernel's pointwise values: the reference's ------------------------------------------


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("format", FORMATS)
def test_every_target_gives_the_torch_references_terms(format: str, log_target: bool) -> None:
    torch = _torch()
    t = every_half(format)
    for value in XS:
        x = torch.full_like(t, value)
        want = reference(x, t, reduction="none", log_target=log_target)
        assert_same_values(kernel_terms(x, t, format, log_target), want)


def test_every_float16_target_gives_the_numpy_references_terms() -> None:
    t = np.arange(65536, dtype=np.uint16).view(np.float16)
    for value in XS:
        x = np.full_like(t, value)
        want = reference(x, t, reduction="none")
        assert_same_values(kernel_terms(x, t, "float16", False), want)


def test_float16_log_target_differs_from_numpy_only_where_numpys_exp_does() -> None:
    """NumPy's own float16 exp (SVML on AVX-512 CPUs) is not always float32's exp rounded,
    as PyTorch's is; the kernel's terms are PyTorch's, so with log_target they differ from
    NumPy's reference exactly where the two exps do (4 of the 65536 targets there)."""
    torch = _torch()
    t = np.arange(65536, dtype=np.uint16).view(np.float16)
    with np.errstate(all="ignore"):
        numpys = np.exp(t)
    torchs = torch.exp(torch.from_numpy(t)).numpy()
    exps_differ = (bits(numpys) != bits(torchs)) & ~(np.isnan(numpys) & np.isnan(torchs))
    assert exps_differ.sum() <= 64  # a few last-bit differences, if any
    for value in XS:
        x = np.full_like(t, value)
        want = reference(x, t, reduction="none", log_target=True)
        got = kernel_terms(x, t, "float16", True)
        agree = (bits(got) == bits(want)) | (np.isnan(got) & np.isnan(want))
        assert not np.any(~agree & ~exps_differ)


@pytest.mark.parametrize("format", FORMATS)
def test_log_rounded_to_the_dtype_is_the_libraries(format: str) -> None:
    """The kernel's log (log_f32, the same vector code), rounded to the dtype, is torch's
    log of the half value for every positive half (and NumPy's, for float16)."""
    torch = _torch()
    t = every_half(format)
    t = t[(t > 0) & torch.isfinite(t)]
    wide = t.float().numpy()
    log = np.empty_like(wide)
    _blocks._fused.log_f32(wide, log)
    np.testing.assert_array_equal(bits(torch.from_numpy(log).to(t.dtype)), bits(torch.log(t)))
    if format == "float16":
        np.testing.assert_array_equal(bits(log.astype(np.float16)), bits(np.log(t.numpy())))


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("format", FORMATS)
def test_random_bit_patterns_give_the_references_terms(format: str, log_target: bool) -> None:
    torch = _torch()
    rng = np.random.default_rng(11)
    x, t = (
        torch.from_numpy(rng.integers(0, 65536, 300_000, dtype=np.uint16).view(np.int16)).view(
            getattr(torch, format)
        )
        for _ in range(2)
    )
    want = reference(x, t, reduction="none", log_target=log_target)
    assert_same_values(kernel_terms(x, t, format, log_target), want)
    if format == "float16" and not log_target:
        xn, tn = x.numpy(), t.numpy()
        assert_same_values(
            kernel_terms(xn, tn, format, False), reference(xn, tn, reduction="none")
        )


@pytest.mark.parametrize("format", FORMATS)
def test_terms_are_rounded_where_the_reference_rounds(format: str) -> None:
    """x = log t: the products t log t and t x nearly cancel; fusing or widening them
    (one rounding instead of three) would change the difference."""
    torch = _torch()
    gen = torch.Generator().manual_seed(5)
    t = (torch.rand(20_000, generator=gen) + 0.01).to(getattr(torch, format))
    x = torch.log(t)
    x = torch.nextafter(x, torch.full_like(x, math.inf))
    want = reference(x, t, reduction="none")
    got = kernel_terms(x, t, format, False)
    wide = (t.double() * torch.log(t.double()) - t.double() * x.double()).to(t.dtype)
    assert int((wide != want).sum()) > 1000  # the check can tell the two apart
    assert_same_values(got, want)


# --- sums ----------------------------------------------------------------------------------


def exact_total(terms: Any) -> float:
    """The float64 nearest the exact sum of half ``terms`` (math.fsum)."""
    return math.fsum(
        np.asarray(terms.float() if hasattr(terms, "float") else terms, np.float64)
        .ravel()
        .tolist()
    )


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("format", FORMATS)
def test_sum_of_every_length_and_offset_is_the_float64_sum_of_the_terms(
    format: str, log_target: bool
) -> None:
    torch = _torch()
    gen = torch.Generator().manual_seed(3)
    n_max = 70
    x = torch.log_softmax(torch.randn(n_max + 8, generator=gen) * 3, 0).to(getattr(torch, format))
    t = torch.softmax(torch.randn(n_max + 8, generator=gen) * 3, 0)
    t = (t.log() if log_target else t).to(x.dtype)
    kernel = _blocks._fused.loss_sum_half
    for n in [*range(0, n_max), 1001, 1007]:
        for offset in (0, 1, 5):
            if n + offset > n_max + 8:
                xs, ts = x.repeat(20)[offset : offset + n], t.repeat(20)[offset : offset + n]
            else:
                xs, ts = x[offset : offset + n], t[offset : offset + n]
            terms = kernel_terms(xs.contiguous(), ts.contiguous(), format, log_target)
            got = kernel(kernel_view(xs), kernel_view(ts), format, log_target)
            scale = math.fsum(abs(float(v)) for v in terms.float())
            assert abs(got - exact_total(terms)) <= 2.0**-50 * scale, (n, offset)
            assert math.copysign(1.0, got) == 1.0 or got < 0


@pytest.mark.parametrize("format", FORMATS)
def test_unaligned_buffers_give_the_aligned_results(format: str) -> None:
    """Buffers starting at odd bytes (a uint8 buffer viewed as 2-byte elements)."""
    torch = _torch()
    gen = torch.Generator().manual_seed(2)
    x = torch.log_softmax(torch.randn(203, generator=gen), 0).to(getattr(torch, format))
    t = torch.softmax(torch.randn(203, generator=gen), 0).to(x.dtype)
    xv, tv = kernel_view(x), kernel_view(t)
    for log_target in (False, True):
        aligned_sum = _blocks._fused.loss_sum_half(xv, tv, format, log_target)
        aligned_terms = np.empty_like(xv)
        _blocks._fused.loss_half(xv, tv, aligned_terms, format, log_target)
        for offset in (1, 3, 17):
            raws = [np.zeros(xv.nbytes + 64, np.uint8) for _ in range(3)]
            views = []
            for raw, a in zip(raws, (xv, tv, aligned_terms), strict=True):
                start = -raw.ctypes.data % 32 + offset
                v = raw[start : start + a.nbytes].view(a.dtype)
                v[...] = a
                assert v.ctypes.data % 32 == offset
                views.append(v)
            xu, tu, out = views
            assert _blocks._fused.loss_sum_half(xu, tu, format, log_target) == aligned_sum
            out[...] = 0
            _blocks._fused.loss_half(xu, tu, out, format, log_target)
            np.testing.assert_array_equal(out, aligned_terms)


def test_an_all_zero_sum_is_positive_zero() -> None:
    torch = _torch()
    for format in FORMATS:
        z = torch.zeros(37, dtype=getattr(torch, format))
        for x in (z, -z):
            total = _blocks._fused.loss_sum_half(kernel_view(x), kernel_view(z), format)
            assert total == 0.0 and math.copysign(1.0, total) == 1.0


def half_ulp(value: float, format: str) -> float:
    """The spacing of ``format`` at ``value``."""
    mantissa_bits, min_exponent = (7, -126) if format == "bfloat16" else (10, -14)
    exponent = max(math.frexp(abs(value))[1] - 1, min_exponent) if value else min_exponent
    return math.ldexp(1.0, exponent - mantissa_bits)


def _half_oracle(value: float, format: str) -> float:
    """``value`` rounded to ``format`` by exact rational arithmetic (nearest, ties to even)."""
    mantissa_bits, min_exponent, max_value = (
        (7, -126, float.fromhex("0x1.fep127")) if format == "bfloat16" else (10, -14, 65504.0)
    )
    if value == 0:
        return value
    exponent = max(math.frexp(abs(value))[1] - 1, min_exponent)
    quantum = Fraction(2) ** (exponent - mantissa_bits)
    q = Fraction(abs(value)) / quantum
    n = math.floor(q)
    if q - n > Fraction(1, 2) or (q - n == Fraction(1, 2) and n % 2 == 1):
        n += 1
    magnitude = n * quantum
    if magnitude > max_value:
        return math.copysign(math.inf, value)
    return math.copysign(float(magnitude), value)


@pytest.mark.parametrize("format", FORMATS)
def test_the_total_is_rounded_once(format: str) -> None:
    """round_half rounds the float64 total directly (PyTorch's torch.tensor(float, bfloat16)
    rounds through float32 first: twice)."""
    rng = np.random.default_rng(4)
    with np.errstate(invalid="ignore"):  # signalling NaNs among them
        every = every_half(format).float().numpy().astype(np.float64)
    finite = np.unique(np.abs(every[np.isfinite(every)]))
    mids = (finite[:-1] + finite[1:]) / 2
    values = [0.0, 1e-300, -1e-300, 1e300, -1e300, *rng.standard_normal(200) * 1e3]
    for m in rng.choice(mids, 3000):
        for v in (m, np.nextafter(m, np.inf), np.nextafter(m, -np.inf)):
            values += [float(v), -float(v)]
    for v in values:
        got, want = _blocks.round_half(v, format), _half_oracle(v, format)
        assert got == want and math.copysign(1, got) == math.copysign(1, want), v
    assert math.isnan(_blocks.round_half(math.nan, format))
    assert _blocks.round_half(-math.inf, format) == -math.inf


# --- the public entry points ----------------------------------------------------------------

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _operands(format: str, log_target: bool, shape: tuple[int, int] = (33, 517)) -> Any:
    torch = _torch()
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.log_softmax(torch.randn(shape, generator=gen) * 2, 1).to(getattr(torch, format))
    t = torch.softmax(torch.randn(shape, generator=gen) * 2, 1)
    if not log_target:
        t[0, :7] = 0.0  # 0 log 0
    t = (t.log() if log_target else t).to(x.dtype)
    return x, t


def _expected(x: Any, t: Any, reduction: str, log_target: bool) -> Any:
    """The reference's terms summed exactly, rounded once, divided as divide_total."""
    from kldiv_spec import _core

    torch = _torch()
    terms = reference(x, t, reduction="none", log_target=log_target)
    if reduction == "none":
        return terms
    total = torch.tensor(_half_oracle(exact_total(terms), _dtype_name(x)), dtype=x.dtype)
    d = {"sum": 1, "batchmean": x.shape[0], "mean": x.numel()}[reduction]
    return _core.divide_total(total, d, xp=__import__("array_api_compat").torch)


@pytest.mark.checks_fast_path
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("format", FORMATS)
def test_torch_values_and_input_gradient(
    format: str, log_target: bool, evaluation: Any, kernel_calls: list[Any]
) -> None:
    torch = _torch()
    x, t = _operands(format, log_target)
    for reduction in REDUCTIONS:
        xr = x.clone().requires_grad_()
        out = kl_div(xr, t, reduction=reduction, log_target=log_target)
        assert out.dtype == x.dtype
        if reduction == "none":
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
            grad_out = grad_out.to(x.dtype)
        else:
            grad_out = torch.tensor(1.5, dtype=x.dtype)
        out.backward(grad_out)
        with kldiv_spec.use_reference():
            xw = x.clone().requires_grad_()
            want = kl_div(xw, t, reduction=reduction, log_target=log_target)
            want.backward(grad_out)
        assert xr.grad.dtype == x.dtype
        assert_same_values(xr.grad, xw.grad)
        if evaluation == "fast_path" or reduction == "none":
            # ours: the exactly summed terms, rounded once; the reference: torch.sum
            assert_same_values(out.detach(), _expected(x, t, reduction, log_target))
    if evaluation == "fast_path":
        assert evaluation.calls.took("torch.kl_div") == len(REDUCTIONS)
        assert sorted({name for name, _ in kernel_calls}) == ["loss_half", "loss_sum_half"]
    else:
        assert not kernel_calls


@pytest.mark.checks_fast_path
@pytest.mark.parametrize("format", FORMATS)
def test_torch_edge_values(format: str, evaluation: Any) -> None:
    torch = _torch()
    x, t = edge_grid(torch.finfo(getattr(torch, format)))
    x, t = torch_half(x, format), torch_half(t, format)
    for log_target in (False, True):
        for reduction in ("none", "sum"):
            got = kl_div(x, t, reduction=reduction, log_target=log_target)
            want = reference(x, t, reduction=reduction, log_target=log_target)
            assert_same_values(got, want)  # NaN where the reference has NaN
        terms = reference(x, t, reduction="none", log_target=log_target)
        finite = torch.isfinite(terms)
        got = float(kl_div(x[finite], t[finite], reduction="sum", log_target=log_target))
        if evaluation == "fast_path":  # float64 sums of terms as large as 2^126: a bound
            exact = exact_total(terms[finite])
            scale = math.fsum(abs(v) for v in terms[finite].double().tolist())
            bound = int(finite.sum()) * 2.0**-53 * scale
            assert abs(got - exact) <= bound + half_ulp(exact, format) / 2


@pytest.mark.parametrize("format", FORMATS)
def test_torch_target_gradient_and_kl_div_backward_are_the_references(
    format: str, every_size: None, kernel_calls: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = _torch()
    from kldiv_spec.backends import torch as fast

    calls = spy_fast_paths(monkeypatch, [fast])
    x, t = _operands(format, False)
    xr, tr = x.clone().requires_grad_(), t.clone().requires_grad_()
    kl_div(xr, tr, reduction="batchmean").backward()
    with kldiv_spec.use_reference():
        xw, tw = x.clone().requires_grad_(), t.clone().requires_grad_()
        kl_div(xw, tw, reduction="batchmean").backward()
    assert_same_values(xr.grad, xw.grad)
    assert_same_values(tr.grad, tw.grad)
    got = kldiv_spec.kl_div_backward(torch.tensor(1.0), x, t, reduction="sum")
    with kldiv_spec.use_reference():
        want = kldiv_spec.kl_div_backward(torch.tensor(1.0), x, t, reduction="sum")
    for g, w in zip(got, want, strict=True):
        assert g.dtype == x.dtype
        assert_same_values(g, w)
    assert not calls.taken and calls.declined  # asked, and declined: the reference's
    assert not kernel_calls


@pytest.mark.parametrize("format", FORMATS)
def test_torch_without_the_kernel_gives_the_same_values(
    format: str, every_size: None, kernel_calls: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Switched off (or not built), the half route takes the call with ATen's operations
    and a float64 sum: the kernel's values, without the kernel."""
    _torch()
    from kldiv_spec.backends import torch as fast

    x, t = _operands(format, False)
    with_kernel = {r: kl_div(x, t, reduction=r) for r in REDUCTIONS}
    assert kernel_calls
    kernel_calls.clear()
    setenv(monkeypatch, "KLDIV_SPEC_NUMPY_FUSED", "0")
    calls = spy_fast_paths(monkeypatch, [fast])
    for reduction, want in with_kernel.items():
        assert_same_values(kl_div(x, t, reduction=reduction), want)
    assert not kernel_calls
    assert calls.took("kl_div") == len(REDUCTIONS)


def test_torch_double_backward_is_exact(every_size: None) -> None:
    torch = _torch()
    x, t = _operands("bfloat16", False, (4, 100))
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(kl_div(xr, t, reduction="sum"), xr, create_graph=True)
    with kldiv_spec.use_reference():
        xw = x.clone().requires_grad_()
        (w,) = torch.autograd.grad(kl_div(xw, t, reduction="sum"), xw, create_graph=True)
    assert_same_values(g.detach(), w.detach())
    assert g.requires_grad == w.requires_grad


@pytest.mark.parametrize("format", FORMATS)
def test_torch_inputs_are_not_modified(format: str, every_size: None) -> None:
    torch = _torch()
    x, t = _operands(format, False)
    before = bits(x), bits(t)
    xr = x.clone().requires_grad_()
    for reduction in REDUCTIONS:
        out = kl_div(xr, t, reduction=reduction)
        out.sum().backward()
        kl_div(x, t, reduction=reduction, log_target=True)
    np.testing.assert_array_equal(bits(x), before[0])
    np.testing.assert_array_equal(bits(t), before[1])
    np.testing.assert_array_equal(bits(xr.detach()), before[0])
    del torch


@pytest.mark.parametrize("format", FORMATS)
def test_result_does_not_depend_on_threads(
    format: str, every_size: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_blocks, "BLOCK_ELEMENTS", 1000)
    x, t = _operands(format, False, (40, 1003))
    results = []
    for threads in ("1", "2", "3"):
        setenv(monkeypatch, "KLDIV_SPEC_NUM_THREADS", threads)
        total = _blocks.half_sum(kernel_view(x), kernel_view(t), format=format, log_target=False)
        results.append((total, bits(kl_div(x, t, reduction="none"))))
    assert results[0][0] == results[1][0] == results[2][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])
    np.testing.assert_array_equal(results[0][1], results[2][1])


@pytest.mark.parametrize("format", FORMATS)
def test_cuda_and_unusual_tensors_go_elsewhere(
    format: str, every_size: None, kernel_calls: list[Any]
) -> None:
    torch = _torch()
    x, t = _operands(format, False)
    strided = kl_div(x.T, t.T, reduction="sum")  # not contiguous: the reference
    assert_same_values(strided, reference(x.T, t.T, reduction="sum"))
    mixed = kl_div(x, t.float(), reduction="sum")  # promoted: the reference
    assert mixed.dtype == torch.float32
    assert not kernel_calls


# --- NumPy float16 --------------------------------------------------------------------------


def _numpy_operands(log_target: bool, shape: tuple[int, int] = (29, 611)) -> tuple[Any, Any]:
    rng = np.random.default_rng(sum(shape))
    x = np.log(rng.dirichlet(np.ones(shape[1]), size=shape[0])).astype(np.float16)
    t = rng.dirichlet(np.ones(shape[1]) * 0.5, size=shape[0])
    if not log_target:
        t[0, :5] = 0.0  # 0 log 0
    t = (np.log(t) if log_target else t).astype(np.float16)
    return x, t


@pytest.mark.checks_fast_path
@pytest.mark.parametrize("log_target", [False, True])
def test_numpy_float16(log_target: bool, evaluation: Any, kernel_calls: list[Any]) -> None:
    x, t = _numpy_operands(log_target)
    for reduction in REDUCTIONS:
        got = kl_div(x, t, reduction=reduction, log_target=log_target)
        assert got.dtype == np.float16
        terms = reference(x, t, reduction="none", log_target=log_target)
        if reduction == "none":
            assert_same_values(got, terms)
            continue
        total = _half_oracle(exact_total(terms), "float16")
        d = {"sum": 1, "batchmean": x.shape[0], "mean": x.size}[reduction]
        want = total if d == 1 else np.float16(np.float32(total) / np.float32(d))
        if evaluation == "fast_path":
            assert_same_values(got, np.float16(want))
    if evaluation == "fast_path":
        want_calls = {"loss_sum_half"} if log_target else {"loss_sum_half", "loss_half"}
        assert {name for name, _ in kernel_calls} == want_calls
    else:
        assert not kernel_calls


def test_numpy_read_only_inputs_are_read_and_not_modified(
    every_size: None, kernel_calls: list[Any]
) -> None:
    x, t = _numpy_operands(False)
    x.flags.writeable = t.flags.writeable = False
    before = x.copy(), t.copy()
    for reduction in REDUCTIONS:
        kl_div(x, t, reduction=reduction)
    assert kernel_calls
    np.testing.assert_array_equal(bits(x), bits(before[0]))
    np.testing.assert_array_equal(bits(t), bits(before[1]))


def test_numpy_switched_off_uses_the_ufuncs(
    every_size: None, kernel_calls: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    x, t = _numpy_operands(False)
    on = kl_div(x, t, reduction="none"), kl_div(x, t, reduction="sum")
    kernel_calls.clear()
    setenv(monkeypatch, "KLDIV_SPEC_NUMPY_FUSED", "0")
    off = kl_div(x, t, reduction="none"), kl_div(x, t, reduction="sum")
    assert not kernel_calls
    assert_same_values(on[0], off[0])
    exact = exact_total(on[0])
    assert abs(float(on[1]) - exact) <= abs(float(off[1]) - exact)


def test_numpy_strided_operands_take_the_ufuncs(every_size: None, kernel_calls: list[Any]) -> None:
    x, t = _numpy_operands(False)
    got = kl_div(x.T, t.T, reduction="sum")
    assert not kernel_calls
    assert got.dtype == np.float16


# --- refusals ---------------------------------------------------------------------------------


def test_wrong_buffers_are_refused_by_name() -> None:
    f16 = np.zeros(8, np.float16)
    i16 = np.zeros(8, np.int16)
    u16 = np.zeros(8, np.uint16)
    loss_sum, loss = _blocks._fused.loss_sum_half, _blocks._fused.loss_half
    assert loss_sum(i16, u16, "bfloat16") == 0.0  # int16 and uint16 bits are both bfloat16
    for args, name in [
        ((np.zeros(8, np.float32), f16, "float16"), "x"),
        ((f16, i16, "float16"), "t"),
        ((f16, f16, "bfloat16"), "x"),
        ((i16, np.zeros(8, np.int32), "bfloat16"), "t"),
        ((f16[::2], f16[:4], "float16"), "x"),
        ((f16, "not a buffer", "float16"), "t"),
        ((f16.byteswap().view(f16.dtype.newbyteorder()), f16, "float16"), "x"),
    ]:
        with pytest.raises(TypeError, match=rf"^{name} must be a C-contiguous"):
            loss_sum(*args)
    read_only = np.zeros(8, np.float16)
    read_only.flags.writeable = False
    with pytest.raises(
        TypeError, match=r"^out must be a C-contiguous float16 buffer \(writable\)"
    ):
        loss(f16, f16, read_only, "float16")
    with pytest.raises(ValueError, match="same length"):
        loss_sum(f16, f16[:7], "float16")
    with pytest.raises(ValueError, match="same length"):
        loss(f16, f16, f16[:7].copy(), "float16")
    with pytest.raises(ValueError, match="format"):
        loss_sum(f16, f16, "float32")
    with pytest.raises(TypeError, match="format"):
        loss_sum(f16, f16, 16)
    with pytest.raises(TypeError, match="arguments"):
        loss_sum(f16, f16)
