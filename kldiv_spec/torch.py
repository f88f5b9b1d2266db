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

from ._torch_logits import KLDivFromLogitsLoss, kl_div_from_logits
from ._torch_loss import KLDivLoss, kl_div
from .backends import torch as _backend  # noqa: F401  (registers the tensor front)

__all__ = ["KLDivFromLogitsLoss", "KLDivLoss", "kl_div", "kl_div_from_logits"]
