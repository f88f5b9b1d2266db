"""KL-divergence on one device: kldiv_spec's fast path against PyTorch eager and torch.compile.

Two cases on ``rows x cols`` float32 log-probabilities and probabilities:
forward ``reduction="sum"`` and forward+backward ``reduction="batchmean"``
(gradient w.r.t. the input only, as in distillation). Every implementation runs
in the same process on the same data; the roofline is the measured
device-to-device copy bandwidth (bytes read + written per second). Throughput is
GB/s of input read (two operands). Extra peak memory is measured around one
call: on CUDA with ``torch.cuda.max_memory_allocated``, on the CPU as the peak
growth of resident anonymous memory (sampled) in a fresh subprocess per row
(``--memory``).

Usage::

    python benchmarks/gpu_bench.py                      # CUDA, 4096 x 32000
    python benchmarks/gpu_bench.py --device cpu --memory --no-compile
    python benchmarks/gpu_bench.py --dry-run            # CPU, tiny, seconds: checks the script
    python benchmarks/gpu_bench.py --dry-run --memory   # ... and the peak-RSS subprocesses
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import kldiv_spec

CASES = ("forward sum", "fwd+bwd batchmean")


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


def implementations(device: str, compile_: bool) -> dict[str, Callable[..., torch.Tensor]]:
    """Return the forward functions to compare, by name."""
    impls: dict[str, Callable[..., torch.Tensor]] = {
        "torch eager F.kl_div": F.kl_div,
        "kldiv_spec": lambda x, t, reduction: kldiv_spec.kl_div(x, t, reduction=reduction),
    }
    if compile_:
        impls["torch.compile(F.kl_div)"] = torch.compile(F.kl_div, dynamic=False)
    if device.startswith("cuda"):
        try:
            import cupy  # noqa: F401
        except ImportError:
            pass
        else:
            impls["kldiv_spec (CuPy)"] = _cupy_impl
    return impls


def _cupy_impl(x: torch.Tensor, t: torch.Tensor, reduction: str) -> torch.Tensor:
    import cupy

    xc, tc = cupy.from_dlpack(x.detach()), cupy.from_dlpack(t.detach())
    return torch.from_dlpack(kldiv_spec.kl_div(xc, tc, reduction=reduction))


def run_case(
    fn: Callable[..., torch.Tensor], case: str, x: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Run one case once and return the loss."""
    if case == "forward sum":
        with torch.no_grad():
            return fn(x, t, reduction="sum")
    xg = x.detach().requires_grad_()
    loss = fn(xg, t, reduction="batchmean")
    loss.backward()
    return loss


def _time(run: Callable[[], Any], device: str, repeats: int) -> float:
    run()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        _sync(device)
        best = min(best, time.perf_counter() - start)
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
    fn = implementations("cpu", args.compile)[impl]
    if impl.startswith("torch.compile"):
        run_case(fn, case, x[:2], t[:2])  # compile outside the measurement
    torch.zeros(1).requires_grad_().sum().backward()  # start autograd's engine first
    print(_cpu_peak(lambda: run_case(fn, case, x, t)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--memory", action="store_true", help="CPU: peak RSS per row")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, 1 repeat")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.rows, args.cols, args.repeats, args.compile = "cpu", 64, 1000, 1, False
    if args.one:
        return _one(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device visible to torch", file=sys.stderr)
        return 2
    x, t = _inputs(args.rows, args.cols, args.device)
    read_gb = 2 * x.numel() * x.element_size() / 1e9
    roofline = copy_bandwidth(x, args.repeats)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"# {name}, {args.rows}x{args.cols} float32, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, copy bandwidth {roofline:.1f} GB/s"
    )
    header = ("case", "implementation", "ms", "GB/s", "% copy BW", "x eager", "extra MiB")
    rows: list[tuple[str, ...]] = []
    for case in CASES:
        eager_s = None
        for impl, fn in implementations(args.device, args.compile).items():
            seconds = _time(
                lambda fn=fn, case=case: run_case(fn, case, x, t), args.device, args.repeats
            )
            eager_s = seconds if eager_s is None else eager_s
            if args.device.startswith("cuda"):
                peak = f"{_cuda_peak(lambda fn=fn, case=case: run_case(fn, case, x, t)):.0f}"
            elif args.memory:
                peak = f"{_cpu_peak_subprocess(args, impl, case):.0f}"
            else:
                peak = "-"
            gbs = read_gb / seconds
            rows.append(
                (
                    case,
                    impl,
                    f"{seconds * 1e3:.2f}",
                    f"{gbs:.1f}",
                    f"{100 * gbs / roofline:.0f}",
                    f"{eager_s / seconds:.2f}",
                    peak,
                )
            )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    sys.exit(main())
