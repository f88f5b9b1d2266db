"""The suite must reject every deliberately broken implementation (mutant)."""

from __future__ import annotations

import pytest

from kldiv_spec.conformance import run
from kldiv_spec.conformance.mutants import MUTANTS

#: The property expected to catch each mutant (others may catch it too).
CAUGHT_BY = {
    "batchmean_by_numel": "accuracy.reductions",
    "mean_by_batch": "math.reductions_agree",
    "batchmean_broadcast_dim": "semantics.broadcast_divisors",
    "batchmean_broadcast_rows": "semantics.broadcast_divisors",
    "batchmean_broadcast_rows_backward": "gradients.broadcast_divisors",
    "log_target_grad_zero_at_neg_inf": "gradients.edge_values",
    "no_xlogy_mask": "semantics.edge_values",
    "mask_nonpositive": "semantics.edge_values",
    "eps_clamp": "semantics.edge_values",
    "zero_target_always_zero": "semantics.edge_values",
    "log_target_ignored": "accuracy.pointwise",
    "exp_twice": "accuracy.pointwise",
    "float32_result": "semantics.result",
    "float16_pointwise": "accuracy.pointwise",
    "float16_accumulate": "accuracy.reductions",
    "crash_0d": "semantics.zero_dim",
    "crash_empty": "semantics.empty",
    "mutates_input": "hygiene.inputs_unmodified",
    "mismatch_attribute_error": "semantics.incompatible_shapes",
    "integers_value_error": "semantics.non_float_input",
    "no_broadcasting": "semantics.broadcasting",
    "sum_last_axis": "semantics.result",
    "wrong_target_grad_sign": "gradients.target",
    "grad_not_summed": "gradients.input",
    "list_result": "semantics.result",
    "no_mean_warning": "semantics.mean_warning",
    "any_reduction": "semantics.bad_reduction",
    "integers_accepted": "semantics.non_float_input",
    "noisy": "hygiene.silent",
    "strides_ignored": "semantics.layouts",
    "target_grad_zero_at_zero": "gradients.target",
    "float64_result": "semantics.dtypes",
    "mean_by_input_numel": "semantics.broadcast_divisors",
}


def test_every_mutant_has_an_expected_catcher():
    assert set(CAUGHT_BY) == set(MUTANTS)


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_is_rejected(name):
    report = run(f"mutant:{name}", "numpy", names=[CAUGHT_BY[name]], max_examples=10, shrink=False)
    (outcome,) = report.outcomes
    assert outcome.status == "fail", outcome
    assert report.failed


@pytest.mark.parametrize("impl", ["numpy", "reference"])
def test_correct_implementations_pass_the_catching_properties(impl):
    report = run(impl, "numpy", names=set(CAUGHT_BY.values()), max_examples=10, shrink=False)
    assert not report.failed, [o for o in report.outcomes if o.status == "fail"]


@pytest.mark.parametrize(
    ("name", "prop", "raised"),
    [
        ("mismatch_attribute_error", "semantics.incompatible_shapes", "raised AttributeError"),
        ("integers_value_error", "semantics.non_float_input", "raised ValueError"),
    ],
)
def test_an_error_of_another_class_is_a_failure_that_names_it(name, prop, raised):
    """A crash is not a refusal: the property says what was raised instead."""
    report = run(f"mutant:{name}", "numpy", names=[prop], shrink=False)
    (outcome,) = report.outcomes
    assert outcome.status == "fail"
    assert raised in outcome.reason, outcome.reason
