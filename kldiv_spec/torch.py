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

from . import _dispatch
from ._torch_hidden import KLDivFromHiddenLoss, kl_div_from_hidden, kl_div_from_hidden_sharded
from ._torch_logits import KLDivFromLogitsLoss, kl_div_from_logits
from ._torch_loss import KLDivLoss, kl_div

__all__ = [
    "KLDivFromHiddenLoss",
    "KLDivFromLogitsLoss",
    "KLDivLoss",
    "kl_div",
    "kl_div_from_hidden",
    "kl_div_from_hidden_sharded",
    "kl_div_from_logits",
]

# PyTorch is imported: its fast path's front and compiler hooks are registered now, so
# that the first call on a tensor needs no import (which torch.compile could not trace).
_dispatch.load("torch")
