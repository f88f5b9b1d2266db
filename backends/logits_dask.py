r"""The Dask fast path of ``kl_div_from_logits``: every block of rows through its library, lazily.

The class axis is made one chunk (rows are independent) and the teacher's
chunks are made the student's; each block of rows is then evaluated by
:func:`kldiv_spec.kl_div_from_logits` on the chunk's own library (NumPy chunks
take the blocked NumPy fast path) inside that library's floating-point error
state, so computing the result emits no ``RuntimeWarning`` for the NaN and
infinities of the edge values. The reductions are a lazy tree of one float64
partial sum per block, rounded to the dtype, divided by the divisor (a lazy
count of the kept rows with a mask) and multiplied by :math:`k`:

.. math::

    L = k \cdot \frac{1}{D} \sum_{\text{blocks } b} S_b .

The backward of a reduction maps ``kl_div_from_logits_backward`` over the
same blocks with the upstream gradient ``g / D`` (a lazy 0-d array). Nothing
is computed inside either call. Empty arrays, and the ``'none'`` backward, are
left to the reference.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import dask.array as da
import numpy as np

from kldiv_spec import _core_logits
from kldiv_spec._core import divide_total
from kldiv_spec._floating_point import quiet
from kldiv_spec._validation import LogitsOperands, check_grad_output, logits_operands

from ._protocol import Connection, Evaluate

__all__ = ["connect", "kl_div_from_logits", "kl_div_from_logits_backward"]

#: The dispatcher's ``evaluate``: a block of rows is evaluated as any call of its own library is.
_connection = Connection("Dask")
connect = _connection.connect
_connected = _connection.evaluate


def _from_logits(s: Any, t: Any, /, *, mask: Any, evaluate: Evaluate, **options: Any) -> Any:
    """``kl_div_from_logits`` of one block, through its library's fast path or reference."""
    ops = logits_operands(s, t, mask=mask, **options)
    result = evaluate("kl_div_from_logits", ops.xp, ops)
    return np.asarray(result) if isinstance(result, np.generic) else result


def _from_logits_backward(
    g: Any, s: Any, t: Any, /, *, mask: Any, target_grad: bool, evaluate: Evaluate, **options: Any
) -> Any:
    """``kl_div_from_logits_backward`` of one block, as :func:`_from_logits`."""
    ops = logits_operands(s, t, mask=mask, **options)
    g = check_grad_output(g, xp=ops.xp, like=s, output_shape=ops.output_shape, dtype=ops.dtype)
    g = ops.xp.astype(g, ops.dtype, copy=False)
    return evaluate("kl_div_from_logits_backward", ops.xp, g, ops, target_grad)


def _blocks(ops: LogitsOperands) -> tuple[Any, Any, Any] | None:
    """Return the student, teacher and kept-axis mask, chunked alike, or None (not taken)."""
    if math.prod(ops.shape) == 0:
        return None
    ax = ops.axis
    s = ops.input.rechunk({ax: -1})
    t = ops.target.rechunk(s.chunks)
    mask = None
    if ops.mask is not None:
        rows = da.broadcast_to(da.asarray(ops.mask), ops.row_shape)
        row_chunks = tuple(c for i, c in enumerate(s.chunks) if i != ax)
        mask = da.expand_dims(rows.rechunk(row_chunks), axis=ax)
    return s, t, mask


def _options(ops: LogitsOperands, reduction: str) -> dict[str, Any]:
    return {
        "temperature": ops.temperature,
        "reduction": reduction,
        "axis": ops.axis,
        "direction": ops.direction,
        "scale_by_temperature_squared": False,
    }


def _row_mask(m: Any, axis: int) -> Any:
    xp = array_api_compat.array_namespace(m)
    return xp.squeeze(m, axis=axis)


def _terms_block(s: Any, t: Any, *rest: Any, ops: LogitsOperands, evaluate: Evaluate) -> Any:
    mask = _row_mask(rest[0], ops.axis) if rest else None
    options = {**_options(ops, "none"), "scale_by_temperature_squared": ops.factor != 1.0}
    with quiet(array_api_compat.array_namespace(s)):
        return _from_logits(s, t, mask=mask, evaluate=evaluate, **options)


def _sum_block(s: Any, t: Any, *rest: Any, ops: LogitsOperands, evaluate: Evaluate) -> Any:
    mask = _row_mask(rest[0], ops.axis) if rest else None
    xp = array_api_compat.array_namespace(s)
    with quiet(xp):
        total = _from_logits(s, t, mask=mask, evaluate=evaluate, **_options(ops, "sum"))
        return xp.reshape(xp.astype(total, xp.float64), (1,) * s.ndim)


def _grad_block(
    s: Any, t: Any, g: Any, *rest: Any, ops: LogitsOperands, which: int, evaluate: Evaluate
) -> Any:
    mask = _row_mask(rest[0], ops.axis) if rest else None
    options = {**_options(ops, "sum"), "scale_by_temperature_squared": ops.factor != 1.0}
    with quiet(array_api_compat.array_namespace(s)):
        grads = _from_logits_backward(
            g, s, t, mask=mask, target_grad=which == 1, evaluate=evaluate, **options
        )
    return grads[which]


def _with_mask(arrays: list[Any], mask: Any) -> list[Any]:
    return arrays if mask is None else [*arrays, mask]


def kl_div_from_logits(ops: LogitsOperands, /) -> Any:
    """Return the lazy loss, or NotImplemented for empty arrays."""
    if ops.beta is not None:  # the Jensen-Shannon divergence: the reference only, for now
        return NotImplemented
    blocks = _blocks(ops)
    if blocks is None:
        return NotImplemented
    s, t, mask = blocks
    xp = ops.xp
    if ops.reduction == "none":
        out = da.map_blocks(
            _terms_block,
            *_with_mask([s, t], mask),
            ops=ops,
            evaluate=_connected(),
            dtype=s.dtype,
            meta=s._meta,
        )
        return xp.astype(out, ops.dtype, copy=False)
    partials = da.map_blocks(
        _sum_block,
        *_with_mask([s, t], mask),
        ops=ops,
        evaluate=_connected(),
        chunks=tuple((1,) * len(c) for c in s.chunks),
        dtype=np.float64,
        meta=np.empty((0,) * s.ndim, np.float64),
    )
    total = xp.astype(xp.sum(partials), ops.compute_dtype)
    if mask is None:
        d = _core_logits.row_divisor(ops.reduction, shape=ops.shape, axis=ops.axis)
        result = divide_total(total, d, xp=xp)
    else:
        d_arr = _core_logits.masked_divisor(
            ops.reduction, mask, vocab=ops.vocab, dtype=ops.compute_dtype, xp=xp
        )
        result = _core_logits.divide_masked(total, d_arr, xp=xp)
    if ops.factor != 1.0:
        result = result * ops.factor
    return xp.astype(result, ops.dtype, copy=False)


def kl_div_from_logits_backward(g: Any, ops: LogitsOperands, target_grad: bool, /) -> Any:
    """Return the lazy gradients of a reduction, or NotImplemented (``'none'``, empty)."""
    if ops.beta is not None:  # the Jensen-Shannon divergence: the reference only, for now
        return NotImplemented
    blocks = _blocks(ops)
    if blocks is None or ops.reduction == "none":
        return NotImplemented
    s, t, mask = blocks
    xp = ops.xp
    g = xp.astype(da.asarray(g), ops.compute_dtype)
    if mask is None:
        d = _core_logits.row_divisor(ops.reduction, shape=ops.shape, axis=ops.axis)
        g = divide_total(g, d, xp=xp)
    else:
        d_arr = _core_logits.masked_divisor(
            ops.reduction, mask, vocab=ops.vocab, dtype=ops.compute_dtype, xp=xp
        )
        g = _core_logits.divide_masked(g, d_arr, xp=xp)
    out = []
    for which, like in ((0, ops.input), (1, ops.target)):
        if which == 1 and not target_grad:
            out.append(None)
            continue
        grad = da.map_blocks(
            _grad_block,
            *_with_mask([s, t, g], mask),
            ops=ops,
            evaluate=_connected(),
            which=which,
            dtype=s.dtype,
            meta=s._meta,
        )
        out.append(xp.astype(grad.rechunk(like.chunks), like.dtype, copy=False))
    return out[0], out[1]
