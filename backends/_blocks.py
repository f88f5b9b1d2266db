r"""Blocked, multithreaded evaluation of the KL-divergence loss on NumPy arrays.

The loss is evaluated over *blocks* small enough to stay in the core's cache
(:data:`BLOCK_ELEMENTS` elements). Each worker thread owns scratch buffers of
one block, and every operation writes into them with ``out=``, so the reduced
losses allocate nothing of the arrays' size and ``'none'`` allocates exactly
its output. NumPy's ufuncs release the GIL, so the threads run in parallel.

Each block repeats the reference's operations in the reference's order and
dtype (:mod:`kldiv_spec._core`), so every element equals the reference's bit
for bit, NaN and inf included:

.. math::

    \ell = \bigl[t = 0\;?\;0 : t \log t\bigr] - t x
    \qquad\text{or, with log\_target,}\qquad
    \ell = e^{t} (t - x).

Sums are accumulated per block with NumPy's pairwise summation in the block's
dtype, and the per-block partial sums in float64 (in block order, so the result
does not depend on the number of threads). For ``n`` terms split into blocks of
``b`` elements, the rounding error of the sum is at most about
:math:`(\lceil\log_2 b\rceil + 1)\,\varepsilon \sum |\ell|` with
:math:`\varepsilon` the unit roundoff of the dtype, which is no larger than the
:math:`\lceil\log_2 n\rceil\,\varepsilon \sum |\ell|` of NumPy's pairwise sum of
the whole array (and much smaller than the :math:`n\varepsilon` of naive summation).

Contiguous float32 sums without ``log_target`` take one compiled pass per block
instead (``backends/_fused.c``, when built and the CPU has AVX2 and FMA): the terms are
formed in float32 as above but with its own ``log`` (within 0.8265 ulp of the
exact value over every positive finite float32, measured by
``benchmarks/log_sweep.py``; NumPy's float32 ``log`` is within 3.83 there), and
accumulated in float64.

Half precision (:func:`half_sum`, :func:`half_none`: float16 arrays, and the bits of
bfloat16 tensors for the PyTorch fast path) takes the compiled half-precision kernel of
``backends/_fused.c`` (AVX2, FMA and F16C), for contiguous sums with or without
``log_target`` and for ``'none'`` without it. Its terms are the reference's in the dtype,
each operation rounded to it where the reference rounds,

.. math::

    \ell = R\bigl(R(t\,R(\log t)) - R(t x)\bigr)\ (+0 \text{ where } t = 0)
    \qquad\text{or}\qquad \ell = R\bigl(R(e^{t})\,R(t - x)\bigr),

bit for bit wherever the kernel's float32 ``log`` and ``exp`` rounded to the dtype are the
library's: for every one of the 65536 targets of each dtype against PyTorch 2.13 (both
dtypes) and NumPy (float16 ``log``) on the AMD EPYC (Zen 4) of the tests; NumPy's own
float16 ``exp`` there is not float32's rounded at 4 targets, so ``'none'`` with
``log_target`` keeps the ufuncs (``tests/test_half_precision_kl_div.py``). The terms are
added in float64 (each is a half: exact), block sums in block order, and the total
rounded once to the dtype (:func:`round_half`), so the result is within
:math:`\tfrac12` ulp of the exact sum of the reference's terms plus the float64 sum's
:math:`n 2^{-53} \sum |\ell|`. Measured by ``benchmarks/half_bench.py`` over 1024 sums
of 64000 terms (pairs of rows of 2048 x 32000 ``log_softmax`` inputs and ``softmax``
targets, independent or a student close to its teacher), against the exact sum of the
reference's terms (float64 ``math.fsum``), in ulps of the dtype: every sum correctly
rounded (at most 0.5 ulp), in bfloat16 and float16; PyTorch 2.13's ``F.kl_div`` (and the
reference's own ``torch.sum`` in the dtype, which gives the same values) up to 1.19 ulp,
and not correctly rounded in 23-27% of the sums.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from kldiv_spec import _settings

from . import _compiled

# The compiled kernel where it was built, else None (see :mod:`._compiled`).
_fused: Any = _compiled.fused

__all__: list[str] = []

#: Elements per block: 64 Ki elements (256 KiB in float32), L2-sized per core.
BLOCK_ELEMENTS = 1 << 16

#: Below this many elements a call is left to the reference (no threading overhead).
MIN_ELEMENTS = _settings.NUMPY_MIN_ELEMENTS

_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

#: Guards :data:`_pool`; re-created in a forked child (:func:`_after_fork_in_child`).
_pool_lock = threading.Lock()
#: The process's worker pool and its number of workers (dropped in a forked child).
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _after_fork_in_child() -> None:
    """Give a forked child a fresh lock and no pool.

    ``fork`` copies only the forking thread: the parent's workers do not exist in
    the child, and a lock that another thread held at the moment of the fork stays
    held forever. Both are therefore replaced, not reused, whenever the fork
    happened (``os.fork``, ``multiprocessing``'s ``'fork'`` start method, ...).
    """
    global _pool_lock, _pool, _pool_size
    _pool_lock = threading.Lock()
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):  # every platform that has fork
    os.register_at_fork(after_in_child=_after_fork_in_child)

Block = tuple[Any, ...]


def supported_dtype(dtype: Any, /) -> bool:
    """Return whether the blocked kernels handle ``dtype`` (float16, float32, float64)."""
    return np.dtype(dtype) in _DTYPES


def min_elements() -> int:
    """Return the size below which NumPy calls go to the reference (``numpy_min_elements``).

    :data:`MIN_ELEMENTS` unless ``$KLDIV_SPEC_NUMPY_MIN_ELEMENTS`` says otherwise
    (:mod:`kldiv_spec._settings`).
    """
    return _settings.current.numpy_min_elements


def num_threads() -> int:
    """Return the number of worker threads: ``$KLDIV_SPEC_NUM_THREADS`` or the usable cores.

    The default is the number of cores this process may run on, at most 8
    (:mod:`kldiv_spec._settings`).
    """
    return _settings.current.threads()


def _executor(n: int, /) -> ThreadPoolExecutor:
    """Return the process's shared pool, with room for ``n`` workers.

    One pool serves every call and every calling thread; a call that uses fewer
    workers than the pool has leaves the others idle. The pool is replaced only
    after a ``fork`` (the child cannot use its parent's threads, so
    :func:`_after_fork_in_child` drops the pool and re-creates the lock, which
    another thread may have held at the fork) or to grow it for a larger ``n``
    (``$KLDIV_SPEC_NUM_THREADS`` raised at run time). A replaced pool is never
    shut down: calls that already hold it finish on it, and its idle threads
    exit once it is garbage-collected.
    """
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < n:
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="kldiv_spec")
            _pool_size = n
        return _pool


def blocks(shape: tuple[int, ...], /, block_elements: int | None = None) -> list[Block]:
    """Split an array of ``shape`` into index tuples of about ``block_elements`` elements.

    Blocking is along the first axis ``k`` whose trailing axes hold at most
    ``block_elements`` elements: each block is one index of the axes before
    ``k``, a slice of axis ``k`` and all of the axes after it. Every block is
    therefore a (possibly strided) view with a shape of its own, and the blocks
    tile the array in C order. ``block_elements`` defaults to :data:`BLOCK_ELEMENTS`.
    """
    if block_elements is None:
        block_elements = BLOCK_ELEMENTS
    k = len(shape) - 1
    inner = 1
    while k > 0 and inner * shape[k] <= block_elements:
        inner *= shape[k]
        k -= 1
    # now shape[k+1:] holds `inner` <= block_elements elements (or k == 0)
    step = max(1, block_elements // max(inner, 1))
    out: list[Block] = []
    for outer in np.ndindex(*shape[:k]):
        for start in range(0, shape[k], step):
            out.append((*outer, slice(start, min(start + step, shape[k]))))
    return out


def _run(
    work: Callable[[Sequence[Block]], list[Any]], all_blocks: list[Block], threads: int, /
) -> list[Any]:
    """Run ``work`` over contiguous stripes of ``all_blocks``; return results in block order."""
    stripes_wanted = max(1, min(threads, len(all_blocks)))
    if stripes_wanted == 1:
        return work(all_blocks)
    bounds = [len(all_blocks) * i // stripes_wanted for i in range(stripes_wanted + 1)]
    stripes = [all_blocks[bounds[i] : bounds[i + 1]] for i in range(stripes_wanted)]
    pool = _executor(threads)
    futures = []
    for stripe in stripes[1:]:
        try:
            futures.append(pool.submit(work, stripe))
        except RuntimeError:
            # The interpreter is shutting down (a call from an atexit handler, or from a
            # thread still running then): no new work may be scheduled, so this thread
            # does the rest itself.
            futures.append(_Done(work(stripe)))
    results = work(stripes[0])  # the calling thread takes the first stripe
    for future in futures:
        results.extend(future.result())
    return results


class _Done:
    """A finished result with the one method of a future that :func:`_run` uses."""

    def __init__(self, value: list[Any]) -> None:
        self._value = value

    def result(self) -> list[Any]:
        return self._value


class _Scratch:
    """One worker's buffers: two of the compute dtype and one boolean, one block each."""

    def __init__(self, size: int, dtype: np.dtype[Any]) -> None:
        self.a = np.empty(size, dtype)
        self.b = np.empty(size, dtype)
        self.mask = np.empty(size, np.bool_)

    def views(self, shape: tuple[int, ...]) -> tuple[Any, Any, Any]:
        n = math.prod(shape)
        return (
            self.a[:n].reshape(shape),
            self.b[:n].reshape(shape),
            self.mask[:n].reshape(shape),
        )


def _loss_into(
    x: Any, t: Any, out: Any, b: Any, mask: Any, log_target: bool, cast: dict[str, Any]
) -> None:
    """Write the pointwise loss of one block into ``out`` (``b``, ``mask``: scratch).

    ``cast`` is ``{}``, or ``{"dtype": dt}`` when an operand must be cast to the
    common dtype ``dt`` first (mixed dtypes).
    """
    if log_target:
        # exp(t) * (t - x)
        np.exp(t, out=out, **cast)
        np.subtract(t, x, out=b, **cast)
        np.multiply(out, b, out=out)
        return
    # where(t == 0, 0, t * log(t)) - t * x
    np.log(t, out=out, **cast)
    np.multiply(t, out, out=out, **cast)
    np.equal(t, 0, out=mask)
    np.copyto(out, 0, where=mask)
    np.multiply(t, x, out=b, **cast)
    np.subtract(out, b, out=out)


def _flat_or_strided(arrays: Sequence[Any], shape: tuple[int, ...], /) -> tuple[list[Any], Any]:
    """Broadcast ``arrays`` to ``shape``; flatten them when all are C-contiguous."""
    views = [np.broadcast_to(a, shape) for a in arrays]
    if all(v.flags.c_contiguous for v in views):
        n = math.prod(shape)
        return [v.reshape(n) for v in views], (n,)
    return views, shape


def _cast(dt: np.dtype[Any], /, *arrays: Any) -> dict[str, Any]:
    """Return the ufunc keywords that compute in ``dt``: none when all arrays have it."""
    return {} if all(a.dtype == dt for a in arrays) else {"dtype": dt}


def _takes_half(
    dt: np.dtype[Any], cast: dict[str, Any], shape: tuple[int, ...], *arrays: Any
) -> bool:
    """Return whether the compiled half-precision kernel takes these flat float16 operands."""
    return (
        dt == np.float16
        and not cast
        and len(shape) == 1
        and all(a.flags.c_contiguous for a in arrays)  # not a broadcast or strided view
        and half_available()
    )


def loss_none(x: Any, t: Any, /, *, shape: tuple[int, ...], dtype: Any, log_target: bool) -> Any:
    """Return the pointwise loss of shape ``shape`` and dtype ``dtype`` in one fresh array.

    Contiguous float16 operands without ``log_target`` take the compiled half-precision
    kernel (:func:`half_none`, where :func:`half_available`): the same values.
    """
    dt = np.dtype(dtype)
    result = np.empty(shape, dt)
    cast = _cast(dt, x, t)
    (xv, tv), work_shape = _flat_or_strided((x, t), shape)
    out = result.reshape(work_shape)
    if _takes_half(dt, cast, work_shape, xv, tv) and not log_target:
        # log_target stays with the ufuncs: NumPy's own float16 exp is not always float32's
        # exp rounded (it differs from it at 4 of the 65536 float16 values on AVX-512 CPUs).
        half_none(xv, tv, out, format="float16", log_target=False)
        return result
    size = BLOCK_ELEMENTS
    all_blocks = blocks(work_shape, size)

    def work(stripe: Sequence[Block]) -> list[Any]:
        scratch = _Scratch(size, dt)
        with np.errstate(all="ignore"):
            for index in stripe:
                o = out[index]
                _, b, mask = scratch.views(o.shape)
                _loss_into(xv[index], tv[index], o, b, mask, log_target, cast)
        return []

    _run(work, all_blocks, num_threads())
    return result


#: Whether the compiled fused float32 sum was built and this CPU runs it (AVX2 and FMA).
_FUSED_RUNS: bool = _fused is not None and bool(_fused.available())


def _fused_sum() -> Callable[[Any, Any], Any] | None:
    """Return the compiled fused float32 sum, or None (not built, no AVX2/FMA, turned off).

    Cheap enough for every small call (the NumPy front asks on each one): the CPU's
    answer and the setting (``$KLDIV_SPEC_NUMPY_FUSED``) are read once.
    """
    if not _FUSED_RUNS or not _settings.current.numpy_fused:
        return None
    return _fused.loss_sum_f32


def fused_available() -> bool:
    """Return whether the compiled fused float32 sum runs here (built, AVX2, not turned off)."""
    return _fused_sum() is not None


def _half_kernel() -> Callable[..., Any] | None:
    """Return the compiled half-precision sum, or None (not built, no AVX2/F16C, turned off)."""
    if not _FUSED_RUNS or not _settings.current.numpy_fused:
        return None
    return getattr(_fused, "loss_sum_half", None)  # None: a build older than its source


def half_available() -> bool:
    """Return whether the compiled half-precision sum runs here (built, AVX2, not turned off)."""
    return _half_kernel() is not None


def half_sum(x: Any, t: Any, /, *, format: str, log_target: bool) -> float:
    r"""Return the float64 sum of the half-precision pointwise loss of flat ``x`` and ``t``.

    ``x`` and ``t`` are 1-D C-contiguous NumPy arrays of one length holding ``format``
    values: ``float16`` arrays for ``format="float16"``, the bits of bfloat16 values as
    ``int16`` or ``uint16`` for ``format="bfloat16"`` (a torch bfloat16 tensor's
    ``view(torch.int16).numpy()``). The caller checks :func:`half_available` first.

    Each block of :data:`BLOCK_ELEMENTS` is one call of the compiled kernel, which forms
    every term with the reference's operations, each rounded to ``format`` where the
    reference rounds it (:func:`kldiv_spec._core.pointwise_loss` in that dtype),

    .. math::

        \ell = R\bigl(R(t\,R(\log t)) - R(t x)\bigr)\ (+0 \text{ where } t = 0)
        \quad\text{or}\quad \ell = R\bigl(R(e^t)\,R(t - x)\bigr),

    and adds the terms (halves: exact in float64) in float64; the block sums are added in
    float64 in block order, so the result does not depend on the number of threads.
    """
    kernel = _half_kernel()
    if kernel is None:  # pragma: no cover - the callers check half_available() first
        raise RuntimeError("the compiled half-precision sum does not run here")
    n = x.shape[0]
    size = BLOCK_ELEMENTS
    bounds = [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def work(stripe: Sequence[Block]) -> list[Any]:
        return [kernel(x[index], t[index], format, log_target) for index in stripe]

    partials = np.asarray(_run(work, bounds, num_threads()), dtype=np.float64)
    with np.errstate(all="ignore"):
        return float(np.add.reduce(partials) + 0.0)  # + 0.0: a sum of zeros is +0.0


def half_none(x: Any, t: Any, out: Any, /, *, format: str, log_target: bool) -> None:
    """Write the half-precision pointwise loss of flat ``x`` and ``t`` into ``out``.

    The arrays are as :func:`half_sum`'s (``out`` writable, of their length and kind);
    every element is the term :func:`half_sum` adds, the reference's value rounded as
    the reference rounds it. Blockwise, on the worker threads.
    """
    kernel = _fused.loss_half if half_available() else None
    if kernel is None:  # pragma: no cover - the callers check half_available() first
        raise RuntimeError("the compiled half-precision kernel does not run here")
    n = x.shape[0]
    size = BLOCK_ELEMENTS
    bounds = [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def work(stripe: Sequence[Block]) -> list[Any]:
        for index in stripe:
            kernel(x[index], t[index], out[index], format, log_target)
        return []

    _run(work, bounds, num_threads())


def round_half(total: float, format: str, /) -> float:
    """Return ``total`` rounded once to ``format`` (``"bfloat16"``, ``"float16"``), as a float.

    Round to nearest, ties to even, directly from the float64 value (no double rounding
    through float32); overflow gives an infinity of the total's sign, NaN stays NaN.
    float16: NumPy's float64 -> float16 conversion, which rounds once. bfloat16: the
    total rounded to float32 *to odd* (the neighbour with an odd last bit where the
    conversion is inexact), whose 16 extra bits make the rounding to nearest even of its
    upper half the correct rounding of the float64 value.
    """
    if format == "float16":
        with np.errstate(over="ignore"):
            return float(np.float16(total))
    if math.isnan(total):
        return math.nan
    with np.errstate(over="ignore"):
        single = np.float32(total)  # to nearest: may be +-inf
    bits = int(single.view(np.uint32))
    if float(single) != total and bits & 1 == 0:  # inexact and even: take the odd neighbour
        towards = np.float32(math.copysign(math.inf, total - float(single)))
        bits = int(np.nextafter(single, towards).view(np.uint32))
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16  # to nearest even, 16 bits off
    return float(np.uint32(bits).view(np.float32))


def loss_sum(x: Any, t: Any, /, *, shape: tuple[int, ...], dtype: Any, log_target: bool) -> float:
    """Return the sum of the pointwise loss as a Python float (accumulated in float64).

    NaN and inf propagate as in a plain sum (``inf + -inf`` is NaN). Contiguous
    float32 operands without ``log_target`` are summed by the compiled fused pass
    where it is available (:func:`fused_available`), contiguous float16 ones (with or
    without ``log_target``) by the compiled half-precision kernel (:func:`half_sum`,
    where :func:`half_available`), the rest by the ufunc kernels.
    """
    dt = np.dtype(dtype)
    cast = _cast(dt, x, t)
    (xv, tv), work_shape = _flat_or_strided((x, t), shape)
    if _takes_half(dt, cast, work_shape, xv, tv):
        return half_sum(xv, tv, format="float16", log_target=log_target)
    size = BLOCK_ELEMENTS
    fused_sum = (
        _fused_sum()
        if dt == np.float32
        and not cast
        and not log_target
        and len(work_shape) == 1
        and xv.flags.c_contiguous  # not a broadcast or strided view
        and tv.flags.c_contiguous
        else None
    )
    # float16 blocks are summed in float32 (as NumPy's own float16 sum does).
    acc = np.float32 if dt == np.float16 else dt

    def work(stripe: Sequence[Block]) -> list[Any]:
        if fused_sum is not None:
            return [fused_sum(xv[index], tv[index]) for index in stripe]
        scratch = _Scratch(size, dt)
        partials = []
        with np.errstate(all="ignore"):
            for index in stripe:
                xb = xv[index]
                a, b, mask = scratch.views(xb.shape)
                _loss_into(xb, tv[index], a, b, mask, log_target, cast)
                partials.append(np.add.reduce(a, axis=None, dtype=acc))
        return partials

    partials = np.asarray(_run(work, blocks(work_shape, size), num_threads()), dtype=np.float64)
    with np.errstate(all="ignore"):
        # + 0.0: a sum of zeros is +0.0, as the reference's (whose terms are never -0.0)
        return float(np.add.reduce(partials) + 0.0)


def gradients(
    g: Any, x: Any, t: Any, /, *, shape: tuple[int, ...], dtype: Any, log_target: bool
) -> tuple[Any, Any]:
    r"""Return :math:`(g\,\partial\ell/\partial x,\ g\,\partial\ell/\partial t)` in one pass.

    ``x`` and ``t`` have ``shape``; ``g`` broadcasts to it (a 0-d array for the
    reductions, already divided by the reduction's divisor). Both results are
    fresh C-contiguous arrays of ``shape`` and ``dtype``; the operations are the
    reference's (:func:`kldiv_spec._core.pointwise_gradients`), in its order.
    """
    dt = np.dtype(dtype)
    grad_x = np.empty(shape, dt)
    grad_t = np.empty(shape, dt)
    cast = _cast(dt, x, t, g)
    (xv, tv, gv), work_shape = _flat_or_strided((x, t, g), shape)
    gx_all = grad_x.reshape(work_shape)
    gt_all = grad_t.reshape(work_shape)
    size = BLOCK_ELEMENTS
    all_blocks = blocks(work_shape, size)

    def work(stripe: Sequence[Block]) -> list[Any]:
        mask_buffer = np.empty(size, np.bool_)
        with np.errstate(all="ignore"):
            for index in stripe:
                gx, gt = gx_all[index], gt_all[index]
                xb, tb, gb = xv[index], tv[index], gv[index]
                if log_target:
                    # p = exp(t); gp = g * p; (-gp, (g * (t - x)) * p + gp)
                    np.exp(tb, out=gx, **cast)
                    np.subtract(tb, xb, out=gt, **cast)
                    np.multiply(gb, gt, out=gt, **cast)
                    np.multiply(gt, gx, out=gt)
                    np.multiply(gb, gx, out=gx, **cast)
                    np.add(gt, gx, out=gt)
                    np.negative(gx, out=gx)
                    continue
                # -(t * g); where(0 < t < inf, g * (log(t) + 1 - x), nan)
                np.multiply(tb, gb, out=gx, **cast)
                np.negative(gx, out=gx)
                mask = mask_buffer[: gt.size].reshape(gt.shape)
                np.log(tb, out=gt, **cast)
                # log(t) is finite exactly where 0 < t < inf
                np.isfinite(gt, out=mask)
                np.logical_not(mask, out=mask)
                np.add(gt, 1, out=gt)
                np.subtract(gt, xb, out=gt, **cast)
                np.multiply(gb, gt, out=gt, **cast)
                np.copyto(gt, math.nan, where=mask)
        return []

    _run(work, all_blocks, num_threads())
    return grad_x, grad_t
