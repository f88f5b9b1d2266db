r"""The reference distillation loss from hidden states: logits composed, then the KL.

Fused-linear losses (Liger-Kernel's ``LigerFusedLinearJSDLoss``, say) take the
last hidden states :math:`h` of each model and its output projection
:math:`W` (``(V, H)``, as ``torch.nn.Linear`` holds it) and bias :math:`b`,
and compute the distillation loss of the logits

.. math::

    s = h_s W_s^\top + b_s, \qquad t = h_t W_t^\top + b_t,

in chunks of rows, never holding the logits. :func:`from_hidden` is the
definition the ``from-hidden`` conformance properties check them against:
the logits formed with ``xp.matmul`` in the operands' dtype, then
:func:`kldiv_spec.kl_div_from_logits`. It is array API code (NumPy,
array-api-strict, PyTorch, JAX, Dask, ...), not a fused kernel: a chunked
``kldiv_spec.kl_div_from_hidden`` is another issue's work.

The teacher is frozen: no gradient flows back to its hidden states, weight or
bias (``detach`` on PyTorch, ``jax.lax.stop_gradient`` on JAX), as the fused
libraries define it. :func:`from_hidden_backward` gives the student's
gradients on libraries without autograd, by the chain rule through the
logits' gradient :math:`G = \partial L / \partial s` of
:func:`kldiv_spec.kl_div_from_logits_backward`:

.. math::

    \frac{\partial L}{\partial h_s} = G\,W_s, \qquad
    \frac{\partial L}{\partial W_s} = \sum_{\text{rows } i} G_i^\top h_{s,i}, \qquad
    \frac{\partial L}{\partial b_s} = \sum_{\text{rows } i} G_i.

This module imports nothing from the suite (a leaf, as :mod:`.numpy_impl`).
"""

from __future__ import annotations

from typing import Any

import array_api_compat

import kldiv_spec

__all__ = ["chain_rule", "from_hidden", "from_hidden_backward", "logits"]


def _namespace(*arrays: Any) -> Any:
    return array_api_compat.array_namespace(*(a for a in arrays if a is not None))


def logits(hidden: Any, weight: Any, bias: Any = None, /) -> Any:
    r"""Return the logits :math:`h W^\top (+ b)` in the operands' dtype.

    Parameters
    ----------
    hidden : array
        Hidden states ``(..., H)``.
    weight : array
        Output weights ``(V, H)``.
    bias : array, optional
        Output bias ``(V,)``.

    Returns
    -------
    array
        The logits ``(..., V)``: ``xp.matmul(hidden, weight.T)`` (plus ``bias``).
    """
    xp = _namespace(hidden, weight, bias)
    z = xp.matmul(hidden, xp.permute_dims(weight, (1, 0)))
    return z if bias is None else z + bias


def _frozen(a: Any) -> Any:
    """Return ``a`` with no gradient flowing back to it (PyTorch, JAX); else ``a`` itself."""
    if array_api_compat.is_torch_array(a):
        return a.detach()
    if array_api_compat.is_jax_array(a):
        import jax

        return jax.lax.stop_gradient(a)
    return a


def from_hidden(
    student_hidden: Any,
    student_weight: Any,
    teacher_hidden: Any,
    teacher_weight: Any,
    /,
    *,
    student_bias: Any = None,
    teacher_bias: Any = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    direction: str = "forward",
    scale_by_temperature_squared: bool = True,
    mask: Any = None,
) -> Any:
    r"""Distillation KL of the logits of two models' hidden states and output layers.

    With :math:`s = h_s W_s^\top + b_s` and :math:`t = h_t W_t^\top + b_t`
    (the class axis last), the value is ``kl_div_from_logits(s, t, ...)``:
    :math:`k \cdot \operatorname{reduce}_i\, p_i (\log p_i - \log q_i)` with
    :math:`p = \operatorname{softmax}(t / T)`, :math:`q = \operatorname{softmax}(s / T)`,
    :math:`k = T^2` (or 1), and the reverse KL for ``direction='reverse'``.
    The teacher's operands get no gradient.

    Parameters
    ----------
    student_hidden, teacher_hidden : array
        Hidden states ``(..., H_s)`` and ``(..., H_t)``, the same leading shape
        (the rows); the two models may have different widths.
    student_weight, teacher_weight : array
        Output weights ``(V, H_s)`` and ``(V, H_t)``: the same vocabulary.
    student_bias, teacher_bias : array, optional
        Output biases ``(V,)``.
    temperature, reduction, direction, scale_by_temperature_squared, mask
        As :func:`kldiv_spec.kl_div_from_logits` (``mask`` over the rows).

    Returns
    -------
    array
        The loss: the logits' shape for ``'none'``, else 0-d; the operands' dtype.

    Notes
    -----
    A reference, not a fused kernel: it materialises the logits. A chunked
    ``kldiv_spec.kl_div_from_hidden`` that never holds them is planned
    separately; this function defines what it must compute.
    """
    s = logits(student_hidden, student_weight, student_bias)
    t = logits(
        _frozen(teacher_hidden),
        _frozen(teacher_weight),
        None if teacher_bias is None else _frozen(teacher_bias),
    )
    return kldiv_spec.kl_div_from_logits(
        s,
        t,
        temperature=temperature,
        reduction=reduction,
        direction=direction,
        scale_by_temperature_squared=scale_by_temperature_squared,
        mask=mask,
    )


def from_hidden_backward(
    grad_output: Any,
    student_hidden: Any,
    student_weight: Any,
    teacher_hidden: Any,
    teacher_weight: Any,
    /,
    *,
    student_bias: Any = None,
    teacher_bias: Any = None,
    **options: Any,
) -> tuple[Any, Any, Any]:
    r"""Gradients of :func:`from_hidden` w.r.t. the student's hidden states, weight and bias.

    With :math:`G` the gradient w.r.t. the student logits
    (:func:`kldiv_spec.kl_div_from_logits_backward` at the composed logits),
    :math:`\partial_{h} = G W_s`, :math:`\partial_{W} = G_2^\top h_2` (the rows
    flattened: :math:`G_2` is ``(R, V)``, :math:`h_2` is ``(R, H_s)``) and
    :math:`\partial_{b} = \sum_i G_{2,i}`.

    Parameters
    ----------
    grad_output : array or float
        The gradient w.r.t. the loss (the logits' shape for ``'none'``).
    student_hidden, student_weight, teacher_hidden, teacher_weight : array
        As :func:`from_hidden`.
    student_bias, teacher_bias : array, optional
        As :func:`from_hidden`.
    **options
        ``temperature``, ``reduction``, ``direction``,
        ``scale_by_temperature_squared``, ``mask``.

    Returns
    -------
    tuple
        ``(grad_hidden, grad_weight, grad_bias)``; ``grad_bias`` is None
        without a ``student_bias``. The teacher gets none.
    """
    s = logits(student_hidden, student_weight, student_bias)
    t = logits(teacher_hidden, teacher_weight, teacher_bias)
    g, _ = kldiv_spec.kl_div_from_logits_backward(grad_output, s, t, **options)
    return chain_rule(g, student_hidden, student_weight, student_bias)


def chain_rule(g: Any, student_hidden: Any, student_weight: Any, student_bias: Any, /) -> Any:
    r"""Carry a gradient ``g`` w.r.t. the student logits back to ``(h, W, b)``.

    :math:`\partial_{h} = G W_s`, :math:`\partial_{W} = G_2^\top h_2` and
    :math:`\partial_{b} = \sum_i G_{2,i}` (None without a bias), as
    :func:`from_hidden_backward` does; a NaN row of ``g`` spreads through the sums.
    """
    xp = _namespace(g, student_hidden, student_weight, student_bias)
    vocab, width = student_weight.shape
    grad_hidden = xp.matmul(g, student_weight)
    g2 = xp.reshape(g, (-1, vocab))
    h2 = xp.reshape(student_hidden, (-1, width))
    grad_weight = xp.matmul(xp.permute_dims(g2, (1, 0)), h2)
    grad_bias = None if student_bias is None else xp.sum(g2, axis=0)
    return grad_hidden, grad_weight, grad_bias
