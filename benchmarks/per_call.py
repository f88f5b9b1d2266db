"""Per-call cost on the CPU, and issue 9's table ("inside real training steps"), in one run.

Per call (forward, ``reduction="batchmean"``, float32, no gradient), for sizes from
10 to 10^8 elements: ``kldiv_spec.torch.kl_div`` against PyTorch's ``F.kl_div``, and
``kldiv_spec.kl_div`` on NumPy arrays against the plain NumPy expression
``np.sum(xlogy(t, t) - t * x) / B`` (SciPy's ``xlogy``; without SciPy,
``np.where(t == 0, 0, t * np.log(t))`` inside ``np.errstate``). Then the rows of
the issue's table: ``torch.compile(fullgraph=True)`` (graph breaks, and a compiled
forward+backward step, ``log_softmax`` then the loss, against the compiled
``F.kl_div`` step), ``'sum'`` on CPU tensors against the NumPy path on the same
memory, and the dtype and value under ``torch.autocast("cpu", dtype=torch.bfloat16)``.

Timing: every implementation of a row is timed in the same round, one after the
other (in every order in turn), and the round is repeated (``--rounds``); a round
times a batch of calls sized to take about ``--target-ms``. Reported: the median time
per call over the rounds and the spread (min-max), and the median of the per-round
ratios, so that a load that drifts during the run (a shared machine) affects both
sides of a ratio alike. The compiled steps also time a control, ``F.kl_div``'s step
compiled a second time, whose ratio is the harness's own spread (see
:func:`compiled_steps`).

Usage::

    python benchmarks/per_call.py                       # up to 10^7 elements
    python benchmarks/per_call.py --max-elements 1e8    # and 10^8 (400 MB per operand)
    python benchmarks/per_call.py --out benchmarks/results/per-call-cpu
    python benchmarks/per_call.py --quick               # tiny: checks the script
    python benchmarks/per_call.py --device cuda         # PyTorch rows on a GPU (gpu.sh)

On CUDA only the PyTorch rows run (per call, compiled steps, float16 autocast); each
batch of calls ends with a synchronisation. ``--out`` files carry the stamp of
``benchmarks/bench_stamp.py`` (commit, command, versions, machine); the published
run is ``nox -s bench -- per-call-cpu``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import kldiv_spec
import kldiv_spec.torch as kt

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))
import bench_stamp  # benchmarks/bench_stamp.py (this folder is no package)

try:
    from scipy.special import xlogy as _xlogy
except ImportError:  # pragma: no cover - SciPy is optional
    _xlogy = None

SHAPES = [
    (1, 10),
    (8, 10),
    (10, 100),
    (64, 1000),
    (100, 10_000),
    (1000, 10_000),
    (2048, 32_000),
    (10_000, 10_000),
]


def machine() -> str:
    """Return the CPU model, core count and library versions, in one line."""
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    threads = os.environ.get("KLDIV_SPEC_NUM_THREADS", "").strip() or str(max(1, min(cores, 8)))
    fused = os.environ.get("KLDIV_SPEC_NUMPY_FUSED", "").strip() != "0"
    return (
        f"{model}, {cores} cores (load average {load:.1f} at the start), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}, "
        f"kldiv_spec threads {threads}, fused float32 sum "
        f"{'where built' if fused else 'off (KLDIV_SPEC_NUMPY_FUSED=0)'}"
    )


def plain_numpy(x: np.ndarray, t: np.ndarray) -> Any:
    """The plain NumPy expression of the batchmean loss."""
    if _xlogy is not None:
        return np.sum(_xlogy(t, t) - t * x) / x.shape[0]
    with np.errstate(all="ignore"):
        return np.sum(np.where(t == 0, 0, t * np.log(t)) - t * x) / x.shape[0]


def operands(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities and probabilities, built in slices (small temporaries only)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.empty(rows, cols)
    t = torch.empty(rows, cols)
    step = max(1, (1 << 20) // cols)
    for i in range(0, rows, step):
        x[i : i + step] = torch.log_softmax(torch.randn(x[i : i + step].shape, generator=gen), 1)
        t[i : i + step] = torch.softmax(torch.randn(t[i : i + step].shape, generator=gen), 1)
    return x, t


_SYNC: Callable[[], None] = lambda: None  # noqa: E731  (torch.cuda.synchronize on CUDA)


def timed(
    impls: dict[str, Callable[[], Any]], rounds: int, target_s: float, chunks: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each implementation, one list entry per round.

    Interleaved, in an order that changes from round to round; with ``chunks`` > 1
    each round's calls are split into that many chunks, taken in turn, so that a slow
    spell of the shared machine falls on every implementation alike.
    """
    numbers = {}
    for name, f in impls.items():
        f()
        _SYNC()
        begin = time.perf_counter()
        f()
        _SYNC()
        once = max(time.perf_counter() - begin, 1e-7)
        numbers[name] = max(1, min(100_000, int(target_s / once)))
    chunks = max(1, min(chunks, *numbers.values()))  # slow calls: fewer chunks
    out: dict[str, list[float]] = {name: [] for name in impls}
    # every order in turn, so that no implementation keeps one place (first, last, or
    # between two others) in the sequence
    orders = list(itertools.permutations(impls.items()))
    for i in range(rounds):
        spent = dict.fromkeys(impls, 0.0)
        for j in range(chunks):
            for name, f in orders[(i * chunks + j) % len(orders)]:
                n = numbers[name] // chunks
                begin = time.perf_counter()
                for _ in range(n):
                    f()
                _SYNC()
                spent[name] += time.perf_counter() - begin
        for name in impls:
            out[name].append(spent[name] / (numbers[name] // chunks * chunks))
    return out


def summary(times: list[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def ratio(num: list[float], den: list[float]) -> dict[str, float]:
    """Median, min and max of the per-round ratios num / den."""
    r = [a / b for a, b in zip(num, den, strict=True)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def _us(s: float) -> str:
    return f"{s * 1e6:.1f}" if s < 1e-2 else f"{s * 1e3:.1f} ms"


def _fmt_time(d: dict[str, float]) -> str:
    return f"{_us(d['median'])} ({_us(d['min'])}-{_us(d['max'])})"


def _fmt_ratio(d: dict[str, float]) -> str:
    return f"{d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f})"


def per_call(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The per-call table."""
    rows = []
    for r, c in SHAPES:
        n = r * c
        if n > args.max_elements:
            continue
        x, t = operands(r, c)
        xn, tn = x.numpy(), t.numpy()
        x, t = x.to(args.device), t.to(args.device)
        impls = {
            "F.kl_div": lambda x=x, t=t: F.kl_div(x, t, reduction="batchmean"),
            "kldiv_spec.torch.kl_div": lambda x=x, t=t: kt.kl_div(x, t, reduction="batchmean"),
        }
        if args.device == "cpu":
            impls["numpy expression"] = lambda xn=xn, tn=tn: plain_numpy(xn, tn)
            impls["kldiv_spec.kl_div (numpy)"] = lambda xn=xn, tn=tn: kldiv_spec.kl_div(
                xn, tn, reduction="batchmean"
            )
        rounds = args.rounds if n <= 10**7 else max(3, args.rounds // 3)
        times = timed(impls, rounds, args.target_ms / 1e3)
        row = {
            "shape": [r, c],
            "elements": n,
            "rounds": rounds,
            "seconds": {k: summary(v) for k, v in times.items()},
            "torch_ratio": ratio(times["kldiv_spec.torch.kl_div"], times["F.kl_div"]),
        }
        if args.device == "cpu":
            row["numpy_ratio"] = ratio(
                times["kldiv_spec.kl_div (numpy)"], times["numpy expression"]
            )
        rows.append(row)
        print(f"{r}x{c}: torch {_fmt_ratio(row['torch_ratio'])}", flush=True)
        del x, t, xn, tn
    return rows


def graph_breaks() -> dict[str, int]:
    """Graph breaks under torch.compile's Dynamo, per entry point (0 is the target)."""
    x = torch.randn(8, 10).log_softmax(1).requires_grad_()
    t = torch.randn(8, 10).softmax(1)
    module = kt.KLDivLoss(reduction="batchmean")
    entries: dict[str, Callable[..., Any]] = {
        "F.kl_div": lambda a, b: F.kl_div(a, b, reduction="batchmean"),
        "kldiv_spec.torch.KLDivLoss": module,
        "kldiv_spec.torch.kl_div": lambda a, b: kt.kl_div(a, b, reduction="batchmean"),
        "kldiv_spec.kl_div": lambda a, b: kldiv_spec.kl_div(a, b, reduction="batchmean"),
    }
    out = {}
    for name, f in entries.items():
        torch._dynamo.reset()
        out[name] = int(torch._dynamo.explain(f)(x, t).graph_break_count)
    return out


def _step_f(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.kl_div(torch.log_softmax(z, dim=1), t, reduction="batchmean")


def _step_f_again(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.kl_div(torch.log_softmax(z, dim=1), t, reduction="batchmean")


def _step_kldiv_spec(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return kt.kl_div(torch.log_softmax(z, dim=1), t, reduction="batchmean")


#: The compiled steps, by name; the second F.kl_div step is the control (the harness's
#: own spread: the same step compiled twice, timed as if it were a competitor).
_STEPS = {
    "F.kl_div": _step_f,
    "kldiv_spec.torch.kl_div": _step_kldiv_spec,
    "F.kl_div, again (control)": _step_f_again,
}


def compiled_steps(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Compiled forward+backward steps: log_softmax of logits, then the loss.

    Each step is its own function (its own code object, so its own Dynamo cache: a
    shared one would make every call of the second-compiled step check the first's
    guards too), and all stay compiled while they are timed, in 8 chunks per round.
    The step compiled first after a reset runs a little slower here (2-5% at 8x10), so
    the rounds are split into as many sessions as there are steps, each compiling them
    afresh in another order. The control, ``F.kl_div``'s step compiled a second time,
    shows how far from 1 the harness puts two identical steps.
    """
    rows = []
    names = list(_STEPS)
    for r, c in args.compile_shapes:
        z = torch.randn(r, c, device=args.device)
        t = torch.softmax(torch.randn(r, c, device=args.device), 1)
        times: dict[str, list[float]] = {name: [] for name in names}
        sessions = len(names)
        for k in range(sessions):
            torch._dynamo.reset()
            impls = {}
            for name in names[k:] + names[:k]:  # compilation order: rotated per session
                compiled = torch.compile(_STEPS[name], fullgraph=True, dynamic=False)
                zz = z.clone().requires_grad_()

                def run(
                    compiled: Callable[..., torch.Tensor] = compiled, zz: Any = zz, t: Any = t
                ) -> None:
                    zz.grad = None
                    compiled(zz, t).backward()

                run()
                impls[name] = run
            rounds = -(-args.compile_rounds // sessions)
            for name, v in timed(impls, rounds, args.target_ms / 1e3, chunks=8).items():
                times[name] += v
        row = {
            "shape": [r, c],
            "rounds": len(times[names[0]]),
            "seconds": {k: summary(v) for k, v in times.items()},
            "ratio": ratio(times["kldiv_spec.torch.kl_div"], times["F.kl_div"]),
            "control_ratio": ratio(times["F.kl_div, again (control)"], times["F.kl_div"]),
        }
        rows.append(row)
        print(
            f"compiled step {r}x{c}: {_fmt_ratio(row['ratio'])}"
            f" (control {_fmt_ratio(row['control_ratio'])})",
            flush=True,
        )
    return rows


def same_memory_sum(args: argparse.Namespace) -> dict[str, Any]:
    """'sum' on CPU tensors against the NumPy path on the same memory (2048 x 32000)."""
    r, c = args.same_memory_shape
    x, t = operands(r, c)
    xn, tn = x.numpy(), t.numpy()
    xg = x.clone().requires_grad_()
    impls = {
        "torch tensors": lambda: kt.kl_div(x, t, reduction="sum"),
        "numpy arrays": lambda: kldiv_spec.kl_div(xn, tn, reduction="sum"),
        "torch fwd+bwd (input grad)": lambda: kt.kl_div(xg, t, reduction="sum").backward(),
        "numpy fwd+kl_div_backward": lambda: (
            kldiv_spec.kl_div(xn, tn, reduction="sum"),
            kldiv_spec.kl_div_backward(1.0, xn, tn, reduction="sum"),
        ),
    }
    times = timed(impls, max(3, args.rounds // 2), args.target_ms / 1e3)
    return {
        "shape": [r, c],
        "seconds": {k: summary(v) for k, v in times.items()},
        "forward_speed_vs_numpy": ratio(times["numpy arrays"], times["torch tensors"]),
    }


def autocast_row(device: str = "cpu") -> dict[str, Any]:
    """Dtype and value under autocast (CPU bfloat16, CUDA float16), ours against PyTorch's."""
    x, t = operands(8, 10)
    low = torch.bfloat16 if device == "cpu" else torch.float16
    x, t = x.to(device, low), t.to(device, low)
    with torch.autocast(device, dtype=low):
        theirs = F.kl_div(x, t, reduction="batchmean")
        ours = kt.kl_div(x, t, reduction="batchmean")
    return {
        "device": device,
        "pytorch_dtype": str(theirs.dtype),
        "kldiv_spec_dtype": str(ours.dtype),
        "pytorch_value": float(theirs),
        "kldiv_spec_value": float(ours),
        "equal": bool(torch.equal(ours, theirs)),
    }


def report(results: dict[str, Any]) -> str:
    """Markdown of the results."""
    device = "CUDA" if results.get("device") == "cuda" else "CPU"
    lines = [
        f"# Per-call cost and issue 9's table ({device})",
        "",
        *([bench_stamp.describe(results["stamp"]), ""] if "stamp" in results else []),
        f"Machine: {results['machine']}.",
        f"Command: `{results['command']}`; {results['date']}.",
        "Times: median per call over interleaved rounds (min-max); ratios: median of the",
        "per-round ratios (min-max). Forward, `reduction='batchmean'`, float32, no gradient.",
        "",
        "| elements | shape | F.kl_div us | kldiv_spec.torch us | ratio (target <= 1.5; "
        "large: <= 0.2) | numpy expr us | kldiv_spec numpy us | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["per_call"]:
        s = row["seconds"]
        if "numpy_ratio" not in row:  # CUDA: PyTorch only
            lines.append(
                f"| {row['elements']:.0e} | {row['shape'][0]}x{row['shape'][1]} "
                f"| {_fmt_time(s['F.kl_div'])} | {_fmt_time(s['kldiv_spec.torch.kl_div'])} "
                f"| {_fmt_ratio(row['torch_ratio'])} | - | - | - |"
            )
            continue
        lines.append(
            f"| {row['elements']:.0e} | {row['shape'][0]}x{row['shape'][1]} "
            f"| {_fmt_time(s['F.kl_div'])} | {_fmt_time(s['kldiv_spec.torch.kl_div'])} "
            f"| {_fmt_ratio(row['torch_ratio'])} | {_fmt_time(s['numpy expression'])} "
            f"| {_fmt_time(s['kldiv_spec.kl_div (numpy)'])} | {_fmt_ratio(row['numpy_ratio'])} |"
        )
    lines += ["", "## torch.compile", ""]
    lines.append(
        "Graph breaks (`torch._dynamo.explain`): "
        + ", ".join(f"{k}: {v}" for k, v in results["graph_breaks"].items())
        + "."
    )
    lines += [
        "",
        "| compiled fwd+bwd step | F.kl_div | kldiv_spec.torch.kl_div | ratio (target <= 1) "
        "| control: F.kl_div's step compiled again, ratio |",
        "|---|---|---|---|---|",
    ]
    for row in results["compiled"]:
        s = row["seconds"]
        lines.append(
            f"| {row['shape'][0]}x{row['shape'][1]} | {_fmt_time(s['F.kl_div'])} "
            f"| {_fmt_time(s['kldiv_spec.torch.kl_div'])} | {_fmt_ratio(row['ratio'])} "
            f"| {_fmt_ratio(row['control_ratio'])} |"
        )
    sm = results.get("same_memory")
    if sm is None:
        ac = results["autocast"]
        lines += [
            "",
            f"## Autocast ({ac['device']})",
            "",
            f"PyTorch: {ac['pytorch_dtype']} {ac['pytorch_value']!r}; kldiv_spec: "
            f"{ac['kldiv_spec_dtype']} {ac['kldiv_spec_value']!r}; equal: {ac['equal']}.",
        ]
        return "\n".join(lines) + "\n"
    lines += ["", f"## CPU tensors against the NumPy path on the same memory ({sm['shape']})", ""]
    lines += ["| call | time |", "|---|---|"]
    for k, v in sm["seconds"].items():
        lines.append(f"| {k} | {_fmt_time(v)} |")
    lines.append(
        f"\n'sum' forward, torch tensors' speed relative to the NumPy path (target >= 1): "
        f"{_fmt_ratio(sm['forward_speed_vs_numpy'])}."
    )
    ac = results["autocast"]
    lines += [
        "",
        "## Autocast (cpu, bfloat16)",
        "",
        f"PyTorch: {ac['pytorch_dtype']} {ac['pytorch_value']!r}; kldiv_spec: "
        f"{ac['kldiv_spec_dtype']} {ac['kldiv_spec_value']!r}; equal: {ac['equal']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run everything, print the Markdown, and write it (and JSON) with --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-elements", type=float, default=1e7)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--compile-rounds",
        type=int,
        default=41,
        help="rounds of the compiled steps (default 41: their differences are a few percent)",
    )
    parser.add_argument("--target-ms", type=float, default=40.0)
    parser.add_argument("--out", help="write OUT.md and OUT.json")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    global _SYNC
    if args.device == "cuda":
        _SYNC = torch.cuda.synchronize
    args.compile_shapes = [(8, 10), (64, 1000), (512, 32000)]
    args.same_memory_shape = (2048, 32000)
    if args.quick:
        args.max_elements, args.rounds, args.target_ms = 1e3, 2, 2.0
        args.compile_rounds = 2
        args.compile_shapes, args.same_memory_shape = [(8, 10)], (64, 1000)
    warnings.simplefilter("ignore", UserWarning)
    stamp = bench_stamp.stamp(
        __file__,
        sys.argv[1:] if argv is None else argv,
        libraries=("torch", "scipy"),
        gpu=args.device == "cuda",
        quick=args.quick,
    )
    results: dict[str, Any] = {
        "stamp": stamp,
        "device": args.device,
        "machine": machine()
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
        "command": stamp["command"],
        "date": stamp["date"],
    }
    print(results["machine"], flush=True)
    results["per_call"] = per_call(args)
    results["graph_breaks"] = graph_breaks()
    results["compiled"] = compiled_steps(args)
    if args.device == "cpu":
        results["same_memory"] = same_memory_sum(args)
    results["autocast"] = autocast_row(args.device)
    text = report(results)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out + ".md", "w") as f:
            f.write(text)
        with open(args.out + ".json", "w") as f:
            json.dump(results, f, indent=1, default=lambda o: None if math.isnan(o) else o)
    return 0


if __name__ == "__main__":
    sys.exit(main())
