"""PyTorch front end of the distillation loss: ``kl_div_from_logits`` with ``dim``, and a module.

Re-exported by :mod:`kldiv_spec.torch`. Both evaluate
:func:`kldiv_spec.kl_div_from_logits` (the fused CPU fast path where it
applies, else the reference), with its analytic gradients through autograd.

Examples
--------
>>> import torch
>>> import kldiv_spec.torch as kt
>>> criterion = kt.KLDivFromLogitsLoss(temperature=2.0)
>>> student = torch.tensor([[2.0, 1.0, 0.1], [0.5, 0.5, 3.0]], requires_grad=True)
>>> teacher = torch.tensor([[1.5, 1.0, 0.5], [0.1, 0.2, 2.5]])
>>> loss = criterion(student, teacher)
>>> loss.backward()
>>> round(loss.item(), 5)
0.03454
"""

from __future__ import annotations

import torch

from ._logits import kl_div_from_logits as _kl_div_from_logits
from ._validation import (
    DIRECTIONS,
    LOGITS_REDUCTIONS,
    check_beta_direction,
    check_bool,
    check_choice,
    check_temperature,
)

__all__ = ["KLDivFromLogitsLoss", "kl_div_from_logits"]


def kl_div_from_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    dim: int = -1,
    direction: str = "forward",
    scale_by_temperature_squared: bool = True,
    mask: torch.Tensor | None = None,
    beta: float | None = None,
) -> torch.Tensor:
    """Distillation loss from student (``input``) and teacher (``target``) logits.

    ``T**2 * F.kl_div(F.log_softmax(input / T, dim), F.softmax(target / T, dim),
    reduction=reduction)`` by default; ``dim`` is the class dimension. See
    :func:`kldiv_spec.kl_div_from_logits` for every option (``direction``,
    ``mask``, ``'rowmean'``, ``beta`` for the generalised Jensen-Shannon
    divergence, edge values).
    """
    return _kl_div_from_logits(
        input,
        target,
        temperature=temperature,
        reduction=reduction,
        axis=dim,
        direction=direction,
        scale_by_temperature_squared=scale_by_temperature_squared,
        mask=mask,
        beta=beta,
    )


class KLDivFromLogitsLoss(torch.nn.Module):
    """The distillation loss as a module: ``criterion(student_logits, teacher_logits, mask=None)``.

    Parameters are those of :func:`kl_div_from_logits` (``dim`` the class
    dimension, ``beta`` the generalised Jensen-Shannon divergence's weight),
    validated at construction.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        dim: int = -1,
        direction: str = "forward",
        scale_by_temperature_squared: bool = True,
        beta: float | None = None,
    ) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.reduction = check_choice(reduction, "reduction", LOGITS_REDUCTIONS)
        if isinstance(dim, bool) or not isinstance(dim, int):
            msg = f"dim must be an int, got {type(dim).__qualname__}"
            raise TypeError(msg)
        self.dim = dim
        self.direction = check_choice(direction, "direction", DIRECTIONS)
        self.scale_by_temperature_squared = check_bool(
            scale_by_temperature_squared, "scale_by_temperature_squared"
        )
        self.beta = check_beta_direction(beta, self.direction)

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the loss; ``mask`` (rows' shape, True keeps a row) is optional."""
        return kl_div_from_logits(
            input,
            target,
            temperature=self.temperature,
            reduction=self.reduction,
            dim=self.dim,
            direction=self.direction,
            scale_by_temperature_squared=self.scale_by_temperature_squared,
            mask=mask,
            beta=self.beta,
        )

    def extra_repr(self) -> str:
        """Return the options shown in the module's repr."""
        text = (
            f"temperature={self.temperature}, reduction={self.reduction!r}, dim={self.dim}, "
            f"direction={self.direction!r}, "
            f"scale_by_temperature_squared={self.scale_by_temperature_squared}"
        )
        return text if self.beta is None else f"{text}, beta={self.beta}"
