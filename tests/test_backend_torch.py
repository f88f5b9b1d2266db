"""The PyTorch fast path (blocked CPU kernels, Triton on CUDA) against the reference.

Calls go through the public functions; the fast path's protocol functions are spied on
(``fast_path``) where a test says whether it took a call or declined it.
"""

from __future__ import annotations

import math
import warnings

import pytest

torch = pytest.importorskip("torch")

from _support import FastPathCalls, set_torch_min_elements, spy_fast_paths  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kldiv_spec  # noqa: E402
from kldiv_spec.backends import _blocks  # noqa: E402
from kldiv_spec.backends import torch as fast  # noqa: E402

REDUCTIONS = ("none", "sum", "mean", "batchmean")
TARGETS = [0.0, -0.0, 1e-45, 1e-40, 1e-30, 0.3, 1.0, 2.0, -0.5, math.inf, -math.inf, math.nan]
TARGETS_LOG = [*TARGETS, -1000.0, 80.0]
INPUTS = [math.log(1e-40), -100.0, -1.0, 0.0, -0.0, 0.5, math.inf, -math.inf, math.nan, 3e38]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="no GPU: torch CUDA tests need a CUDA device"
        ),
    ),
]


@pytest.fixture
def fast_path(monkeypatch: pytest.MonkeyPatch) -> FastPathCalls:
    """The calls of the PyTorch fast path's protocol functions during the test."""
    return spy_fast_paths(monkeypatch, [fast])


@pytest.fixture
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take every call and cut it into blocks of 64 elements, so small data spans blocks."""
    set_torch_min_elements(monkeypatch, 1)
    monkeypatch.setattr(_blocks, "BLOCK_ELEMENTS", 64)


def assert_same(got: torch.Tensor, want: torch.Tensor, *, atol: float = 0.0) -> None:
    """Equal dtype, shape, NaN pattern and sign of zero; values within a few ulp."""
    assert got.dtype == want.dtype and got.shape == want.shape
    eps = torch.finfo(got.dtype).eps
    tiny = torch.finfo(got.dtype).smallest_normal * eps  # one subnormal ulp
    torch.testing.assert_close(
        got.cpu(), want.cpu(), rtol=4 * eps, atol=max(atol, 2 * tiny), equal_nan=True
    )
    finite = ~torch.isnan(want.cpu())
    assert torch.equal(torch.signbit(got.cpu()[finite]), torch.signbit(want.cpu()[finite]))


def assert_close_to_terms(got: torch.Tensor, want: torch.Tensor, terms: torch.Tensor) -> None:
    """Within 4 ulp of the terms' magnitude, element by element; NaN where the other is NaN."""
    assert got.dtype == want.dtype and got.shape == want.shape
    eps = torch.finfo(got.dtype).eps
    bound = torch.where(torch.isfinite(terms), 4 * eps * terms, 0.0)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    close = ((got - want).abs() <= bound) | (got == want)
    assert bool((close | nan).all()), (got[~(close | nan)], want[~(close | nan)])


def _divisor(x: torch.Tensor, reduction: str) -> int:
    return {"mean": x.numel(), "batchmean": x.shape[0] if x.ndim else 1}.get(reduction, 1)


def grid(dtype: torch.dtype, log_target: bool, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    targets = TARGETS_LOG if log_target else TARGETS
    t, x = torch.meshgrid(
        torch.tensor(targets, dtype=dtype), torch.tensor(INPUTS, dtype=dtype), indexing="ij"
    )
    return x.contiguous().to(device), t.contiguous().to(device)


def evaluate(
    x: torch.Tensor,
    t: torch.Tensor,
    g: torch.Tensor,
    *,
    reduction: str,
    log_target: bool,
    reference: bool,
) -> tuple[torch.Tensor, ...]:
    """Value and gradients through autograd, and both gradients from ``kl_div_backward``."""
    xg, tg = x.clone().requires_grad_(), t.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # reduction="mean"
        with kldiv_spec.use_reference(reference):
            loss = kldiv_spec.kl_div(xg, tg, reduction=reduction, log_target=log_target)
            loss.backward(g)
            bx, bt = kldiv_spec.kl_div_backward(
                g, x, t, reduction=reduction, log_target=log_target
            )
    if not reference:
        assert type(loss.grad_fn).__name__ == "_BlockedKLDivBackward"
    assert xg.grad is not None and tg.grad is not None
    return loss.detach(), xg.grad, tg.grad, bx, bt


@pytest.mark.usefixtures("tiny_blocks")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_edge_values_match_the_reference(
    device: str, dtype: torch.dtype, log_target: bool, reduction: str
) -> None:
    x, t = grid(dtype, log_target, device)
    shape = x.shape if reduction == "none" else ()
    g = torch.linspace(0.5, 1.5, math.prod(shape), dtype=dtype, device=device).reshape(shape)
    got = evaluate(x, t, g, reduction=reduction, log_target=log_target, reference=False)
    want = evaluate(x, t, g, reduction=reduction, log_target=log_target, reference=True)
    for a, b in zip(got, want, strict=True):
        assert_same(a, b)


finite = st.floats(-50, 50, allow_nan=False, width=32)
special = st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, 1e-38])


@pytest.mark.usefixtures("tiny_blocks")
@pytest.mark.parametrize("device", DEVICES)
@given(
    data=st.data(),
    n=st.integers(1, 300),
    log_target=st.booleans(),
    reduction=st.sampled_from(REDUCTIONS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_random_values_match_the_reference(
    device: str,
    data: st.DataObject,
    n: int,
    log_target: bool,
    reduction: str,
    dtype: torch.dtype,
) -> None:
    values = st.one_of(finite, special) if data.draw(st.booleans()) else finite
    xs = data.draw(st.lists(values, min_size=n, max_size=n))
    ts = data.draw(st.lists(st.one_of(st.floats(0, 1, width=32), values), min_size=n, max_size=n))
    rows = data.draw(st.sampled_from([d for d in (1, 2, 3, 5) if n % d == 0]))
    x = torch.tensor(xs, dtype=dtype, device=device).reshape(rows, -1)
    t = torch.tensor(ts, dtype=dtype, device=device).reshape(rows, -1)
    g = (
        torch.tensor(0.75, dtype=dtype, device=device)
        if reduction != "none"
        else torch.rand(x.shape, dtype=dtype).to(device)
    )
    got = evaluate(x, t, g, reduction=reduction, log_target=log_target, reference=False)
    want = evaluate(x, t, g, reduction=reduction, log_target=log_target, reference=True)
    # A reduction is a sum: its error is relative to the sum of magnitudes, not to the sum.
    with kldiv_spec.use_reference():
        magnitude = kldiv_spec.kl_div(x, t, reduction="none", log_target=log_target).abs()
    scale = float(magnitude[torch.isfinite(magnitude)].sum()) if magnitude.numel() else 0.0
    atol = 0.0 if reduction == "none" else 64 * torch.finfo(dtype).eps * scale
    if device == "cpu":
        # The CPU kernels are NumPy's, whose log and exp may differ from ATen's by an ulp:
        # where the terms of the loss (or of the target gradient) cancel, that is an ulp
        # of the terms, not of their difference.
        p = t.exp() if log_target else t
        log_p = t if log_target else torch.log(t)
        loss_terms = (p * log_p).abs() + (p * x).abs()
        gg = g.abs() if reduction == "none" else g.abs() / max(1, _divisor(x, reduction))
        if log_target:
            grad_t_terms = gg * p * ((t - x).abs() + 1)
        else:
            grad_t_terms = gg * (log_p.abs() + 1 + x.abs())
        if reduction == "none":
            assert_close_to_terms(got[0], want[0], loss_terms)
        else:
            assert_same(got[0], want[0], atol=atol)
        assert_same(got[1], want[1])
        assert_close_to_terms(got[2], want[2], grad_t_terms)
        assert_same(got[3], want[3])
        assert_close_to_terms(got[4], want[4], grad_t_terms)
        return
    assert_same(got[0], want[0], atol=atol)
    got, want = got[1:], want[1:]
    for a, b in zip(got, want, strict=True):
        assert_same(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("log_target", [False, True])
def test_large_sum_spans_blocks_and_is_accurate(
    device: str, log_target: bool, monkeypatch: pytest.MonkeyPatch, fast_path: FastPathCalls
) -> None:
    """Realistic blocks over 300k elements (CPU: 16384, CUDA: Triton's): the total is accurate."""
    monkeypatch.setattr(_blocks, "BLOCK_ELEMENTS", 1 << 14)
    gen = torch.Generator().manual_seed(0)
    x = torch.log_softmax(torch.randn(3, 100_003, generator=gen), dim=1)
    t = torch.softmax(torch.randn(3, 100_003, generator=gen), dim=1)
    if log_target:
        t = t.log()
    assert x.numel() > 2 * _blocks.BLOCK_ELEMENTS
    got = kldiv_spec.kl_div(x.to(device), t.to(device), reduction="sum", log_target=log_target)
    assert fast_path.took("kl_div") == 1 and not fast_path.declined
    assert got.device.type == device
    exact = torch.nn.functional.kl_div(
        x.double(), t.double(), reduction="sum", log_target=log_target
    )
    terms = torch.nn.functional.kl_div(
        x.double(), t.double(), reduction="none", log_target=log_target
    )
    bound = 2 * torch.finfo(torch.float32).eps * float(terms.abs().sum())
    assert abs(float(got) - float(exact)) <= bound
    assert got.dtype == torch.float32 and got.shape == ()


@pytest.mark.parametrize("device", DEVICES)
def test_backward_saves_only_the_inputs(device: str) -> None:
    x = torch.randn(4, 20_000, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.rand(4, 20_000, dtype=torch.float64, device=device)
    loss = kldiv_spec.kl_div(x, t, reduction="batchmean")
    saved = loss.grad_fn.saved_tensors
    assert len(saved) == 2
    assert saved[0].data_ptr() == x.data_ptr() and saved[1].data_ptr() == t.data_ptr()


@pytest.mark.usefixtures("tiny_blocks")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward(device: str, reduction: str, log_target: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    t = (torch.rand(3, 7, dtype=torch.float64, generator=gen) + 0.1).to(device).requires_grad_()

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return kldiv_spec.kl_div(a, b, reduction=reduction, log_target=log_target)

    assert type(f(x, t).grad_fn).__name__ == "_BlockedKLDivBackward"
    assert torch.autograd.gradgradcheck(f, (x, t))
    (gx, gt) = torch.autograd.grad(f(x, t).sum(), (x, t), create_graph=True)
    second = torch.autograd.grad((gx.sum() + gt.sum()), (x, t))
    with kldiv_spec.use_reference():
        (rx, rt) = torch.autograd.grad(f(x, t).sum(), (x, t), create_graph=True)
        want = torch.autograd.grad((rx.sum() + rt.sum()), (x, t))
    for a, b in zip(second, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.usefixtures("tiny_blocks")
def test_forward_mode_ad_and_torch_func_fall_back_to_the_reference() -> None:
    import torch.autograd.forward_ad as fwad

    x = torch.randn(2, 5, dtype=torch.float64)
    t = torch.rand(2, 5, dtype=torch.float64)
    dx = torch.randn(2, 5, dtype=torch.float64)
    with fwad.dual_level():
        with warnings.catch_warnings():
            # torch's first make_dual scripts its jvp decompositions with torch.jit.script
            warnings.simplefilter("ignore", DeprecationWarning)
            dual = fwad.make_dual(x, dx)
        out = kldiv_spec.kl_div(dual, t, reduction="sum")
        tangent = fwad.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, (-t * dx).sum())
    grad = torch.func.grad(lambda a: kldiv_spec.kl_div(a, t, reduction="sum"))(x)
    torch.testing.assert_close(grad, -t)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: (torch.zeros(100_000), torch.ones(100_000)), id="taken"),
        pytest.param(lambda: (torch.zeros(10), torch.ones(10)), id="small"),
        pytest.param(lambda: (torch.zeros(2, 50_000), torch.ones(1, 50_000)), id="broadcast"),
        pytest.param(
            lambda: (torch.zeros(100_000), torch.ones(100_000, dtype=torch.float64)), id="mixed"
        ),
        pytest.param(lambda: (torch.zeros(100_000, dtype=torch.float16),) * 2, id="float16"),
        pytest.param(lambda: (torch.zeros(400, 300).T, torch.ones(300, 400)), id="strided"),
        pytest.param(
            lambda: (torch.zeros(100_000, device="meta"), torch.ones(100_000, device="meta")),
            id="meta",
        ),
    ],
)
def test_declines_what_it_does_not_handle(make: object, fast_path: FastPathCalls) -> None:
    x, t = make()  # type: ignore[operator]
    # float32, and on the CPU float16 and bfloat16 (the half-precision route)
    taken = x.shape == t.shape and x.dtype == t.dtype and x.is_contiguous()
    taken = taken and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    taken = taken and x.numel() >= fast.MIN_ELEMENTS and x.device.type == "cpu"
    # the public function answers, through the fast path or (declined) ATen or the reference
    loss = kldiv_spec.kl_div(x, t, reduction="sum")
    assert loss.shape == ()
    assert fast_path.took("kl_div") == taken
    if not taken and x.numel() >= fast.MIN_ELEMENTS:
        assert fast_path.declined  # asked, and declined
    if x.device.type == "cpu":
        with kldiv_spec.use_reference():
            want = kldiv_spec.kl_div(x, t, reduction="sum")
        torch.testing.assert_close(loss, want)


def test_declines_while_compiling(
    monkeypatch: pytest.MonkeyPatch, fast_path: FastPathCalls
) -> None:
    x, t = torch.zeros(100_000), torch.ones(100_000)
    kldiv_spec.kl_div(x, t, reduction="sum")
    assert fast_path.took("kl_div") == 1
    fast_path.clear()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    loss = kldiv_spec.kl_div(x, t, reduction="sum")
    assert fast_path.declined and not fast_path.taken
    assert float(loss) == 0.0


def test_no_graph_without_requires_grad() -> None:
    x, t = torch.zeros(100_000), torch.full((100_000,), 0.5)
    loss = kldiv_spec.kl_div(x, t, reduction="sum")
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, torch.tensor(100_000 * 0.5 * math.log(0.5)))


@pytest.mark.slow
@pytest.mark.long  # the whole benchmark script on the CPU: about a minute
def test_gpu_script_dry_run() -> None:
    """``benchmarks/gpu.sh --dry-run`` runs the whole script on the CPU and prints the table."""
    import os
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).parents[1] / "benchmarks" / "gpu.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(script), "--dry-run"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tests collected" in result.stdout
    summary = result.stdout.split("\n== summary\n")[-1]
    steps = [line for line in summary.splitlines() if ": " in line and not line.startswith("|")]
    assert [s.split(":")[0] for s in steps] == ["benchmark", "logits", "tests", "conformance"]
    assert all(": ok" in s for s in steps), steps
    table = [line for line in summary.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + 2 * 2  # header, rule, two cases x (eager, kldiv_spec)
