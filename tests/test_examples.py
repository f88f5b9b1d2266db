"""Every script in ``examples/`` runs to completion and prints what it claims.

Each runs in a subprocess with warnings as errors; the scripts check their own
results with assertions, so exit status 0 means the claims held. Scripts whose
library is not installed are skipped.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

#: script -> (libraries it needs, phrases its output must contain)
CASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "distillation_torch.py": (
        ("torch",),
        ("distillation loss (T^2 * batchmean KL, T=4)", "matches torch.nn.functional.kl_div"),
    ),
    "numpy_backward.py": ((), ("batchmean KL(P || Q):", "max |q - p| =")),
    "jax_grad.py": (
        ("jax",),
        ("jax.grad matches (softmax(z) - p) / B", "batchmean KL(P || Q) under jax.jit"),
    ),
    "dask_large.py": (("dask",), ("lazy loss:", "batchmean KL over 64 x 20000")),
    "validate_my_impl.py": (
        (),
        (
            "my_impl:kl_div on numpy: PASS",
            "FAIL semantics.edge_values",
            "my_impl:kl_div -> exit status 0",
            "my_impl:kl_div_clamped -> exit status 1",
        ),
    ),
}


def run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / script)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
    )


def test_every_example_is_listed() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py")} - {"my_impl.py"}
    assert scripts == set(CASES)


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script: str) -> None:
    needs, phrases = CASES[script]
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{script} needs {', '.join(missing)}")
    proc = run(script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for phrase in phrases:
        assert phrase in proc.stdout, proc.stdout


def test_my_impl_follows_the_specification_on_simple_values() -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import my_impl
    finally:
        sys.path.remove(str(EXAMPLES))
    import numpy as np

    x = np.log(np.asarray([[0.25, 0.75], [0.5, 0.5]]))
    t = np.asarray([[0.5, 0.5], [1.0, 0.0]])
    expected = np.sum(np.where(t == 0, 0.0, t * np.log(np.where(t == 0, 1.0, t))) - t * x) / 2
    assert np.isclose(my_impl.kl_div(x, t, reduction="batchmean"), expected)
    assert not np.isclose(my_impl.kl_div_clamped(x, t, reduction="none")[1, 1], 0.0, atol=0)
