r"""The core of the Gaussian KL: closed form and analytic gradients, array API only.

The KL divergence between diagonal Gaussians (the VAE term), elementwise and reduced
as ``kl_div`` reduces (:func:`kldiv_spec._core.reduce_loss`), with its gradients w.r.t.
all four parameters summed back to their shapes.
"""

from __future__ import annotations

from typing import Any

from ._core import divide_total, divisor, reduce_loss, sum_to_shape

__all__: list[str] = []

Array = Any
Namespace = Any


def gaussian_terms(
    mu: Array, logvar: Array, mu_p: Array, logvar_p: Array, /, *, xp: Namespace
) -> Array:
    r"""Return the elementwise KL between diagonal Gaussians, broadcast.

    .. math::

        \mathrm{KL}\bigl(\mathcal N(\mu, \sigma^2) \,\|\, \mathcal N(\mu_0, \sigma_0^2)\bigr)
        = \tfrac12 \Bigl( \bigl(e^{d} - 1 - d\bigr) + \frac{(\mu - \mu_0)^2}{e^{\lambda_0}} \Bigr),
        \qquad d = \lambda - \lambda_0,

    with :math:`\lambda = \log \sigma^2`. :math:`e^d - 1` is ``expm1(d)``, so
    the term is accurate for small :math:`d` and exactly 0 at the identity
    (``expm1(0) - 0 = 0``, ``0 * 0 / e^{λ0} = 0``).
    """
    d = logvar - logvar_p
    diff = mu - mu_p
    return 0.5 * ((xp.expm1(d) - d) + diff * diff / xp.exp(logvar_p))


def gaussian_kl(
    mu: Array,
    logvar: Array,
    mu_p: Array,
    logvar_p: Array,
    /,
    *,
    reduction: str,
    batch_size: int | None,
    xp: Namespace,
) -> Array:
    """Return the Gaussian KL reduced like ``kl_div`` (divisor: 1, numel or ``batch_size``)."""
    loss = gaussian_terms(mu, logvar, mu_p, logvar_p, xp=xp)
    return reduce_loss(loss, reduction=reduction, batch_size=batch_size, xp=xp)


def gaussian_kl_backward(
    g: Array,
    mu: Array,
    logvar: Array,
    mu_p: Array,
    logvar_p: Array,
    /,
    *,
    reduction: str,
    batch_size: int | None,
    output_shape: tuple[int, ...],
    xp: Namespace,
) -> tuple[Array, Array, Array, Array]:
    r"""Return the gradients w.r.t. ``mu``, ``logvar``, ``mu_p``, ``logvar_p``, each to its shape.

    .. math::

        \partial_\mu = \frac{\mu - \mu_0}{e^{\lambda_0}}, \quad
        \partial_\lambda = \tfrac12 (e^{d} - 1), \quad
        \partial_{\mu_0} = -\partial_\mu, \quad
        \partial_{\lambda_0}
            = -\tfrac12 \Bigl((e^{d} - 1) + \frac{(\mu - \mu_0)^2}{e^{\lambda_0}}\Bigr),

    times :math:`g / D`.
    """
    d = divisor(reduction, output_shape=output_shape, batch_size=batch_size)
    g = divide_total(g, d, xp=xp)
    diff = mu - mu_p
    var_p = xp.exp(logvar_p)
    em1 = xp.expm1(logvar - logvar_p)
    g_mu = g * (diff / var_p)
    g_lv = g * (0.5 * em1)
    g_lvp = -(g * (0.5 * (em1 + diff * diff / var_p)))
    out = []
    for grad, like in ((g_mu, mu), (g_lv, logvar), (-g_mu, mu_p), (g_lvp, logvar_p)):
        full = xp.broadcast_to(grad, output_shape)
        out.append(sum_to_shape(full, tuple(like.shape), xp=xp))
    return out[0], out[1], out[2], out[3]
