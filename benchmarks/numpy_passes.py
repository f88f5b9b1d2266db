"""Where the NumPy fast path's time goes: each ufunc pass of one block, on one core.

The blocked ufunc kernel of the NumPy fast path evaluates the loss of a
block with seven NumPy calls. This script times each call alone over 64 Mi
float32 elements (streamed block by block, as the kernel does), then the whole
per-block kernel, then the full ``kl_div(reduction="sum")`` with 1 and 2
worker threads, in nanoseconds per element. The log usually dominates; where it
does not (AVX-512 NumPy), the other passes and the threads' scaling decide.

A diagnostic, not a published figure (it writes no result file)::

    python benchmarks/numpy_passes.py [--block 65536] [--elements 67108864]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def _per_element(fn: Callable[[Any, Any], Any], x: Any, t: Any, block: int) -> float:
    n = x.size
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for i in range(0, n, block):
            fn(x[i : i + block], t[i : i + block])
        best = min(best, time.perf_counter() - start)
    return best / n * 1e9


def main() -> None:
    """Print ns/element for each pass, the block kernel and the threaded fast path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=1 << 16)
    parser.add_argument("--elements", type=int, default=1 << 26)
    args = parser.parse_args()
    block, n = args.block, args.elements
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(n, dtype=np.float32).reshape(-1, 1024)
    x = (logits - np.log(np.exp(logits).sum(1, keepdims=True))).reshape(-1)
    t = np.exp(rng.standard_normal(n, dtype=np.float32).reshape(-1, 1024))
    t = (t / t.sum(1, keepdims=True)).reshape(-1)
    a, b = np.empty(block, np.float32), np.empty(block, np.float32)
    mask = np.empty(block, np.bool_)
    passes: dict[str, Callable[[Any, Any], Any]] = {
        "log(t)": lambda x, t: np.log(t, out=a[: t.size]),
        "t * log(t)": lambda x, t: np.multiply(t, a[: t.size], out=a[: t.size]),
        "t == 0": lambda x, t: np.equal(t, 0, out=mask[: t.size]),
        "copyto(0, where)": lambda x, t: np.copyto(a[: t.size], 0, where=mask[: t.size]),
        "t * x": lambda x, t: np.multiply(t, x, out=b[: t.size]),
        "subtract": lambda x, t: np.subtract(a[: t.size], b[: t.size], out=a[: t.size]),
        "sum": lambda x, t: np.add.reduce(a[: t.size]),
    }
    with np.errstate(all="ignore"):
        total = 0.0
        for name, fn in passes.items():
            ns = _per_element(fn, x, t, block)
            total += ns
            print(f"{name:18s} {ns:6.3f} ns/element")
        print(f"{'sum of passes':18s} {total:6.3f}")

        def whole(xb: Any, tb: Any) -> Any:
            for fn in passes.values():
                out = fn(xb, tb)
            return out

        print(f"{'block kernel':18s} {_per_element(whole, x, t, block):6.3f}")
    import kldiv_spec
    from kldiv_spec import _settings

    x2, t2 = x.reshape(-1, 1024), t.reshape(-1, 1024)
    for threads in (1, 2):
        # $KLDIV_SPEC_NUM_THREADS is read at import; switched here per run.
        with _settings.override(num_threads=threads):
            kldiv_spec.kl_div(x2, t2, reduction="sum")
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                kldiv_spec.kl_div(x2, t2, reduction="sum")
                best = min(best, time.perf_counter() - start)
        print(
            f"kl_div sum, {threads} thread{'s' if threads > 1 else ''}: "
            f"{best / n * 1e9:6.3f} ns/element, {2 * x.nbytes / best / 1e9:.2f} GB/s"
        )


if __name__ == "__main__":
    main()
