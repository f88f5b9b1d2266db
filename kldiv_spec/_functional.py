"""``kl_div`` and its backward: validate, then the dispatcher (a fast path or the reference).

The common call first asks the input type's *front* (:func:`kldiv_spec._dispatch.front`),
which evaluates plain arrays of one dtype and shape with a few attribute checks; anything
else takes the full route: :func:`kldiv_spec._validation.operands`, then
:func:`kldiv_spec._dispatch.evaluate`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from . import _dispatch
from ._dispatch import compiling, front
from ._validation import grad_output_array, operands
from .backends._protocol import Recast

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
            if type(result) is Recast:  # the front changed the operands (autocast)
                input, target = result.input, result.target
            else:
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

    NumPy's reductions return scalars (``np.float64``), which are not arrays: they come
    back as 0-d arrays, as the array API specifies.
    """
    ops = operands(input, target, reduction=reduction, log_target=log_target)
    if reduction == "mean" and warn_mean:
        _warn_mean(stacklevel + 1)
    result = _dispatch.evaluate("kl_div", ops.xp, ops)
    return np.asarray(result) if isinstance(result, np.generic) else result


def _warn_mean(stacklevel: int, /) -> None:
    """Emit PyTorch's ``'mean'`` warning, except in code that ``torch.compile`` traces.

    ``torch.compile`` cannot put a warning in a graph (it would break the graph in
    two). PyTorch's own ``F.kl_div`` warns only while it is being compiled, not when
    the compiled code runs; kldiv-spec's compiled calls do not warn at all.
    """
    if not compiling():
        warnings.warn(MEAN_WARNING, UserWarning, stacklevel=stacklevel)


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
    return _dispatch.evaluate("kl_div_backward", ops.xp, g, ops)


for _entry in (kl_div, forward):
    _dispatch.register_entry_point(_entry)
