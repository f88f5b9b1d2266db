"""``gaussian_kl``: the exact oracle, zero at identity, non-negative, gradients, every backend."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from _support import to_numpy

from kldiv_spec import gaussian_kl, gaussian_kl_backward
from kldiv_spec.conformance import oracle_logits as oracle


def operands(shape: tuple[int, ...] = (3, 4), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 2, size=shape), rng.normal(0, 1.5, size=shape)


def closed_form(
    c: float, mu: np.ndarray, lv: np.ndarray, mu_p: Any = 0.0, lv_p: Any = 0.0
) -> tuple[np.ndarray, ...]:
    """The derivatives of ``c * sum(KL)``, written out, w.r.t. mu, logvar and the priors.

    KL = (lv_p - lv + (e^lv + (mu - mu_p)^2) / e^lv_p - 1) / 2; the priors' derivatives
    are summed over the axes they are broadcast along (here: the leading one).
    """
    diff = mu - mu_p
    d_mu = c * diff / np.exp(lv_p)
    d_lv = c * 0.5 * np.expm1(lv - lv_p)
    d_mu_p = -d_mu
    d_lv_p = -c * 0.5 * (np.expm1(lv - lv_p) + diff**2 / np.exp(lv_p))
    if np.ndim(mu_p) < mu.ndim:
        d_mu_p, d_lv_p = d_mu_p.sum(axis=0), d_lv_p.sum(axis=0)
    return d_mu, d_lv, d_mu_p, d_lv_p


def bound(scale: np.ndarray, dtype: Any) -> np.ndarray:
    return oracle.GAUSSIAN_ULPS * float(np.finfo(dtype).eps) * scale + float(
        np.finfo(dtype).smallest_normal
    )


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean", "mean"])
def test_values_match_the_exact_oracle(xp, reduction):
    mu, lv = operands()
    mu_p, lv_p = operands((4,), 1)
    for priors in (
        {},
        {"mu_prior": 0.5, "logvar_prior": -1.0},
        {"mu_prior": mu_p, "logvar_prior": lv_p},
    ):
        args = {k: (xp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in priors.items()}
        out = to_numpy(gaussian_kl(xp.asarray(mu), xp.asarray(lv), reduction=reduction, **args))
        value, scale = oracle.gaussian(
            mu, lv, priors.get("mu_prior", 0.0), priors.get("logvar_prior", 0.0)
        )
        if reduction == "none":
            np.testing.assert_array_less(np.abs(out - value), bound(scale, np.float64))
            continue
        d = {"sum": 1, "batchmean": mu.shape[0], "mean": value.size}[reduction]
        want = math.fsum(value.ravel()) / d
        tol = (oracle.GAUSSIAN_ULPS + value.size) * 2.3e-16 * float(scale.sum()) / d
        assert out.shape == ()
        assert abs(float(out) - want) <= tol


def test_exactly_zero_at_identity_and_non_negative(xp):
    mu, lv = operands((5, 6), 2)
    for dtype in (xp.float32, xp.float64):
        m, v = xp.asarray(mu, dtype=dtype), xp.asarray(lv, dtype=dtype)
        same = gaussian_kl(m, v, mu_prior=m, logvar_prior=v, reduction="none")
        assert (to_numpy(same) == 0).all()
        assert float(to_numpy(gaussian_kl(m, v, mu_prior=m, logvar_prior=v, reduction="sum"))) == 0
        zero = xp.zeros((5, 6), dtype=dtype)
        assert float(to_numpy(gaussian_kl(zero, zero))) == 0.0
        assert (to_numpy(gaussian_kl(m, v, reduction="none")) >= 0).all()
    # near the prior: expm1 keeps the tiny terms positive and accurate
    tiny = xp.asarray([1e-9, -1e-9, 1e-5], dtype=xp.float64)
    got = to_numpy(gaussian_kl(xp.zeros(3, dtype=xp.float64), tiny, reduction="none"))
    np.testing.assert_allclose(got, 0.25 * to_numpy(tiny) ** 2, rtol=1e-5)


def test_gradients_match_the_oracle_formulas(xp):
    mu, lv = operands((3, 4), 3)
    mu_p, lv_p = operands((4,), 4)
    g = 0.5
    got = gaussian_kl_backward(
        g,
        xp.asarray(mu),
        xp.asarray(lv),
        mu_prior=xp.asarray(mu_p),
        logvar_prior=xp.asarray(lv_p),
        reduction="batchmean",
    )
    want = closed_form(g / 3, mu, lv, mu_p, lv_p)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(to_numpy(a), b, rtol=1e-13, atol=1e-16)
    _, _, none_mu, none_lv = gaussian_kl_backward(1.0, xp.asarray(mu), xp.asarray(lv))
    assert none_mu is None and none_lv is None


def test_gradients_match_finite_differences():
    mu, lv = operands((2, 3), 5)
    mu_p, lv_p = operands((3,), 6)
    args = [mu, lv, mu_p, lv_p]

    def f(a: list[np.ndarray]) -> float:
        return float(gaussian_kl(a[0], a[1], mu_prior=a[2], logvar_prior=a[3], reduction="mean"))

    grads = gaussian_kl_backward(1.0, mu, lv, mu_prior=mu_p, logvar_prior=lv_p, reduction="mean")
    h = 1e-6
    for which, grad in enumerate(grads):
        fd = np.zeros(args[which].shape)
        for idx in np.ndindex(fd.shape):
            up = [a.copy() for a in args]
            down = [a.copy() for a in args]
            up[which][idx] += h
            down[which][idx] -= h
            fd[idx] = (f(up) - f(down)) / (2 * h)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)


def test_torch_autograd_and_gradcheck():
    torch = pytest.importorskip("torch")
    mu, lv = (torch.tensor(a, requires_grad=True) for a in operands((2, 3), 7))
    lv_p = torch.tensor(operands((3,), 8)[1], requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: gaussian_kl(a, b, logvar_prior=c, mu_prior=0.3, reduction="none"),
        (mu, lv, lv_p),
    )
    assert torch.autograd.gradgradcheck(lambda a, b: gaussian_kl(a, b), (mu, lv))
    loss = gaussian_kl(mu, lv)  # 'batchmean': the divisor is mu.shape[0] = 2
    loss.backward()
    want = closed_form(1 / 2, mu.detach().numpy(), lv.detach().numpy())
    np.testing.assert_allclose(mu.grad.numpy(), want[0], rtol=1e-14)
    np.testing.assert_allclose(lv.grad.numpy(), want[1], rtol=1e-14)


def test_jax_jit_and_grad():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    mu, lv = operands((2, 3), 9)

    def f(a: Any, b: Any) -> Any:
        return gaussian_kl(a, b, mu_prior=0.5)

    args = (jnp.asarray(mu), jnp.asarray(lv))
    eager = f(*args)
    np.testing.assert_allclose(jax.jit(f)(*args), eager, rtol=1e-14)
    value, scale = oracle.gaussian(mu, lv, 0.5, 0.0)
    assert abs(float(eager) - math.fsum(value.ravel()) / 2) <= bound(scale, np.float64).sum()
    g_mu, g_lv = jax.jit(jax.grad(f, argnums=(0, 1)))(*args)
    want = closed_form(1 / 2, mu, lv, 0.5)  # 'batchmean': divided by mu.shape[0] = 2
    np.testing.assert_allclose(np.asarray(g_mu), want[0], rtol=1e-14)
    np.testing.assert_allclose(np.asarray(g_lv), want[1], rtol=1e-14)


def test_dask_stays_lazy():
    da = pytest.importorskip("dask.array")
    import dask

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("Dask computed something inside kldiv_spec")

    mu, lv = operands((4, 3), 10)
    with dask.config.set(scheduler=refuse):
        out = gaussian_kl(da.from_array(mu, chunks=2), da.from_array(lv, chunks=2))
        grads = gaussian_kl_backward(1.0, da.from_array(mu, chunks=2), da.from_array(lv, chunks=2))
    assert isinstance(out, da.Array)
    assert all(isinstance(g, da.Array) for g in grads[:2]) and grads[2:] == (None, None)
    value, scale = oracle.gaussian(mu, lv, 0.0, 0.0)
    want = math.fsum(value.ravel()) / 4  # 'batchmean': divided by mu.shape[0] = 4
    assert abs(float(to_numpy(out)) - want) <= bound(scale, np.float64).sum()
    want_mu, want_lv, _, _ = closed_form(1 / 4, mu, lv)
    np.testing.assert_allclose(to_numpy(grads[0]), want_mu, rtol=1e-14)
    np.testing.assert_allclose(to_numpy(grads[1]), want_lv, rtol=1e-14)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"reduction": "rowmean"}, ValueError, "valid value for reduction"),
        ({"mu_prior": "0"}, TypeError, "mu_prior must be a real number or an array"),
        ({"logvar_prior": True}, TypeError, "logvar_prior must be a real number"),
        ({"mu_prior": np.zeros(5)}, ValueError, "mu_prior of shape"),
        ({"logvar_prior": np.zeros(4, int)}, TypeError, "logvar_prior must have a real floating"),
    ],
)
def test_errors_name_the_argument(kwargs, error, match):
    mu, lv = operands()
    with pytest.raises(error, match=match):
        gaussian_kl(mu, lv, **kwargs)


def test_more_errors():
    mu, lv = operands()
    with pytest.raises(TypeError, match="logvar must be an array"):
        gaussian_kl(mu, lv.tolist())
    with pytest.raises(ValueError, match="cannot be broadcast"):
        gaussian_kl(mu, lv[:, :2])
    with pytest.raises(ValueError, match="grad_output of shape"):
        gaussian_kl_backward(np.ones(3), mu, lv)
