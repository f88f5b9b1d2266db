"""The public functions: validate, pick a fast path, fall back to the reference."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from kldiv_spec.backends import _blocks

from . import _reference
from ._dispatch import FRONTS, compiling, fast_path, front, getenv
from ._floating_point import quiet
from ._validation import REDUCTIONS, grad_output_array, operands

__all__ = ["kl_div", "kl_div_backward"]

Array = Any

#: PyTorch's warning for ``reduction='mean'``, word for word.
MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support "
    "size.'batchmean' divides only by the batch size, and aligns with the KL div math "
    "definition.'mean' will be changed to behave the same as 'batchmean' in the next "
    "major release."
)


def kl_div(
    input: Array,
    target: Array,
    /,
    *,
    reduction: str = "mean",
    log_target: bool = False,
) -> Array:
    r"""Kullback-Leibler divergence loss, with PyTorch's ``kl_div`` semantics.

    For log-probabilities :math:`x = \log q` (``input``) and probabilities
    :math:`t = p` (``target``) the pointwise loss is

    .. math::

        \ell = t \log t - t\,x \quad (0 \log 0 = 0), \qquad
        \text{or } \ell = e^{t}(t - x) \text{ with } t = \log p \text{ (log_target)},

    and :math:`\sum \ell = \mathrm{KL}(p \,\|\, q)` for probability vectors.

    Parameters
    ----------
    input : array
        Log-probabilities :math:`\log q`, real floating dtype.
    target : array
        Probabilities :math:`p` (or :math:`\log p` with ``log_target``), of the
        same array library and device as ``input`` and broadcastable with it.
    reduction : {'mean', 'batchmean', 'sum', 'none'}, default 'mean'
        ``'none'``: the pointwise loss, of the broadcast shape. ``'sum'``: its
        sum. ``'batchmean'``: the sum divided by ``input.shape[0]`` (the
        mathematical KL per sample; the plain sum for 0-d input). ``'mean'``:
        the sum divided by the number of elements, with PyTorch's UserWarning
        that this is not the KL divergence.
    log_target : bool, default False
        Whether ``target`` holds log-probabilities.

    Returns
    -------
    array
        The loss, of the common dtype of ``input`` and ``target`` under the array
        API's promotion rules; 0-d unless ``reduction='none'``.

    Raises
    ------
    ValueError
        For an unknown ``reduction``, arrays on two devices, or shapes that do
        not broadcast.
    TypeError
        For non-arrays, arrays of two libraries, or a non-floating dtype.

    Notes
    -----
    No value is clamped: a zero target contributes 0 (NaN if the input is
    infinite or NaN), a negative target gives NaN, and NaN/inf propagate into
    every reduction, exactly as in PyTorch. See ``docs/spec.md`` for the full
    edge-value table. The call is evaluated by the array library's fast path in
    :mod:`kldiv_spec.backends` when there is one, else by the reference; both
    give the same values (see :func:`kldiv_spec.use_reference`).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import kldiv_spec
    >>> log_q = xp.log(xp.asarray([[0.5, 0.5], [0.9, 0.1]]))
    >>> p = xp.asarray([[0.5, 0.5], [0.5, 0.5]])
    >>> kldiv_spec.kl_div(log_q, p, reduction="none")
    Array([[ 0.        ,  0.        ],
           [-0.29389333,  0.80471896]], dtype=array_api_strict.float64)
    >>> kldiv_spec.kl_div(log_q, p, reduction="batchmean")
    Array(0.25541281, dtype=array_api_strict.float64)
    """
    return forward(input, target, reduction=reduction, log_target=log_target, stacklevel=3)


def forward(
    input: Array,
    target: Array,
    /,
    *,
    reduction: str,
    log_target: bool,
    stacklevel: int,
    warn_mean: bool = True,
) -> Array:
    """Implement :func:`kl_div`; ``stacklevel`` points the ``mean`` warning at the caller.

    The registered front first (:func:`kldiv_spec._dispatch.front`), then
    :func:`full_route`. ``warn_mean=False`` is for the legacy ``size_average``/``reduce``
    spelling, which PyTorch resolves to ``'mean'`` without the ``'mean'`` warning.
    """
    handler = front(input)
    if handler is not None:
        result = handler(input, target, reduction, log_target)
        if result is not NotImplemented:
            # The front took the call only if every check below would have passed.
            if reduction == "mean" and warn_mean:
                _warn_mean(stacklevel + 1)
            return result
    return full_route(
        input,
        target,
        reduction=reduction,
        log_target=log_target,
        stacklevel=stacklevel + 1,
        warn_mean=warn_mean,
    )


def full_route(
    input: Array,
    target: Array,
    /,
    *,
    reduction: str,
    log_target: bool,
    stacklevel: int,
    warn_mean: bool = True,
) -> Array:
    """Validate, then evaluate with the namespace's fast path or the reference (no front).

    For :func:`forward`, and for a front handing a call back on operands it has changed
    (autocast's casts).
    """
    ops = operands(input, target, reduction=reduction, log_target=log_target)
    if reduction == "mean" and warn_mean:
        _warn_mean(stacklevel + 1)
    path = fast_path(ops.xp)
    if path is not None:
        with quiet(ops.xp):
            result = path.kl_div(ops)
        if result is not NotImplemented:
            return _zero_dim_array(result)
    return _zero_dim_array(_reference.forward(ops))


_NUMPY_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _warn_mean(stacklevel: int, /) -> None:
    """Emit PyTorch's ``'mean'`` warning, except in code that ``torch.compile`` traces.

    ``torch.compile`` cannot put a warning in a graph (it would break the graph in
    two). PyTorch's own ``F.kl_div`` warns only while it is being compiled, not when
    the compiled code runs; kldiv-spec's compiled calls do not warn at all.
    """
    if not compiling():
        warnings.warn(MEAN_WARNING, UserWarning, stacklevel=stacklevel)


def _numpy_front(x: Array, t: Array, reduction: object, log_target: object) -> Array:
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
    if reduction not in REDUCTIONS or x.shape != t.shape or x.ndim == 0:
        return NotImplemented
    n = x.size
    if n >= _numpy_fast_threshold():
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


def _numpy_fast_threshold() -> int:
    """Return the size from which the NumPy fast path takes a call (and the front does not).

    :func:`kldiv_spec.backends._blocks.min_elements`, whose environment variable is read
    here the cheap way first (it is usually unset).
    """
    if getenv(_blocks.MIN_ELEMENTS_ENV).strip():
        return max(_blocks.min_elements(), 1)
    return max(_blocks.MIN_ELEMENTS, 1)


FRONTS[np.ndarray] = _numpy_front


def _zero_dim_array(result: Array) -> Array:
    """Return NumPy's reduction results as 0-d arrays, as the array API specifies.

    NumPy's reductions return scalars (``np.float64``), which are not arrays.
    """
    return np.asarray(result) if isinstance(result, np.generic) else result


def kl_div_backward(
    grad_output: Array | float,
    input: Array,
    target: Array,
    /,
    *,
    reduction: str = "mean",
    log_target: bool = False,
) -> tuple[Array, Array]:
    r"""Gradients of :func:`kl_div` w.r.t. ``input`` and ``target``.

    For libraries without autograd (NumPy, CuPy, Dask, array-api-strict). With
    :math:`g` the gradient w.r.t. the loss and :math:`D` the reduction's
    divisor (1 for ``'none'`` and ``'sum'``, the number of elements for
    ``'mean'``, ``input.shape[0]`` for ``'batchmean'``):

    .. math::

        \frac{\partial L}{\partial x} = -\frac{g\,t}{D}, \qquad
        \frac{\partial L}{\partial t} = \frac{g\,(\log t + 1 - x)}{D},

    and with ``log_target``: :math:`-g e^{t}/D` and :math:`g e^{t}(t - x + 1)/D`.
    Where an argument was broadcast, its gradient is summed back to its shape.
    As in PyTorch, the target gradient (without ``log_target``) is NaN where
    the target is 0, negative, infinite or NaN.

    Parameters
    ----------
    grad_output : array or float
        Gradient w.r.t. the output of ``kl_div(input, target, ...)``: 0-d for
        the reductions, broadcastable to the broadcast shape for ``'none'``.
    input, target, reduction, log_target
        As for :func:`kl_div`.

    Returns
    -------
    grad_input, grad_target : array
        Each with its own argument's shape and dtype.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import kldiv_spec
    >>> x = xp.log(xp.asarray([0.25, 0.75]))
    >>> t = xp.asarray([0.5, 0.5])
    >>> gx, gt = kldiv_spec.kl_div_backward(1.0, x, t, reduction="sum")
    >>> gx
    Array([-0.5, -0.5], dtype=array_api_strict.float64)
    """
    ops = operands(input, target, reduction=reduction, log_target=log_target)
    g = grad_output_array(grad_output, ops)
    path = fast_path(ops.xp)
    if path is not None:
        with quiet(ops.xp):
            result = path.kl_div_backward(g, ops)
        if result is not NotImplemented:
            return result
    return _reference.backward(g, ops)
