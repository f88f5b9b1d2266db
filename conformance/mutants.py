"""Deliberately broken implementations: tests of the suite itself.

Each mutant differs from PyTorch's ``kl_div`` in one way a user would care
about; a strong suite rejects every one of them (see ``tests/test_mutants.py``).
All but two run on NumPy and are built from :mod:`.numpy_impl` with one change;
``result_on_default_device`` runs on array-api-strict (the one CPU library with
a second device) and is ``kldiv_spec.kl_div`` with its result moved, and
``once_differentiable`` on PyTorch (double backward is checked there only).

The ``logits_*`` and ``gaussian_*`` mutants have no ``kl_div``: they are a
``from_logits`` (or a ``gaussian``) function only, built from a small NumPy
implementation of ``kl_div_from_logits`` (of ``gaussian_kl``) written here with
one change each, with ``kldiv_spec``'s backward unless the gradient is the bug.
``MUTANTS[name]`` is an :class:`~.implementations.Implementation`; on the
command line: ``kldiv-spec check --impl mutant:NAME``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

import kldiv_spec

from . import hidden_reference, numpy_impl
from .implementations import Implementation

__all__ = ["MUTANTS", "np_from_logits", "np_gaussian"]

Fn = Callable[..., Any]


def _forward(
    *,
    pointwise: Callable[[np.ndarray, np.ndarray, bool], np.ndarray] | None = None,
    divisor: Callable[[str, np.ndarray, np.ndarray, tuple[int, ...]], int] | None = None,
    post: Callable[[np.ndarray], np.ndarray] | None = None,
    pre: Callable[[np.ndarray, np.ndarray], None] | None = None,
    accumulate: Any = None,
) -> Fn:
    """Build a NumPy kl_div with one piece replaced."""

    def fn(input: Any, target: Any, reduction: str = "mean", log_target: bool = False) -> Any:
        if pre is not None:
            pre(input, target)
        x, t = numpy_impl._check(input, target, reduction)
        if reduction == "mean":
            warnings.warn("'mean' is not 'batchmean'", UserWarning, stacklevel=2)
        with np.errstate(all="ignore"):
            if pointwise is not None:
                loss = np.asarray(pointwise(x, t, log_target)).astype(x.dtype)
            else:
                loss = numpy_impl.kl_div(x, t, reduction="none", log_target=log_target)
            if reduction == "none":
                out = loss
            else:
                acc = loss.astype(accumulate) if accumulate is not None else loss
                total = np.asarray(acc.sum(dtype=acc.dtype))
                d = (divisor or _divisor)(reduction, x, t, loss.shape)
                out = np.asarray(total / d).astype(loss.dtype)
            return post(out) if post is not None else out

    return fn


def _divisor(reduction: str, x: np.ndarray, t: np.ndarray, shape: tuple[int, ...]) -> int:
    return numpy_impl._divisor(reduction, x, shape)


def _plain(x: np.ndarray, t: np.ndarray, log_target: bool) -> np.ndarray:
    return numpy_impl.kl_div(x, t, reduction="none", log_target=log_target)


def _mutate(x: Any, t: Any) -> None:
    if isinstance(x, np.ndarray) and x.flags.writeable and x.size:
        np.nan_to_num(x, copy=False, nan=0.0)
        x *= 1.0 + 1e-3


def _no_broadcast(x: Any, t: Any) -> None:
    if np.shape(x) != np.shape(t):
        msg = "input and target must have the same shape"
        raise ValueError(msg)


def _crash_0d(x: Any, t: Any) -> None:
    if np.ndim(x) == 0 or np.ndim(t) == 0:
        msg = "0-d arrays are not supported"
        raise IndexError(msg)


def _crash_empty(x: Any, t: Any) -> None:
    if np.size(x) == 0 or np.size(t) == 0:
        msg = "zero-size array to reduction operation maximum which has no identity"
        raise ValueError(msg)


def _crash_on_mismatch(x: Any, t: Any) -> None:
    try:
        np.broadcast_shapes(np.shape(x), np.shape(t))
    except ValueError:
        # What a helper that returns None for shapes it cannot broadcast leads to.
        msg = "'NoneType' object has no attribute 'ndim'"
        raise AttributeError(msg) from None


def _finfo_first(x: Any, t: Any) -> None:
    for a in (x, t):
        np.finfo(np.asarray(a).dtype)  # ValueError for integers and booleans, not TypeError


def _backward(flip_target: bool = False, no_sum: bool = False) -> Fn:
    def backward(
        g: Any, input: Any, target: Any, reduction: str = "mean", log_target: bool = False
    ) -> Any:
        gx, gt = numpy_impl.kl_div_backward(g, input, target, reduction, log_target)
        if flip_target:
            gt = -gt
        if no_sum:
            shape = np.broadcast_shapes(np.shape(input), np.shape(target))
            with np.errstate(all="ignore"):
                gx = np.broadcast_to(gx, shape) if gx.shape != shape else gx
        return gx, gt

    return backward


def _flushed_product_backward(
    g: Any, input: Any, target: Any, reduction: str = "mean", log_target: bool = False
) -> Any:
    """Return the target gradient as autograd forms ``t * log(t) - t * x``, subnormals flushed.

    ``g (log t - x) + flush(g t) / t``: the product rule through ``log t``'s backward on
    a machine that flushes subnormal results to zero (optax's kl_divergence on XLA's
    CPU), where ``g t`` below the smallest normal number loses the ``+ 1``.
    """
    gx, gt = numpy_impl.kl_div_backward(g, input, target, reduction, log_target)
    if log_target:
        return gx, gt
    x, t = np.asarray(input), np.asarray(target)
    shape = np.broadcast_shapes(x.shape, t.shape)
    if shape != t.shape:
        return gx, gt
    with np.errstate(all="ignore"):
        gd = np.asarray(g, t.dtype) / t.dtype.type(numpy_impl._divisor(reduction, x, shape))
        gt_t = gd * t
        gt_t = np.where(np.abs(gt_t) < np.finfo(t.dtype).smallest_normal, 0, gt_t)
        flushed = gd * (np.log(t) - x) + gt_t / t
        gt = np.where((t > 0) & (t < np.inf), flushed, gt).astype(t.dtype)
    return gx, gt


def _rows_backward(
    g: Any, input: Any, target: Any, reduction: str = "mean", log_target: bool = False
) -> Any:
    """Divide by the broadcast result's rows, not input.shape[0], for 'batchmean'."""
    x = np.asarray(input)
    if reduction == "batchmean" and x.ndim:
        rows = np.broadcast_shapes(x.shape, np.shape(target))[0]
        g = np.asarray(g, dtype=np.float64) * (x.shape[0] / rows) if rows else g
    return numpy_impl.kl_div_backward(g, input, target, reduction, log_target)


def _zero_grad_at_neg_inf(
    g: Any, input: Any, target: Any, reduction: str = "mean", log_target: bool = False
) -> Any:
    gx, gt = numpy_impl.kl_div_backward(g, input, target, reduction, log_target)
    if log_target:
        at = np.broadcast_to(np.asarray(target), gt.shape) == -np.inf
        gt = np.where(at, 0, gt).astype(gt.dtype)
    return gx, gt


def _write_input(x: Any, t: Any) -> None:
    if isinstance(x, np.ndarray):
        np.multiply(x, 1.0, out=x)  # changes no value, but fails on a read-only array


def _once_differentiable(
    input: Any, target: Any, reduction: str = "mean", log_target: bool = False
) -> Any:
    import torch  # the mutant's backend

    kw = {"reduction": reduction, "log_target": log_target}

    class KLDiv(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, t: Any) -> Any:
            ctx.save_for_backward(x, t)
            return torch.nn.functional.kl_div(x, t, **kw)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx: Any, g: Any) -> Any:
            x, t = (a.detach().requires_grad_(True) for a in ctx.saved_tensors)
            with torch.enable_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                out = torch.nn.functional.kl_div(x, t, **kw)
            return torch.autograd.grad(out, (x, t), g)

    return KLDiv.apply(input, target)


def _on_default_device(
    input: Any, target: Any, reduction: str = "mean", log_target: bool = False
) -> Any:
    import array_api_strict  # the mutant's backend

    out = kldiv_spec.kl_div(input, target, reduction=reduction, log_target=log_target)
    return out.to_device(array_api_strict.Device("CPU_DEVICE"))


def _ignore_strides(x: Any, t: Any) -> tuple[Any, Any]:
    return tuple(a.ravel(order="K").reshape(a.shape) for a in (np.asarray(x), np.asarray(t)))


def _strides_ignored(
    input: Any, target: Any, reduction: str = "mean", log_target: bool = False
) -> Any:
    x, t = _ignore_strides(input, target)
    return numpy_impl.kl_div(x, t, reduction=reduction, log_target=log_target)


def _zero_grad_at_zero(
    g: Any, input: Any, target: Any, reduction: str = "mean", log_target: bool = False
) -> Any:
    gx, gt = numpy_impl.kl_div_backward(g, input, target, reduction, log_target)
    if not log_target:
        gt = np.where(np.broadcast_to(np.asarray(target), gt.shape) == 0, 0, gt).astype(gt.dtype)
    return gx, gt


def _clamped(x: np.ndarray, t: np.ndarray, lt: bool) -> np.ndarray:
    return _plain(x, t if lt else np.maximum(t, 1e-10).astype(t.dtype), lt)


def _zero_mask(x: np.ndarray, t: np.ndarray, lt: bool) -> np.ndarray:
    loss = _plain(x, t, lt)
    return loss if lt else np.where(t <= 0, 0, loss)


def _optax_like(x: np.ndarray, t: np.ndarray, lt: bool) -> np.ndarray:
    loss = _plain(x, t, lt)
    return loss if lt else np.where(t == 0, 0, loss)


def _no_xlogy_mask(x: np.ndarray, t: np.ndarray, lt: bool) -> np.ndarray:
    return np.exp(t) * (t - x) if lt else t * np.log(t) - t * x


def _ignore_log_target(x: np.ndarray, t: np.ndarray, lt: bool) -> np.ndarray:
    return _plain(x, t, False)


def _exp_twice(x: np.ndarray, t: np.ndarray, lt: bool) -> np.ndarray:
    return np.exp(np.exp(t)) * (np.exp(t) - x) if lt else _plain(x, t, lt)


def _float16_pointwise(x: np.ndarray, t: np.ndarray, lt: bool) -> np.ndarray:
    return _plain(x.astype(np.float16), t.astype(np.float16), lt)


def _sum_last_axis(
    input: Any, target: Any, reduction: str = "mean", log_target: bool = False
) -> Any:
    loss = numpy_impl.kl_div(input, target, reduction="none", log_target=log_target)
    if reduction == "none":
        return loss
    if reduction == "mean":
        warnings.warn("'mean' is not 'batchmean'", UserWarning, stacklevel=2)
    total = loss.sum(axis=-1) if loss.ndim else loss
    if reduction == "mean":
        return np.asarray(total / max(1, loss.shape[-1] if loss.ndim else 1))
    if reduction == "batchmean" and np.ndim(input):
        return np.asarray(total / np.shape(input)[0])
    return np.asarray(total)


def _numpy_result(
    input: Any, target: Any, reduction: str = "mean", log_target: bool = False
) -> Any:
    return numpy_impl.kl_div(input, target, reduction=reduction, log_target=log_target).tolist()


def _reference_no_warning(
    input: Any, target: Any, reduction: str = "mean", log_target: bool = False
) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return numpy_impl.kl_div(input, target, reduction=reduction, log_target=log_target)


def _accept_any_reduction(
    input: Any, target: Any, reduction: str = "mean", log_target: bool = False
) -> Any:
    if reduction not in ("none", "sum", "mean", "batchmean"):
        reduction = "mean"
    return numpy_impl.kl_div(input, target, reduction=reduction, log_target=log_target)


def _accept_integers(
    input: Any, target: Any, reduction: str = "mean", log_target: bool = False
) -> Any:
    x, t = np.asarray(input), np.asarray(target)
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    if t.dtype.kind != "f":
        t = t.astype(np.float64)
    return numpy_impl.kl_div(x, t, reduction=reduction, log_target=log_target)


def _noisy(input: Any, target: Any, reduction: str = "mean", log_target: bool = False) -> Any:
    x, t = numpy_impl._check(input, target, reduction)
    if log_target:
        loss = np.exp(t) * (t - x)
    else:
        with np.errstate(divide="ignore"):
            loss = np.where(t == 0, 0, t * np.log(np.where(t == 0, 1, t))).astype(t.dtype)
        loss = loss - t * x  # warns on 0 * inf
    if reduction == "none":
        return loss
    return numpy_impl.kl_div(input, target, reduction=reduction, log_target=log_target)


def _positive_zero_grad(
    g: Any, input: Any, target: Any, reduction: str = "mean", log_target: bool = False
) -> Any:
    """Return the gradients with the input's computed as ``0 - t g``: its zeros are +0."""
    gx, gt = numpy_impl.kl_div_backward(g, input, target, reduction, log_target)
    return np.asarray(gx + 0.0).astype(gx.dtype), gt


def _m(name: str, fn: Fn, backward: Fn | None = None, description: str = "") -> Implementation:
    return Implementation(
        name,
        fn,
        backward or numpy_impl.kl_div_backward,
        backends=("numpy",),
        description=description,
    )


_LIST = [
    _m(
        "batchmean_by_numel",
        _forward(
            divisor=lambda r, x, t, s: numpy_impl._divisor("mean" if r == "batchmean" else r, x, s)
        ),
        description="batchmean divides by numel",
    ),
    _m(
        "mean_by_batch",
        _forward(
            divisor=lambda r, x, t, s: numpy_impl._divisor("batchmean" if r == "mean" else r, x, s)
        ),
        description="mean divides by shape[0]",
    ),
    _m(
        "batchmean_broadcast_dim",
        _forward(
            divisor=lambda r, x, t, s: (
                s[0] if r == "batchmean" and len(s) else numpy_impl._divisor(r, x, s)
            )
        ),
        description="batchmean divides by the broadcast shape's first dimension",
    ),
    _m(
        "batchmean_broadcast_rows",
        _forward(
            divisor=lambda r, x, t, s: (
                s[0] if r == "batchmean" and x.ndim else numpy_impl._divisor(r, x, s)
            )
        ),
        description="batchmean divides by the broadcast result's rows (0-d input: by 1)",
    ),
    _m(
        "batchmean_broadcast_rows_backward",
        numpy_impl.kl_div,
        _rows_backward,
        description="backward's batchmean divides by the broadcast result's rows",
    ),
    _m("no_xlogy_mask", _forward(pointwise=_no_xlogy_mask), description="t = 0 gives NaN"),
    _m("mask_nonpositive", _forward(pointwise=_zero_mask), description="t <= 0 gives 0 (paddle)"),
    _m("eps_clamp", _forward(pointwise=_clamped), description="max(t, 1e-10) (Keras/Liger)"),
    _m(
        "flushed_product_target_grad",
        _forward(),
        _flushed_product_backward,
        description="d/d target through (g t) / t with subnormal g t flushed to 0 (optax on XLA)",
    ),
    _m(
        "zero_target_always_zero",
        _forward(pointwise=_optax_like),
        description="t = 0 gives 0 even with infinite input (optax)",
    ),
    _m(
        "log_target_ignored",
        _forward(pointwise=_ignore_log_target),
        description="log_target ignored",
    ),
    _m(
        "exp_twice",
        _forward(pointwise=_exp_twice),
        description="exp applied twice with log_target",
    ),
    _m(
        "float32_result",
        _forward(post=lambda o: o.astype(np.float32)),
        description="result cast to float32",
    ),
    _m(
        "float16_pointwise",
        _forward(pointwise=_float16_pointwise),
        description="computes in float16",
    ),
    _m("float16_accumulate", _forward(accumulate=np.float16), description="reduces in float16"),
    _m("crash_0d", _forward(pre=_crash_0d), description="raises on 0-d arrays"),
    _m("crash_empty", _forward(pre=_crash_empty), description="raises on empty arrays"),
    _m("mutates_input", _forward(pre=_mutate), description="modifies its input in place"),
    _m(
        "writes_to_input",
        _forward(pre=_write_input),
        description="writes its input in place (same values): fails on read-only arrays",
    ),
    _m(
        "mismatch_attribute_error",
        _forward(pre=_crash_on_mismatch),
        description="shapes that do not broadcast crash with AttributeError",
    ),
    _m(
        "integers_value_error",
        _forward(pre=_finfo_first),
        description="integer or boolean input raises ValueError (from np.finfo), not TypeError",
    ),
    _m("no_broadcasting", _forward(pre=_no_broadcast), description="refuses to broadcast"),
    _m("sum_last_axis", _sum_last_axis, description="reduces over the last axis only"),
    _m(
        "wrong_target_grad_sign",
        numpy_impl.kl_div,
        _backward(flip_target=True),
        description="target gradient has the wrong sign",
    ),
    _m(
        "grad_not_summed",
        numpy_impl.kl_div,
        _backward(no_sum=True),
        description="input gradient not summed back to its shape",
    ),
    _m("list_result", _numpy_result, description="returns a Python list"),
    _m("no_mean_warning", _reference_no_warning, description="no UserWarning for 'mean'"),
    _m("any_reduction", _accept_any_reduction, description="unknown reduction treated as 'mean'"),
    _m("integers_accepted", _accept_integers, description="integer input is cast, not refused"),
    _m("noisy", _noisy, description="RuntimeWarning for 0 * inf"),
    _m("strides_ignored", _strides_ignored, description="reads memory order, not strides"),
    _m(
        "target_grad_zero_at_zero",
        numpy_impl.kl_div,
        _zero_grad_at_zero,
        description="target gradient 0 instead of NaN at t = 0",
    ),
    _m(
        "log_target_grad_zero_at_neg_inf",
        numpy_impl.kl_div,
        _zero_grad_at_neg_inf,
        description="log_target: target gradient 0 instead of NaN at t = -inf",
    ),
    _m(
        "float64_result",
        _forward(post=lambda o: o.astype(np.float64)),
        description="result always float64",
    ),
    _m(
        "input_grad_positive_zero",
        numpy_impl.kl_div,
        _positive_zero_grad,
        description="input gradient 0 - t * g: +0 where PyTorch's -(t * g) is -0",
    ),
    _m(
        "mean_by_input_numel",
        _forward(
            divisor=lambda r, x, t, s: x.size if r == "mean" else numpy_impl._divisor(r, x, s)
        ),
        description="mean divides by the input's numel, not the broadcast shape's",
    ),
]

# --------------------------------------------------------------------------- from logits


def _np_log_softmax(z: np.ndarray, *, naive: bool) -> np.ndarray:
    """Return ``log_softmax`` along the last axis: shifted by the row's maximum unless ``naive``.

    A row holding NaN or ``+inf``, or only ``-inf``, comes out NaN.
    """
    if naive:  # exp overflows at large logits
        return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))
    if z.shape[-1] == 0:
        return z
    m = np.max(z, axis=-1, keepdims=True)
    shifted = z - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def np_from_logits(
    input: Any,
    target: Any,
    /,
    *,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    axis: int = -1,
    direction: str = "forward",
    scale_by_temperature_squared: bool = True,
    mask: Any = None,
    beta: float | None = None,
    bug: str = "",
) -> np.ndarray:
    r"""``kl_div_from_logits`` in NumPy, with the ``bug`` named (``''``: none).

    :math:`k \cdot \operatorname{reduce} w_i (\log w_i - \log o_i)`, with
    :math:`(w, o) = (p, q)` forward and :math:`(q, p)` reverse, a term of zero
    weight 0, masked rows 0, and the divisors of ``docs/logits.md``; with
    ``beta`` the generalised Jensen-Shannon terms (:func:`_np_jsd_terms`),
    ``beta=0`` the forward and ``beta=1`` the reverse KL.
    """
    s, t, dtype, work, keep = _np_rows(input, target, axis, mask)
    if bug == "float32_result":  # the result cast to float32, whatever the logits' dtype
        dtype = np.dtype(np.float32)
    naive = bug == "unstable_lse"
    with np.errstate(all="ignore"):
        log_q = _np_log_softmax(s / temperature, naive=naive)
        log_p = _np_log_softmax(t / temperature, naive=naive)
        jsd = beta is not None and (0.0 < beta < 1.0 or bug == "jsd_endpoints_formula")
        if beta is not None and not jsd:
            direction = "forward" if beta == 0.0 else "reverse"
        forward = (direction == "forward") != (bug == "direction_swapped")
        log_w, log_o = (log_p, log_q) if forward else (log_q, log_p)
        w = np.exp(log_w)
        if jsd:
            terms = _np_jsd_terms(log_q, log_p, float(beta), bug)  # type: ignore[arg-type]
        elif bug == "cross_entropy":
            terms = -(w * log_o)
        elif bug == "composition":  # xlogy(w, w) - w * log o, as kl_div(log o, w)
            terms = np.where(w == 0, 0, w * np.log(np.where(w == 0, 1, w))) - w * log_o
        elif bug == "log_ratio_flipped":
            terms = w * (log_o - log_w)
        else:
            terms = w * (log_w - log_o)
        if not jsd and bug not in ("excluded_class_nan", "composition"):
            terms = np.where(w == 0, 0, terms)
        terms = np.where(keep[..., None], terms, 0).astype(work)
        k = temperature * temperature if scale_by_temperature_squared else 1.0
        if bug == "no_t_squared":
            k = 1.0
        if reduction == "none":
            return np.moveaxis(terms * work.type(k), -1, axis).astype(dtype)
        total = terms.sum(dtype=work)
        masked = mask is not None and bug != "mask_in_divisor"
        d = _np_divisor(reduction, np.shape(input), s.shape, keep if masked else None)
        if masked and d == 0 and bug != "composition":  # the composition: 0/0
            return np.asarray(0, dtype)
        return np.asarray(total * work.type(k) / work.type(d)).astype(dtype)


def _np_rows(
    input: Any, target: Any, axis: int, mask: Any
) -> tuple[np.ndarray, np.ndarray, np.dtype, np.dtype, np.ndarray]:
    """Return ``(s, t, result dtype, working dtype, kept rows)`` of a from-logits call.

    The logits with the classes last, in the working dtype (float32 for half
    precision); the kept rows are all of them without a mask.
    """
    s, t = np.asarray(input), np.asarray(target)
    dtype = np.result_type(s.dtype, t.dtype)
    work = np.dtype(np.float32) if dtype.itemsize < 4 else dtype
    s = np.moveaxis(s.astype(work), axis, -1)
    t = np.moveaxis(t.astype(work), axis, -1)
    rows = s.shape[:-1]
    keep = np.ones(rows, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), rows)
    return s, t, dtype, work, keep


def _np_divisor(
    reduction: str, shape: tuple[int, ...], moved: tuple[int, ...], kept: np.ndarray | None
) -> int:
    """Return a reduction's divisor (``docs/logits.md``).

    ``shape`` is the logits' shape, ``moved`` theirs with the classes last; with
    ``kept`` (a mask) only the kept rows count.
    """
    n = math.prod(moved[:-1]) if kept is None else int(kept.sum())
    batch = shape[0] if kept is None else n
    return {"sum": 1, "mean": n * moved[-1], "batchmean": batch, "rowmean": n}[reduction]


def _np_jsd_terms(log_q: np.ndarray, log_p: np.ndarray, beta: float, bug: str) -> np.ndarray:
    r"""Return :math:`\beta p (\log p - \log m) + (1 - \beta) q (\log q - \log m)`, with ``bug``.

    :math:`m = \beta p + (1 - \beta) q` by ``np.logaddexp``; a product of zero
    weight is 0. Bugs: ``'jsd_beta_swapped'`` mixes :math:`(1 - \beta) p + \beta q`;
    ``'jsd_endpoints_formula'`` gives the formula's 0 at ``beta`` 0 and 1 (not the
    KLs); ``'jsd_excluded_nan'`` leaves ``0 * -inf`` = NaN where one side excludes a class.
    """
    if bug == "jsd_endpoints_formula" and beta in (0.0, 1.0):
        return np.zeros_like(log_q)
    wp, wq = (1.0 - beta, beta) if bug == "jsd_beta_swapped" else (beta, 1.0 - beta)
    log_m = np.logaddexp(log_p + math.log(wp), log_q + math.log(wq))
    p, q = np.exp(log_p), np.exp(log_q)
    tp, tq = p * (log_p - log_m), q * (log_q - log_m)
    if bug != "jsd_excluded_nan":
        tp, tq = np.where(p == 0, 0, tp), np.where(q == 0, 0, tq)
    return beta * tp + (1.0 - beta) * tq


def _logits_jsd_grad_no_factor(g: Any, input: Any, target: Any, /, **options: Any) -> Any:
    """Return the student gradient of the mixture without its factor ``1 - beta``."""
    gx, gt = kldiv_spec.kl_div_from_logits_backward(g, input, target, **options)
    beta = options.get("beta")
    if beta is not None and 0.0 < beta < 1.0:
        gx = np.asarray(gx / (1.0 - beta)).astype(gx.dtype)
    return gx, gt


def _logits_bug(bug: str) -> Fn:
    def from_logits(input: Any, target: Any, /, **options: Any) -> Any:
        return np_from_logits(input, target, bug=bug, **options)

    return from_logits


def _zero_student_after(input: Any, target: Any, /, **options: Any) -> Any:
    """Return the correct loss, then zero the student logits in place (a leaked buffer)."""
    out = np_from_logits(input, target, **options)
    if isinstance(input, np.ndarray) and input.flags.writeable:
        input[...] = 0
    return out


def _last_axis_always(input: Any, target: Any, /, *, axis: int = -1, **options: Any) -> Any:
    """Return ``kl_div_from_logits`` with the classes on the last axis, whatever ``axis`` says."""
    return kldiv_spec.kl_div_from_logits(input, target, **options)


def _last_axis_always_backward(g: Any, input: Any, target: Any, /, **options: Any) -> Any:
    """Return the gradient of :func:`_last_axis_always` (``axis`` dropped too)."""
    options.pop("axis", None)
    return kldiv_spec.kl_div_from_logits_backward(g, input, target, **options)


def _zero_mu_after(mu: Any, logvar: Any, /, **options: Any) -> Any:
    """Return the correct Gaussian KL, then zero ``mu`` in place."""
    out = np_gaussian(mu, logvar, **options)
    if isinstance(mu, np.ndarray) and mu.flags.writeable:
        mu[...] = 0
    return out


def _logits_grad(*, sign: float = 1.0, times_temperature: bool = False) -> Fn:
    def backward(g: Any, input: Any, target: Any, /, **options: Any) -> Any:
        gx, gt = kldiv_spec.kl_div_from_logits_backward(g, input, target, **options)
        factor = sign * (options.get("temperature", 1.0) if times_temperature else 1.0)
        return np.asarray(gx * factor).astype(gx.dtype), gt

    return backward


def np_gaussian(
    mu: Any,
    logvar: Any,
    /,
    *,
    mu_prior: Any = 0.0,
    logvar_prior: Any = 0.0,
    reduction: str = "batchmean",
    bug: str = "",
) -> np.ndarray:
    r"""``gaussian_kl`` in NumPy, with the ``bug`` named (``''``: none).

    :math:`\tfrac12 (\operatorname{expm1}(d) - d + (\mu - \mu_0)^2 e^{-\lambda_0})`,
    :math:`d = \lambda - \lambda_0`, reduced like ``kl_div``.
    """
    m, lv = np.asarray(mu), np.asarray(logvar)
    dtype = np.result_type(m.dtype, lv.dtype)
    m0 = np.asarray(mu_prior, dtype) if np.ndim(mu_prior) else dtype.type(mu_prior)
    lv0 = np.asarray(logvar_prior, dtype) if np.ndim(logvar_prior) else dtype.type(logvar_prior)
    if bug == "prior_ignored":
        m0, lv0 = dtype.type(0), dtype.type(0)
    with np.errstate(all="ignore"):
        d = lv - lv0
        diff = m - m0
        log_term = np.expm1(d) + d if bug == "logvar_sign" else np.expm1(d) - d
        terms = np.asarray(0.5 * (log_term + diff * diff / np.exp(lv0))).astype(dtype)
        if reduction == "none":
            return terms
        total = terms.sum(dtype=dtype)
        n = {"sum": 1, "mean": terms.size, "batchmean": m.shape[0] if m.ndim else 1}[reduction]
        return np.asarray(total / dtype.type(n)).astype(dtype)


def _gaussian_bug(bug: str) -> Fn:
    def gaussian(mu: Any, logvar: Any, /, **options: Any) -> Any:
        return np_gaussian(mu, logvar, bug=bug, **options)

    return gaussian


def _gaussian_grad_no_half(g: Any, mu: Any, logvar: Any, /, **options: Any) -> Any:
    """Return the gradients with the one w.r.t. ``logvar`` lacking its factor 1/2."""
    g_mu, g_lv, g_mp, g_lp = kldiv_spec.gaussian_kl_backward(g, mu, logvar, **options)
    return g_mu, np.asarray(2 * g_lv).astype(g_lv.dtype), g_mp, g_lp


def _logits_grad_nan_to_zero(g: Any, input: Any, target: Any, /, **options: Any) -> Any:
    """Return the student gradient with NaN replaced by 0 (a NaN guard in the backward)."""
    gx, gt = kldiv_spec.kl_div_from_logits_backward(g, input, target, **options)
    return np.nan_to_num(np.asarray(gx), nan=0.0, posinf=np.inf, neginf=-np.inf), gt


def _logits_teacher_grad_sign(g: Any, input: Any, target: Any, /, **options: Any) -> Any:
    """Return the student gradient and the teacher's negated (a sign slip in d/dt)."""
    gx, gt = kldiv_spec.kl_div_from_logits_backward(g, input, target, target_grad=True, **options)
    return gx, np.asarray(-gt).astype(gt.dtype)


def _composition_backward(
    g: Any,
    input: Any,
    target: Any,
    /,
    *,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    axis: int = -1,
    direction: str = "forward",
    scale_by_temperature_squared: bool = True,
    mask: Any = None,
) -> Any:
    r"""Return autograd's gradients of PyTorch's composition, in NumPy.

    The composition is ``k * kl_div(log_softmax(s / T), softmax(t / T))``
    (reverse: the roles swapped), its dropped rows selected away by ``where``.
    With :math:`w` the weighting distribution and :math:`o` the other:
    :math:`\partial/\partial \log o = -G w`, then the log-softmax's backward, and
    :math:`\partial/\partial w = G (\log w + 1 - \log o)`, ``-inf`` at
    :math:`w_j = 0` (an excluded class, or a probability that underflowed), then
    the softmax's backward :math:`w \odot (h - \sum_j w_j h_j)`, where
    :math:`0 \cdot \infty` makes the row NaN; a dropped row's :math:`G = 0`
    meets its NaN (no softmax) or that infinity. Returns the student's and the
    teacher's gradients.
    """
    s, t, dtype, work, keep = _np_rows(input, target, axis, mask)
    if reduction == "none":
        gg = np.moveaxis(np.broadcast_to(np.asarray(g, work), np.shape(input)), axis, -1)
    else:
        d = _np_divisor(reduction, np.shape(input), s.shape, None if mask is None else keep)
        gg = np.broadcast_to(np.asarray(g, work) / work.type(d), s.shape)
    k = temperature * temperature if scale_by_temperature_squared else 1.0
    with np.errstate(all="ignore"):
        gg = np.where(keep[..., None], gg, 0).astype(work)
        log_q = _np_log_softmax(s / temperature, naive=False)
        log_p = _np_log_softmax(t / temperature, naive=False)
        q, p = np.exp(log_q), np.exp(log_p)
        # kl_div(log o, w): d/dw = G (log w + 1 - log o), d/d(log o) = -G w; then the
        # softmax's and the log-softmax's backward
        lo, w, o = (log_q, p, q) if direction == "forward" else (log_p, q, p)
        # kl_div's d/dw is log(w) + 1 - log o at the softmax's output w: -inf where w
        # is 0, also where it underflowed from a finite logit
        h = gg * (np.log(w) + 1 - lo)
        grad_w = w * (h - np.sum(w * h, axis=-1, keepdims=True))
        d_log_o = -gg * w
        grad_o = d_log_o - o * np.sum(d_log_o, axis=-1, keepdims=True)
        grad_s, grad_t = (grad_o, grad_w) if direction == "forward" else (grad_w, grad_o)
        c = work.type(k / temperature)
    back = (np.moveaxis(a * c, -1, axis).astype(dtype) for a in (grad_s, grad_t))
    return tuple(back)


def _logits_m(
    name: str, bug: str, description: str, backward: Fn | None = None, *, beta: bool = False
) -> Implementation:
    return Implementation(
        name,
        backends=("numpy",),
        description=description,
        from_logits=_logits_bug(bug),
        from_logits_backward=backward or kldiv_spec.kl_div_from_logits_backward,
        logits_beta=beta,
    )


def _gaussian_m(
    name: str, bug: str, description: str, backward: Fn | None = None
) -> Implementation:
    return Implementation(
        name,
        backends=("numpy",),
        description=description,
        gaussian=_gaussian_bug(bug),
        gaussian_backward=backward or kldiv_spec.gaussian_kl_backward,
    )


_LIST += [
    _logits_m("logits_no_t_squared", "no_t_squared", "from logits: never multiplies by T**2"),
    _logits_m(
        "logits_direction_swapped",
        "direction_swapped",
        "from logits: 'forward' computes KL(q || p) and 'reverse' KL(p || q)",
    ),
    _logits_m(
        "logits_mask_in_divisor",
        "mask_in_divisor",
        "from logits: masked rows count in the 'batchmean'/'rowmean'/'mean' divisor",
    ),
    _logits_m(
        "logits_unstable_lse",
        "unstable_lse",
        "from logits: log(sum(exp(z))) without the max shift (overflows at large logits)",
    ),
    _logits_m(
        "logits_excluded_class_nan",
        "excluded_class_nan",
        "from logits: p * (log p - log q) unmasked: a class the teacher excludes gives NaN",
    ),
    _logits_m(
        "logits_cross_entropy",
        "cross_entropy",
        "from logits: -sum(p log q), the cross-entropy (torchtune's ForwardKLLoss convention)",
    ),
    _logits_m(
        "logits_log_ratio_flipped",
        "log_ratio_flipped",
        "from logits: p * (log q - log p), the KL negated",
    ),
    _logits_m(
        "logits_grad_sign",
        "",
        "from logits: the student gradient is p - q instead of q - p",
        _logits_grad(sign=-1.0),
    ),
    _logits_m(
        "logits_grad_missing_inverse_t",
        "",
        "from logits: the student gradient misses the 1/T of d(s/T)/ds",
        _logits_grad(times_temperature=True),
    ),
    _logits_m(
        "logits_composition",
        "composition",
        "from logits: PyTorch's composition T**2 * kl_div(log_softmax, softmax): rounding at "
        "s = t, 0 * inf = NaN where both exclude a class, 0/0 for a fully masked mean; its "
        "gradient NaN across a reverse row where the student excludes a class",
        _composition_backward,
    ),
    _logits_m(
        "logits_teacher_grad_sign",
        "",
        "from logits: the teacher gradient negated (p's chain rule with the sign slipped)",
        _logits_teacher_grad_sign,
    ),
    _logits_m(
        "logits_grad_nan_to_zero",
        "",
        "from logits: the student gradient's NaN replaced by 0 (a NaN guard): a row without a "
        "softmax gets a zero gradient",
        _logits_grad_nan_to_zero,
    ),
    _logits_m(
        "logits_float32_result",
        "float32_result",
        "from logits: the result cast to float32 (float64 logits give a float32 loss)",
    ),
    _logits_m(
        "logits_jsd_beta_swapped",
        "jsd_beta_swapped",
        "from logits, beta: the mixture is (1 - beta) p + beta q instead of beta p + (1 - beta) q",
        beta=True,
    ),
    _logits_m(
        "logits_jsd_endpoints_formula",
        "jsd_endpoints_formula",
        "from logits, beta: beta = 0 and 1 evaluate the mixture's formula (0), not the KLs",
        beta=True,
    ),
    _logits_m(
        "logits_jsd_excluded_nan",
        "jsd_excluded_nan",
        "from logits, beta: p * (log p - log m) unmasked: a class one side excludes gives NaN",
        beta=True,
    ),
    _logits_m(
        "logits_jsd_grad_no_factor",
        "",
        "from logits, beta: the student gradient misses the factor (1 - beta) of d/dq",
        _logits_jsd_grad_no_factor,
        beta=True,
    ),
    Implementation(
        "logits_mutates_input",
        backends=("numpy",),
        description="from logits: zeroes the student logits in place (after computing the loss)",
        from_logits=_zero_student_after,
        from_logits_backward=kldiv_spec.kl_div_from_logits_backward,
    ),
    Implementation(
        "logits_axis_ignored",
        backends=("numpy",),
        description="from logits: the classes on the last axis, whatever axis= says",
        from_logits=_last_axis_always,
        from_logits_backward=_last_axis_always_backward,
        logits_axes=(-1, 0, 1, -2),
    ),
    Implementation(
        "gaussian_mutates_input",
        backends=("numpy",),
        description="gaussian: zeroes mu in place (after computing the KL)",
        gaussian=_zero_mu_after,
        gaussian_backward=kldiv_spec.gaussian_kl_backward,
    ),
    _gaussian_m(
        "gaussian_prior_ignored",
        "prior_ignored",
        "gaussian: mu_prior and logvar_prior ignored (always the standard normal)",
    ),
    _gaussian_m(
        "gaussian_logvar_sign",
        "logvar_sign",
        "gaussian: + (logvar - logvar_prior) instead of -",
    ),
    _gaussian_m(
        "gaussian_grad_no_half",
        "",
        "gaussian: the gradient w.r.t. logvar misses the factor 1/2",
        _gaussian_grad_no_half,
    ),
]

_LIST += [
    Implementation(
        "result_on_default_device",
        _on_default_device,
        kldiv_spec.kl_div_backward,
        backends=("array_api_strict",),
        description="the result is moved to the default device",
    ),
    Implementation(
        "once_differentiable",
        _once_differentiable,
        backends=("torch",),
        description="torch.autograd.Function whose backward is @once_differentiable",
    ),
]

#: Every mutant, by name.
MUTANTS: dict[str, Implementation] = {m.name: m for m in _LIST}


# --------------------------------------------------------------------------- from hidden states
# ``from_hidden`` mutants: kldiv_spec.conformance.hidden_reference with one change each.


def _hidden_bias_grad_dropped(g: Any, *operands: Any, **options: Any) -> Any:
    """Return the reference's student gradients with the bias's zeroed."""
    grad_h, grad_w, grad_b = hidden_reference.from_hidden_backward(g, *operands, **options)
    return grad_h, grad_w, None if grad_b is None else np.zeros_like(grad_b)


def _hidden_composition_backward(
    g: Any,
    h_s: Any,
    w_s: Any,
    h_t: Any,
    w_t: Any,
    /,
    *,
    student_bias: Any = None,
    teacher_bias: Any = None,
    **options: Any,
) -> Any:
    """Return the chain rule of PyTorch's composition's logit gradient (its NaN rows too).

    :func:`_composition_backward` at the logits ``h W.T + b``, carried back by
    :func:`hidden_reference.chain_rule`: a NaN row of ``G`` spreads through the sums.
    """
    s = np.asarray(hidden_reference.logits(h_s, w_s, student_bias))
    t = np.asarray(hidden_reference.logits(h_t, w_t, teacher_bias))
    grad_s = np.asarray(_composition_backward(g, s, t, **options)[0])
    with np.errstate(invalid="ignore"):
        return hidden_reference.chain_rule(grad_s, h_s, w_s, student_bias)


def _chunk_divisor(reduction: str, lead: tuple[int, ...], vocab: int, kept: np.ndarray) -> int:
    """Return the divisor of ``reduction`` over rows ``kept`` (of leading shape ``lead``)."""
    if reduction == "mean":
        return int(kept.sum()) * vocab
    if reduction == "batchmean" and len(lead) > 1:  # (B, S, V), no mask: the batch
        return lead[0]
    return int(kept.sum())


def _hidden_chunked(
    h_s: Any,
    w_s: Any,
    h_t: Any,
    w_t: Any,
    /,
    *,
    student_bias: Any = None,
    teacher_bias: Any = None,
    reduction: str = "batchmean",
    mask: Any = None,
    **options: Any,
) -> Any:
    """Two chunks of rows; the second's sum is divided by its own count, not the total's."""
    s = hidden_reference.logits(h_s, w_s, student_bias)
    t = hidden_reference.logits(h_t, w_t, teacher_bias)
    lead, vocab = tuple(s.shape[:-1]), s.shape[-1]
    rows = math.prod(lead)
    whole = kldiv_spec.kl_div_from_logits(s, t, reduction=reduction, mask=mask, **options)
    if reduction in ("none", "sum") or rows < 2:
        return whole
    keep = np.ones(rows, bool)
    if mask is not None:
        keep = np.broadcast_to(np.asarray(mask, bool), lead).reshape(rows)
    s2, t2 = s.reshape(rows, vocab), t.reshape(rows, vocab)
    total = _chunk_divisor(reduction, lead, vocab, keep)
    if total == 0:
        return whole
    value = 0.0
    for k, chunk in enumerate((slice(0, rows // 2), slice(rows // 2, rows))):
        part = kldiv_spec.kl_div_from_logits(
            s2[chunk], t2[chunk], reduction="sum", mask=keep[chunk], **options
        )
        own = _chunk_divisor(reduction, (chunk.stop - chunk.start,), vocab, keep[chunk])
        divisor = total if k == 0 else own
        value += float(part) / divisor if divisor else 0.0
    return np.asarray(value, dtype=s.dtype)


def _hidden_float32(*operands: Any, **options: Any) -> Any:
    """Return the reference computed (and returned) in float32."""

    def cast(a: Any) -> Any:
        if isinstance(a, np.ndarray) and a.dtype.kind == "f":
            return a.astype(np.float32)
        return a

    return hidden_reference.from_hidden(
        *(cast(a) for a in operands), **{k: cast(v) for k, v in options.items()}
    )


def _hidden_zero_student_after(h_s: Any, *operands: Any, **options: Any) -> Any:
    """Return the correct loss, then zero the student's hidden states in place."""
    out = hidden_reference.from_hidden(h_s, *operands, **options)
    if isinstance(h_s, np.ndarray) and h_s.flags.writeable:
        h_s[...] = 0
    return out


def _hidden_teacher_gradient(
    h_s: Any,
    w_s: Any,
    h_t: Any,
    w_t: Any,
    /,
    *,
    student_bias: Any = None,
    teacher_bias: Any = None,
    **options: Any,
) -> Any:
    """Return the reference's value without freezing the teacher (its operands get gradients)."""
    s = hidden_reference.logits(h_s, w_s, student_bias)
    t = hidden_reference.logits(h_t, w_t, teacher_bias)
    return kldiv_spec.kl_div_from_logits(s, t, **options)


def _hidden_m(name: str, fn: Fn, description: str, backward: Fn | None = None) -> Implementation:
    return Implementation(
        name,
        backends=("numpy",),
        description=description,
        from_hidden=fn,
        from_hidden_backward=backward or hidden_reference.from_hidden_backward,
    )


_HIDDEN = [
    _hidden_m(
        "hidden_bias_grad_dropped",
        hidden_reference.from_hidden,
        "from hidden states: the backward returns zeros for the student bias's gradient",
        _hidden_bias_grad_dropped,
    ),
    _hidden_m(
        "hidden_chunk_divisor",
        _hidden_chunked,
        "from hidden states: rows in two chunks, the second's sum divided by its own count "
        "(a chunked mean gone wrong)",
    ),
    _hidden_m(
        "hidden_composition",
        hidden_reference.from_hidden,
        "from hidden states: the student gradients of PyTorch's composition (the logits, "
        "then T**2 * kl_div(log_softmax, softmax)): NaN across a row whose smallest "
        "probability rounds to 0 in reverse, and in the whole weight's gradient",
        _hidden_composition_backward,
    ),
    _hidden_m(
        "hidden_float32_result",
        _hidden_float32,
        "from hidden states: computed and returned in float32 (float64 operands, float32 loss)",
    ),
    _hidden_m(
        "hidden_mutates_input",
        _hidden_zero_student_after,
        "from hidden states: zeroes the student's hidden states in place (after the loss)",
    ),
    Implementation(
        "hidden_teacher_gradient",
        backends=("torch",),
        description="from hidden states: the teacher is not frozen (its operands get gradients)",
        from_hidden=_hidden_teacher_gradient,
    ),
]
_LIST += _HIDDEN
MUTANTS.update({m.name: m for m in _HIDDEN})
