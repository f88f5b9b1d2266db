"""``kldiv-spec check``: run the conformance suite from the command line.

Exit status: 0 when something was checked and every MUST property held; 1 when
a MUST property failed (or, with ``--strict``, a SHOULD property); 2 when
nothing could be judged: a usage error, an implementation that cannot be
loaded, a backend or library that is not installed, or a machine that failed
(no GPU driver, ...), each said in one line. With no arguments it checks the
reference on every installed backend. ``--kind`` says what a
``MODULE:CALLABLE`` is: a ``kl_div`` (the default), a from-logits function, a
Gaussian KL, or a loss of the torchtune or Liger convention.

Each implementation other than the built-in ones runs in a child process
(:mod:`.isolation`), so that one which exits, crashes or hangs is a failure of
the property it was called in, with a per-call time limit (``--timeout``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from . import adapters, isolation
from .catalog import GROUPS, select
from .mutants import MUTANTS
from .namespaces import (
    BACKENDS,
    BackendUnavailable,
    infer_backend,
    installed_backends,
    load_backend,
)
from .report import matrix_markdown, summary, table, write_json, write_reproductions
from .runner import (
    DEFAULT_MAX_EXAMPLES,
    KINDS,
    Outcome,
    Report,
    ResolveError,
    resolve,
    run,
)

__all__ = ["main"]


_LEVELS_HELP = """\
requirement levels:
  MUST    values, NaN/inf patterns, dtypes, shapes, gradients, and refusing
          invalid arguments with an error for invalid arguments (TypeError,
          ValueError or RuntimeError). A MUST failure exits 1. Raising any other
          exception (AttributeError, IndexError, KeyError, ...) for an invalid
          call is a crash, not a refusal: a MUST failure.
  SHOULD  PyTorch's 'mean' UserWarning (and no other warning), silence about
          floating-point warnings, the exact exception class (ValueError for
          shapes and reduction, TypeError for dtypes; PyTorch's RuntimeError is
          accepted for shapes and dtypes; raising another of TypeError,
          ValueError, RuntimeError is a SHOULD failure), the sign of a zero, and
          the guarantees of kl_div_from_logits beyond what PyTorch's functions
          composed give (exactly 0 at identity, 0 where both distributions
          exclude a class, 0 for a fully masked reduction). SHOULD failures are
          reported (level column, SHOULD column of --markdown) and exit 1 only
          with --strict.
  An implementation is judged at the precision it computes in: a float32
  result for float64 input is one dtype failure, and its values are then held
  to float32's bounds.

kinds of MODULE:CALLABLE (--kind):
  kl-div           fn(input, target, reduction=..., log_target=...), PyTorch's
                   kl_div (the default); from_logits and gaussian attributes on
                   it, if any, are checked too
  from-logits      fn(input, target, *, temperature, reduction, direction,
                   scale_by_temperature_squared, mask=...), as
                   kldiv_spec.kl_div_from_logits
  gaussian         fn(mu, logvar, *, reduction, mu_prior, logvar_prior), as
                   kldiv_spec.gaussian_kl
  from-hidden      fn(h_s, W_s, h_t, W_t, *, student_bias, teacher_bias,
                   temperature, reduction, direction,
                   scale_by_temperature_squared, mask=...): the from-logits KL
                   of the logits h @ W.T + b, as fused linear losses compute it
                   (Liger-Kernel's LigerFusedLinearJSDLoss); a backward attribute
                   gives the student's gradients without autograd
  torchtune-style  loss(student_logits, teacher_logits, labels, normalize=True),
                   as torchtune's ForwardKLLoss (a class is instantiated)
  liger-style      jsd(student_log_probs, teacher_log_probs, shift_labels=None)
                   with beta 0 (forward KL) / 1 (reverse KL), as Liger-Kernel's
                   LigerJSD (a class is instantiated with beta=)
  Properties of a function the implementation lacks are n/a, and so are the
  options it cannot express (the styles: one direction for torchtune, per-token
  means).

exit status:
  0  something was checked, and every MUST property held (--strict: every one)
  1  a MUST property failed (--strict: any property)
  2  nothing could be judged: usage error, IMPL cannot be loaded, a backend or
     library is not installed, or the machine failed (no GPU driver, ...)
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
    p.add_argument(
        "--ignore-index",
        type=int,
        metavar="N",
        help="the label of ignored tokens, for --kind torchtune-style and liger-style "
        "(default -100)",
    )
    p.add_argument(
        "--direction",
        choices=["forward", "reverse"],
        help="the direction a --kind torchtune-style loss computes (default forward)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=isolation.DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"per-call time limit of the implementation (default {isolation.DEFAULT_TIMEOUT:g})",
    )
    p.add_argument(
        "--no-isolate",
        action="store_true",
        help="run the implementation in this process (faster; one that exits or hangs "
        "then ends the check)",
    )
    p.add_argument(
        "--summary",
        action="store_true",
        help="print the table and one line per cause, without counterexamples",
    )
    p.add_argument(
        "--repro-dir",
        metavar="DIR",
        help="write one reproduction script per cause of failure into DIR",
    )
    p.add_argument("--json", metavar="PATH", help="write a machine-readable report")
    p.add_argument("--markdown", metavar="PATH", help="write the conformance matrix as Markdown")
    p.add_argument(
        "--markdown-title",
        default="Conformance matrix",
        metavar="TEXT",
        help="the title of the --markdown page (default: Conformance matrix)",
    )
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
    if args.backend:
        missing = [b for b in args.backend if not _can_run(b)]
        if missing:
            why = _why_not(missing[0])
            return _cannot(f"--backend {missing[0]} cannot run here: {why}")
    reports: list[Report] = []
    problems: list[str] = []
    render = summary if args.summary else table
    for spec in specs:
        # --kind says what a MODULE:CALLABLE is; named implementations know their own
        own = ":" in spec and not spec.startswith(("mutant:", "peer:"))
        kind = args.kind if own else "kl-div"
        style_options = _style_options(args) if kind in adapters.STYLES else {}
        isolate = own and not args.no_isolate
        try:
            if isolate:  # loading it runs its code: in a child process too
                impl = isolation.probe(
                    spec, kind=kind, style_options=style_options, timeout=args.timeout
                )
                name, impl_backends, inferred = impl.name, impl.backends, impl.backend
            else:
                implementation = resolve(spec, kind=kind, **style_options)
                name, impl_backends = implementation.name, implementation.backends
                inferred = infer_backend(implementation.primary) if own else None
        except ResolveError as exc:
            hint = f"; pip install {exc.missing}" if exc.missing else ""
            problems.append(f"{exc}{hint}")
            sys.stderr.write(f"kldiv-spec check: error: {exc}{hint}\n")
            reports.append(_not_checked(args, spec, "-", f"{exc}{hint}"))
            continue
        if args.backend:
            backends = args.backend
        elif impl_backends:
            backends = [b for b in impl_backends if _can_run(b)]
            if not backends:
                why = _why_not(impl_backends[0])
                problems.append(f"{spec} runs on {', '.join(impl_backends)}: {why}")
                sys.stderr.write(f"kldiv-spec check: error: {problems[-1]}\n")
                reports.append(_not_checked(args, spec, impl_backends[0], why))
                continue
        elif spec == "reference":
            backends = installed_backends()
        elif own:
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
            report = _check(args, spec, be, kind, style_options, name, isolate=isolate)
            if isinstance(report, str):
                problems.append(report)
                sys.stderr.write(f"kldiv-spec check: error: {report}\n")
                reports.append(_not_checked(args, spec, be, report))
                continue
            report.impl = spec
            reports.append(report)
            print(render(report), flush=True)
            if args.repro_dir:
                for path in write_reproductions(report, args.repro_dir):
                    sys.stderr.write(f"wrote {path}\n")
    if args.json:
        write_json(reports, args.json)
    if args.markdown:
        given = list(sys.argv[1:] if argv is None else argv)
        command = "kldiv-spec check " + " ".join(shlex.quote(a) for a in given)
        text = matrix_markdown(reports, command=command.strip(), title=args.markdown_title)
        Path(args.markdown).write_text(text)
    return _exit_status(reports, problems, strict=args.strict)


def _not_checked(args: argparse.Namespace, spec: str, backend: str, why: str) -> Report:
    """Return the n/a report of an implementation that could not be checked.

    Its reason was said on stderr when it happened (``reason`` starts with that
    line), so :func:`_exit_status` does not say it again.
    """
    return Report(spec, backend, args.max_examples, args.seed, status="n/a", reason=why)


def _style_options(args: argparse.Namespace) -> dict[str, object]:
    options: dict[str, object] = {}
    if args.ignore_index is not None:
        options["ignore_index"] = args.ignore_index
    if args.direction is not None:
        options["direction"] = args.direction
    return options


def _check(
    args: argparse.Namespace,
    spec: str,
    backend: str,
    kind: str,
    style_options: dict[str, object],
    label: str,
    *,
    isolate: bool,
) -> Report | str:
    """Run one implementation on one backend; a string says why it could not be run."""
    options = dict(
        groups=args.group,
        names=args.property,
        max_examples=args.max_examples,
        seed=args.seed,
        shrink=not args.no_shrink,
        progress=_progress(args.quiet, f"{label}/{backend}"),
        kind=kind,
        style_options=style_options,
    )
    if isolate:
        try:
            return isolation.run_isolated(spec, backend, timeout=args.timeout, **options)
        except isolation.ResolveError as exc:
            return str(exc)
    return run(spec, backend, **options)


def _why_not(backend: str) -> str:
    try:
        load_backend(backend)
    except (ImportError, BackendUnavailable) as exc:
        return str(exc).splitlines()[0]
    return "it cannot run here"


def _cannot(message: str) -> int:
    sys.stderr.write(f"kldiv-spec check: error: {message}\n")
    return 2


def _exit_status(reports: Sequence[Report], problems: Sequence[str], *, strict: bool) -> int:
    """1 on a MUST failure (strict: any); else 2 if anything could not be judged; else 0."""
    if any(r.rejected(strict=False) for r in reports):
        return 1
    unjudged = [r for r in reports if r.status in ("n/a", "error")]
    for r in unjudged:
        if not any(r.reason in said for said in problems):  # not said when it happened
            sys.stderr.write(
                f"kldiv-spec check: error: {r.impl} on {r.backend} could not be checked: "
                f"{r.reason}\n"
            )
    if problems or unjudged:
        return 2
    if not any(r.checked for r in reports):
        return _cannot("nothing was checked: every selected property is n/a")
    return 1 if any(r.rejected(strict=strict) for r in reports) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
