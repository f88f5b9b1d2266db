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

The "float64 total" columns are the fast path's blockwise sum before its final
rounding, which no public function returns: this script reads it from the NumPy
fast path's block module (``kldiv_spec.backends._blocks``), the one internal it uses.

Usage: ``python benchmarks/accuracy_sum.py [--out STEM] [--quick]``; ``--out`` writes
``STEM.json`` and ``STEM.md``, stamped by ``benchmarks/bench_stamp.py`` (commit,
command, versions, machine). The published run is ``nox -s bench -- accuracy-sum``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

import kldiv_spec
from kldiv_spec import _settings
from kldiv_spec.backends import _blocks
from kldiv_spec.conformance import oracle

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))
import bench_stamp  # benchmarks/bench_stamp.py (this folder is no package)

#: Rows of 1000 classes: about 2.1 and 16.8 million elements (``--quick``: 21 and 168 rows).
ROWS = (2097, 16777)

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
    # The settings are read at import ($KLDIV_SPEC_NUMPY_FUSED); switched here per call.
    with _settings.override(numpy_fused=fused):
        total64 = _blocks.loss_sum(x, t, shape=x.shape, dtype=np.float32, log_target=False)
        return total64, float(kldiv_spec.kl_div(x, t, reduction="sum"))


SUMMATION = (
    "ufunc kernels, float64 total",
    "ufunc kernels, float32 result",
    "NumPy np.sum (reference)",
    "naive running sum",
)
WHOLE = (
    "fused pass, float64 total",
    "fused pass, float32 result",
    "ufunc kernels, float64 total",
    "NumPy np.sum (reference)",
)


def measure(rows: tuple[int, ...]) -> dict[str, Any]:
    """Both tables' errors, in units of u sum|terms| (u = 2**-24), for softmax-like data."""
    rng = np.random.default_rng(5)
    u = 2.0**-24
    cases = []
    for n in rows:
        p = rng.dirichlet(np.ones(1000), size=n).astype(np.float32).ravel()
        q = rng.dirichlet(np.ones(1000), size=n).astype(np.float32).ravel()
        cases.append((np.log(q), p))
    summation = []
    for x, t in cases:
        with kldiv_spec.use_reference():
            terms = kldiv_spec.kl_div(x, t, reduction="none")
            reference = float(kldiv_spec.kl_div(x, t, reduction="sum"))
        exact = math.fsum(terms.astype(np.float64))
        scale = u * math.fsum(np.abs(terms).astype(np.float64))
        values = (*_sum(x, t, fused=False), reference, float(np.cumsum(terms)[-1]))
        errors = [abs(v - exact) / scale for v in values]
        summation.append(
            {"elements": int(terms.size), "errors": dict(zip(SUMMATION, errors, strict=True))}
        )
    whole = []
    fused = _blocks._fused is not None and _blocks._fused.available()
    for x, t in cases if fused else ():
        exact, magnitude = exact_loss(x, t)
        scale = u * magnitude
        with kldiv_spec.use_reference():
            reference = float(kldiv_spec.kl_div(x, t, reduction="sum"))
        values = (*_sum(x, t, fused=True), _sum(x, t, fused=False)[0], reference)
        errors = [abs(v - exact) / scale for v in values]
        whole.append({"elements": int(x.size), "errors": dict(zip(WHOLE, errors, strict=True))})
    return {"summation": summation, "whole": whole, "fused_available": fused}


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> list[str]:
    lines = ["| elements | " + " | ".join(columns) + " |", "|--:|" + "--:|" * len(columns)]
    for r in rows:
        cells = " | ".join(f"{r['errors'][c]:.3g}" for c in columns)
        lines.append(f"| {r['elements']:,} | {cells} |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    """Both tables, as Markdown (with the stamp when the result has one)."""
    lines = ["# Accuracy of the NumPy fast path's float32 sum", ""]
    if "stamp" in result:
        lines += [bench_stamp.describe(result["stamp"]), ""]
    lines += ["Summation error (oracle: fsum of the reference's float32 terms):", ""]
    lines += _table(result["summation"], SUMMATION)
    if not result["fused_available"]:
        lines += ["", "(the fused pass is not built here, or this CPU has no AVX2)"]
    else:
        lines += ["", "Whole computation (oracle: the exact loss of the float32 inputs):", ""]
        lines += _table(result["whole"], WHOLE)
    lines += ["", "Errors in units of u sum(|terms|), u = 2**-24."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print both tables for softmax-like float32 data (and write them with ``--out``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    parser.add_argument("--quick", action="store_true", help="a hundredth of the sizes")
    args = parser.parse_args(argv)
    rows = tuple(max(1, n // 100) for n in ROWS) if args.quick else ROWS
    result = measure(rows)
    result = {
        "stamp": bench_stamp.stamp(__file__, argv, libraries=("mpmath",), quick=args.quick),
        "rows_of_1000": list(rows),
        **result,
    }
    text = markdown(result)
    print(text)
    if args.out:
        bench_stamp.write_outputs(args.out, result, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
