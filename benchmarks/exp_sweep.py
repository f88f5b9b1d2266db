"""Exhaustive accuracy sweep of the from-logits kernel's float32 ``exp`` (``exp_f32``).

Every float32 ``x`` in ``[-104, 89]`` (bit patterns ``0x00000000`` to ``0x42b20000`` and
``0x80000000`` to ``0xc2d00000``: about ``2**31`` values, the whole range where ``exp``
is neither 0 nor ``inf`` in float32, with its borders) goes through
``_fused_logits.exp_f32``, and its result ``y`` is compared with ``E = exp(x)`` computed
in float64 by ``np.exp`` (accurate to about ``2**-52`` relatively).

The error is in ulps of the exact value::

    error = |y - E| / ulp(E),    ulp(E) = max(2**(floor(log2 E) - 23), 2**-149)

(the spacing of float32 values around ``E``, subnormal ones included), over the ``x``
whose ``E`` lies in ``[2**-149, FLT_MAX]``. A result is *correctly rounded* when it is
``E`` rounded to the nearest float32 (0 or ``inf`` included), and *faithfully rounded*
when it is one of the two float32 values around ``E`` (``0`` and ``2**-149`` below the
smallest subnormal, ``FLT_MAX`` and ``inf`` above the largest float); both counts cover
every ``x`` of the sweep. Outside ``[-104, 89]`` the kernel returns 0 and ``inf``
(``tests/test_backend_numpy_logits_fused.py`` checks it on a sample).

Usage::

    python benchmarks/exp_sweep.py                  # the exhaustive sweep (minutes)
    python benchmarks/exp_sweep.py --quick          # every 1009th value (seconds)
    python benchmarks/exp_sweep.py --stride 61 --no-numpy --workers 2

It prints, for the kernel's ``exp`` and for NumPy's float32 ``np.exp`` over the same
values (``--no-numpy`` skips it), the largest error in ulps, the argument where it
occurs, and the counts of results that are not correctly rounded and not faithfully
rounded.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kldiv_spec.backends import _blocks_logits

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))
import bench_stamp  # benchmarks/bench_stamp.py (this folder is no package)
import log_sweep  # benchmarks/log_sweep.py: its result writer

__all__ = ["RANGES", "Stats", "errors", "kernel_exp", "numpy_exp", "sweep"]

#: The bit-pattern ranges swept (inclusive): x in [0, 89] and x in [-104, -0].
RANGES = ((0x00000000, 0x42B20000), (0x80000000, 0xC2D00000))

#: The stride of ``--quick``: a prime, so every exponent and many mantissas are visited.
QUICK_STRIDE = 1009

_TINY = 2.0**-149
_MAX = float(np.finfo(np.float32).max)


@dataclass
class Stats:
    """What one implementation's sweep found (see :class:`log_sweep.Stats`)."""

    count: int = 0
    max_ulp: float = 0.0
    argmax: int = 0
    not_correctly_rounded: int = 0
    not_faithful: int = 0

    def merge(self, other: Stats) -> None:
        """Add ``other`` (a later chunk) into these statistics."""
        self.count += other.count
        if other.max_ulp > self.max_ulp:
            self.max_ulp, self.argmax = other.max_ulp, other.argmax
        self.not_correctly_rounded += other.not_correctly_rounded
        self.not_faithful += other.not_faithful

    def describe(self, name: str) -> str:
        """One line: the maximum error, where it occurs, and the two counts."""
        x = np.array([self.argmax], np.uint32).view(np.float32)[0]
        return (
            f"{name}: max {self.max_ulp:.4f} ulp at x = {float(x):.9g} ({self.argmax:#010x}); "
            f"not correctly rounded {self.not_correctly_rounded:,} / {self.count:,} "
            f"({100 * self.not_correctly_rounded / max(self.count, 1):.3f}%), "
            f"not faithful {self.not_faithful:,}"
        )


def kernel_exp(x: np.ndarray) -> np.ndarray:
    """``_fused_logits.exp_f32`` of float32 ``x`` (the from-logits kernel's ``exp``)."""
    if not _blocks_logits.fused_available():
        msg = "the from-logits kernel is not built here, or this CPU has no AVX2 and FMA"
        raise RuntimeError(msg)
    out = np.empty_like(x)
    _blocks_logits._fused_logits.exp_f32(x, out)
    return out


def numpy_exp(x: np.ndarray) -> np.ndarray:
    """NumPy's float32 ``np.exp`` of ``x``."""
    with np.errstate(over="ignore", under="ignore"):
        return np.exp(x)


def errors(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Errors of ``y`` as float32 exponentials of float32 ``x``, against float64 ``np.exp``.

    Returns
    -------
    ulps : ndarray of float64
        ``|y - E| / ulp(E)`` where ``2**-149 <= E <= FLT_MAX``, 0 elsewhere.
    correctly_rounded, faithful : ndarray of bool
        Whether ``y`` is ``E`` rounded to nearest, and whether it is either float32
        neighbour of ``E``.
    """
    with np.errstate(over="ignore", under="ignore"):
        exact = np.exp(x.astype(np.float64))
        nearest = exact.astype(np.float32)
    y64 = y.astype(np.float64)
    measured = (exact >= _TINY) & (exact <= _MAX)
    _, e = np.frexp(exact)  # E = m 2**e with m in [1/2, 1): floor(log2 E) = e - 1
    ulp = np.maximum(np.ldexp(1.0, e - 24), _TINY)
    with np.errstate(invalid="ignore"):
        ulps = np.where(measured, np.abs(y64 - exact) / ulp, 0.0)
    correctly_rounded = y == nearest
    above = nearest.astype(np.float64) > exact
    other = np.nextafter(nearest, np.where(above, -np.inf, np.inf).astype(np.float32))
    representable = nearest.astype(np.float64) == exact
    faithful = correctly_rounded | ((y == other) & ~representable)
    return ulps, correctly_rounded, faithful


def _chunk_stats(
    x: np.ndarray, bits: np.ndarray, exp: Callable[[np.ndarray], np.ndarray]
) -> Stats:
    ulps, correctly_rounded, faithful = errors(x, exp(x))
    worst = int(np.argmax(ulps))
    return Stats(
        count=x.size,
        max_ulp=float(ulps[worst]),
        argmax=int(bits[worst]),
        not_correctly_rounded=int(x.size - np.count_nonzero(correctly_rounded)),
        not_faithful=int(x.size - np.count_nonzero(faithful)),
    )


def _chunks(
    ranges: tuple[tuple[int, int], ...], stride: int, chunk: int
) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` bit-pattern ranges of at most ``chunk`` visited values each."""
    step = chunk * stride
    for first, last in ranges:
        for start in range(first, last + 1, step):
            yield start, min(start + step, last + 1)


def sweep(
    *,
    ranges: tuple[tuple[int, int], ...] = RANGES,
    stride: int = 1,
    chunk: int = 1 << 14,
    workers: int | None = None,
    implementations: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None,
) -> dict[str, Stats]:
    """Sweep the float32 values with bit patterns ``first, first + stride, ..., <= last``.

    ``implementations`` maps names to float32 ``exp`` functions (default: the kernel's
    only); the result does not depend on ``chunk`` or ``workers``.
    """
    if implementations is None:
        implementations = {"kernel exp_f32": kernel_exp}
    if workers is None:
        workers = max(1, min(len(os.sched_getaffinity(0)), 8))

    def one(bounds: tuple[int, int]) -> dict[str, Stats]:
        bits = np.arange(bounds[0], bounds[1], stride, dtype=np.uint32)
        x = bits.view(np.float32)
        return {name: _chunk_stats(x, bits, exp) for name, exp in implementations.items()}

    totals = {name: Stats() for name in implementations}
    chunks = _chunks(ranges, stride, chunk)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while batch := list(itertools.islice(chunks, 16 * workers)):
            for result in pool.map(one, batch):
                for name, stats in result.items():
                    totals[name].merge(stats)
    return totals


def main(argv: list[str] | None = None) -> int:
    """Run the sweep from the command line and print one line per implementation."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"stride {QUICK_STRIDE}")
    parser.add_argument("--stride", type=int, default=None, help="visit every Nth value")
    parser.add_argument("--chunk", type=int, default=1 << 14, help="values per chunk")
    parser.add_argument("--workers", type=int, default=None, help="threads (default: cores)")
    parser.add_argument("--no-numpy", action="store_true", help="skip NumPy's float32 exp")
    parser.add_argument("--out", help="also write OUT.json and OUT.md (stamped)")
    args = parser.parse_args(argv)
    stride = args.stride or (QUICK_STRIDE if args.quick else 1)
    implementations = {"kernel exp_f32": kernel_exp}
    if not args.no_numpy:
        implementations["numpy float32 np.exp"] = numpy_exp
    start = time.perf_counter()
    totals = sweep(
        stride=stride, chunk=args.chunk, workers=args.workers, implementations=implementations
    )
    elapsed = time.perf_counter() - start
    heading = (
        f"{'every' if stride == 1 else f'stride {stride} over the'} float32 x in [-104, 89], "
        f"against float64 np.exp; {elapsed:.0f} s"
    )
    print(heading)
    for name, stats in totals.items():
        print(stats.describe(name))
    if args.out:
        stamp = bench_stamp.stamp(
            __file__, sys.argv[1:] if argv is None else argv, quick=stride != 1
        )
        log_sweep.write_sweep(
            args.out,
            "Accuracy of the from-logits kernel's float32 exp",
            stamp=stamp,
            heading=heading,
            stride=stride,
            elapsed=elapsed,
            totals=totals,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
