r"""``kl_div_from_hidden`` with the output weights sharded over the classes (tensor parallelism).

Each rank of a ``torch.distributed`` process group holds the same hidden states
(replicated, as in Megatron-style tensor parallelism) and its slice of the classes
of both output layers: rows ``W_s[V_r]``, ``W_t[V_r]`` (and the biases'). No rank
ever holds a full row of logits. Per chunk of rows, with :math:`x = z / T` the local
logits over the temperature, the row statistics are combined over the ranks by
all-reduces:

.. math::

    m = \max_r \max_{j \in V_r} x_j, \qquad
    Z = \sum_r \sum_{j \in V_r} e^{x_j - m}, \qquad
    A = \sum_r \sum_{j \in V_r} e^{x_{w,j} - m_w} (x_{w,j} - x_{o,j})

(the maxima with ``MAX``, both models at once; the sums with ``SUM``), where the
weighting model :math:`w` is the teacher for the forward KL and the student for the
reverse, and :math:`o` the other. Then every rank has the rows' divergences

.. math::

    \mathrm{KL} = A / Z_w - (m_w + \log Z_w) + (m_o + \log Z_o),

and its slice of the logits' gradient, :math:`G = c\,(q - p)` (forward) or
:math:`c\,q \odot (\log q - \log p - \mathrm{KL})` (reverse), with
:math:`c = k / (T D)`. The weight's and bias's gradients are local
(:math:`G^\top h`, :math:`\sum_i G_i`); the hidden states' gradient is the sum over
the ranks of :math:`G W_r`, one more all-reduce per chunk. The value and the
gradients are those of one process holding the full weights, within the rounding of
the reordered sums (``tests/test_hidden.py`` checks 2 and 4 gloo processes).

The rows are walked in chunks as in :mod:`kldiv_spec.backends.hidden_torch`, the
budget counting the local classes. Not supported here (ValueError): ``beta``,
``reduction='none'``. Rows whose logits are not all finite give NaN (no ``-inf``
edge-value rules: logits formed by a product are finite unless the operands are
not). The gradients are computed in the forward and scaled in the backward; there is
no double backward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from kldiv_spec._core_logits import row_divisor
from kldiv_spec._validation import HiddenOperands

from .hidden_torch import chunk_rows

__all__ = ["from_hidden_sharded"]


def _all_reduce(a: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    dist.all_reduce(a, op=op, group=group)
    return a


def _logits(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    z = torch.mm(h.to(w.dtype), w.T)
    if b is not None:
        z = z + b
    return z.to(dtype)


def _chunk(
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    b_s: torch.Tensor | None,
    t: torch.Tensor,
    kept: torch.Tensor | None,
    *,
    ops: HiddenOperands,
    scale: float,
    group: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the chunk's rows' divergences (float64) and its local logits' gradient."""
    dt = t.dtype
    inv_t = 1.0 / ops.temperature
    xs = _logits(h_s, w_s, b_s, dt).mul_(inv_t)
    xt = t.mul(inv_t)
    m = torch.stack([xs.amax(dim=1), xt.amax(dim=1)])
    m = _all_reduce(m, dist.ReduceOp.MAX, group)
    ms, mt = m[0], m[1]
    es, et = (xs - ms[:, None]).exp_(), (xt - mt[:, None]).exp_()
    forward = ops.direction == "forward"
    weight, diff = (et, xt - xs) if forward else (es, xs - xt)
    sums = torch.stack([es.sum(dim=1), et.sum(dim=1), (weight * diff).sum(dim=1)]).double()
    sums = _all_reduce(sums, dist.ReduceOp.SUM, group)
    zs, zt, a = sums[0], sums[1], sums[2]
    lzs, lzt = ms.double() + zs.log(), mt.double() + zt.log()
    kl = a / zt - lzt + lzs if forward else a / zs - lzs + lzt
    if kept is not None:
        kl = torch.where(kept, kl, torch.zeros_like(kl))
    q = es.div_(zs.to(dt)[:, None])
    p = et.div_(zt.to(dt)[:, None])
    if forward:
        g = q.sub_(p)
    else:
        log_ratio = (xs - lzs.to(dt)[:, None]) - (xt - lzt.to(dt)[:, None])
        g = q.mul_(log_ratio.sub_(kl.to(dt)[:, None]))
    g.mul_(scale)
    if kept is not None:
        g.mul_(kept.to(dt)[:, None])
    return kl, g


class _Sharded(torch.autograd.Function):
    """Forward: the loss and the student's gradients; backward: scale them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h_s: torch.Tensor,
        w_s: torch.Tensor,
        b_s: torch.Tensor | None,
        ops: HiddenOperands,
        group: Any,
    ) -> torch.Tensor:
        loss, grads = _evaluate(ops, group, need=ctx.needs_input_grad[:3])
        ctx.grads = grads
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            msg = "the sharded from-hidden loss supports one backward (no retain_graph reuse)"
            raise RuntimeError(msg)
        return (*(None if g is None else g.mul_(grad.to(g.dtype)) for g in grads), None, None)


def _evaluate(
    ops: HiddenOperands, group: Any, *, need: tuple[bool, ...]
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    xp_h, w_s, b_s = ops.student_hidden, ops.student_weight, ops.student_bias
    width, local = w_s.shape[1], ops.vocab
    h = xp_h.detach().reshape(-1, width)
    rows = h.shape[0]
    kd = ops.compute_dtype
    sizes = torch.tensor([local], dtype=torch.int64)
    total_vocab = int(_all_reduce(sizes.clone(), dist.ReduceOp.SUM, group)[0])
    # every rank walks the same chunks (their all-reduces pair up): sized by the widest slice
    widest = int(_all_reduce(sizes, dist.ReduceOp.MAX, group)[0])
    kept = ops.row_mask()
    if kept is not None:
        kept = torch.broadcast_to(kept, ops.row_shape).reshape(rows)
    n = rows if kept is None else int(kept.sum())
    if kept is None:
        shape = (*ops.row_shape, total_vocab)
        d = row_divisor(ops.reduction, shape=shape, axis=len(shape) - 1)
    else:
        d = n * total_vocab if ops.reduction == "mean" else (1 if ops.reduction == "sum" else n)
    scale = 0.0 if d == 0 else ops.factor / ops.temperature / d
    need_h, need_w, need_b = (bool(x) for x in need)
    with torch.no_grad():
        ws, bs = w_s.detach(), None if b_s is None else b_s.detach()
        gh = torch.zeros((rows, width), dtype=kd) if need_h else None
        gw = torch.zeros(w_s.shape, dtype=kd) if need_w else None
        gb = torch.zeros((local,), dtype=kd) if need_b and b_s is not None else None
        per_row = max(widest, 1) * 6 * torch.empty((), dtype=kd).element_size()  # 6 arrays
        chunk = chunk_rows(rows, per_row, ops.memory_budget)
        total = torch.zeros((), dtype=torch.float64)
        for i in range(0, rows, chunk):
            j = min(i + chunk, rows)
            t = _teacher(ops, i, j, kd)
            kl, g = _chunk(
                h[i:j], ws, bs, t, None if kept is None else kept[i:j],
                ops=ops, scale=scale, group=group,
            )  # fmt: skip
            total += kl.sum()
            if gh is not None:
                gh[i:j] = torch.mm(g, ws.to(kd))
            if gw is not None:
                gw.addmm_(g.T, h[i:j].to(kd))
            if gb is not None:
                gb += g.sum(dim=0)
        if gh is not None:
            _all_reduce(gh, dist.ReduceOp.SUM, group)
        loss = _loss(total, d, kept is not None, ops.factor, kd).to(ops.dtype)
    grads = (
        None if gh is None else gh.reshape(xp_h.shape).to(xp_h.dtype),
        None if gw is None else gw.to(w_s.dtype),
        None if gb is None or b_s is None else gb.to(b_s.dtype),
    )
    return loss, grads


def _teacher(ops: HiddenOperands, i: int, j: int, kd: torch.dtype) -> torch.Tensor:
    if ops.teacher_logits is not None:
        return ops.teacher_logits.detach().reshape(-1, ops.vocab)[i:j].to(kd)
    assert ops.teacher_hidden is not None and ops.teacher_weight is not None
    wt = ops.teacher_weight.detach()
    ht = ops.teacher_hidden.detach().reshape(-1, wt.shape[1])[i:j]
    bt = None if ops.teacher_bias is None else ops.teacher_bias.detach()
    return _logits(ht, wt, bt, kd)


def _loss(total: torch.Tensor, d: int, masked: bool, factor: float, kd: Any) -> torch.Tensor:
    result = total.to(kd)
    if d == 0:
        result = torch.zeros((), dtype=kd) if masked else torch.full((), math.nan, dtype=kd)
    elif d != 1:
        result = result / d
    return result * factor if factor != 1.0 else result


def from_hidden_sharded(ops: HiddenOperands, group: Any = None, /) -> torch.Tensor:
    """Return the loss of the sharded operands (this rank's slice of the classes).

    ``ops`` holds this rank's slices of the weights and biases (validated as one
    process's operands: :attr:`HiddenOperands.vocab` is the local number of
    classes); ``group`` the process group (None: the default one).
    """
    if ops.beta is not None or ops.reduction == "none":
        msg = (
            "the sharded kl_div_from_hidden takes the KL reductions only: not beta, not "
            f"reduction='none' (got beta={ops.beta!r}, reduction={ops.reduction!r})"
        )
        raise ValueError(msg)
    h, w, b = ops.student_hidden, ops.student_weight, ops.student_bias
    grad = torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in (h, w, b))
    if grad:
        return _Sharded.apply(h, w, b, ops, group)
    loss, _ = _evaluate(ops, group, need=(False, False, False))
    return loss
