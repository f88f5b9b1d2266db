"""The executable specification: KL-divergence loss in the array API standard.

Everything in this module uses only functions of the Python array API standard,
reached through the namespace ``xp`` that the caller passes in. It holds no
argument checking (see :mod:`kldiv_spec._validation`) and no backend branches,
so it runs unchanged on NumPy, CuPy, PyTorch, JAX (also under ``jax.jit``),
Dask (lazily) and array-api-strict.

Notation: ``x`` is the input (log-probabilities, log q), ``t`` the target
(probabilities p, or log p when ``log_target``), ``g`` the upstream gradient.
The pointwise loss follows PyTorch's composite exactly::

    log_target=False:  l = xlogy(t, t) - t * x       (xlogy(0, y) = 0)
    log_target=True:   l = exp(t) * (t - x)

so that ``sum(l) = KL(p || q)`` for probability vectors p and q = exp(x).
"""

from __future__ import annotations

import math
from typing import Any

Array = Any
Namespace = Any

__all__: list[str] = []


def xlogx(t: Array, /, *, xp: Namespace) -> Array:
    r"""Return :math:`t \log t` with :math:`0 \log 0 = 0`, as ``torch.xlogy(t, t)``.

    Negative and NaN ``t`` give NaN, ``+inf`` gives ``+inf``.
    """
    return xp.where(t == 0, xp.zeros_like(t), t * xp.log(t))


def pointwise_loss(x: Array, t: Array, /, *, log_target: bool, xp: Namespace) -> Array:
    r"""Return the elementwise loss :math:`\ell(x, t)`, broadcast over ``x`` and ``t``.

    .. math::

        \ell(x, t) =
        \begin{cases}
            t \log t - t x        & \text{if not log\_target} \\
            e^{t}\,(t - x)        & \text{if log\_target}
        \end{cases}

    with :math:`0 \log 0 = 0`. No value is clamped or masked beyond that: a
    negative target gives NaN and ``t = 0`` with ``x = -inf`` gives NaN
    (``0 * inf``), exactly as PyTorch.
    """
    if log_target:
        return xp.exp(t) * (t - x)
    return xlogx(t, xp=xp) - t * x


def reduce_loss(loss: Array, /, *, reduction: str, batch_size: int | None, xp: Namespace) -> Array:
    r"""Reduce the elementwise loss.

    ``'none'`` returns it as is; ``'sum'`` returns :math:`S = \sum \ell`;
    ``'mean'`` returns :math:`S / N` with :math:`N` the number of elements of
    the (broadcast) loss; ``'batchmean'`` returns :math:`S / B` with :math:`B`
    the *input's* first dimension, or the plain sum when ``batch_size`` is None
    (0-d input). The quotient follows the one rounding rule of
    :func:`divide_total`. Empty sums are 0, so an empty ``'mean'`` (and
    ``'batchmean'`` with ``B = 0``) is ``0 / 0 = NaN``.
    """
    if reduction == "none":
        return loss
    total = xp.sum(loss)
    d = divisor(reduction, output_shape=tuple(loss.shape), batch_size=batch_size)
    return divide_total(total, d, xp=xp)


def divisor(reduction: str, /, *, output_shape: tuple[int, ...], batch_size: int | None) -> int:
    """Return the number the summed loss is divided by under ``reduction``.

    1 for ``'none'`` and ``'sum'``; the number of elements of the output for
    ``'mean'``; ``batch_size`` for ``'batchmean'`` (1 when it is None: 0-d input).
    """
    if reduction == "mean":
        return math.prod(output_shape)
    if reduction == "batchmean" and batch_size is not None:
        return batch_size
    return 1


def divide_total(total: Array, d: int, /, *, xp: Namespace) -> Array:
    r"""Return :math:`\operatorname{fl}(S / D)`: the one rounding rule of every reduction.

    ``total`` is the sum :math:`S` already rounded to the result dtype (an
    array of that dtype, 0-d for a loss); it is divided by the integer
    :math:`D` and the quotient rounded once to that dtype. For half-precision
    dtypes (float16, bfloat16) the division is carried out in float32 and
    rounded to the dtype, as PyTorch's ``mean`` and ``div`` do (dividing in the
    dtype itself would first round :math:`D`, and overflow float16 for
    :math:`D > 65504`). :math:`D = 0` (an empty ``'mean'`` or ``'batchmean'``)
    gives NaN, built directly rather than as ``0 / 0``, which NumPy would warn
    about. :math:`D = 1` returns ``total`` unchanged.
    """
    if d == 1:
        return total
    if d == 0:
        return xp.full_like(total, math.nan)
    if xp.finfo(total.dtype).bits < 32:
        return xp.astype(xp.astype(total, xp.float32) / d, total.dtype)
    return total / d


def kl_div(x: Array, t: Array, /, *, reduction: str, log_target: bool, xp: Namespace) -> Array:
    """Return the reduced loss for input ``x`` and target ``t`` of one floating dtype."""
    batch_size = x.shape[0] if x.ndim > 0 else None
    loss = pointwise_loss(x, t, log_target=log_target, xp=xp)
    return reduce_loss(loss, reduction=reduction, batch_size=batch_size, xp=xp)


def pointwise_gradients(
    g: Array, x: Array, t: Array, /, *, log_target: bool, xp: Namespace
) -> tuple[Array, Array]:
    r"""Return :math:`(g\,\partial\ell/\partial x,\; g\,\partial\ell/\partial t)`, broadcast.

    .. math::

        \frac{\partial \ell}{\partial x} = -t, \qquad
        \frac{\partial \ell}{\partial t} = \log t + 1 - x
        \qquad\text{or, with log\_target,}\qquad
        \frac{\partial \ell}{\partial x} = -e^{t}, \qquad
        \frac{\partial \ell}{\partial t} = e^{t}\,(t - x + 1).

    The target derivative without ``log_target`` is NaN wherever ``t`` is not a
    positive finite number (``t = 0`` included), which is what PyTorch's
    autograd gives through ``xlogy`` (``t / t`` there is ``0 / 0`` or
    ``inf / inf``).
    """
    if log_target:
        p = xp.exp(t)
        gp = g * p
        # PyTorch's autograd order, (g (t - x)) e^t + g e^t: written g e^t (t - x + 1),
        # the NaN where e^t overflows (inf - inf) would be +-inf, and some zeros' signs flip.
        return -gp, (g * (t - x)) * p + gp
    grad_x = -(t * g)
    positive_finite = (t > 0) & (t < math.inf)
    safe_t = xp.where(positive_finite, t, xp.ones_like(t))
    regular = g * (xp.log(safe_t) + 1 - x)
    nan = xp.full_like(regular, math.nan)
    return grad_x, xp.where(positive_finite, regular, nan)


def sum_to_shape(a: Array, /, shape: tuple[int, ...], *, xp: Namespace) -> Array:
    """Sum a broadcast array back down to ``shape`` (the adjoint of broadcasting)."""
    extra = a.ndim - len(shape)
    if extra > 0:
        a = xp.sum(a, axis=tuple(range(extra)))
    axes = tuple(
        i for i, (n, m) in enumerate(zip(shape, a.shape, strict=True)) if n == 1 and m != 1
    )
    if axes:
        a = xp.sum(a, axis=axes, keepdims=True)
    return a


def kl_div_backward(
    g: Array,
    x: Array,
    t: Array,
    /,
    *,
    reduction: str,
    log_target: bool,
    output_shape: tuple[int, ...],
    xp: Namespace,
) -> tuple[Array, Array]:
    r"""Return the gradients of the reduced loss w.r.t. ``x`` and ``t``, in the common dtype.

    ``g`` is the gradient w.r.t. the output (broadcastable to ``output_shape``,
    the broadcast shape of ``x`` and ``t``). With :math:`D` the reduction's
    divisor (1, :math:`N` or :math:`B`, see :func:`reduce_loss`):

    .. math::

        \nabla_x = -\frac{g\,t}{D}, \qquad
        \nabla_t = \frac{g\,(\log t + 1 - x)}{D}

    (log_target: :math:`-g e^t / D` and :math:`g e^t (t - x + 1) / D`), each
    summed back over the axes along which its argument was broadcast.
    """
    batch_size = x.shape[0] if x.ndim > 0 else None
    d = divisor(reduction, output_shape=output_shape, batch_size=batch_size)
    g = divide_total(g, d, xp=xp)
    grad_x, grad_t = pointwise_gradients(g, x, t, log_target=log_target, xp=xp)
    grad_x = sum_to_shape(xp.broadcast_to(grad_x, output_shape), x.shape, xp=xp)
    grad_t = sum_to_shape(xp.broadcast_to(grad_t, output_shape), t.shape, xp=xp)
    return grad_x, grad_t
