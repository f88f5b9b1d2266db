r"""Group ``gradients``: derivatives w.r.t. input and target.

On autograd backends (PyTorch, JAX) gradients are taken through the backend's
autograd; elsewhere through the implementation's ``backward`` (for the
reference, ``kldiv_spec.kl_div_backward``); without either the group is n/a.
They are compared with the analytic formulas of PyTorch's edge-value table
(:func:`.oracle.gradients`, NaN target gradient where ``t <= 0`` included) and
with central finite differences of the forward; double backward is checked
with ``torch.autograd.gradgradcheck``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from .assertions import assert_gradients
from .context import Context, fmt
from .oracle import gradients as exact_gradients
from .properties import NotApplicable, register
from .strategies import (
    FLOATS,
    Case,
    broadcast_cases,
    distributions,
    divisor_cases,
    edge_cases,
    edge_pairs,
)

__all__ = ["gradients_available", "take_gradients"]


def gradients_available(ctx: Context) -> bool:
    """Whether gradients can be taken: the backend's autograd, or the implementation's backward."""
    return _applies(ctx) is None


def _applies(ctx: Context) -> str | None:
    if ctx.backend.autograd and ctx.impl.differentiable:
        return None
    if ctx.impl.backward is not None:
        return None
    return f"{ctx.impl.name} has no backward and {ctx.backend.name} has no autograd"


def _grad_output(case: Case) -> Any:
    if case.reduction == "none":
        shape = np.broadcast_shapes(case.input.shape, case.target.shape)
        dtype = np.result_type(case.input.dtype, case.target.dtype)
        return (0.5 + (np.arange(int(np.prod(shape))) % 3)).reshape(shape).astype(dtype)
    return 0.75


def take_gradients(ctx: Context, case: Case, g: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return the implementation's ``(grad_input, grad_target)`` for upstream gradient ``g``.

    Through autograd the forward result's dtype is kept in ``ctx.result_dtype``:
    a float32 loss of float64 operands has float64 gradients computed in
    float32, judged at float32's bound (:func:`at_result_precision`).
    """
    ctx.record(case, "gradient", grad=g)
    ctx.result_dtype = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the 'mean' warning
        return _take_gradients(ctx, case, g)


def _take_gradients(ctx: Context, case: Case, g: Any) -> tuple[np.ndarray, np.ndarray]:
    be, impl = ctx.backend, ctx.impl
    kw = {"reduction": case.reduction, "log_target": case.log_target}
    if be.autograd == "torch" and impl.differentiable:
        import torch

        x = be.asarray(case.input).requires_grad_(True)
        t = be.asarray(case.target).requires_grad_(True)
        out = impl.fn(x, t, **kw)
        _note_result(ctx, out)
        if not getattr(out, "requires_grad", False):
            msg = "the result does not require grad: autograd cannot differentiate it"
            raise AssertionError(msg)
        gout = torch.as_tensor(np.asarray(g), dtype=out.dtype, device=out.device)
        gout = gout.expand(out.shape)
        gx, gt = torch.autograd.grad(out, (x, t), gout, allow_unused=True)
        if gx is None or gt is None:
            msg = f"no gradient w.r.t. {'input' if gx is None else 'target'}"
            raise AssertionError(msg)
        return gx.detach().cpu().numpy(), gt.detach().cpu().numpy()
    if be.autograd == "jax" and impl.differentiable:
        import jax
        import jax.numpy as jnp

        out, vjp = jax.vjp(
            lambda a, b: impl.fn(a, b, **kw), be.asarray(case.input), be.asarray(case.target)
        )
        _note_result(ctx, out)
        gx, gt = vjp(jnp.broadcast_to(jnp.asarray(g, dtype=out.dtype), out.shape))
        return np.asarray(gx), np.asarray(gt)
    if impl.backward is None:
        raise NotApplicable(_applies(ctx) or "no gradients")
    gb = g if isinstance(g, float) else be.asarray(np.asarray(g))
    gx, gt = impl.backward(gb, be.asarray(case.input), be.asarray(case.target), **kw)
    for name, grad, arg in (("input", gx, case.input), ("target", gt, case.target)):
        if not be.is_array(grad):
            msg = f"the gradient w.r.t. {name} is a {type(grad).__name__}, not a {be.name} array"
            raise AssertionError(msg)
        if grad.dtype != getattr(be.xp, arg.dtype.name):
            msg = f"the gradient w.r.t. {name} is {grad.dtype}, its argument {arg.dtype}"
            raise AssertionError(msg)
    return be.to_numpy(gx), be.to_numpy(gt)


def _note_result(ctx: Context, out: Any) -> None:
    """Keep the floating dtype of the forward result ``out`` in ``ctx.result_dtype``."""
    name = str(getattr(out, "dtype", "")).replace("torch.", "")
    try:
        dtype = np.dtype(name)
    except TypeError:  # bfloat16 and other names NumPy does not know
        dtype = None
    ctx.result_dtype = dtype if dtype is not None and dtype.kind == "f" else None


def at_result_precision(ctx: Context, want: Any, dtype: Any, /) -> Any:
    """Return the oracle's ``((value, bound), ...)`` with bounds at the result's precision.

    Where the forward result (or a declared ``compute_dtype``) is less precise
    than the operands' ``dtype``, each bound grows by the ratio of the two
    epsilons, with that precision's floor: the values are judged at the
    precision the implementation computes in.
    """
    dtype = np.dtype(dtype)
    judged = ctx.precision(dtype)
    if judged.itemsize >= dtype.itemsize:
        return want
    ratio = float(np.finfo(judged).eps / np.finfo(dtype).eps)
    floor = float(np.finfo(judged).smallest_subnormal)
    return tuple((value, np.maximum(np.asarray(tol) * ratio, floor)) for value, tol in want)


def _cases(ctx: Context) -> Any:
    kw = {"log_targets": ctx.log_targets, "reductions": ctx.reductions}
    return st.one_of(distributions(**kw), broadcast_cases(**kw), edge_cases(**kw))


def _compare(ctx: Context, case: Case, which: int) -> None:
    for reduction in ctx.reductions:
        _compare_one(ctx, Case(case.input, case.target, reduction, case.log_target), which)


def _compare_one(ctx: Context, case: Case, which: int) -> None:
    g = _grad_output(case)
    got = take_gradients(ctx, case, g)
    want = exact_gradients(
        g,
        case.input,
        case.target,
        reduction=case.reduction,
        log_target=case.log_target,
        flush=not ctx.backend.subnormals,
    )
    want = at_result_precision(ctx, want, np.result_type(case.input, case.target))
    assert_gradients(got, want, which=(which,))


@register(
    "gradients.input",
    "d/d input = -g t / D (log_target: -g e^t / D), summed back over broadcast axes",
    strategy=_cases,
    applies=_applies,
)
def _grad_input(ctx: Context, case: Case) -> None:
    _compare(ctx, case, 0)


@register(
    "gradients.target",
    "d/d target = g (log t + 1 - x) / D, NaN where t <= 0 (log_target: g e^t (t - x + 1) / D)",
    strategy=_cases,
    applies=_applies,
)
def _grad_target(ctx: Context, case: Case) -> None:
    _compare(ctx, case, 1)


def _compare_both(ctx: Context, case: Case) -> None:
    """Compare both gradients of ``case`` with the oracle: dtype, shape, NaN/inf, bound."""
    g = _grad_output(case)
    got = take_gradients(ctx, case, g)
    want = exact_gradients(
        g,
        case.input,
        case.target,
        reduction=case.reduction,
        log_target=case.log_target,
        flush=not ctx.backend.subnormals,
    )
    what = f"reduction={case.reduction!r}, log_target={case.log_target}"
    want = at_result_precision(ctx, want, np.result_type(case.input, case.target))
    assert_gradients(got, want, dtypes=(case.input.dtype, case.target.dtype), what=what)


def _edge_grid(ctx: Context) -> list[Case]:
    """Return the edge-value grid in both dtypes: one 'none' call, then each reduction.

    For the reductions the grid is laid out as 2 rows, so that 'sum' (1),
    'batchmean' (2) and 'mean' (numel) have different divisors; a gradient's
    NaN stays in its own element, so one call checks every row.
    """
    cases = []
    for log_target in ctx.log_targets:
        pairs = edge_pairs(log_target)
        pairs += pairs[: len(pairs) % 2]
        for dtype in FLOATS:
            x = np.array([p[0] for p in pairs], dtype=dtype)
            t = np.array([p[1] for p in pairs], dtype=dtype)
            for reduction in ctx.reductions:
                if reduction == "none":
                    cases.append(Case(x, t, "none", log_target))
                else:
                    cases.append(Case(x.reshape(2, -1), t.reshape(2, -1), reduction, log_target))
    return cases


@register(
    "gradients.edge_values",
    "both gradients on every row of the edge-value table (docs/gradients.md), every "
    "reduction, both log_target, float32 and float64",
    cases=_edge_grid,
    applies=_applies,
)
def _grad_edge_values(ctx: Context, case: Case) -> None:
    _compare_both(ctx, case)


def _tiny_target_cases(ctx: Context) -> list[Case]:
    r"""Targets at and just above the smallest normal number, float32 and float64.

    ``g / D`` times such a target is subnormal (g = 0.75, and 0.5 to 2.5 for
    'none'), so a backward that forms ``g * t`` (the product rule through ``log t``'s
    backward, ``(g t) / t``) on a machine that flushes subnormals to zero (XLA's
    CPU) loses the ``+ 1`` of :math:`\partial_t\, t \log t`. The exact gradient is
    ``g (log t + 1 - x) / D``, as PyTorch's kl_div gives it.
    """
    if False not in ctx.log_targets:
        raise NotApplicable(f"{ctx.impl.name} takes log-targets only")
    cases = []
    for dtype in FLOATS:
        tiny = float(np.finfo(dtype).smallest_normal)
        t = np.asarray([[tiny, 1.25 * tiny], [3.0 * tiny, 0.5]], dtype)
        x = np.asarray([[-0.6931471805599453, -1.0986122886681098], [-0.25, -0.6931471805599453]])
        for reduction in ctx.reductions:
            cases.append(Case(x.astype(dtype), t, reduction, False))
    return cases


@register(
    "gradients.tiny_targets",
    "both gradients where g t / D is subnormal (targets at the smallest normal number, "
    "float32 and float64): d/d target keeps the + 1 of d(t log t)/dt",
    cases=_tiny_target_cases,
    applies=_applies,
)
def _grad_tiny_targets(ctx: Context, case: Case) -> None:
    _compare_both(ctx, case)


@register(
    "gradients.broadcast_divisors",
    "both gradients on the fixed broadcasts of semantics.broadcast_divisors: divided by "
    "input.shape[0] for batchmean, summed back over broadcast axes",
    cases=lambda ctx: divisor_cases(
        log_targets=ctx.log_targets, reductions=ctx.some("sum", "batchmean", "mean")
    ),
    applies=_applies,
)
def _grad_broadcast_divisors(ctx: Context, case: Case) -> None:
    _compare_both(ctx, case)


@st.composite
def _smooth(draw: Any, ctx: Context) -> Case:
    n = draw(st.integers(1, 4))
    log_target = draw(st.sampled_from(list(ctx.log_targets)))
    x = draw(hnp.arrays(np.float64, (2, n), elements=st.floats(-4, 1)))
    lo, hi = (-3.0, 1.0) if log_target else (0.05, 2.0)
    t = draw(hnp.arrays(np.float64, (2, n), elements=st.floats(lo, hi)))
    return Case(x, t, draw(st.sampled_from(list(ctx.reductions))), log_target)


@register(
    "gradients.finite_differences",
    "both gradients agree with central finite differences of the forward (float64)",
    strategy=lambda ctx: _smooth(ctx),
    applies=_applies,
    examples_scale=0.5,
)
def _finite_differences(ctx: Context, case: Case) -> None:
    g = _grad_output(case)
    got = take_gradients(ctx, case, g)
    weights = np.asarray(g, dtype=np.float64)

    def loss(x: np.ndarray, t: np.ndarray) -> float:
        out = ctx.value(Case(x, t, case.reduction, case.log_target))
        return float(np.sum(out * weights))

    # Judged at the forward's precision: a float32 result of float64 operands has
    # differences of float32 values, so a larger step and a looser tolerance.
    loss(case.input, case.target)
    low = ctx.precision(np.float64).itemsize < 8
    step, rtol, atol = (1e-3, 1e-2, 1e-2) if low else (1e-6, 1e-5, 1e-6)
    for which, name in ((0, "input"), (1, "target")):
        base = [case.input, case.target]
        fd = np.zeros(base[which].shape)
        for idx in np.ndindex(base[which].shape):
            h = step * max(1.0, abs(float(base[which][idx])))
            plus, minus = base[which].copy(), base[which].copy()
            plus[idx] += h
            minus[idx] -= h
            args_p, args_m = list(base), list(base)
            args_p[which], args_m[which] = plus, minus
            fd[idx] = (loss(*args_p) - loss(*args_m)) / (2 * h)
        if not np.allclose(got[which], fd, rtol=rtol, atol=atol):
            ctx.record(case, "gradient", grad=g)
            msg = (
                f"gradient w.r.t. {name} {fmt(got[which])} disagrees with finite "
                f"differences {fmt(fd)}"
            )
            raise AssertionError(msg)


def _torch_only(ctx: Context) -> str | None:
    if ctx.backend.autograd != "torch" or not ctx.impl.differentiable:
        return "double backward is checked on the torch backend only"
    return None


@register(
    "gradients.double_backward",
    "second derivatives through torch autograd pass torch.autograd.gradgradcheck",
    strategy=lambda ctx: _smooth(ctx),
    applies=_torch_only,
    examples_scale=0.3,
)
def _double_backward(ctx: Context, case: Case) -> None:
    import torch

    ctx.record(case, "double_backward")
    x = ctx.asarray(case.input).requires_grad_(True)
    t = ctx.asarray(case.target).requires_grad_(True)

    def f(a: Any, b: Any) -> Any:
        return ctx.impl.fn(a, b, reduction=case.reduction, log_target=case.log_target)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the 'mean' warning
            # raise_exception=True: a failure raises, it never returns False.
            torch.autograd.gradgradcheck(f, (x, t), raise_exception=True)
    except Exception as exc:
        msg = (
            f"gradgradcheck failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        )
        raise AssertionError(msg) from exc
