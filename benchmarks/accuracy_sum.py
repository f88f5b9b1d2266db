"""Rounding error of the NumPy fast path's float32 sum against exact oracles.

Two tables, errors in units of u * sum(|terms|), u = 2**-24:

1. *Summation error*: the oracle is ``math.fsum`` of the very float32 terms the
   ufunc kernels sum (the reference's ``reduction='none'``), so only the
   summation is measured (ufunc kernels, ``KLDIV_SPEC_NUMPY_FUSED=0``).
2. *Whole computation*: the oracle is the exact loss of the float32 inputs
   (:mod:`kldiv_spec.conformance.oracle`: each element in extended precision,
   summed exactly by :func:`~kldiv_spec.conformance.oracle.exact_sum`), so
   each term's rounding and its ``log``'s error count too; here the fused pass
   (its own ``log``) and the ufunc kernels (NumPy's ``log``) are compared on
   equal terms.

Usage: ``python benchmarks/accuracy_sum.py``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

import kldiv_spec
from kldiv_spec.backends import _blocks
from kldiv_spec.conformance import oracle

#: Elements given to the oracle at a time (its extended-precision arrays are 16 bytes each).
CHUNK = 1 << 20


def exact_loss(x: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """Return the exact ``'sum'`` of float32 ``x``, ``t`` and ``sum(|t log t| + |t x|)``.

    The oracle's exact pointwise values, chunk by chunk, summed exactly.
    """
    scale: list[float] = []
    parts: list[Any] = []
    for start in range(0, x.size, CHUNK):
        exact = oracle.pointwise(
            x[start : start + CHUNK], t[start : start + CHUNK], log_target=False
        )
        parts.append(oracle.exact_sum(exact))
        scale.append(math.fsum(exact.scale))
    total = float(sum(parts[1:], parts[0]))
    return total, math.fsum(scale)


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
        exact, magnitude = exact_loss(x, t)
        scale = u * magnitude
        with kldiv_spec.use_reference():
            reference = float(kldiv_spec.kl_div(x, t, reduction="sum"))
        values = (*_sum(x, t, fused=True), _sum(x, t, fused=False)[0], reference)
        errors = [abs(v - exact) / scale for v in values]
        print(f"| {x.size:,} | " + " | ".join(f"{e:.3g}" for e in errors) + " |")


if __name__ == "__main__":
    main()
