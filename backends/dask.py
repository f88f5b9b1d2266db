r"""The Dask fast path: every chunk through the chunk library's own path, still lazy.

``kl_div`` broadcasts and rechunks both operands to the output's shape and
chunks, then maps each pair of chunks through the dispatcher on the chunk's array
library (:func:`connect`) (so NumPy chunks take the blocked NumPy fast path, CuPy
chunks the CuPy one, small chunks the reference), inside that library's
floating-point error state: computing the result emits no ``RuntimeWarning``
for NaN-producing values, as in PyTorch. Reductions are a lazy tree: one
float64 partial sum per chunk, summed by Dask, rounded to the common dtype and
divided by the reduction's divisor

.. math::

    L = \frac{1}{D} \sum_{\text{chunks } c} \Bigl(\sum_{i \in c} \ell_i\Bigr).

``kl_div_backward`` maps chunks the same way, with ``g / D`` broadcast to the
output, and sums each gradient back over broadcast axes lazily. Nothing is
computed inside either call. 0-d and empty arrays are left to the reference.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import dask.array as da
import numpy as np

from kldiv_spec._core import divide_total, sum_to_shape
from kldiv_spec._validation import Operands, grad_output_array, operands

from ._protocol import Connection, Evaluate

__all__ = ["connect", "kl_div", "kl_div_backward"]

#: The dispatcher's ``evaluate``: a chunk is evaluated as any call of its own library is.
_connection = Connection("Dask")
connect = _connection.connect
_connected = _connection.evaluate


def _chunk_library_kl_div(
    x: Any, t: Any, /, *, reduction: str, log_target: bool, evaluate: Evaluate
) -> Any:
    """Evaluate one chunk with the chunk's own library (fast path or reference)."""
    ops = operands(x, t, reduction=reduction, log_target=log_target)
    return evaluate("kl_div", ops.xp, ops)


def _chunk_none(x: Any, t: Any, /, *, log_target: bool, evaluate: Evaluate) -> Any:
    return _chunk_library_kl_div(x, t, reduction="none", log_target=log_target, evaluate=evaluate)


def _chunk_sum(x: Any, t: Any, /, *, log_target: bool, evaluate: Evaluate) -> Any:
    """Return the chunk's loss sum as a float64 array of shape ``(1,) * ndim``."""
    xp = array_api_compat.array_namespace(x)
    if x.size == 0:
        return xp.zeros((1,) * x.ndim, dtype=xp.float64)
    total = _chunk_library_kl_div(x, t, reduction="sum", log_target=log_target, evaluate=evaluate)
    return xp.reshape(xp.asarray(total, dtype=xp.float64), (1,) * x.ndim)


def _chunk_gradients(g: Any, x: Any, t: Any, /, *, log_target: bool, evaluate: Evaluate) -> Any:
    """Return both gradients of one chunk stacked along a new leading axis of size 2."""
    xp = array_api_compat.array_namespace(x)
    ops = operands(x, t, reduction="none", log_target=log_target)
    grad_x, grad_t = evaluate("kl_div_backward", ops.xp, grad_output_array(g, ops), ops)
    return xp.stack([grad_x, grad_t])


def _aligned(ops: Operands, /, *arrays: Any) -> list[Any]:
    """Broadcast ``arrays`` to the output shape, with the chunks of the first one."""
    shape = ops.output_shape
    first = da.broadcast_to(arrays[0], shape)
    out = [first]
    for a in arrays[1:]:
        out.append(da.broadcast_to(a, shape).rechunk(first.chunks))
    return out


def _handles(ops: Operands, /) -> bool:
    shape = ops.output_shape
    return len(shape) > 0 and all(n > 0 for n in shape)


def _meta(a: Any, dtype: Any, /) -> Any:
    """Return an empty chunk-library array of ``dtype`` for Dask's metadata."""
    meta = getattr(a, "_meta", None)
    if meta is None:
        return np.empty((0,) * a.ndim, dtype=dtype)
    return meta.astype(dtype)


def kl_div(ops: Operands, /) -> Any:
    """Return the loss as a lazy Dask array (0-d for the reductions), or NotImplemented."""
    if not _handles(ops):
        return NotImplemented
    dt, log_target = ops.dtype, ops.log_target
    xb, tb = _aligned(ops, ops.input, ops.target)
    if ops.reduction == "none":
        return da.map_blocks(
            _chunk_none,
            xb,
            tb,
            log_target=log_target,
            evaluate=_connected(),
            dtype=dt,
            meta=_meta(xb, dt),
        )
    partials = da.map_blocks(
        _chunk_sum,
        xb,
        tb,
        log_target=log_target,
        evaluate=_connected(),
        chunks=tuple((1,) * len(c) for c in xb.chunks),
        dtype=np.float64,
        meta=_meta(xb, np.float64),
    )
    return divide_total(da.sum(partials).astype(dt), ops.divisor, xp=ops.xp)


def kl_div_backward(g: Any, ops: Operands, /) -> Any:
    """Return lazy ``(grad_input, grad_target)``, each of its argument's shape and dtype."""
    if not _handles(ops):
        return NotImplemented
    dt, xp, x, t = ops.dtype, ops.xp, ops.input, ops.target
    g = divide_total(da.asarray(g).astype(dt), ops.divisor, xp=xp)
    xb, tb, gb = _aligned(ops, x.astype(dt), t.astype(dt), g)
    stacked = da.map_blocks(
        _chunk_gradients,
        gb,
        xb,
        tb,
        log_target=ops.log_target,
        evaluate=_connected(),
        new_axis=0,
        chunks=((2,), *xb.chunks),
        dtype=dt,
        meta=_meta(xb, dt),
    )
    grad_x = sum_to_shape(stacked[0], tuple(x.shape), xp=xp).astype(x.dtype)
    grad_t = sum_to_shape(stacked[1], tuple(t.shape), xp=xp).astype(t.dtype)
    return grad_x, grad_t
