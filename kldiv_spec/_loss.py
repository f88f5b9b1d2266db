"""``KLDivLoss``: the loss as an object, like ``torch.nn.KLDivLoss``, for any array library."""

from __future__ import annotations

import warnings
from typing import Any

from . import _functional
from ._validation import check_log_target, check_reduction, legacy_reduction

__all__ = ["KLDivLoss"]

Array = Any

LEGACY_WARNING = (
    "size_average and reduce args will be deprecated, please use reduction='{}' instead."
)


class KLDivLoss:
    r"""Kullback-Leibler divergence loss :math:`\mathrm{KL}(p \,\|\, q)`.

    Calls :func:`kldiv_spec.kl_div` with the configured options; the input is
    :math:`\log q` (e.g. from ``log_softmax``), the target :math:`p` (or
    :math:`\log p` with ``log_target``). Works with arrays of any library the
    package supports. For a ``torch.nn.Module``, use
    :class:`kldiv_spec.torch.KLDivLoss`.

    Parameters
    ----------
    reduction : {'mean', 'batchmean', 'sum', 'none'}, default 'mean'
        See :func:`kldiv_spec.kl_div`. ``'batchmean'`` is the mathematical KL
        divergence averaged over the batch; ``'mean'`` (PyTorch's default)
        also divides by the support size and warns on every call.
    log_target : bool, default False
        Whether the target holds log-probabilities.
    size_average, reduce : bool, optional
        PyTorch's deprecated flags. When either is given it overrides
        ``reduction`` as in PyTorch (``reduce=False`` gives ``'none'``,
        ``size_average=False`` gives ``'sum'``, else ``'mean'``) and a
        DeprecationWarning is emitted.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> from kldiv_spec import KLDivLoss
    >>> loss = KLDivLoss(reduction="batchmean")
    >>> loss
    KLDivLoss(reduction='batchmean', log_target=False)
    >>> log_q = xp.log(xp.asarray([[0.5, 0.5], [0.9, 0.1]]))
    >>> p = xp.asarray([[0.5, 0.5], [0.5, 0.5]])
    >>> loss(log_q, p)
    Array(0.25541281, dtype=array_api_strict.float64)
    >>> grad_input, grad_target = loss.backward(log_q, p)
    >>> grad_input
    Array([[-0.25, -0.25],
           [-0.25, -0.25]], dtype=array_api_strict.float64)
    """

    __slots__ = ("__weakref__", "_log_target", "_reduction")

    def __init__(
        self,
        *,
        reduction: str = "mean",
        log_target: bool = False,
        size_average: bool | None = None,
        reduce: bool | None = None,
    ) -> None:
        if size_average is not None or reduce is not None:
            reduction = legacy_reduction(size_average, reduce)
            warnings.warn(LEGACY_WARNING.format(reduction), DeprecationWarning, stacklevel=2)
        self._reduction = check_reduction(reduction)
        self._log_target = check_log_target(log_target)

    @property
    def reduction(self) -> str:
        """The reduction applied to the pointwise loss (read-only)."""
        return self._reduction

    @property
    def log_target(self) -> bool:
        """Whether the target holds log-probabilities (read-only)."""
        return self._log_target

    def forward(self, input: Array, target: Array, /) -> Array:
        """Return the loss of ``input`` (log q) against ``target``; see ``kl_div``."""
        return _functional.forward(
            input,
            target,
            reduction=self._reduction,
            log_target=self._log_target,
            stacklevel=3,
        )

    #: Calling the loss is :meth:`forward`, as with a ``torch.nn.Module``.
    __call__ = forward

    def backward(
        self, input: Array, target: Array, /, grad_output: Array | float | None = None
    ) -> tuple[Array, Array]:
        """Return ``(grad_input, grad_target)``; see :func:`kldiv_spec.kl_div_backward`.

        ``grad_output`` defaults to 1 (the gradient of the loss itself); with
        ``reduction='none'`` that is 1 for every element.
        """
        return _functional.kl_div_backward(
            1.0 if grad_output is None else grad_output,
            input,
            target,
            reduction=self._reduction,
            log_target=self._log_target,
        )

    def __repr__(self) -> str:
        return f"KLDivLoss(reduction={self._reduction!r}, log_target={self._log_target!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KLDivLoss):
            return NotImplemented
        return (self._reduction, self._log_target) == (other._reduction, other._log_target)

    def __hash__(self) -> int:
        return hash((KLDivLoss, self._reduction, self._log_target))
