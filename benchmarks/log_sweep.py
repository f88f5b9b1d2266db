"""Exhaustive accuracy sweep of the fused pass's float32 ``log`` (``_fused.log_f32``).

Every positive finite float32 ``t`` (bit patterns ``0x00000001`` to ``0x7f7fffff``:
``2**31 - 2**23 - 1`` values, subnormals included) goes through ``_fused.log_f32``,
and its result ``y`` is compared with ``E = log(t)`` computed in float64 by
``np.log`` (accurate to about ``2**-52`` relatively, far below a float32 ulp).

The error is in ulps of the exact value's float32 binade::

    error = |y - E| / ulp(E),    ulp(E) = 2**(floor(log2 |E|) - 23)

(for ``t != 1``, ``|E|`` lies in ``[2**-24, 104]``, float32's normal range, so this
is the spacing of float32 values around ``E``). At ``t = 1`` the exact value is 0:
the error is 0 if ``y == 0`` and infinite otherwise. A result is *correctly rounded*
when ``y`` is ``E`` rounded to the nearest float32, and *faithfully rounded* when
``y`` is one of the two float32 values around ``E`` (``E`` itself when it is a
float32). The float64 ``E`` is within about ``2**-28`` float32 ulp of the exact
logarithm, so the maximum error is known to that precision, and a result that close
to a tie or to a float32 value (a handful in ``2**31``, if any) could be counted
on the wrong side.

Usage::

    python benchmarks/log_sweep.py                  # the exhaustive sweep (minutes)
    python benchmarks/log_sweep.py --quick          # every 1009th value (seconds)
    python benchmarks/log_sweep.py --stride 61 --no-numpy --workers 2

It prints, for the fused ``log`` and for NumPy's float32 ``np.log`` over the same
values (``--no-numpy`` skips it), the largest error in ulps, the argument where it
occurs (decimal and hex bits), and the counts of results that are not correctly
rounded and not faithfully rounded. Values are processed in chunks of ``--chunk``
(default ``2**13``: the temporaries stay in the allocator's heap, where larger ones
cost a page-faulting ``mmap`` each) by ``--workers`` threads (both the extension and
NumPy's ufuncs release the GIL); the whole sweep holds about 35 MiB and takes about
175 s of CPU time (both logs).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kldiv_spec.backends import _blocks

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))
import bench_stamp  # benchmarks/bench_stamp.py (this folder is no package)

__all__ = ["FIRST", "LAST", "Stats", "errors", "fused_log", "numpy_log", "sweep"]

#: The smallest and largest positive finite float32, as bit patterns.
FIRST, LAST = 0x00000001, 0x7F7FFFFF

#: The stride of ``--quick``: a prime, so every exponent and many mantissas are visited.
QUICK_STRIDE = 1009


@dataclass
class Stats:
    """What one implementation's sweep found.

    Attributes
    ----------
    count : int
        Values examined.
    max_ulp : float
        The largest error, in ulps of the exact value's float32 binade.
    argmax : int
        The bit pattern of the argument where ``max_ulp`` occurs (the first one).
    not_correctly_rounded : int
        Results other than the exact value rounded to the nearest float32.
    not_faithful : int
        Results that are neither float32 neighbour of the exact value.
    """

    count: int = 0
    max_ulp: float = 0.0
    argmax: int = FIRST
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
        t = np.array([self.argmax], np.uint32).view(np.float32)[0]
        return (
            f"{name}: max {self.max_ulp:.4f} ulp at t = {float(t):.9g} ({self.argmax:#010x}); "
            f"not correctly rounded {self.not_correctly_rounded:,} / {self.count:,} "
            f"({100 * self.not_correctly_rounded / max(self.count, 1):.2f}%), "
            f"not faithful {self.not_faithful:,}"
        )


def fused_log(t: np.ndarray) -> np.ndarray:
    """``_fused.log_f32`` of float32 ``t`` (the fused pass's own vectorised ``log``)."""
    if not _blocks.fused_available():
        msg = "the fused extension is not built here, or this CPU has no AVX2 and FMA"
        raise RuntimeError(msg)
    out = np.empty_like(t)
    _blocks._fused.log_f32(t, out)
    return out


def numpy_log(t: np.ndarray) -> np.ndarray:
    """NumPy's float32 ``np.log`` of ``t``."""
    return np.log(t)


def errors(t: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Errors of ``y`` as float32 logs of positive float32 ``t``, against float64 ``np.log``.

    Returns
    -------
    ulps : ndarray of float64
        ``|y - E| / 2**(floor(log2|E|) - 23)`` with ``E = log(float64(t))``; 0 where
        ``E = 0`` and ``y = 0``, ``inf`` where ``E = 0`` and ``y != 0``.
    correctly_rounded, faithful : ndarray of bool
        Whether ``y`` is ``E`` rounded to nearest, and whether it is either float32
        neighbour of ``E``.
    """
    exact = np.log(t.astype(np.float64))
    y64 = y.astype(np.float64)
    _, e = np.frexp(exact)  # |E| = m 2**e with m in [1/2, 1): floor(log2 |E|) = e - 1
    ulp = np.ldexp(1.0, e - 24)
    with np.errstate(divide="ignore", invalid="ignore"):
        ulps = np.abs(y64 - exact) / ulp
    zero = exact == 0
    ulps[zero] = np.where(y64[zero] == 0, 0.0, np.inf)
    nearest = exact.astype(np.float32)
    correctly_rounded = y == nearest
    # the other neighbour: on the far side of E from the nearest float32
    above = nearest.astype(np.float64) > exact
    other = np.nextafter(nearest, np.where(above, -np.inf, np.inf).astype(np.float32))
    representable = nearest.astype(np.float64) == exact
    faithful = correctly_rounded | ((y == other) & ~representable)
    return ulps, correctly_rounded, faithful


def _chunk_stats(
    t: np.ndarray, bits: np.ndarray, log: Callable[[np.ndarray], np.ndarray]
) -> Stats:
    ulps, correctly_rounded, faithful = errors(t, log(t))
    worst = int(np.argmax(ulps))
    return Stats(
        count=t.size,
        max_ulp=float(ulps[worst]),
        argmax=int(bits[worst]),
        not_correctly_rounded=int(t.size - np.count_nonzero(correctly_rounded)),
        not_faithful=int(t.size - np.count_nonzero(faithful)),
    )


def _chunks(first: int, last: int, stride: int, chunk: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` bit-pattern ranges of at most ``chunk`` visited values each."""
    step = chunk * stride
    for start in range(first, last + 1, step):
        yield start, min(start + step, last + 1)


def sweep(
    *,
    first: int = FIRST,
    last: int = LAST,
    stride: int = 1,
    chunk: int = 1 << 13,
    workers: int | None = None,
    implementations: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None,
) -> dict[str, Stats]:
    """Sweep the float32 values with bit patterns ``first, first + stride, ..., <= last``.

    ``implementations`` maps names to float32 ``log`` functions (default: the fused
    ``log`` only). Chunks of ``chunk`` values are processed by ``workers`` threads
    (default: the usable cores, at most 8); the result does not depend on either.
    """
    if implementations is None:
        implementations = {"fused log_f32": fused_log}
    if workers is None:
        workers = max(1, min(len(os.sched_getaffinity(0)), 8))

    def one(bounds: tuple[int, int]) -> dict[str, Stats]:
        bits = np.arange(bounds[0], bounds[1], stride, dtype=np.uint32)
        t = bits.view(np.float32)
        return {name: _chunk_stats(t, bits, log) for name, log in implementations.items()}

    totals = {name: Stats() for name in implementations}
    chunks = _chunks(first, last, stride, chunk)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # a few chunks per worker in flight at a time (map submits all it is given), and
        # in order, so that ties for the maximum keep the smallest argument
        while batch := list(itertools.islice(chunks, 16 * workers)):
            for result in pool.map(one, batch):
                for name, stats in result.items():
                    totals[name].merge(stats)
    return totals


def write_sweep(
    out: str,
    title: str,
    *,
    stamp: dict[str, Any],
    heading: str,
    stride: int,
    elapsed: float,
    totals: dict[str, Any],
) -> None:
    """Write a sweep's ``OUT.json`` and ``OUT.md`` (this one's and ``exp_sweep.py``'s).

    ``totals`` maps each implementation's name to its stats (a dataclass with
    ``argmax``, the float32 bits of the worst argument, and ``describe(name)``).
    """
    result = {
        "stamp": stamp,
        "stride": stride,
        "elapsed_s": elapsed,
        "results": {
            name: dataclasses.asdict(stats)
            | {"argument": float(np.array([stats.argmax], np.uint32).view(np.float32)[0])}
            for name, stats in totals.items()
        },
    }
    lines = [f"# {title}", "", bench_stamp.describe(stamp), "", heading + ":", ""]
    lines += [f"- {stats.describe(name)}" for name, stats in totals.items()]
    bench_stamp.write_outputs(out, result, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run the sweep from the command line and print one line per implementation."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"stride {QUICK_STRIDE}")
    parser.add_argument("--stride", type=int, default=None, help="visit every Nth value")
    parser.add_argument("--chunk", type=int, default=1 << 13, help="values per chunk")
    parser.add_argument("--workers", type=int, default=None, help="threads (default: cores)")
    parser.add_argument("--no-numpy", action="store_true", help="skip NumPy's float32 log")
    parser.add_argument("--out", help="also write OUT.json and OUT.md (stamped)")
    args = parser.parse_args(argv)
    stride = args.stride or (QUICK_STRIDE if args.quick else 1)
    implementations = {"fused log_f32": fused_log}
    if not args.no_numpy:
        implementations["numpy float32 np.log"] = numpy_log
    start = time.perf_counter()
    totals = sweep(
        stride=stride, chunk=args.chunk, workers=args.workers, implementations=implementations
    )
    elapsed = time.perf_counter() - start
    heading = (
        f"{'every' if stride == 1 else f'stride {stride} over the'} positive finite float32 "
        f"({FIRST:#010x} to {LAST:#010x}), against float64 np.log; {elapsed:.0f} s"
    )
    print(heading)
    for name, stats in totals.items():
        print(stats.describe(name))
    if args.out:
        stamp = bench_stamp.stamp(
            __file__, sys.argv[1:] if argv is None else argv, quick=stride != 1
        )
        write_sweep(
            args.out,
            "Accuracy of the fused pass's float32 log",
            stamp=stamp,
            heading=heading,
            stride=stride,
            elapsed=elapsed,
            totals=totals,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
