"""The from-logits reference on JAX: the core's forward, its backward a ``custom_vjp``.

``jax.grad`` then gives the specified gradients, edge values included, eagerly
and under ``jax.jit``. The row mask travels as a float array of 0s and 1s (a
boolean array has no cotangent); its cotangent is zero.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax

from . import _core_logits
from ._validation import LogitsOperands

__all__: list[str] = []


class _Static(NamedTuple):
    """The hashable options of one logits call."""

    xp: Any
    compute_dtype: Any
    temperature: float
    factor: float
    reduction: str
    axis: int
    direction: str
    beta: float | None = None


def _options(static: _Static) -> dict[str, Any]:
    return {
        "temperature": static.temperature,
        "factor": static.factor,
        "reduction": static.reduction,
        "axis": static.axis,
        "direction": static.direction,
        "xp": static.xp,
        "beta": static.beta,
    }


def _bool_mask(m: Any) -> Any:
    return None if m is None else m != 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _from_logits(x: Any, t: Any, m: Any, static: _Static) -> Any:
    xp, dt = static.xp, static.compute_dtype
    out = _core_logits.from_logits(
        xp.astype(x, dt), xp.astype(t, dt), mask=_bool_mask(m), **_options(static)
    )
    return xp.astype(out, xp.result_type(x.dtype, t.dtype))


def _forward(x: Any, t: Any, m: Any, static: _Static) -> Any:
    return _from_logits(x, t, m, static), (x, t, m)


def _backward(static: _Static, saved: Any, g: Any) -> Any:
    x, t, m = saved
    xp, dt = static.xp, static.compute_dtype
    gs, gt = _core_logits.from_logits_backward(
        xp.astype(g, dt),
        xp.astype(x, dt),
        xp.astype(t, dt),
        mask=_bool_mask(m),
        target_grad=True,
        **_options(static),
    )
    gm = None if m is None else xp.zeros_like(m)
    return xp.astype(gs, x.dtype), xp.astype(gt, t.dtype), gm


_from_logits.defvjp(_forward, _backward)


def mask_and_static(ops: LogitsOperands, /) -> tuple[Any, _Static]:
    """Return the row mask in the compute dtype (or None) and the call's static options."""
    kept = ops.kept_mask()
    m = None if kept is None else ops.xp.astype(kept, ops.compute_dtype)
    static = _Static(
        ops.xp,
        ops.compute_dtype,
        ops.temperature,
        ops.factor,
        ops.reduction,
        ops.axis,
        ops.direction,
        ops.beta,
    )
    return m, static


def from_logits_with_gradient(ops: LogitsOperands, /) -> Any:
    """Evaluate the reference on JAX arrays with the analytic gradients attached."""
    m, static = mask_and_static(ops)
    return _from_logits(ops.input, ops.target, m, static)
