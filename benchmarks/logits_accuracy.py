"""Accuracy of kl_div_from_logits against the exact oracle, in units of eps * sum(W).

Prints, for the NumPy fast path, the reference and PyTorch's composition
(forward direction only), the largest ``|L_hat - L| / (eps * sum_i W_i)`` over
40 random configurations (4 rows of 16, 200 or 1000 classes, logits of spread
1, 5 or 30, T in {0.5, 1, 2, 4}, both directions), in float32 and float64; see
``docs/logits.md`` (Accuracy) and ``kldiv_spec.conformance.oracle_logits``.

    python benchmarks/logits_accuracy.py
"""

from __future__ import annotations

import os

import numpy as np

os.environ["KLDIV_SPEC_NUMPY_MIN_ELEMENTS"] = "0"  # the fast path takes these small calls

import kldiv_spec
from kldiv_spec.conformance import oracle_logits as oracle


def main() -> None:
    rng = np.random.default_rng(0)
    worst: dict[tuple[str, str], float] = {}

    def note(name: str, dtype: type, error: float) -> None:
        key = (name, dtype.__name__)
        worst[key] = max(worst.get(key, 0.0), error)

    for _ in range(40):
        rows, vocab = 4, int(rng.choice([16, 200, 1000]))
        spread = float(rng.choice([1.0, 5.0, 30.0]))
        temperature = float(rng.choice([0.5, 1.0, 2.0, 4.0]))
        direction = str(rng.choice(["forward", "reverse"]))
        for dtype in (np.float32, np.float64):
            s = rng.normal(0, spread, (rows, vocab)).astype(dtype)
            t = (s + rng.normal(0, spread, (rows, vocab))).astype(dtype)
            options = {"temperature": temperature, "reduction": "sum", "direction": direction}
            exact = oracle.from_logits(s, t, **options)
            value, _ = oracle.reduce_logits(exact)
            unit = float(np.finfo(dtype).eps) / 2 * float(exact.scale.sum())
            for name, forced in (("fast path", False), ("reference", True)):
                with kldiv_spec.use_reference(forced):
                    got = float(kldiv_spec.kl_div_from_logits(s, t, **options))
                note(name, dtype, abs(got - value) / unit)
            if direction == "forward":
                try:
                    import torch
                    import torch.nn.functional as F
                except ImportError:
                    continue
                st, tt = torch.from_numpy(s), torch.from_numpy(t)
                composed = F.kl_div(
                    F.log_softmax(st / temperature, -1),
                    F.softmax(tt / temperature, -1),
                    reduction="sum",
                ) * (temperature * temperature)
                note("torch composition", dtype, abs(float(composed) - value) / unit)
    print("| | float32 | float64 |\n|---|---|---|")
    for name in ("fast path", "reference", "torch composition"):
        cells = [f"{worst.get((name, d), float('nan')):.3f}" for d in ("float32", "float64")]
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
