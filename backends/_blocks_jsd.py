r"""Blocked, multithreaded generalised Jensen-Shannon divergence from float32 logits.

The ``beta`` of :func:`kldiv_spec.kl_div_from_logits` (:math:`0 < \beta < 1`):
with :math:`p = \operatorname{softmax}(t / T)` (the teacher),
:math:`q = \operatorname{softmax}(s / T)` (the student) and
:math:`m = \beta p + (1 - \beta) q`, each row's divergence

.. math::

    J = \beta \sum_i p_i (\log p_i - \log m_i)
        + (1 - \beta) \sum_i q_i (\log q_i - \log m_i)

and, for a reduction (upstream gradient :math:`c\,G` the same for every class),
the student gradient

.. math::

    \nabla_{s_j} = c\,G\,(1 - \beta)\, q_j \bigl(r_j - \textstyle\sum_i q_i r_i\bigr),
    \qquad r = \log q - \log m,

(:math:`e_i` depends on :math:`q` only through :math:`q_i`, with
:math:`\partial e_i / \partial q_i = (1 - \beta) r_i`), are evaluated by the
compiled kernel ``backends/_fused_jsd.c``, one block of whole rows
(:func:`._blocks_logits.rows_per_block`, about 512 Ki elements) per call, on
the worker threads of :mod:`kldiv_spec.backends._blocks`: two ``exp`` and one
``log`` per class, products in float32 and sums in float64 in a fixed order,
so the result does not depend on the number of threads. Extra memory: the
gradient (or the ``'none'`` terms) asked for, one float64 per row and two
scratch rows per block.

Error bound (derived in the kernel's header): against the exact divergence
:math:`J_x` of the float32 shifted logits :math:`x = \operatorname{fl}(z / T) - \max`,
with :math:`u = 2^{-24}` and :math:`L = \log \sum e^{x}`,

.. math::

    |J - J_x| \le u \sum_i (\beta p_i + (1 - \beta) q_i)
        \bigl(9 + 3|\log p_i| + 3|\log q_i| + 4|\log m_i| + |L_t| + |L_s|
        + |\log p_i - \log m_i| + |\log q_i - \log m_i|\bigr)

plus :math:`n\,2^{-53}` relatively for the float64 sums: within the
documented :math:`8u \sum_j W_j` of ``conformance/oracle_logits.py``.

Rows the kernel does not settle (a NaN or ``+inf`` logit, a quotient
:math:`z / T` overflowing, or a side that is ``-inf`` only: no softmax) come
back marked (:data:`REDO_BITS`) and are evaluated again here with the
reference core (:mod:`kldiv_spec._core_logits`), so every edge value is the
specification's. A class one side excludes stays in the kernel: the mixture is
positive where the other side keeps it, so its terms are finite.

:func:`evaluate` is the call the NumPy and the PyTorch (CPU) fast paths make:
the reductions add the rows' float64 divergences, round the total to float32,
divide it once by the divisor (:func:`kldiv_spec._core.divide_total`; with a
mask, by the number of kept rows, 0 when there is none) and multiply by
:math:`k`, in the reference's order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kldiv_spec import _core_logits, _settings
from kldiv_spec._validation import LogitsOperands

from . import _blocks, _blocks_logits, _compiled

# The compiled kernel where it was built, else None (see :mod:`._compiled`).
_fused_jsd: Any = _compiled.fused_jsd

__all__: list[str] = []

#: The bits of the divergence the kernel writes for a row it leaves to the reference
#: (``JSD_REDO_BITS`` of ``backends/_fused_jsd.c``): the KL kernel's marker.
REDO_BITS = _blocks_logits.REDO_BITS

#: The smallest ``beta`` (and ``1 - beta``) the kernel takes: its per-row weight
#: :math:`\beta / Z_t` stays a normal float32 for any vocabulary below :math:`2^{31}`.
MIN_BETA = 2.0**-60


def _kernel() -> Callable[..., Any] | None:
    """Return the compiled kernel, or None (not built, no AVX2/FMA, turned off)."""
    if not _settings.current.numpy_fused or _fused_jsd is None:
        return None
    return _fused_jsd.rows_f32 if _fused_jsd.available() else None


def fused_available() -> bool:
    """Return whether the compiled kernel runs here (built, AVX2, not turned off)."""
    return _kernel() is not None


def takes(s: np.ndarray, t: np.ndarray, temperature: float, beta: float) -> bool:
    r"""Return whether the kernel takes these 2-d logits, temperature and ``beta``.

    C-contiguous float32 NumPy arrays of one shape with at least one class, and
    :func:`takes_options`.
    """
    arrays_ok = all(
        type(a) is np.ndarray
        and a.ndim == 2
        and a.dtype == np.float32
        and a.flags.c_contiguous
        and a.shape == s.shape
        for a in (s, t)
    )
    return arrays_ok and s.shape[1] > 0 and takes_options(temperature, beta)


def takes_options(temperature: float, beta: float) -> bool:
    r"""Return whether the kernel takes this temperature and ``beta`` (float32 logits).

    A temperature whose float32 value is a positive normal number (``s / T`` is
    computed with ``T`` rounded to float32, as NumPy does) and at most
    :data:`~kldiv_spec.backends._blocks_logits.WIDE_TEMPERATURE`; :data:`MIN_BETA`
    :math:`\le \beta \le 1 -` :data:`MIN_BETA`; and the kernel available.
    """
    with np.errstate(over="ignore"):
        t32 = np.float32(temperature)
    if not (np.isfinite(t32) and t32 >= np.finfo(np.float32).smallest_normal):
        return False
    if not (beta >= MIN_BETA and 1.0 - beta >= MIN_BETA):  # (1 - 2**-60 is 1.0)
        return False
    if temperature > _blocks_logits.WIDE_TEMPERATURE:  # float32 loses the value there
        return False
    return fused_available()


def from_logits(
    s: np.ndarray,
    t: np.ndarray,
    /,
    *,
    temperature: float,
    beta: float,
    kept: np.ndarray | None,
    grad_scale: float | None,
    terms_out: np.ndarray | None = None,
    factor: float = 1.0,
    grad_out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    r"""Return the rows' divergences (float64, unscaled) and, if asked, the student gradient.

    ``s`` and ``t`` are 2-d (rows, classes) and :func:`takes` them. ``grad_out`` as
    in :func:`kldiv_spec.backends._blocks_logits.from_logits` (a reused buffer). ``kept`` is
    None or a boolean vector over the rows (masked rows get a 0 divergence, 0
    terms and a 0 gradient). ``grad_scale`` is :math:`c\,G` (the same for every
    row: a reduced loss), or None for no gradient. ``terms_out``, when given,
    receives ``factor`` times the elementwise terms (``reduction='none'``).
    """
    kernel = _kernel()
    assert kernel is not None, "from_logits needs the compiled kernel: check takes() first"
    rows, vocab = s.shape
    jsd = np.zeros(rows, np.float64)
    grad = None
    if grad_scale is not None:
        grad = (
            np.empty_like(s)
            if grad_out is None
            else _blocks_logits.checked_out(grad_out, s, t, terms_out)
        )
    step = _blocks_logits.rows_per_block(vocab)
    starts = list(range(0, rows, step))

    def work(stripe: Sequence[int]) -> list[Any]:
        for i in stripe:
            j = min(i + step, rows)
            kernel(
                s[i:j],
                t[i:j],
                vocab,
                jsd[i:j],
                None if grad is None else grad[i:j],
                None if terms_out is None else terms_out[i:j],
                temperature,
                0.0 if grad_scale is None else grad_scale,
                factor,
                beta,
            )
        return []

    _blocks._run(work, starts, _blocks.num_threads())
    redo = jsd.view(np.uint64) == np.uint64(REDO_BITS)
    _fix_rows(s, t, jsd, grad, terms_out, temperature, beta, grad_scale, factor, kept, redo)
    return jsd, grad


def _fix_rows(
    s: np.ndarray,
    t: np.ndarray,
    jsd: np.ndarray,
    grad: np.ndarray | None,
    terms_out: np.ndarray | None,
    temperature: float,
    beta: float,
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
        with np.errstate(all="ignore"):
            lq, lp = _core_logits.log_probabilities(sr, tr, temperature=temperature, axis=1, xp=np)
            e = _core_logits.jsd_terms(lq, lp, beta, xp=np)
            jsd[rows] = np.add.reduce(e, axis=1)
            if terms_out is not None:
                terms_out[rows] = e * factor if factor != 1.0 else e
            if grad is not None:
                g = np.asarray(grad_scale, dtype=s.dtype)
                gs, _ = _core_logits.from_logits_backward(
                    g,
                    sr,
                    tr,
                    temperature=temperature,
                    factor=1.0,
                    reduction="sum",
                    axis=1,
                    direction="forward",
                    mask=None,
                    target_grad=False,
                    xp=np,
                    beta=beta,
                )
                # from_logits_backward scales by 1 / T; grad_scale already holds c = k / T
                grad[rows] = gs * temperature
    if kept is not None:
        dropped = ~kept
        jsd[dropped] = 0.0
        if grad is not None:
            grad[dropped] = 0.0
        if terms_out is not None:
            terms_out[dropped] = 0.0


def _arranged(ops: LogitsOperands, s: Any, t: Any) -> tuple[Any, Any, Any] | None:
    """Return ``(s2, t2, kept)`` (:func:`kldiv_spec.backends._blocks_logits.rows`), or None.

    None also where ``beta`` is None or :func:`takes` refuses the operands.
    """
    if ops.beta is None:
        return None
    beta = ops.beta
    return _blocks_logits.rows(ops, s, t, lambda a, b: takes(a, b, ops.temperature, beta))


def evaluate(
    ops: LogitsOperands, s: Any, t: Any, /, *, with_grad: bool
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Return ``(loss, student gradient for a unit upstream gradient or None)``, or None.

    ``s`` and ``t`` are NumPy arrays (or zero-copy NumPy views of tensors) of the
    logits' shape; ``ops.beta`` is strictly between 0 and 1 and ``ops.mask`` None
    or a NumPy array. ``'none'`` returns the terms (no gradient: None is
    returned when one is asked). None means the kernel does not take the call.
    """
    arranged = _arranged(ops, s, t)
    if arranged is None:
        return None
    s2, t2, kept = arranged
    assert ops.beta is not None
    common = {"temperature": ops.temperature, "beta": ops.beta, "kept": kept}
    if ops.reduction == "none":
        if with_grad:
            return None
        out = np.empty(ops.shape, np.float32)
        from_logits(
            s2, t2, grad_scale=None, terms_out=out.reshape(s2.shape), factor=ops.factor, **common
        )
        return out, None
    d = _blocks_logits.divisor(ops, kept)
    scale = None
    if with_grad:
        scale = 0.0 if d == 0 else ops.factor / ops.temperature / d
    jsd, grad = from_logits(s2, t2, grad_scale=scale, **common)
    with np.errstate(all="ignore"):
        total = float(np.add.reduce(jsd) + 0.0)
    loss = _blocks_logits.finish(total, d, ops, np.dtype(np.float32), kept is not None)
    return loss, (None if grad is None else grad.reshape(ops.shape))


def forward(ops: LogitsOperands, /) -> Any:
    """Return the loss of NumPy operands (the NumPy fast path's ``beta``), or NotImplemented."""
    done = evaluate(ops, ops.input, ops.target, with_grad=False)
    return NotImplemented if done is None else done[0]


def backward(g: Any, ops: LogitsOperands, target_grad: bool, /) -> Any:
    """Return ``(grad_input, None)`` of NumPy operands, or NotImplemented.

    Taken for the reductions (a 0-d ``g``) without ``target_grad``: the kernel's
    gradient for a unit upstream gradient, multiplied by ``g`` in place.
    """
    if target_grad or ops.reduction == "none":
        return NotImplemented
    done = evaluate(ops, ops.input, ops.target, with_grad=True)
    if done is None or done[1] is None:
        return NotImplemented
    grad = done[1]
    with np.errstate(all="ignore"):
        np.multiply(grad, np.asarray(g, dtype=grad.dtype), out=grad)
    return grad, None


def takes_call(ops: LogitsOperands, s: Any, t: Any, /) -> bool:
    """Return whether :func:`evaluate` takes these operands (NumPy arrays or views)."""
    return _arranged(ops, s, t) is not None
