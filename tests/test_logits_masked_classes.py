"""Excluded classes (-inf logits) stay in the compiled float32 kernel (issue 20).

Top-k teachers stored as log-probabilities with ``-inf`` elsewhere, vocabularies padded
with ``-inf``, masked classes and whole rows of ``-inf``: the kernel of
``backends/_fused_logits.c`` evaluates them itself, forward and gradient, with the edge
values of docs/logits.md. The reference (``kldiv_spec.use_reference()``) is the judge:
NaN and infinities exactly where it has them, every finite value within a few units of
float32 roundoff of its own (the kernel's accuracy on ordinary rows is held to the exact
oracle by tests/test_backend_numpy_logits_fused.py). A spy on the kernel checks that it
ran, and one on the re-evaluation that no row but those holding NaN or ``+inf`` went
back to the reference.
"""

from __future__ import annotations

import itertools
import math
import types
from typing import Any

import numpy as np
import pytest
from _support import logits_fused_available, setenv

import kldiv_spec
from kldiv_spec import kl_div_from_logits, kl_div_from_logits_backward
from kldiv_spec.backends import _blocks_logits

pytestmark = pytest.mark.skipif(
    not logits_fused_available(),
    reason="the from-logits kernel is not built here, or this CPU has no AVX2",
)
inf, nan = math.inf, math.nan
REDUCTIONS = ("none", "sum", "batchmean", "mean", "rowmean")
TEMPERATURES = (0.5, 1.0, 4.0)
DIRECTIONS = ("forward", "reverse")


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """Every call through the fast path; record the kernel's blocks and the rows redone."""
    setenv(monkeypatch, "KLDIV_SPEC_NUMPY_MIN_ELEMENTS", "0")
    seen = types.SimpleNamespace(kernel_rows=0, redone=0)
    real = _blocks_logits._fused_logits
    fix_rows = _blocks_logits._fix_rows

    def rows_f32(*args: Any) -> Any:
        seen.kernel_rows += len(args[0])
        return real.rows_f32(*args)

    def counted_fix_rows(*args: Any) -> None:
        redo, kept = args[-1], args[-2]
        seen.redone += int(np.count_nonzero(redo if kept is None else redo & kept))
        fix_rows(*args)

    fake = types.SimpleNamespace(rows_f32=rows_f32, available=real.available)
    monkeypatch.setattr(_blocks_logits, "_fused_logits", fake)
    monkeypatch.setattr(_blocks_logits, "_fix_rows", counted_fix_rows)
    return seen


def assert_matches(got: Any, want: Any, what: str, scale: float | None = None) -> None:
    """NaN and +-inf exactly where ``want`` has them; finite values within float32 roundoff.

    The bound is 64 u of the largest finite magnitude (``scale`` if given) plus 64 u
    relative: a few units of the two evaluations' documented errors, far below any
    slip in the edge rules (a wrong 0, sign or class).
    """
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, what
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"NaN: {what}")
    infinite = np.isinf(want)
    np.testing.assert_array_equal(np.isinf(got), infinite, err_msg=f"inf: {what}")
    np.testing.assert_array_equal(got[infinite], want[infinite], err_msg=f"inf: {what}")
    finite = np.isfinite(want)
    if not finite.any():
        return
    u = 2.0**-24
    top = float(np.max(np.abs(want[finite]))) if scale is None else scale
    tol = 64 * u * (top + np.abs(want[finite])) + 1e-30
    err = np.abs(got[finite] - want[finite])
    assert (err <= tol).all(), f"{what}: error {err.max()} above {tol[np.argmax(err - tol)]}"


def reference(fn: Any, *args: Any, **options: Any) -> Any:
    with kldiv_spec.use_reference():
        return fn(*args, **options)


def check(s: np.ndarray, t: np.ndarray, spy: types.SimpleNamespace, **options: Any) -> None:
    """The value and (reductions) the student gradient: the kernel's against the reference's."""
    label = f"{options}"
    before = spy.kernel_rows
    got = kl_div_from_logits(s, t, **options)
    want = reference(kl_div_from_logits, s, t, **options)
    assert got.dtype == np.float32
    if options.get("reduction") == "none":
        with np.errstate(invalid="ignore"):
            scale = float(np.nanmax(np.abs(np.where(np.isinf(want), 0, want)), initial=0))
        assert_matches(got, want, label, scale)
    else:
        assert_matches(got, want, label)
        g = np.float32(0.75)
        gs, gt = kl_div_from_logits_backward(g, s, t, **options)
        ws, _ = reference(kl_div_from_logits_backward, g, s, t, **options)
        assert gt is None and gs.dtype == np.float32
        assert_matches(gs, ws, f"gradient {label}")
    assert spy.kernel_rows > before, "the kernel did not run"


# --------------------------------------------------------------------------- data


def dense(rows: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = rng.normal(0.0, 3.0, (rows, vocab)).astype(np.float32)
    t = (s + rng.normal(0.0, 2.0, (rows, vocab))).astype(np.float32)
    return s, t


def top_k(z: np.ndarray, k: int) -> np.ndarray:
    """The k largest logits of each row as log-probabilities, -inf elsewhere."""
    out = np.full_like(z, -inf)
    keep = np.argpartition(-z, k - 1, axis=1)[:, :k]
    kept = np.take_along_axis(z, keep, 1).astype(np.float64)
    top = kept.max(axis=1, keepdims=True)
    lse = top + np.log(np.exp(kept - top).sum(axis=1, keepdims=True))
    np.put_along_axis(out, keep, (kept - lse).astype(np.float32), 1)
    return out


def excluded(z: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """``z`` with a fraction of its classes at -inf (at least one kept per row)."""
    rng = np.random.default_rng(seed)
    out = z.copy()
    drop = rng.random(z.shape) < fraction
    drop[np.arange(len(z)), np.argmax(z, axis=1)] = False
    out[drop] = -inf
    return out


def mixed_rows(vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ordinary rows among every kind of row with excluded classes."""
    s, t = dense(12, vocab, seed)
    rng = np.random.default_rng(seed + 1)
    t[1] = top_k(t[1:2], 5)[0]  # a top-5 teacher
    s[2] = excluded(s[2:3], 0.1, seed)[0]  # the student excludes 10%: +inf forward
    both = rng.random(vocab) < 0.3
    both[0] = False
    s[3, both], t[3, both] = -inf, -inf  # both exclude the same classes
    s[4, ::3], t[4, 1::3] = -inf, -inf  # different classes: +inf either way
    s[5] = -inf  # a row of -inf only, student
    t[6] = -inf  # teacher
    s[7], t[7] = -inf, -inf  # both
    t[8] = top_k(t[8:9], 1)[0]  # a one-hot teacher
    s[9, : vocab // 2] = -inf  # the student excludes half, the teacher the other half
    t[9, vocab // 2 :] = -inf
    s[10] = top_k(s[10:11], 50 if vocab > 50 else 2)[0]  # a top-k student: +inf reverse
    return s, t


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_every_kind_of_excluded_class_every_reduction(
    direction: str, temperature: float, spy: types.SimpleNamespace
) -> None:
    s, t = mixed_rows(1000, int(temperature * 10))
    mask = np.ones(len(s), bool)
    mask[[0, 5, 9]] = False
    for reduction, masked in itertools.product(REDUCTIONS, (False, True)):
        options = {"reduction": reduction, "direction": direction, "temperature": temperature}
        if masked:
            options["mask"] = mask
        check(s, t, spy, **options)
    assert spy.redone == 0  # no row went back to the reference


@pytest.mark.parametrize("vocab", [1000, 32000])
@pytest.mark.parametrize("k", [1, 5, 50])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_top_k_teachers(vocab: int, k: int, direction: str, spy: types.SimpleNamespace) -> None:
    s, t = dense(6, vocab, k)
    t = top_k(t, k)
    for temperature, reduction in (
        (1.0, "batchmean"),
        (4.0, "sum"),
        (0.5, "none"),
        (4.0, "rowmean"),
    ):
        check(s, t, spy, reduction=reduction, direction=direction, temperature=temperature)
    if direction == "forward":  # the teacher's zeros cost nothing: a finite divergence
        assert np.isfinite(kl_div_from_logits(s, t, reduction="sum"))
    assert spy.redone == 0


@pytest.mark.parametrize("vocab", [1000, 32000])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_students_with_a_tenth_of_the_classes_excluded(
    vocab: int, direction: str, spy: types.SimpleNamespace
) -> None:
    s, t = dense(6, vocab, 7)
    s = excluded(s, 0.1, 8)
    for temperature, reduction in ((1.0, "batchmean"), (0.5, "sum"), (4.0, "none")):
        check(s, t, spy, reduction=reduction, direction=direction, temperature=temperature)
    # the same classes excluded by the teacher too: finite either way
    t = np.where(np.isinf(s), -inf, t).astype(np.float32)
    for temperature, reduction in ((1.0, "mean"), (4.0, "none")):
        check(s, t, spy, reduction=reduction, direction=direction, temperature=temperature)
        assert np.isfinite(kl_div_from_logits(s, t, reduction="sum", direction=direction))
    assert spy.redone == 0


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_rows_of_minus_infinity_among_ordinary_rows(
    direction: str, spy: types.SimpleNamespace
) -> None:
    """Padded rows of -inf on either side: NaN (no softmax) unless the mask drops them."""
    s, t = dense(8, 333, 3)
    s[[1, 6]] = -inf
    t[[2, 6]] = -inf
    terms = kl_div_from_logits(s, t, reduction="none", direction=direction)
    with np.errstate(invalid="ignore"):
        rows = terms.sum(axis=1)
    assert np.isnan(rows[[1, 2, 6]]).all() and np.isfinite(rows[[0, 3, 4, 5, 7]]).all()
    kept = np.ones(8, bool)
    kept[[1, 2, 6]] = False
    for reduction in REDUCTIONS:
        options = {"reduction": reduction, "direction": direction, "temperature": 2.0}
        check(s, t, spy, **options)
        check(s, t, spy, mask=kept, **options)
        if reduction != "none":
            assert np.isfinite(kl_div_from_logits(s, t, mask=kept, **options))
    assert spy.redone == 0


def test_nan_and_plus_infinity_rows_still_go_to_the_reference(spy: types.SimpleNamespace) -> None:
    s, t = mixed_rows(64, 2)
    s[0, 3], t[11, 5] = nan, inf
    for direction, reduction in itertools.product(DIRECTIONS, ("none", "sum")):
        check(s, t, spy, reduction=reduction, direction=direction)
    # rows 0 and 11 of each pass that computes a divergence: the four forward passes and the
    # reverse backward (the forward-direction backward is q - p alone, NaN there already)
    assert spy.redone == 5 * 2


def test_the_kernel_marks_only_nan_and_plus_infinity_rows() -> None:
    """A direct call: the caller's marker exactly for rows holding NaN or +inf (here also
    a quotient z / T that overflows); a genuine NaN divergence for rows of -inf only."""
    s, t = mixed_rows(40, 5)
    s[0, 1], t[11, 2] = nan, inf
    big = np.float32(3e38)
    s[3, 0] = big  # big / 0.5 overflows to +inf
    f = _blocks_logits._fused_logits
    for reverse in (False, True):
        kl = np.zeros(len(s))
        grad, terms = np.empty_like(s), np.empty_like(s)
        assert f.rows_f32(s, t, 40, kl, grad, terms, 0.5, 1.0, 1.0, reverse) is None
        marked = kl.view(np.uint64) == np.uint64(_blocks_logits.REDO_BITS)
        np.testing.assert_array_equal(np.flatnonzero(marked), [0, 3, 11])
        assert np.isnan(kl[[5, 6, 7]]).all()
        assert np.isinf(kl[[4, 9]]).all() and (kl[[4, 9]] > 0).all()
        if reverse:  # the student keeps classes the top-k teachers exclude
            assert (kl[[1, 8]] == inf).all()
        else:  # the teacher's exclusions cost nothing
            assert np.isfinite(kl[[1, 8]]).all()


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_torch_cpu_tensors_take_the_kernel_student_and_teacher_gradients(
    direction: str, spy: types.SimpleNamespace
) -> None:
    """Loss and student gradient in the kernel's pass; the teacher's from the reference."""
    torch = pytest.importorskip("torch")
    s, t = mixed_rows(257, 4)
    kept = np.ones(len(s), bool)
    kept[[5, 6, 7]] = False  # the rows without a softmax, whose gradients are NaN
    for temperature, reduction in ((1.0, "batchmean"), (4.0, "sum"), (0.5, "rowmean")):
        options = {"direction": direction, "temperature": temperature, "reduction": reduction}
        for teacher_grad in (False, True):
            sa = torch.tensor(s, requires_grad=True)
            ta = torch.tensor(t, requires_grad=teacher_grad)
            before = spy.kernel_rows
            loss = kldiv_spec.kl_div_from_logits(sa, ta, mask=torch.tensor(kept), **options)
            assert spy.kernel_rows > before
            loss.backward()
            with kldiv_spec.use_reference():
                sr = torch.tensor(s, requires_grad=True)
                tr = torch.tensor(t, requires_grad=teacher_grad)
                want = kldiv_spec.kl_div_from_logits(sr, tr, mask=torch.tensor(kept), **options)
                want.backward()
            assert_matches(loss.detach().numpy(), want.detach().numpy(), f"loss {options}")
            assert_matches(sa.grad.numpy(), sr.grad.numpy(), f"student {options}")
            if teacher_grad:
                assert_matches(ta.grad.numpy(), tr.grad.numpy(), f"teacher {options}")
    assert spy.redone == 0


def handover_rows(vocab: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows for the eight-class blocks of kl_special_row and its class-by-class walk: the
    weighting distribution (here the first array) keeps classes the other excludes, with a
    weight surely positive, surely 0 (a log-probability under -105) or between the two
    (-105 to -87, which only the reference can settle), in the first block, a middle one
    or the tail of a row whose length is not a multiple of 8."""
    w, o = dense(8, vocab, 11)
    w = (w / 3).astype(np.float32)  # log Z of a few units only
    top = w.max(axis=1) / np.float32(temperature)
    zero = (top - 300) * temperature  # a log-probability far below -105
    unsure = (top - 95) * temperature  # a log-probability near -99
    last = vocab - 1
    o[0, ::2] = -inf  # positive conflicts in every block: +inf
    o[1, :last] = -inf  # surely-0 weights where excluded, but for a positive one in the tail
    w[1, :last] = zero[1]
    w[1, :8] = w[0, :8]
    o[1, :8] = o[0, :8]  # ...and some ordinary classes first
    o[2, 0] = -inf  # one positive conflict, in the first block
    o[3, [5, 20]] = -inf  # a positive conflict, then an unsure one in a middle block
    w[3, 20] = unsure[3]
    o[4, [5, last]] = -inf  # a positive conflict, then an unsure one in the tail
    w[4, last] = unsure[4]
    o[5, 30] = -inf  # an unsure weight without conflict, then a positive conflict
    w[5, 9] = unsure[5]
    o[6, 3:40:4] = -inf  # surely-0 weights meet the exclusions, and one unsure weight
    w[6, 3:40:4] = zero[6]
    w[6, 35] = unsure[6]
    return w, o  # row 7: ordinary


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_eight_class_blocks_and_the_class_by_class_walk_agree(
    temperature: float, direction: str, spy: types.SimpleNamespace
) -> None:
    w, o = handover_rows(43, temperature)
    s, t = (w, o) if direction == "reverse" else (o, w)
    f = _blocks_logits._fused_logits
    kl = np.zeros(len(s))
    grad, terms = np.empty_like(s), np.empty_like(s)
    reverse = direction == "reverse"
    assert f.rows_f32(s, t, 43, kl, grad, terms, temperature, 1.0, 1.0, reverse) is None
    marked = kl.view(np.uint64) == np.uint64(_blocks_logits.REDO_BITS)
    # an unsure weight leaves the row to the reference where its value matters: with a
    # conflict, or for the reverse gradient (row 5)
    redone = [3, 4, 5, 6] if reverse else [3, 4, 6]
    np.testing.assert_array_equal(np.flatnonzero(marked), redone)
    assert (kl[[0, 1, 2]] == inf).all() and np.isfinite(kl[7])
    if not reverse:
        assert kl[5] == inf
    for reduction in REDUCTIONS:
        check(s, t, spy, reduction=reduction, direction=direction, temperature=temperature)


# --------------------------------------------------------------------------- float64


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_float64_rows_with_excluded_classes_stay_in_the_blocked_path(
    direction: str, spy: types.SimpleNamespace
) -> None:
    """float64 (NumPy's ufuncs): a class the weighting side excludes is a 0 term, not NaN.

    Such rows used to go back to the reference whole. Now only rows that are NaN in the
    specification (NaN or +inf logits, a side without a softmax) and, for the reverse
    gradient, rows whose divergence is +inf go back; top-k teachers (forward) and
    students with excluded classes (reverse) never do.
    """
    s32, t32 = mixed_rows(300, 7)
    s, t = s32.astype(np.float64), t32.astype(np.float64)
    for reduction in ("none", "sum", "batchmean"):
        options = {"reduction": reduction, "direction": direction, "temperature": 2.0}
        got = kl_div_from_logits(s, t, **options)
        want = reference(kl_div_from_logits, s, t, **options)
        assert got.dtype == np.float64
        assert_matches(got, want, f"float64 {options}")
        if reduction != "none":
            gs, _ = kl_div_from_logits_backward(0.5, s, t, **options)
            ws, _ = reference(kl_div_from_logits_backward, 0.5, s, t, **options)
            assert_matches(gs, ws, f"float64 gradient {options}")
    spy.redone = 0
    finite_side = top_k(dense(8, 300, 1)[1], 50) if direction == "forward" else None
    s, t = dense(8, 300, 1)
    if direction == "forward":
        t = finite_side
    else:
        s = excluded(s, 0.1, 2)
    s, t = s.astype(np.float64), t.astype(np.float64)
    kl_div_from_logits(s, t, direction=direction)
    kl_div_from_logits_backward(1.0, s, t, direction=direction)
    assert spy.redone == 0
