r"""Knowledge distillation from hidden states: the from-logits loss without holding the logits.

``kl_div_from_hidden`` takes each model's last hidden states and output layer
(``(V, H)`` weights, as ``torch.nn.Linear`` holds them) instead of its logits. Its
value is, by definition, :func:`kldiv_spec.kl_div_from_logits` of the logits
:math:`h W^\top + b`; the reference forms them (:mod:`kldiv_spec._reference_hidden`),
the fast paths (``kldiv_spec.backends.hidden_<name>``) walk the rows in chunks and
never hold them. See ``docs/hidden.md``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _dispatch
from ._validation import check_grad_output, hidden_operands

__all__ = ["kl_div_from_hidden", "kl_div_from_hidden_backward"]

Array = Any


def kl_div_from_hidden(
    student_hidden: Array,
    student_weight: Array,
    teacher_hidden: Array | None = None,
    teacher_weight: Array | None = None,
    /,
    *,
    student_bias: Array | None = None,
    teacher_bias: Array | None = None,
    teacher_logits: Array | None = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    direction: str = "forward",
    scale_by_temperature_squared: bool = True,
    mask: Array | None = None,
    labels: Array | None = None,
    ignore_index: int = -100,
    beta: float | None = None,
    memory_budget: int | None = None,
) -> Array:
    r"""Distillation loss from the hidden states and output layers of a student and a teacher.

    With the logits :math:`s = h_s W_s^\top + b_s` and :math:`t = h_t W_t^\top + b_t`
    (the classes last), the value is by definition

    .. code-block:: python

        kl_div_from_logits(s, t, temperature=..., reduction=..., direction=...,
                           scale_by_temperature_squared=..., mask=..., beta=...)

    that is :math:`k \cdot \operatorname{reduce}_i\, p_i (\log p_i - \log q_i)` with
    :math:`q = \operatorname{softmax}(s / T)`, :math:`p = \operatorname{softmax}(t / T)`
    and :math:`k = T^2` (or 1), and the other divergences of
    :func:`kldiv_spec.kl_div_from_logits`. The fast paths compute it in chunks of
    rows and never hold the logits (``docs/hidden.md``). Only the student gets
    gradients (its hidden states, weight and bias); the teacher is frozen.

    Parameters
    ----------
    student_hidden : array
        The student's last hidden states ``(..., H_s)``; the leading axes are the rows
        (tokens).
    student_weight : array
        Its output weight ``(V, H_s)``.
    teacher_hidden, teacher_weight : array, optional
        The teacher's hidden states ``(..., H_t)`` (the student's rows; the width may
        differ) and output weight ``(V, H_t)``. Omit both and give
        ``teacher_logits`` instead when the teacher's logits are at hand.
    student_bias, teacher_bias : array, optional
        Output biases ``(V,)``.
    teacher_logits : array, optional
        The teacher's logits ``(..., V)``, instead of its hidden states and weight.
    temperature, reduction, direction, scale_by_temperature_squared, beta
        As :func:`kldiv_spec.kl_div_from_logits` (``'batchmean'`` divides by
        ``student_hidden.shape[0]``; ``'rowmean'`` is the per-token mean).
    mask : boolean array, optional
        Of the rows' shape (broadcastable): True keeps a row, as in
        :func:`kldiv_spec.kl_div_from_logits`.
    labels : integer array, optional
        Of the rows' shape (broadcastable): rows whose label is ``ignore_index`` are
        dropped as a False in ``mask`` would drop them (padding in a batch of
        sequences); together with ``mask``, a row is kept where both keep it.
    ignore_index : int, default -100
        The label of the rows to drop (PyTorch's ``cross_entropy`` default).
    memory_budget : int, optional
        Bytes one chunk's temporaries may take on a chunked fast path (its default
        otherwise); it sets the rows per chunk, never the value.

    Returns
    -------
    array
        Of the common dtype of the floating operands (half precision computed in
        float32 and rounded once); the logits' shape for ``'none'``, else 0-d.

    Raises
    ------
    TypeError
        For non-arrays, arrays of two libraries, non-floating operands, non-integer
        labels, a non-boolean mask, a teacher given both ways or not at all, options of
        the wrong type.
    ValueError
        For shapes that do not fit (each error names the argument), arrays on two
        devices, and option values :func:`kldiv_spec.kl_div_from_logits` rejects.

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv_spec
    >>> rng = np.random.default_rng(0)
    >>> h_s, w_s = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    >>> h_t, w_t = rng.standard_normal((4, 2)), rng.standard_normal((5, 2))
    >>> loss = kldiv_spec.kl_div_from_hidden(h_s, w_s, h_t, w_t, temperature=2.0)
    >>> same = kldiv_spec.kl_div_from_logits(h_s @ w_s.T, h_t @ w_t.T, temperature=2.0)
    >>> bool(np.isclose(loss, same, rtol=1e-14))
    True
    """
    ops = hidden_operands(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        teacher_logits=teacher_logits,
        temperature=temperature,
        reduction=reduction,
        direction=direction,
        scale_by_temperature_squared=scale_by_temperature_squared,
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
        beta=beta,
        memory_budget=memory_budget,
    )
    result = _dispatch.evaluate("kl_div_from_hidden", ops.xp, ops)
    return np.asarray(result) if isinstance(result, np.generic) else result


def kl_div_from_hidden_backward(
    grad_output: Array | float,
    student_hidden: Array,
    student_weight: Array,
    teacher_hidden: Array | None = None,
    teacher_weight: Array | None = None,
    /,
    *,
    student_bias: Array | None = None,
    teacher_bias: Array | None = None,
    teacher_logits: Array | None = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    direction: str = "forward",
    scale_by_temperature_squared: bool = True,
    mask: Array | None = None,
    labels: Array | None = None,
    ignore_index: int = -100,
    beta: float | None = None,
    memory_budget: int | None = None,
) -> tuple[Array, Array, Array | None]:
    r"""Gradients of :func:`kl_div_from_hidden` w.r.t. the student's hidden states, weight, bias.

    For libraries without autograd. With :math:`G = \partial L / \partial s` the
    gradient w.r.t. the student's logits
    (:func:`kldiv_spec.kl_div_from_logits_backward`), the rows flattened:

    .. math::

        \frac{\partial L}{\partial h_s} = G\,W_s, \qquad
        \frac{\partial L}{\partial W_s} = G^\top h_s, \qquad
        \frac{\partial L}{\partial b_s} = \textstyle\sum_i G_i.

    Parameters
    ----------
    grad_output : array or float
        The gradient w.r.t. the loss: 0-d for the reductions, broadcastable to the
        logits' shape for ``'none'``.
    student_hidden, student_weight, teacher_hidden, teacher_weight
        As :func:`kl_div_from_hidden`.
    student_bias, teacher_bias, teacher_logits, temperature, reduction, direction
        As :func:`kl_div_from_hidden`.
    scale_by_temperature_squared, mask, labels, ignore_index, beta, memory_budget
        As :func:`kl_div_from_hidden`.

    Returns
    -------
    tuple
        ``(grad_hidden, grad_weight, grad_bias)``, each of its argument's shape and
        dtype; ``grad_bias`` is None without a ``student_bias``. The teacher gets none.

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv_spec
    >>> h, w = np.ones((2, 3)), np.zeros((4, 3))
    >>> gh, gw, gb = kldiv_spec.kl_div_from_hidden_backward(
    ...     1.0, h, w, teacher_logits=np.zeros((2, 4)), student_bias=np.zeros(4))
    >>> float(np.abs(gw).max()), gb.shape  # equal logits: nothing to learn
    (0.0, (4,))
    """
    ops = hidden_operands(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        teacher_logits=teacher_logits,
        temperature=temperature,
        reduction=reduction,
        direction=direction,
        scale_by_temperature_squared=scale_by_temperature_squared,
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
        beta=beta,
        memory_budget=memory_budget,
    )
    g = check_grad_output(
        grad_output,
        xp=ops.xp,
        like=ops.student_hidden,
        output_shape=ops.output_shape,
        dtype=ops.dtype,
    )
    g = ops.xp.astype(g, ops.dtype, copy=False)
    return _dispatch.evaluate("kl_div_from_hidden_backward", ops.xp, g, ops)


# torch.compile records a call as one node and traces it with its operands (the chunked
# operator's fake kernel), instead of tracing the validation's Python.
_dispatch.register_entry_point(kl_div_from_hidden)
