"""The Gaussian KL's reference on JAX: the core's forward, its backward a ``custom_vjp``.

``jax.grad`` then gives the specified gradients of all four parameters, eagerly and
under ``jax.jit``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

from . import _core_gaussian
from ._validation import GaussianOperands

__all__: list[str] = []


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gaussian(mu: Any, lv: Any, mu_p: Any, lv_p: Any, static: Any) -> Any:
    xp, dtype, reduction, batch_size, _ = static
    args = (xp.astype(a, dtype) for a in (mu, lv, mu_p, lv_p))
    return _core_gaussian.gaussian_kl(*args, reduction=reduction, batch_size=batch_size, xp=xp)


def _gaussian_forward(mu: Any, lv: Any, mu_p: Any, lv_p: Any, static: Any) -> Any:
    return _gaussian(mu, lv, mu_p, lv_p, static), (mu, lv, mu_p, lv_p)


def _gaussian_backward(static: Any, saved: Any, g: Any) -> Any:
    xp, dtype, reduction, batch_size, output_shape = static
    grads = _core_gaussian.gaussian_kl_backward(
        g,
        *(xp.astype(a, dtype) for a in saved),
        reduction=reduction,
        batch_size=batch_size,
        output_shape=output_shape,
        xp=xp,
    )
    return tuple(xp.astype(gr, a.dtype) for gr, a in zip(grads, saved, strict=True))


_gaussian.defvjp(_gaussian_forward, _gaussian_backward)


def gaussian_with_gradient(ops: GaussianOperands, /) -> Any:
    """Evaluate the Gaussian KL on JAX arrays with the analytic gradients attached."""
    static = (ops.xp, ops.dtype, ops.reduction, ops.batch_size, ops.output_shape)
    return _gaussian(ops.mu, ops.logvar, ops.mu_prior, ops.logvar_prior, static)
