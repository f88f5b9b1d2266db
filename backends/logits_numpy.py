"""The NumPy fast path of ``kl_div_from_logits``: blocked rows, forward and gradient in one pass.

Calls whose logits are C-contiguous float32 or float64 arrays of one dtype with
the classes on the last axis, and at least
:data:`~kldiv_spec.backends._blocks.MIN_ELEMENTS` elements (or
``$KLDIV_SPEC_NUMPY_MIN_ELEMENTS``), are evaluated by
:mod:`kldiv_spec.backends._blocks_logits`, and so are float16 arrays where its
compiled kernel runs (computed in float32, as the reference computes half
precision: the loss rounded once to float16, and the gradient too, with the
upstream gradient in the kernel's scale); the rest (other axes, strided or
mixed-dtype operands, small arrays), the ``'none'`` backward and the teacher's
gradient are left to the reference (``NotImplemented``).

``beta`` 0 and 1 are the forward and reverse KL (:meth:`LogitsOperands.evaluated`)
and take the paths above; any other ``beta`` (the generalised Jensen-Shannon
divergence) takes the float32 kernel of :mod:`kldiv_spec.backends._blocks_jsd`
(float64 goes to the reference).

The reductions add the rows' float64 sums, round the total to the dtype, and
divide by the divisor (:func:`kldiv_spec._core.divide_total`; with a mask,
by the number of kept rows, 0 when there is none), then multiply by
:math:`k`, in the composition's order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kldiv_spec._validation import LogitsOperands

from . import _blocks_logits

__all__ = ["evaluate", "kl_div_from_logits", "kl_div_from_logits_backward"]


def evaluate(
    ops: LogitsOperands,
    s: Any,
    t: Any,
    /,
    *,
    with_grad: bool,
    need_loss: bool = True,
    bfloat16: bool = False,
    upstream: float = 1.0,
) -> tuple[Any, Any] | None:
    """Return ``(loss, student gradient for the upstream gradient or None)``, or None.

    ``s`` and ``t`` are NumPy arrays (or zero-copy NumPy views of tensors) of
    the logits' shape; with ``bfloat16=True``, the int16 bits of bfloat16 logits.
    None means the kernels do not take the call. ``need_loss=False`` (with a
    gradient) lets the kernels skip the loss, which is then not meaningful.
    ``upstream`` (a reduced loss's upstream gradient ``g``) goes into the
    kernel's scale, so that a half-precision gradient is rounded once; callers
    with float32 and float64 logits pass 1 and multiply afterwards.

    Half precision (float16, bfloat16) is computed in float32: the loss is
    returned in float32 for bfloat16 (the caller rounds it) and rounded to
    float16 here; the gradient and ``'none'`` terms come in the logits' dtype.
    """
    arranged = _blocks_logits.rows(
        ops, s, t, lambda a, b: _blocks_logits.supported(a, b, bfloat16=bfloat16)
    )
    if arranged is None:
        return None
    s2, t2, kept = arranged
    dt = s2.dtype
    half = dt not in (np.float32, np.float64)
    if ops.reduction == "none":
        if with_grad:
            return None
        out = np.empty(ops.shape, dt)
        _blocks_logits.from_logits(
            s2,
            t2,
            temperature=ops.temperature,
            direction=ops.direction,
            kept=kept,
            grad_scale=None,
            terms_out=out.reshape(s2.shape),
            factor=ops.factor,
        )
        return out, None
    d = _blocks_logits.divisor(ops, kept)
    scale = None
    if with_grad:
        scale = 0.0 if d == 0 else upstream * ops.factor / ops.temperature / d
    kl, grad = _blocks_logits.from_logits(
        s2,
        t2,
        temperature=ops.temperature,
        direction=ops.direction,
        kept=kept,
        grad_scale=scale,
        need_loss=need_loss,
    )
    with np.errstate(all="ignore"):
        total = float(np.add.reduce(kl) + 0.0)
    compute = np.dtype(np.float32) if half else dt
    loss = _blocks_logits.finish(total, d, ops, compute, kept is not None)
    if half and not bfloat16:
        loss = loss.astype(dt)
    return loss, (None if grad is None else grad.reshape(ops.shape))


def kl_div_from_logits(ops: LogitsOperands, /) -> Any:
    """Return the loss, or NotImplemented to defer to the reference."""
    ops = ops.evaluated()
    if ops.beta is not None:  # the Jensen-Shannon divergence: its own float32 kernel
        from . import _blocks_jsd

        return _blocks_jsd.forward(ops)
    s, t = ops.input, ops.target
    if type(s) is not np.ndarray or type(t) is not np.ndarray:
        return NotImplemented
    done = evaluate(ops, s, t, with_grad=False)
    return NotImplemented if done is None else done[0]


def kl_div_from_logits_backward(g: Any, ops: LogitsOperands, target_grad: bool, /) -> Any:
    """Return ``(grad_input, None)`` from one blocked pass, or NotImplemented.

    Taken for the reductions (a 0-d ``g``) without ``target_grad``.
    """
    ops = ops.evaluated()
    if ops.beta is not None:  # the Jensen-Shannon divergence: its own float32 kernel
        from . import _blocks_jsd

        return _blocks_jsd.backward(g, ops, target_grad)
    s, t = ops.input, ops.target
    if target_grad or ops.reduction == "none":
        return NotImplemented
    if type(s) is not np.ndarray or type(t) is not np.ndarray:
        return NotImplemented
    if s.dtype == np.float16:  # the upstream gradient in the kernel's scale: one rounding
        done = evaluate(ops, s, t, with_grad=True, need_loss=False, upstream=float(g))
        return NotImplemented if done is None else (done[1], None)
    done = evaluate(ops, s, t, with_grad=True, need_loss=False)
    if done is None:
        return NotImplemented
    grad = done[1]
    with np.errstate(all="ignore"):
        np.multiply(grad, np.asarray(g, dtype=grad.dtype), out=grad)
    return grad, None
