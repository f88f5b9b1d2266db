r"""Knowledge distillation from logits: the KL divergence without the distributions.

``kl_div_from_logits`` gives the value of
``T**2 * kl_div(log_softmax(input / T), softmax(target / T), reduction=...)`` without
materialising either distribution (and the generalised Jensen-Shannon divergence with
``beta``), on every array library of the package, with analytic gradients
(``kl_div_from_logits_backward``, and through autograd on PyTorch and JAX). See
``docs/logits.md``. Validate (:mod:`kldiv_spec._validation`), then evaluate through the
dispatcher (:mod:`kldiv_spec._dispatch`): the fast paths
``kldiv_spec.backends.logits_<name>``, else the reference
(:mod:`kldiv_spec._reference_logits`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _dispatch
from ._validation import LOGITS_REDUCTIONS, check_bool, check_grad_output, logits_operands

__all__ = ["LOGITS_REDUCTIONS", "kl_div_from_logits", "kl_div_from_logits_backward"]

Array = Any


def kl_div_from_logits(
    input: Array,
    target: Array,
    /,
    *,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    axis: int = -1,
    direction: str = "forward",
    scale_by_temperature_squared: bool = True,
    mask: Array | None = None,
    beta: float | None = None,
) -> Array:
    r"""KL divergence between the softmax distributions of two sets of logits (distillation).

    With :math:`s` the student logits (``input``), :math:`t` the teacher
    logits (``target``), :math:`q = \operatorname{softmax}(s/T)` and
    :math:`p = \operatorname{softmax}(t/T)` along ``axis``, the value is

    .. math::

        k \cdot \operatorname{reduce}_i \; p_i \,(\log p_i - \log q_i),
        \qquad k = T^2 \text{ (or 1)},

    that is ``T**2 * kl_div(log_softmax(input / T), softmax(target / T),
    reduction=reduction)`` with a numerically stable log-softmax, and without
    materialising either distribution on the fast paths. ``direction='reverse'``
    gives :math:`\mathrm{KL}(q \,\|\, p)` instead (the student's distribution
    weights the terms: mode-seeking). ``beta`` gives the generalised
    Jensen-Shannon divergence instead (trl's ``GKDTrainer.generalized_jsd_loss``,
    Liger-Kernel's ``LigerJSD``): with the mixture :math:`m = \beta p + (1 - \beta) q`,

    .. math::

        k \cdot \operatorname{reduce}_i \;
        \beta\, p_i (\log p_i - \log m_i) + (1 - \beta)\, q_i (\log q_i - \log m_i),

    whose row sums are
    :math:`\beta\,\mathrm{KL}(p \,\|\, m) + (1 - \beta)\,\mathrm{KL}(q \,\|\, m)`.

    Parameters
    ----------
    input : array
        Student logits, real floating dtype.
    target : array
        Teacher logits, of the same shape, library and device.
    temperature : float, default 1.0
        :math:`T`, a positive finite real number; both logits are divided by it.
    reduction : {'batchmean', 'sum', 'mean', 'rowmean', 'none'}, default 'batchmean'
        ``'none'``: the elementwise terms (times :math:`k`), of ``input``'s
        shape, as the composition's ``'none'``. ``'sum'``: their sum.
        ``'batchmean'``: the sum divided by ``input.shape[0]``, exactly as the
        composition: for ``(batch, seq, vocab)`` logits that is the **batch
        size, not the number of tokens**. ``'rowmean'``: the sum divided by
        the number of rows (every axis but ``axis``: tokens), the per-token
        mean KL. ``'mean'``: the sum divided by the number of elements (the
        composition's, not a KL divergence).
    axis : int, default -1
        The class (vocabulary) axis.
    direction : {'forward', 'reverse'}, default 'forward'
        ``'forward'``: :math:`\mathrm{KL}(p \,\|\, q)`, teacher || student;
        ``'reverse'``: :math:`\mathrm{KL}(q \,\|\, p)`, student || teacher.
    scale_by_temperature_squared : bool, default True
        Multiply by :math:`T^2` (Hinton et al.), which keeps the gradients'
        scale independent of :math:`T`.
    mask : boolean array, optional
        Of the rows' shape (``input.shape`` without ``axis``), broadcastable:
        True keeps a row (a token), False drops it (padding). Dropped rows
        contribute exactly 0 (whatever their logits hold, NaN included) and
        get zero gradients; ``'rowmean'`` and ``'batchmean'`` divide by the
        number of kept rows, ``'mean'`` by that times the number of classes,
        and a batch with no kept row gives 0. With a mask, ``'batchmean'`` is
        only accepted for 2-d logits with the classes on axis 1.
    beta : float, optional
        :math:`\beta \in [0, 1]`, the teacher's weight in the mixture of the
        generalised Jensen-Shannon divergence; None (the default) for the KL of
        ``direction``. As in trl and Liger-Kernel, ``beta=0`` is exactly the
        forward KL and ``beta=1`` exactly the reverse KL, although the mixture's
        formula tends to 0 there (``docs/logits.md``). Always evaluated by the
        reference (no fused kernel yet); not combinable with ``direction='reverse'``.

    Returns
    -------
    array
        Of the common dtype of ``input`` and ``target`` (half precision is
        computed in float32 and rounded once); 0-d unless ``reduction='none'``.

    Raises
    ------
    TypeError
        For non-arrays, arrays of two libraries, a non-floating dtype, a
        non-boolean mask, or options of the wrong type.
    ValueError
        For unknown options, a temperature that is not positive and finite,
        an axis out of range, logits of two shapes, a mask that does not
        broadcast to the rows, arrays on two devices, or a ``beta`` that is not
        a real number in :math:`[0, 1]` (NaN, a bool or an array included) or
        comes with ``direction='reverse'``.

    Notes
    -----
    Edge values (see ``docs/logits.md``): a class whose teacher probability is
    0 (logit ``-inf``) contributes 0, also where the student's is ``-inf``
    too; a student ``-inf`` where the teacher's probability is positive gives
    ``+inf``; a row of ``-inf`` only, or holding ``+inf`` or NaN, gives NaN
    unless it is masked; no classes (an empty ``axis``) give 0.

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv_spec
    >>> student = np.asarray([[2.0, 1.0, 0.1], [0.5, 0.5, 3.0]])
    >>> teacher = np.asarray([[1.5, 1.0, 0.5], [0.1, 0.2, 2.5]])
    >>> loss = kldiv_spec.kl_div_from_logits(student, teacher, temperature=2.0)
    >>> round(float(loss), 6)
    0.034543
    >>> jsd = kldiv_spec.kl_div_from_logits(student, teacher, temperature=2.0, beta=0.5)
    >>> round(float(jsd), 6)
    0.008539
    """
    ops = logits_operands(
        input,
        target,
        temperature=temperature,
        reduction=reduction,
        axis=axis,
        direction=direction,
        scale_by_temperature_squared=scale_by_temperature_squared,
        mask=mask,
        beta=beta,
    )
    result = _dispatch.evaluate("kl_div_from_logits", ops.xp, ops)
    return np.asarray(result) if isinstance(result, np.generic) else result


def kl_div_from_logits_backward(
    grad_output: Array | float,
    input: Array,
    target: Array,
    /,
    *,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    axis: int = -1,
    direction: str = "forward",
    scale_by_temperature_squared: bool = True,
    mask: Array | None = None,
    target_grad: bool = False,
    beta: float | None = None,
) -> tuple[Array, Array | None]:
    r"""Gradients of :func:`kl_div_from_logits` w.r.t. the student (and teacher) logits.

    For libraries without autograd. With :math:`g` the gradient w.r.t. the
    output, :math:`D` the reduction's divisor and :math:`c = k / T`, the
    forward direction gives, per row of a reduced loss,

    .. math::

        \frac{\partial L}{\partial s} = \frac{c\,g}{D}\,(q - p), \qquad
        \frac{\partial L}{\partial t} = \frac{c\,g}{D}\,p \odot (r - \mathrm{KL}),
        \quad r = \log p - \log q,

    (the reverse direction swaps the roles), and 0 in masked rows; for
    ``'none'`` the general chain rule (``docs/logits.md``). With ``beta``
    (:math:`0 < \beta < 1`) and :math:`G` each term's upstream gradient,

    .. math::

        \frac{\partial L}{\partial s} = c\,q \odot \Bigl(h - \sum_j q_j h_j\Bigr),
        \quad h = G \odot (1 - \beta)(\log q - \log m),

    and the teacher's with :math:`p` and :math:`h' = G \odot \beta(\log p - \log m)`.

    Parameters
    ----------
    grad_output : array or float
        Gradient w.r.t. the output: 0-d for the reductions, broadcastable to
        ``input``'s shape for ``'none'``.
    input, target, temperature, reduction, axis, direction, scale_by_temperature_squared, mask
        As for :func:`kl_div_from_logits`.
    target_grad : bool, default False
        Also compute the gradient w.r.t. the teacher logits (an extra pass).
    beta : float, optional
        As for :func:`kl_div_from_logits`.

    Returns
    -------
    grad_input : array
        Of ``input``'s shape and dtype.
    grad_target : array or None
        Of ``target``'s shape and dtype; None unless ``target_grad``.

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv_spec
    >>> s, t = np.zeros((1, 2)), np.log(np.asarray([[0.25, 0.75]]))
    >>> gs, gt = kldiv_spec.kl_div_from_logits_backward(1.0, s, t)
    >>> gs  # q - p
    array([[ 0.25, -0.25]])
    """
    ops = logits_operands(
        input,
        target,
        temperature=temperature,
        reduction=reduction,
        axis=axis,
        direction=direction,
        scale_by_temperature_squared=scale_by_temperature_squared,
        mask=mask,
        beta=beta,
    )
    target_grad = check_bool(target_grad, "target_grad")
    out_shape = ops.output_shape
    g = check_grad_output(
        grad_output, xp=ops.xp, like=ops.input, output_shape=out_shape, dtype=ops.dtype
    )
    g = ops.xp.astype(g, ops.dtype, copy=False)
    return _dispatch.evaluate("kl_div_from_logits_backward", ops.xp, g, ops, target_grad)
