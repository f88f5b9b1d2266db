"""Check your own KL-divergence implementation against the specification.

The conformance suite runs on any function with PyTorch's functional
signature, named as ``MODULE:FUNCTION``::

    kldiv-spec check --impl my_impl:kl_div --backend numpy

(with ``examples/`` on ``PYTHONPATH`` so that ``my_impl`` imports). It exits
with status 0 when every property holds and 1 otherwise, printing each failing
property with a minimal counterexample and code to reproduce it. This script
runs it, with 5 examples per property to stay quick (the default is more), on
the two functions of ``examples/my_impl.py``: the conforming ``kl_div`` passes,
the target-clamping ``kl_div_clamped`` is rejected.

    python examples/validate_my_impl.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def check(impl: str) -> subprocess.CompletedProcess[str]:
    """Run ``kldiv-spec check --impl IMPL --backend numpy`` and return the finished process."""
    options = ["--backend", "numpy", "--max-examples", "5", "--quiet"]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    )
    command = [sys.executable, "-m", "kldiv_spec._cli", "check", "--impl", impl, *options]
    print("$", "kldiv-spec", *command[3:])
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def main() -> int:
    good = check("my_impl:kl_div")
    print(good.stdout, good.stderr[-2000:], sep="")
    bad = check("my_impl:kl_div_clamped")
    failures = [line for line in bad.stdout.splitlines() if line.startswith("FAIL ")]
    print(*failures, sep="\n")
    print(f"my_impl:kl_div -> exit status {good.returncode} (expected 0)")
    print(f"my_impl:kl_div_clamped -> exit status {bad.returncode} (expected 1)")
    return 0 if good.returncode == 0 and bad.returncode == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
