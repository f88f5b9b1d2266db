"""Requirement levels, precision and result hygiene of ``kldiv-spec check`` (issue 18).

PyTorch is the behavioural reference: what its own functions composed give,
``T**2 * F.kl_div(F.log_softmax(s / T), F.softmax(t / T))`` (with a mask as its
``ignore_index`` reductions treat one), is MUST; the stricter guarantees of
``kl_div_from_logits`` (exactly 0 at identity, 0 where both distributions
exclude a class, 0 for a fully masked mean) are SHOULD, as is the sign of a
zero. Values are judged at the precision the result has, so a float32 result
of float64 logits is one dtype finding and the value properties report
semantic causes. A result that is not an array of the expected shape fails
with a message naming what came back; a call that writes to its operands fails
a hygiene property for every kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import kldiv_spec
from kldiv_spec.conformance import PROPERTIES, run
from kldiv_spec.conformance.context import Context
from kldiv_spec.conformance.implementations import Implementation
from kldiv_spec.conformance.logits_cases import edge_cases
from kldiv_spec.conformance.mutants import np_from_logits, np_gaussian
from kldiv_spec.conformance.namespaces import installed_backends, load_backend
from kldiv_spec.conformance.report import causes, table

LOGITS = sorted(n for n, p in PROPERTIES.items() if p.subject == "from_logits")
GAUSSIAN = sorted(n for n, p in PROPERTIES.items() if p.subject == "gaussian")

#: The SHOULD properties that hold kl_div_from_logits's guarantees beyond PyTorch's.
STRICTER = {
    "gradients.logits_edge_numbers",
    "gradients.logits_teacher_edge_numbers",
    "math.logits_exact_zero_at_identity",
    "semantics.logits_excluded_by_both",
    "semantics.logits_fully_masked",
}


def _torch() -> Any:
    if "torch" not in installed_backends():
        pytest.skip("torch is not installed")
    import torch

    return torch


def _failures(report: Any) -> dict[str, tuple[str, str]]:
    return {o.name: (o.level, o.reason) for o in report.outcomes if o.status == "fail"}


def torch_composition(
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
    """PyTorch's recipe: ``T**2 * F.kl_div(F.log_softmax(s / T), F.softmax(t / T))``.

    The recipe is the forward KL (the implementation declares that direction
    only); ``'rowmean'`` is ``'batchmean'`` of the rows; a mask drops rows as
    ``ignore_index`` does (their terms 0, the mean over the kept rows: 0/0 when
    none is kept).
    """
    import torch
    import torch.nn.functional as F

    assert direction == "forward", direction
    s, t = input, target
    log_q = F.log_softmax(s / temperature, dim=axis)
    p = F.softmax(t / temperature, dim=axis)
    k = temperature**2 if scale_by_temperature_squared else 1.0
    if mask is None:
        if reduction == "rowmean":
            v = log_q.shape[axis]
            return k * F.kl_div(log_q.reshape(-1, v), p.reshape(-1, v), reduction="batchmean")
        return k * F.kl_div(log_q, p, reduction=reduction)
    terms = F.kl_div(log_q, p, reduction="none")
    keep = torch.broadcast_to(mask, terms.shape[:-1])[..., None]
    terms = torch.where(keep, terms, torch.zeros((), dtype=terms.dtype))
    if reduction == "none":
        return k * terms
    n = keep.sum()
    divisor = {"sum": 1, "mean": n * terms.shape[-1]}.get(reduction, n)
    return k * (terms.sum() / divisor)


def float32_cross_entropy(
    input: Any,
    target: Any,
    /,
    *,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    direction: str = "forward",
    scale_by_temperature_squared: bool = True,
    **_: Any,
) -> Any:
    """A model of torchtune's ForwardKLLoss: -sum(p log q) computed (and returned) in float32.

    Finite where the student excludes a class (the term is masked to 0).
    """
    import torch

    s, t = input.float() / temperature, target.float() / temperature
    log_q = torch.log_softmax(s, dim=-1)
    p = torch.softmax(t, dim=-1)
    terms = -torch.masked_fill(p * log_q, torch.isinf(s), 0.0)
    k = temperature**2 if scale_by_temperature_squared else 1.0
    if reduction == "none":
        return k * terms
    total = terms.sum()
    rows = terms.numel() // terms.shape[-1]
    divisor = {"sum": 1, "mean": terms.numel(), "batchmean": terms.shape[0]}.get(reduction, rows)
    return k * (total / divisor)


# -- levels -------------------------------------------------------------------------------------


def test_the_stricter_guarantees_are_should_properties():
    for name in STRICTER | {"semantics.signed_zeros"}:
        assert PROPERTIES[name].level == "SHOULD", name
    for name in (
        "math.logits_zero_at_identity",
        "semantics.logits_edge_values",
        "gradients.logits_edge_values",
        "semantics.logits_dtypes",
        "hygiene.logits_inputs_unmodified",
        "hygiene.gaussian_inputs_unmodified",
    ):
        assert PROPERTIES[name].level == "MUST", name


def test_every_reduction_fully_masked_is_a_fixed_edge_case():
    impl = Implementation("reference-logits", from_logits=kldiv_spec.kl_div_from_logits)
    cases = edge_cases(Context(impl, load_backend("numpy")))
    masked_out = {
        (c.extra["reduction"], c.extra["direction"])
        for c in cases
        if c.extra.get("mask") is not None and not np.asarray(c.extra["mask"]).any()
    }
    reductions = ("none", "sum", "batchmean", "mean", "rowmean")
    assert masked_out == {(r, d) for r in reductions for d in ("forward", "reverse")}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pytorchs_composition_passes_every_must_and_fails_exactly_the_stricter_should(seed):
    """The composition is the behavioural reference: MUST-conforming, SHOULD-rejected."""
    _torch()
    impl = Implementation(
        "composition",
        backends=("torch",),
        from_logits=torch_composition,
        logits_directions=("forward",),
    )
    report = run(impl, "torch", names=LOGITS, max_examples=10, seed=seed, shrink=False)
    failed = _failures(report)
    assert set(failed) == STRICTER, failed
    assert {level for level, _ in failed.values()} == {"SHOULD"}
    assert not report.failed and report.rejected(strict=True)
    assert "is not 0 exactly" in failed["math.logits_exact_zero_at_identity"][1]
    assert "NaN/inf pattern differs" in failed["semantics.logits_excluded_by_both"][1]
    reason = failed["semantics.logits_fully_masked"][1]
    assert "mask=[False, False, False, False, False, False, False, False]" in reason


def test_the_reference_passes_every_level_on_torch():
    _torch()
    report = run("reference", "torch", names=LOGITS + GAUSSIAN, max_examples=5, shrink=False)
    assert not _failures(report), _failures(report)
    assert not report.rejected(strict=True)


def test_the_sign_of_a_zero_is_pytorchs_and_should_only():
    _torch()
    report = run("torch", "torch", names=["semantics.signed_zeros"], shrink=False)
    assert {o.status for o in report.outcomes} == {"pass"}, report.outcomes
    report = run("mutant:input_grad_positive_zero", "numpy", max_examples=3, shrink=False)
    assert _failures(report).keys() == {"semantics.signed_zeros"}
    assert not report.failed


# -- the precision of the result ---------------------------------------------------------------


def test_a_float32_cross_entropy_is_a_dtype_finding_and_a_named_mistake():
    """float64 logits, a float32 result: one dtype failure; the values report the cross-entropy.

    No value property is headlined by float32 rounding: each failing math or
    accuracy property names the cross-entropy.
    """
    _torch()
    impl = Implementation(
        "float32-cross-entropy",
        backends=("torch",),
        from_logits=float32_cross_entropy,
        logits_directions=("forward",),
        logits_masks=False,
    )
    report = run(impl, "torch", names=LOGITS, max_examples=6, shrink=False)
    failed = _failures(report)
    assert "result dtype float32, expected float64" in failed["semantics.logits_dtypes"][1]
    values = [n for n in failed if n.split(".")[0] in ("math", "accuracy")]
    assert {"accuracy.logits_oracle", "accuracy.logits_options"} <= set(values), failed
    assert "math.logits_zero_at_identity" in values
    for name in values:
        assert "it matches the cross-entropy" in failed[name][1], (name, failed[name][1])
    dtype_failures = [n for n, (_, r) in failed.items() if "dtype" in r.split(":")[0]]
    assert dtype_failures == ["semantics.logits_dtypes"], failed
    # its gradient (float64, computed in float32) is the KL's: judged at float32, it agrees
    assert not {"gradients.logits_oracle", "gradients.logits_options"} & set(failed), failed
    # the report's headline (its first cause, and the table's first failure) is the mistake
    first_cause = causes(report)[0][0]
    assert "it matches the cross-entropy" in first_cause, first_cause
    assert "cause: " + first_cause in table(report).split("FAIL ", 1)[1]


def test_a_cast_to_float32_fails_the_dtype_property_only():
    report = run("mutant:logits_float32_result", "numpy", names=LOGITS, max_examples=5)
    assert set(_failures(report)) == {"semantics.logits_dtypes"}, _failures(report)
    report = run("mutant:float32_result", "numpy", max_examples=5, shrink=False)
    assert set(_failures(report)) == {"semantics.dtypes", "semantics.result"}, _failures(report)


@dataclass(frozen=True)
class _Declared(Implementation):
    """An implementation that declares the dtype it computes in."""

    compute_dtype: str | None = None


def _float32_inside(input: Any, target: Any, /, **options: Any) -> Any:
    """The correct loss computed in float32, returned in the logits' dtype."""
    dtype = np.result_type(input, target)
    out = np_from_logits(input.astype(np.float32), target.astype(np.float32), **options)
    return np.asarray(out).astype(dtype)


def test_a_declared_compute_dtype_sets_the_bounds():
    names = ["accuracy.logits_options", "math.logits_composition"]
    plain = Implementation("float32-inside", backends=("numpy",), from_logits=_float32_inside)
    report = run(plain, "numpy", names=names, max_examples=5, shrink=False)
    assert set(_failures(report)) == set(names), _failures(report)
    declared = _Declared(
        "float32-declared",
        backends=("numpy",),
        from_logits=_float32_inside,
        compute_dtype="float32",
    )
    report = run(declared, "numpy", names=names, max_examples=5, shrink=False)
    assert not _failures(report), _failures(report)


# -- what comes back ---------------------------------------------------------------------------


def _logits_returning(make: Any) -> Implementation:
    def from_logits(input: Any, target: Any, /, **options: Any) -> Any:
        return make(np_from_logits(input, target, **options))

    return Implementation("odd-result", backends=("numpy",), from_logits=from_logits)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda out: (out, out), "from_logits: returned a tuple, expected a numpy array"),
        (lambda out: float(np.sum(out)), "from_logits: returned a float, expected a numpy array"),
        (lambda out: np.stack([out, out]), "from_logits: returned shape (2,"),
    ],
)
def test_a_wrong_result_type_or_shape_names_what_came_back(make, words):
    names = ["accuracy.logits_options", "math.logits_zero_at_identity"]
    report = run(_logits_returning(make), "numpy", names=names, max_examples=3, shrink=False)
    failed = _failures(report)
    assert set(failed) == set(names)
    for _, reason in failed.values():
        assert words in reason and "cannot reshape" not in reason, reason


def test_a_kl_div_or_gaussian_of_the_wrong_type_names_it():
    def kl_div(input: Any, target: Any, reduction: str = "mean", log_target: bool = False) -> Any:
        out = kldiv_spec.kl_div(input, target, reduction=reduction, log_target=log_target)
        return float(np.sum(out)) if reduction != "none" else out

    impl = Implementation("float-kl", kl_div, backends=("numpy",))
    report = run(impl, "numpy", names=["accuracy.reductions"], max_examples=3, shrink=False)
    (reason,) = (o.reason for o in report.outcomes)
    assert reason.startswith("returned a float, expected a numpy array of shape ()"), reason

    def gaussian(mu: Any, logvar: Any, /, **options: Any) -> Any:
        return np.atleast_1d(np_gaussian(mu, logvar, **options))

    impl = Implementation("shaped-gaussian", backends=("numpy",), gaussian=gaussian)
    report = run(impl, "numpy", names=["accuracy.gaussian_oracle"], max_examples=5, shrink=False)
    (reason,) = (o.reason for o in report.outcomes)
    assert "gaussian: returned shape" in reason and "expected shape ()" in reason, reason


# -- per-case declarations ----------------------------------------------------------------------


def test_an_unsupported_case_is_skipped_alone():
    """``unsupported(options)`` skips the cases it names; the others of a property still run."""
    calls: list[Mapping[str, Any]] = []

    def no_mask_with_mean(options: Mapping[str, Any]) -> str | None:
        if options.get("mask") is not None and options["reduction"] == "mean":
            return "a mask with 'mean'"
        return None

    def from_logits(input: Any, target: Any, /, **options: Any) -> Any:
        calls.append(options)
        assert not ("mask" in options and options["reduction"] == "mean"), options
        return np_from_logits(input, target, **options)

    impl = Implementation(
        "no-masked-mean",
        backends=("numpy",),
        from_logits=from_logits,
        from_logits_backward=kldiv_spec.kl_div_from_logits_backward,
        unsupported=no_mask_with_mean,
    )
    names = ["accuracy.logits_options", "gradients.logits_options", "accuracy.logits_oracle"]
    report = run(impl, "numpy", names=names, max_examples=20, shrink=False)
    assert not report.failed, _failures(report)
    assert calls and any(c["reduction"] == "mean" for c in calls)
    assert any("mask" in c for c in calls)
    options = next(o for o in report.outcomes if o.name == "accuracy.logits_options")
    assert options.status == "pass", options  # its other cases ran


def test_kl_div_gradients_are_judged_at_the_precision_of_the_result():
    """A float32 loss of float64 operands: one dtype finding; its gradients pass at float32."""
    functional = _torch().nn.functional

    def in_float32(input, target, reduction="mean", log_target=False):
        return functional.kl_div(
            input.float(), target.float(), reduction=reduction, log_target=log_target
        )

    names = ["semantics.dtypes", "gradients.input", "gradients.target"]
    names += ["gradients.broadcast_divisors"]
    report = run(Implementation("float32-kl", in_float32), "torch", names=names, max_examples=5)
    status = {o.name: (o.status, o.reason) for o in report.outcomes}
    assert status["semantics.dtypes"][0] == "fail", status
    for name in names[1:]:
        assert status[name][0] == "pass", (name, status[name])
