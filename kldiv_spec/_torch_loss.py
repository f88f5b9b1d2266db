"""PyTorch drop-ins for ``torch.nn.functional.kl_div`` and ``torch.nn.KLDivLoss``.

Re-exported by :mod:`kldiv_spec.torch` (where they are documented, and whose name they
carry). They live here, in a module no user imports, because ``torch.compile`` traces
``KLDivLoss.forward``, which reads this module's globals: a module the user also holds
(``import kldiv_spec.torch as kt``) would be reached from two places, and Dynamo would
add a Python-level guard, checked on every call of the compiled code, that the two are
the same object.
"""

from __future__ import annotations

import warnings

import torch

from . import _dispatch
from ._functional import forward as _forward
from ._loss import LEGACY_WARNING
from ._validation import check_log_target, check_reduction, legacy_reduction

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


# Their public home (pickles of a module holding the loss, the documentation, reprs).
kl_div.__module__ = KLDivLoss.__module__ = "kldiv_spec.torch"

_dispatch.register_entry_point(kl_div)
