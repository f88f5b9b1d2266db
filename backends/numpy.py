"""The NumPy fast path: blocked, multithreaded, without full-size temporaries.

``kl_div`` and ``kl_div_backward`` on NumPy arrays of at least
:data:`~kldiv_spec.backends._blocks.MIN_ELEMENTS` elements are evaluated by
:mod:`kldiv_spec.backends._blocks`: cache-sized blocks, one scratch buffer set
per worker thread, every ufunc writing with ``out=``. The values are the
reference's, element for element (the same operations in the same order and
dtype); sums are accumulated blockwise in float64 (see the error bound in
:mod:`kldiv_spec.backends._blocks`). Contiguous float32 sums without
``log_target`` go through one compiled AVX2 pass per block where it was built
(``backends/_fused.c``; ``$KLDIV_SPEC_NUMPY_FUSED=0`` turns it off), whose own
``log`` is within 0.8265 ulp of the exact value over every positive finite float32
(AVX2 and FMA; ``benchmarks/log_sweep.py``). Contiguous float16 sums (with or without
``log_target``) and float16 ``'none'`` without ``log_target`` go through its
half-precision kernel: the reference's terms, each operation rounded to float16 as the
reference rounds it, summed in float64 (:func:`kldiv_spec.backends._blocks.half_sum`;
at 2048 x 32000 a sum about 60x and ``'none'`` about 40x faster than with NumPy's float16
ufuncs, ``benchmarks/half_bench.py``).

Smaller calls on plain ndarrays of one shape and dtype are evaluated by :func:`front`,
before any validation, with the reference's operations (the per-call cost of a small
NumPy call is mostly Python). Other small arrays, 0-d and empty arrays, ndarray
subclasses, dtypes other than float16/32/64, and broadcast operands in
``kl_div_backward`` are left to the reference (``NotImplemented``). The settings
(:mod:`kldiv_spec._settings`, read when kldiv_spec is imported): the number of threads
is ``$KLDIV_SPEC_NUM_THREADS`` or the number of usable cores (at most 8); the size
threshold is ``$KLDIV_SPEC_NUMPY_MIN_ELEMENTS`` (``0`` sends every non-empty, non-0-d
call through the blocked kernels, e.g. to run the conformance suite on them). NumPy's
BLAS is not used, so its threads do not compete with these.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kldiv_spec import _settings
from kldiv_spec._core import divide_total
from kldiv_spec._validation import REDUCTIONS as _REDUCTIONS
from kldiv_spec._validation import Operands

from . import _blocks

__all__ = ["FRONTS", "front", "kl_div", "kl_div_backward"]


def _handles(ops: Operands, /, *arrays: Any) -> bool:
    """Return whether the blocked kernels take this call."""
    if not all(type(a) is np.ndarray for a in arrays):
        return False
    if not all(_blocks.supported_dtype(a.dtype) for a in arrays):
        return False
    shape = ops.output_shape
    return len(shape) > 0 and math.prod(shape) >= max(_blocks.min_elements(), 1)


def kl_div(ops: Operands, /) -> Any:
    """Return the loss for NumPy operands, or NotImplemented to defer to the reference.

    The result is a fresh ndarray: of the output shape for ``'none'``, 0-d of the
    common dtype for the reductions (the float64 total rounded to that dtype, then
    divided by the divisor: :func:`kldiv_spec._core.divide_total`).
    """
    x, t = ops.input, ops.target
    if not _handles(ops, x, t):
        return NotImplemented
    dt = np.dtype(ops.dtype)
    shape = ops.output_shape
    if ops.reduction == "none":
        return _blocks.loss_none(x, t, shape=shape, dtype=dt, log_target=ops.log_target)
    total = _blocks.loss_sum(x, t, shape=shape, dtype=dt, log_target=ops.log_target)
    with np.errstate(all="ignore"):
        return np.asarray(divide_total(np.asarray(total, dtype=dt), ops.divisor, xp=np))


def kl_div_backward(g: Any, ops: Operands, /) -> Any:
    """Return ``(grad_input, grad_target)`` in one pass, or NotImplemented.

    Handled when ``input`` and ``target`` share the output's shape and dtype (no
    gradient has to be summed back over broadcast axes) and, for ``'none'``,
    ``g`` has that dtype too.
    """
    x, t = ops.input, ops.target
    if not _handles(ops, x, t, g) or not ops.same_shape_and_dtype:
        return NotImplemented
    dt = np.dtype(ops.dtype)
    if ops.reduction == "none":
        if g.dtype != dt:
            return NotImplemented
    else:
        with np.errstate(all="ignore"):
            g = divide_total(np.asarray(g, dtype=dt), ops.divisor, xp=np)
    return _blocks.gradients(g, x, t, shape=ops.output_shape, dtype=dt, log_target=ops.log_target)


# --- the front: the common small call without the validation and dispatch --------------

_NUMPY_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def front(x: Any, t: Any, reduction: object, log_target: object, /) -> Any:
    r"""Evaluate a small NumPy call without the dispatch, as the fast path or the reference would.

    Taken only for plain ``ndarray`` operands of one shape (not 0-d) and one dtype
    (float32 or float64) below the NumPy fast path's size threshold, a valid ``reduction`` and a
    bool ``log_target``: exactly the calls on which :func:`kldiv_spec._validation.operands`
    passes with nothing to promote or broadcast.

    A float32 reduction without ``log_target`` is the NumPy fast path's fused pass
    (:func:`kldiv_spec.backends._blocks.fused_available`: one compiled call, terms
    accumulated in float64), the same kernel and the same answer as on a large array:

    .. math::

        \operatorname{fl}_{32}\Bigl(\operatorname{fl}_{32}\bigl(\textstyle\sum_{64} \ell\bigr)
        / D\Bigr), \qquad \ell = [t = 0\ ?\ 0 : t \log t] - t x.

    Everything else is :mod:`kldiv_spec._core`'s operations, in its order and dtype,
    so the result is the reference's bit for bit:

    .. math::

        \ell = [t = 0\ ?\ 0 : t \log t] - t x \quad\text{or}\quad e^{t}(t - x),
        \qquad \operatorname{fl}\Bigl(\operatorname{fl}\bigl(\textstyle\sum \ell\bigr) / D\Bigr).

    Anything else returns ``NotImplemented`` and takes the full route.
    """
    if type(t) is not np.ndarray or type(log_target) is not bool:
        return NotImplemented
    dt = x.dtype
    if dt not in _NUMPY_DTYPES or t.dtype != dt or type(reduction) is not str:
        return NotImplemented
    if reduction not in _REDUCTIONS or x.shape != t.shape or x.ndim == 0:
        return NotImplemented
    n = x.size
    if n >= max(_settings.current.numpy_min_elements, 1):
        return NotImplemented  # the blocked fast path takes it
    d = n if reduction == "mean" else x.shape[0] if reduction == "batchmean" else 1
    if reduction != "none" and not log_target and dt == _FLOAT32:
        fused = _blocks._fused_sum()
        if fused is not None and x.flags.c_contiguous and t.flags.c_contiguous:
            wide = fused(x, t) + 0.0  # + 0.0: a sum of zeros is +0.0
            if -_FLOAT32_MAX <= wide <= _FLOAT32_MAX:
                total = np.float32(wide)
            else:  # rounds to +-inf or the largest float32; NaN stays NaN
                with np.errstate(over="ignore"):
                    total = np.float32(wide)
            if d == 0:  # an empty mean: NaN, as _core.divide_total builds it
                return np.full((), np.nan, dtype=dt)
            return np.asarray(total if d == 1 else total / np.float32(d))
    with np.errstate(all="ignore"):
        if log_target:
            loss = np.exp(t)
            loss *= t - x
        else:
            loss = np.log(t)
            np.multiply(t, loss, out=loss)
            np.copyto(loss, 0.0, where=t == 0)  # xlogy's 0 log 0 = 0 (+0.0, as the core's)
            loss -= np.multiply(t, x)
        if reduction == "none":
            return loss
        total = np.add.reduce(loss, axis=None)
        if d == 0:  # an empty mean: NaN, as _core.divide_total builds it
            return np.full((), np.nan, dtype=dt)
        return np.asarray(total if d == 1 else total / d)


_FLOAT32 = np.dtype(np.float32)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


#: The front of plain ndarrays (:mod:`kldiv_spec.backends._protocol`).
FRONTS = {np.ndarray: front}
