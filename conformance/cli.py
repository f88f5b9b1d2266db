"""``kldiv-spec check``: run the conformance suite from the command line.

Exit status: 0 when every MUST property holds, 1 when one fails (or, with
``--strict``, when a SHOULD property fails), 2 on a usage error. With no
arguments it checks the reference on every installed backend. ``--kind`` says
what a ``MODULE:CALLABLE`` is: a ``kl_div`` (the default), a from-logits
function, a Gaussian KL, or a loss of the torchtune or Liger convention.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from .mutants import MUTANTS
from .namespaces import (
    BACKENDS,
    BackendUnavailable,
    infer_backend,
    installed_backends,
    load_backend,
)
from .properties import GROUPS, select
from .report import matrix_markdown, table, write_json
from .runner import DEFAULT_MAX_EXAMPLES, KINDS, Outcome, Report, resolve, run

__all__ = ["main"]


_LEVELS_HELP = """\
requirement levels:
  MUST    values, NaN/inf patterns, dtypes, shapes, gradients, and refusing
          invalid arguments with an error for invalid arguments (TypeError,
          ValueError or RuntimeError). A MUST failure exits 1. Raising any other
          exception (AttributeError, IndexError, KeyError, ...) for an invalid
          call is a crash, not a refusal: a MUST failure.
  SHOULD  PyTorch's 'mean' UserWarning (and no other warning), silence about
          floating-point warnings, and the exact exception class (ValueError for
          shapes and reduction, TypeError for dtypes; PyTorch's RuntimeError is
          accepted for shapes and dtypes). Raising another of TypeError,
          ValueError, RuntimeError is a SHOULD failure. SHOULD failures are
          reported (level column, SHOULD column of --markdown) and exit 1 only
          with --strict.

kinds of MODULE:CALLABLE (--kind):
  kl-div           fn(input, target, reduction=..., log_target=...), PyTorch's
                   kl_div (the default); from_logits and gaussian attributes on
                   it, if any, are checked too
  from-logits      fn(input, target, *, temperature, reduction, direction,
                   scale_by_temperature_squared, mask=...), as
                   kldiv_spec.kl_div_from_logits
  gaussian         fn(mu, logvar, *, reduction, mu_prior, logvar_prior), as
                   kldiv_spec.gaussian_kl
  torchtune-style  loss(student_logits, teacher_logits, labels, normalize=True),
                   as torchtune's ForwardKLLoss (a class is instantiated)
  liger-style      jsd(student_log_probs, teacher_log_probs, shift_labels=None)
                   with beta 0 (forward KL) / 1 (reverse KL), as Liger-Kernel's
                   LigerJSD (a class is instantiated with beta=)
  Properties of a function the implementation lacks are n/a, and so are the
  options it cannot express (the styles: forward only for torchtune, per-token
  means).
"""


def _can_run(backend: str) -> bool:
    try:
        load_backend(backend)
    except (ImportError, BackendUnavailable):
        return False
    return True


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kldiv-spec check",
        description="Check a KL-divergence implementation against PyTorch's kl_div semantics.",
        epilog=_LEVELS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--impl",
        action="append",
        metavar="IMPL",
        help="reference (default), torch, numpy, an adapter (scipy-rel-entr, optax, "
        "keras, torchmetrics, mlx, paddle, and the models torchtune-style, liger-style), "
        "mutant:NAME or MODULE:CALLABLE; repeatable",
    )
    p.add_argument(
        "--kind",
        choices=list(KINDS),
        default="kl-div",
        help="what each MODULE:CALLABLE is (see below; default kl-div)",
    )
    p.add_argument(
        "--backend",
        action="append",
        choices=list(BACKENDS),
        help="repeatable; default: every installed backend for the reference, the "
        "implementation's own backends, for MODULE:CALLABLE the library its module uses "
        "(torch for a torch function, ...; an error if it cannot tell), else numpy",
    )
    p.add_argument(
        "--all-mutants",
        action="store_true",
        help="also check every deliberately broken implementation (see .mutants)",
    )
    p.add_argument("--group", action="append", choices=list(GROUPS), help="repeatable")
    p.add_argument("--property", action="append", metavar="NAME", help="repeatable")
    p.add_argument(
        "--max-examples",
        type=int,
        default=DEFAULT_MAX_EXAMPLES,
        help=f"hypothesis examples per property, on every backend (default "
        f"{DEFAULT_MAX_EXAMPLES}); the costliest properties (finite differences, double "
        "backward) run a fixed fraction of it, shown in the examples column",
    )
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    p.add_argument("--no-shrink", action="store_true", help="report failures unshrunk (faster)")
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 on SHOULD failures too (PyTorch's exact warnings and exception classes)",
    )
    p.add_argument("--json", metavar="PATH", help="write a machine-readable report")
    p.add_argument("--markdown", metavar="PATH", help="write the conformance matrix as Markdown")
    p.add_argument("--list", action="store_true", help="list the properties and exit")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def _progress(quiet: bool, label: str):  # type: ignore[no-untyped-def]
    def show(name: str, outcome: Outcome | None) -> None:
        if quiet:
            return
        if outcome is None:
            sys.stderr.write(f"[{label}] {name} ...")
        else:
            sys.stderr.write(f" {outcome.status} ({outcome.examples})\n")
        sys.stderr.flush()

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kldiv-spec check``; return the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    props = select(args.group, args.property)
    if args.list:
        for p in select():
            print(f"{p.name:34s} {p.level:6s} {p.description}")
        return 0
    if args.property and not props:
        parser.print_usage(sys.stderr)
        sys.stderr.write("kldiv-spec check: error: no property matches --property\n")
        return 2
    specs = args.impl or ([] if args.all_mutants else ["reference"])
    if args.all_mutants:
        specs += [f"mutant:{name}" for name in MUTANTS]
    reports: list[Report] = []
    for spec in specs:
        # --kind says what a MODULE:CALLABLE is; named implementations know their own
        kind = args.kind if ":" in spec and not spec.startswith("mutant:") else "kl-div"
        try:
            impl = resolve(spec, kind=kind)
        except ImportError as exc:
            reports.append(
                Report(
                    spec,
                    ",".join(args.backend or ["-"]),
                    0,
                    args.seed,
                    status="n/a",
                    reason=f"not installed ({exc.name or exc})",
                )
            )
            print(table(reports[-1]), end="")
            continue
        except ValueError as exc:
            parser.print_usage(sys.stderr)
            sys.stderr.write(f"kldiv-spec check: error: {exc}\n")
            return 2
        if args.backend:
            backends = args.backend
        elif impl.backends:
            backends = [b for b in impl.backends if _can_run(b)] or list(impl.backends[:1])
        elif spec == "reference":
            backends = installed_backends()
        elif ":" in spec and not spec.startswith("mutant:"):
            inferred = infer_backend(impl.primary)
            if inferred is None:
                sys.stderr.write(
                    f"kldiv-spec check: error: cannot tell which array library {spec} takes: "
                    f"pass --backend ({', '.join(BACKENDS)})\n"
                )
                return 2
            backends = [inferred]
            if not args.quiet:
                sys.stderr.write(f"[{spec}] --backend {inferred} (inferred from its module)\n")
        else:
            backends = ["numpy"]
        for be in backends:
            report = run(
                spec,
                be,
                groups=args.group,
                names=args.property,
                max_examples=args.max_examples,
                seed=args.seed,
                shrink=not args.no_shrink,
                progress=_progress(args.quiet, f"{impl.name}/{be}"),
                kind=kind,
            )
            report.impl = spec
            reports.append(report)
            print(table(report), flush=True)
    if args.json:
        write_json(reports, args.json)
    if args.markdown:
        command = "kldiv-spec check " + " ".join(
            shlex.quote(a)
            for a in (sys.argv[1:] if argv is None else argv)
            if not a.startswith("--markdown") and a != args.markdown
        )
        Path(args.markdown).write_text(matrix_markdown(reports, command=command.strip()))
    return 1 if any(r.rejected(strict=args.strict) for r in reports) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
