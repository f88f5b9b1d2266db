"""PyTorch front end: a drop-in ``torch.nn.Module`` and functional with kldiv-spec's evaluation.

``kldiv_spec.torch.KLDivLoss`` and ``kldiv_spec.torch.kl_div`` take exactly
the arguments of ``torch.nn.KLDivLoss`` and ``torch.nn.functional.kl_div``
(legacy ``size_average`` / ``reduce`` included), give PyTorch's values, and
carry the specified analytic gradients through autograd (double backward
included). Importing this module imports torch.

Examples
--------
>>> import torch
>>> import kldiv_spec.torch as kt
>>> criterion = kt.KLDivLoss(reduction="batchmean")
>>> log_q = torch.log_softmax(torch.tensor([[1.0, 2.0], [0.5, 0.5]]), dim=1).requires_grad_()
>>> p = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
>>> loss = criterion(log_q, p)
>>> loss.backward()
>>> log_q.grad
tensor([[-0.2500, -0.2500],
        [-0.1000, -0.4000]])
"""

from __future__ import annotations

import warnings

import torch

from ._functional import forward as _forward
from ._loss import LEGACY_WARNING
from ._validation import check_log_target, check_reduction, legacy_reduction
from .backends import torch as _backend  # noqa: F401  (registers the tensor front)

__all__ = ["KLDivLoss", "kl_div"]


def kl_div(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    log_target: bool = False,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.kl_div``; see :func:`kldiv_spec.kl_div`.

    The legacy ``size_average`` / ``reduce`` flags override ``reduction`` as in
    PyTorch, with a DeprecationWarning (and no ``'mean'`` warning).
    """
    if size_average is not None or reduce is not None:
        reduction = legacy_reduction(size_average, reduce)
        warnings.warn(LEGACY_WARNING.format(reduction), DeprecationWarning, stacklevel=2)
        return _forward(
            input,
            target,
            reduction=reduction,
            log_target=log_target,
            stacklevel=3,
            warn_mean=False,
        )
    return _forward(input, target, reduction=reduction, log_target=log_target, stacklevel=3)


class KLDivLoss(torch.nn.Module):
    """Drop-in for ``torch.nn.KLDivLoss``, evaluated by :func:`kldiv_spec.kl_div`.

    Parameters are those of ``torch.nn.KLDivLoss``; ``reduction`` is validated
    at construction (PyTorch waits for the first call).
    """

    def __init__(
        self,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        log_target: bool = False,
    ) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = legacy_reduction(size_average, reduce)
            warnings.warn(LEGACY_WARNING.format(reduction), DeprecationWarning, stacklevel=2)
        self.reduction = check_reduction(reduction)
        self.log_target = check_log_target(log_target)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the loss; see :func:`kldiv_spec.kl_div`."""
        return _forward(
            input, target, reduction=self.reduction, log_target=self.log_target, stacklevel=5
        )

    def extra_repr(self) -> str:
        """Return the options shown in the module's repr."""
        return f"reduction={self.reduction!r}, log_target={self.log_target}"


# The distillation loss from logits (kldiv_spec._torch_logits).
from ._torch_logits import KLDivFromLogitsLoss, kl_div_from_logits  # noqa: E402

__all__ += ["KLDivFromLogitsLoss", "kl_div_from_logits"]
