"""The Triton kernel of ``kl_div_from_logits``: in Triton's interpreter on the CPU, and on CUDA.

Triton reads ``TRITON_INTERPRET=1`` when it is imported, so the interpreted
tests run in a fresh process (``test_kernels_in_the_interpreter`` starts
``pytest`` on this file with the variable set); there CPU tensors take the
Triton path of :mod:`kldiv_spec.backends.logits_torch`. Tests with a ``cuda``
parameter run the same checks on a GPU (``benchmarks/gpu.sh`` selects them),
and ``test_compiles_for_cuda`` compiles the kernel for sm_90 without a GPU.
Values and gradients are checked against the exact oracle's bound and, for
edge values, against the reference exactly.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

import kldiv_spec  # noqa: E402
from kldiv_spec.backends import _triton_logits as kernel  # noqa: E402
from kldiv_spec.backends import logits_torch  # noqa: E402
from kldiv_spec.conformance import oracle_logits as oracle  # noqa: E402

INTERPRETED = kernel.interpreting()
CUDA = torch.cuda.is_available()
inf, nan = math.inf, math.nan

# "interpreted": CPU tensors in Triton's interpreter (the subprocess); "cuda": a GPU.
DEVICES = [
    pytest.param(
        "cpu", id="interpreted", marks=pytest.mark.skipif(not INTERPRETED, reason="subprocess")
    ),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not CUDA, reason="no GPU")),
]
in_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="runs in a subprocess with TRITON_INTERPRET=1 (see below)"
)


@pytest.mark.skipif(INTERPRETED, reason="this is the subprocess")
def test_kernels_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of 16 classes: a few dozen classes span several tiles."""
    monkeypatch.setattr(kernel, "MAX_BLOCK", 16)


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record the kernel's launches (keywords): the fast path, not the reference."""
    seen: list[dict[str, Any]] = []
    original = kernel.from_logits

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel, "from_logits", spy)
    return seen


def logits(shape: tuple[int, ...], seed: int, spread: float = 3.0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    s = rng.normal(0.0, spread, size=shape)
    return s, s + rng.normal(0.0, spread / 2, size=shape)


def assert_close(got: Any, want: Any, tol: Any, what: str) -> None:
    """Same NaN and infinities as ``want``; finite values within ``tol``."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, what
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=what)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite], want[~finite], err_msg=what)
    with np.errstate(invalid="ignore"):
        err = np.where(finite, np.abs(got - want), 0.0)
    bad = finite & ~(err <= tol)
    assert not bad.any(), f"{what}: error {err[bad]} above {np.broadcast_to(tol, err.shape)[bad]}"


def to_numpy(a: torch.Tensor) -> np.ndarray:
    return a.detach().cpu().to(torch.float64).numpy()


# --------------------------------------------------------------------------- through the API

# (shape, dtype, options): vocabularies over several tiles of 16, below one tile, one row.
CASES: list[tuple[tuple[int, ...], torch.dtype, dict[str, Any]]] = [
    ((3, 37), torch.float32, {"reduction": "batchmean", "temperature": 2.0}),
    ((3, 37), torch.float64, {"reduction": "sum", "direction": "reverse", "temperature": 0.7}),
    ((1, 50), torch.float32, {"reduction": "mean", "scale_by_temperature_squared": False}),
    ((4, 5), torch.float64, {"reduction": "rowmean", "temperature": 3.0}),
    ((2, 3, 20), torch.float32, {"reduction": "rowmean", "direction": "reverse"}),
    ((2, 3, 20), torch.float64, {"reduction": "batchmean", "temperature": 2.0}),
    ((4, 33), torch.float32, {"reduction": "sum", "direction": "reverse", "temperature": 4.0}),
    ((4, 16), torch.float64, {"reduction": "mean", "direction": "reverse", "temperature": 0.5}),
]
MASKS = {
    (3, 37): [True, False, True],
    (4, 5): [False, True, True, False],
    (2, 3, 20): [[True, False, True], [True, True, False]],
}


def _check_call(
    device: str, shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any], mask: Any
) -> None:
    s_np, t_np = logits(shape, seed=len(shape) + shape[-1])
    s = torch.tensor(s_np, dtype=dtype, device=device, requires_grad=True)
    t = torch.tensor(t_np, dtype=dtype, device=device)
    m = None if mask is None else torch.tensor(mask, device=device)
    g = 0.75
    loss = kldiv_spec.kl_div_from_logits(s, t, mask=m, **options)
    assert loss.dtype == dtype and loss.shape == ()
    assert type(loss.grad_fn).__name__ == "_TritonFromLogitsBackward"
    (grad,) = torch.autograd.grad(loss, s, torch.tensor(g, dtype=dtype, device=device))
    with torch.no_grad():
        no_grad = kldiv_spec.kl_div_from_logits(s, t, mask=m, **options)
    alone, none = kldiv_spec.kl_div_from_logits_backward(g, s.detach(), t, mask=m, **options)
    assert none is None and alone.dtype == dtype
    rounded = (s.detach().cpu().numpy(), t.cpu().numpy())  # in their dtype
    exact = oracle.from_logits(*rounded, mask=mask, grad_output=g, **options)
    value, tol = oracle.reduce_logits(exact)
    tol_s, _ = oracle.gradient_tolerance(exact)
    what = f"{shape} {dtype} {options} mask={mask is not None}"
    assert_close(to_numpy(loss), value, tol, f"value, {what}")
    assert_close(to_numpy(no_grad), value, tol, f"value without a gradient, {what}")
    assert_close(to_numpy(grad), exact.grad_input, tol_s, f"gradient, {what}")
    assert_close(to_numpy(alone), exact.grad_input, tol_s, f"backward alone, {what}")


@in_interpreter
@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("masked", [False, True], ids=["", "mask"])
@pytest.mark.parametrize(("shape", "dtype", "options"), CASES, ids=str)
def test_values_and_gradients_match_the_oracle(
    launches: list[dict[str, Any]],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    options: dict[str, Any],
    masked: bool,
) -> None:
    mask = MASKS.get(shape) if masked else None
    if masked and mask is None:
        pytest.skip("no mask for this shape")
    if masked and options["reduction"] == "batchmean" and len(shape) != 2:
        options = {**options, "reduction": "rowmean"}
    _check_call("cpu", shape, dtype, dict(options), mask)
    # the loss with its gradient, the loss alone, the backward alone: three launches
    assert len(launches) == 3
    assert [c["gw"] is not None for c in launches] == [True, False, True]


@pytest.mark.parametrize("device", DEVICES)
def test_values_and_gradients_on_a_device(device: str) -> None:
    for shape, dtype, options in CASES[:4]:
        _check_call(device, shape, dtype, dict(options), MASKS.get(shape))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_is_computed_in_float32(device: str, dtype: torch.dtype) -> None:
    s_np, t_np = logits((3, 40), 11)
    s = torch.tensor(s_np, dtype=dtype, device=device, requires_grad=True)
    t = torch.tensor(t_np, dtype=dtype, device=device)
    for direction in ("forward", "reverse"):
        options = {"temperature": 2.0, "direction": direction}
        loss = kldiv_spec.kl_div_from_logits(s, t, **options)
        assert type(loss.grad_fn).__name__ == "_TritonFromLogitsBackward"
        (grad,) = torch.autograd.grad(loss, s)
        alone, _ = kldiv_spec.kl_div_from_logits_backward(1.0, s.detach(), t, **options)
        with kldiv_spec.use_reference():
            want = kldiv_spec.kl_div_from_logits(s, t, **options)
            (want_grad,) = torch.autograd.grad(want, s)
        assert loss.dtype == grad.dtype == alone.dtype == dtype
        # float32 inside, one rounding to the dtype: the same value but for the last bit
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(loss, want, rtol=2 * ulp, atol=0)
        torch.testing.assert_close(grad, want_grad, rtol=2 * ulp, atol=2 * ulp / 64)
        torch.testing.assert_close(alone, want_grad, rtol=2 * ulp, atol=2 * ulp / 64)


# --------------------------------------------------------------------------- edge rows


def edge_rows(dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 40 classes (tiles of 16: edges in the first, a middle and the last tile)."""
    big = 1e308 if dtype == torch.float64 else 3e38
    rng = np.random.default_rng(5)
    base = rng.normal(0.0, 2.0, size=40)
    rows = []

    def row(s_edits: Any, t_edits: Any) -> None:
        """Append a row: ``(index or slice, value)`` edits of a random student and teacher."""
        s, t = base.copy(), base[::-1].copy()
        for j, v in s_edits:
            s[j] = v
        for j, v in t_edits:
            t[j] = v
        rows.append((s, t))

    row([(20, -inf)], [(20, -inf)])  # both exclude a class: it contributes 0
    row([(33, -inf)], [])  # the student excludes a class the teacher keeps: +inf (forward)
    row([], [(5, -inf), (37, -inf)])  # the teacher excludes classes the student keeps
    row([(slice(None), -inf)], [])  # the student excludes everything: NaN
    row([], [(slice(None), -inf)])  # the teacher excludes everything: NaN
    row([(35, nan)], [])  # NaN in the last tile
    row([], [(18, inf)])  # +inf in a middle tile
    row([], [(slice(0, 16), -inf)])  # a first tile of -inf only, then finite
    row([(slice(0, 20), -inf)], [(slice(0, 20), -inf)])
    row([(0, big), (39, -big)], [(0, big), (1, -big)])  # huge but finite
    row([(39, big)], [(39, big), (3, -big)])  # the maximum jumps in the last tile
    row([(slice(0, 16), -1000.0)], [(slice(0, 16), -1000.0)])  # rescales that underflow
    row([(slice(16, 40), -1000.0)], [(slice(16, 40), -1000.0)])
    # e^(x - m) is a subnormal, p = e^(x - m) / Z (Z > 20) underflows to 0: where the
    # other distribution excludes that class, the one-pass sum is +inf, the reference 0
    low = 4.0 - (742.5 if dtype == torch.float64 else 101.5)
    row([(7, -inf)], [(7, low), (slice(20, 40), 4.0)])
    row([(7, low), (slice(20, 40), 4.0)], [(7, -inf)])  # the same, reverse
    # the student keeps class 25 alone, which the teacher excludes: +inf both ways; in
    # reverse the student gradient is NaN at 25 and exactly 0 at the classes it excludes
    row([(slice(0, 25), -inf), (slice(26, 40), -inf)], [(25, -inf)])
    row([(25, -inf)], [(slice(0, 25), -inf), (slice(26, 40), -inf)])  # the teacher, forward
    s = np.stack([r[0] for r in rows])
    t = np.stack([r[1] for r in rows])
    return s, t


def _reference_rows(
    s: torch.Tensor, t: torch.Tensor, direction: str, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's per-row divergences (float64 sums of its terms) and 'sum' gradient."""
    options = {"direction": direction, "temperature": temperature}
    with kldiv_spec.use_reference():
        terms = kldiv_spec.kl_div_from_logits(
            s, t, reduction="none", scale_by_temperature_squared=False, **options
        )
        grad, _ = kldiv_spec.kl_div_from_logits_backward(
            0.75, s, t, reduction="sum", scale_by_temperature_squared=False, **options
        )
    with np.errstate(invalid="ignore"):
        return to_numpy(terms).sum(axis=1), to_numpy(grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_edge_rows_equal_the_reference(
    small_tiles: None, device: str, dtype: torch.dtype, direction: str
) -> None:
    s_np, t_np = edge_rows(dtype)
    with np.errstate(over="ignore"):
        s = torch.tensor(s_np, dtype=dtype, device=device)
        t = torch.tensor(t_np, dtype=dtype, device=device)
    temperature = 1.0
    want_kl, want_grad = _reference_rows(s, t, direction, temperature)
    exact = oracle.from_logits(
        to_numpy(s),
        to_numpy(t),
        reduction="none",
        direction=direction,
        scale_by_temperature_squared=False,
        grad_output=0.75,
    )
    eps = float(torch.finfo(dtype).eps)
    tol_rows = 8 * eps * exact.scale.sum(axis=1) + 40 * eps * np.abs(exact.terms).sum(axis=1)
    gw = torch.tensor(0.75, dtype=dtype, device=device)
    # forward: the one-pass sum (no gradient) and the terms of the gradient pass; reverse:
    # the one-pass sum feeds the gradient, one launch checks both
    for with_grad in (False, True) if direction == "forward" else (True,):
        kl, grad = kernel.from_logits(
            s,
            t,
            temperature=temperature,
            direction=direction,
            kept=None,
            gw=gw if with_grad else None,
            c=1.0,
        )
        assert kl is not None
        what = f"{direction} {dtype} with_grad={with_grad}"
        assert_close(to_numpy(kl), want_kl, tol_rows + 1e-300, f"rows, {what}")
        if grad is not None:
            tol_grad = 8 * eps * np.abs(want_grad) + 4 * eps * 0.75
            assert_close(to_numpy(grad), want_grad, tol_grad, f"gradient, {what}")
    # the rules of docs/logits.md, row by row
    kl_np = to_numpy(kl)
    assert np.isnan(kl_np[3:7]).all()
    # a class excluded by the weighting distribution only: +inf; by both, or by the other: 0
    infinite = ([1] if direction == "forward" else [2, 7]) + [15, 16]
    assert (kl_np[infinite] == inf).all()
    finite = [0, 8, 9, 11, 12, 13, 14] + ([2, 7] if direction == "forward" else [1])
    assert np.isfinite(kl_np[finite]).all()
    if dtype == torch.float32:
        # and the backward alone (need_loss=False) gives the same gradient
        none, alone = kernel.from_logits(
            s, t, temperature=1.0, direction=direction, kept=None, gw=gw, c=1.0, need_loss=False
        )
        assert none is None and alone is not None
        assert grad is not None
        np.testing.assert_array_equal(to_numpy(alone), to_numpy(grad))


@pytest.mark.parametrize("device", DEVICES)
def test_masked_rows_contribute_nothing(device: str) -> None:
    s_np, t_np = edge_rows(torch.float64)
    s = torch.tensor(s_np, device=device, requires_grad=True)
    t = torch.tensor(t_np, device=device)
    keep = np.ones(len(s_np), bool)
    keep[[1, 2, 3, 4, 5, 6, 7, 13, 14, 15, 16]] = False  # every row not finite, dropped
    m = torch.tensor(keep, device=device)
    for reduction, direction in [
        ("sum", "forward"),
        ("rowmean", "reverse"),
        ("batchmean", "reverse"),
        ("mean", "forward"),
    ]:
        options = {"reduction": reduction, "direction": direction, "temperature": 1.5}
        loss = kldiv_spec.kl_div_from_logits(s, t, mask=m, **options)
        assert type(loss.grad_fn).__name__ == "_TritonFromLogitsBackward"
        (grad,) = torch.autograd.grad(loss, s)
        with kldiv_spec.use_reference():
            want = kldiv_spec.kl_div_from_logits(s, t, mask=m, **options)
            (want_grad,) = torch.autograd.grad(want, s)
        assert math.isfinite(float(loss.detach()))
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-14)
        assert not grad[~m].any()
    # every row dropped: 0 and zero gradients
    none_kept = torch.zeros(len(s_np), dtype=torch.bool, device=device)
    zero = kldiv_spec.kl_div_from_logits(s, t, mask=none_kept, reduction="rowmean")
    (zero_grad,) = torch.autograd.grad(zero, s)
    assert float(zero.detach()) == 0.0 and not zero_grad.any()


# --------------------------------------------------------------------------- routing


@in_interpreter
def test_what_goes_to_the_reference(launches: list[dict[str, Any]]) -> None:
    s_np, t_np = logits((3, 6), 3)
    s = torch.tensor(s_np, requires_grad=True)
    t = torch.tensor(t_np, requires_grad=True)
    with kldiv_spec.use_reference():
        want = kldiv_spec.kl_div_from_logits(s, t, temperature=2.0)
        want_s, want_t = torch.autograd.grad(want, (s, t), create_graph=True)
        (want_ss,) = torch.autograd.grad(want_s.sum(), s)
    # the teacher's gradient: the loss from the kernel, the gradients from the reference
    loss = kldiv_spec.kl_div_from_logits(s, t, temperature=2.0)
    assert len(launches) == 1
    gs, gt = torch.autograd.grad(loss, (s, t))
    torch.testing.assert_close(gs, want_s, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(gt, want_t, rtol=1e-13, atol=1e-15)
    # double backward
    loss = kldiv_spec.kl_div_from_logits(s, t, temperature=2.0)
    (gs,) = torch.autograd.grad(loss, s, create_graph=True)
    (gss,) = torch.autograd.grad(gs.sum(), s)
    torch.testing.assert_close(gss, want_ss, rtol=1e-12, atol=1e-15)
    launched = len(launches)
    # 'none', another axis, mixed dtypes, strided logits: no launch
    kldiv_spec.kl_div_from_logits(s, t, reduction="none")
    kldiv_spec.kl_div_from_logits(s, t, axis=0)
    kldiv_spec.kl_div_from_logits(s.detach().float(), t.detach())
    kldiv_spec.kl_div_from_logits(s.detach().T, t.detach().T)
    kldiv_spec.kl_div_from_logits(s.detach()[:, :0], t.detach()[:, :0])  # no classes
    assert len(launches) == launched


@in_interpreter
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_the_total_is_rounded_then_divided(reduction: str) -> None:
    # The rows' float64 divergences a and delta: their float32 sum is a, their float64
    # sum is not; the loss is fl32(a) / D, as the reference divides its float32 sum.
    rows, vocab = 3, 1500
    d = rows if reduction == "batchmean" else rows * vocab
    ulp = 2.0**-23
    delta = 0.375 * ulp
    for k in range(1, 1 << 16):
        a = 1.0 + k * ulp
        rounded_first = (torch.tensor(a, dtype=torch.float32) / d).item()
        if rounded_first != torch.tensor((a + delta) / d, dtype=torch.float64).float().item():
            break
    x = torch.zeros(rows, vocab)
    ops = kldiv_spec._logits.logits_operands(
        x,
        x,
        temperature=1.0,
        reduction=reduction,
        axis=-1,
        direction="forward",
        scale_by_temperature_squared=True,
        mask=None,
    )
    kl = torch.tensor([a, 0.0, delta], dtype=torch.float64)
    got = logits_torch._reduced(ops, kl, None)
    assert got.dtype == torch.float32
    assert got.item() == rounded_first


# --------------------------------------------------------------------------- CUDA, compiled


def test_compiles_for_cuda() -> None:
    """Compile the kernel for sm_90 (no GPU needed): what the interpreter cannot check."""
    if INTERPRETED:
        pytest.skip("the interpreter is on in this process")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton without its CUDA backend")
    variants = [
        ("fp32", "fp32", {"FORWARD": True, "NEED_LOSS": True, "WITH_GRAD": False}),
        ("fp32", "fp32", {"FORWARD": True, "NEED_LOSS": True, "WITH_GRAD": True}),
        ("fp64", "fp64", {"FORWARD": False, "NEED_LOSS": True, "WITH_GRAD": True}),
        ("bf16", "fp32", {"FORWARD": False, "NEED_LOSS": False, "WITH_GRAD": True}),
    ]
    for i, (dt, cdt, flags) in enumerate(variants):
        constexprs = {
            **flags,
            "HAS_MASK": i % 2 == 1,
            "WIDE": dt == "fp64",
            "SCALED": i != 3,
            "BLOCK": 2048 if dt == "fp64" else 4096,
        }
        signature = {
            "w_ptr": f"*{dt}",
            "o_ptr": f"*{dt}",
            "kept_ptr": "*u8",
            "gw_ptr": f"*{cdt}",
            "kl_ptr": "*fp64",
            "grad_ptr": f"*{dt}",
            "vocab": "i32",
            "temperature": "fp64",
            "c": "fp64",
            **dict.fromkeys(constexprs, "constexpr"),
        }
        source = ASTSource(
            fn=kernel._from_logits_kernel, signature=signature, constexprs=constexprs
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Triton's notices about its own defaults
            compiled = triton.compile(
                source,
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": 8, "enable_fp_fusion": False},
            )
        ptx = compiled.asm["ptx"]
        if constexprs["SCALED"] and dt != "fp64":
            assert "div.rn.f32" in ptx  # the quotient by T is correctly rounded
