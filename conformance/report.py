"""Render reports: a readable table, JSON, and the Markdown conformance matrix.

MUST and SHOULD are kept apart everywhere: the table has a ``level`` column and
its header counts SHOULD failures separately; the matrix's group columns show
the MUST properties and one ``SHOULD`` column the SHOULD ones.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Sequence
from pathlib import Path

from .catalog import GROUPS, PROPERTIES
from .runner import Outcome, Report

__all__ = [
    "SPECIFICITY",
    "cause",
    "causes",
    "group_summary",
    "headline",
    "matrix_markdown",
    "should_summary",
    "summary",
    "table",
    "write_json",
    "write_reproductions",
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
    # from hidden states: side effects and dtype, the frozen teacher, fixed options, then
    # the drawn cases
    "hygiene.hidden_inputs_unmodified",
    "semantics.hidden_dtypes",
    "gradients.hidden_teacher_frozen",
    "accuracy.hidden_options",
    "gradients.hidden_oracle",
    "accuracy.hidden_oracle",
    "math.hidden_composition",
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


#: A failure that is an exception's description (``Name: message``), not a comparison.
_EXCEPTION = re.compile(r"^([A-Z]\w*(?:Error|Exception)): ")


def cause(outcome: Outcome, /) -> str:
    """Return a short description of what ``outcome``'s failure is about (its cause key).

    Read from the failure: what differs (errors, warnings, dtype, shape,
    NaN/inf pattern, values), of what (the loss or a gradient) and under which
    reduction. Failures with the same key are most likely one bug.
    """
    reason = outcome.reason
    reduction = re.search(r"reduction='(\w+)'", reason) or re.search(
        r"reduction='(\w+)'", outcome.reproduction
    )
    raised = _EXCEPTION.match(reason)
    if raised is not None:  # the call (or the gradient) raised where a value was due
        where = f", reduction={reduction.group(1)!r}" if reduction else ""
        of = "gradient" if outcome.group == "gradients" else "call"
        return f"{raised.group(1)} from the {of}{where}"
    kind = next((k for word, k in _KINDS if word in reason), "values")
    if kind in ("errors", "warnings", "side effects", "device"):
        return kind
    what = "loss"
    grad = re.search(
        r"gradient w\.r\.t\. (input|target|the student logits|the teacher logits|mu|logvar"
        r"|the student hidden|the student weight|the student bias)",
        reason,
    )
    if grad is not None:
        what = f"gradient w.r.t. {grad.group(1)}"
    where = f", reduction={reduction.group(1)!r}" if reduction and kind != "dtype" else ""
    # A recognised mistake ("it matches the cross-entropy") is a cause of its own.
    matches = _matched_mistake(reason)
    return f"{kind} of the {what}{where}" + (f" (it matches {matches})" if matches else "")


def _matched_mistake(reason: str) -> str:
    """Return ``X`` of the first ``(it matches X)`` in ``reason`` (X may hold parentheses)."""
    start = reason.find("(it matches ")
    if start < 0:
        return ""
    depth, begin = 0, start + len("(it matches ")
    for i in range(start, len(reason)):
        depth += {"(": 1, ")": -1}.get(reason[i], 0)
        if depth == 0:
            return reason[begin:i]
    return reason[begin:]


def causes(report: Report, /) -> list[tuple[str, Outcome, list[Outcome]]]:
    """Group the failures by :func:`cause`: ``(cause, headline, others)``.

    MUST causes first; among them, those matching a known mistake (the
    cross-entropy, the other direction, ...), then errors, warnings, side
    effects, the result's type, dtype and shape; then NaN/inf patterns and
    values, by headline.

    The headline is the most specific failing property of the cause (see
    :data:`SPECIFICITY`); the others fail most likely because of the same bug.
    """
    groups: dict[tuple[str, str], list[Outcome]] = {}
    for each in report.outcomes:
        if each.status == "fail":
            for o in each.each_failure():
                groups.setdefault((o.level, cause(o)), []).append(o)
    out = []
    for (_, key), outs in groups.items():
        outs = sorted(outs, key=lambda o: _rank(o.name))
        out.append((key, outs[0], outs[1:]))
    # A cause whose values match a known mistake (the cross-entropy, the other
    # direction, a missing T**2) is the headline: values are judged at the
    # precision of the result, so rounding does not hide it. Then a wrong type,
    # dtype or shape, which explains other differences, and the rest.
    kinds = [k for _, k in _KINDS if k != "NaN/inf pattern"]

    def order(c: tuple[str, Outcome, list[Outcome]]) -> tuple[bool, bool, int, tuple[int, int]]:
        kind = next((i for i, k in enumerate(kinds) if c[0].startswith(k)), len(kinds))
        return (c[1].level != "MUST", "(it matches " not in c[0], kind, _rank(c[1].name))

    return sorted(out, key=order)


def headline(report: Report, /) -> str:
    """Return the report's first line: the verdict, MUST and SHOULD failures counted apart."""
    head = f"{report.impl} on {report.backend}"
    if report.version:
        head += f" ({report.version})"
    if report.status == "n/a":
        return f"{head}: n/a ({report.reason})"
    n_must = sum(o.status == "fail" and o.level == "MUST" for o in report.outcomes)
    n_should = sum(o.status == "fail" and o.level == "SHOULD" for o in report.outcomes)
    n_error = sum(o.status == "error" for o in report.outcomes)
    verdict = "FAIL" if n_must else "COULD NOT RUN" if n_error else "PASS"
    counts = [
        f"{n_must} MUST propert{'ies' if n_must != 1 else 'y'} failing",
        f"{n_should} SHOULD failing",
    ]
    if n_error:
        counts.append(f"{n_error} could not run")
    return (
        f"{head}: {verdict}: {', '.join(counts)} "
        f"(up to {report.max_examples} examples per property)"
    )


_ABSENT = re.compile(r" has no (\w+) function$")


def _rows(report: Report) -> list[str]:
    # The properties of a function the implementation does not have: one line.
    absent: dict[str, int] = {}
    shown = []
    for o in report.outcomes:
        lacking = _ABSENT.search(o.reason) if o.status == "n/a" else None
        if lacking is None:
            shown.append(o)
        else:
            absent[lacking.group(1)] = absent.get(lacking.group(1), 0) + 1
    rows = [("property", "group", "level", "status", "examples")]
    rows += [
        (
            o.name,
            o.group,
            o.level,
            o.status.upper() if o.status in ("fail", "error") else o.status,
            str(o.examples),
        )
        for o in shown
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if absent:
        what = ", ".join(f"{n} of {subject}" for subject, n in absent.items())
        lines.append(f"  n/a: the properties of functions it does not have ({what})")
    for o in shown:
        if o.status == "n/a":
            lines.append(f"  n/a {o.name}: {o.reason}")
        elif o.status == "error" or o.unsupported:
            lines.append(f"  {o.name}: {o.reason}")
    return lines


def _opening(report: Report) -> tuple[list[str], list[tuple[str, Outcome, list[Outcome]]]]:
    """Return the lines both forms open with (headline, table, count of causes) and the causes."""
    lines = [headline(report), *_rows(report)]
    found = causes(report)
    if found:
        n = len({(o.name, o.reason) for _, h, others in found for o in (h, *others)})
        lines += ["", f"{n} failure(s), {len(found)} cause(s):"]
    return lines, found


def table(report: Report, /) -> str:
    """Return the report: its headline, a table of properties, and every cause of failure.

    Each cause is shown once, headed by its most specific failing property, with
    that failure's minimal counterexample and one reproduction; the other
    failures of the same cause follow as one line each.
    """
    if report.status == "n/a":
        return headline(report) + "\n"
    lines, found = _opening(report)
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


def summary(report: Report, /) -> str:
    """Return the short form: the headline, the table, and one line per cause."""
    if report.status == "n/a":
        return headline(report) + "\n"
    lines, found = _opening(report)
    for key, o, others in found:
        also = f" (+{len(others)} more)" if others else ""
        lines.append(f"  [{o.level}] {key}: {o.name}: {o.reason}{also}")
    return "\n".join(lines) + "\n"


def write_reproductions(report: Report, folder: str | Path, /) -> list[Path]:
    """Write one reproduction per cause into ``folder``; return the files' paths.

    Named ``<impl>-<backend>-<NN>-<property>.py``; each runs on its own (``python
    FILE``) from any folder and ends with a ``verdict:`` line.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{report.impl}-{report.backend}")
    written = []
    for i, (key, o, _) in enumerate(causes(report), start=1):
        if not o.reproduction:
            continue
        path = folder / f"{stem}-{i:02d}-{o.name}.py"
        path.write_text(f"# {o.name} [{o.level}]: {key}\n# {o.reason}\n{o.reproduction}\n")
        written.append(path)
    return written


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
    errors = [o for o in outs if o.status == "error"]
    passed = sum(o.status == "pass" for o in outs)
    if fails:
        return "FAIL: " + ", ".join(fails)
    if errors:
        return f"could not run ({errors[0].reason.removeprefix('could not run: ')})"
    if passed == 0:
        return "n/a"
    na = sum(o.status == "n/a" for o in outs)
    return f"pass ({passed}/{len(outs)})" if na else "pass"


def matrix_markdown(
    reports: Sequence[Report],
    /,
    *,
    command: str,
    date: datetime.date | None = None,
    details: bool = True,
    title: str = "Conformance matrix",
) -> str:
    """Return the conformance matrix (implementation x property group) as Markdown.

    A row names the implementation, the library's version when it is one, and
    the backend. The ``mutant:`` rows, when there are others, are a second table
    under ``## Mutants``, so that the implementations' table stays short. With
    ``details``, every distinct cause of failure of every row that is not a
    ``mutant:`` (those fail by design) is listed below the tables.
    """
    date = date or datetime.datetime.now(datetime.timezone.utc).date()
    lines = [
        f"# {title}",
        "",
        f"Generated by `kldiv-spec check` on {date.isoformat()} (do not edit by hand):",
        "",
        f"    {command}",
        "",
        "The group columns hold the MUST properties (a failure there is non-conformance:",
        "`kldiv-spec check` exits 1); the SHOULD column holds the SHOULD properties",
        "(reported, failing the check only under `--strict`). Each cell: `pass`,",
        "`pass (k/n)` when n - k of its properties are n/a for that implementation",
        "(it cannot express them), `n/a`, `could not run (reason)` when the machine,",
        "not the implementation, failed, or the failing properties.",
    ]
    if any(r.impl.startswith("peer:") for r in reports):
        lines += [
            "",
            "Rows named `peer:LIBRARY.FUNCTION (version)` are real libraries as installed,",
            "at the versions of `kldiv_spec.conformance.peers.PINS`: `nox -s peers` installs",
            "them, runs `tests/test_peers.py` (which recomputes the known differences with",
            "plain PyTorch or NumPy on the failing inputs) and regenerates this page.",
        ]
    mutants = [r for r in reports if r.impl.startswith("mutant:")]
    others = [r for r in reports if not r.impl.startswith("mutant:")]
    lines += ["", *_matrix_table(others or mutants)]
    if others and mutants:
        lines += [
            "",
            "## Mutants",
            "",
            "Deliberately broken implementations (`kldiv_spec.conformance.mutants`), one bug",
            "each: the cells name the properties that catch it. Every mutant must fail at",
            "least one MUST property (a SHOULD-level bug: exactly its SHOULD property).",
            "",
            *_matrix_table(mutants),
        ]
    failing = [r for r in reports if causes(r) and not r.impl.startswith("mutant:")]
    if details and failing:
        lines += ["", "## Every distinct failure", ""]
        lines += [
            "One line per cause: its level, what differs, the most specific failing",
            "property and its reason (`kldiv-spec check --impl NAME` prints the",
            "counterexample and a reproduction of each).",
        ]
        for r in failing:
            version = f" ({r.version})" if r.version else ""
            lines += ["", f"### {r.impl}{version} on {r.backend}", ""]
            for key, o, others in causes(r):
                also = f"; also {', '.join(sorted({x.name for x in others}))}" if others else ""
                reason = o.reason.replace("|", "\\|")
                lines.append(f"- **{o.level}** {key}: `{o.name}`: {reason}{also}")
    return "\n".join(lines) + "\n"


def _matrix_table(reports: Sequence[Report]) -> list[str]:
    """Return the lines of one Markdown table of the matrix: a row per report."""
    lines = [
        "| implementation | backend | " + " | ".join(GROUPS) + " | SHOULD |",
        "|---|---|" + "---|" * (len(GROUPS) + 1),
    ]
    for r in reports:
        cells = [group_summary(r, g) for g in GROUPS] + [should_summary(r)]
        if r.status == "n/a":
            cells = [f"n/a: {r.reason}"] + [""] * len(GROUPS)
        name = f"{r.impl} ({r.version})" if r.version else r.impl
        lines.append(f"| {name} | {r.backend} | " + " | ".join(cells) + " |")
    return lines


def write_json(reports: Sequence[Report], path: str | Path, /) -> None:
    """Write the reports as JSON."""
    data = {
        "reports": [r.as_dict() for r in reports],
        "status": "fail"
        if any(r.failed for r in reports)
        else "error"
        if any(r.status in ("error", "n/a") for r in reports)
        else "pass",
        "should_status": "fail" if any(r.should_failed for r in reports) else "pass",
    }
    for r, d in zip(reports, data["reports"], strict=True):
        d["causes"] = [
            {
                "cause": key,
                "level": o.level,
                "headline": o.name,
                "reason": o.reason,
                "reproduction": o.reproduction,
                "also": [x.name for x in others],
            }
            for key, o, others in causes(r)
        ]
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
