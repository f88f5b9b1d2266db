"""The reference evaluation of ``kl_div``: the core, in the operands' common dtype.

On autograd libraries the dispatcher pairs the core's forward with its analytic
backward (:func:`kldiv_spec._core.kl_div_backward`) instead: ``_autodiff_torch`` and
``_autodiff_jax``, so gradients are the specified ones, edge values included, rather
than whatever autograd derives from the forward's ``where`` masks.
"""

from __future__ import annotations

from typing import Any

from . import _core
from ._floating_point import quiet
from ._validation import Operands

__all__: list[str] = []


def common_dtype(ops: Operands, /) -> tuple[Any, Any]:
    """Return input and target cast (without copying when possible) to the common dtype."""
    xp = ops.xp
    return (
        xp.astype(ops.input, ops.dtype, copy=False),
        xp.astype(ops.target, ops.dtype, copy=False),
    )


def forward(ops: Operands, /) -> Any:
    """Evaluate the reduced loss with the core."""
    xp = ops.xp
    x, t = common_dtype(ops)
    with quiet(xp):
        return _core.kl_div(x, t, reduction=ops.reduction, log_target=ops.log_target, xp=xp)


def backward(grad_output: Any, ops: Operands, /) -> tuple[Any, Any]:
    """Evaluate both gradients with the core, each in its own argument's dtype."""
    xp = ops.xp
    x, t = common_dtype(ops)
    g = xp.astype(grad_output, ops.dtype, copy=False)
    with quiet(xp):
        grad_x, grad_t = _core.kl_div_backward(
            g,
            x,
            t,
            reduction=ops.reduction,
            log_target=ops.log_target,
            output_shape=ops.output_shape,
            xp=xp,
        )
        # Casting down (float32 -> float16) overflows silently to inf, as in PyTorch.
        return (
            xp.astype(grad_x, ops.input.dtype, copy=False),
            xp.astype(grad_t, ops.target.dtype, copy=False),
        )
