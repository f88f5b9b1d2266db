"""The reference evaluation of the Gaussian KL: the core, in the common dtype.

On PyTorch and JAX the dispatcher attaches the analytic backward instead
(``_autodiff_gaussian_torch``, ``_autodiff_gaussian_jax``).
"""

from __future__ import annotations

from typing import Any

from . import _core_gaussian
from ._floating_point import quiet
from ._validation import GaussianOperands

__all__: list[str] = []

Array = Any


def cast(ops: GaussianOperands, /) -> tuple[Any, Any, Any, Any]:
    """Return the four operands in the common dtype."""
    xp = ops.xp
    mu, logvar, mu_p, logvar_p = (
        xp.astype(a, ops.dtype, copy=False)
        for a in (ops.mu, ops.logvar, ops.mu_prior, ops.logvar_prior)
    )
    return mu, logvar, mu_p, logvar_p


def forward(ops: GaussianOperands, /) -> Array:
    """Evaluate :func:`kldiv_spec.gaussian_kl` with the core."""
    xp = ops.xp
    with quiet(xp):
        return _core_gaussian.gaussian_kl(
            *cast(ops), reduction=ops.reduction, batch_size=ops.batch_size, xp=xp
        )


def backward(
    g: Array, ops: GaussianOperands, /
) -> tuple[Array, Array, Array | None, Array | None]:
    """Evaluate the four gradients with the core, each in its own argument's dtype.

    The priors' gradients are None where the prior was given as a number.
    """
    xp = ops.xp
    with quiet(xp):
        grads = _core_gaussian.gaussian_kl_backward(
            g,
            *cast(ops),
            reduction=ops.reduction,
            batch_size=ops.batch_size,
            output_shape=ops.output_shape,
            xp=xp,
        )
        likes = (ops.mu, ops.logvar, ops.mu_prior, ops.logvar_prior)
        g_mu, g_lv, g_mup, g_lvp = (
            xp.astype(gr, a.dtype, copy=False) for gr, a in zip(grads, likes, strict=True)
        )
    return (
        g_mu,
        g_lv,
        g_mup if ops.prior_is_array[0] else None,
        g_lvp if ops.prior_is_array[1] else None,
    )
