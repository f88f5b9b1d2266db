"""Rounding error of the NumPy fast path's float32 sum against exact oracles.

Two tables, errors in units of u * sum(|terms|), u = 2**-24:

1. *Summation error*: the oracle is ``math.fsum`` of the very float32 terms the
   ufunc kernels sum (the reference's ``reduction='none'``), so only the
   summation is measured (ufunc kernels, ``KLDIV_SPEC_NUMPY_FUSED=0``).
2. *Whole computation*: the oracle is the exact loss of the float32 inputs
   (float64 ``log`` and products, ``math.fsum``), so each term's rounding and
   its ``log``'s error count too; here the fused pass (its own ``log``) and the
   ufunc kernels (NumPy's ``log``) are compared on equal terms.

Usage: ``python benchmarks/accuracy_sum.py``.
"""

from __future__ import annotations

import math
import os

import numpy as np

import kldiv_spec
from kldiv_spec.backends import _blocks


def _sum(x: np.ndarray, t: np.ndarray, *, fused: bool) -> tuple[float, float]:
    """The fast path's float64 total and its float32 result, with the fused pass on or off."""
    os.environ[_blocks.FUSED_ENV] = "1" if fused else "0"
    try:
        total64 = _blocks.loss_sum(x, t, shape=x.shape, dtype=np.float32, log_target=False)
        return total64, float(kldiv_spec.kl_div(x, t, reduction="sum"))
    finally:
        del os.environ[_blocks.FUSED_ENV]


def main() -> None:
    """Print both tables for softmax-like float32 data."""
    rng = np.random.default_rng(5)
    u = 2.0**-24
    cases = []
    for rows in (2097, 16777):
        p = rng.dirichlet(np.ones(1000), size=rows).astype(np.float32).ravel()
        q = rng.dirichlet(np.ones(1000), size=rows).astype(np.float32).ravel()
        cases.append((np.log(q), p))
    print("Summation error (oracle: fsum of the reference's float32 terms):\n")
    print("| elements | ufunc kernels, float64 total | ufunc kernels, float32 result "
          "| NumPy np.sum (reference) | naive running sum |")  # fmt: skip
    print("|--:|--:|--:|--:|--:|")
    for x, t in cases:
        with kldiv_spec.use_reference():
            terms = kldiv_spec.kl_div(x, t, reduction="none")
            reference = float(kldiv_spec.kl_div(x, t, reduction="sum"))
        exact = math.fsum(terms.astype(np.float64))
        scale = u * math.fsum(np.abs(terms).astype(np.float64))
        values = (*_sum(x, t, fused=False), reference, float(np.cumsum(terms)[-1]))
        errors = [abs(v - exact) / scale for v in values]
        print(f"| {terms.size:,} | " + " | ".join(f"{e:.3g}" for e in errors) + " |")
    if not (_blocks._fused is not None and _blocks._fused.available()):
        print("\n(the fused pass is not built here, or this CPU has no AVX2)")
        return
    print("\nWhole computation (oracle: the exact loss of the float32 inputs):\n")
    print("| elements | fused pass, float64 total | fused pass, float32 result "
          "| ufunc kernels, float64 total | NumPy np.sum (reference) |")  # fmt: skip
    print("|--:|--:|--:|--:|--:|")
    for x, t in cases:
        x64, t64 = x.astype(np.float64), t.astype(np.float64)
        exact = math.fsum(t64 * np.log(t64) - t64 * x64)
        scale = u * math.fsum(np.abs(t64 * np.log(t64)) + np.abs(t64 * x64))
        with kldiv_spec.use_reference():
            reference = float(kldiv_spec.kl_div(x, t, reduction="sum"))
        values = (*_sum(x, t, fused=True), _sum(x, t, fused=False)[0], reference)
        errors = [abs(v - exact) / scale for v in values]
        print(f"| {x.size:,} | " + " | ".join(f"{e:.3g}" for e in errors) + " |")


if __name__ == "__main__":
    main()
