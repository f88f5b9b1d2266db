"""Distillation from logits on the CPU: forward + backward, time and extra peak memory.

Compares, at ``--rows x --vocab`` float32 logits (default 2048 x 32000) and
temperature 2, one distillation step (the loss and the gradient w.r.t. the
student logits) of

- ``torch composition``: ``F.kl_div(F.log_softmax(s / T), F.softmax(t / T),
  reduction="batchmean") * T**2`` and ``.backward()``, torch eager;
- ``kldiv_spec.torch``: ``kldiv_spec.kl_div_from_logits(s, t, temperature=T)``
  and ``.backward()`` on the same tensors (the fused CPU fast path);
- ``numpy composition``: the same composition written in plain NumPy
  (log-softmax, softmax, the loss, and the gradient ``T (q - p) / N``);
- ``kldiv_spec numpy``: ``kl_div_from_logits`` and ``kl_div_from_logits_backward``.

Each implementation runs in its own subprocess: the inputs are allocated, the
resident set size is read (the baseline), one step is run, and the extra peak
memory is the process's maximum resident set size (``getrusage``) minus the
baseline; then ``--repeats`` timed steps give the median (and min, max).

    python benchmarks/logits_bench.py --runs 3 --out benchmarks/results/logits-cpu
    python benchmarks/logits_bench.py --out /tmp/run1   # one run (and /tmp/run2, /tmp/run3)
    python benchmarks/logits_bench.py --combine /tmp/run?.json --out /tmp/logits-cpu

``--logits teacher-top50`` (the teacher's 50 largest logits as log-probabilities, ``-inf``
elsewhere, as stored top-k teachers are) and ``--logits student-excluded`` (a tenth of the
student's classes at ``-inf``, as masked or padded vocabularies) time the same step on
logits with excluded classes (default ``dense``; the title names any other kind):

    python benchmarks/logits_bench.py --rows 512 --logits teacher-top50

``--runs N`` makes N runs one after the other and writes them as ``--combine`` does
(each run, and the spread); the published result is ``nox -s bench -- logits-cpu``.
Every ``--out`` file carries the stamp of ``benchmarks/bench_stamp.py`` (commit, command,
versions, machine).

``--device cuda`` measures one distillation step (forward + backward w.r.t. the
student, float32, T = 2) at 2048 x 32000 and 4096 x 128000 (``--shapes``) on
the GPU, in this process: the torch composition eager and ``torch.compile``-d,
and ``kldiv_spec.kl_div_from_logits`` (the Triton kernel). It reports the median
time (CUDA events), the peak CUDA memory above the inputs, and the fraction of
the device's copy bandwidth: the bytes a step must move (read both logits,
write the gradient: 12 bytes per element) per second, over a measured
device-to-device copy's (read + write) bytes per second.

    python benchmarks/logits_bench.py --device cuda --out /tmp/logits-cuda
    python benchmarks/logits_bench.py --device cuda --dry-run   # CPU, tiny: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))
import bench_stamp  # benchmarks/bench_stamp.py (this folder is no package)

IMPLEMENTATIONS = (
    "torch composition",
    "kldiv_spec.torch",
    "numpy composition",
    "kldiv_spec numpy",
)
TEMPERATURE = 2.0
#: The kinds of logits (``--logits``): dense, or with excluded classes (-inf).
LOGITS = ("dense", "teacher-top50", "student-excluded")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _logits(rows: int, vocab: int, kind: str) -> tuple[Any, Any]:
    """Return the float32 student and teacher logits of one ``--logits`` kind."""
    import numpy as np

    rng = np.random.default_rng(0)
    s_np = rng.standard_normal((rows, vocab), dtype=np.float32)
    t_np = (s_np + rng.standard_normal((rows, vocab), dtype=np.float32)).astype(np.float32)
    # in chunks of rows, so that the temporaries stay below the steps' extra memory
    for i in range(0, rows, 64):
        s_rows, t_rows = s_np[i : i + 64], t_np[i : i + 64]
        if kind == "teacher-top50":
            k = min(50, vocab)
            keep = np.argpartition(-t_rows, k - 1, axis=1)[:, :k]
            kept = np.take_along_axis(t_rows, keep, 1).astype(np.float64)
            top = kept.max(axis=1, keepdims=True)
            kept -= top + np.log(np.exp(kept - top).sum(axis=1, keepdims=True))
            t_rows[...] = -np.inf
            np.put_along_axis(t_rows, keep, kept.astype(np.float32), 1)
        elif kind == "student-excluded":
            drop = rng.random(s_rows.shape) < 0.1
            drop[:, 0] = False  # at least one class kept
            s_rows[drop] = -np.inf
    return s_np, t_np


def _step(name: str, rows: int, vocab: int, kind: str = "dense") -> tuple[Any, Any]:
    """Return ``(setup, step)`` for one implementation: step() runs one forward + backward."""
    import numpy as np

    s_np, t_np = _logits(rows, vocab, kind)
    T = TEMPERATURE  # noqa: N806
    if name in ("torch composition", "kldiv_spec.torch"):
        import torch
        import torch.nn.functional as F

        import kldiv_spec

        s = torch.from_numpy(s_np).requires_grad_()
        t = torch.from_numpy(t_np)

        def composition() -> float:
            s.grad = None
            loss = (
                F.kl_div(
                    F.log_softmax(s / T, dim=-1),
                    F.softmax(t / T, dim=-1),
                    reduction="batchmean",
                )
                * T**2
            )
            loss.backward()
            return float(loss.detach())

        def fused() -> float:
            s.grad = None
            loss = kldiv_spec.kl_div_from_logits(s, t, temperature=T)
            loss.backward()
            return float(loss.detach())

        return (s, t), composition if name == "torch composition" else fused

    import kldiv_spec

    def numpy_composition() -> float:
        a = s_np / T
        a = a - a.max(axis=1, keepdims=True)
        log_q = a - np.log(np.exp(a).sum(axis=1, keepdims=True))
        b = t_np / T
        b = b - b.max(axis=1, keepdims=True)
        log_p = b - np.log(np.exp(b).sum(axis=1, keepdims=True))
        p = np.exp(log_p)
        loss = float(np.sum(p * (log_p - log_q)) / rows * T**2)
        grad = (np.exp(log_q) - p) * (T / rows)
        del grad
        return loss

    def ours() -> float:
        loss = kldiv_spec.kl_div_from_logits(s_np, t_np, temperature=T)
        grad, _ = kldiv_spec.kl_div_from_logits_backward(1.0, s_np, t_np, temperature=T)
        del grad
        return float(loss)

    return (s_np, t_np), numpy_composition if name == "numpy composition" else ours


def child(name: str, rows: int, vocab: int, repeats: int, kind: str = "dense") -> dict[str, Any]:
    """Measure one implementation in this process (run as a subprocess)."""
    _, step = _step(name, rows, vocab, kind)
    baseline = _rss_bytes()
    loss = step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "implementation": name,
        "loss": loss,
        "extra_peak_mb": (peak - baseline) / 2**20,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
    }


def run_all(rows: int, vocab: int, repeats: int, kind: str = "dense") -> list[dict[str, Any]]:
    results = []
    for name in IMPLEMENTATIONS:
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                name,
                "--rows",
                str(rows),
                "--vocab",
                str(vocab),
                "--repeats",
                str(repeats),
                "--logits",
                kind,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(results[-1], file=sys.stderr)
    return results


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    by = {r["implementation"]: r for r in results}
    lines = [
        f"# Distillation from logits on the CPU: {meta['rows']} x {meta['vocab']} float32, T = "
        f"{TEMPERATURE:g}"
        + (f", {meta['logits']}" if meta.get("logits", "dense") != "dense" else ""),
        "",
        f"Forward + backward (gradient w.r.t. the student logits), median of {meta['repeats']} "
        f"repeats; extra peak memory over the inputs. Machine: {meta['machine']}, "
        f"{meta['cpus']} CPUs, load average {meta['load']} at the start.",
        "",
        "| implementation | median (s) | min (s) | max (s) | extra peak (MB) | speed vs its "
        "composition | memory vs its composition |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {"kldiv_spec.torch": "torch composition", "kldiv_spec numpy": "numpy composition"}
    for r in results:
        ref = by.get(base.get(r["implementation"], ""))
        speed = f"{ref['median_s'] / r['median_s']:.2f}x" if ref else ""
        mem = ""
        if ref and ref["extra_peak_mb"] > 0:
            mem = f"{100 * r['extra_peak_mb'] / ref['extra_peak_mb']:.0f}%"
        lines.append(
            f"| {r['implementation']} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
            f"{r['max_s']:.3f} | {r['extra_peak_mb']:.0f} | {speed} | {mem} |"
        )
    return "\n".join(lines) + "\n"


def combine(paths: list[Path]) -> tuple[dict[str, Any], str]:
    """Return the JSON and Markdown of several runs (``--out`` files): each run, and the spread."""
    return combined([json.loads(p.read_text(encoding="utf-8")) for p in paths])


def combined(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """Return the JSON and Markdown of runs (``{"meta", "results"}`` each) and their spread."""
    sections = [markdown(r["results"], r["meta"]) for r in runs]
    base = {"kldiv_spec.torch": "torch composition", "kldiv_spec numpy": "numpy composition"}
    lines = [
        f"## Spread over {len(runs)} run{'s' * (len(runs) > 1)}",
        "",
        "| implementation | medians (s) | speed vs its composition | extra peak (MB) | memory vs "
        "its composition |",
        "|---|---|---|---|---|",
    ]
    for name in IMPLEMENTATIONS:
        per = [{r["implementation"]: r for r in run["results"]} for run in runs]
        medians = [p[name]["median_s"] for p in per]
        peaks = [p[name]["extra_peak_mb"] for p in per]
        speed = mem = ""
        if name in base:
            ratios = [p[base[name]]["median_s"] / p[name]["median_s"] for p in per]
            fractions = [
                100 * p[name]["extra_peak_mb"] / p[base[name]]["extra_peak_mb"]
                for p in per
                if p[base[name]]["extra_peak_mb"] > 0
            ]
            speed = f"{min(ratios):.2f}x to {max(ratios):.2f}x"
            mem = f"{min(fractions):.0f}% to {max(fractions):.0f}%" if fractions else ""
        lines.append(
            f"| {name} | {', '.join(f'{m:.2f}' for m in medians)} | {speed} | "
            f"{min(peaks):.0f} to {max(peaks):.0f} | {mem} |"
        )
    text = (
        "\n".join(lines)
        + "\n\n"
        + "\n".join(
            f"## Run {i + 1}\n\n" + sec.split("\n", 2)[2] for i, sec in enumerate(sections)
        )
    )
    title = sections[0].split("\n", 1)[0]
    return {"runs": runs}, f"{title}\n\n{text}"


# --------------------------------------------------------------------------- CUDA

CUDA_SHAPES = ((2048, 32000), (4096, 128000))
CUDA_IMPLEMENTATIONS = ("torch composition", "torch composition compiled", "kldiv_spec (Triton)")


def _cuda_steps(device: str) -> dict[str, Any]:
    """Return ``name -> step(s, t)``: one forward + backward w.r.t. the student."""
    import torch
    import torch.nn.functional as F

    import kldiv_spec

    T = TEMPERATURE  # noqa: N806

    def composition(s: Any, t: Any) -> Any:
        loss = (
            F.kl_div(F.log_softmax(s / T, dim=-1), F.softmax(t / T, dim=-1), reduction="batchmean")
            * T**2
        )
        loss.backward()
        return loss

    def ours(s: Any, t: Any) -> Any:
        loss = kldiv_spec.kl_div_from_logits(s, t, temperature=T)
        loss.backward()
        return loss

    steps = {"torch composition": composition, "kldiv_spec (Triton)": ours}
    if device == "cuda":
        steps["torch composition compiled"] = torch.compile(composition)
    return steps


def _copy_bandwidth(torch: Any, device: str, n_bytes: int, repeats: int) -> float:
    """Return a device-to-device copy's bytes moved (read + write) per second."""
    a = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(repeats + 1):
        times.append(_timed(torch, device, lambda: b.copy_(a)))
    return 2 * a.numel() * 4 / statistics.median(times[1:])


def _timed(torch: Any, device: str, fn: Any) -> float:
    """Return the seconds of one call of ``fn`` (CUDA events on a GPU)."""
    if device != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def run_cuda(
    shapes: list[tuple[int, int]], repeats: int, device: str = "cuda"
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Measure every implementation at every shape; return the rows and the copy bandwidth."""
    import torch

    results = []
    biggest = max(r * v for r, v in shapes)
    copy_bw = _copy_bandwidth(torch, device, min(4 * biggest, 1 << 31), max(repeats, 3))
    steps = _cuda_steps(device)
    for rows, vocab in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        s = torch.randn(rows, vocab, device=device, generator=gen).requires_grad_()
        t = s.detach() + torch.randn(rows, vocab, device=device, generator=gen)
        must_move = 3 * rows * vocab * 4  # read s and t, write the gradient
        for name in CUDA_IMPLEMENTATIONS:
            if name not in steps:
                continue
            step = steps[name]

            def once(step: Any = step, s: Any = s, t: Any = t) -> Any:
                s.grad = None
                return step(s, t)

            loss = float(once().detach())  # warm-up (compiles)
            if device == "cuda":
                torch.cuda.synchronize()
                s.grad = None
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                once()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            else:
                peak = float("nan")
            times = [_timed(torch, device, once) for _ in range(repeats)]
            median = statistics.median(times)
            results.append(
                {
                    "implementation": name,
                    "rows": rows,
                    "vocab": vocab,
                    "loss": loss,
                    "median_s": median,
                    "min_s": min(times),
                    "max_s": max(times),
                    "extra_peak_mb": peak,
                    "fraction_of_copy_bandwidth": must_move / median / copy_bw,
                }
            )
            print(results[-1], file=sys.stderr)
    return results, {"copy_bandwidth_gb_s": copy_bw / 1e9}


def markdown_cuda(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# Distillation from logits on {meta['gpu']}: float32, T = {TEMPERATURE:g}",
        "",
        f"Forward + backward (gradient w.r.t. the student logits), median of {meta['repeats']} "
        f"repeats (CUDA events); extra peak CUDA memory above the inputs; copy bandwidth "
        f"{meta['copy_bandwidth_gb_s']:.0f} GB/s (device-to-device copy, read + write), against "
        "which a step's 12 bytes per element (read both logits, write the gradient) are set.",
        "",
        "| shape | implementation | median (ms) | min (ms) | extra peak (MB) | fraction of copy "
        "bandwidth | speed vs composition | memory vs composition |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["rows"], r["vocab"], r["implementation"]): r for r in results}
    for r in results:
        ref = by.get((r["rows"], r["vocab"], "torch composition"))
        speed = f"{ref['median_s'] / r['median_s']:.2f}x" if ref else ""
        mem = ""
        if ref and ref["extra_peak_mb"] and ref["extra_peak_mb"] == ref["extra_peak_mb"]:
            mem = f"{100 * r['extra_peak_mb'] / ref['extra_peak_mb']:.0f}%"
        lines.append(
            f"| {r['rows']} x {r['vocab']} | {r['implementation']} | {1e3 * r['median_s']:.2f} | "
            f"{1e3 * r['min_s']:.2f} | {r['extra_peak_mb']:.0f} | "
            f"{100 * r['fraction_of_copy_bandwidth']:.0f}% | {speed} | {mem} |"
        )
    return "\n".join(lines) + "\n"


def _stamped(data: dict[str, Any], text: str, stamp: dict[str, Any]) -> tuple[dict, str]:
    """``data`` with the stamp first, and ``text`` with the stamp's paragraph under its title."""
    title, _, rest = text.partition("\n")
    return {"stamp": stamp, **data}, f"{title}\n\n{bench_stamp.describe(stamp)}\n{rest}"


def main_cuda(args: argparse.Namespace, argv: list[str]) -> None:
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("logits_bench.py --device cuda: torch sees no CUDA device (use --dry-run)")
    shapes = [(64, 300), (8, 1000)] if args.dry_run else args.shapes or list(CUDA_SHAPES)
    repeats = 2 if args.dry_run else args.repeats
    results, extra = run_cuda(shapes, repeats, device)
    meta = {
        "repeats": repeats,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "the CPU (dry run)",
        "torch": torch.__version__,
        **extra,
    }
    stamp = bench_stamp.stamp(
        __file__, argv, libraries=("torch", "triton"), gpu=device == "cuda", quick=args.dry_run
    )
    data, text = _stamped({"meta": meta, "results": results}, markdown_cuda(results, meta), stamp)
    print(text)
    _write(args.out, data, text)


def _write(out: Path | None, data: dict[str, Any], text: str) -> None:
    """Write ``OUT.json`` (``data``) and ``OUT.md`` (``text``), if ``--out`` was given."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(text, encoding="utf-8")


def _shape(text: str) -> tuple[int, int]:
    rows, vocab = text.lower().split("x")
    return int(rows), int(vocab)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--logits", choices=LOGITS, default="dense", help="dense, or with excluded classes"
    )
    parser.add_argument(
        "--runs", type=int, default=None, help="runs one after the other, written combined"
    )
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--combine", type=Path, nargs="+", help="combine the JSON files of earlier runs into OUT"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--shapes", type=_shape, nargs="+", help="with --device cuda: ROWSxVOCAB shapes"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="with --device cuda: tiny shapes on the CPU"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda":
        main_cuda(args, argv)
        return
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.vocab, args.repeats, args.logits)))
        return
    stamp = bench_stamp.stamp(__file__, argv, libraries=("torch",))
    if args.combine:
        data, text = combine(args.combine)
        commits = {r.get("stamp", {}).get("commit") for r in data["runs"]}
        if commits != {stamp["commit"]}:
            stamp["note"] = f"Combined from runs at commits {sorted(map(str, commits))}."
        data, text = _stamped(data, text, stamp)
        print(text)
        _write(args.out, data, text)
        return
    runs = []
    for _ in range(args.runs or 1):
        meta = {
            "rows": args.rows,
            "vocab": args.vocab,
            "repeats": args.repeats,
            "machine": platform.processor() or platform.machine(),
            "cpus": len(os.sched_getaffinity(0)),
            "load": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        }
        if args.logits != "dense":  # the default's output is unchanged
            meta["logits"] = args.logits
        results = run_all(args.rows, args.vocab, args.repeats, args.logits)
        runs.append({"meta": meta, "results": results})
    if args.runs is None:
        data, text = runs[0], markdown(runs[0]["results"], runs[0]["meta"])
    else:
        data, text = combined(runs)
    data, text = _stamped(data, text, stamp)
    print(text)
    _write(args.out, data, text)


if __name__ == "__main__":
    main()
