"""``kl_div_from_logits``: the exact oracle, the composition, edges, masks, gradients, laziness.

Values are checked against :mod:`kldiv_spec.conformance.oracle_logits` (mpmath)
on every backend, through the fast path and the reference (the ``evaluation``
fixture: its ``fast_path`` run lowers the size thresholds and fails unless a fast
path took a call, ``checks_fast_path``); against PyTorch's
composition ``T**2 * kl_div(log_softmax(s / T), softmax(t / T))`` where torch
is installed. JAX compiles per shape, so few shapes are used throughout.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import _support
import array_api_compat
import numpy as np
import pytest

import kldiv_spec
from kldiv_spec import LOGITS_REDUCTIONS, kl_div_from_logits, kl_div_from_logits_backward
from kldiv_spec.conformance import oracle_logits as oracle

inf, nan = math.inf, math.nan

pytestmark = pytest.mark.checks_fast_path


# Dask results are computed inside np.errstate here, as these tests always did: whether
# computing them is silent is not what they check.
to_numpy = functools.partial(_support.to_numpy, quiet=True)


def logits(shape: tuple[int, ...], seed: int, spread: float = 3.0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    s = rng.normal(0.0, spread, size=shape)
    t = s + rng.normal(0.0, spread / 2, size=shape)
    return s, t


def assert_close(got: np.ndarray, want: np.ndarray, tol: np.ndarray | float, what: str) -> None:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, what
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=what)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite], want[~finite], err_msg=what)
    with np.errstate(invalid="ignore"):
        err = np.where(finite, np.abs(got - want), 0.0)
    bad = finite & ~(err <= tol)
    assert not bad.any(), (
        f"{what}: error {err[bad]} above bound {np.broadcast_to(tol, err.shape)[bad]}"
    )


def check_value(xp: Any, s: np.ndarray, t: np.ndarray, dtype: Any = None, **options: Any) -> None:
    dtype = dtype or xp.float64
    mask = options.pop("mask", None)
    sa, ta = xp.asarray(s, dtype=dtype), xp.asarray(t, dtype=dtype)
    ma = None if mask is None else xp.asarray(mask)
    out = kl_div_from_logits(sa, ta, mask=ma, **options)
    assert out.dtype == sa.dtype
    s_in, t_in = to_numpy(sa), to_numpy(ta)  # the rounded operands
    exact = oracle.from_logits(s_in, t_in, mask=mask, **options)
    if options.get("reduction", "batchmean") == "none":
        assert_close(to_numpy(out), exact.terms, oracle.pointwise_tolerance(exact), str(options))
    else:
        value, tol = oracle.reduce_logits(exact)
        assert out.shape == ()
        assert_close(to_numpy(out), np.asarray(value), tol, str(options))


CASES = [
    {"reduction": "batchmean"},
    {"reduction": "sum", "temperature": 2.5, "direction": "reverse"},
    {"reduction": "none", "temperature": 0.5},
    {"reduction": "mean", "scale_by_temperature_squared": False, "temperature": 3.0},
    {"reduction": "rowmean", "direction": "reverse", "temperature": 4.0},
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(map(str, o.values())))
def test_values_match_the_exact_oracle(xp, evaluation, options):
    s, t = logits((3, 7), 1)
    check_value(xp, s, t, **dict(options))


def test_float32_and_a_class_axis_in_the_middle(xp, evaluation):
    """float32, the class axis last (which the fast paths take) and in the middle (which
    NumPy's and PyTorch's leave to the reference)."""
    s, t = logits((2, 5, 3), 2, spread=10.0)
    for options in (
        {"reduction": "sum"},
        {"reduction": "none", "axis": -1},
        {"reduction": "sum", "axis": 1},
        {"reduction": "none", "axis": -2},
    ):
        check_value(xp, s, t, dtype=xp.float32, temperature=2.0, **options)


def test_masks(xp, evaluation):
    s, t = logits((2, 3, 4), 3)
    s[0, 1] = nan  # garbage in a masked row contributes nothing
    t[1, 2] = inf
    mask = np.asarray([[True, False, True], [True, True, False]])
    for reduction in ("sum", "rowmean", "mean", "none"):
        check_value(xp, s, t, reduction=reduction, mask=mask, temperature=2.0)
    s2, t2 = logits((4, 5), 4)
    check_value(xp, s2, t2, reduction="batchmean", mask=np.asarray([True, False, True, True]))
    # a mask that broadcasts over the rows
    check_value(xp, s, t, reduction="rowmean", mask=np.asarray([[True], [True]]))


def test_every_row_masked_gives_zero_and_zero_gradients(xp, evaluation):
    s, t = logits((3, 4), 5)
    mask = xp.asarray([False, False, False])
    sa, ta = xp.asarray(s), xp.asarray(t)
    for reduction in ("sum", "batchmean", "rowmean", "mean"):
        out = kl_div_from_logits(sa, ta, reduction=reduction, mask=mask)
        assert float(to_numpy(out)) == 0.0
        gs, gt = kl_div_from_logits_backward(
            1.0, sa, ta, reduction=reduction, mask=mask, target_grad=True
        )
        assert not to_numpy(gs).any()
        assert not to_numpy(gt).any()


def edge_rows() -> tuple[np.ndarray, np.ndarray]:
    """Rows exercising every edge rule of docs/logits.md (4 classes each)."""
    s = np.asarray(
        [
            [0.0, -inf, 1.0, 2.0],  # teacher and student exclude class 1: it contributes 0
            [0.0, -inf, 1.0, 2.0],  # student excludes a class the teacher keeps: +inf
            [-inf, -inf, -inf, -inf],  # student excludes everything: NaN
            [0.0, 1.0, nan, 2.0],  # NaN: NaN
            [0.0, inf, 1.0, 2.0],  # +inf: NaN
            [1e308, -1e308, 0.0, 5.0],  # huge but finite: stable
            [0.0, 0.0, 0.0, 0.0],
        ]
    )
    t = np.asarray(
        [
            [1.0, -inf, 0.0, 2.0],
            [1.0, 0.5, 0.0, 2.0],
            [1.0, 0.5, 0.0, 2.0],
            [1.0, 0.5, 0.0, 2.0],
            [1.0, 0.5, 0.0, 2.0],
            [1e308, -1e308, 1.0, 3.0],
            [-inf, -inf, -inf, -inf],  # teacher excludes everything: NaN
        ]
    )
    return s, t


def test_edge_values_per_row(xp, evaluation):
    s, t = edge_rows()
    sa, ta = xp.asarray(s), xp.asarray(t)
    for direction in ("forward", "reverse"):
        terms = to_numpy(kl_div_from_logits(sa, ta, reduction="none", direction=direction))
        exact = oracle.from_logits(s, t, reduction="none", direction=direction)
        assert_close(terms, exact.terms, oracle.pointwise_tolerance(exact), direction)
        with np.errstate(invalid="ignore"):
            rows = terms.sum(axis=1)
        if direction == "forward":
            assert terms[0, 1] == 0.0
            assert rows[1] == inf
        assert np.isnan(rows[2:5]).all()
        assert np.isfinite(rows[5])
        assert np.isnan(rows[6])
        # each row alone, reduced
        for i in range(len(s)):
            check_value(xp, s[i : i + 1], t[i : i + 1], reduction="sum", direction=direction)


def test_empty_class_axis_and_empty_batch(xp):  # the fast paths leave empty arrays alone
    empty_vocab = xp.zeros((3, 0), dtype=xp.float64)
    assert float(to_numpy(kl_div_from_logits(empty_vocab, empty_vocab, reduction="sum"))) == 0.0
    assert to_numpy(kl_div_from_logits(empty_vocab, empty_vocab, reduction="none")).shape == (3, 0)
    empty_batch = xp.zeros((0, 4), dtype=xp.float64)
    assert float(to_numpy(kl_div_from_logits(empty_batch, empty_batch, reduction="sum"))) == 0.0
    out = kl_div_from_logits(empty_batch, empty_batch, reduction="batchmean")
    assert math.isnan(float(to_numpy(out)))  # 0 / 0, as kl_div's empty batchmean
    gs, _ = kl_div_from_logits_backward(1.0, empty_batch, empty_batch, reduction="sum")
    assert to_numpy(gs).shape == (0, 4)


def test_zero_at_identity_and_non_negative(xp, evaluation):
    s, t = logits((4, 6), 6)
    sa, ta = xp.asarray(s), xp.asarray(t)
    for direction in ("forward", "reverse"):
        same = to_numpy(kl_div_from_logits(sa, sa, reduction="sum", direction=direction))
        assert abs(float(same)) <= 1e-14
        assert float(to_numpy(kl_div_from_logits(sa, ta, direction=direction))) > 0


# --------------------------------------------------------------------------- gradients


def check_gradients(xp: Any, s: np.ndarray, t: np.ndarray, g: Any = 1.0, **options: Any) -> None:
    mask = options.pop("mask", None)
    sa, ta = xp.asarray(s), xp.asarray(t)
    ma = None if mask is None else xp.asarray(mask)
    ga = g if isinstance(g, float) else xp.asarray(g)
    gs, gt = kl_div_from_logits_backward(ga, sa, ta, mask=ma, target_grad=True, **options)
    exact = oracle.from_logits(s, t, mask=mask, grad_output=g, **options)
    tol_s, tol_t = oracle.gradient_tolerance(exact)
    assert_close(to_numpy(gs), exact.grad_input, tol_s, f"student {options}")
    assert_close(to_numpy(gt), exact.grad_target, tol_t, f"teacher {options}")
    only_s, none_t = kl_div_from_logits_backward(ga, sa, ta, mask=ma, **options)
    assert none_t is None
    assert_close(to_numpy(only_s), exact.grad_input, tol_s, f"student alone {options}")


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(map(str, o.values())))
def test_gradients_match_the_exact_oracle(xp, evaluation, options):
    none = options["reduction"] == "none"
    if evaluation == "fast_path" and none and not array_api_compat.is_jax_namespace(xp):
        pytest.skip("only JAX's fast path takes the gradient of 'none': the reference run")
    s, t = logits((3, 5), 7)
    g = np.linspace(-1.0, 2.0, 15).reshape(3, 5) if options["reduction"] == "none" else 0.75
    check_gradients(xp, s, t, g, **dict(options))


def test_gradients_with_a_mask_and_edges(xp, evaluation):
    s, t = edge_rows()
    mask = np.asarray([True, False, False, False, False, True, False])
    for direction in ("forward", "reverse"):
        check_gradients(xp, s, t, 1.0, reduction="sum", mask=mask, direction=direction)
        g = np.ones(s.shape)
        check_gradients(xp, s, t, g, reduction="none", mask=mask, direction=direction)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_beta_values_and_gradients_match_the_exact_oracle(xp, beta):
    """The generalised Jensen-Shannon divergence on every library (tests/test_jsd.py: more).

    No fast path takes ``beta``: the reference's, whatever the dispatch."""
    s, t = logits((3, 5), 8)
    s[0, 1] = -inf  # a class the student alone excludes
    t[1, 2] = -inf  # one the teacher alone excludes
    s[2, 3] = t[2, 3] = -inf  # one both exclude
    mask = np.asarray([True, False, True])
    for options in (
        {"reduction": "none", "temperature": 2.0},
        {"reduction": "rowmean", "mask": mask, "scale_by_temperature_squared": False},
    ):
        check_value(xp, s, t, beta=beta, **dict(options))
        g = np.linspace(-1.0, 2.0, 15).reshape(3, 5) if options["reduction"] == "none" else 0.5
        check_gradients(xp, s, t, g, beta=beta, **dict(options))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("reduction", ["none", "rowmean"])
def test_gradients_match_finite_differences(direction, reduction):
    s, t = logits((2, 3, 4), 8)
    mask = np.asarray([[True, False, True], [True, True, True]])
    options = {
        "temperature": 1.5,
        "reduction": reduction,
        "direction": direction,
        "axis": 1,
        "mask": np.asarray([True, False, True, True]),
    }
    del mask
    w = np.cos(np.arange(s.size)).reshape(s.shape)

    def f(a: np.ndarray, b: np.ndarray) -> float:
        out = kl_div_from_logits(a, b, **options)
        return float(np.sum(out * w)) if reduction == "none" else float(out)

    g = w if reduction == "none" else 1.0
    gs, gt = kl_div_from_logits_backward(g, s, t, target_grad=True, **options)
    h = 1e-6
    for which, grad in ((0, gs), (1, gt)):
        fd = np.zeros(s.shape)
        for idx in np.ndindex(s.shape):
            args = [s.copy(), t.copy()]
            args[which][idx] += h
            up = f(*args)
            args[which][idx] -= 2 * h
            fd[idx] = (up - f(*args)) / (2 * h)
        np.testing.assert_allclose(grad, fd, atol=1e-8, err_msg=f"argument {which}")


def test_torch_autograd_gradcheck_and_double_backward(evaluation):
    torch = pytest.importorskip("torch")
    s, t = logits((3, 4), 9)
    sa = torch.tensor(s, requires_grad=True)
    ta = torch.tensor(t, requires_grad=True)
    mask = torch.tensor([True, False, True])
    for direction in ("forward", "reverse"):
        for reduction in ("none", "sum", "batchmean"):

            def f(a: Any, b: Any, r: str = reduction, d: str = direction) -> Any:
                return kl_div_from_logits(a, b, temperature=2.0, reduction=r, direction=d)

            assert torch.autograd.gradcheck(f, (sa, ta))
            assert torch.autograd.gradgradcheck(f, (sa, ta))
        masked = kl_div_from_logits(sa, ta, reduction="rowmean", mask=mask, direction=direction)
        gs, gt = torch.autograd.grad(masked, (sa, ta))
        options = {"reduction": "rowmean", "mask": mask.numpy(), "direction": direction}
        exact = oracle.from_logits(s, t, grad_output=1.0, **options)
        tol_s, tol_t = oracle.gradient_tolerance(exact)
        assert_close(gs.numpy(), exact.grad_input, tol_s, f"student {direction}")
        assert_close(gt.numpy(), exact.grad_target, tol_t, f"teacher {direction}")


def test_torch_teacher_without_grad_gets_none(evaluation):
    torch = pytest.importorskip("torch")
    s, t = logits((2, 3), 10)
    sa = torch.tensor(s, requires_grad=True)
    ta = torch.tensor(t)
    kl_div_from_logits(sa, ta, temperature=2.0).backward()
    assert sa.grad is not None and ta.grad is None


# --------------------------------------------------------------------------- the composition


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean", "mean"])
def test_agrees_with_the_torch_composition(reduction, evaluation):
    torch = pytest.importorskip("torch")
    if evaluation == "fast_path" and reduction == "none":
        pytest.skip("PyTorch's fast path leaves 'none' to the reference: the reference run")
    functional = torch.nn.functional
    s, t = logits((2, 3, 6), 11)  # 3-d: the 'batchmean' trap divides by 2, not 6
    temperature = 2.0
    for dtype in (torch.float64, torch.float32):
        sa = torch.tensor(s, dtype=dtype, requires_grad=True)
        ta = torch.tensor(t, dtype=dtype, requires_grad=True)
        want = (
            functional.kl_div(
                functional.log_softmax(sa / temperature, dim=-1),
                functional.softmax(ta / temperature, dim=-1),
                reduction=reduction,
            )
            * temperature**2
        )
        sb = sa.detach().clone().requires_grad_()
        tb = ta.detach().clone().requires_grad_()
        got = kl_div_from_logits(sb, tb, temperature=temperature, reduction=reduction)
        rtol = 1e-12 if dtype == torch.float64 else 2e-5
        np.testing.assert_allclose(got.detach(), want.detach(), rtol=rtol, atol=rtol * 1e-2)
        w = torch.cos(torch.arange(want.numel(), dtype=dtype)).reshape(want.shape)
        for a, b in zip(
            torch.autograd.grad((want * w).sum(), (sa, ta)),
            torch.autograd.grad((got * w).sum(), (sb, tb)),
            strict=True,
        ):
            np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * 1e-1)
    if reduction == "batchmean":
        total = kl_div_from_logits(sb, tb, temperature=temperature, reduction="sum")
        per_token = kl_div_from_logits(sb, tb, temperature=temperature, reduction="rowmean")
        torch.testing.assert_close(got, total / 2)  # input.shape[0]
        torch.testing.assert_close(per_token, total / 6)  # 2 * 3 rows


def test_torch_half_precision_is_computed_in_float32():
    torch = pytest.importorskip("torch")
    s, t = logits((3, 5), 12)
    for dtype in (torch.float16, torch.bfloat16):
        sa = torch.tensor(s, dtype=dtype, requires_grad=True)
        ta = torch.tensor(t, dtype=dtype)
        got = kl_div_from_logits(sa, ta, temperature=2.0)
        want = kl_div_from_logits(sa.detach().float(), ta.float(), temperature=2.0)
        assert got.dtype == dtype
        assert got.float().item() == want.to(dtype).float().item()
        got.backward()
        assert sa.grad.dtype == dtype


# --------------------------------------------------------------------------- lazy backends


def test_dask_stays_lazy():
    da = pytest.importorskip("dask.array")
    import dask

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("Dask computed something inside kldiv_spec")

    s, t = logits((6, 5), 13)
    mask = np.asarray([True, True, False, True, False, True])
    sd, td = da.from_array(s, chunks=(2, 5)), da.from_array(t, chunks=(3, 5))
    md = da.from_array(mask, chunks=2)
    with dask.config.set(scheduler=refuse):
        out = kl_div_from_logits(sd, td, temperature=2.0, reduction="rowmean", mask=md)
        gs, gt = kl_div_from_logits_backward(
            1.0, sd, td, temperature=2.0, reduction="rowmean", mask=md, target_grad=True
        )
    assert all(isinstance(a, da.Array) for a in (out, gs, gt))
    want = kl_div_from_logits(s, t, temperature=2.0, reduction="rowmean", mask=mask)
    ws, wt = kl_div_from_logits_backward(
        1.0, s, t, temperature=2.0, reduction="rowmean", mask=mask, target_grad=True
    )
    np.testing.assert_allclose(to_numpy(out), want, rtol=1e-13)
    np.testing.assert_allclose(to_numpy(gs), ws, rtol=1e-13, atol=1e-17)
    np.testing.assert_allclose(to_numpy(gt), wt, rtol=1e-13, atol=1e-17)


def test_jax_jit_and_grad(evaluation):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    s, t = logits((3, 4), 14)
    mask = np.asarray([True, False, True])
    for direction in ("forward", "reverse"):

        def f(a: Any, b: Any, m: Any, d: str = direction) -> Any:
            return kl_div_from_logits(a, b, temperature=2.0, mask=m, direction=d)

        args = (jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask))
        eager = f(*args)
        np.testing.assert_allclose(jax.jit(f)(*args), eager, rtol=1e-14)
        gs, gt = jax.jit(jax.grad(f, argnums=(0, 1)))(*args)
        options = {"temperature": 2.0, "mask": mask, "direction": direction}
        exact = oracle.from_logits(s, t, grad_output=1.0, **options)
        value, tol = oracle.reduce_logits(exact)
        assert_close(np.asarray(eager), np.asarray(value), tol, f"value {direction}")
        tol_s, tol_t = oracle.gradient_tolerance(exact)
        assert_close(np.asarray(gs), exact.grad_input, tol_s, f"student {direction}")
        assert_close(np.asarray(gt), exact.grad_target, tol_t, f"teacher {direction}")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"temperature": 0.0}, ValueError, "temperature must be a positive finite"),
        ({"temperature": -1.0}, ValueError, "temperature must be a positive finite"),
        ({"temperature": inf}, ValueError, "temperature must be a positive finite"),
        ({"temperature": nan}, ValueError, "temperature must be a positive finite"),
        ({"temperature": True}, TypeError, "temperature must be a positive finite"),
        ({"temperature": "2"}, TypeError, "temperature must be a positive finite"),
        ({"reduction": "tokenmean"}, ValueError, "valid value for reduction"),
        ({"direction": "both"}, ValueError, "valid value for direction"),
        ({"axis": 2}, ValueError, "axis 2 is out of range"),
        ({"axis": 1.0}, TypeError, "axis must be an int"),
        ({"scale_by_temperature_squared": 1}, TypeError, "scale_by_temperature_squared"),
        ({"mask": np.ones(3)}, TypeError, "mask must be a boolean array"),
        ({"mask": np.ones(4, bool)}, ValueError, "mask of shape"),
        ({"mask": [True, False, True]}, TypeError, "mask must be an array"),
    ],
)
def test_errors_name_the_argument(options, error, match):
    s, t = logits((3, 5), 15)
    with pytest.raises(error, match=match):
        kl_div_from_logits(s, t, **options)


def test_more_errors():
    s, t = logits((3, 5), 16)
    with pytest.raises(ValueError, match="same shape"):
        kl_div_from_logits(s, t[:2])
    with pytest.raises(TypeError, match="real floating-point"):
        kl_div_from_logits(s.astype(int), t)
    with pytest.raises(TypeError, match="input must be an array"):
        kl_div_from_logits(s.tolist(), t)
    with pytest.raises(ValueError, match="at least one dimension"):
        kl_div_from_logits(np.asarray(1.0), np.asarray(1.0))
    s3, t3 = logits((2, 3, 5), 17)
    with pytest.raises(ValueError, match="'rowmean'"):
        kl_div_from_logits(s3, t3, reduction="batchmean", mask=np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="grad_output of shape"):
        kl_div_from_logits_backward(np.ones(3), s, t)
    with pytest.raises(TypeError, match="target_grad must be a bool"):
        kl_div_from_logits_backward(1.0, s, t, target_grad=1)


def test_reductions_constant():
    assert LOGITS_REDUCTIONS == ("none", "batchmean", "sum", "mean", "rowmean")
    assert kldiv_spec.LOGITS_REDUCTIONS is LOGITS_REDUCTIONS


# --------------------------------------------------------------------------- fast paths


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_fast_paths_take_small_calls_when_told_and_match_the_oracle(library, monkeypatch):
    _support.setenv(monkeypatch, "KLDIV_SPEC_NUMPY_MIN_ELEMENTS", "0")
    s, t = edge_rows()
    s2, t2 = logits((5, 4), 18)
    s, t = np.concatenate([s, s2]), np.concatenate([t, t2])
    mask = np.ones(len(s), bool)
    mask[[3, 8]] = False
    if library == "torch":
        torch = pytest.importorskip("torch")
        from kldiv_spec.backends import logits_torch as fast

        calls = _support.spy_fast_paths(monkeypatch, [fast])
        xp = array_api_compat.array_namespace(torch.zeros(1))
        sa = torch.tensor(s, requires_grad=True)
        loss = kl_div_from_logits(sa, torch.tensor(t), temperature=2.0, mask=torch.tensor(mask))
        assert type(loss.grad_fn).__name__ == "_FusedFromLogitsBackward"
    else:
        from kldiv_spec.backends import logits_numpy as fast

        calls = _support.spy_fast_paths(monkeypatch, [fast])
        xp = array_api_compat.array_namespace(np.zeros(1))
    for direction in ("forward", "reverse"):
        for options in (
            {"reduction": "sum"},
            {"reduction": "none", "temperature": 2.0},
            {"reduction": "rowmean", "mask": mask, "temperature": 0.5},
            {"reduction": "batchmean", "mask": mask},
        ):
            calls.clear()
            check_value(xp, s, t, direction=direction, **dict(options))
            assert calls.took("kl_div_from_logits") == 1, calls
            if options["reduction"] != "none":
                calls.clear()
                check_gradients(xp, s, t, 0.5, direction=direction, **dict(options))
                # the student's gradient alone: one fused pass (the teacher's: the reference)
                assert calls.took("kl_div_from_logits_backward") >= 1, calls


# --------------------------------------------------------------------------- torch front end


def test_torch_front_end_with_dim_and_module():
    torch = pytest.importorskip("torch")
    import kldiv_spec.torch as kt

    s, t = logits((2, 5, 3), 19)
    sa, ta = torch.tensor(s, requires_grad=True), torch.tensor(t)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    criterion = kt.KLDivFromLogitsLoss(temperature=2.0, reduction="rowmean", dim=1)
    assert isinstance(criterion, torch.nn.Module)
    assert "temperature=2.0, reduction='rowmean', dim=1" in repr(criterion)
    loss = criterion(sa, ta, mask=mask)
    want = kl_div_from_logits(
        s, t, temperature=2.0, reduction="rowmean", axis=1, mask=mask.numpy()
    )
    np.testing.assert_allclose(loss.item(), want, rtol=1e-14)
    functional = kt.kl_div_from_logits(sa, ta, 2.0, "rowmean", 1, mask=mask)
    assert functional.item() == loss.item()
    loss.backward()
    assert sa.grad.shape == sa.shape
    for bad, error in (
        ({"temperature": 0}, ValueError),
        ({"reduction": "token"}, ValueError),
        ({"dim": 1.5}, TypeError),
        ({"direction": "sideways"}, ValueError),
        ({"scale_by_temperature_squared": None}, TypeError),
    ):
        with pytest.raises(error, match=next(iter(bad))):
            kt.KLDivFromLogitsLoss(**bad)


def test_dask_compute_is_silent_on_edge_values():
    da = pytest.importorskip("dask.array")
    import warnings

    s, t = edge_rows()
    mask = np.ones(len(s), bool)
    mask[4] = False
    sd, td = da.from_array(s, chunks=(3, 2)), da.from_array(t, chunks=(2, 4))
    md = da.from_array(mask, chunks=3)
    for direction in ("forward", "reverse"):
        for reduction in ("none", "sum", "rowmean"):
            out = kl_div_from_logits(sd, td, reduction=reduction, direction=direction, mask=md)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                got = out.compute(scheduler="synchronous")
            with kldiv_spec.use_reference():
                want = kl_div_from_logits(
                    s, t, reduction=reduction, direction=direction, mask=mask
                )
            np.testing.assert_allclose(got, want, rtol=1e-14)
        gs, gt = kl_div_from_logits_backward(
            1.0, sd, td, direction=direction, mask=md, reduction="sum", target_grad=True
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            gs, gt = (a.compute(scheduler="synchronous") for a in (gs, gt))
        with kldiv_spec.use_reference():
            ws, wt = kl_div_from_logits_backward(
                1.0, s, t, direction=direction, mask=mask, reduction="sum", target_grad=True
            )
        np.testing.assert_allclose(gs, ws, rtol=1e-14, atol=1e-300)
        np.testing.assert_allclose(gt, wt, rtol=1e-14, atol=1e-300)


def test_jax_without_64_bit_types_is_silent():
    """A mask's count needs no int64 (JAX without x64 would warn and truncate it)."""
    pytest.importorskip("jax")
    import subprocess
    import sys

    code = (
        "import jax.numpy as jnp, kldiv_spec\n"
        "s = jnp.arange(12.0).reshape(3, 4) / 7\n"
        "m = jnp.asarray([True, False, True])\n"
        "out = kldiv_spec.kl_div_from_logits(s, s[::-1], mask=m, reduction='rowmean')\n"
        "g, _ = kldiv_spec.kl_div_from_logits_backward(1.0, s, s[::-1], mask=m)\n"
        "assert out.dtype == jnp.float32 and g.dtype == jnp.float32\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "JAX_ENABLE_X64": "0"},
    )
    assert done.returncode == 0, done.stderr
