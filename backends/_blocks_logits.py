r"""Blocked, multithreaded KL divergence from logits on NumPy: forward and gradient in one pass.

The logits are walked in blocks of whole rows (:func:`rows_per_block` rows,
about :data:`BLOCK_ELEMENTS` elements), on the worker threads of
:mod:`kldiv_spec.backends._blocks`. With NumPy's ufuncs (where the compiled kernels
below are not available, and float64 evaluations at temperatures above
:data:`KERNEL64_TEMPERATURE`), each worker owns five scratch buffers of
one block, and every operation writes into them with ``out=``: nothing of the
logits' size is allocated except the outputs asked for (the gradient, or the
``'none'`` terms), so the extra memory is :math:`O(\text{rows per block}
\times \text{classes})` per thread. Per block of rows, with :math:`\bar s =
s / T` and :math:`\bar t = t / T`:

.. math::

    \log q = (\bar s - m_s) - \log \textstyle\sum e^{\bar s - m_s}, \quad
    q = e^{\bar s - m_s} / \textstyle\sum e^{\bar s - m_s}

(the same for :math:`p`), then the terms :math:`w \odot (\log w - \log o)`
(:math:`w = p, o = q` forward, swapped in reverse), their row sums (NumPy's
pairwise sum in the dtype, rows added in float64), and, when asked, the
student gradient :math:`c\,G\,(q - p)` (forward) or
:math:`c\,G\,q \odot (r - \mathrm{KL})` (reverse), written straight into the
output. Two ``exp`` per element instead of the reference's four; the values
agree with the reference's within the bound of ``docs/logits.md``.

Where a zero weight meets an infinite log-ratio (a class excluded by the
weighting distribution, ``0 * inf``), this plain evaluation gives a NaN term;
in the rows whose sum is NaN those terms are set to the specification's 0 (and
so is the reverse gradient where :math:`q = 0`) and the rows summed again, so
top-k teachers and masked vocabularies stay here. The rows still NaN (NaN or
``+inf`` logits, a side of ``-inf`` only) and, for the reverse gradient, rows
whose divergence is ``+inf`` (whose gradient depends on which tiny
probabilities are exactly 0) are evaluated again by the reference core
(:mod:`kldiv_spec._core_logits`), so edge values are the specification's.

Float32 logits take one compiled kernel per block instead, where it is built
and the CPU has AVX2 and FMA (``backends/_fused_logits.c``; ``$KLDIV_SPEC_NUMPY_FUSED=0``
turns it off, with the fused sum of :mod:`kldiv_spec.backends._blocks`): per row
one pass for the maxima, one for :math:`Z_s = \sum e^{x_s}`, :math:`Z_t` and
:math:`S = \sum e^{x_w} (x_w - x_o)` (:math:`x = \bar z - m`; products in float32,
sums in float64), giving

.. math::

    \mathrm{KL} = S / Z_w + \log Z_o - \log Z_w

without any logarithm of the logits' size, and, when asked, a third pass for the
gradient or the terms (from the exponentials of the second pass, kept in the
output and, for the forward gradient, one scratch row: :math:`O(\text{classes})`
per thread). Its ``exp`` is within 0.7706 ulp of the exact value over every
float32 (``benchmarks/exp_sweep.py``), and a row's divergence within about
:math:`5u \sum_i w_i |x_{w,i} - x_{o,i}| + 3u` (:math:`u = 2^{-24}`) of the exact
divergence of its float32 shifted logits. A row holding any ``-inf``, ``+inf`` or
NaN logit, or whose quotient :math:`z / T` or shift :math:`\bar z - m` overflows,
has sums that are not finite, and the kernel returns NaN for it: the rows above,
and those where an excluded class meets a positive weight, whose ``+inf`` the
reference gives.

Half-precision logits (float16, and bfloat16 as the int16 view of a tensor's bits,
``bfloat16=True``) take the same kernel only (``rows_half``; NumPy's ufuncs would
compute in the half dtype, where the reference computes in float32): its passes
read the half values in their own width, widening them exactly in registers,
compute in float32 and round the gradient or terms once (to nearest, ties to even)
to the dtype. So the values are the float32 kernel's on the widened logits,
rounded once, and nothing larger than a few rows of float32 scratch exists.
Rows the kernel leaves to the reference are evaluated in float32 and rounded the
same way (:func:`narrow`).

Float64 logits take the float64 kernel (``backends/_fused_logits64.c``, ``rows_f64``):
the same passes and contract in float64, with an AVX2 ``exp`` within 0.7852 ulp over 12
million arguments (subnormal results included) and compensated row sums (within
:math:`8u \sum |v|`, :math:`u = 2^{-53}`, for any number of classes), up to
:data:`KERNEL64_TEMPERATURE`. So do float32 and half-precision logits at temperatures
above :data:`WIDE_TEMPERATURE`, which are evaluated in float64: on float64 copies of each
block, the gradient and terms rounded once into the outputs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kldiv_spec import _core_logits, _settings
from kldiv_spec._core import divide_total

from . import _blocks, _compiled

# The compiled kernel where it was built, else None (see :mod:`._compiled`).
_fused_logits: Any = _compiled.fused_logits
# The compiled float64 kernel (``backends/_fused_logits64.c``) where it was built, else None.
_fused_logits64: Any = _compiled.fused_logits64

__all__: list[str] = []

#: Elements per block (whole rows; at least one row): 512 Ki elements, 2 MiB in float32.
BLOCK_ELEMENTS = 1 << 19

#: The bits of the divergence the compiled kernel writes for a row it leaves to the
#: reference (a quiet NaN with a payload: ``KL_REDO_BITS`` of ``backends/_fused_logits.c``),
#: told apart from the NaN divergence of a row without a softmax.
REDO_BITS = 0x7FF8000000000BAD

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_FLOAT16 = np.dtype(np.float16)
#: How bfloat16 logits reach the kernel: the bits of a ``torch.bfloat16`` tensor, viewed
#: zero-copy as int16 (NumPy has no bfloat16); only with ``bfloat16=True``.
_BFLOAT16_BITS = (np.dtype(np.int16), np.dtype(np.uint16))


def supported(*arrays: Any, bfloat16: bool = False) -> bool:
    """Return whether the kernels take these 2-d C-contiguous arrays of one dtype.

    float32 and float64 always (NumPy's ufuncs where the compiled kernel is not
    available); float16, and the int16 bits of bfloat16 logits (``bfloat16=True``),
    only where the compiled kernel runs, since they are computed in float32 by it.
    """
    first = arrays[0]
    dtypes = _BFLOAT16_BITS if bfloat16 else (*_DTYPES, _FLOAT16)
    if not all(
        type(a) is np.ndarray
        and a.ndim == 2
        and a.dtype == first.dtype
        and a.dtype in dtypes
        and a.flags.c_contiguous
        for a in arrays
    ):
        return False
    return first.dtype in _DTYPES or (first.shape[1] > 0 and _half_kernel(bfloat16) is not None)


def _kernel() -> Callable[..., Any] | None:
    """Return the compiled float32 kernel, or None (not built, no AVX2/FMA, turned off)."""
    if not _settings.current.numpy_fused or _fused_logits is None:
        return None
    return _fused_logits.rows_f32 if _fused_logits.available() else None


def _half_kernel(bfloat16: bool) -> Callable[..., Any] | None:
    """Return the compiled kernel for float16 (or bfloat16) logits, or None."""
    if _kernel() is None:
        return None
    return functools.partial(_half_rows, _fused_logits.rows_half, bfloat16)


def _half_rows(rows_half: Callable[..., Any], bfloat16: bool, *args: Any) -> Any:
    return rows_half(*args, bfloat16)


def fused_available() -> bool:
    """Return whether the compiled float32 kernel runs here (built, AVX2, not turned off)."""
    return _kernel() is not None


def _float32_kernel(s: np.ndarray, temperature: float) -> Callable[..., Any] | None:
    """Return the compiled kernel if it takes these logits (float32, a class or more), or None.

    The quotient ``s / T`` of float32 logits is computed with ``T`` rounded to float32;
    the kernel takes temperatures whose float32 value is a positive normal number
    (every temperature :func:`kldiv_spec._validation.check_temperature` lets through).
    Half-precision logits (float16, bfloat16 bits) always take it (:func:`supported`).
    """
    if s.dtype != np.float32 and s.dtype != _FLOAT16 and s.dtype not in _BFLOAT16_BITS:
        return None
    if s.shape[1] == 0 or not _normal_float32(temperature):
        return None
    if s.dtype == np.float32:
        return _kernel()
    return _half_kernel(s.dtype in _BFLOAT16_BITS)


def _normal_float32(temperature: float, /) -> bool:
    """Return whether ``temperature`` rounded to float32 is a positive normal number."""
    with np.errstate(over="ignore"):
        t32 = np.float32(temperature)
    return bool(np.isfinite(t32) and t32 >= np.finfo(np.float32).smallest_normal)


#: The least positive normal float64: the float64 kernel's least temperature.
_SMALLEST_NORMAL = float(np.finfo(np.float64).smallest_normal)

#: The float64 kernel's largest temperature; above it, NumPy's ufuncs. Both evaluations have
#: an absolute error of some units of 2**-53 on a divergence of order Var(z) / T**2, which
#: k = T**2 amplifies: at T = 2**16 some units of 2**-21 on a loss of order Var(z). At
#: T = 2**63 the kernel's loss of about 1 came out as -1.4e19 (its first-order terms, which
#: cancel in exact arithmetic, each within its bound; -inf in float16) where the ufuncs'
#: cancel to 0: so the ufuncs keep the largest temperatures.
KERNEL64_TEMPERATURE = 2.0**16


def _float64_kernel(s: np.ndarray, temperature: float) -> Callable[..., Any] | None:
    """Return the compiled float64 kernel if it takes these logits, or None.

    It takes float64 logits, and those of other dtypes evaluated in float64 (:func:`_wide`:
    on float64 copies of each block, so that their values are the float64 logits' rounded
    once), with a class or more and a temperature from the least positive normal float64
    to :data:`KERNEL64_TEMPERATURE`, where the kernel is built, the CPU has AVX2 and FMA,
    and the fused kernels are not turned off (as :func:`_kernel`).
    """
    if s.dtype != np.float64 and not _wide(s.dtype, temperature):
        return None
    if s.shape[1] == 0 or not _SMALLEST_NORMAL <= temperature <= KERNEL64_TEMPERATURE:
        return None
    if not _settings.current.numpy_fused or _fused_logits64 is None:
        return None
    return _fused_logits64.rows_f64 if _fused_logits64.available() else None


def widen(a: np.ndarray, /) -> np.ndarray:
    """Return half-precision logits (float16, or bfloat16 bits) as float32 (exact)."""
    if a.dtype in _BFLOAT16_BITS:
        return (a.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    return a.astype(np.float32)


def narrow(values: np.ndarray, dtype: np.dtype[Any], /) -> np.ndarray:
    """Return float32 ``values`` rounded (to nearest, ties to even) to ``dtype``.

    ``dtype`` is float16, or int16 for bfloat16 bits (NaN stays a quiet NaN); any
    other dtype is a plain cast.
    """
    if dtype not in _BFLOAT16_BITS:
        return values.astype(dtype)
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    odd = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = (bits + (np.uint32(0x7FFF) + odd)) >> np.uint32(16)
    quiet = (bits >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(np.isnan(values), quiet, rounded).astype(np.uint16).view(dtype)


#: Above this temperature, logits other than float64 are evaluated in float64 (NumPy's
#: ufuncs on float64 copies of each block, the results rounded once to the dtype). The
#: divergence is then of order Var(z) / T**2 and the absolute error of a float32
#: evaluation some units of 2**-24 from log-sum-exps that nearly cancel, amplified by
#: k = T**2: measured against float64 (docs/logits.md), the float32 kernel's relative
#: error is 6e-6 at T = 100, 5e-4 at 1000 and 0.08 at 10**4, and at T = 2**63 a loss of
#: about 1 came out as -1.4e19 (-inf in float16). Knowledge distillation uses T of 1 to 20.
WIDE_TEMPERATURE = 64.0


def _wide(dtype: np.dtype[Any], temperature: float) -> bool:
    """Return whether logits of ``dtype`` at ``temperature`` are evaluated in float64."""
    return dtype != np.float64 and temperature > WIDE_TEMPERATURE


def _float64(a: np.ndarray, /) -> np.ndarray:
    """Return logits (float32, float16 or bfloat16 bits) as a float64 copy (exact)."""
    return (widen(a) if a.dtype not in _DTYPES else a).astype(np.float64)


def _store(out: np.ndarray, values: np.ndarray, /) -> None:
    """Round float64 ``values`` into ``out`` (float32, float16, or bfloat16 bits)."""
    if out.dtype in _BFLOAT16_BITS:
        # through float32: a double rounding, which can differ from the direct one by an
        # ulp for values within 2**-24 (relatively) of a bfloat16 midpoint
        out[...] = narrow(values.astype(np.float32), out.dtype)
    else:
        np.copyto(out, values, casting="same_kind")


def rows_per_block(vocab: int, /) -> int:
    """Return the number of rows of one block: :data:`BLOCK_ELEMENTS` elements, at least 1."""
    return max(1, BLOCK_ELEMENTS // max(vocab, 1))


def divisor(ops: Any, kept: np.ndarray | None, /) -> int:
    """Return the divisor of the reduction of ``ops`` (a ``LogitsOperands``).

    With ``kept``, from the kept rows: ``'sum'`` 1, ``'mean'`` their elements, else their
    number.
    """
    if kept is None:
        return _core_logits.row_divisor(ops.reduction, shape=ops.shape, axis=ops.axis)
    n = int(np.count_nonzero(kept))
    return n * ops.vocab if ops.reduction == "mean" else (1 if ops.reduction == "sum" else n)


#: Bytes of one scratch buffer of the ufunc path (five per thread): 1 MiB, so that its
#: passes over a block stay in the core's cache. Blocks of :data:`BLOCK_ELEMENTS` float64
#: (4 MiB per buffer, 20 MiB per thread) ran from memory: 2048 x 32000 float64 logits
#: took about 1.4 times as long (430 ms against 300 ms per step at 512 x 32000).
UFUNC_BLOCK_BYTES = 1 << 20


def _ufunc_rows_per_block(vocab: int, itemsize: int, /) -> int:
    """Return the rows of one block of the ufunc path: :data:`UFUNC_BLOCK_BYTES`, at least 1."""
    return max(1, UFUNC_BLOCK_BYTES // max(vocab * itemsize, 1))


def _log_softmax_into(
    z: Any, temperature: float, lz: Any, prob: Any, *, with_log: bool = True
) -> None:
    """Write ``log_softmax(z / T)`` into ``lz`` and ``softmax(z / T)`` into ``prob``.

    ``with_log=False`` stops after the softmax (``lz`` then holds scratch).
    """
    if temperature == 1.0:
        np.copyto(lz, z)
    else:
        np.divide(z, temperature, out=lz)
    m = np.max(lz, axis=1, keepdims=True)
    m[m == -math.inf] = 0.0  # a row of -inf only: not shifted (it comes out NaN)
    np.subtract(lz, m, out=lz)
    np.exp(lz, out=prob)
    total = np.add.reduce(prob, axis=1, keepdims=True)
    np.divide(prob, total, out=prob)
    if not with_log:
        return
    np.log(total, out=total)
    np.subtract(lz, total, out=lz)


def from_logits(
    s: np.ndarray,
    t: np.ndarray,
    /,
    *,
    temperature: float,
    direction: str,
    kept: np.ndarray | None,
    grad_scale: float | None,
    terms_out: np.ndarray | None = None,
    factor: float = 1.0,
    need_loss: bool = True,
    grad_out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    r"""Return the rows' divergences (float64, unscaled) and, if asked, the student gradient.

    ``s`` and ``t`` are 2-d (rows, classes) and :func:`supported`. ``kept`` is
    None or a boolean vector over the rows (masked rows get a 0 divergence, 0
    terms and a 0 gradient). ``grad_scale`` is :math:`c\,G` (the same for every
    row: a reduced loss), or None for no gradient. ``terms_out``, when given,
    receives ``factor`` times the elementwise terms (``reduction='none'``).
    ``need_loss=False`` (a backward alone, forward direction) computes only the
    two softmaxes and :math:`c\,G\,(q - p)`, whose edge values need no second
    evaluation (0 - 0 where both exclude a class, NaN in rows without a
    softmax); the divergences returned are then 0. ``grad_out``, when given with a
    ``grad_scale``, is the gradient's buffer (C-contiguous, the shape and dtype of
    ``s``, sharing no memory with ``t`` or ``terms_out``): a caller walking chunks
    reuses one buffer instead of page-faulting a fresh one per chunk. It may be ``s``
    itself (:func:`in_place`: the same memory, shape and strides), for a caller that
    no longer needs the student's logits: where the compiled float32 kernel evaluates
    the call (:func:`takes_in_place`) the gradient replaces them, the rows the
    reference evaluates again read them first; elsewhere a fresh buffer holds it. Use
    the gradient returned, never ``s``, afterwards.
    """
    rows, vocab = s.shape
    dt = s.dtype
    kl = np.zeros(rows, np.float64)
    grad = None
    wide = _wide(dt, temperature)
    # float64 logits, and wide ones on float64 copies of each block: the float64 kernel
    kernel = _float64_kernel(s, temperature)
    if kernel is None and not wide:
        kernel = _float32_kernel(s, temperature)
    if grad_scale is not None:
        if grad_out is None or (in_place(grad_out, s) and not takes_in_place(dt, temperature)):
            grad = np.empty_like(s)
        else:
            grad = checked_out(grad_out, s, t, terms_out)
    forward = direction == "forward"
    softmax_only = forward and not need_loss and grad is not None and terms_out is None
    cdt = np.dtype(np.float64) if wide else dt  # the ufuncs' dtype
    step = (
        rows_per_block(vocab)
        if kernel is not None and not wide
        else _ufunc_rows_per_block(vocab, cdt.itemsize)
    )
    starts = list(range(0, rows, step))
    # half precision is computed in float32 by the kernel only (supported() checks it)
    assert kernel is not None or cdt in _DTYPES

    def compiled(stripe: Sequence[int]) -> list[Any]:
        assert kernel is not None
        # wide: the kernel runs on float64 copies (blocks of the ufunc path's size), and the
        # gradient and terms are rounded once from float64 into the outputs (_store)
        g64 = np.empty((step, vocab)) if wide and grad is not None else None
        e64 = np.empty((step, vocab)) if wide and terms_out is not None else None
        for i in stripe:
            j = min(i + step, rows)
            sb, tb = (_float64(s[i:j]), _float64(t[i:j])) if wide else (s[i:j], t[i:j])
            g = None if grad is None else (grad[i:j] if g64 is None else g64[: j - i])
            e = None if terms_out is None else (terms_out[i:j] if e64 is None else e64[: j - i])
            kernel(
                sb,
                tb,
                vocab,
                None if softmax_only else kl[i:j],
                g,
                e,
                temperature,
                0.0 if grad_scale is None else grad_scale,
                factor,
                not forward,
            )
            if g64 is not None and grad is not None and g is not None:
                _store(grad[i:j], g)
            if e64 is not None and terms_out is not None and e is not None:
                _store(terms_out[i:j], e)
        return []

    def work(stripe: Sequence[int]) -> list[Any]:
        a, b, c, d, e = (np.empty((step, vocab), cdt) for _ in range(5))
        # wide: the gradient is formed in float64 here, then rounded into the output
        f = np.empty((step, vocab), cdt) if wide and grad is not None else None
        with np.errstate(all="ignore"):
            for i in stripe:
                j = min(i + step, rows)
                n = j - i
                lq, lp, q, p, tmp = a[:n], b[:n], c[:n], d[:n], e[:n]
                sb, tb = (_float64(s[i:j]), _float64(t[i:j])) if wide else (s[i:j], t[i:j])
                _log_softmax_into(sb, temperature, lq, q, with_log=not softmax_only)
                _log_softmax_into(tb, temperature, lp, p, with_log=not softmax_only)
                g = None if grad is None else (grad[i:j] if f is None else f[:n])
                if softmax_only:
                    assert g is not None and grad is not None and grad_scale is not None
                    np.subtract(q, p, out=g)
                    np.multiply(g, grad_scale, out=g)
                    if f is not None:
                        _store(grad[i:j], g)
                    continue
                lw, w, lo = (lp, p, lq) if forward else (lq, q, lp)
                np.subtract(lw, lo, out=lw)  # r = log w - log o
                np.multiply(w, lw, out=tmp)  # the terms
                row_kl = np.add.reduce(tmp, axis=1)
                excluded = np.flatnonzero(np.isnan(row_kl))
                if excluded.size:
                    _drop_zero_weights(tmp, w, excluded, row_kl)
                kl[i:j] = row_kl
                if terms_out is not None:
                    if wide:
                        _store(terms_out[i:j], tmp * factor if factor != 1.0 else tmp)
                    elif factor != 1.0:
                        np.multiply(tmp, factor, out=terms_out[i:j])
                    else:
                        np.copyto(terms_out[i:j], tmp)
                if g is not None and grad is not None:
                    if forward:
                        np.subtract(q, p, out=g)
                    else:
                        np.subtract(lw, row_kl[:, None], out=lw)
                        np.multiply(q, lw, out=g)
                        if excluded.size:  # q = 0: a gradient of 0, not 0 * -inf
                            rows_g = g[excluded]
                            rows_g[q[excluded] == 0] = 0.0
                            g[excluded] = rows_g
                    np.multiply(g, grad_scale, out=g)
                    if f is not None:
                        _store(grad[i:j], g)
        return []

    _blocks._run(work if kernel is None else compiled, starts, _blocks.num_threads())
    if softmax_only:
        if kept is not None and grad is not None:
            grad[~kept] = 0.0
        return kl, grad
    # the ufuncs: every row whose sum is NaN, and for the reverse gradient +inf too (its
    # values depend on which tiny probabilities are 0: the reference's); the kernel: the
    # rows it marked
    if kernel is None:
        redo = np.isnan(kl)
        if grad is not None and not forward:
            redo |= np.isinf(kl)
    else:
        redo = kl.view(np.uint64) == np.uint64(REDO_BITS)
    _fix_rows(s, t, kl, grad, terms_out, temperature, direction, grad_scale, factor, kept, redo)
    return kl, grad


def in_place(out: Any, s: np.ndarray, /) -> bool:
    """Return whether ``out`` is ``s``'s memory exactly (the same start, shape, strides, dtype)."""
    return (
        type(out) is np.ndarray
        and out.shape == s.shape
        and out.strides == s.strides
        and out.dtype == s.dtype
        and out.__array_interface__["data"][0] == s.__array_interface__["data"][0]
    )


def takes_in_place(dtype: Any, temperature: float, /) -> bool:
    """Return whether a gradient can replace logits of ``dtype``: the compiled float32 kernel.

    Its passes keep their exponentials in scratch rows when the gradient's buffer is
    the logits' (``backends/_fused_logits.c``); the ufuncs, the half-precision and
    float64 kernels write theirs elsewhere.
    """
    dtype = np.dtype(dtype)
    return (
        dtype == np.float32
        and not _wide(dtype, temperature)
        and _normal_float32(temperature)
        and _kernel() is not None
    )


def checked_out(
    out: np.ndarray, s: np.ndarray, t: np.ndarray, terms_out: np.ndarray | None
) -> np.ndarray:
    """Return ``out`` if it can hold the gradient of ``s``; raise ValueError otherwise.

    ``out`` is ``s`` itself (:func:`in_place`) or shares no memory with the logits or
    ``terms_out``.
    """
    if type(out) is not np.ndarray or out.shape != s.shape or out.dtype != s.dtype:
        raise ValueError(
            f"grad_out must be an ndarray of shape {s.shape} and dtype {s.dtype}, "
            f"got {getattr(out, 'shape', type(out))} {getattr(out, 'dtype', '')}"
        )
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("grad_out must be C-contiguous and writeable")
    others = (t,) if in_place(out, s) else (s, t)
    others += () if terms_out is None else (terms_out,)
    if any(np.shares_memory(out, a) for a in others):
        raise ValueError(
            "grad_out must be the student's logits themselves or share no memory with "
            "the logits or terms_out"
        )
    return out


def rows(
    ops: Any, s: Any, t: Any, takes: Callable[[np.ndarray, np.ndarray], bool], /
) -> tuple[Any, Any, Any] | None:
    """Return ``(s2, t2, kept)``: 2-d (rows, classes) views and the row mask, or None.

    None where a kernel does not take the call: classes not on the last axis, fewer
    elements than :func:`kldiv_spec.backends._blocks.min_elements`, operands that are
    not C-contiguous ndarrays, or views ``takes(s2, t2)`` refuses (the KL's and the
    Jensen-Shannon divergence's kernels share this arrangement).
    """
    shape = ops.shape
    if ops.axis != len(shape) - 1 or math.prod(shape) < max(_blocks.min_elements(), 1):
        return None
    if type(s) is not np.ndarray or type(t) is not np.ndarray:
        return None
    if not (s.flags.c_contiguous and t.flags.c_contiguous):
        return None
    n, vocab = math.prod(shape[:-1]), shape[-1]
    s2, t2 = s.reshape(n, vocab), t.reshape(n, vocab)
    if not takes(s2, t2):
        return None
    kept = None
    if ops.mask is not None:
        full = np.broadcast_to(np.asarray(ops.mask), ops.row_shape)
        kept = np.ascontiguousarray(full).reshape(n)
    return s2, t2, kept


def finish(total: float, d: int, ops: Any, dt: Any, masked: bool) -> Any:
    """Round the total to ``dt``, divide by ``d`` (0 for none kept: 0 with a mask), times k.

    ``dt`` is the compute dtype (float32 for half precision: the caller rounds the result).
    """
    with np.errstate(all="ignore"):
        result = np.asarray(total, dtype=dt)
        if masked and d == 0:
            result = np.zeros((), dt)
        else:
            result = np.asarray(divide_total(result, d, xp=np))
        return result if ops.factor == 1.0 else np.asarray(result * ops.factor, dtype=dt)


def _drop_zero_weights(
    terms: np.ndarray, weights: np.ndarray, rows: np.ndarray, row_kl: np.ndarray
) -> None:
    r"""Set the terms of zero weight to 0 in ``rows`` (NaN sums) and sum those rows again.

    A class the weighting distribution excludes (a logit of ``-inf``, or an ``exp``
    that underflows) has the term :math:`0 \cdot (\pm\infty)` = NaN here and 0 in the
    specification, so its row stays in the blocked evaluation instead of going to the
    reference; rows still NaN (NaN or ``+inf`` logits, no softmax) are the reference's.
    """
    block = terms[rows]
    block[weights[rows] == 0] = 0.0
    terms[rows] = block
    row_kl[rows] = np.add.reduce(block, axis=1)


def _fix_rows(
    s: np.ndarray,
    t: np.ndarray,
    kl: np.ndarray,
    grad: np.ndarray | None,
    terms_out: np.ndarray | None,
    temperature: float,
    direction: str,
    grad_scale: float | None,
    factor: float,
    kept: np.ndarray | None,
    redo: np.ndarray,
) -> None:
    """Evaluate the rows ``redo`` says with the reference core; zero the masked rows."""
    if kept is not None:
        redo &= kept
    rows = np.flatnonzero(redo)
    if rows.size:
        sr, tr = s[rows], t[rows]
        if _wide(sr.dtype, temperature):  # evaluated in float64, as the block was
            sr, tr = _float64(sr), _float64(tr)
        elif sr.dtype not in _DTYPES:  # half precision: evaluated in float32, rounded once
            sr, tr = widen(sr), widen(tr)
        with np.errstate(all="ignore"):
            lq, lp = _core_logits.log_probabilities(sr, tr, temperature=temperature, axis=1, xp=np)
            e = _core_logits.terms(lq, lp, direction=direction, xp=np)
            kl[rows] = np.add.reduce(e, axis=1)
            if terms_out is not None:
                terms_out[rows] = narrow(e * factor if factor != 1.0 else e, terms_out.dtype)
            if grad is not None:
                g = np.asarray(grad_scale, dtype=sr.dtype)
                gs, _ = _core_logits.from_logits_backward(
                    g,
                    sr,
                    tr,
                    temperature=temperature,
                    factor=1.0,
                    reduction="sum",
                    axis=1,
                    direction=direction,
                    mask=None,
                    target_grad=False,
                    xp=np,
                )
                # from_logits_backward scales by 1 / T; grad_scale already holds c = k / T
                grad[rows] = narrow(gs * temperature, grad.dtype)
    if kept is not None:
        dropped = ~kept
        kl[dropped] = 0.0
        if grad is not None:
            grad[dropped] = 0.0
        if terms_out is not None:
            terms_out[dropped] = 0.0
