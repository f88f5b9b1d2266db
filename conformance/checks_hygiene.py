"""Group ``hygiene``: the call has no side effects and no surprises.

Inputs are never modified, read-only inputs work, the result stays on the
input's device (checked where the library has a non-default device to put the
inputs on, n/a elsewhere), and NaN/inf are produced silently (as in PyTorch).
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from .context import Context
from .properties import register
from .strategies import Case, broadcast_cases, distributions, edge_cases

__all__: list[str] = []


def _any_case(ctx: Context) -> st.SearchStrategy[Case]:
    kw = {"log_targets": ctx.log_targets, "reductions": ctx.reductions}
    return st.one_of(distributions(**kw), broadcast_cases(**kw), edge_cases(**kw))


@register(
    "hygiene.inputs_unmodified",
    "the forward (and backward) leave input and target unchanged",
    strategy=_any_case,
)
def _unmodified(ctx: Context, case: Case) -> None:
    be = ctx.backend
    x, t = be.asarray(case.input), be.asarray(case.target)
    ctx.call(case, input=x, target=t)
    if ctx.impl.backward is not None and not be.autograd:
        g = (
            1.0
            if case.reduction != "none"
            else be.asarray(
                np.ones(np.broadcast_shapes(case.input.shape, case.target.shape), case.input.dtype)
            )
        )
        ctx.impl.backward(g, x, t, reduction=case.reduction, log_target=case.log_target)
    for name, arr, orig in (("input", x, case.input), ("target", t, case.target)):
        now = be.to_numpy(arr)
        if not np.array_equal(now, orig, equal_nan=True):
            msg = f"the call modified its {name}"
            raise AssertionError(msg)


def _readonly_applies(ctx: Context) -> str | None:
    return None if ctx.backend.readonly else f"{ctx.backend.name} arrays cannot be read-only"


@register(
    "hygiene.readonly_inputs",
    "read-only NumPy inputs work (and give the same result)",
    strategy=_any_case,
    applies=_readonly_applies,
)
def _readonly(ctx: Context, case: Case) -> None:
    x, t = case.input.copy(), case.target.copy()
    x.flags.writeable = False
    t.flags.writeable = False
    want = ctx.value(case)
    got = ctx.call(case, input=x, target=t, kind="readonly").value
    if not np.array_equal(got, want, equal_nan=True):
        msg = "read-only inputs gave a different result"
        raise AssertionError(msg)
    if ctx.impl.backward is not None and not ctx.backend.autograd:
        g = (
            1.0
            if case.reduction != "none"
            else np.ones(np.broadcast_shapes(x.shape, t.shape), x.dtype)
        )
        ctx.impl.backward(g, x, t, reduction=case.reduction, log_target=case.log_target)


def _device_applies(ctx: Context) -> str | None:
    if ctx.backend.non_default_device:
        return None
    return f"{ctx.backend.name} arrays live on one device: there is no other to stay on"


@register(
    "hygiene.device",
    "inputs on a non-default device (array-api-strict's device1, CUDA) give a result there",
    strategy=_any_case,
    applies=_device_applies,
)
def _device(ctx: Context, case: Case) -> None:
    be = ctx.backend
    x, t = (be.to_other_device(be.asarray(a)) for a in (case.input, case.target))
    out = ctx.call(case, input=x, target=t, kind="device").result
    if not be.is_array(out):
        msg = f"the result is a {type(out).__name__}, not a {be.name} array"
        raise AssertionError(msg)
    want, got = be.device(x), be.device(out)
    if got != want:
        msg = f"the result is on {got}, the input on {want}"
        raise AssertionError(msg)


@register(
    "hygiene.silent",
    "NaN/inf inputs raise no RuntimeWarning (PyTorch computes them silently)",
    strategy=lambda ctx: edge_cases(
        log_targets=ctx.log_targets,
        reductions=tuple(r for r in ctx.reductions if r != "mean") or ctx.reductions,
    ),
    level="SHOULD",
)
def _silent(ctx: Context, case: Case) -> None:
    call = ctx.call(case, kind="warning")
    noisy = [w for w in call.warnings if not issubclass(w.category, UserWarning)]
    if noisy:
        msg = f"the call warned: {noisy[0].category.__name__}: {noisy[0].message}"
        raise AssertionError(msg)
