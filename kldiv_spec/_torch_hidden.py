"""PyTorch front end of the distillation loss from hidden states: the function and a module.

Re-exported by :mod:`kldiv_spec.torch`. Both evaluate
:func:`kldiv_spec.kl_div_from_hidden`: on CPU tensors, and on CUDA where Triton is
installed, the chunked operator of :mod:`kldiv_spec.backends.hidden_torch` (eager and
under ``torch.compile(fullgraph=True)``), else the reference, which materialises the
logits.

Examples
--------
>>> import torch
>>> import kldiv_spec.torch as kt
>>> _ = torch.manual_seed(0)
>>> student, teacher = torch.nn.Linear(8, 50), torch.nn.Linear(16, 50)
>>> criterion = kt.KLDivFromHiddenLoss(temperature=2.0, reduction="rowmean")
>>> h_s, h_t = torch.randn(4, 6, 8, requires_grad=True), torch.randn(4, 6, 16)
>>> loss = criterion(h_s, student.weight, h_t, teacher.weight,
...                  student_bias=student.bias, teacher_bias=teacher.bias)
>>> loss.backward()
>>> student.weight.grad.shape, teacher.weight.grad is None
(torch.Size([50, 8]), True)
"""

from __future__ import annotations

from typing import Any

import torch

from . import _dispatch
from ._hidden import kl_div_from_hidden as _kl_div_from_hidden
from ._validation import (
    DIRECTIONS,
    LOGITS_REDUCTIONS,
    check_beta_direction,
    check_bool,
    check_choice,
    check_memory_budget,
    check_temperature,
    hidden_operands,
)

__all__ = ["KLDivFromHiddenLoss", "kl_div_from_hidden", "kl_div_from_hidden_sharded"]


def kl_div_from_hidden(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    direction: str = "forward",
    scale_by_temperature_squared: bool = True,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    beta: float | None = None,
    memory_budget: int | None = None,
) -> torch.Tensor:
    """Distillation loss from hidden states and ``(V, H)`` output weights (``nn.Linear``'s).

    By definition ``kl_div_from_logits(h_s @ W_s.T + b_s, h_t @ W_t.T + b_t, ...)``,
    computed (CPU, CUDA) in chunks of rows that never hold the logits; the teacher
    may come as ``teacher_logits=`` instead. Gradients reach the student's hidden
    states, weight and bias, never the teacher. See
    :func:`kldiv_spec.kl_div_from_hidden` for every option and ``docs/hidden.md``
    for the chunk rule (``memory_budget``).
    """
    return _kl_div_from_hidden(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        teacher_logits=teacher_logits,
        temperature=temperature,
        reduction=reduction,
        direction=direction,
        scale_by_temperature_squared=scale_by_temperature_squared,
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
        beta=beta,
        memory_budget=memory_budget,
    )


def kl_div_from_hidden_sharded(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    *,
    group: Any = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    direction: str = "forward",
    scale_by_temperature_squared: bool = True,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    memory_budget: int | None = None,
) -> torch.Tensor:
    """:func:`kl_div_from_hidden` with the output layers sharded over the classes.

    Called on every rank of the ``torch.distributed`` process group ``group`` (None:
    the default group) with the same hidden states and this rank's rows of the
    weights (``W[V_r]``, ``(V_r, H)``), biases and, if given, teacher logits
    (``(..., V_r)``): the same classes for both models. Every rank returns the loss of
    the full vocabulary and gets the gradients of its slices (the hidden states'
    summed over the ranks). The row statistics are combined by all-reduces, so no
    rank holds a full row of logits (``kldiv_spec.backends.hidden_sharded``). The KL
    reductions only (no ``beta``, no ``'none'``).
    """
    from .backends.hidden_sharded import from_hidden_sharded

    ops = hidden_operands(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        teacher_logits=teacher_logits,
        temperature=temperature,
        reduction=reduction,
        direction=direction,
        scale_by_temperature_squared=scale_by_temperature_squared,
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
        beta=None,
        memory_budget=memory_budget,
    )
    return from_hidden_sharded(ops, group)


class KLDivFromHiddenLoss(torch.nn.Module):
    """The distillation loss from hidden states as a module, for a training loop.

    ``criterion(student_hidden, student_weight, teacher_hidden, teacher_weight,
    student_bias=None, teacher_bias=None, teacher_logits=None, mask=None, labels=None)``;
    the options are those of :func:`kl_div_from_hidden`, validated at construction.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        direction: str = "forward",
        scale_by_temperature_squared: bool = True,
        ignore_index: int = -100,
        beta: float | None = None,
        memory_budget: int | None = None,
    ) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.reduction = check_choice(reduction, "reduction", LOGITS_REDUCTIONS)
        self.direction = check_choice(direction, "direction", DIRECTIONS)
        self.scale_by_temperature_squared = check_bool(
            scale_by_temperature_squared, "scale_by_temperature_squared"
        )
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            msg = f"ignore_index must be an int, got {type(ignore_index).__qualname__}"
            raise TypeError(msg)
        self.ignore_index = ignore_index
        self.beta = check_beta_direction(beta, self.direction)
        self.memory_budget = check_memory_budget(memory_budget)

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor | None = None,
        teacher_weight: torch.Tensor | None = None,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the loss (see :func:`kl_div_from_hidden`)."""
        return kl_div_from_hidden(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            teacher_logits=teacher_logits,
            temperature=self.temperature,
            reduction=self.reduction,
            direction=self.direction,
            scale_by_temperature_squared=self.scale_by_temperature_squared,
            mask=mask,
            labels=labels,
            ignore_index=self.ignore_index,
            beta=self.beta,
            memory_budget=self.memory_budget,
        )

    def extra_repr(self) -> str:
        """Return the options shown in the module's repr."""
        text = (
            f"temperature={self.temperature}, reduction={self.reduction!r}, "
            f"direction={self.direction!r}, "
            f"scale_by_temperature_squared={self.scale_by_temperature_squared}"
        )
        if self.beta is not None:
            text += f", beta={self.beta}"
        if self.memory_budget is not None:
            text += f", memory_budget={self.memory_budget}"
        return text


# torch.compile records a call of the entry point as one node (no graph break in the
# package's Python); the traced call reaches the chunked operator through its fake kernel.
_dispatch.register_entry_point(kl_div_from_hidden)
