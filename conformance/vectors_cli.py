"""``kldiv-spec vectors``: export the golden vectors, and verify another implementation's results.

``kldiv-spec vectors export PATH`` writes the vectors (one JSON file, the same bytes
on every run of the same version); ``kldiv-spec vectors verify VECTORS RESULTS``
compares a results file with them and prints a table by property, like
``kldiv-spec check``. Exit status: 0 when every case holds (skipped cases do not
count), 1 when one fails, 2 on a usage error or a malformed file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .properties import GROUPS
from .vectors import (
    DEFAULT_MAX_ELEMENTS,
    FLOAT_DTYPES,
    FUNCTIONS,
    MalformedError,
    Verification,
    dumps,
    export,
    load,
    verify,
)

__all__ = ["main", "table"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kldiv-spec vectors",
        description="Golden vectors: the conformance cases as JSON data, for implementations "
        "in any language (see docs/vectors.md).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{export,verify}")
    ex = sub.add_parser(
        "export",
        help="write the vectors file",
        description="Write the golden vectors: every case with its expected values from the "
        "exact oracle, correctly rounded to the case's dtype, and the tolerance per element. "
        "The same options give the same bytes on every run of the same kldiv-spec version.",
    )
    ex.add_argument("path", metavar="PATH", help="the JSON file to write ('-' for stdout)")
    ex.add_argument(
        "--function",
        action="append",
        choices=list(FUNCTIONS),
        help="the functions to export cases of; repeatable (default: both)",
    )
    ex.add_argument(
        "--dtype",
        action="append",
        choices=list(FLOAT_DTYPES),
        help="keep the cases whose floating-point arrays all have these dtypes; repeatable "
        "(default: all three; mixed-dtype cases need both of theirs)",
    )
    ex.add_argument(
        "--max-elements",
        type=int,
        default=DEFAULT_MAX_ELEMENTS,
        metavar="N",
        help=f"the size limit: drop cases with an array of more than N elements (default "
        f"{DEFAULT_MAX_ELEMENTS}, about 2.5 MB in all; the large supports go up to 100000)",
    )
    ex.add_argument(
        "--group",
        action="append",
        choices=list(GROUPS),
        help="keep only the cases of these property groups; repeatable (default: all)",
    )
    ex.add_argument("--quiet", action="store_true", help="no summary on stderr")
    ve = sub.add_parser(
        "verify",
        help="compare a results file with the vectors",
        description="Compare the results file of an implementation with the vectors, case by "
        "case: NaN where NaN is expected, infinities with their sign, the sign of zero where "
        "the case says so, finite values within the case's absolute tolerance. Cases without "
        "a result are reported as skipped. Exit status 0 when every case holds, 1 when one "
        "fails, 2 when a file is malformed (the message names the case and the field).",
    )
    ve.add_argument("vectors", metavar="VECTORS", help="the vectors file (from 'export')")
    ve.add_argument("results", metavar="RESULTS", help="the implementation's results file")
    ve.add_argument(
        "--strict",
        action="store_true",
        help="also fail on SHOULD cases (by default only a MUST failure exits 1)",
    )
    ve.add_argument(
        "--max-failures",
        type=int,
        default=5,
        metavar="N",
        help="failing cases shown per property (default 5)",
    )
    ve.add_argument("--json", metavar="PATH", help="also write every case's outcome as JSON")
    return p


def table(
    report: Verification, /, *, source: str = "", max_failures: int = 5, strict: bool = False
) -> str:
    """Return the verification as a text table by property (group, level, counts) with failures.

    The verdict is FAIL when a MUST case failed (any case, with ``strict``).
    """
    props = report.by_property()
    rows = [("property", "group", "level", "status", "passed", "failed", "skipped")]
    for name, outs in props.items():
        n = {s: sum(o.status == s for o in outs) for s in ("pass", "fail", "skipped")}
        status = "FAIL" if n["fail"] else ("pass" if n["pass"] else "skipped")
        rows.append(
            (
                name,
                outs[0].group,
                outs[0].level,
                status,
                str(n["pass"]),
                str(n["fail"]),
                str(n["skipped"]),
            )
        )
    counts = {s: sum(o.status == s for o in report.outcomes) for s in ("pass", "fail", "skipped")}
    verdict = "FAIL" if report.failed(strict=strict) else "PASS"
    where = f" against {source}" if source else ""
    lines = [
        f"{report.implementation}{where} ({report.generator}): {verdict} "
        f"({len(report.outcomes)} cases: {counts['pass']} passed, {counts['fail']} failed, "
        f"{counts['skipped']} skipped)"
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    for name, outs in props.items():
        fails = [o for o in outs if o.status == "fail"]
        if not fails:
            continue
        description = report.descriptions.get(name, "")
        lines += ["", f"FAIL {name} ({fails[0].level}{': ' + description if description else ''})"]
        lines += [f"  {o.id}: {o.reason}" for o in fails[:max_failures]]
        if len(fails) > max_failures:
            lines.append(f"  ... and {len(fails) - max_failures} more failing cases")
    return "\n".join(lines) + "\n"


def _export(args: argparse.Namespace) -> int:
    if args.max_elements < 1:
        sys.stderr.write("kldiv-spec vectors export: error: --max-elements must be >= 1\n")
        return 2
    document = export(
        functions=args.function or FUNCTIONS,
        dtypes=args.dtype or FLOAT_DTYPES,
        max_elements=args.max_elements,
        groups=args.group,
    )
    text = dumps(document)
    if args.path == "-":
        sys.stdout.write(text)
    else:
        Path(args.path).write_text(text, encoding="utf-8")
    if not args.quiet:
        where = "stdout" if args.path == "-" else args.path
        sys.stderr.write(
            f"wrote {len(document['cases'])} cases ({len(text.encode())} bytes) to {where}\n"
        )
    return 0


def _verify(args: argparse.Namespace) -> int:
    try:
        vectors = load(args.vectors)
        results = load(args.results)
        report = verify(vectors, results, vectors_doc=args.vectors, results_doc=args.results)
    except (OSError, MalformedError) as exc:
        sys.stderr.write(f"kldiv-spec vectors verify: error: {exc}\n")
        return 2
    text = table(report, source=args.vectors, max_failures=args.max_failures, strict=args.strict)
    print(text, end="")
    failed = report.failed(strict=args.strict)
    if args.json:
        data = {
            "implementation": report.implementation,
            "generator": report.generator,
            "status": "fail" if failed else "pass",
            "outcomes": [o.__dict__ for o in report.outcomes],
        }
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kldiv-spec vectors``; return the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.command == "export":
        return _export(args)
    return _verify(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
