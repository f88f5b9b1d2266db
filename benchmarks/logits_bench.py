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

    python benchmarks/logits_bench.py --out /tmp/run1   # (and /tmp/run2, /tmp/run3)
    python benchmarks/logits_bench.py --combine /tmp/run?.json --out benchmarks/results/logits-cpu
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

IMPLEMENTATIONS = (
    "torch composition",
    "kldiv_spec.torch",
    "numpy composition",
    "kldiv_spec numpy",
)
TEMPERATURE = 2.0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _step(name: str, rows: int, vocab: int) -> tuple[Any, Any]:
    """Return ``(setup, step)`` for one implementation: step() runs one forward + backward."""
    import numpy as np

    rng = np.random.default_rng(0)
    s_np = rng.standard_normal((rows, vocab), dtype=np.float32)
    t_np = (s_np + rng.standard_normal((rows, vocab), dtype=np.float32)).astype(np.float32)
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


def child(name: str, rows: int, vocab: int, repeats: int) -> dict[str, Any]:
    """Measure one implementation in this process (run as a subprocess)."""
    _, step = _step(name, rows, vocab)
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


def run_all(rows: int, vocab: int, repeats: int) -> list[dict[str, Any]]:
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
        f"{TEMPERATURE:g}",
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
        mem = f"{100 * r['extra_peak_mb'] / ref['extra_peak_mb']:.0f}%" if ref else ""
        lines.append(
            f"| {r['implementation']} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
            f"{r['max_s']:.3f} | {r['extra_peak_mb']:.0f} | {speed} | {mem} |"
        )
    return "\n".join(lines) + "\n"


def combine(paths: list[Path]) -> tuple[dict[str, Any], str]:
    """Return the JSON and Markdown of several runs (``--out`` files): each run, and the spread."""
    runs = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    sections = [markdown(r["results"], r["meta"]) for r in runs]
    base = {"kldiv_spec.torch": "torch composition", "kldiv_spec numpy": "numpy composition"}
    lines = [
        f"## Spread over {len(runs)} runs",
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
                100 * p[name]["extra_peak_mb"] / p[base[name]]["extra_peak_mb"] for p in per
            ]
            speed = f"{min(ratios):.2f}x to {max(ratios):.2f}x"
            mem = f"{min(fractions):.0f}% to {max(fractions):.0f}%"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--combine", type=Path, nargs="+", help="combine the JSON files of earlier runs into OUT"
    )
    args = parser.parse_args()
    if args.combine:
        data, text = combine(args.combine)
        print(text)
        if args.out:
            args.out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
            args.out.with_suffix(".md").write_text(text, encoding="utf-8")
        return
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.vocab, args.repeats)))
        return
    meta = {
        "rows": args.rows,
        "vocab": args.vocab,
        "repeats": args.repeats,
        "machine": platform.processor() or platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
        "load": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    results = run_all(args.rows, args.vocab, args.repeats)
    text = markdown(results, meta)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(
            json.dumps({"meta": meta, "results": results}, indent=2) + "\n", encoding="utf-8"
        )
        args.out.with_suffix(".md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
