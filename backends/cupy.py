r"""CuPy fast path: one fused ``ReductionKernel`` per reduction, ``ElementwiseKernel`` otherwise.

The C++ below is the whole kernel code; each expression is the reference's,
operation for operation, so NaN and inf land where PyTorch puts them::

    xlogy  = (t == 0) ? 0 : t * log(t)          // 0 log 0 = 0; log(t < 0) = NaN
    loss   = xlogy - t * x                       // or exp(t) * (t - x) with log_target
    grad_x = -(t * g)                            // or -(g * exp(t))
    grad_t = (0 < t < inf) ? g * (log(t) + 1 - x) : NaN
                                                 // or (g * (t - x)) * exp(t) + g * exp(t)

``sum``/``mean``/``batchmean`` read each input once in one
``cupy.ReductionKernel`` that evaluates the loss in the operands' dtype and
accumulates it in float64 (free on the bandwidth-bound kernel); the total is
rounded to the operands' dtype and then divided by the divisor, the rounding
rule of every path (:func:`kldiv_spec._core.divide_total`). CuPy gives each output of a
``ReductionKernel`` one thread block, so a reduction to one scalar would run
on one of the GPU's multiprocessors (measured on an H100: 8.5 GB/s). The
kernel therefore reduces contiguous operands as rows of a ``(rows, cols)``
view, at most :data:`MAX_PARTIALS` float64 partial sums in parallel, then sums
the partials and the ragged tail. ``none`` and the backward are single
``cupy.ElementwiseKernel`` launches writing each output once. Kernels are
compiled with ``--fmad=false`` so that ``a - t * x`` is rounded as the
reference rounds it (no fused multiply-add).

CuPy is imported on first use, so this module (and its kernel source) can be
imported and reviewed without a GPU. Only float32/float64 operands of one dtype
and one shape are taken; the reference handles everything else.
"""

from __future__ import annotations

import functools
from typing import Any

from kldiv_spec import _core
from kldiv_spec._validation import Operands

__all__ = [
    "GRADIENT",
    "LOSS",
    "MAX_PARTIALS",
    "MIN_COLUMNS",
    "PREAMBLE",
    "kl_div",
    "kl_div_backward",
    "split",
]

#: Device functions shared by every kernel (``T`` is float or double).
PREAMBLE = r"""
template <typename T> __device__ __forceinline__ T kl_nan() {
    return (T)__int_as_float(0x7fc00000);
}
template <typename T> __device__ __forceinline__ T kl_inf() {
    return (T)__int_as_float(0x7f800000);
}
template <typename T> __device__ __forceinline__ T kl_loss(T x, T t) {
    T xlogy = (t == (T)0) ? (T)0 : t * log(t);
    return xlogy - t * x;
}
template <typename T> __device__ __forceinline__ T kl_loss_log_target(T x, T t) {
    return exp(t) * (t - x);
}
"""

#: The pointwise loss, by ``log_target``.
LOSS = {False: "kl_loss<T>(x, t)", True: "kl_loss_log_target<T>(x, t)"}

#: The backward's body, by ``log_target``: ``g`` is the upstream gradient over the divisor.
GRADIENT = {
    False: (
        "gx = -(t * g);\n"
        "gt = (t > (T)0 && t < kl_inf<T>()) ? g * (log(t) + (T)1 - x) : kl_nan<T>();"
    ),
    True: "T p = exp(t);\nT gp = g * p;\ngx = -gp;\ngt = (g * (t - x)) * p + gp;",
}

_OPTIONS = ("--fmad=false",)

#: The most partial sums (thread blocks) of a reduction's first pass.
MAX_PARTIALS = 4096
#: The fewest elements one partial sum covers.
MIN_COLUMNS = 1024


def split(n: int, /) -> tuple[int, int]:
    """Return ``(rows, cols)``: the ``rows * cols <= n`` leading elements reduced as rows.

    ``rows`` is at most :data:`MAX_PARTIALS` and ``cols`` at least
    :data:`MIN_COLUMNS`; the ``n - rows * cols < cols`` elements left are the tail.
    """
    cols = max(MIN_COLUMNS, -(-n // MAX_PARTIALS))
    return n // cols, cols


def _sum(kernel: Any, x: Any, t: Any) -> Any:
    """Return the float64 sum of the pointwise loss, with every multiprocessor busy."""
    rows, cols = split(x.size)
    if rows == 0 or not (x.flags.c_contiguous and t.flags.c_contiguous):
        return kernel(x, t)
    xf, tf = x.reshape(-1), t.reshape(-1)
    head = rows * cols
    total = kernel(xf[:head].reshape(rows, cols), tf[:head].reshape(rows, cols), axis=1).sum()
    if head < x.size:
        total = total + kernel(xf[head:], tf[head:])
    return total


@functools.cache
def _sum_kernel(log_target: bool) -> Any:
    import cupy

    return cupy.ReductionKernel(
        "T x, T t",
        "float64 total",
        f"(double){LOSS[log_target]}",
        "a + b",
        "total = a",
        "0.0",
        name=f"kldiv_spec_sum_{int(log_target)}",
        reduce_type="double",
        preamble=PREAMBLE,
        options=_OPTIONS,
    )


@functools.cache
def _none_kernel(log_target: bool) -> Any:
    import cupy

    return cupy.ElementwiseKernel(
        "T x, T t",
        "T loss",
        f"loss = {LOSS[log_target]};",
        name=f"kldiv_spec_none_{int(log_target)}",
        preamble=PREAMBLE,
        options=_OPTIONS,
    )


@functools.cache
def _backward_kernel(log_target: bool) -> Any:
    import cupy

    return cupy.ElementwiseKernel(
        "T x, T t, T g",
        "T gx, T gt",
        GRADIENT[log_target],
        name=f"kldiv_spec_backward_{int(log_target)}",
        preamble=PREAMBLE,
        options=_OPTIONS,
    )


def _accepts(ops: Operands) -> bool:
    import cupy

    dtypes = (cupy.dtype(cupy.float32), cupy.dtype(cupy.float64))
    return (
        isinstance(ops.input, cupy.ndarray)
        and isinstance(ops.target, cupy.ndarray)
        and ops.input.dtype in dtypes
        and ops.same_shape_and_dtype
    )


def kl_div(ops: Operands, /) -> Any:
    """Evaluate the loss with one fused kernel, or return ``NotImplemented``."""
    if not _accepts(ops):
        return NotImplemented
    x, t = ops.input, ops.target
    if ops.reduction == "none":
        return _none_kernel(ops.log_target)(x, t)
    total = _sum(_sum_kernel(ops.log_target), x, t).astype(x.dtype)
    return _core.divide_total(total, ops.divisor, xp=ops.xp)


def kl_div_backward(g: Any, ops: Operands, /) -> tuple[Any, Any] | Any:
    """Both gradients with one elementwise kernel, or ``NotImplemented``."""
    import cupy

    if not _accepts(ops) or not isinstance(g, cupy.ndarray):
        return NotImplemented
    x = ops.input
    g = _core.divide_total(g.astype(x.dtype, copy=False), ops.divisor, xp=ops.xp)
    return _backward_kernel(ops.log_target)(x, ops.target, g)
