"""Render reports: a readable table, JSON, and the Markdown conformance matrix.

MUST and SHOULD are kept apart everywhere: the table has a ``level`` column and
its header counts SHOULD failures separately; the matrix's group columns show
the MUST properties and one ``SHOULD`` column the SHOULD ones.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from .properties import GROUPS, PROPERTIES
from .runner import Outcome, Report

__all__ = [
    "SPECIFICITY",
    "cause",
    "causes",
    "group_summary",
    "matrix_markdown",
    "should_summary",
    "table",
    "write_json",
]

#: Properties from the most specific (a failure isolates one behaviour: fixed
#: cases of one rule) to the broadest (any bug in values fails them). A cause's
#: headline is its most specific failing property; properties not listed rank
#: after the listed specific ones and before :data:`_BROAD`.
SPECIFICITY: tuple[str, ...] = (
    "semantics.error_class",
    "semantics.bad_reduction",
    "semantics.non_float_input",
    "semantics.incompatible_shapes",
    "semantics.mean_warning",
    "hygiene.silent",
    "hygiene.inputs_unmodified",
    "hygiene.readonly_inputs",
    "hygiene.device",
    "semantics.broadcast_divisors",
    "gradients.broadcast_divisors",
    "semantics.edge_values",
    "gradients.edge_values",
    "semantics.empty",
    "semantics.zero_dim",
    "semantics.result",
    "semantics.dtypes",
    "semantics.layouts",
    "semantics.broadcasting",
    "gradients.input",
    "gradients.target",
    "math.reductions_agree",
    "accuracy.pointwise",
    "accuracy.reductions",
    "accuracy.float32",
    "accuracy.subnormal",
    "accuracy.large_support",
    # from logits and the Gaussian KL: the value at identity (0 for a divergence, not
    # for a cross-entropy), then fixed cases of one rule
    "math.logits_zero_at_identity",
    "math.gaussian_zero_at_identity",
    "semantics.logits_edge_values",
    "accuracy.logits_options",
    "gradients.logits_options",
    "math.logits_non_negative",
    "gradients.logits_oracle",
    "gradients.gaussian_oracle",
    "accuracy.logits_oracle",
    "accuracy.gaussian_oracle",
    "math.logits_composition",
)
_BROAD: tuple[str, ...] = (
    "math.non_negative",
    "math.zero_at_identity",
    "math.gibbs_pinsker",
    "math.additivity",
    "math.permutation_invariance",
    "semantics.edge_mixtures",
    "semantics.opinfo",
    "gradients.finite_differences",
    "gradients.double_backward",
)


def _rank(name: str) -> tuple[int, int]:
    order = list(PROPERTIES)
    if name in SPECIFICITY:
        return (0, SPECIFICITY.index(name))
    if name in _BROAD:
        return (2, _BROAD.index(name))
    return (1, order.index(name) if name in order else len(order))


_KINDS = (
    ("did not raise", "errors"),
    ("raised", "errors"),
    ("warn", "warnings"),
    ("modified", "side effects"),
    ("device", "device"),
    ("not a", "result type"),
    ("dtype", "dtype"),
    (" result, expected", "dtype"),  # semantics.dtypes and .result: "gave a float32 result"
    ("shape", "shape"),
    ("NaN", "NaN/inf pattern"),
    ("infinity", "NaN/inf pattern"),
)


def cause(outcome: Outcome, /) -> str:
    """Return a short description of what ``outcome``'s failure is about (its cause key).

    Read from the failure: what differs (errors, warnings, dtype, shape,
    NaN/inf pattern, values), of what (the loss or a gradient) and under which
    reduction. Failures with the same key are most likely one bug.
    """
    reason = outcome.reason
    kind = next((k for word, k in _KINDS if word in reason), "values")
    if kind in ("errors", "warnings", "side effects", "device"):
        return kind
    what = "loss"
    grad = re.search(r"gradient w\.r\.t\. (input|target|the student logits|mu|logvar)", reason)
    if grad is not None:
        what = f"gradient w.r.t. {grad.group(1)}"
    reduction = re.search(r"reduction='(\w+)'", reason) or re.search(
        r"reduction='(\w+)'", outcome.reproduction
    )
    where = f", reduction={reduction.group(1)!r}" if reduction and kind != "dtype" else ""
    return f"{kind} of the {what}{where}"


def causes(report: Report, /) -> list[tuple[str, Outcome, list[Outcome]]]:
    """Group the failures by :func:`cause`: ``(cause, headline, others)``.

    MUST causes first; among them, errors, warnings, side effects, the result's
    type, dtype and shape; then NaN/inf patterns and values, by headline.

    The headline is the most specific failing property of the cause (see
    :data:`SPECIFICITY`); the others fail most likely because of the same bug.
    """
    groups: dict[tuple[str, str], list[Outcome]] = {}
    for o in report.outcomes:
        if o.status == "fail":
            groups.setdefault((o.level, cause(o)), []).append(o)
    out = []
    for (_, key), outs in groups.items():
        outs = sorted(outs, key=lambda o: _rank(o.name))
        out.append((key, outs[0], outs[1:]))
    # A wrong type, dtype or shape explains wrong values (a float32 result is
    # rounded), not the other way round: those causes come first.
    kinds = [k for _, k in _KINDS if k != "NaN/inf pattern"]

    def order(c: tuple[str, Outcome, list[Outcome]]) -> tuple[bool, int, tuple[int, int]]:
        kind = next((i for i, k in enumerate(kinds) if c[0].startswith(k)), len(kinds))
        return (c[1].level != "MUST", kind, _rank(c[1].name))

    return sorted(out, key=order)


def table(report: Report, /) -> str:
    """Return the report as a text table (property, group, status, examples) with failures."""
    head = f"{report.impl} on {report.backend}"
    if report.status == "n/a":
        return f"{head}: n/a ({report.reason})\n"
    rows = [("property", "group", "level", "status", "examples")]
    rows += [
        (
            o.name,
            o.group,
            o.level,
            o.status.upper() if o.status == "fail" else o.status,
            str(o.examples),
        )
        for o in report.outcomes
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    verdict = report.status.upper()
    n_should = sum(o.status == "fail" and o.level == "SHOULD" for o in report.outcomes)
    if n_should:
        verdict += f", {n_should} SHOULD failure{'s' if n_should > 1 else ''}"
    lines = [f"{head}: {verdict} (up to {report.max_examples} examples per property)"]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    for o in report.outcomes:
        if o.status == "n/a":
            lines.append(f"  n/a {o.name}: {o.reason}")
    found = causes(report)
    if found:
        n = sum(1 + len(others) for _, _, others in found)
        lines += ["", f"{n} failing propert{'ies' if n > 1 else 'y'}, {len(found)} cause(s):"]
    for key, o, others in found:
        lines += ["", f"FAIL {o.name} [{o.level}] ({o.description})", f"  cause: {key}"]
        lines += [f"  {o.reason}"]
        if o.counterexample:
            lines += ["  minimal counterexample: " + o.counterexample]
        if o.reproduction:
            lines += ["  reproduce with:"] + ["    " + x for x in o.reproduction.splitlines()]
        if others:
            lines += [f"  same cause, also failing ({len(others)}):"]
            lines += [f"    {x.name}: {x.reason}" for x in others]
    return "\n".join(lines) + "\n"


def group_summary(report: Report, group: str, /, *, level: str = "MUST") -> str:
    """Return one matrix cell: pass, n/a, or the failing ``level`` properties of ``group``."""
    if report.status == "n/a":
        return "n/a"
    outs = [o for o in report.outcomes if o.group == group and o.level == level]
    return _cell(outs, short=True)


def should_summary(report: Report, /) -> str:
    """Return the matrix's SHOULD cell: pass, n/a, or the failing SHOULD properties."""
    if report.status == "n/a":
        return "n/a"
    return _cell([o for o in report.outcomes if o.level == "SHOULD"], short=False)


def _cell(outs: Sequence[Outcome], *, short: bool) -> str:
    if not outs:
        return ""
    fails = [o.name.split(".", 1)[1] if short else o.name for o in outs if o.status == "fail"]
    passed = sum(o.status == "pass" for o in outs)
    if fails:
        return "FAIL: " + ", ".join(fails)
    if passed == 0:
        return "n/a"
    na = sum(o.status == "n/a" for o in outs)
    return f"pass ({passed}/{len(outs)})" if na else "pass"


def matrix_markdown(reports: Sequence[Report], /, *, command: str) -> str:
    """Return the conformance matrix (implementation x property group) as Markdown."""
    lines = [
        "# Conformance matrix",
        "",
        "Generated by `kldiv-spec check` (do not edit by hand):",
        "",
        f"    {command}",
        "",
        "The group columns hold the MUST properties (a failure there is non-conformance:",
        "`kldiv-spec check` exits 1); the SHOULD column holds the SHOULD properties",
        "(PyTorch's exact warnings and exception classes: reported, failing the check",
        "only under `--strict`). Each cell: `pass`, `pass (k/n)` when n - k of its",
        "properties are n/a for that implementation (it cannot express them), `n/a`,",
        "or the failing properties.",
        "",
        "| implementation | backend | " + " | ".join(GROUPS) + " | SHOULD |",
        "|---|---|" + "---|" * (len(GROUPS) + 1),
    ]
    for r in reports:
        cells = [group_summary(r, g) for g in GROUPS] + [should_summary(r)]
        if r.status == "n/a":
            cells = [f"n/a: {r.reason}"] + [""] * len(GROUPS)
        lines.append(f"| {r.impl} | {r.backend} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(reports: Sequence[Report], path: str | Path, /) -> None:
    """Write the reports as JSON."""
    data = {
        "reports": [r.as_dict() for r in reports],
        "status": "fail" if any(r.failed for r in reports) else "pass",
        "should_status": "fail" if any(r.should_failed for r in reports) else "pass",
    }
    for r, d in zip(reports, data["reports"], strict=True):
        d["causes"] = [
            {"cause": key, "headline": o.name, "also": [x.name for x in others]}
            for key, o, others in causes(r)
        ]
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
