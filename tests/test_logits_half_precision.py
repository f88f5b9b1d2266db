"""Half-precision logits (float16, bfloat16) in the compiled from-logits kernel.

The kernel widens each row exactly to float32, runs the float32 passes and rounds the
gradient and the ``'none'`` terms once to the dtype: so ``rows_half`` must equal
``rows_f32`` on the widened logits, rounded, bit for bit. Through the public API (NumPy
float16, PyTorch float16 and bfloat16 on the CPU) the values are checked against the exact
oracle, against the float32 composition rounded to the dtype, and for the fast path being
taken at all.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import pytest
from _support import logits_fused_available, misaligned

from kldiv_spec import kl_div_from_logits
from kldiv_spec.backends import _blocks_logits
from kldiv_spec.conformance import oracle_logits as oracle

pytestmark = pytest.mark.skipif(
    not logits_fused_available(), reason="the compiled from-logits kernel is not built or no AVX2"
)


@pytest.fixture
def half_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record the ``bfloat16`` flag of every half-precision kernel call."""
    calls: list[bool] = []
    real = _blocks_logits._fused_logits

    def rows_half(*args: Any) -> Any:
        calls.append(bool(args[-1]))
        return real.rows_half(*args)

    fake = types.SimpleNamespace(
        rows_f32=real.rows_f32, rows_half=rows_half, available=real.available
    )
    monkeypatch.setattr(_blocks_logits, "_fused_logits", fake)
    return calls


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest even), as int16 bits."""
    return _blocks_logits.narrow(a.astype(np.float32), np.dtype(np.int16))


def widen(bits: np.ndarray) -> np.ndarray:
    return _blocks_logits.widen(bits)


def edge_logits(rows: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 logits with excluded classes on either side, whole -inf rows, NaN and +inf."""
    rng = np.random.default_rng(seed)
    s = rng.normal(0.0, 4.0, (rows, vocab)).astype(np.float32)
    t = (s + rng.normal(0.0, 2.0, (rows, vocab))).astype(np.float32)
    if rows >= 8:
        t[1, rng.random(vocab) < 0.7] = -np.inf  # a top-k teacher
        s[2, rng.random(vocab) < 0.1] = -np.inf  # a student excluding classes
        t[3, :] = -np.inf
        s[4, 0] = np.nan
        t[5, -1] = np.inf
        s[6, :] = -np.inf
        s[7, 1 % vocab] = -np.inf
        t[7, 1 % vocab] = -np.inf
    return s, t


# --------------------------------------------------------------------------- the kernel


def run(kernel: Any, s: Any, t: Any, out_dtype: Any, *, grad: bool, terms: bool, **kw: Any) -> Any:
    rows, vocab = s.shape
    kl = np.empty(rows)
    g = np.full(s.shape, 7, out_dtype) if grad else None
    e = np.full(s.shape, 7, out_dtype) if terms else None
    kernel(s, t, vocab, kl, g, e, kw["temperature"], 0.3, 1.7, kw["reverse"], *kw["extra"])
    return kl, g, e


@pytest.mark.parametrize("bfloat16", [False, True], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("vocab", [1, 7, 8, 9, 31, 100])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("reverse", [False, True])
def test_rows_half_is_rows_f32_on_the_widened_logits_rounded_once(
    bfloat16: bool, vocab: int, temperature: float, reverse: bool
) -> None:
    kernels = _blocks_logits._fused_logits
    s32, t32 = edge_logits(9, vocab, seed=vocab)
    if bfloat16:
        s, t = bf16_bits(s32), bf16_bits(t32)
        out = np.dtype(np.int16)
    else:
        s, t = s32.astype(np.float16), t32.astype(np.float16)
        out = np.dtype(np.float16)
    sw, tw = widen(s), widen(t)
    for grad, terms in ((True, False), (False, True), (True, True), (False, False)):
        kw = {"temperature": temperature, "reverse": reverse}
        kl, g, e = run(
            kernels.rows_half, s, t, out, grad=grad, terms=terms, extra=(bfloat16,), **kw
        )
        kl32, g32, e32 = run(
            kernels.rows_f32, sw, tw, np.float32, grad=grad, terms=terms, extra=(), **kw
        )
        np.testing.assert_array_equal(kl.view(np.uint64), kl32.view(np.uint64))
        if grad:
            np.testing.assert_array_equal(g, _blocks_logits.narrow(g32, out))
        if terms:
            np.testing.assert_array_equal(e, _blocks_logits.narrow(e32, out))


@pytest.mark.parametrize("bfloat16", [False, True], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("vocab", [1, 9, 300])
def test_rows_half_softmax_only_is_rows_f32_rounded_once(bfloat16: bool, vocab: int) -> None:
    """The forward gradient alone (no divergence asked: a backward) in half precision."""
    kernels = _blocks_logits._fused_logits
    s32, t32 = edge_logits(9, vocab, seed=vocab + 1)
    if bfloat16:
        s, t, out = bf16_bits(s32), bf16_bits(t32), np.dtype(np.int16)
    else:
        s, t, out = s32.astype(np.float16), t32.astype(np.float16), np.dtype(np.float16)
    g = np.full(s.shape, 7, out)
    kernels.rows_half(s, t, vocab, None, g, None, 2.0, 0.3, 1.0, False, bfloat16)
    g32 = np.full(s.shape, 7, np.float32)
    kernels.rows_f32(widen(s), widen(t), vocab, None, g32, None, 2.0, 0.3, 1.0, False)
    np.testing.assert_array_equal(g, _blocks_logits.narrow(g32, out))


@pytest.mark.parametrize("offset", [0, 2, 6, 18])
def test_rows_half_reads_and_writes_at_any_alignment(offset: int) -> None:
    kernels = _blocks_logits._fused_logits
    s32, t32 = edge_logits(8, 37, seed=3)
    s, t = s32.astype(np.float16), t32.astype(np.float16)
    want = np.empty(8), np.empty_like(s)
    kernels.rows_half(s, t, 37, want[0], want[1], None, 2.0, 0.5, 1.0, False, False)
    got = np.empty(8), misaligned(np.zeros_like(s), offset)
    kernels.rows_half(
        misaligned(s, offset),
        misaligned(t, 4),
        37,
        got[0],
        got[1],
        None,
        2.0,
        0.5,
        1.0,
        False,
        False,
    )
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_rows_half_refuses_other_buffers_by_name() -> None:
    kernels = _blocks_logits._fused_logits
    s = np.zeros((2, 4), np.float16)
    kl = np.empty(2)
    with pytest.raises(TypeError, match="s must be a C-contiguous float16"):
        kernels.rows_half(s.astype(np.float32), s, 4, kl, None, None, 1.0, 0.0, 1.0, False, False)
    with pytest.raises(TypeError, match="t must be a C-contiguous bfloat16"):
        kernels.rows_half(s.view(np.int16), s, 4, kl, None, None, 1.0, 0.0, 1.0, False, True)
    with pytest.raises(TypeError, match="grad must be a C-contiguous float16"):
        kernels.rows_half(
            s, s, 4, kl, np.empty((2, 4), np.float32), None, 1.0, 0.0, 1.0, False, False
        )
    with pytest.raises(TypeError, match="eleven arguments"):
        kernels.rows_half(s, s, 4, kl, None, None, 1.0, 0.0, 1.0, False)


def test_bfloat16_rounding_is_to_nearest_even_and_keeps_nan() -> None:
    # 1 + 2^-8 lies halfway between bfloat16 1 and 1 + 2^-7: even is 1; 1 + 3 * 2^-8
    # halfway between 1 + 2^-7 and 1 + 2^-6: even is 1 + 2^-6; 3.4e38 is above the
    # largest bfloat16 (3.3895e38) by more than half an ulp: inf; 1e-40 keeps its top bits
    values = np.array(
        [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.4e38, np.inf, -np.inf, 0.0, -0.0, 1e-40],
        np.float32,
    )
    want = np.array(
        [1.0, 1 + 2**-6, -1.0, np.inf, np.inf, -np.inf, 0.0, -0.0, 2.0**-133], np.float32
    )
    got = widen(bf16_bits(values))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    nan = widen(bf16_bits(np.array([np.nan, -np.nan], np.float32)))
    assert np.isnan(nan).all()


# --------------------------------------------------------------------------- NumPy float16


@pytest.mark.usefixtures("every_size")
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_numpy_float16_against_the_oracle(
    reduction: str, direction: str, half_calls: list[bool]
) -> None:
    rng = np.random.default_rng(5)
    s = rng.normal(0, 3, (6, 50)).astype(np.float16)
    t = (s + rng.normal(0, 1.5, (6, 50))).astype(np.float16)
    s[1, :20] = -np.inf
    t[2, 10:] = -np.inf
    before = s.copy(), t.copy()
    options = {"reduction": reduction, "direction": direction, "temperature": 2.0}
    out = kl_div_from_logits(s, t, **options)
    assert half_calls and not any(half_calls)  # the float16 kernel ran
    assert out.dtype == np.float16
    exact = oracle.from_logits(s, t, grad_output=0.75, **options)
    if reduction == "none":
        tol = oracle.pointwise_tolerance(exact)
        want = exact.terms
        tol = np.where(np.isfinite(tol), tol, 0.0)
    else:
        want, tol = oracle.reduce_logits(exact)
    got = np.asarray(out, np.float64)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite], np.asarray(want)[~finite])
    with np.errstate(invalid="ignore"):
        err = np.abs(got - want)
    assert (err[finite] <= np.broadcast_to(tol, got.shape)[finite]).all()
    np.testing.assert_array_equal(s, before[0])
    np.testing.assert_array_equal(t, before[1])


@pytest.mark.usefixtures("every_size")
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_numpy_float16_gradient_is_rounded_once(direction: str, half_calls: list[bool]) -> None:
    from kldiv_spec import kl_div_from_logits_backward

    rng = np.random.default_rng(6)
    s = rng.normal(0, 3, (8, 40)).astype(np.float16)
    t = rng.normal(0, 3, (8, 40)).astype(np.float16)
    g = np.float16(0.3)
    gs, gt = kl_div_from_logits_backward(g, s, t, temperature=1.5, direction=direction)
    assert gt is None and gs.dtype == np.float16 and half_calls
    exact = oracle.from_logits(s, t, grad_output=float(g), temperature=1.5, direction=direction)
    tol, _ = oracle.gradient_tolerance(exact)
    assert (np.abs(gs.astype(np.float64) - exact.grad_input) <= tol).all()
    # one rounding of the float32 gradient: never more than half an ulp plus float32's error
    with np.errstate(invalid="ignore", over="ignore"):
        ulp = np.spacing(np.abs(exact.grad_input).astype(np.float16)).astype(np.float64)
    bound = 0.5 * ulp + 1e-6 * np.abs(exact.grad_input) + 2**-24
    assert (np.abs(gs.astype(np.float64) - exact.grad_input) <= bound).all()


# --------------------------------------------------------------------------- PyTorch


torch = pytest.importorskip("torch")


def torch_logits(dtype: Any, rows: int = 16, vocab: int = 300, seed: int = 0) -> Any:
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
    t = (s.float() + torch.randn(rows, vocab, generator=gen) * 1.5).to(dtype)
    t[1, : vocab // 2] = -torch.inf
    s[2, vocab // 3 :] = -torch.inf
    return s, t


@pytest.mark.usefixtures("every_size")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("upstream", [1.0, 0.37])
def test_torch_half_is_the_float32_kernel_rounded_once(
    dtype: str, direction: str, upstream: float, half_calls: list[bool]
) -> None:
    import kldiv_spec.torch as kt

    dt = getattr(torch, dtype)
    s0, t = torch_logits(dt)
    s = s0.clone().requires_grad_()
    loss = kt.kl_div_from_logits(s, t, temperature=2.0, direction=direction)
    loss.backward(torch.tensor(upstream, dtype=dt))
    assert half_calls and all(flag == (dtype == "bfloat16") for flag in half_calls)
    assert loss.dtype == dt and s.grad is not None and s.grad.dtype == dt
    assert torch.equal(s0, s.detach())
    # the float32 kernel on the widened logits: the loss and gradient rounded once
    ops_scale = upstream * 1.0
    s32 = s0.float().requires_grad_()
    loss32 = kt.kl_div_from_logits(s32, t.float(), temperature=2.0, direction=direction)
    assert torch.equal(loss, loss32.detach().to(dt))
    loss32.backward(torch.tensor(ops_scale))
    assert s32.grad is not None
    # float32's own path multiplies a unit gradient by the upstream afterwards (two float32
    # roundings); the half path puts it into the scale: equal, or one half ulp apart at a tie
    got, want = s.grad.float(), s32.grad.to(dt).float()
    assert torch.equal(got.isnan(), want.isnan())
    ok = want.isfinite()
    assert torch.equal(got[~ok & ~want.isnan()], want[~ok & ~want.isnan()])
    diff = (got[ok] - want[ok]).abs()
    assert bool((diff <= torch.finfo(dt).eps * want[ok].abs() + torch.finfo(dt).tiny).all())


@pytest.mark.usefixtures("every_size")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_half_loss_no_worse_than_the_float32_composition_rounded(
    dtype: str, half_calls: list[bool]
) -> None:
    import torch.nn.functional as F

    import kldiv_spec.torch as kt

    dt = getattr(torch, dtype)
    worse = 0
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        s = (torch.randn(8, 200, generator=gen) * 3).to(dt)
        t = (torch.randn(8, 200, generator=gen) * 3).to(dt)
        ours = kt.kl_div_from_logits(s, t, temperature=2.0)
        comp = (
            F.kl_div(
                F.log_softmax(s.float() / 2.0, -1),
                F.softmax(t.float() / 2.0, -1),
                reduction="batchmean",
            )
            * 4.0
        )
        exact = oracle.reduce_logits(
            oracle.from_logits(s.float().numpy(), t.float().numpy(), temperature=2.0)
        )[0]
        err_ours = abs(float(ours) - float(exact))
        err_comp = abs(float(comp.to(dt)) - float(exact))
        worse += err_ours > err_comp
    assert half_calls
    assert worse == 0


@pytest.mark.usefixtures("every_size")
def test_torch_bfloat16_none_terms_and_mask(half_calls: list[bool]) -> None:
    import kldiv_spec.torch as kt

    s, t = torch_logits(torch.bfloat16, rows=6, vocab=70)
    terms = kt.kl_div_from_logits(s, t, reduction="none", temperature=1.5)
    want = kt.kl_div_from_logits(s.float(), t.float(), reduction="none", temperature=1.5)
    assert terms.dtype == torch.bfloat16
    assert torch.equal(terms, want.to(torch.bfloat16))
    mask = torch.tensor([True, False, True, True, False, True])
    masked = kt.kl_div_from_logits(s, t, mask=mask, temperature=1.5)
    want = kt.kl_div_from_logits(s.float(), t.float(), mask=mask, temperature=1.5)
    assert torch.equal(masked, want.to(torch.bfloat16))
    assert half_calls and all(half_calls)
