"""``kldiv-spec check`` for from-logits and Gaussian-KL implementations (issue 11).

Implementations carry official ``from_logits`` / ``gaussian`` functions and
declare what they can express; the suite runs their properties (and makes the
others n/a), rejects a mutant of each property on every seed, reproduces each
failure by replaying the call, and adapts the torchtune and Liger conventions.
"""

from __future__ import annotations

import contextlib
import functools
import io
import sys
import textwrap
import warnings
from typing import Any

import numpy as np
import pytest
from test_mutants import CAUGHT_BY as MUTANTS_CAUGHT_BY

import kldiv_spec
from kldiv_spec.conformance import PROPERTIES, resolve, run
from kldiv_spec.conformance.adapters import liger_style, torchtune_style
from kldiv_spec.conformance.cli import main
from kldiv_spec.conformance.implementations import Implementation
from kldiv_spec.conformance.mutants import MUTANTS, np_from_logits, np_gaussian
from kldiv_spec.conformance.namespaces import installed_backends
from kldiv_spec.conformance.report import causes

SEEDS = range(16)  # as tests/test_conformance_v2.py

#: The from-logits and Gaussian properties.
LOGITS = sorted(n for n, p in PROPERTIES.items() if p.subject == "from_logits")
GAUSSIAN = sorted(n for n, p in PROPERTIES.items() if p.subject == "gaussian")
SAMPLED = [n for n in LOGITS + GAUSSIAN if PROPERTIES[n].strategy is not None]

#: Each mutant of a from-logits or Gaussian property and the properties that reject it
#: (the rows of test_mutants' table, which covers every mutant).
CAUGHT_BY = {
    name: props
    for name, props in MUTANTS_CAUGHT_BY.items()
    if name.startswith(("logits_", "gaussian_"))
}


def _failures(report: Any) -> list[tuple[str, str]]:
    return [(o.name, o.reason) for o in report.outcomes if o.status == "fail"]


def _torch() -> None:
    if "torch" not in installed_backends():
        pytest.skip("torch is not installed")


def _exec(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "<reproduction>", "exec"), {})
    return out.getvalue()


def _line(printed: str, prefix: str) -> str:
    return next(line for line in printed.splitlines() if line.startswith(prefix))


def _numpy_impl(**fields: Any) -> Implementation:
    """The suite's NumPy from-logits and Gaussian KL (no bug), kldiv_spec's backward."""
    return Implementation(
        "numpy-logits",
        backends=("numpy",),
        from_logits=np_from_logits,
        from_logits_backward=functools.partial(
            kldiv_spec.kl_div_from_logits_backward, target_grad=True
        ),
        gaussian=np_gaussian,
        gaussian_backward=kldiv_spec.gaussian_kl_backward,
        **{"logits_axes": (-1, 0, 1, -2), **fields},
    )


# -- the fields and their declarations ---------------------------------------------------------


def test_every_logits_and_gaussian_property_is_declared_with_its_subject():
    assert {"accuracy.logits_options", "gradients.logits_options"} <= set(LOGITS)
    assert "gradients.gaussian_oracle" in GAUSSIAN
    subjects = {"kl_div", "from_logits", "gaussian", "from_hidden"}
    assert {p.subject for p in PROPERTIES.values()} == subjects
    reference = resolve("reference")
    assert reference.from_logits is kldiv_spec.kl_div_from_logits
    assert reference.gaussian is kldiv_spec.gaussian_kl
    assert reference.function("kl_div") is reference.fn


def test_the_reference_and_an_independent_numpy_implementation_pass():
    for impl in ("reference", _numpy_impl()):
        report = run(impl, "numpy", names=LOGITS + GAUSSIAN, max_examples=10, shrink=False)
        assert {o.status for o in report.outcomes} == {"pass"}, _failures(report)
    for seed in SEEDS:
        report = run(_numpy_impl(), "numpy", names=SAMPLED, max_examples=2, seed=seed)
        assert not report.failed, (seed, _failures(report))


def test_a_from_logits_only_implementation_gets_n_a_for_the_rest():
    impl = Implementation("only-logits", backends=("numpy",), from_logits=np_from_logits)
    report = run(impl, "numpy", max_examples=2, shrink=False)
    status = {o.name: (o.status, o.reason) for o in report.outcomes}
    assert not report.failed, _failures(report)
    for name, prop in PROPERTIES.items():
        if prop.subject == "kl_div":
            assert status[name] == ("n/a", "only-logits has no kl_div function")
        elif prop.subject == "gaussian":
            assert status[name] == ("n/a", "only-logits has no gaussian function")
    # no backward on NumPy (no autograd): the gradient properties are n/a, the others pass
    assert status["gradients.logits_oracle"][0] == "n/a"
    values = [n for n in LOGITS if not n.startswith("gradients.") and "axis" not in n]
    assert {status[n][0] for n in values} == {"pass"}
    assert status["accuracy.logits_axis"][0] == "n/a"  # no axis declared but the last
    with pytest.raises(TypeError, match="no kl_div function"):
        impl(np.zeros(1), np.zeros(1))


def test_declared_limits_are_never_called_and_make_the_rest_n_a():
    """Only the declared options are drawn or run; a property with none left is n/a."""
    calls = []

    def forward_sum_only(input: Any, target: Any, /, **options: Any) -> Any:
        calls.append(options)
        assert options["direction"] == "forward" and "mask" not in options, options
        assert options["reduction"] in ("sum", "none") and options["temperature"] == 1.0
        assert options["scale_by_temperature_squared"] is True, options
        return np_from_logits(input, target, **options)

    impl = _numpy_impl(
        logits_reductions=("sum", "none"),
        logits_directions=("forward",),
        logits_scalings=(True,),
        logits_temperature=False,
        logits_masks=False,
    )
    impl = Implementation(**{**impl.__dict__, "from_logits": forward_sum_only})
    report = run(impl, "numpy", names=LOGITS, max_examples=10, shrink=False)
    status = {o.name: o.status for o in report.outcomes}
    assert not report.failed, _failures(report)
    assert status["accuracy.logits_options"] == "n/a"  # every grid case has T = 2
    assert status["semantics.logits_edge_values"] == "pass"
    assert calls
    none = _numpy_impl(logits_reductions=())
    report = run(none, "numpy", names=LOGITS, max_examples=2, shrink=False)
    assert {o.status for o in report.outcomes} == {"n/a"}


# -- mutants: every property has one, rejected on every seed -------------------------------------


def test_every_logits_and_gaussian_property_has_a_mutant():
    caught = {p for props in CAUGHT_BY.values() for p in props}
    assert caught == set(LOGITS + GAUSSIAN)
    assert set(CAUGHT_BY) == {m for m in MUTANTS if m.startswith(("logits_", "gaussian_"))}
    for name in CAUGHT_BY:
        assert MUTANTS[name].fn is None  # a from_logits or gaussian function only


@pytest.mark.parametrize("name", sorted(CAUGHT_BY))
def test_each_mutant_is_rejected_on_every_seed(name):
    """A fixed-case catcher needs no seed; a sampled one is run on each of 16 seeds."""
    fixed = [p for p in CAUGHT_BY[name] if PROPERTIES[p].cases is not None]
    sampled = [p for p in CAUGHT_BY[name] if PROPERTIES[p].strategy is not None]
    if fixed:
        report = run(f"mutant:{name}", "numpy", names=fixed, shrink=False)
        assert {o.status for o in report.outcomes} == {"fail"}, report.outcomes
    for seed in SEEDS if sampled else ():
        report = run(f"mutant:{name}", "numpy", names=sampled, max_examples=10, seed=seed)
        assert {o.status for o in report.outcomes} == {"fail"}, (seed, report.outcomes)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("logits_no_t_squared", "it matches without the T**2 factor"),
        ("logits_direction_swapped", "it matches direction="),
        ("logits_mask_in_divisor", "it matches masked rows counted in the divisor"),
        ("logits_cross_entropy", "it matches the cross-entropy"),
        ("logits_jsd_beta_swapped", "it matches the mixture with beta and 1 - beta swapped"),
        ("logits_jsd_endpoints_formula", "it matches 0, the mixture's formula"),
    ],
)
def test_a_wrong_value_is_named_when_it_matches_a_common_mistake(name, words):
    report = run(f"mutant:{name}", "numpy", names=["accuracy.logits_options"], shrink=False)
    (outcome,) = report.outcomes
    assert outcome.status == "fail" and words in outcome.reason, outcome.reason


@pytest.mark.parametrize("name", sorted(CAUGHT_BY))
def test_the_reproduction_of_every_logits_mutant_replays_the_call(name):
    """The snippet calls from_logits/gaussian with the failing options, shape, dtype and mask.

    It shows the discrepancy and ends with ``verdict:  differs``; with the
    reference in its place the same snippet agrees. The judges it calls hold
    the reference's full guarantees (the SHOULD ones included) and the result's
    dtype, so a SHOULD or a dtype failure replays as ``differs`` too.
    """
    prop = CAUGHT_BY[name][0]
    report = run(f"mutant:{name}", "numpy", names=[prop], max_examples=10)
    (outcome,) = report.outcomes
    assert outcome.status == "fail"
    code = outcome.reproduction
    function = "gaussian" if name.startswith("gaussian") else "from_logits"
    assert f"impl.{function}" in code and "kw = dict(reduction=" in code
    if function == "from_logits":
        assert "temperature=" in code and "direction=" in code and "mask = " in code
    printed = _exec(code)
    got, expected = _line(printed, "got:"), _line(printed, "expected:")
    assert got.split(":", 1)[1].strip() != expected.split(":", 1)[1].strip(), printed
    assert _line(printed, "verdict:").startswith("verdict:  differs"), printed
    fixed = _exec(code.replace(f"resolve('mutant:{name}')", "resolve('reference')"))
    assert "verdict:  agrees" in fixed, fixed


def test_logits_failures_are_grouped_under_their_most_specific_property():
    report = run("mutant:logits_unstable_lse", "numpy", names=LOGITS, max_examples=5)
    found = causes(report)
    assert found and found[0][1].name == "semantics.logits_edge_values", found
    report = run("mutant:logits_grad_sign", "numpy", names=LOGITS, max_examples=5)
    keys = [key for key, _, _ in causes(report)]
    assert keys and all("gradient w.r.t. the student logits" in k for k in keys), keys


# -- the torchtune and Liger conventions -------------------------------------------------------


def test_the_torchtune_convention_is_reported_as_a_cross_entropy():
    """-sum(p log q) is the KL plus the teacher's entropy: its values fail, its gradients agree."""
    _torch()
    report = run("torchtune-style", "torch", names=LOGITS, max_examples=4, shrink=False)
    status = {o.name: o for o in report.outcomes}
    failed = {n for n, o in status.items() if o.status == "fail"}
    assert failed == {
        "math.logits_zero_at_identity",
        "math.logits_exact_zero_at_identity",
        "math.logits_composition",
        "accuracy.logits_oracle",
        "accuracy.logits_options",
        "semantics.logits_edge_values",
        "semantics.logits_excluded_by_both",
        "gradients.logits_edge_numbers",  # the composition's NaN in dropped rows
        "gradients.logits_teacher",  # d/dt of -sum p log q: no entropy term
        "gradients.logits_teacher_edge_numbers",  # the composition's NaN, for the teacher
    }
    composition_nan = {"gradients.logits_edge_numbers", "gradients.logits_teacher_edge_numbers"}
    for name in failed - composition_nan - {"gradients.logits_teacher"}:
        assert "it matches the cross-entropy" in status[name].reason, status[name].reason
    for name in (
        "gradients.logits_oracle",
        "gradients.logits_options",
        "math.logits_non_negative",
    ):
        assert status[name].status == "pass", status[name]
    printed = _exec(status["math.logits_zero_at_identity"].reproduction)
    assert "verdict:  differs" in printed and "not 0" in printed


def test_the_liger_convention_at_beta_0_and_1_is_the_kl():
    _torch()
    report = run("liger-style", "torch", names=LOGITS, max_examples=6, shrink=False)
    assert not report.failed, _failures(report)
    # every property passes but the class axis, which the convention does not take, and
    # the SHOULDs on the gradients where the composition gives NaN (its dropped rows)
    status = {o.name: o.status for o in report.outcomes}
    assert status.pop("gradients.logits_edge_numbers") == "fail"
    assert status.pop("gradients.logits_teacher_edge_numbers") == "fail"
    assert {v for k, v in status.items() if "axis" not in k} == {"pass"}
    assert {v for k, v in status.items() if "axis" in k} == {"n/a"}


def test_a_probability_that_rounds_to_zero_is_the_compositions_nan_at_must_a_number_at_should():
    """Found by gradients.logits_oracle at 15 examples: float32 logits about 180 apart.

    Reverse KL at T = 0.5: the student's second probability, exp(-368), rounds to 0 in
    float32, and PyTorch's composition multiplies it by log 0 in its backward (NaN
    across the row). The exact gradient is a number, which the strict (SHOULD)
    judgement asks for; the MUST judgement accepts the composition's NaN there.
    """
    from kldiv_spec.conformance import checks_logits as judge
    from kldiv_spec.conformance import oracle_logits as oracle

    s = np.asarray([[81.63676452636719, -102.22660064697266]], np.float32)
    t = np.asarray([[98.3607177734375, -124.93738555908203]], np.float32)
    g = np.asarray([[0.5, 1.5]], np.float32)
    kw = dict(reduction="none", temperature=0.5, direction="reverse")
    exact = oracle.from_logits(s, t, grad_output=g, **kw)
    assert np.isfinite(np.asarray(exact.grad_input, np.float64)).all()
    assert oracle.composition_gradient_nan(exact).all()
    nan = np.full(s.shape, np.nan, np.float32)
    judge.assert_from_logits_gradient(nan, s, t, grad_output=g, strict=False, **kw)
    with pytest.raises(AssertionError):
        judge.assert_from_logits_gradient(nan, s, t, grad_output=g, **kw)
    want = np.asarray(exact.grad_input, np.float32)
    judge.assert_from_logits_gradient(want, s, t, grad_output=g, **kw)
    # a NaN where the composition gives a number is still wrong at MUST
    finite_row = np.asarray([[1.0, 0.0]], np.float32)
    with pytest.raises(AssertionError):
        judge.assert_from_logits_gradient(nan, finite_row, t, grad_output=g, strict=False, **kw)


def test_the_style_adapters_wrap_a_users_loss():
    """A class is instantiated (with beta= for Liger); a Liger function gets beta=."""
    _torch()
    import torch

    betas = []

    class TrueKL:  # torchtune's call convention, computing the KL per token
        def __call__(self, s: Any, t: Any, labels: Any, normalize: bool = True) -> Any:
            lp, lq = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
            p = lp.exp()
            zero = torch.zeros((), dtype=p.dtype)
            rows = torch.where(p == 0, zero, p * (lp - lq)).sum(-1)
            keep = labels != -100
            total = torch.where(keep, rows, zero).sum()
            n = int(keep.sum())
            return total / n if normalize and n else total * (1 if not normalize else 0)

    def jsd(log_q: Any, log_p: Any, shift_labels: Any = None, *, beta: float) -> Any:
        betas.append(beta)
        if beta in (0.0, 1.0):  # the endpoints: the two KLs
            log_w, log_o = (log_p, log_q) if beta == 0.0 else (log_q, log_p)
            rows = (log_w.exp() * (log_w - log_o)).sum(-1)
        else:  # the generalised JSD (finite logits in these properties)
            p, q = log_p.exp(), log_q.exp()
            log_m = torch.log(beta * p + (1 - beta) * q)
            kl_p, kl_q = (p * (log_p - log_m)).sum(-1), (q * (log_q - log_m)).sum(-1)
            rows = beta * kl_p + (1 - beta) * kl_q
        if shift_labels is None:
            return rows.mean()
        keep = shift_labels != -100
        return torch.where(keep, rows, torch.zeros((), dtype=rows.dtype)).sum() / keep.sum()

    names = ["accuracy.logits_options", "math.logits_zero_at_identity"]
    good = run(torchtune_style(TrueKL), "torch", names=names, max_examples=4, shrink=False)
    assert not good.failed, _failures(good)
    liger = run(liger_style(jsd), "torch", names=names, max_examples=4, shrink=False)
    assert not liger.failed, _failures(liger)
    assert {0.0, 1.0} < set(betas)  # the endpoints, and beta between them


# -- the command line -----------------------------------------------------------------------


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """An importable module ``user_kl`` with a few user implementations."""
    (tmp_path / "user_kl.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            import kldiv_spec
            from kldiv_spec.conformance.mutants import np_from_logits, np_gaussian

            def good_logits(input, target, **options):
                return np_from_logits(np.asarray(input), np.asarray(target), **options)

            good_logits.backward = kldiv_spec.kl_div_from_logits_backward

            def no_t_squared(input, target, **options):
                options['scale_by_temperature_squared'] = False
                return np_from_logits(np.asarray(input), np.asarray(target), **options)

            def prior_ignored(mu, logvar, *, reduction='batchmean', **priors):
                return np_gaussian(np.asarray(mu), np.asarray(logvar), reduction=reduction)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_kl"
    sys.modules.pop("user_kl", None)


def test_check_points_at_a_users_from_logits_function(user_module, capsys, tmp_path):
    import json

    names = ["--property", "accuracy.logits_options", "--property", "gradients.logits_options"]
    common = ["--kind", "from-logits", "--backend", "numpy", "--quiet", *names]
    report = tmp_path / "report.json"
    assert main(["--impl", f"{user_module}:good_logits", *common, "--json", str(report)]) == 0
    outcomes = json.loads(report.read_text())["reports"][0]["outcomes"]
    assert {o["name"]: o["status"] for o in outcomes} == dict.fromkeys(names[1::2], "pass")
    capsys.readouterr()
    assert main(["--impl", f"{user_module}:no_t_squared", *common]) == 1
    out = capsys.readouterr().out
    assert "FAIL accuracy.logits_options" in out and "without the T**2 factor" in out
    assert f"resolve('{user_module}:no_t_squared', kind='from-logits')" in out


def test_check_points_at_a_users_gaussian_kl(user_module, capsys):
    args = ["--impl", f"{user_module}:prior_ignored", "--kind", "gaussian", "--quiet"]
    assert main([*args, "--backend", "numpy", "--group", "math", "--group", "accuracy"]) == 1
    out = capsys.readouterr().out
    assert "FAIL math.gaussian_zero_at_identity" in out
    assert "the prior is ignored" in out
    assert main([*args, "--kind", "nonsense"]) == 2


def test_resolve_wraps_a_callable_by_kind(user_module):
    logits = resolve(f"{user_module}:good_logits", kind="from-logits")
    assert logits.fn is None and logits.from_logits is not None
    assert logits.from_logits_backward is kldiv_spec.kl_div_from_logits_backward
    gaussian = resolve(f"{user_module}:prior_ignored", kind="gaussian")
    assert gaussian.fn is None and gaussian.from_logits is None and gaussian.gaussian is not None
    with pytest.raises(ValueError, match="--kind"):
        resolve(f"{user_module}:good_logits", kind="logits")


# -- beta: the generalised Jensen-Shannon divergence ---------------------------------------------


def test_beta_cases_reach_only_implementations_that_declare_it():
    """Without ``logits_beta`` no call carries ``beta``; with it, every beta of the grid does."""
    seen: list[dict[str, Any]] = []

    def spy(input: Any, target: Any, /, **options: Any) -> Any:
        seen.append(options)
        return kldiv_spec.kl_div_from_logits(input, target, **options)

    names = ["accuracy.logits_options", "accuracy.logits_oracle", "semantics.logits_edge_values"]
    plain = Implementation("spy", backends=("numpy",), from_logits=spy)
    report = run(plain, "numpy", names=names, max_examples=10, shrink=False)
    assert not report.failed and seen and all("beta" not in o for o in seen)
    seen.clear()
    with_beta = Implementation("spy", backends=("numpy",), from_logits=spy, logits_beta=True)
    report = run(with_beta, "numpy", names=names, max_examples=10, shrink=False)
    assert not report.failed, _failures(report)
    betas = {o.get("beta") for o in seen}
    assert {0.0, 0.3, 0.5, 1.0, None} <= betas
    assert all(o["direction"] == "forward" for o in seen if o.get("beta") is not None)


def test_an_independent_numpy_jsd_passes_every_logits_property():
    report = run(_numpy_impl(logits_beta=True), "numpy", names=LOGITS, max_examples=10)
    assert not report.failed and not report.should_failed, _failures(report)


def test_the_reproduction_replays_beta():
    report = run("mutant:logits_jsd_beta_swapped", "numpy", names=["accuracy.logits_options"])
    (outcome,) = report.outcomes
    assert "beta=0.3" in outcome.reproduction
    assert "verdict:  differs" in _exec(outcome.reproduction)


def _symmetric_model(swap: bool = False) -> Implementation:
    """A from-logits function of torchtune's symmetric mix, in plain PyTorch."""
    import torch
    import torch.nn.functional as F

    def from_logits(
        s: Any, t: Any, /, *, temperature=1.0, reduction="rowmean", direction="forward",
        scale_by_temperature_squared=True, mask=None, symmetric=None,
    ) -> Any:  # fmt: skip
        if symmetric is None or reduction not in ("sum", "rowmean"):
            raise NotImplementedError("the mix, per-token mean or sum")
        ratio = 1 - symmetric if swap else symmetric
        lq, lp = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
        zero = torch.zeros((), dtype=s.dtype)
        fwd = torch.where(lp.exp() == 0, zero, lp.exp() * (lp - lq)).sum(-1)
        rev = torch.where(lq.exp() == 0, zero, lq.exp() * (lq - lp)).sum(-1)
        rows = ratio * fwd + (1 - ratio) * rev
        if mask is not None:
            rows = torch.where(torch.as_tensor(mask), rows, zero)
        n = rows.numel() if mask is None else int(torch.as_tensor(mask).sum())
        total = rows.sum() if reduction == "sum" else rows.sum() / max(n, 1)
        return total * (temperature**2 if scale_by_temperature_squared else 1.0)

    return Implementation(
        "symmetric-mix", backends=("torch",), from_logits=from_logits, logits_symmetric=True,
        logits_reductions=("sum", "rowmean"), logits_directions=("forward",),
        unsupported=lambda o: None if o.get("symmetric") is not None else "the mix only",
    )  # fmt: skip


def test_the_symmetric_mix_is_checked_against_its_oracle():
    _torch()
    names = ["accuracy.logits_options", "gradients.logits_options"]
    good = run(_symmetric_model(), "torch", names=names, max_examples=3)
    assert {o.status for o in good.outcomes} == {"pass"}, _failures(good)
    assert all(o.examples >= 3 for o in good.outcomes)  # a ratio case in each
    bad = run(_symmetric_model(swap=True), "torch", names=names[:1], max_examples=3)
    assert bad.failed and "symmetric=0.25" in bad.outcomes[0].reason
