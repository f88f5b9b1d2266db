r"""Properties of the Gaussian KL (the VAE loss term), from the closed form.

They check an :class:`~.implementations.Implementation`'s ``gaussian``
function (``--impl reference``: :func:`kldiv_spec.gaussian_kl`; ``kldiv-spec
check --impl MODULE:FUNCTION --kind gaussian``: a user's), called as
``gaussian(mu, logvar, reduction=..., [mu_prior=..., logvar_prior=...])``,
within what the implementation declares (``gaussian_reductions``,
``gaussian_priors``). Without the function, or with no reduction declared, the
properties are n/a (``math.gaussian_zero_at_identity`` too for an
implementation that takes no prior).

The divergence of :math:`N(\mu, e^{\lambda})` from the prior
:math:`N(\mu_0, e^{\lambda_0})` (``logvar`` is :math:`\lambda`; the prior
defaults to the standard normal, :math:`\mu_0 = \lambda_0 = 0`) is, elementwise,

.. math::

    \tfrac12 \left(e^{d} - 1 - d + (\mu - \mu_0)^2 e^{-\lambda_0}\right),
    \qquad d = \lambda - \lambda_0,

summed for ``'sum'``, divided by ``mu.shape[0]`` for ``'batchmean'`` and by the
number of elements for ``'mean'``; its gradients are
:math:`\partial_\mu = \frac{g}{D} (\mu - \mu_0) e^{-\lambda_0}` and
:math:`\partial_\lambda = \frac{g}{D} \tfrac12 (e^{\lambda - \lambda_0} - 1)`
(:math:`g` the upstream gradient, :math:`D` the divisor).

Hypothesis draws ``mu`` and ``logvar`` (1 to 4 rows of 1 to 5 features,
float64 or float32), a declared reduction and, for an implementation that takes
priors, half the time a prior per feature. Values and gradients are judged
against the mpmath closed form of :func:`.oracle_logits.gaussian` within
:data:`.oracle_logits.GAUSSIAN_ULPS` epsilons of its error scale (one more per
element a reduction sums, two ulps more for a gradient) plus the smallest
normal; the value must also be >= 0 and exactly 0 from itself, and a value
that matches the standard normal prior where another was given is named (the
prior ignored). The operands must be unchanged
(``hygiene.gaussian_inputs_unmodified``). All four properties are MUST.

The ``assert_*`` functions are the judgements the properties make; the
reproduction snippets of failures call them too. The helpers they share with
the from-logits properties (:func:`~.checks_logits.check_result`,
:func:`~.checks_logits.compare_values`, :func:`~.checks_logits.describe`, ...)
are those of :mod:`.checks_logits`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from hypothesis import strategies as st

from . import oracle_logits as oracle
from .assertions import to_numpy
from .checks_logits import (
    assert_unchanged,
    check_result,
    compare_values,
    describe,
    failure_message,
    grad_output,
    needs_function,
    require_function,
)
from .context import Context
from .properties import NotApplicable, register
from .strategies import Case

__all__ = [
    "assert_gaussian",
    "assert_gaussian_gradient",
    "assert_gaussian_zero",
    "exact_gaussian_gradients",
    "gaussian_expected",
]


@st.composite
def _gaussian_cases(draw: Any, ctx: Context) -> Case:
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 5)))
    dtype = draw(st.sampled_from((np.float64, np.float32)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mu = rng.normal(0, 3, size=shape).astype(dtype)
    logvar = rng.normal(0, 2, size=shape).astype(dtype)
    options: dict[str, Any] = {"reduction": draw(st.sampled_from(ctx.impl.gaussian_reductions))}
    if ctx.impl.gaussian_priors and draw(st.booleans()):
        options["mu_prior"] = rng.normal(0, 1, size=shape[-1:]).astype(dtype)
        options["logvar_prior"] = rng.normal(0, 1, size=shape[-1:]).astype(dtype)
    return Case(mu, logvar, options["reduction"], False, extra=options)


def _gaussian_strategy(ctx: Context) -> Any:
    if ctx.impl.gaussian is None:
        raise NotApplicable(f"{ctx.impl.name} has no gaussian function")
    if not ctx.impl.gaussian_reductions:
        raise NotApplicable(f"{ctx.impl.name} declares no reduction for gaussian")
    return _gaussian_cases(ctx)


def _gaussian_shape(case: Case) -> tuple[int, ...]:
    """Return a Gaussian KL's result shape: the operands' broadcast for 'none', else ()."""
    if case.extra["reduction"] != "none":
        return ()
    shapes = [case.input.shape, case.target.shape]
    shapes += [np.shape(case.extra[k]) for k in ("mu_prior", "logvar_prior") if k in case.extra]
    return tuple(np.broadcast_shapes(*shapes))


def _call_gaussian(ctx: Context, case: Case, mu: Any, logvar: Any, options: dict[str, Any]) -> Any:
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        out = require_function(ctx, "gaussian")(mu, logvar, **options)
    check_result(ctx, out, _gaussian_shape(case), "gaussian")
    return out


def _gaussian_options(ctx: Context, case: Case) -> dict[str, Any]:
    be = ctx.backend
    return {k: (be.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in case.extra.items()}


def _gaussian_call(ctx: Context, case: Case, kind: str = "gaussian") -> np.ndarray:
    be = ctx.backend
    ctx.record(case, kind)
    options = _gaussian_options(ctx, case)
    out = _call_gaussian(ctx, case, be.asarray(case.input), be.asarray(case.target), options)
    return np.asarray(to_numpy(out), dtype=np.float64)


def _gaussian_what(mu: np.ndarray, logvar: np.ndarray, options: dict[str, Any]) -> str:
    return describe(Case(mu, logvar, options["reduction"], False, extra=options))


def assert_gaussian_zero(got: Any, mu: np.ndarray, logvar: np.ndarray, /, **options: Any) -> None:
    """Assert ``gaussian_kl(mu, logvar, mu_prior=mu, logvar_prior=logvar)`` gave exactly 0."""
    got = np.asarray(got, dtype=np.float64)
    if not (got == 0).all():
        head = "the KL of a Gaussian from itself is not exactly 0"
        what = _gaussian_what(mu, logvar, options)
        raise AssertionError(failure_message(head, what, ("got", got)))


def gaussian_expected(
    mu: np.ndarray, logvar: np.ndarray, /, **options: Any
) -> tuple[np.ndarray, Any]:
    """Return the exact Gaussian KL (float64) for ``options`` and its bound."""
    mu_p = options.get("mu_prior", 0.0)
    lv_p = options.get("logvar_prior", 0.0)
    value, scale = oracle.gaussian(mu, logvar, mu_p, lv_p)
    eps = float(np.finfo(mu.dtype).eps)
    reduction = options["reduction"]
    floor = float(np.finfo(mu.dtype).smallest_normal)
    if reduction == "none":
        return value, oracle.GAUSSIAN_ULPS * eps * scale + floor
    d = {"sum": 1, "batchmean": mu.shape[0] if mu.ndim else 1, "mean": value.size}[reduction]
    want = np.asarray(math.fsum(value.ravel()) / d if d else math.nan)
    tol = (oracle.GAUSSIAN_ULPS + value.size) * eps * float(scale.sum()) / max(d, 1) + floor
    return want, tol


def assert_gaussian(got: Any, mu: np.ndarray, logvar: np.ndarray, /, **options: Any) -> None:
    """Assert ``got`` agrees with the exact closed form within its bound, and is >= 0.

    ``options``: ``reduction`` and, optionally, ``mu_prior`` and ``logvar_prior``.
    """
    got = np.asarray(got, dtype=np.float64)
    want, tol = gaussian_expected(mu, logvar, **options)
    what = f"gaussian_kl, {_gaussian_what(mu, logvar, options)}"
    hint = ""
    if "mu_prior" in options:
        plain = {"reduction": options["reduction"]}
        ignored = gaussian_expected(mu, logvar, **plain)[0]
        if ignored.shape == got.shape and np.allclose(got, ignored, rtol=1e-5, atol=0):
            hint = " (it matches the standard normal prior: the prior is ignored)"
    compare_values(got, want, tol, what, hint)
    if not (got >= 0).all():
        raise AssertionError(failure_message("negative Gaussian KL", what, ("got", got)))


@register(
    "math.gaussian_zero_at_identity",
    "gaussian_kl(mu, logvar, mu_prior=mu, logvar_prior=logvar) is exactly 0",
    strategy=_gaussian_strategy,
    applies=needs_function("gaussian"),
    examples_scale=0.5,
    subject="gaussian",
)
def _gaussian_zero(ctx: Context, case: Case) -> None:
    if not ctx.impl.gaussian_priors:
        raise NotApplicable(f"{ctx.impl.name} takes no prior")
    options = {**case.extra, "mu_prior": case.input, "logvar_prior": case.target}
    same = Case(case.input, case.target, case.reduction, False, extra=options)
    got = _gaussian_call(ctx, same, "gaussian_zero")
    assert_gaussian_zero(got, case.input, case.target, **options)


@register(
    "accuracy.gaussian_oracle",
    "gaussian_kl agrees with the exact (mpmath) closed form within its bound, and is >= 0",
    strategy=_gaussian_strategy,
    applies=needs_function("gaussian"),
    examples_scale=0.5,
    subject="gaussian",
)
def _gaussian_oracle(ctx: Context, case: Case) -> None:
    got = _gaussian_call(ctx, case)
    assert_gaussian(got, case.input, case.target, **case.extra)


@register(
    "hygiene.gaussian_inputs_unmodified",
    "gaussian (and its backward) leave mu, logvar and the priors unchanged",
    strategy=_gaussian_strategy,
    applies=needs_function("gaussian"),
    examples_scale=0.5,
    subject="gaussian",
)
def _gaussian_unmodified(ctx: Context, case: Case) -> None:
    be = ctx.backend
    ctx.record(case, "gaussian")
    mu, logvar = be.asarray(case.input), be.asarray(case.target)
    options = _gaussian_options(ctx, case)
    _call_gaussian(ctx, case, mu, logvar, options)
    backward = ctx.impl.gaussian_backward
    if backward is not None and not be.autograd:
        g = grad_output(case)
        backward(g if np.ndim(g) == 0 else be.asarray(np.asarray(g)), mu, logvar, **options)
    operands = [("mu", mu, case.input), ("logvar", logvar, case.target)]
    operands += [
        (k, options[k], case.extra[k])
        for k in ("mu_prior", "logvar_prior")
        if isinstance(case.extra.get(k), np.ndarray)
    ]
    assert_unchanged(be, operands, "gaussian")


def exact_gaussian_gradients(
    mu: np.ndarray, logvar: np.ndarray, /, *, grad_output: Any, **options: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r"""Return the exact gradients w.r.t. ``mu`` and ``logvar`` and their bounds (float64).

    :math:`\partial_\mu = \frac{g}{D} (\mu - \mu_0) e^{-\lambda_0}` and
    :math:`\partial_\lambda = \frac{g}{D} \tfrac12 (e^{\lambda - \lambda_0} - 1)`,
    at :data:`.oracle_logits.PRECISION` bits (``mu`` and ``logvar`` of the output's
    shape, as the suite draws them).
    """
    mp = oracle._mp()
    reduction = options["reduction"]
    arrays = np.broadcast_arrays(
        *(
            np.asarray(a, np.float64)
            for a in (
                mu,
                logvar,
                options.get("mu_prior", 0.0),
                options.get("logvar_prior", 0.0),
                grad_output,
            )
        )
    )
    d = {"none": 1, "sum": 1, "batchmean": mu.shape[0] if mu.ndim else 1, "mean": mu.size}[
        reduction
    ]
    g_mu, g_lv = np.empty(arrays[0].shape), np.empty(arrays[0].shape)
    s_mu, s_lv = np.empty(arrays[0].shape), np.empty(arrays[0].shape)
    for idx in np.ndindex(g_mu.shape):
        m, lv, m0, lv0, g = (mp.mpf(float(a[idx])) for a in arrays)
        gd = g / d
        inv = mp.exp(-lv0)
        em1 = mp.expm1(lv - lv0)
        g_mu[idx] = float(gd * (m - m0) * inv)
        g_lv[idx] = float(gd * em1 / 2)
        s_mu[idx] = float(abs(gd) * (abs(m - m0) + abs(m) + abs(m0)) * inv * (1 + abs(lv0)))
        s_lv[idx] = float(abs(gd) * (abs(em1) + (1 + abs(em1)) * (abs(lv) + abs(lv0))))
    return g_mu, g_lv, s_mu, s_lv


def assert_gaussian_gradient(
    grads: tuple[Any, Any],
    mu: np.ndarray,
    logvar: np.ndarray,
    /,
    *,
    grad_output: Any,
    **options: Any,
) -> None:
    """Assert the gradients w.r.t. ``mu`` and ``logvar`` agree with the exact closed form."""
    g_mu, g_lv, s_mu, s_lv = exact_gaussian_gradients(
        mu, logvar, grad_output=grad_output, **options
    )
    eps = float(np.finfo(mu.dtype).eps)
    floor = float(np.finfo(mu.dtype).smallest_normal)
    what = _gaussian_what(mu, logvar, options)
    for name, got, want, scale in (
        ("mu", grads[0], g_mu, s_mu),
        ("logvar", grads[1], g_lv, s_lv),
    ):
        with np.errstate(over="ignore"):
            ulp = np.spacing(np.abs(want).astype(mu.dtype)).astype(np.float64)
        tol = oracle.GAUSSIAN_ULPS * eps * scale + 2 * ulp + floor
        compare_values(got, want, tol, f"gradient w.r.t. {name}, gaussian_kl, {what}")


def _gaussian_gradient(ctx: Context, case: Case, g: Any) -> tuple[np.ndarray, np.ndarray]:
    fn = require_function(ctx, "gaussian")
    be = ctx.backend
    ctx.record(case, "gaussian_gradient", grad=g)
    options = _gaussian_options(ctx, case)
    if be.autograd == "torch" and ctx.impl.differentiable:
        import torch

        m = be.asarray(case.input).requires_grad_(True)
        lv = be.asarray(case.target).requires_grad_(True)
        out = fn(m, lv, **options)
        gout = torch.as_tensor(np.asarray(g), dtype=out.dtype, device=out.device)
        gm, glv = torch.autograd.grad(out, (m, lv), gout.expand(out.shape))
        return tuple(a.detach().cpu().numpy().astype(np.float64) for a in (gm, glv))  # type: ignore[return-value]
    if be.autograd == "jax" and ctx.impl.differentiable:
        import jax
        import jax.numpy as jnp

        out, vjp = jax.vjp(
            lambda a, b: fn(a, b, **options), be.asarray(case.input), be.asarray(case.target)
        )
        gm, glv = vjp(jnp.broadcast_to(jnp.asarray(g, dtype=out.dtype), out.shape))
        return np.asarray(gm, dtype=np.float64), np.asarray(glv, dtype=np.float64)
    backward = ctx.impl.gaussian_backward
    if backward is None:
        raise NotApplicable(f"{ctx.impl.name} has no gaussian backward on {be.name}")
    gb = g if isinstance(g, float) else be.asarray(np.asarray(g))
    out = backward(gb, be.asarray(case.input), be.asarray(case.target), **options)
    return (
        np.asarray(be.to_numpy(out[0]), dtype=np.float64),
        np.asarray(be.to_numpy(out[1]), dtype=np.float64),
    )


@register(
    "gradients.gaussian_oracle",
    "the gradients of gaussian_kl w.r.t. mu and logvar agree with the exact closed form",
    strategy=_gaussian_strategy,
    applies=needs_function("gaussian"),
    examples_scale=0.5,
    subject="gaussian",
)
def _gaussian_gradients(ctx: Context, case: Case) -> None:
    g = grad_output(case)
    got = _gaussian_gradient(ctx, case, g)
    assert_gaussian_gradient(got, case.input, case.target, grad_output=g, **case.extra)
