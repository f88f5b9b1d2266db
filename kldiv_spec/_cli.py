"""The ``kldiv-spec`` command: ``check`` (the conformance suite) and ``vectors``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]

_USAGE = """usage: kldiv-spec check [options]
       kldiv-spec vectors {export,verify} ...
       kldiv-spec --version

  (also: python -m kldiv_spec ...)

  check   run the conformance suite against an implementation (default: the
          reference, on every installed backend); 'kldiv-spec check --help'
  vectors export the golden vectors (JSON, for implementations in any
          language) and verify a results file against them;
          'kldiv-spec vectors export --help', 'kldiv-spec vectors verify --help'
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kldiv-spec`` command line; return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE, end="")
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from kldiv_spec import __version__

        print(f"kldiv-spec {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command == "check":
        from kldiv_spec.conformance.cli import main as check_main

        return check_main(rest)
    if command == "vectors":
        from kldiv_spec.conformance.vectors_cli import main as vectors_main

        return vectors_main(rest)
    print(f"kldiv-spec: unknown command {command!r}\n{_USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
