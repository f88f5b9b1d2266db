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
(AVX2 and FMA; ``benchmarks/log_sweep.py``).

Smaller arrays, 0-d and empty arrays, ndarray subclasses, dtypes other than
float16/32/64, and broadcast operands in ``kl_div_backward`` are left to the
reference (``NotImplemented``). The number of threads is
``$KLDIV_SPEC_NUM_THREADS`` or the number of usable cores (at most 8); the size
threshold is ``$KLDIV_SPEC_NUMPY_MIN_ELEMENTS`` (``0`` sends every non-empty,
non-0-d call through the blocked kernels, e.g. to run the conformance suite on
them). NumPy's BLAS is not used, so its threads do not compete with these.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kldiv_spec._core import divide_total
from kldiv_spec._validation import Operands

from . import _blocks

__all__ = ["kl_div", "kl_div_backward"]


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
