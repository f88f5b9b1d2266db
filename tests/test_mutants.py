"""The suite must reject every deliberately broken implementation (mutant)."""

from __future__ import annotations

import pytest

from kldiv_spec.conformance import PROPERTIES, run
from kldiv_spec.conformance.mutants import MUTANTS
from kldiv_spec.conformance.namespaces import installed_backends

#: The properties expected to catch each mutant (others may catch it too): each
#: must fail, and together they cover every property of the suite's own checks.
CAUGHT_BY: dict[str, tuple[str, ...]] = {
    "batchmean_by_numel": ("accuracy.reductions",),
    "mean_by_batch": ("math.reductions_agree",),
    "batchmean_broadcast_dim": ("semantics.broadcast_divisors",),
    "batchmean_broadcast_rows": ("semantics.broadcast_divisors",),
    "batchmean_broadcast_rows_backward": ("gradients.broadcast_divisors",),
    "log_target_grad_zero_at_neg_inf": ("gradients.edge_values",),
    # NaN at t = 0 makes a sum negative only where the draw has a zero target that
    # xlogy would mask (3 of 6 seeds at 10 examples): math.non_negative is
    # log_target_ignored's, which fails it on every seed
    "no_xlogy_mask": ("semantics.edge_values",),
    "mask_nonpositive": ("semantics.edge_values", "semantics.edge_mixtures"),
    # max(t, 1e-10) breaks the identity only where p < 1e-10 is drawn (2 of 6 seeds at 10
    # examples): math.zero_at_identity is log_target_ignored's, which fails it on every seed
    "eps_clamp": ("semantics.edge_values", "accuracy.subnormal"),
    "flushed_product_target_grad": ("gradients.tiny_targets",),
    "zero_target_always_zero": ("semantics.edge_values",),
    "log_target_ignored": (
        "accuracy.pointwise",
        "accuracy.large_support",
        "math.zero_at_identity",
        "math.non_negative",
    ),
    "exp_twice": ("accuracy.pointwise", "semantics.opinfo"),
    "float32_result": ("semantics.result",),
    "float16_pointwise": ("accuracy.pointwise", "accuracy.float32", "math.gibbs_pinsker"),
    "float16_accumulate": ("accuracy.reductions", "math.additivity"),
    "crash_0d": ("semantics.zero_dim",),
    "crash_empty": ("semantics.empty",),
    "mutates_input": ("hygiene.inputs_unmodified",),
    "writes_to_input": ("hygiene.readonly_inputs",),
    "mismatch_attribute_error": ("semantics.incompatible_shapes",),
    "integers_value_error": ("semantics.error_class",),
    "no_broadcasting": ("semantics.broadcasting",),
    "sum_last_axis": ("semantics.result", "math.permutation_invariance"),
    "wrong_target_grad_sign": ("gradients.target", "gradients.finite_differences"),
    "grad_not_summed": ("gradients.input",),
    "list_result": ("semantics.result",),
    "no_mean_warning": ("semantics.mean_warning",),
    "any_reduction": ("semantics.bad_reduction",),
    "integers_accepted": ("semantics.non_float_input",),
    "noisy": ("hygiene.silent",),
    "strides_ignored": ("semantics.layouts",),
    "target_grad_zero_at_zero": ("gradients.target",),
    "float64_result": ("semantics.dtypes",),
    "mean_by_input_numel": ("semantics.broadcast_divisors",),
    "input_grad_positive_zero": ("semantics.signed_zeros",),
    "result_on_default_device": ("hygiene.device",),
    "once_differentiable": ("gradients.double_backward",),
    # from logits and the Gaussian KL (a from_logits or gaussian function only)
    "logits_no_t_squared": ("accuracy.logits_options",),
    "logits_direction_swapped": ("accuracy.logits_oracle", "accuracy.logits_options"),
    "logits_mask_in_divisor": ("accuracy.logits_options",),
    "logits_unstable_lse": ("semantics.logits_edge_values",),
    "logits_excluded_class_nan": ("semantics.logits_edge_values",),
    "logits_cross_entropy": ("math.logits_zero_at_identity", "math.logits_composition"),
    "logits_log_ratio_flipped": ("math.logits_non_negative",),
    "logits_grad_sign": ("gradients.logits_oracle",),
    "logits_grad_missing_inverse_t": ("gradients.logits_options",),
    "logits_composition": (
        "math.logits_exact_zero_at_identity",
        "semantics.logits_excluded_by_both",
        "semantics.logits_fully_masked",
        "gradients.logits_edge_numbers",
        "gradients.logits_teacher_edge_numbers",
    ),
    "logits_grad_nan_to_zero": ("gradients.logits_edge_values",),
    "logits_teacher_grad_sign": ("gradients.logits_teacher",),
    "logits_float32_result": ("semantics.logits_dtypes",),
    "logits_jsd_beta_swapped": ("accuracy.logits_options",),
    "logits_jsd_endpoints_formula": ("accuracy.logits_options", "semantics.logits_edge_values"),
    "logits_jsd_excluded_nan": ("semantics.logits_edge_values",),
    "logits_jsd_grad_no_factor": ("gradients.logits_options",),
    "logits_mutates_input": ("hygiene.logits_inputs_unmodified",),
    "logits_axis_ignored": ("accuracy.logits_axis", "gradients.logits_axis"),
    "gaussian_mutates_input": ("hygiene.gaussian_inputs_unmodified",),
    "gaussian_prior_ignored": ("math.gaussian_zero_at_identity",),
    "gaussian_logvar_sign": ("accuracy.gaussian_oracle",),
    "gaussian_grad_no_half": ("gradients.gaussian_oracle",),
    # from hidden states and output weights (a from_hidden function only)
    "hidden_bias_grad_dropped": ("gradients.hidden_oracle",),
    "hidden_composition": ("gradients.hidden_edge_numbers",),
    "hidden_chunk_divisor": (
        "accuracy.hidden_oracle",
        "accuracy.hidden_options",
        "math.hidden_composition",
    ),
    "hidden_float32_result": ("semantics.hidden_dtypes",),
    "hidden_mutates_input": ("hygiene.hidden_inputs_unmodified",),
    "hidden_teacher_gradient": ("gradients.hidden_teacher_frozen",),
}

#: The modules whose properties this table must cover (the suite's own checks;
#: modules added by other work bring their own mutants and tests).
SUITE_CHECKS = {
    f"kldiv_spec.conformance.checks_{g}"
    for g in (
        "math",
        "accuracy",
        "semantics",
        "gradients",
        "hygiene",
        "logits",
        "gaussian",
        "hidden",
    )
}


def _backend(name):
    backend = MUTANTS[name].backends[0]
    if backend not in installed_backends():
        pytest.skip(f"{backend} is not installed")
    return backend


def test_the_sign_of_a_zero_fails_no_must_property():
    """A mutant whose only difference is the sign of zero gradients fails one SHOULD property."""
    report = run("mutant:input_grad_positive_zero", "numpy", max_examples=5, shrink=False)
    fails = [(o.name, o.level) for o in report.outcomes if o.status == "fail"]
    assert fails == [("semantics.signed_zeros", "SHOULD")], fails
    assert not report.failed and report.rejected(strict=True)


def test_every_mutant_has_an_expected_catcher():
    assert set(CAUGHT_BY) == set(MUTANTS)
    assert all(props and set(props) <= set(PROPERTIES) for props in CAUGHT_BY.values())


def test_every_property_catches_at_least_one_mutant():
    """A property no mutant fails is untested: each of the suite's own has one."""
    own = {n for n, p in PROPERTIES.items() if p.check.__module__ in SUITE_CHECKS}
    assert len(own) >= 40
    assert {n for n, p in PROPERTIES.items() if p.subject != "kl_div"} <= own
    caught = {p for props in CAUGHT_BY.values() for p in props}
    assert own - caught == set()


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_is_rejected(name):
    """Each mutant fails its property; a MUST one fails the check, a SHOULD one is reported."""
    report = run(
        f"mutant:{name}", _backend(name), names=CAUGHT_BY[name], max_examples=10, shrink=False
    )
    assert {o.name for o in report.outcomes} == set(CAUGHT_BY[name])
    for outcome in report.outcomes:
        assert outcome.status == "fail", outcome
        assert outcome.level == PROPERTIES[outcome.name].level
    levels = {o.level for o in report.outcomes}
    assert report.failed == ("MUST" in levels)
    assert report.should_failed == ("SHOULD" in levels)
    assert report.rejected(strict=True)


@pytest.mark.parametrize("impl", ["numpy", "reference"])
def test_correct_implementations_pass_the_catching_properties(impl):
    names = {p for props in CAUGHT_BY.values() for p in props}
    report = run(impl, "numpy", names=names, max_examples=10, shrink=False)
    assert not report.failed, [o for o in report.outcomes if o.status == "fail"]


@pytest.mark.parametrize(
    ("name", "prop", "raised", "level"),
    [
        (
            "mismatch_attribute_error",
            "semantics.incompatible_shapes",
            "raised AttributeError",
            "MUST",
        ),
        ("integers_value_error", "semantics.error_class", "raised ValueError", "SHOULD"),
    ],
)
def test_an_error_of_another_class_is_a_failure_that_names_it(name, prop, raised, level):
    """A crash is a MUST failure; another error for invalid arguments a SHOULD failure."""
    error_props = [
        "semantics.incompatible_shapes",
        "semantics.non_float_input",
        "semantics.bad_reduction",
        "semantics.error_class",
    ]
    report = run(f"mutant:{name}", "numpy", names=error_props, shrink=False)
    fails = [o for o in report.outcomes if o.status == "fail"]
    assert [o.name for o in fails] == [prop]
    assert fails[0].level == level and raised in fails[0].reason, fails[0].reason
