"""Count the Python-level calls of one hot-path call: how much Python a call runs.

``python benchmarks/call_count.py`` prints, for each common call (NumPy small and
large, backward, from logits, Gaussian, PyTorch), the number of Python function calls
one call makes after warm-up (``sys.setprofile`` "call" events, main thread only), how
many of them are kldiv-spec's own and in how many of its modules. Timing is left to
``benchmarks/per_call.py``; these counts do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import kldiv_spec

_OURS = ("kldiv_spec", "backends", "conformance")


def count(call: Callable[[], Any]) -> tuple[int, int, int]:
    """Return (all calls, our calls, our modules) of one ``call()`` after two warm-up calls."""
    call()
    call()
    calls: collections.Counter[str] = collections.Counter()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            calls[frame.f_code.co_filename] += 1

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    ours = {f: n for f, n in calls.items() if any(p in Path(f).parts for p in _OURS)}
    return sum(calls.values()), sum(ours.values()), len(ours)


def cases() -> dict[str, Callable[[], Any]]:
    """Return the calls to count, by name."""
    rng = np.random.default_rng(0)

    def pair(n: int, dtype: Any = np.float32) -> tuple[Any, Any]:
        p = (rng.random(n) + 0.1).astype(dtype)
        p /= p.sum()
        return np.log(p), p

    x, t = pair(1000)
    x64, t64 = (a.reshape(10, 100) for a in pair(1000, np.float64))
    big_x, big_t = pair(1 << 16)
    s, tt = (rng.standard_normal((8, 1000)).astype(np.float32) for _ in range(2))
    s2, t2 = (rng.standard_normal((64, 1024)).astype(np.float32) for _ in range(2))
    mu, lv = rng.standard_normal((8, 16)), rng.standard_normal((8, 16))
    out = {
        "numpy 1000 sum float32": lambda: kldiv_spec.kl_div(x, t, reduction="sum"),
        "numpy 10x100 batchmean float64": lambda: kldiv_spec.kl_div(
            x64, t64, reduction="batchmean"
        ),
        "numpy 65536 sum float32": lambda: kldiv_spec.kl_div(big_x, big_t, reduction="sum"),
        "numpy 65536 none float32": lambda: kldiv_spec.kl_div(big_x, big_t, reduction="none"),
        "numpy 65536 backward": lambda: kldiv_spec.kl_div_backward(
            1.0, big_x, big_t, reduction="sum"
        ),
        "from logits numpy 8x1000": lambda: kldiv_spec.kl_div_from_logits(s, tt),
        "from logits numpy 64x1024": lambda: kldiv_spec.kl_div_from_logits(s2, t2),
        "gaussian numpy 8x16": lambda: kldiv_spec.gaussian_kl(mu, lv),
    }
    try:
        import torch
    except ImportError:
        return out
    import kldiv_spec.torch as kt

    a, b = torch.from_numpy(x), torch.from_numpy(t)
    big_a, big_b = torch.from_numpy(big_x), torch.from_numpy(big_t)
    out["torch 1000 sum"] = lambda: kldiv_spec.kl_div(a, b, reduction="sum")
    out["kldiv_spec.torch.kl_div 1000 sum"] = lambda: kt.kl_div(a, b, reduction="sum")
    out["torch 65536 sum"] = lambda: kldiv_spec.kl_div(big_a, big_b, reduction="sum")
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the table (Markdown)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    print("| call | Python calls | kldiv-spec's calls | kldiv-spec's modules |")
    print("|---|---:|---:|---:|")
    for name, call in cases().items():
        total, ours, modules = count(call)
        print(f"| {name} | {total} | {ours} | {modules} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
