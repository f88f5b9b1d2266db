"""Every script in ``examples/`` runs to completion and prints what it claims.

Each runs in a subprocess with warnings as errors; the scripts check their own
results with assertions, so exit status 0 means the claims held. Scripts whose
library is not installed are skipped. The four use cases of the seed document
(``USE_CASES``) run in their ``--quick`` mode, as CI and the docs build run
them, and must save their picture into ``--out`` when matplotlib is installed.
"""

from __future__ import annotations

import ast
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
        (
            "distillation loss (T^2 * batchmean KL, T=4)",
            "matches torch.nn.functional.kl_div",
            "kl_div_from_logits gives the same loss",
        ),
    ),
    "numpy_backward.py": ((), ("batchmean KL(P || Q):", "max |q - p| =")),
    "jax_grad.py": (
        ("jax",),
        ("jax.grad matches (softmax(z) - p) / B", "batchmean KL(P || Q) under jax.jit"),
    ),
    "dask_large.py": (("dask",), ("lazy loss:", "batchmean KL over 64 x 20000")),
    "distillation_temperature.py": (
        ("torch",),
        (
            "T > 1 softens the distribution",
            "without the factor the gradient falls like 1/T^2",
            "values and gradients agree",
            "batchmean / 10 classes",
        ),
    ),
    "vae_latent_kl.py": (
        ("torch",),
        (
            "gaussian_kl(mu, logvar) =",
            "converges to the closed form",
            "meaningless",
            "= log 8 - H(posterior)",
        ),
    ),
    "kl_vs_cross_entropy.py": (
        ("torch",),
        ("one-hot targets, H(P) = 0", "= H(P); gradients w.r.t. z", "log P + 1 (checked)"),
    ),
    "policy_distillation.py": (
        ("torch",),
        ("same value and gradients", "masked actions contribute 0", "greedy action agrees"),
    ),
    "distillation_hidden.py": (
        ("torch",),
        ("same value and gradients", "training: loss", "extra peak memory"),
    ),
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


#: script -> the picture it saves into --out (the gallery of docs/gallery.md shows it)
USE_CASES = {
    "distillation_temperature.py": "temperature.png",
    "vae_latent_kl.py": "vae.png",
    "kl_vs_cross_entropy.py": "kl_vs_ce.png",
    "policy_distillation.py": "policy.png",
    "distillation_hidden.py": "hidden.png",
}


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / script), *args],
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
def test_example_runs(script: str, tmp_path: Path) -> None:
    needs, phrases = CASES[script]
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{script} needs {', '.join(missing)}")
    args = ("--quick", "--out", str(tmp_path)) if script in USE_CASES else ()
    proc = run(script, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for phrase in phrases:
        assert phrase in proc.stdout, proc.stdout
    if script in USE_CASES and importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / USE_CASES[script]).is_file(), proc.stdout


@pytest.mark.parametrize("script", sorted(USE_CASES))
def test_use_case_declares_what_it_needs(script: str) -> None:
    """The docs build reads REQUIRES to skip a script whose library is missing."""
    source = (EXAMPLES / script).read_text(encoding="utf-8")
    declared = [
        ast.literal_eval(node.value)
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "REQUIRES"
    ]
    assert declared == [CASES[script][0]]
    assert "--quick" in source and "--out" in source


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
