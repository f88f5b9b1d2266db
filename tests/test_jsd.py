"""The generalised Jensen-Shannon divergence: ``kl_div_from_logits(..., beta=)``.

Values against a float64 NumPy computation and an mpmath one written here (not the
conformance oracle), the endpoints (exactly the two KLs), gradients against finite
differences and against torch autograd of a plain torch JSD written here (trl's
``generalized_jsd_loss``), the validation of ``beta``, which calls the fast paths
take (the float32 kernel's own tests are in tests/test_jsd_fused.py), and every
library: array-api-strict, torch (double backward), JAX (jit and grad), Dask (lazy).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import _support
import numpy as np
import pytest

import kldiv_spec
from kldiv_spec import kl_div_from_logits, kl_div_from_logits_backward

to_numpy = functools.partial(_support.to_numpy, quiet=True)
inf, nan = math.inf, math.nan

BETAS = (0.0, 0.1, 0.3, 0.5, 0.9, 1.0)


def logits(shape: tuple[int, ...], seed: int, spread: float = 3.0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    s = rng.normal(0.0, spread, size=shape)
    return s, s + rng.normal(0.0, spread, size=shape)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (z - m) - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def np_jsd_terms(s: np.ndarray, t: np.ndarray, beta: float, temperature: float) -> np.ndarray:
    """The elementwise terms in float64 NumPy, from the definition (0 * anything = 0)."""
    with np.errstate(all="ignore"):
        lq, lp = _log_softmax(s / temperature), _log_softmax(t / temperature)
        p, q = np.exp(lp), np.exp(lq)
        if beta == 0.0:
            return np.where(p == 0, 0.0, p * (lp - lq))
        if beta == 1.0:
            return np.where(q == 0, 0.0, q * (lq - lp))
        m = beta * p + (1 - beta) * q
        lm = np.log(m)
        tp = np.where(p == 0, 0.0, p * (lp - lm))
        tq = np.where(q == 0, 0.0, q * (lq - lm))
        return beta * tp + (1 - beta) * tq


def mp_jsd_row(s: list[float], t: list[float], beta: float, temperature: float) -> float:
    """One row's divergence at 100 bits: beta sum p log p + (1-beta) sum q log q - sum m log m."""
    import mpmath

    ctx = mpmath.MPContext()
    ctx.prec = 100
    b = ctx.mpf(beta)

    def softmax(z: list[float]) -> list[Any]:
        e = [ctx.exp(ctx.mpf(v) / temperature) for v in z]
        total = ctx.fsum(e)
        return [v / total for v in e]

    p, q = softmax(t), softmax(s)

    def xlogx(v: Any) -> Any:
        return v * ctx.log(v) if v > 0 else ctx.mpf(0)

    m = [b * pi + (1 - b) * qi for pi, qi in zip(p, q, strict=True)]
    value = (
        b * ctx.fsum(xlogx(v) for v in p)
        + (1 - b) * ctx.fsum(xlogx(v) for v in q)
        - ctx.fsum(xlogx(v) for v in m)
    )
    return float(value)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean", "rowmean", "mean"])
def test_values_match_an_independent_numpy_computation(beta, reduction):
    s, t = logits((4, 7), 1)
    temp = 2.0
    terms = temp * temp * np_jsd_terms(s, t, beta, temp)
    want = {
        "none": terms,
        "sum": terms.sum(),
        "batchmean": terms.sum() / 4,
        "rowmean": terms.sum() / 4,
        "mean": terms.sum() / 28,
    }[reduction]
    got = kl_div_from_logits(s, t, temperature=temp, reduction=reduction, beta=beta)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("beta", [0.05, 0.3, 0.5, 0.77, 0.99])
def test_row_values_match_mpmath(beta):
    s, t = logits((3, 9), 2, spread=6.0)
    got = kl_div_from_logits(s, t, temperature=1.5, reduction="none", beta=beta)
    rows = got.sum(axis=-1) / 1.5**2
    for i in range(3):
        want = mp_jsd_row(list(s[i]), list(t[i]), beta, 1.5)
        assert abs(rows[i] - want) <= 1e-14 * (1 + abs(want)), (i, rows[i], want)


def test_float32_is_accurate():
    s, t = logits((4, 50), 3)
    got = kl_div_from_logits(s.astype(np.float32), t.astype(np.float32), beta=0.4)
    assert got.dtype == np.float32
    s32, t32 = s.astype(np.float32).astype(np.float64), t.astype(np.float32).astype(np.float64)
    want = np_jsd_terms(s32, t32, 0.4, 1.0).sum() / 4
    assert abs(float(got) - want) <= 1e-5 * want


def test_endpoints_are_exactly_the_two_kls():
    s, t = logits((3, 6), 4)
    for reduction in ("none", "sum", "rowmean"):
        common = {"temperature": 2.0, "reduction": reduction}
        forward = kl_div_from_logits(s, t, **common)
        reverse = kl_div_from_logits(s, t, direction="reverse", **common)
        np.testing.assert_array_equal(kl_div_from_logits(s, t, beta=0.0, **common), forward)
        np.testing.assert_array_equal(kl_div_from_logits(s, t, beta=1.0, **common), reverse)
        np.testing.assert_array_equal(kl_div_from_logits(s, t, beta=0, **common), forward)
        for b, d in ((0.0, "forward"), (1.0, "reverse")):
            g1 = kl_div_from_logits_backward(
                0.5 if reduction != "none" else np.ones(s.shape),
                s,
                t,
                beta=b,
                target_grad=True,
                **common,
            )
            g2 = kl_div_from_logits_backward(
                0.5 if reduction != "none" else np.ones(s.shape),
                s,
                t,
                direction=d,
                target_grad=True,
                **common,
            )
            np.testing.assert_array_equal(g1[0], g2[0])
            np.testing.assert_array_equal(g1[1], g2[1])


def test_the_endpoints_are_a_discontinuity():
    """Near 0 and 1 the mixture's divergence tends to 0, not to the KLs (docs/logits.md)."""
    s, t = logits((2, 5), 5)
    near0 = float(kl_div_from_logits(s, t, beta=1e-9))
    near1 = float(kl_div_from_logits(s, t, beta=1 - 1e-9))
    assert 0 <= near0 < 1e-7 and 0 <= near1 < 1e-7
    assert float(kl_div_from_logits(s, t, beta=0.0)) > 0.1
    assert float(kl_div_from_logits(s, t, beta=1.0)) > 0.1


def test_beta_none_keeps_the_kl():
    s, t = logits((3, 5), 6)
    for direction in ("forward", "reverse"):
        np.testing.assert_array_equal(
            kl_div_from_logits(s, t, direction=direction, beta=None),
            kl_div_from_logits(s, t, direction=direction),
        )


def test_symmetric_at_one_half_and_zero_at_identity():
    s, t = logits((3, 5), 7)
    a = kl_div_from_logits(s, t, beta=0.5, reduction="none").sum(-1)
    b = kl_div_from_logits(t, s, beta=0.5, reduction="none").sum(-1)
    np.testing.assert_allclose(a, b, rtol=1e-13)
    assert (a <= math.log(2) + 1e-15).all()  # the JSD is at most log 2
    z = kl_div_from_logits(s, s, beta=0.3, reduction="none")
    assert np.abs(z).max() <= 1e-15


def test_excluded_classes_and_masks():
    s = np.asarray([[0.0, -inf, 1.0, 2.0], [0.0, 1.0, 1.0, 2.0], [0.0, -inf, 1.0, -inf]])
    t = np.asarray([[1.0, 0.5, 0.0, 2.0], [1.0, -inf, 0.0, 2.0], [1.0, 0.5, -inf, -inf]])
    beta = 0.3
    got = kl_div_from_logits(s, t, beta=beta, reduction="none")
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, np_jsd_terms(s, t, beta, 1.0), rtol=1e-13, atol=1e-300)
    # a class one side excludes: the other's weight times log(1 / its share of the mixture)
    _, lp = _log_softmax(s), _log_softmax(t)
    assert got[0, 1] == pytest.approx(beta * np.exp(lp[0, 1]) * -math.log(beta), rel=1e-13)
    assert got[2, 3] == 0.0  # excluded by both
    gs, gt = kl_div_from_logits_backward(1.0, s, t, beta=beta, target_grad=True)
    assert np.isfinite(gs).all() and np.isfinite(gt).all()
    assert gs[0, 1] == 0.0 and gt[1, 1] == 0.0 and gs[2, 3] == 0.0 and gt[2, 3] == 0.0
    # endpoints: the KLs' +inf
    assert kl_div_from_logits(s[:1], t[:1], beta=0.0) == inf
    assert kl_div_from_logits(s[1:2], t[1:2], beta=1.0) == inf
    # no softmax: NaN; masked rows: 0, every row masked: 0
    nan_row = np.asarray([[0.0, nan, 1.0, 2.0]])
    assert math.isnan(kl_div_from_logits(nan_row, t[:1], beta=0.5))
    keep = np.asarray([True, False, True])
    s_bad = s.copy()
    s_bad[1] = nan
    masked = kl_div_from_logits(s_bad, t, beta=0.5, reduction="rowmean", mask=keep)
    want = np_jsd_terms(s, t, 0.5, 1.0)[keep].sum() / 2
    assert float(masked) == pytest.approx(want, rel=1e-13)
    none = np.zeros(3, bool)
    for reduction in ("sum", "batchmean", "rowmean", "mean"):
        assert float(kl_div_from_logits(s_bad, t, beta=0.5, reduction=reduction, mask=none)) == 0
    gs, _ = kl_div_from_logits_backward(1.0, s_bad, t, beta=0.5, mask=none, reduction="rowmean")
    assert (gs == 0).all()


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("beta", [0.2, 0.5, 0.85])
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_gradients_match_finite_differences(beta, reduction):
    s, t = logits((2, 5), 8, spread=2.0)
    temp = 1.7
    g = np.asarray([[0.3, 1.0, -0.5, 2.0, 0.7], [1.1, -0.2, 0.4, 0.9, 1.5]])
    gout = g if reduction == "none" else 0.8

    def loss(a: np.ndarray, b: np.ndarray) -> float:
        out = kl_div_from_logits(a, b, temperature=temp, reduction=reduction, beta=beta)
        return float(np.sum(np.asarray(out) * gout))

    gs, gt = kl_div_from_logits_backward(
        gout, s, t, temperature=temp, reduction=reduction, beta=beta, target_grad=True
    )
    h = 1e-6
    for which, grad in ((0, gs), (1, gt)):
        fd = np.zeros_like(s)
        for idx in np.ndindex(s.shape):
            args_p, args_m = [s.copy(), t.copy()], [s.copy(), t.copy()]
            args_p[which][idx] += h
            args_m[which][idx] -= h
            fd[idx] = (loss(*args_p) - loss(*args_m)) / (2 * h)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


def test_the_analytic_student_gradient():
    """d/ds_j = (k/T) G q_j (g_j - sum_i q_i g_i), g = (1 - beta)(log q - log m)."""
    s, t = logits((3, 6), 9)
    temp, beta = 2.0, 0.35
    lq, lp = _log_softmax(s / temp), _log_softmax(t / temp)
    q, p = np.exp(lq), np.exp(lp)
    g = (1 - beta) * (lq - np.log(beta * p + (1 - beta) * q))
    want = temp * q * (g - np.sum(q * g, axis=-1, keepdims=True)) / 3  # T**2 / T, batchmean
    gs, _ = kl_div_from_logits_backward(1.0, s, t, temperature=temp, beta=beta)
    np.testing.assert_allclose(gs, want, rtol=1e-12, atol=1e-16)


def torch_generalized_jsd(student: Any, teacher: Any, beta: float, temperature: float) -> Any:
    """trl's GKDTrainer.generalized_jsd_loss, written with plain torch (batchmean per row)."""
    import torch
    import torch.nn.functional as F

    s_lp = F.log_softmax(student / temperature, dim=-1)
    t_lp = F.log_softmax(teacher / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s_lp, t_lp, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t_lp, s_lp, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s_lp.dtype)
        mix = torch.logsumexp(torch.stack([s_lp + torch.log(1 - b), t_lp + torch.log(b)]), dim=0)
        kl_teacher = F.kl_div(mix, t_lp, reduction="none", log_target=True)
        kl_student = F.kl_div(mix, s_lp, reduction="none", log_target=True)
        jsd = b * kl_teacher + (1 - b) * kl_student
    return jsd.sum() / jsd.size(0)


@pytest.mark.parametrize("beta", BETAS)
def test_torch_autograd_matches_a_plain_torch_jsd(beta):
    torch = pytest.importorskip("torch")
    s, t = logits((3, 6), 10)
    temp = 2.0
    xs, xt = torch.tensor(s, requires_grad=True), torch.tensor(t, requires_grad=True)
    out = kl_div_from_logits(
        xs, xt, temperature=temp, beta=beta, scale_by_temperature_squared=False
    )
    gs, gt = torch.autograd.grad(out, (xs, xt))
    ys, yt = torch.tensor(s, requires_grad=True), torch.tensor(t, requires_grad=True)
    want = torch_generalized_jsd(ys, yt, beta, temp)
    ws, wt = torch.autograd.grad(want, (ys, yt))
    assert out.item() == pytest.approx(want.item(), rel=1e-12)
    np.testing.assert_allclose(gs.numpy(), ws.numpy(), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(gt.numpy(), wt.numpy(), rtol=1e-10, atol=1e-15)
    # and the analytic backward gives the same
    ns, nt = kl_div_from_logits_backward(
        1.0,
        s,
        t,
        temperature=temp,
        beta=beta,
        scale_by_temperature_squared=False,
        target_grad=True,
    )
    np.testing.assert_allclose(gs.numpy(), ns, rtol=1e-13, atol=1e-17)
    np.testing.assert_allclose(gt.numpy(), nt, rtol=1e-13, atol=1e-17)


def test_torch_gradcheck_and_double_backward():
    torch = pytest.importorskip("torch")
    s, t = logits((2, 4), 11, spread=1.5)
    xs, xt = torch.tensor(s, requires_grad=True), torch.tensor(t, requires_grad=True)
    for reduction in ("sum", "none"):

        def f(a: Any, b: Any, r: str = reduction) -> Any:
            return kl_div_from_logits(a, b, temperature=1.5, reduction=r, beta=0.3)

        assert torch.autograd.gradcheck(f, (xs, xt))
        assert torch.autograd.gradgradcheck(f, (xs, xt))


def test_torch_front_end_and_module():
    torch = pytest.importorskip("torch")
    import kldiv_spec.torch as kt

    s, t = logits((3, 5), 12)
    xs, xt = torch.tensor(s), torch.tensor(t)
    want = kl_div_from_logits(s, t, temperature=2.0, beta=0.25)
    assert kt.kl_div_from_logits(xs, xt, 2.0, beta=0.25).item() == pytest.approx(float(want))
    criterion = kt.KLDivFromLogitsLoss(temperature=2.0, beta=0.25)
    assert "beta=0.25" in repr(criterion)
    assert criterion(xs, xt).item() == pytest.approx(float(want))
    with pytest.raises(ValueError, match="beta"):
        kt.KLDivFromLogitsLoss(beta=1.5)
    with pytest.raises(ValueError, match="beta"):
        kt.KLDivFromLogitsLoss(beta=0.5, direction="reverse")


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "beta", [nan, -0.1, 1.0000001, inf, True, False, np.asarray(0.5), [0.5], "0.5", 1j]
)
def test_invalid_beta_is_a_value_error_naming_it(beta):
    s, t = logits((2, 3), 13)
    with pytest.raises(ValueError, match="beta"):
        kl_div_from_logits(s, t, beta=beta)
    with pytest.raises(ValueError, match="beta"):
        kl_div_from_logits_backward(1.0, s, t, beta=beta)


def test_beta_with_reverse_is_a_value_error():
    s, t = logits((2, 3), 14)
    for beta in (0.0, 0.5, 1.0):
        with pytest.raises(ValueError, match="beta"):
            kl_div_from_logits(s, t, beta=beta, direction="reverse")
    # NumPy scalars are real numbers
    assert np.isfinite(kl_div_from_logits(s, t, beta=np.float32(0.5)))


# --------------------------------------------------------------------------- fast paths


def test_the_numpy_fast_path_takes_the_endpoints_as_the_kls_and_float64_beta_not(monkeypatch):
    """beta = 0 and 1 go to the KL kernels (as the forward and reverse KL); the JSD's own
    kernel takes float32 only, so float64 logits with 0 < beta < 1 go to the reference."""
    from kldiv_spec import _settings, _validation
    from kldiv_spec.backends import logits_numpy

    monkeypatch.setattr(
        _settings, "current", _settings.read({"KLDIV_SPEC_NUMPY_MIN_ELEMENTS": "0"})
    )
    s, t = logits((4, 6), 15)
    assert s.dtype == np.float64

    def operands(beta: float) -> Any:
        return _validation.logits_operands(
            s,
            t,
            temperature=2.0,
            reduction="sum",
            axis=-1,
            direction="forward",
            scale_by_temperature_squared=True,
            mask=None,
            beta=beta,
        )

    g = np.asarray(1.0)
    ops = operands(0.5)
    assert logits_numpy.kl_div_from_logits(ops) is NotImplemented
    assert logits_numpy.kl_div_from_logits_backward(g, ops, False) is NotImplemented
    for beta, direction in ((0.0, "forward"), (1.0, "reverse")):
        ops = operands(beta)
        got = logits_numpy.kl_div_from_logits(ops)
        want = kl_div_from_logits(s, t, temperature=2.0, direction=direction, reduction="sum")
        assert got is not NotImplemented and float(got) == float(want)
        gs, _ = logits_numpy.kl_div_from_logits_backward(g, ops, False)
        ws, _ = kl_div_from_logits_backward(
            g, s, t, temperature=2.0, direction=direction, reduction="sum"
        )
        np.testing.assert_array_equal(gs, ws)
    with kldiv_spec.use_reference():
        want = kl_div_from_logits(s, t, temperature=2.0, beta=0.5)
    assert float(kl_div_from_logits(s, t, temperature=2.0, beta=0.5)) == float(want)


@pytest.mark.parametrize("library", ["torch", "jax", "dask"])
def test_other_fast_paths_return_not_implemented(library):
    pytest.importorskip(library if library != "dask" else "dask.array")
    import importlib

    from kldiv_spec import _validation

    s, t = logits((2, 4), 16)
    if library == "torch":
        import torch

        s, t = torch.tensor(s), torch.tensor(t)
    elif library == "jax":
        import jax.numpy as jnp

        s, t = jnp.asarray(s), jnp.asarray(t)
    else:
        import dask.array as da

        s, t = da.from_array(s), da.from_array(t)
    module = importlib.import_module(f"kldiv_spec.backends.logits_{library}")
    ops = _validation.logits_operands(
        s,
        t,
        temperature=1.0,
        reduction="sum",
        axis=-1,
        direction="forward",
        scale_by_temperature_squared=True,
        mask=None,
        beta=0.5,
    )
    assert module.kl_div_from_logits(ops) is NotImplemented
    g = ops.xp.asarray(1.0, dtype=ops.dtype)
    assert module.kl_div_from_logits_backward(g, ops, True) is NotImplemented


# --------------------------------------------------------------------------- libraries


def test_array_api_strict():
    xs = pytest.importorskip("array_api_strict")
    s, t = logits((3, 5), 17)
    mask = np.asarray([True, False, True])
    for beta in (0.0, 0.4, 1.0):
        for reduction in ("none", "rowmean"):
            options = {"temperature": 2.0, "reduction": reduction, "beta": beta}
            got = kl_div_from_logits(
                xs.asarray(s), xs.asarray(t), mask=xs.asarray(mask), **options
            )
            want = kl_div_from_logits(s, t, mask=mask, **options)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-14, atol=1e-300)
            g = 1.0 if reduction != "none" else xs.ones((3, 5), dtype=xs.float64)
            gs, gt = kl_div_from_logits_backward(
                g, xs.asarray(s), xs.asarray(t), mask=xs.asarray(mask), target_grad=True, **options
            )
            ws, wt = kl_div_from_logits_backward(
                1.0 if reduction != "none" else np.ones((3, 5)),
                s,
                t,
                mask=mask,
                target_grad=True,
                **options,
            )
            np.testing.assert_allclose(np.asarray(gs), ws, rtol=1e-13, atol=1e-17)
            np.testing.assert_allclose(np.asarray(gt), wt, rtol=1e-13, atol=1e-17)


def test_jax_jit_and_grad():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    s, t = logits((3, 4), 18)
    mask = np.asarray([True, False, True])
    for beta in (0.0, 0.3, 1.0):

        def f(a: Any, b: Any, m: Any, beta: float = beta) -> Any:
            return kl_div_from_logits(a, b, temperature=2.0, mask=m, beta=beta)

        args = (jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask))
        np.testing.assert_allclose(jax.jit(f)(*args), f(*args), rtol=1e-14)
        np.testing.assert_allclose(
            jax.jit(f)(*args), kl_div_from_logits(s, t, temperature=2.0, mask=mask, beta=beta)
        )
        gs, gt = jax.jit(jax.grad(f, argnums=(0, 1)))(*args)
        ws, wt = kl_div_from_logits_backward(
            1.0, s, t, temperature=2.0, mask=mask, beta=beta, target_grad=True
        )
        np.testing.assert_allclose(np.asarray(gs), ws, rtol=1e-13, atol=1e-17)
        np.testing.assert_allclose(np.asarray(gt), wt, rtol=1e-13, atol=1e-17)


def test_dask_stays_lazy():
    da = pytest.importorskip("dask.array")
    import dask

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("Dask computed something inside kldiv_spec")

    s, t = logits((6, 5), 19)
    mask = np.asarray([True, True, False, True, False, True])
    sd, td = da.from_array(s, chunks=(2, 5)), da.from_array(t, chunks=(3, 5))
    md = da.from_array(mask, chunks=2)
    options = {"temperature": 2.0, "reduction": "rowmean", "beta": 0.6}
    with dask.config.set(scheduler=refuse):
        out = kl_div_from_logits(sd, td, mask=md, **options)
        gs, gt = kl_div_from_logits_backward(1.0, sd, td, mask=md, target_grad=True, **options)
    assert all(isinstance(a, da.Array) for a in (out, gs, gt))
    want = kl_div_from_logits(s, t, mask=mask, **options)
    ws, wt = kl_div_from_logits_backward(1.0, s, t, mask=mask, target_grad=True, **options)
    np.testing.assert_allclose(to_numpy(out), want, rtol=1e-13)
    np.testing.assert_allclose(to_numpy(gs), ws, rtol=1e-13, atol=1e-17)
    np.testing.assert_allclose(to_numpy(gt), wt, rtol=1e-13, atol=1e-17)
