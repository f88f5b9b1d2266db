"""The Gaussian KL's reference on PyTorch: the core's forward with its analytic backward.

A :class:`torch.autograd.Function` in the ``setup_context`` style, like
:mod:`kldiv_spec._autodiff_torch`: ``loss.backward()``, ``torch.autograd.grad`` and
double backward give the specified gradients of all four parameters.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _core_gaussian
from ._validation import GaussianOperands

__all__: list[str] = []


class _ReferenceGaussian(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        mu: Any, lv: Any, mu_p: Any, lv_p: Any, ops: GaussianOperands
    ) -> torch.Tensor:
        args = (a.to(ops.dtype) for a in (mu, lv, mu_p, lv_p))
        return _core_gaussian.gaussian_kl(
            *args, reduction=ops.reduction, batch_size=ops.batch_size, xp=ops.xp
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        *arrays, ops = inputs
        ctx.save_for_backward(*arrays)
        ctx.ops = ops

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        ops: GaussianOperands = ctx.ops
        grads = _core_gaussian.gaussian_kl_backward(
            grad,
            *(a.to(ops.dtype) for a in saved),
            reduction=ops.reduction,
            batch_size=ops.batch_size,
            output_shape=ops.output_shape,
            xp=ops.xp,
        )
        out = [
            g.to(a.dtype) if need else None
            for g, a, need in zip(grads, saved, ctx.needs_input_grad, strict=False)
        ]
        return (*out, None)


def gaussian_with_gradient(ops: GaussianOperands, /) -> Any:
    """Evaluate the Gaussian KL on tensors with the analytic gradients attached."""
    return _ReferenceGaussian.apply(ops.mu, ops.logvar, ops.mu_prior, ops.logvar_prior, ops)
