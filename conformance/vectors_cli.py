"""``kldiv-spec vectors``: export the golden vectors, and verify another implementation's results.

``kldiv-spec vectors export PATH`` writes the vectors (one JSON file, the same bytes
on every run of the same version); ``kldiv-spec vectors verify VECTORS RESULTS``
compares a results file with them and prints a table by property, like
``kldiv-spec check``. Exit status: 0 when every case holds (skipped cases do not
count), 1 when one fails (the implementation disagrees with the vectors), 2 on a
usage error or a file that is malformed, unreadable or too large (one line on
stderr naming the file and, where it applies, the case and the field). A result
that differs from the vectors only in the sign of a zero is reported, and fails
only with ``--strict``: the sign of a zero is a SHOULD.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from .properties import GROUPS
from .vectors import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ELEMENTS,
    FLOAT_DTYPES,
    FUNCTIONS,
    ZERO_SIGN,
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
        "case: NaN where NaN is expected, infinities with their sign, finite values within "
        "the case's absolute tolerance, and the sign of a zero where the case says so (a "
        "SHOULD: a difference is reported, and fails only with --strict). Cases without a "
        "result are reported as skipped. Exit status 0 when every case holds, 1 when one "
        "fails, 2 when a file is malformed, unreadable or too large (one line on stderr "
        "naming the file, the case and the field).",
    )
    ve.add_argument("vectors", metavar="VECTORS", help="the vectors file (from 'export')")
    ve.add_argument("results", metavar="RESULTS", help="the implementation's results file")
    ve.add_argument(
        "--strict",
        action="store_true",
        help="also fail on SHOULD cases and on a zero of the other sign (by default only a "
        "MUST failure exits 1)",
    )
    ve.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        metavar="N",
        help=f"refuse a file of more than N bytes (default {DEFAULT_MAX_BYTES}, 1 GiB); a "
        "pipe or device is read up to N bytes",
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

    The verdict is FAIL when a MUST case failed (with ``strict``: any case, or
    a zero of the other sign). Where a result differs only in the sign of a
    zero, the table has a ``zero_sign`` column and lists those cases.
    """
    props = report.by_property()
    counts = report.counts()
    signs = counts[ZERO_SIGN] > 0
    statuses = ("pass", "fail", ZERO_SIGN, "skipped") if signs else ("pass", "fail", "skipped")
    rows = [("property", "group", "level", "status", "passed", "failed")]
    rows[0] += (ZERO_SIGN, "skipped") if signs else ("skipped",)
    for name, outs in props.items():
        n = {s: sum(o.status == s for o in outs) for s in statuses}
        failing = n["fail"] or (strict and n.get(ZERO_SIGN))
        status = "FAIL" if failing else ("pass" if n["pass"] or n.get(ZERO_SIGN) else "skipped")
        rows.append((name, outs[0].group, outs[0].level, status, *(str(n[s]) for s in statuses)))
    verdict = "FAIL" if report.failed(strict=strict) else "PASS"
    where = f" against {source}" if source else ""
    sign_text = f", {counts[ZERO_SIGN]} with a zero of the other sign" if signs else ""
    lines = [
        f"{report.implementation}{where} ({report.generator}): {verdict} "
        f"({len(report.outcomes)} cases: {counts['pass']} passed, {counts['fail']} failed"
        f"{sign_text}, {counts['skipped']} skipped)"
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    for name, outs in props.items():
        description = report.descriptions.get(name, "")
        for status, title in (("fail", "FAIL"), (ZERO_SIGN, "ZERO SIGN")):
            bad = [o for o in outs if o.status == status]
            if not bad:
                continue
            if status == "fail":
                about = f"{bad[0].level}{': ' + description if description else ''}"
            else:
                about = f"SHOULD: a zero of the other sign; {'fails' if strict else 'passes'}"
                about += "" if strict else " but with --strict"
            lines += ["", f"{title} {name} ({about})"]
            lines += [f"  {o.id}: {o.reason}" for o in bad[:max_failures]]
            if len(bad) > max_failures:
                kind = "failing" if status == "fail" else "such"
                lines.append(f"  ... and {len(bad) - max_failures} more {kind} cases")
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


def _say(stream: TextIO, text: str) -> None:
    """Write ``text`` to ``stream``, escaping what its encoding cannot write."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    stream.write(text.encode(encoding, "backslashreplace").decode(encoding))


def _one_line(text: str) -> str:
    """Return ``text`` on one line (control characters escaped), at most 1000 characters."""
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text[:1000])
    return text if len(text) <= 1000 else text[:997] + "..."


def _verify(args: argparse.Namespace) -> int:
    def malformed(msg: str) -> int:
        _say(sys.stderr, f"kldiv-spec vectors verify: error: {_one_line(msg)}\n")
        return 2

    if args.max_bytes < 1:
        return malformed("--max-bytes must be >= 1")
    try:
        vectors = load(args.vectors, max_bytes=args.max_bytes, compact=True)
        results = load(args.results, max_bytes=args.max_bytes, compact=True)
        report = verify(vectors, results, vectors_doc=args.vectors, results_doc=args.results)
    except MalformedError as exc:
        return malformed(str(exc))
    except OSError as exc:
        name = exc.filename if exc.filename is not None else args.vectors
        return malformed(f"{name}: cannot read it: {exc.strerror or exc}")
    except (MemoryError, RecursionError):
        return malformed(f"{args.results}: not enough memory to compare it with {args.vectors}")
    del vectors, results
    text = table(report, source=args.vectors, max_failures=args.max_failures, strict=args.strict)
    _say(sys.stdout, text)
    failed = report.failed(strict=args.strict)
    if args.json:
        data = {
            "implementation": report.implementation,
            "generator": report.generator,
            "status": "fail" if failed else "pass",
            "outcomes": [o.__dict__ for o in report.outcomes],
        }
        try:
            Path(args.json).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        except OSError as exc:
            return malformed(f"{args.json}: cannot write it: {exc.strerror or exc}")
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
