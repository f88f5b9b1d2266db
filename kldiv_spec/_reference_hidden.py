r"""The from-hidden reference: the logits materialised, then the from-logits reference.

By definition :func:`kldiv_spec.kl_div_from_hidden` is the from-logits loss of

.. math::

    s = h_s W_s^\top + b_s, \qquad t = h_t W_t^\top + b_t,

formed here with ``xp.matmul`` (array API code: NumPy, array-api-strict, PyTorch,
JAX, Dask, CuPy), in the common dtype of each model's operands and then the result
dtype, and handed to the from-logits reference (:mod:`kldiv_spec._reference_logits`,
with its analytic backward on PyTorch and JAX). The teacher is frozen: its logits
are detached (PyTorch) or behind ``stop_gradient`` (JAX), so no gradient reaches its
operands. :func:`backward` gives the student's gradients by the chain rule through
the logits' gradient :math:`G = \partial L / \partial s`:

.. math::

    \frac{\partial L}{\partial h_s} = G\,W_s, \qquad
    \frac{\partial L}{\partial W_s} = \sum_{\text{rows } i} G_i^\top h_{s,i}, \qquad
    \frac{\partial L}{\partial b_s} = \sum_{\text{rows } i} G_i.
"""

from __future__ import annotations

from typing import Any

import array_api_compat

from . import _reference_logits
from ._floating_point import quiet
from ._validation import HiddenOperands

__all__: list[str] = []

Array = Any


def logits(xp: Any, hidden: Array, weight: Array, bias: Array | None, dtype: Any, /) -> Array:
    r"""Return :math:`h W^\top (+ b)` in ``dtype``.

    The product is taken in the common dtype of ``hidden``, ``weight`` and ``bias``
    (operands of another dtype are converted first), then converted to ``dtype``.
    """
    parts = (hidden, weight) if bias is None else (hidden, weight, bias)
    common = xp.result_type(*(a.dtype for a in parts))
    h, w = (xp.astype(a, common, copy=False) for a in (hidden, weight))
    z = xp.matmul(h, xp.permute_dims(w, (1, 0)))
    if bias is not None:
        z = z + xp.astype(bias, common, copy=False)
    return xp.astype(z, dtype, copy=False)


def _frozen(a: Array) -> Array:
    """Return ``a`` cut from the autodiff graph (PyTorch, JAX); else ``a`` itself."""
    if array_api_compat.is_torch_array(a):
        return a.detach()
    if array_api_compat.is_jax_array(a):
        import jax

        return jax.lax.stop_gradient(a)
    return a


def student_logits(ops: HiddenOperands, /) -> Array:
    """Return the student's logits in the result dtype."""
    return logits(ops.xp, ops.student_hidden, ops.student_weight, ops.student_bias, ops.dtype)


def teacher_logits(ops: HiddenOperands, /) -> Array:
    """Return the teacher's logits in the result dtype, cut from the autodiff graph."""
    xp = ops.xp
    if ops.teacher_logits is not None:
        return _frozen(xp.astype(ops.teacher_logits, ops.dtype, copy=False))
    assert ops.teacher_hidden is not None and ops.teacher_weight is not None
    t = logits(xp, ops.teacher_hidden, ops.teacher_weight, ops.teacher_bias, ops.dtype)
    return _frozen(t)


def forward(ops: HiddenOperands, /) -> Array:
    """Evaluate :func:`kldiv_spec.kl_div_from_hidden` (no autodiff: NumPy, array-api-strict)."""
    lops = ops.logits_operands(student_logits(ops), teacher_logits(ops))
    return _reference_logits.forward(lops)


def forward_torch(ops: HiddenOperands, /) -> Array:
    """Evaluate on PyTorch: autograd carries the gradients through the logits."""
    from ._autodiff_logits_torch import from_logits_with_gradient

    return from_logits_with_gradient(ops.logits_operands(student_logits(ops), teacher_logits(ops)))


def forward_jax(ops: HiddenOperands, /) -> Array:
    """Evaluate on JAX: ``jax.grad`` carries the gradients through the logits."""
    from ._autodiff_logits_jax import from_logits_with_gradient

    return from_logits_with_gradient(ops.logits_operands(student_logits(ops), teacher_logits(ops)))


def backward(g: Array, ops: HiddenOperands, /) -> tuple[Array, Array, Array | None]:
    """Return the gradients w.r.t. the student's hidden states, weight and bias (or None).

    ``g`` is the upstream gradient, already checked against the output's shape. Each
    gradient has its own argument's shape and dtype.
    """
    xp = ops.xp
    s = student_logits(ops)
    lops = ops.logits_operands(s, teacher_logits(ops))
    gs, _ = _reference_logits.backward(g, lops, False)
    h, w, b = ops.student_hidden, ops.student_weight, ops.student_bias
    vocab, width = w.shape
    with quiet(xp):
        g2 = xp.reshape(gs, (-1, vocab))
        gw_dtype = xp.result_type(gs.dtype, w.dtype, h.dtype)
        g2c = xp.astype(g2, gw_dtype, copy=False)
        grad_h = xp.matmul(g2c, xp.astype(w, gw_dtype, copy=False))
        h2 = xp.astype(xp.reshape(h, (-1, width)), gw_dtype, copy=False)
        grad_w = xp.matmul(xp.permute_dims(g2c, (1, 0)), h2)
        grad_b = None if b is None else xp.astype(xp.sum(g2c, axis=0), b.dtype, copy=False)
        grad_h = xp.astype(xp.reshape(grad_h, tuple(h.shape)), h.dtype, copy=False)
        grad_w = xp.astype(grad_w, w.dtype, copy=False)
    return grad_h, grad_w, grad_b
