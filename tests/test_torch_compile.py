"""Inside real training steps: torch.compile, torch.export, torch.func, autocast, determinism.

``kldiv_spec.torch.KLDivLoss``, ``kldiv_spec.torch.kl_div`` and ``kldiv_spec.kl_div``
on tensors compile with ``fullgraph=True`` and no graph break, with the eager
values and gradients; autocast follows PyTorch's policy for ``kl_div`` (its
float32 list); ``torch.export``, ``torch.func`` and deterministic algorithms keep
working; CUDA graph capture is checked when a GPU is present.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import kldiv_spec  # noqa: E402
import kldiv_spec.torch as kt  # noqa: E402
from kldiv_spec import _settings  # noqa: E402
from kldiv_spec.backends import torch as fast  # noqa: E402

# PyTorch's own code warns while it compiles (torch 2.13): Inductor calls
# torch.jit.script_method, Dynamo instantiates the autograd.Function it traces, and it
# notes that it traces through array-api-compat's lru_cache (the full route's checks).
pytestmark = [
    pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`"),
    pytest.mark.filterwarnings(
        "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
    ),
    pytest.mark.filterwarnings(
        "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
        ":DeprecationWarning"
    ),
]

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU: torch CUDA tests need a CUDA device"
)

Loss = Callable[..., "torch.Tensor"]


def entry_points(reduction: str, log_target: bool) -> dict[str, Loss]:
    """The three ways to call the loss on tensors, by name."""
    module = kt.KLDivLoss(reduction=reduction, log_target=log_target)
    return {
        "KLDivLoss": module,
        "kldiv_spec.torch.kl_div": lambda a, b: kt.kl_div(
            a, b, reduction=reduction, log_target=log_target
        ),
        "kldiv_spec.kl_div": lambda a, b: kldiv_spec.kl_div(
            a, b, reduction=reduction, log_target=log_target
        ),
    }


def operands(
    shape: tuple[int, ...], *, log_target: bool = False, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(shape, generator=gen, dtype=dtype)
    x = torch.log_softmax(z, dim=-1)
    t = torch.softmax(torch.randn(shape, generator=gen, dtype=dtype), dim=-1)
    t[..., 0] = 0.0  # a zero target: the 0 log 0 = 0 convention inside the graph
    return x, (t.log() if log_target else t)


def step(loss: Loss) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A training step's tail: log_softmax of logits, then the loss."""

    def run(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return loss(torch.log_softmax(z, dim=-1), t)

    return run


def value_and_grads(
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    t: torch.Tensor,
    *,
    target_grad: bool = False,
) -> tuple[torch.Tensor, ...]:
    zg = z.detach().clone().requires_grad_()
    tg = t.detach().clone().requires_grad_(target_grad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # reduction="mean"
        out = f(zg, tg)
    out.backward(torch.ones_like(out))
    grads = (zg.grad,) + ((tg.grad,) if target_grad else ())
    return (out.detach(), *grads)


CASES = [("batchmean", False), ("mean", False), ("none", True), ("sum", True)]


@pytest.mark.parametrize(("reduction", "log_target"), CASES)
def test_no_graph_break(reduction: str, log_target: bool) -> None:
    """``torch._dynamo.explain``: one graph, no break, for each entry point."""
    z, t = operands((4, 7), log_target=log_target)
    for name, loss in entry_points(reduction, log_target).items():
        torch._dynamo.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # reduction="mean", eagerly
            explained = torch._dynamo.explain(step(loss))(z.requires_grad_(), t)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), (
            name,
            explained.break_reasons,
        )


@pytest.mark.parametrize(("reduction", "log_target"), CASES)
def test_compiled_once_and_not_again(
    reduction: str, log_target: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One compilation per entry point: not again on the next calls, nor when the
    environment changes (the compiled code must not guard on it), as for ``F.kl_div``."""
    from torch._dynamo.testing import CompileCounter

    z, t = operands((4, 7), log_target=log_target)
    entries = entry_points(reduction, log_target)
    entries["F.kl_div"] = lambda a, b: F.kl_div(a, b, reduction=reduction, log_target=log_target)
    for name, loss in entries.items():
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(step(loss), backend=counter, fullgraph=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # reduction="mean", while tracing
            for i in range(3):
                compiled(z.requires_grad_(), t).sum().backward()
                monkeypatch.setenv(f"KLDIV_SPEC_TEST_UNRELATED_{name}_{i}", "1")
        assert counter.frame_count == 1, name


def aten_graphs() -> tuple[list[str], Callable[..., object]]:
    """A backend that keeps the forward ATen graph AOTAutograd traces (as text), and it."""
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[str] = []

    def keep(gm: torch.fx.GraphModule, example_inputs: object) -> Callable[..., object]:
        graphs.append(str(gm.graph))
        return gm.forward

    return graphs, aot_autograd(fw_compiler=keep)


def is_aten_route(graph: str) -> bool:
    """ATen's kl_div decomposes to xlogy(t, t) - t * x; the reference's 0 log 0 is a where."""
    return "aten.xlogy" in graph and "aten.where" not in graph


def test_use_reference_is_read_when_tracing() -> None:
    """Like the environment variable, ``use_reference()`` is read when the graph is traced.

    Outside a block the graph holds ATen's operations; a call inside a block reuses it
    (no recompilation: compiled code is not guarded on this package's state, as it is
    not on ``F.kl_div``'s); traced inside a block, the graph is the reference's, and
    stays so.
    """
    graphs, backend = aten_graphs()
    torch._dynamo.reset()
    loss = step(lambda a, b: kt.kl_div(a, b, reduction="sum"))
    compiled = torch.compile(loss, backend=backend, fullgraph=True)
    z, t = operands((4, 7))
    outside = compiled(z, t)
    with kldiv_spec.use_reference():
        inside = compiled(z, t)
        assert len(graphs) == 1 and is_aten_route(graphs[0])
        torch.compiler.reset()
        traced_inside = torch.compile(loss, backend=backend, fullgraph=True)
        reference = traced_inside(z, t)
    after = traced_inside(z, t)
    assert len(graphs) == 2 and not is_aten_route(graphs[1])
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)
    torch.testing.assert_close(reference, outside)
    torch.testing.assert_close(after, reference, rtol=0, atol=0)


def test_environment_variable_is_read_when_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    """``KLDIV_SPEC_REFERENCE=1`` in force at the first compiled call: the reference is
    traced; changed afterwards: the compiled code stays as it was (no recompilation)."""
    graphs, backend = aten_graphs()
    z, t = operands((4, 7))
    monkeypatch.setattr(_settings, "current", _settings.read({"KLDIV_SPEC_REFERENCE": "1"}))
    torch._dynamo.reset()
    compiled = torch.compile(
        step(lambda a, b: kldiv_spec.kl_div(a, b, reduction="sum")),
        backend=backend,
        fullgraph=True,
    )
    compiled(z, t)
    monkeypatch.setattr(_settings, "current", _settings.read({"KLDIV_SPEC_REFERENCE": "0"}))
    compiled(z, t)
    assert len(graphs) == 1 and not is_aten_route(graphs[0])


def test_guards_are_no_more_than_pytorchs() -> None:
    """Compiled code checks its guards on every call; ours must be no more than PyTorch's.

    Dynamo records the entry points as calls (as it records ``F.kl_div``) instead of
    tracing this package's Python, which would guard every function and global it read
    (about 40 checks more, 3-4% of a compiled 8x10 training step on the CPU).
    """
    x = torch.log_softmax(torch.randn(4, 7), dim=-1).requires_grad_()
    t = torch.softmax(torch.randn(4, 7), dim=-1)
    pairs = {
        "KLDivLoss": (
            kt.KLDivLoss(reduction="batchmean"),
            torch.nn.KLDivLoss(reduction="batchmean"),
        ),
        "kldiv_spec.torch.kl_div": (
            lambda a, b: kt.kl_div(a, b, reduction="batchmean"),
            lambda a, b: F.kl_div(a, b, reduction="batchmean"),
        ),
        "kldiv_spec.kl_div": (
            lambda a, b: kldiv_spec.kl_div(a, b, reduction="batchmean"),
            lambda a, b: F.kl_div(a, b, reduction="batchmean"),
        ),
    }
    for name, pair in pairs.items():
        guards = []
        for loss in pair:
            torch._dynamo.reset()
            guards.append([g.name for g in torch._dynamo.explain(step(loss))(x, t).out_guards])
        ours, theirs = guards
        assert len(ours) <= len(theirs), (name, ours, theirs)
        assert not [g for g in ours if "_dispatch" in g or "backends" in g], (name, ours)


@pytest.mark.parametrize(("reduction", "log_target"), CASES)
def test_fullgraph_values_and_gradients_equal_eager(reduction: str, log_target: bool) -> None:
    """Compiled (Inductor, fullgraph) against eager: values and input gradients."""
    z, t = operands((5, 9), log_target=log_target)
    for loss in entry_points(reduction, log_target).values():
        torch._dynamo.reset()
        compiled = torch.compile(step(loss), fullgraph=True)
        got = value_and_grads(compiled, z, t)
        want = value_and_grads(step(loss), z, t)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, equal_nan=True)
    # and they are PyTorch's
    ref = value_and_grads(
        step(lambda a, b: F.kl_div(a, b, reduction=reduction, log_target=log_target)), z, t
    )
    for a, b in zip(want, ref, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize(
    "case", ["target needs a gradient", "mixed dtypes", "broadcast", "bfloat16", "large"]
)
def test_fullgraph_on_the_other_routes(case: str) -> None:
    """Calls the fast front declines (the reference's autograd.Function) compile too."""
    shape = (64, 1000) if case == "large" else (3, 6)
    z, t = operands(shape)
    target_grad = case == "target needs a gradient"
    if case == "mixed dtypes":
        t = t.double()
    elif case == "broadcast":
        t = t[:1]
    elif case == "bfloat16":
        z, t = z.bfloat16(), t.bfloat16()
    if case == "large":
        assert z.numel() >= fast.MIN_ELEMENTS  # eager takes the blocked kernels
    loss = kt.KLDivLoss(reduction="batchmean")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step(loss))(z, t)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(step(loss), fullgraph=True)
    got = value_and_grads(compiled, z, t, target_grad=target_grad)
    want = value_and_grads(step(loss), z, t, target_grad=target_grad)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        tol = {"rtol": 1e-2, "atol": 1e-2} if case == "bfloat16" else {}
        torch.testing.assert_close(a, b, equal_nan=True, **tol)


def test_compiled_step_with_a_model_and_an_optimizer() -> None:
    """A whole distillation step compiles in one graph with the module inside."""
    gen = torch.Generator().manual_seed(3)
    student = torch.nn.Linear(6, 5)
    criterion = kt.KLDivLoss(reduction="batchmean")
    x = torch.randn(8, 6, generator=gen)
    teacher = torch.softmax(torch.randn(8, 5, generator=gen), dim=1)

    def loss_of(model: torch.nn.Module) -> torch.Tensor:
        return criterion(torch.log_softmax(model(x) / 2.0, dim=1), teacher) * 4.0

    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss_of)(student)
    assert explained.graph_break_count == 0
    compiled = torch.compile(loss_of, fullgraph=True)
    loss = compiled(student)
    loss.backward()
    got = student.weight.grad.clone()
    student.weight.grad = None
    loss_of(student).backward()
    torch.testing.assert_close(got, student.weight.grad)


# --- autocast ----------------------------------------------------------------------------


def _autocast_case(device: str, dtype: torch.dtype, reduction: str, log_target: bool) -> None:
    z, t = operands((6, 11), log_target=log_target)
    z, t = z.to(device), t.to(device)
    lin = torch.nn.Linear(11, 11).to(device)
    results = []
    for fn in (kt.kl_div, F.kl_div):
        zz = z.clone().requires_grad_()
        with torch.autocast(device, dtype=dtype), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            h = lin(zz)  # runs in the lower precision
            assert h.dtype == dtype
            loss = fn(torch.log_softmax(h, dim=1).to(dtype), t.to(dtype), reduction=reduction,
                      log_target=log_target)  # fmt: skip
        loss.sum().backward()
        results.append((loss.detach(), zz.grad))
    (ours, our_grad), (theirs, their_grad) = results
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    torch.testing.assert_close(our_grad, their_grad, equal_nan=True)


@pytest.mark.parametrize(("reduction", "log_target"), CASES)
def test_autocast_cpu_bfloat16_follows_pytorch(reduction: str, log_target: bool) -> None:
    """kl_div is on autocast's float32 list: bfloat16 operands are computed in float32."""
    _autocast_case("cpu", torch.bfloat16, reduction, log_target)


@needs_cuda
@pytest.mark.parametrize(("reduction", "log_target"), CASES)
def test_autocast_cuda_float16_follows_pytorch(reduction: str, log_target: bool) -> None:
    _autocast_case("cuda", torch.float16, reduction, log_target)


def test_autocast_keeps_float64_and_takes_the_full_route() -> None:
    """float64 is not cast (autocast leaves it); mixed with bfloat16 it promotes to float64."""
    x, t = operands((3, 4), dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same = kt.kl_div(x, t, reduction="sum")
        mixed = kt.kl_div(x, t.bfloat16(), reduction="sum")
        target_grad = kt.kl_div(
            x.float().bfloat16(), t.bfloat16().requires_grad_(), reduction="sum"
        )
    assert same.dtype == mixed.dtype == torch.float64
    assert target_grad.dtype == torch.float32  # cast, then the reference's Function
    torch.testing.assert_close(same, F.kl_div(x, t, reduction="sum"))


def test_autocast_off_leaves_half_precision_alone() -> None:
    x, t = operands((3, 4))
    assert kt.kl_div(x.bfloat16(), t.bfloat16(), reduction="sum").dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert kt.kl_div(x.bfloat16(), t.bfloat16(), reduction="sum").dtype == torch.bfloat16


# --- torch.export, torch.func, determinism, CUDA graphs ------------------------------------


class _Distill(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(6, 5)
        self.criterion = kt.KLDivLoss(reduction="batchmean")

    def forward(self, x: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return self.criterion(torch.log_softmax(self.head(x), dim=1), teacher)


def test_torch_export_of_a_module_holding_the_loss() -> None:
    gen = torch.Generator().manual_seed(4)
    model = _Distill()
    x = torch.randn(4, 6, generator=gen)
    teacher = torch.softmax(torch.randn(4, 5, generator=gen), dim=1)
    exported = torch.export.export(model, (x, teacher))
    torch.testing.assert_close(exported.module()(x, teacher), model(x, teacher))


@pytest.mark.parametrize("log_target", [False, True])
def test_torch_func_grad_vmap_jacrev(log_target: bool) -> None:
    x, t = operands((3, 5), log_target=log_target, dtype=torch.float64)

    def loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return kt.kl_div(a, b, reduction="sum", log_target=log_target)

    p = t.exp() if log_target else t
    gx = torch.func.grad(loss)(x, t)
    torch.testing.assert_close(gx, -p)
    gt = torch.func.grad(loss, argnums=1)(x, t)
    with kldiv_spec.use_reference():
        _, want_gt = kldiv_spec.kl_div_backward(1.0, x, t, reduction="sum", log_target=log_target)
    torch.testing.assert_close(gt, want_gt, equal_nan=True)
    rows = torch.func.vmap(loss)(x, t)
    pointwise = kt.kl_div(x, t, reduction="none", log_target=log_target)
    torch.testing.assert_close(rows, pointwise.sum(1), equal_nan=True)
    jac = torch.func.jacrev(lambda a: kt.kl_div(a, t, reduction="none", log_target=log_target))(x)
    torch.testing.assert_close(jac.reshape(15, 15), torch.diag(-p.reshape(-1)))


@pytest.mark.parametrize("shape", [(8, 10), (64, 1000)], ids=["front", "blocked"])
def test_deterministic_algorithms_give_the_same_bits(shape: tuple[int, int]) -> None:
    x, t = operands(shape)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(3):
            xg = x.clone().requires_grad_()
            loss = kt.kl_div(xg, t, reduction="batchmean")
            loss.backward()
            runs.append((loss.detach(), xg.grad))
    finally:
        torch.use_deterministic_algorithms(previous)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


@needs_cuda
@pytest.mark.parametrize("shape", [(8, 10), (256, 1000)], ids=["front", "triton"])
def test_cuda_graph_capture(shape: tuple[int, int]) -> None:
    """A captured CUDA graph replays the loss and its gradient."""
    x, t = operands(shape)
    x, t = x.cuda(), t.cuda()
    xg = x.clone().requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture
        for _ in range(2):
            xg.grad = None
            kt.kl_div(xg, t, reduction="batchmean").backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    xg.grad = None
    with torch.cuda.graph(graph):
        loss = kt.kl_div(xg, t, reduction="batchmean")
        loss.backward()
    x_new = torch.log_softmax(torch.randn_like(x), dim=1)
    with torch.no_grad():
        xg.copy_(x_new)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(loss, F.kl_div(x_new, t, reduction="batchmean"))
    torch.testing.assert_close(xg.grad, -t / shape[0])
