"""The CPU benchmark: throughput, speed-ups, extra peak memory and the roofline.

Every implementation is timed in the same process on the same data:

* ``kldiv_spec numpy`` -- :func:`kldiv_spec.kl_div` on NumPy arrays (the blocked fast path);
* ``kldiv_spec torch`` -- :func:`kldiv_spec.torch.kl_div` on CPU tensors;
* ``torch eager`` -- ``torch.nn.functional.kl_div``;
* ``torch.compile`` -- the same function compiled (compile time reported separately);
* ``plain numpy`` -- the textbook NumPy expression
  ``np.sum(np.where(t == 0, 0, t * np.log(t)) - t * x)``;
* ``jax.jit`` -- a jitted ``jnp`` expression (``jax.value_and_grad`` for the backward).

Peers that are not installed are skipped. Throughput is bytes of *input*
read (both operands, once) per second; times are the median (and minimum) of
``--repeats`` calls after one warm-up call (which includes any compilation).
Extra peak memory is measured for the largest (float32) cases, in the first timed
call, as the rise of the resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) over what is already resident (the inputs). The
roofline is the machine's measured read bandwidth (a threaded ``np.add.reduce``
over 512 MB) and the measured cost of ``np.log`` (float32, cache-resident, on
every core).

Results go to ``<out>/<name>.json`` and ``.csv``, a Markdown table to stdout
and ``<out>/<name>.md``, and a plot to ``<out>/<name>.png`` or ``--plot`` (PNG, needs
matplotlib; ``--no-plot``: none); nothing is written anywhere else. Each carries the
stamp of ``benchmarks/bench_stamp.py`` (commit, command, versions, machine).
``kldiv_spec`` must be importable (installed, or an editable install of this tree)::

    python benchmarks/cpu_bench.py --out DIR [--quick] [--shapes 512x1000] [--repeats 1]

The published runs are ``nox -s bench -- cpu-headline`` and ``nox -s bench -- cpu-sweep``
(``benchmarks/run.py``). This is a script of the source tree, not part of the installed
package; it uses ``kldiv_spec``'s public functions only.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # imported by path (docs, tests)
    sys.path.append(str(Path(__file__).resolve().parent))
import bench_stamp  # benchmarks/bench_stamp.py (this folder is no package)

__all__ = ["main"]

HEADLINE = (4096, 32000)
FULL_SHAPES: tuple[tuple[int, ...], ...] = ((1000,), (100, 1000), (1000, 10000), HEADLINE)
# The largest quick shape is above glibc's largest mmap threshold (32 MiB per operand), so
# its temporaries are returned to the system when freed and the peak-memory figures hold.
QUICK_SHAPES: tuple[tuple[int, ...], ...] = ((1000,), (100, 1000), (512, 32000))
REDUCTIONS = ("sum", "batchmean", "mean", "none")
OURS_NUMPY = "kldiv_spec numpy"
OURS_TORCH = "kldiv_spec torch"
EAGER = "torch eager"
COMPILE = "torch.compile"
PLAIN = "plain numpy"
JAX = "jax.jit"
IMPLEMENTATIONS = (OURS_NUMPY, OURS_TORCH, EAGER, COMPILE, PLAIN, JAX)


@dataclass
class Record:
    """One timed case."""

    implementation: str
    shape: tuple[int, ...]
    dtype: str
    reduction: str
    mode: str  # "forward" or "forward+backward"
    median_s: float
    min_s: float
    repeats: int
    gbps: float = math.nan
    speedup_vs_eager: float = math.nan
    speedup_vs_plain_numpy: float = math.nan
    extra_peak_mb: float = math.nan
    compile_s: float = math.nan
    elements: int = 0
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- data


def make_data(shape: tuple[int, ...], dtype: str, seed: int = 0) -> tuple[Any, Any]:
    """Return (log-probabilities, probabilities) of ``shape``: rows of a softmax, 1% zeros."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    x = rng.standard_normal(shape, dtype=np.float32).astype(dt, copy=False)
    t = rng.random(shape, dtype=np.float32).astype(dt, copy=False)
    # normalise rows in place so t is a distribution and x a log-distribution
    axis = -1
    x -= np.log(np.sum(np.exp(x), axis=axis, keepdims=True, dtype=np.float64)).astype(dt)
    t[t < 0.01] = 0
    t /= np.sum(t, axis=axis, keepdims=True, dtype=np.float64).astype(dt)
    return x, t


# ---------------------------------------------------------------------------- callables


def _plain_numpy(x: Any, t: Any, reduction: str, backward: bool) -> Callable[[], Any]:
    n = x.size
    batch = x.shape[0] if x.ndim else 1
    div = {"sum": 1, "none": 1, "mean": n, "batchmean": batch}[reduction]

    def forward() -> Any:
        with np.errstate(all="ignore"):
            loss = np.where(t == 0, 0, t * np.log(t)) - t * x
            return loss if reduction == "none" else np.sum(loss) / div

    def both() -> Any:
        with np.errstate(all="ignore"):
            out = forward()
            g = 1.0 / div
            pf = (t > 0) & (t < np.inf)
            grad_x = -(t * g)
            grad_t = np.where(pf, g * (np.log(np.where(pf, t, 1)) + 1 - x), np.nan)
            return out, grad_x, grad_t

    return both if backward else forward


def _ours_numpy(x: Any, t: Any, reduction: str, backward: bool) -> Callable[[], Any]:
    import kldiv_spec

    def forward() -> Any:
        return kldiv_spec.kl_div(x, t, reduction=reduction)

    def both() -> Any:
        out = forward()
        g = np.ones(out.shape, out.dtype) if reduction == "none" else 1.0
        return out, kldiv_spec.kl_div_backward(g, x, t, reduction=reduction)

    return both if backward else forward


def _torch_callable(
    fn: Callable[..., Any], x: Any, t: Any, reduction: str, backward: bool
) -> Callable[[], Any]:
    import torch

    xt = torch.from_numpy(x)
    tt = torch.from_numpy(t)
    if not backward:

        def forward() -> Any:
            with torch.no_grad():
                return fn(xt, tt, reduction=reduction)

        return forward
    xg = xt.detach().requires_grad_(True)
    tg = tt.detach().requires_grad_(True)

    def both() -> Any:
        xg.grad = None
        tg.grad = None
        out = fn(xg, tg, reduction=reduction)
        (out.sum() if reduction == "none" else out).backward()
        return out

    return both


def _eager(x: Any, t: Any, reduction: str, backward: bool) -> Callable[[], Any]:
    import torch.nn.functional as F

    return _torch_callable(F.kl_div, x, t, reduction, backward)


def _ours_torch(x: Any, t: Any, reduction: str, backward: bool) -> Callable[[], Any]:
    import kldiv_spec.torch

    return _torch_callable(kldiv_spec.torch.kl_div, x, t, reduction, backward)


_COMPILED: dict[str, Any] = {}


def _compiled(x: Any, t: Any, reduction: str, backward: bool) -> Callable[[], Any]:
    import torch
    import torch.nn.functional as F

    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(F.kl_div)
    return _torch_callable(_COMPILED["fn"], x, t, reduction, backward)


def _jax(x: Any, t: Any, reduction: str, backward: bool) -> Callable[[], Any]:
    import jax
    import jax.numpy as jnp

    n = x.size
    batch = x.shape[0] if x.ndim else 1
    div = {"sum": 1, "none": 1, "mean": n, "batchmean": batch}[reduction]

    def loss(xj: Any, tj: Any) -> Any:
        pointwise = jnp.where(tj == 0, 0, tj * jnp.log(tj)) - tj * xj
        return pointwise if reduction == "none" else jnp.sum(pointwise) / div

    xj, tj = jnp.asarray(x), jnp.asarray(t)
    if backward:
        f = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(loss(a, b)), argnums=(0, 1)))
    else:
        f = jax.jit(loss)

    def run() -> Any:
        return jax.block_until_ready(f(xj, tj))

    return run


FACTORIES: dict[str, Callable[[Any, Any, str, bool], Callable[[], Any]]] = {
    OURS_NUMPY: _ours_numpy,
    OURS_TORCH: _ours_torch,
    EAGER: _eager,
    COMPILE: _compiled,
    PLAIN: _plain_numpy,
    JAX: _jax,
}
_NEEDS = {OURS_TORCH: "torch", EAGER: "torch", COMPILE: "torch", JAX: "jax"}


def available(names: Sequence[str]) -> list[str]:
    """Return the implementations among ``names`` whose library is installed."""
    import importlib.util

    return [n for n in names if n not in _NEEDS or importlib.util.find_spec(_NEEDS[n])]


# ---------------------------------------------------------------------------- measuring


def time_calls(
    fn: Callable[[], Any], repeats: int, *, peak: bool = False
) -> tuple[float, float, float, float]:
    """Return (first call, median, min, extra peak MB) over ``repeats`` calls after the first.

    With ``peak``, the first timed call is also watched by :func:`extra_peak_mb` (its
    bookkeeping is outside the timed region); the peak is NaN otherwise.
    """
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times: list[float] = []
    extra = math.nan

    def timed() -> Any:
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        return result

    for i in range(repeats):
        if peak and i == 0:
            extra = extra_peak_mb(timed)
        else:
            timed()
    return first, statistics.median(times), min(times), extra


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def extra_peak_mb(fn: Callable[[], Any], /) -> float:
    """Return the rise of the resident set's high-water mark during one call of ``fn``, in MiB.

    ``VmHWM`` is reset to the current resident set through ``/proc/self/clear_refs``
    first (Linux); NaN where that is not possible. Large arrays are allocated with
    ``mmap`` and returned to the system when freed, so earlier cases do not hide
    the call's own allocations.
    """
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return math.nan
    before = _status_kb("VmRSS")
    result = fn()
    peak = _status_kb("VmHWM")
    del result
    return (peak - before) / 1024


def kldiv_threads() -> int:
    """The worker threads of the NumPy fast path: ``$KLDIV_SPEC_NUM_THREADS``, else the
    usable cores, at most 8 (as documented in docs/benchmarks.md)."""
    value = os.environ.get("KLDIV_SPEC_NUM_THREADS", "").strip()
    if value:
        return max(1, int(value))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, 8))


def roofline(quick: bool) -> dict[str, float]:
    """Measure read bandwidth (GB/s, all cores) and the float32 ``np.log`` ceiling."""
    from concurrent.futures import ThreadPoolExecutor

    threads = kldiv_threads()
    n = (1 << 25) if quick else (1 << 27)  # 128 MB or 512 MB of float32
    a = np.ones(n, np.float32)
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:

        def read() -> None:
            list(pool.map(np.add.reduce, parts))

        best = time_calls(read, 5)[2]
    bandwidth = a.nbytes / best / 1e9
    block = np.random.default_rng(0).random(1 << 16, dtype=np.float32) + np.float32(0.5)
    out = np.empty_like(block)
    reps = 200 if quick else 1000

    def logs() -> None:
        for _ in range(reps):
            np.log(block, out=out)

    with ThreadPoolExecutor(threads) as pool:

        def all_cores() -> None:
            list(pool.map(lambda _: logs(), range(threads)))

        t_one = time_calls(logs, 3)[2]
        t_all = time_calls(all_cores, 3)[2]
    ns_per_log = t_one / (reps * block.size) * 1e9
    logs_per_s = threads * reps * block.size / t_all
    return {
        "threads": threads,
        "read_bandwidth_gbps": bandwidth,
        "np_log_float32_ns_per_element_one_core": ns_per_log,
        # the loss reads 8 bytes (x and t, float32) per log: the log-bound ceiling
        "log_ceiling_float32_gbps": logs_per_s * 8 / 1e9,
    }


def machine() -> dict[str, Any]:
    """Name the machine and the library versions."""
    info: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__}
    with contextlib.suppress(OSError):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "L2 cache", "L3 cache"):
                info[key.strip()] = value.strip()
    info["usable_cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    for mod in ("torch", "jax"):
        with contextlib.suppress(ImportError):
            info[mod] = __import__(mod).__version__
    return info


# ---------------------------------------------------------------------------- the run


def cases(
    quick: bool, shapes: Sequence[tuple[int, ...]] | None = None
) -> list[tuple[tuple[int, ...], str, str, bool]]:
    """Return (shape, dtype, reduction, backward) for the run.

    Below the largest shape: float32 and float64, every reduction forward and
    ``batchmean`` and ``none`` forward+backward. The largest shape: float32 only, the
    headline cases: ``sum`` and ``none`` forward, ``batchmean`` forward+backward.
    ``quick``: float32 and the headline cases only, at every shape. Given ``shapes``:
    float32 and the headline cases at those shapes only.
    """
    headline = [("sum", False), ("none", False), ("batchmean", True)]
    if shapes:
        return [(tuple(shape), "float32", r, b) for shape in shapes for r, b in headline]
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    out = []
    for shape in shapes[:-1]:
        for dtype in ("float32",) if quick else ("float32", "float64"):
            todo = (
                headline
                if quick
                else [(r, False) for r in REDUCTIONS]
                + [
                    ("batchmean", True),
                    ("none", True),
                ]
            )
            out += [(shape, dtype, r, b) for r, b in todo]
    out += [(shapes[-1], "float32", r, b) for r, b in headline]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time every case; return the results as a JSON-able dict."""
    names = available(args.implementations)
    skipped = sorted(set(args.implementations) - set(names))
    records: list[Record] = []
    compile_seen: set[tuple[Any, ...]] = set()
    todo = cases(args.quick, args.shapes)
    for shape, dtype, reduction, backward in todo:
        x, t = make_data(shape, dtype)
        elements = x.size
        big = elements >= 10**7
        repeats = args.repeats if not big else max(2, args.repeats // 2)
        for name in names:
            if name == COMPILE and (dtype != "float32" or reduction not in ("sum", "batchmean")):
                continue
            fn = FACTORIES[name](x, t, reduction, backward)
            peak = not args.no_memory and shape == todo[-1][0]
            try:
                first, med, best, extra = time_calls(fn, repeats, peak=peak)
            except Exception as error:  # a peer that fails here is reported, not fatal
                print(f"  {name} failed: {type(error).__name__}: {error}", file=sys.stderr)
                continue
            rec = Record(name, shape, dtype, reduction, "forward+backward" if backward else
                         "forward", med, best, repeats, elements=elements)  # fmt: skip
            rec.gbps = (x.nbytes + t.nbytes) / med / 1e9
            key = (shape, dtype, reduction, backward)
            if name in (COMPILE, JAX) and key not in compile_seen:
                rec.compile_s = max(0.0, first - med)
                if name == COMPILE:
                    compile_seen.add(key)
            rec.extra_peak_mb = extra
            records.append(rec)
            if args.verbose:
                print(f"  {name:18s} {shape} {dtype} {reduction:9s} {rec.mode:16s} "
                      f"{med * 1e3:9.2f} ms {rec.gbps:6.2f} GB/s", file=sys.stderr)  # fmt: skip
            del fn
        del x, t
    _ratios(records)
    stamp = bench_stamp.stamp(__file__, args.argv, libraries=("torch", "jax"), quick=args.quick)
    return {
        "stamp": stamp,
        "machine": machine(),
        "roofline": roofline(args.quick),
        "skipped": skipped,
        "quick": stamp["quick"],
        "records": [asdict(r) for r in records],
        "command": stamp["command"],
    }


def _ratios(records: list[Record]) -> None:
    by_case: dict[tuple[Any, ...], dict[str, Record]] = {}
    for r in records:
        by_case.setdefault((r.shape, r.dtype, r.reduction, r.mode), {})[r.implementation] = r
    for group in by_case.values():
        for r in group.values():
            if EAGER in group:
                r.speedup_vs_eager = group[EAGER].median_s / r.median_s
            if PLAIN in group:
                r.speedup_vs_plain_numpy = group[PLAIN].median_s / r.median_s


# ---------------------------------------------------------------------------- reporting


def summary(result: dict[str, Any]) -> str:
    """Return the largest float32 cases as one Markdown table (the figures the targets use)."""
    records = [r for r in result["records"] if r["dtype"] == "float32"]
    if not records:
        return ""
    largest = max(r["elements"] for r in records)
    head = [r for r in records if r["elements"] == largest]
    shape = "x".join(map(str, head[0]["shape"]))
    lines = [
        f"Largest float32 case, {shape}: GB/s of input read (speed-up vs torch eager, "
        "vs plain numpy; extra peak MiB).",
        "",
        "| implementation | sum, forward | none, forward | batchmean, forward+backward |",
        "|---|---|---|---|",
    ]
    columns = [("sum", "forward"), ("none", "forward"), ("batchmean", "forward+backward")]
    for name in IMPLEMENTATIONS:
        cells = []
        for reduction, mode in columns:
            match = [
                r
                for r in head
                if r["implementation"] == name
                and r["reduction"] == reduction
                and r["mode"] == mode
            ]
            if not match:
                cells.append("")
                continue
            r = match[0]
            peak = r["extra_peak_mb"]
            cells.append(
                f"{r['gbps']:.2f} ({r['speedup_vs_eager']:.1f}x, "
                f"{r['speedup_vs_plain_numpy']:.1f}x; "
                + ("-" if math.isnan(peak) else f"{peak:.0f} MiB")
                + ")"
            )
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(result: dict[str, Any]) -> str:
    """Return the results as Markdown tables."""
    m, roof = result["machine"], result["roofline"]
    stamp = [bench_stamp.describe(result["stamp"]), ""] if "stamp" in result else []
    lines = [
        *stamp,
        f"Machine: {m.get('Model name', '?')}, {m.get('usable_cores')} usable cores; "
        f"NumPy {m.get('numpy')}, PyTorch {m.get('torch', '-')}, JAX {m.get('jax', '-')}.",
        "",
        f"Roofline: read bandwidth {roof['read_bandwidth_gbps']:.1f} GB/s "
        f"({roof['threads']} threads); np.log float32 "
        f"{roof['np_log_float32_ns_per_element_one_core']:.2f} ns/element on one core, "
        "so a float32 loss built on NumPy's log tops out at "
        f"{roof['log_ceiling_float32_gbps']:.1f} GB/s of input.",
        "",
        summary(result),
        "| shape | dtype | reduction | mode | implementation | median ms | min ms | GB/s "
        "| vs eager | vs plain numpy | extra peak MiB | compile s |",
        "|---|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]

    def f(v: float, fmt: str) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    for r in result["records"]:
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['reduction']} | "
            f"{r['mode']} | {r['implementation']} | {r['median_s'] * 1e3:.2f} | "
            f"{r['min_s'] * 1e3:.2f} | {r['gbps']:.2f} | {f(r['speedup_vs_eager'], '.2f')} | "
            f"{f(r['speedup_vs_plain_numpy'], '.2f')} | {f(r['extra_peak_mb'], '.0f')} | "
            f"{f(r['compile_s'], '.1f')} |"
        )
    if result["skipped"]:
        lines += ["", "Not installed, skipped: " + ", ".join(result["skipped"])]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> bool:
    """Draw throughput against size (float32), with the roofline; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [("sum", "forward"), ("batchmean", "forward+backward")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    roof = result["roofline"]
    for ax, (reduction, mode) in zip(axes, panels, strict=True):
        for name in IMPLEMENTATIONS:
            pts = sorted(
                (r["elements"], r["gbps"])
                for r in result["records"]
                if r["implementation"] == name
                and r["dtype"] == "float32"
                and r["reduction"] == reduction
                and r["mode"] == mode
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.axhline(roof["read_bandwidth_gbps"], color="k", ls="--", lw=1, label="read bandwidth")
        ax.axhline(roof["log_ceiling_float32_gbps"], color="gray", ls=":", lw=1.5,
                   label="np.log ceiling")  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("elements per operand")
        ax.set_title(f"float32, reduction='{reduction}', {mode}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("GB/s of input read")
    axes[1].legend(fontsize=8, loc="lower right")
    title = result["machine"].get("Model name", "") + f", {roof['threads']} threads"
    if "stamp" in result:
        title += f"\n{result['stamp']['command']} at commit {result['stamp']['commit'][:12]}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(result: dict[str, Any], out: Path, name: str) -> list[Path]:
    """Write JSON, CSV and Markdown; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.csv", out / f"{name}.md"]
    paths[0].write_text(json.dumps(result, indent=1, default=str) + "\n")
    stamp = result.get("stamp", {})
    with paths[1].open("w", newline="") as f:
        keys = [k for k in result["records"][0] if k != "extra"] if result["records"] else []
        keys += ["commit", "dirty", "command"]  # the stamp, on every row
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for r in result["records"]:
            writer.writerow(
                {**r, "shape": "x".join(map(str, r["shape"]))}
                | {k: stamp.get(k) for k in ("commit", "dirty", "command")}
            )
    paths[2].write_text(markdown(result))
    return paths


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in text.lower().split("x"))
    except ValueError:
        msg = f"a shape is written like 4096x32000, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    p = argparse.ArgumentParser(prog="cpu_bench.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes only (under a minute)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per case (default 5, 3 with --quick)")  # fmt: skip
    p.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS),
                   choices=IMPLEMENTATIONS, metavar="NAME", help="subset to run")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="folder for <name>.json, .csv, .md (and .png)")  # fmt: skip
    p.add_argument("--name", default=None, help="file stem (default: cpu or cpu-quick)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="plot path; {name} is the stem (default <out>/<name>.png)")  # fmt: skip
    p.add_argument("--shapes", nargs="+", type=_shape, default=None, metavar="AxB",
                   help="only these shapes (float32, the three headline cases)")  # fmt: skip
    p.add_argument("--no-plot", action="store_true", help="draw no plot")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("-v", "--verbose", action="store_true", help="print each case as it runs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    name = args.name or ("cpu-quick" if args.quick else "cpu")
    result = run(args)
    paths = write(result, args.out, name)
    png = Path(args.plot.replace("{name}", name)) if args.plot else args.out / f"{name}.png"
    if not args.no_plot and plot(result, png):
        paths.append(png)
    print(markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
