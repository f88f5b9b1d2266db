"""The gradient at a class the weighting distribution excludes (docs/logits.md, edge values).

The weighting distribution is the teacher's ``p`` forward and the student's ``q`` in
reverse; with ``beta`` inside (0, 1) both weight terms of the mixture's divergence.
Where it is 0 (a ``-inf`` logit) the term is 0, and so is the gradient w.r.t. that
side's logit, in every row with a softmax: also in a row whose loss is ``+inf``
(the weighting side keeps a class the other excludes), where the chain rule's
:math:`w_j \\sum_i G_i w_i (r_i + 1)` is :math:`0 \\cdot \\infty`, and for ``'none'``
(an upstream gradient that varies along the row) as for the reductions. The kept
classes of such a row get NaN or an infinity. PyTorch's composition gives NaN across
a reverse row with an excluded student class; the conformance suite accepts that at
MUST level (``gradients.logits_edge_values``) and asks for the 0 at SHOULD level
(``gradients.logits_edge_numbers``).

Every path is checked against the exact oracle, NaN pattern included: the reference on
each installed array library, the fast paths (the NumPy kernels, PyTorch's autograd
through them), both directions, the student's and the teacher's gradients.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from _support import to_numpy

import kldiv_spec
from kldiv_spec.conformance import oracle_logits as oracle

inf = math.inf

#: (student, teacher) rows: the weighting side keeps one class that the other side
#: excludes and excludes the rest (loss +inf), each way round; one side excluding half
#: the classes of a uniform other (finite loss); a row with no exclusion for contrast.
ROWS = [
    ([0.0, -inf, -inf, -inf], [-inf, 0.0, 0.0, 0.0]),
    ([-inf, 0.0, 0.0, 0.0], [0.0, -inf, -inf, -inf]),
    ([0.0, 0.0, -inf, -inf], [0.0, 0.0, 0.0, 0.0]),
    ([0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -inf, -inf]),
    ([0.0, 1.0, -inf, 2.0], [1.0, -inf, 0.5, 0.0]),
    ([0.5, 1.0, -0.5, 2.0], [1.0, -1.0, 0.5, 0.0]),
]
#: The upstream gradient of 'none': it varies along the row (the general chain rule).
GRAD_NONE = [[0.5, 1.5, 2.5, 0.75]] * len(ROWS)


def logits(dtype: Any = np.float64) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray([r[0] for r in ROWS], dtype)
    t = np.asarray([r[1] for r in ROWS], dtype)
    return s, t


def check(got: Any, want: np.ndarray, eps: float, what: str) -> None:
    """The NaN and infinity pattern exactly, the finite values within a few ulps.

    (Dask computes here outside any ``errstate``: the NaN of ``inf - inf`` warns.)
    """
    got = to_numpy(got, quiet=True).astype(np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"NaN, {what}")
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)])
    np.testing.assert_allclose(
        got[finite], want[finite], rtol=16 * eps, atol=16 * eps, err_msg=what
    )


def test_the_oracle_gives_zero_where_the_weight_is_zero() -> None:
    """The rule itself, on the row where the loss is +inf, against the hand-derived value."""
    s, t = logits()
    exact = oracle.from_logits(s[:1], t[:1], reduction="sum", direction="reverse")
    # q = [1, 0, 0, 0], p_0 = 0: KL = +inf, dKL/ds_0 = q_0 (inf - inf) = NaN, 0 elsewhere
    np.testing.assert_array_equal(np.isnan(exact.grad_input[0]), [True, False, False, False])
    np.testing.assert_array_equal(exact.grad_input[0, 1:], 0.0)
    # the same row forward: the teacher's gradient (p weights) is 0 at the class p excludes
    exact = oracle.from_logits(s[:1], t[:1], reduction="sum", direction="forward")
    np.testing.assert_array_equal(np.isnan(exact.grad_target[0]), [False, True, True, True])
    assert exact.grad_target[0, 0] == 0.0
    # and the student's forward gradient there is finite: q - p
    np.testing.assert_allclose(exact.grad_input[0], [1.0, -1 / 3, -1 / 3, -1 / 3])


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_every_library_and_path_matches_the_oracle(
    xp: Any, evaluation: Any, direction: str, reduction: str
) -> None:
    s_np, t_np = logits()
    grad = np.asarray(GRAD_NONE) if reduction == "none" else np.asarray(0.75)
    exact = oracle.from_logits(
        s_np, t_np, reduction=reduction, direction=direction, grad_output=grad, temperature=2.0
    )
    s, t = xp.asarray(s_np), xp.asarray(t_np)
    gs, gt = kldiv_spec.kl_div_from_logits_backward(
        xp.asarray(grad),
        s,
        t,
        reduction=reduction,
        direction=direction,
        temperature=2.0,
        target_grad=True,
    )
    eps = float(np.finfo(np.float64).eps)
    what = f"{direction}, {reduction}, {evaluation}"
    check(gs, exact.grad_input, eps, f"student, {what}")
    check(gt, exact.grad_target, eps, f"teacher, {what}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "options",
    [{"direction": "forward"}, {"direction": "reverse"}, {"beta": 0.5}, {"beta": 0.3}],
    ids=str,
)
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_the_numpy_kernels_match_the_oracle(
    every_size: None, dtype: Any, options: dict[str, Any], reduction: str
) -> None:
    """The compiled kernels (KL float32 and float64, JSD float32) compute the student
    gradient themselves; inside (0, 1) the student weights terms too, so a class it
    excludes gets 0."""
    s, t = logits(dtype)
    grad = np.asarray(GRAD_NONE, dtype) if reduction == "none" else dtype(0.75)
    exact = oracle.from_logits(s, t, reduction=reduction, grad_output=grad, **options)
    gs, _ = kldiv_spec.kl_div_from_logits_backward(grad, s, t, reduction=reduction, **options)
    assert gs.dtype == dtype
    check(gs, exact.grad_input, float(np.finfo(dtype).eps), f"{options}, {reduction}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "options", [{"direction": "forward"}, {"direction": "reverse"}, {"beta": 0.5}], ids=str
)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_torch_autograd_matches_the_oracle(
    dtype: str, options: dict[str, Any], reduction: str
) -> None:
    torch = pytest.importorskip("torch")
    import kldiv_spec.torch as kt

    s_np, t_np = logits(np.dtype(dtype))
    grad = np.asarray(GRAD_NONE, dtype) if reduction == "none" else np.asarray(0.75, dtype)
    exact = oracle.from_logits(s_np, t_np, reduction=reduction, grad_output=grad, **options)
    s = torch.tensor(s_np, requires_grad=True)
    t = torch.tensor(t_np, requires_grad=True)
    loss = kt.kl_div_from_logits(s, t, reduction=reduction, **options)
    loss.backward(torch.tensor(grad))
    eps = float(np.finfo(np.dtype(dtype)).eps)
    check(s.grad, exact.grad_input, eps, f"student, {options}, {reduction}")
    check(t.grad, exact.grad_target, eps, f"teacher, {options}, {reduction}")
