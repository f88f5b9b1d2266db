"""Rounding error of the NumPy fast path's float32 sum against an exact oracle.

The oracle is ``math.fsum`` of the very float32 terms being summed (the reference's
``reduction='none'``), so only the summation error is measured. Errors are printed in
units of u * sum(|terms|), u = 2**-24. Usage: ``python benchmarks/accuracy_sum.py``.
"""

from __future__ import annotations

import math

import numpy as np

import kldiv_spec
from kldiv_spec.backends import _blocks


def main() -> None:
    rng = np.random.default_rng(5)
    u = 2.0**-24
    print("| elements | fast path, float64 total | fast path, float32 result "
          "| NumPy np.sum (reference) | naive running sum |")  # fmt: skip
    print("|--:|--:|--:|--:|--:|")
    for rows in (2097, 16777):
        p = rng.dirichlet(np.ones(1000), size=rows).astype(np.float32).ravel()
        q = rng.dirichlet(np.ones(1000), size=rows).astype(np.float32).ravel()
        x, t = np.log(q), p
        with kldiv_spec.use_reference():
            terms = kldiv_spec.kl_div(x, t, reduction="none")
            reference = float(kldiv_spec.kl_div(x, t, reduction="sum"))
        exact = math.fsum(terms.astype(np.float64))
        scale = u * math.fsum(np.abs(terms).astype(np.float64))
        total64 = _blocks.loss_sum(x, t, shape=x.shape, dtype=np.float32, log_target=False)
        ours = float(kldiv_spec.kl_div(x, t, reduction="sum"))
        naive = float(np.cumsum(terms)[-1])
        errors = [abs(v - exact) / scale for v in (total64, ours, reference, naive)]
        print(f"| {terms.size:,} | " + " | ".join(f"{e:.3g}" for e in errors) + " |")


if __name__ == "__main__":
    main()
