"""Conformance suite v2 (issue 10): no sampling gaps where behaviour is discrete.

The gradient edge table and the broadcasting divisors run as fixed cases, so
the bugs that used to slip through on some hypothesis seeds are rejected on
every seed, and the correct implementations pass on every seed.
"""

from __future__ import annotations

import math
import re
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kldiv_spec.conformance import PROPERTIES, numpy_impl, run
from kldiv_spec.conformance.implementations import Implementation
from kldiv_spec.conformance.namespaces import installed_backends
from kldiv_spec.conformance.strategies import DIVISOR_SHAPES, SPEC_EDGE_ROWS, edge_pairs

SEEDS = range(16)

#: Seed-independent properties (fixed cases) that close the gaps of issue 10.
FIXED = (
    "semantics.broadcast_divisors",
    "gradients.edge_values",
    "gradients.broadcast_divisors",
)
#: The hypothesis properties around them, run on every seed with few examples.
SAMPLED = ("semantics.broadcasting", "semantics.zero_dim", "gradients.input", "gradients.target")

#: The bugs of issue 10 (built-in mutants) and the fixed property that isolates each.
GAP_MUTANTS = {
    "batchmean_broadcast_rows": "semantics.broadcast_divisors",
    "batchmean_broadcast_rows_backward": "gradients.broadcast_divisors",
    "log_target_grad_zero_at_neg_inf": "gradients.edge_values",
}


def _failures(report: Any) -> list[tuple[str, str]]:
    return [(o.name, o.reason) for o in report.outcomes if o.status == "fail"]


# -- correct implementations written here -----------------------------------------------


def _float_operands(input: Any, target: Any) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    x, t = np.asarray(input), np.asarray(target)
    if x.dtype.kind != "f" or t.dtype.kind != "f":
        msg = "kl_div: Integral inputs not supported."
        raise TypeError(msg)
    return x, t, np.result_type(x.dtype, t.dtype)


def _upcast_backward(
    g: Any, input: Any, target: Any, reduction: str = "mean", log_target: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    x, t, _ = _float_operands(input, target)
    gx, gt = numpy_impl.kl_div_backward(
        np.asarray(g, dtype=np.float64),
        x.astype(np.float64),
        t.astype(np.float64),
        reduction,
        log_target,
    )
    return gx.astype(x.dtype), gt.astype(t.dtype)


def _upcast(input: Any, target: Any, reduction: str = "mean", log_target: bool = False) -> Any:
    """Compute in float64 and round the result to the promoted dtype."""
    x, t, dtype = _float_operands(input, target)
    out = numpy_impl.kl_div(x.astype(np.float64), t.astype(np.float64), reduction, log_target)
    return np.asarray(out).astype(dtype)


def _fsum(input: Any, target: Any, reduction: str = "mean", log_target: bool = False) -> Any:
    r"""Pointwise in float64, reductions by ``math.fsum`` (correctly rounded), then the dtype."""
    x, t, dtype = _float_operands(input, target)
    if reduction not in ("none", "sum", "mean", "batchmean"):
        msg = f"{reduction} is not a valid value for reduction"
        raise ValueError(msg)
    if reduction == "mean":
        warnings.warn("'mean' divides by numel: use 'batchmean'", UserWarning, stacklevel=2)
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    with np.errstate(all="ignore"):
        if log_target:
            loss = np.exp(t64) * (t64 - x64)
        else:
            loss = np.where(t64 == 0, 0.0, t64 * np.log(np.where(t64 == 0, 1.0, t64))) - t64 * x64
        loss = np.asarray(loss)
        if reduction == "none":
            return loss.astype(dtype)
        flat = loss.ravel()
        total = math.fsum(flat) if np.isfinite(flat).all() else float(np.sum(flat))
        if reduction == "mean":
            total = total / flat.size if flat.size else math.nan
        elif reduction == "batchmean" and x.ndim:
            total = total / x.shape[0] if x.shape[0] else math.nan
        return np.asarray(total).astype(dtype)


CORRECT = {
    "upcast": Implementation(
        "float64-upcast", _upcast, _upcast_backward, backends=("numpy",), description="test"
    ),
    "fsum": Implementation(
        "fsum", _fsum, _upcast_backward, backends=("numpy",), description="test"
    ),
}


def _correct(name: str) -> tuple[str | Implementation, str]:
    """Return ``(implementation, backend)`` for one of the correct implementations."""
    if name in CORRECT:
        return CORRECT[name], "numpy"
    if name == "torch":
        pytest.importorskip("torch")
        return "torch", "torch"
    return name, "numpy"


# -- a JAX implementation with a custom_vjp (the JAX gap of issue 10) ---------------------


def jax_kl_div(*, zero_target_grad_at_zero: bool) -> Implementation:
    """Return a JAX ``kl_div`` whose backward is a ``jax.custom_vjp``.

    With ``zero_target_grad_at_zero`` its target gradient is 0 at t = 0 where
    PyTorch's is NaN (the bug); without, it is correct.
    """
    import jax
    import jax.numpy as jnp
    from jax.scipy.special import xlogy

    def divisor(reduction: str, x_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> int:
        if reduction == "mean":
            return math.prod(out_shape)
        if reduction == "batchmean" and x_shape:
            return x_shape[0]
        return 1

    def sum_to(a: Any, shape: tuple[int, ...]) -> Any:
        extra = a.ndim - len(shape)
        a = jnp.sum(a, axis=tuple(range(extra))) if extra else a
        axes = tuple(i for i, n in enumerate(shape) if n == 1 and a.shape[i] != 1)
        return jnp.sum(a, axis=axes, keepdims=True) if axes else a

    @partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def kl(x: Any, t: Any, reduction: str, log_target: bool) -> Any:
        loss = jnp.exp(t) * (t - x) if log_target else xlogy(t, t) - t * x
        if reduction == "none":
            return loss
        out_shape = jnp.broadcast_shapes(x.shape, t.shape)
        d = divisor(reduction, x.shape, out_shape)
        total = jnp.sum(loss)
        return total if d == 1 else total / (d if d else jnp.nan)

    def fwd(x: Any, t: Any, reduction: str, log_target: bool) -> Any:
        return kl(x, t, reduction, log_target), (x, t)

    def bwd(reduction: str, log_target: bool, res: Any, g: Any) -> Any:
        x, t = res
        out_shape = jnp.broadcast_shapes(x.shape, t.shape)
        d = divisor(reduction, x.shape, out_shape) or 1
        gb = jnp.broadcast_to(g / d, out_shape)
        if log_target:
            e = jnp.exp(t)
            gx, gt = -(gb * e), (gb * (t - x)) * e + gb * e
        else:
            ok = (t > 0) & jnp.isfinite(t)
            other = jnp.where(t == 0, 0.0, jnp.nan) if zero_target_grad_at_zero else jnp.nan
            gx = -(t * gb)
            gt = jnp.where(ok, gb * (jnp.log(jnp.where(ok, t, 1.0)) + 1 - x), other)
        gx = sum_to(jnp.broadcast_to(gx, out_shape), x.shape).astype(x.dtype)
        gt = sum_to(jnp.broadcast_to(gt, out_shape), t.shape).astype(t.dtype)
        return gx, gt

    kl.defvjp(fwd, bwd)
    kl_jit = jax.jit(kl, static_argnums=(2, 3))

    def fn(input: Any, target: Any, reduction: str = "mean", log_target: bool = False) -> Any:
        if reduction not in ("none", "sum", "mean", "batchmean"):
            msg = f"{reduction} is not a valid value for reduction"
            raise ValueError(msg)
        dtype = jnp.result_type(input, target)
        return kl_jit(input.astype(dtype), target.astype(dtype), reduction, log_target)

    name = "jax-custom-vjp" + ("-zero-at-zero" if zero_target_grad_at_zero else "")
    return Implementation(name, fn, backends=("jax",), description="test")


def _jax() -> None:
    if "jax" not in installed_backends():
        pytest.skip("jax is not installed")


# -- the tests -----------------------------------------------------------------------------


def test_the_edge_grid_holds_every_row_of_the_documented_table():
    """Every row of docs/spec.md's edge table is in the grid the fixed properties run."""
    text = (Path(__file__).parents[1] / "docs" / "spec.md").read_text()
    table = re.search(r"<!-- edge-table:start -->\n(.*?)<!-- edge-table:end -->", text, re.S)
    assert table is not None

    def value(label: str) -> float:
        label = label.strip()
        if label.startswith("log "):
            return math.log(float(label[4:]))
        return {"-inf": -math.inf, "+inf": math.inf, "NaN": math.nan}.get(label) or float(label)

    rows = []
    for line in table.group(1).splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append((value(cells[1]), value(cells[2]), cells[0] == "True"))
    assert len(rows) == len(SPEC_EDGE_ROWS)

    def key(v: float) -> str:
        return repr(v)  # NaN equal to NaN

    for x, t, log_target in rows:
        grid = {(key(a), key(b)) for a, b in edge_pairs(log_target)}
        assert (key(x), key(t)) in grid, (x, t, log_target)


def test_the_divisor_cases_separate_the_divisors():
    """Each broadcast of the issue, both ways; half of them tell input.shape[0] from rows."""
    kinds = {(len(a), len(b)) for a, b in DIVISOR_SHAPES}
    assert {(2, 2), (1, 2), (2, 1), (0, 2), (2, 0)} <= kinds
    differ = [a for a, b in DIVISOR_SHAPES if a and a[0] != np.broadcast_shapes(a, b)[0]]
    assert len(differ) >= 3


@pytest.mark.parametrize("name", sorted(GAP_MUTANTS))
def test_the_gap_bugs_are_rejected_on_every_seed(name):
    """Caught by a fixed-case property (no seed involved) and so on each of 16 seeds."""
    prop = PROPERTIES[GAP_MUTANTS[name]]
    assert prop.cases is not None and prop.strategy is None  # seed-independent
    fixed = run(f"mutant:{name}", "numpy", names=[prop.name], shrink=False)
    assert fixed.failed, fixed.outcomes
    for seed in SEEDS:
        report = run(
            f"mutant:{name}",
            "numpy",
            names=[prop.name, *SAMPLED],
            max_examples=2,
            seed=seed,
            shrink=False,
        )
        assert report.failed, (seed, report.outcomes)


def test_a_jax_custom_vjp_with_a_zero_target_gradient_at_zero_is_rejected_on_every_seed():
    """At the default settings, by the fixed gradient edge table, whatever the seed.

    (On JAX every new shape compiles, so the sampled properties run on a few
    seeds with one example; the fixed property needs no seed.)
    """
    _jax()
    bad = jax_kl_div(zero_target_grad_at_zero=True)
    assert PROPERTIES["gradients.edge_values"].strategy is None
    for seed in SEEDS:
        report = run(bad, "jax", names=["gradients.edge_values"], seed=seed, shrink=False)
        (outcome,) = report.outcomes
        assert outcome.status == "fail" and "NaN" in outcome.reason, (seed, outcome)
    for seed in SEEDS[:3]:
        names = ["gradients.edge_values", "gradients.target"]
        assert run(bad, "jax", names=names, max_examples=1, seed=seed, shrink=False).failed


def test_the_same_jax_custom_vjp_without_the_bug_passes():
    """The JAX mutant is rejected for its bug, not for being a custom_vjp."""
    _jax()
    good = jax_kl_div(zero_target_grad_at_zero=False)
    names = ["gradients.edge_values", "gradients.target"]
    report = run(good, "jax", names=names, max_examples=2, shrink=False)
    assert not report.failed, _failures(report)


@pytest.mark.parametrize("name", ["reference", "numpy", "upcast", "fsum", "torch"])
def test_correct_implementations_pass_on_every_seed(name):
    impl, backend = _correct(name)
    fixed = run(impl, backend, names=[*FIXED, "semantics.edge_values"], shrink=False)
    assert not fixed.failed, _failures(fixed)
    assert {o.status for o in fixed.outcomes} == {"pass"}, fixed.outcomes
    for seed in SEEDS:
        report = run(impl, backend, names=SAMPLED, max_examples=3, seed=seed, shrink=False)
        assert not report.failed, (seed, _failures(report))


# -- reproductions that reproduce ------------------------------------------------------------


def _exec_snippet(code: str) -> str:
    """Run a reproduction snippet in a fresh namespace; return what it printed."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the snippet records the warnings it checks itself
        exec(compile(code, "<reproduction>", "exec"), {})
    return out.getvalue()


def _mutant_catchers() -> list[tuple[str, str]]:
    """Every mutant with the first property that catches it: each replay must show it.

    Writing to the operands after computing a correct result shows as "the call
    modified its ...", a zero of the other sign as "the sign of a zero".
    """
    from test_mutants import CAUGHT_BY

    return [(m, props[0]) for m, props in CAUGHT_BY.items()]


@pytest.mark.parametrize(("name", "prop"), _mutant_catchers())
def test_the_reproduction_of_every_mutant_shows_the_discrepancy(name, prop):
    """The snippet replays the failing call (reduction, log_target, dtype, shape) and differs.

    Replayed with a correct implementation instead, the same snippet agrees: it
    judges the call as the property does, not just by printing two numbers.
    """
    from kldiv_spec.conformance.mutants import MUTANTS

    backend = MUTANTS[name].backends[0]
    if backend not in installed_backends():
        pytest.skip(f"{backend} is not installed")
    report = run(f"mutant:{name}", backend, names=[prop], max_examples=10)
    (outcome,) = report.outcomes
    assert outcome.status == "fail"
    code = outcome.reproduction
    assert f"resolve('mutant:{name}')" in code and "kw = dict(reduction=" in code
    printed = _exec_snippet(code)
    got = next(line for line in printed.splitlines() if line.startswith("got:"))
    expected = next(line for line in printed.splitlines() if line.startswith("expected:"))
    assert got.split(":", 1)[1].strip() != expected.split(":", 1)[1].strip(), printed
    verdict = next(line for line in printed.splitlines() if line.startswith("verdict:"))
    assert verdict.startswith("verdict:  differs"), printed
    fixed = _exec_snippet(code.replace(f"resolve('mutant:{name}')", "resolve('reference')"))
    assert "verdict:  agrees" in fixed, fixed


def test_a_reduced_failure_is_reproduced_with_its_own_reduction():
    """A property that loops over reductions reproduces the one that failed, not the drawn one."""
    report = run("mutant:float16_accumulate", "numpy", names=["semantics.edge_mixtures"])
    (outcome,) = report.outcomes
    assert outcome.status == "fail"
    reduction = re.search(r"reduction='(\w+)'", outcome.reason)
    assert reduction is not None
    assert f"kw = dict(reduction='{reduction.group(1)}'" in outcome.reproduction


def test_a_gradient_failure_prints_the_gradients_beside_the_expected_ones():
    report = run("mutant:wrong_target_grad_sign", "numpy", names=["gradients.target"])
    printed = _exec_snippet(report.outcomes[0].reproduction)
    assert "got:      grad_input" in printed and "expected: grad_input" in printed
    assert "verdict:  differs: gradient w.r.t. target" in printed


# -- one bug, one headline -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "headline"),
    [
        ("batchmean_by_numel", "semantics.broadcast_divisors"),
        ("batchmean_broadcast_rows", "semantics.broadcast_divisors"),
        ("float32_result", "semantics.result"),
    ],
)
def test_one_bug_one_headline(name, headline):
    """Failures are grouped by cause; the first headline is the property that isolates the bug."""
    from kldiv_spec.conformance.report import causes, table

    report = run(f"mutant:{name}", "numpy", max_examples=5, shrink=False)
    found = causes(report)
    first = found[0][1]
    assert first.name == headline, [(k, o.name) for k, o, _ in found]
    distinct = [f for o in report.outcomes if o.status == "fail" for f in o.each_failure()]
    assert sum(1 + len(o) for _, _, o in found) == len(distinct)
    text = table(report)
    assert text.index(f"FAIL {headline} ") < min(
        (text.index(f"FAIL {o.name} ") for _, o, _ in found[1:]), default=len(text)
    )
    assert text.count("reproduce with:") == len(found)  # one reproduction per cause
