r"""The KL divergence between diagonal Gaussians (the VAE term), for every array library.

Validate (:mod:`kldiv_spec._validation`), then evaluate through the dispatcher
(:mod:`kldiv_spec._dispatch`); no backend has a fast path for it, so the reference
(:mod:`kldiv_spec._reference_gaussian`, with autodiff on PyTorch and JAX) evaluates it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _dispatch
from ._validation import check_grad_output, gaussian_operands

__all__ = ["gaussian_kl", "gaussian_kl_backward"]

Array = Any


def gaussian_kl(
    mu: Array,
    logvar: Array,
    /,
    *,
    mu_prior: Array | float = 0.0,
    logvar_prior: Array | float = 0.0,
    reduction: str = "batchmean",
) -> Array:
    r"""KL divergence between diagonal Gaussians, in closed form, reduced like ``kl_div``.

    .. math::

        \mathrm{KL}\bigl(\mathcal N(\mu, e^{\lambda}) \,\|\, \mathcal N(\mu_0, e^{\lambda_0})\bigr)
        = \tfrac12 \sum \Bigl( e^{\lambda - \lambda_0} + \frac{(\mu - \mu_0)^2}{e^{\lambda_0}}
          - 1 - (\lambda - \lambda_0) \Bigr)

    elementwise (:math:`\lambda` = ``logvar``, the log-variance), evaluated as
    ``0.5 * ((expm1(d) - d) + (mu - mu_prior)**2 / exp(logvar_prior))`` with
    ``d = logvar - logvar_prior``: accurate near the prior and exactly 0 at it.
    The default prior is the standard normal (the VAE's KL term).

    Parameters
    ----------
    mu, logvar : array
        Mean and log-variance, real floating, broadcastable.
    mu_prior, logvar_prior : array or float, default 0.0
        The prior's mean and log-variance, broadcastable with ``mu``.
    reduction : {'batchmean', 'sum', 'mean', 'none'}, default 'batchmean'
        As ``kl_div``'s: ``'batchmean'`` divides the sum by ``mu.shape[0]``
        (the KL per sample), ``'mean'`` by the number of elements.

    Returns
    -------
    array
        Of the common dtype of the arrays; the broadcast shape for ``'none'``, else 0-d.

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv_spec
    >>> float(kldiv_spec.gaussian_kl(np.zeros((2, 3)), np.zeros((2, 3))))
    0.0
    >>> round(float(kldiv_spec.gaussian_kl(np.ones((1, 2)), np.zeros((1, 2)))), 6)
    1.0
    """
    ops = gaussian_operands(
        mu, logvar, mu_prior=mu_prior, logvar_prior=logvar_prior, reduction=reduction
    )
    result = _dispatch.evaluate("gaussian_kl", ops.xp, ops)
    return np.asarray(result) if isinstance(result, np.generic) else result


def gaussian_kl_backward(
    grad_output: Array | float,
    mu: Array,
    logvar: Array,
    /,
    *,
    mu_prior: Array | float = 0.0,
    logvar_prior: Array | float = 0.0,
    reduction: str = "batchmean",
) -> tuple[Array, Array, Array | None, Array | None]:
    r"""Gradients of :func:`gaussian_kl` w.r.t. ``mu``, ``logvar`` and array priors.

    With :math:`d = \lambda - \lambda_0` and :math:`D` the reduction's divisor:

    .. math::

        \frac{\partial L}{\partial \mu} = \frac{g}{D}\,\frac{\mu - \mu_0}{e^{\lambda_0}}, \quad
        \frac{\partial L}{\partial \lambda} = \frac{g}{D}\,\tfrac12 (e^{d} - 1), \quad
        \frac{\partial L}{\partial \mu_0} = -\frac{\partial L}{\partial \mu}, \quad
        \frac{\partial L}{\partial \lambda_0} = -\frac{g}{D}\,\tfrac12
            \Bigl(e^{d} - 1 + \frac{(\mu - \mu_0)^2}{e^{\lambda_0}}\Bigr),

    each summed back to its argument's shape.

    Returns
    -------
    grad_mu, grad_logvar : array
    grad_mu_prior, grad_logvar_prior : array or None
        None for a prior given as a number.

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv_spec
    >>> mu, logvar = np.ones(2), np.zeros(2)
    >>> g_mu, g_lv, _, _ = kldiv_spec.gaussian_kl_backward(1.0, mu, logvar, reduction="sum")
    >>> g_mu
    array([1., 1.])
    """
    ops = gaussian_operands(
        mu, logvar, mu_prior=mu_prior, logvar_prior=logvar_prior, reduction=reduction
    )
    out_shape = ops.output_shape if ops.reduction == "none" else ()
    g = check_grad_output(
        grad_output, xp=ops.xp, like=ops.mu, output_shape=out_shape, dtype=ops.dtype
    )
    g = ops.xp.astype(g, ops.dtype, copy=False)
    return _dispatch.evaluate("gaussian_kl_backward", ops.xp, g, ops)
