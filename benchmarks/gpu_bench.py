"""KL-divergence on one device: kldiv_spec's fast path against PyTorch eager and torch.compile.

Two cases on ``rows x cols`` float32 log-probabilities and probabilities:
forward ``reduction="sum"`` and forward+backward ``reduction="batchmean"``
(gradient w.r.t. the input only, as in distillation). Every implementation runs
in the same process on the same data. The roofline is the measured
device-to-device copy bandwidth (bytes read + written per second); throughput
is GB/s of input read (two operands), so "% copy BW" is the share of the
device's bandwidth a forward pass uses. On CUDA each time is the mean of
back-to-back calls between two CUDA events (the best of three rounds), so the
host's per-call overhead overlaps the previous kernel, as it does in a training
step; on the CPU it is the best single call. "rel err" is the forward sum's
relative error against PyTorch's float64 result.

Extra peak memory is measured around one call: on CUDA with
``torch.cuda.max_memory_allocated``, on the CPU as the peak growth of resident
anonymous memory (sampled) in a fresh subprocess per row (``--memory``).
``--sweep`` also times the Triton forward over block sizes and warp counts.

``--out STEM`` writes ``STEM.json`` (what ``--json`` writes) and ``STEM.md`` (the
tables), both stamped by ``benchmarks/bench_stamp.py`` (commit, command, versions,
machine and GPU); ``benchmarks/gpu.sh --name gpu-h100`` publishes them as
``benchmarks/results/gpu-h100.*``.

Usage::

    python benchmarks/gpu_bench.py                      # CUDA, 4096 x 32000
    python benchmarks/gpu_bench.py --sweep --json out.json
    python benchmarks/gpu_bench.py --sweep --out benchmarks/results/gpu-h100
    python benchmarks/gpu_bench.py --device cpu --memory --no-compile
    python benchmarks/gpu_bench.py --dry-run            # CPU, tiny, seconds: checks the script
    python benchmarks/gpu_bench.py --dry-run --memory   # ... and the peak-RSS subprocesses
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import kldiv_spec

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))
import bench_stamp  # benchmarks/bench_stamp.py (this folder is no package)

CASES = ("forward sum", "fwd+bwd batchmean")
EAGER = "torch eager F.kl_div"


def _inputs(rows: int, cols: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities and probabilities, made block by block (small temporaries only)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.empty(rows, cols, device=device)
    t = torch.empty(rows, cols, device=device)
    step = max(1, (1 << 20) // cols)
    for i in range(0, rows, step):
        x[i : i + step] = torch.log_softmax(torch.randn(x[i : i + step].shape, generator=gen), 1)
        t[i : i + step] = torch.softmax(torch.randn(t[i : i + step].shape, generator=gen), 1)
    return x, t


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _autograd_case(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Return ``run(case, x, t)`` for a differentiable torch ``forward(x, t, reduction=)``."""

    def run(case: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if case == "forward sum":
            with torch.no_grad():
                return forward(x, t, reduction="sum")
        xg = x.detach().requires_grad_()
        loss = forward(xg, t, reduction="batchmean")
        loss.backward()
        return loss

    return run


def _cupy_case(case: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """kldiv_spec on CuPy arrays sharing the tensors' memory (backward: both gradients)."""
    import cupy

    xc, tc = cupy.from_dlpack(x.detach()), cupy.from_dlpack(t.detach())
    if case == "forward sum":
        return torch.from_dlpack(kldiv_spec.kl_div(xc, tc, reduction="sum"))
    loss = kldiv_spec.kl_div(xc, tc, reduction="batchmean")
    kldiv_spec.kl_div_backward(1.0, xc, tc, reduction="batchmean")
    return torch.from_dlpack(loss)


def implementations(device: str, compile_: bool) -> dict[str, Callable[..., torch.Tensor]]:
    """Return ``run(case, x, t)`` for each implementation to compare, by name (eager first)."""
    impls: dict[str, Callable[..., torch.Tensor]] = {
        EAGER: _autograd_case(F.kl_div),
        "kldiv_spec": _autograd_case(kldiv_spec.kl_div),
    }
    if compile_:
        import kldiv_spec.torch as kt

        impls["torch.compile(F.kl_div)"] = _autograd_case(torch.compile(F.kl_div, dynamic=False))
        impls["torch.compile(kldiv_spec.torch.kl_div)"] = _autograd_case(
            torch.compile(kt.kl_div, dynamic=False, fullgraph=True)
        )
    if device.startswith("cuda"):
        try:
            import cupy  # noqa: F401
        except ImportError:
            pass
        else:
            impls["kldiv_spec (CuPy; bwd: both grads)"] = _cupy_case
    return impls


def _time(run: Callable[[], Any], device: str, repeats: int) -> float:
    """Return seconds per call: CUDA, back-to-back calls between events; CPU, the best call."""
    run()
    run()
    _sync(device)
    if device.startswith("cuda"):
        best = float("inf")
        for _ in range(3):
            start = torch.cuda.Event(enable_timing=True)
            stop = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                run()
            stop.record()
            stop.synchronize()
            best = min(best, start.elapsed_time(stop) / 1e3 / repeats)
        return best
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - begin)
    return best


def copy_bandwidth(x: torch.Tensor, repeats: int) -> float:
    """Return the measured copy bandwidth in GB/s (bytes read + bytes written)."""
    y = torch.empty_like(x)
    seconds = _time(lambda: y.copy_(x), str(x.device), repeats)
    return 2 * x.numel() * x.element_size() / seconds / 1e9


def _cuda_peak(run: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _anon_rss_mib() -> float:
    """Resident anonymous memory (heap, tensors): unlike RSS, immune to evicted library pages."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_peak(run: Callable[[], Any]) -> float:
    """Peak growth of resident anonymous memory while ``run`` runs (sampled every 0.5 ms)."""
    base = _anon_rss_mib()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _anon_rss_mib())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _anon_rss_mib()) - base


def _cpu_peak_subprocess(args: argparse.Namespace, impl: str, case: str) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--device",
        "cpu",
        "--rows",
        str(args.rows),
        "--cols",
        str(args.cols),
        "--one",
        json.dumps([impl, case]),
    ]
    if not args.compile:
        cmd.append("--no-compile")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def _one(args: argparse.Namespace) -> int:
    impl, case = json.loads(args.one)
    x, t = _inputs(args.rows, args.cols, "cpu")
    run = implementations("cpu", args.compile)[impl]
    if impl.startswith("torch.compile"):
        run(case, x[:2], t[:2])  # compile outside the measurement
    torch.zeros(1).requires_grad_().sum().backward()  # start autograd's engine first
    print(_cpu_peak(lambda: run(case, x, t)))
    return 0


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [header, tuple("-" * w for w in widths), *rows]
    return "\n".join(
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in lines
    )


def sweep(x: torch.Tensor, t: torch.Tensor, repeats: int, roofline: float) -> str:
    """Time kldiv_spec's Triton forward sum over block sizes and warp counts.

    The one place a benchmark reaches into the fast path (its tuning constants): where
    they have moved, the sweep says so and the benchmark goes on.
    """
    try:
        from kldiv_spec.backends import _triton_kernels as kernels

        default = (kernels.BLOCK, kernels.NUM_WARPS)
    except (ImportError, AttributeError) as error:
        return f"(no sweep: the Triton kernel's BLOCK and NUM_WARPS are not found: {error})"

    read_gb = 2 * x.numel() * x.element_size() / 1e9
    rows = []
    try:
        for block in (1024, 2048, 4096, 8192, 16384):
            for warps in (4, 8, 16):
                kernels.BLOCK, kernels.NUM_WARPS = block, warps
                seconds = _time(
                    lambda: kernels.forward(x, t, reduction="sum", log_target=False, divisor=1),
                    str(x.device),
                    repeats,
                )
                gbs = read_gb / seconds
                mark = " (default)" if (block, warps) == default else ""
                rows.append(
                    (
                        f"{block}{mark}",
                        str(warps),
                        f"{seconds * 1e3:.3f}",
                        f"{gbs:.0f}",
                        f"{100 * gbs / roofline:.0f}",
                    )
                )
    finally:
        kernels.BLOCK, kernels.NUM_WARPS = default
    return _table(("BLOCK", "warps", "ms", "GB/s", "% copy BW"), rows)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--memory", action="store_true", help="CPU: peak RSS per row")
    parser.add_argument("--sweep", action="store_true", help="CUDA: Triton block/warp sweep")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--out", help="write OUT.json and OUT.md (stamped)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, 1 repeat")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.rows, args.cols, args.repeats, args.compile = "cpu", 64, 1000, 1, False
    if args.one:
        return _one(args)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device visible to torch", file=sys.stderr)
        return 2
    x, t = _inputs(args.rows, args.cols, args.device)
    read_gb = 2 * x.numel() * x.element_size() / 1e9
    roofline = copy_bandwidth(x, args.repeats)
    exact = float(F.kl_div(x.double(), t.double(), reduction="sum"))
    name = torch.cuda.get_device_name() if cuda else "CPU"
    title = (
        f"# {name}, {args.rows}x{args.cols} float32, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, copy bandwidth {roofline:.1f} GB/s"
    )
    print(title, flush=True)
    header = (
        "case", "implementation", "ms", "GB/s", "% copy BW", "x eager", "extra MiB", "rel err"
    )  # fmt: skip
    rows: list[tuple[str, ...]] = []
    records: list[dict[str, Any]] = []
    failures = 0
    for case in CASES:
        eager_s = None
        for impl, run in implementations(args.device, args.compile).items():
            try:
                compile_start = time.perf_counter()
                value = float(run(case, x, t).detach())
                first_call_s = time.perf_counter() - compile_start
                call = functools.partial(run, case, x, t)
                seconds = _time(call, args.device, args.repeats)
                if cuda:
                    peak = f"{_cuda_peak(call):.0f}"
                elif args.memory:
                    peak = f"{_cpu_peak_subprocess(args, impl, case):.0f}"
                else:
                    peak = "-"
            except Exception as exc:  # one failing implementation must not hide the others
                failures += 1
                traceback.print_exc()
                rows.append((case, impl, "error", type(exc).__name__, "", "", "", ""))
                continue
            if impl == EAGER:
                eager_s = seconds
            gbs = read_gb / seconds
            err = abs(value - exact) / abs(exact) if case == "forward sum" else float("nan")
            rows.append(
                (
                    case,
                    impl,
                    f"{seconds * 1e3:.3f}",
                    f"{gbs:.1f}",
                    f"{100 * gbs / roofline:.0f}",
                    f"{eager_s / seconds:.2f}" if eager_s else "-",
                    peak,
                    f"{err:.1e}" if case == "forward sum" else "-",
                )
            )
            records.append(
                {
                    "case": case,
                    "implementation": impl,
                    "seconds": seconds,
                    "first_call_seconds": first_call_s,
                    "gbps": gbs,
                    "fraction_of_copy_bandwidth": gbs / roofline,
                    "speedup_vs_eager": eager_s / seconds if eager_s else None,
                    "extra_peak_mib": None if peak == "-" else float(peak),
                    "relative_error": err if case == "forward sum" else None,
                }
            )
    print(_table(header, rows), flush=True)
    sweep_table = None
    if args.sweep and cuda:
        sweep_table = sweep(x, t, args.repeats, roofline)
        print("\nTriton forward sum by block size and warps:\n" + sweep_table)
    argv_used = sys.argv[1:] if argv is None else argv
    stamp = bench_stamp.stamp(
        __file__, argv_used, libraries=("torch", "triton", "cupy"), gpu=cuda, quick=args.dry_run
    )
    result = {
        "stamp": stamp,
        "device": name,
        "shape": [args.rows, args.cols],
        "torch": torch.__version__,
        "copy_bandwidth_gbps": roofline,
        "results": records,
        "sweep": sweep_table,
    }
    for path in [args.json, args.out and args.out + ".json"]:
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if args.out:
        report = [f"# GPU benchmark: {title[2:]}", "", bench_stamp.describe(stamp), ""]
        report += [_table(header, rows)]
        if sweep_table:
            report += ["", "Triton forward sum by block size and warps:", "", sweep_table]
        Path(args.out + ".md").write_text("\n".join(report) + "\n", encoding="utf-8")
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    sys.exit(main())
