"""Distillation from hidden states on the CPU: forward + backward, time and extra peak memory.

One distillation step (the loss from the student's and the teacher's last hidden
states and ``(V, H)`` output weights; gradients for the student's hidden states and
weight; float32, T = 2, the same width for both models) at the shapes of issue 21,
``TOKENS x H x V`` = 2048 x 1024 x 32000 and 1024 x 2048 x 128256 (``--quick``: two
small shapes), by

- ``composition``: ``s = h_s @ W_s.T``, ``t = h_t @ W_t.T`` (under ``no_grad``),
  ``T**2 * F.kl_div(F.log_softmax(s / T), F.softmax(t / T), reduction="batchmean")``;
- ``logits + kl_div_from_logits``: the same logits, then
  ``kldiv_spec.torch.kl_div_from_logits`` (its fused CPU kernel);
- ``Liger compiled`` / ``Liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss(beta=0,
  weight_hard_loss=0, weight_soft_loss=1, chunk_size=1024)``, ``compiled=True`` and
  ``False`` (its value is ours divided by T**2: the table multiplies it back);
- ``kl_div_from_hidden``: ``kldiv_spec.torch.kl_div_from_hidden`` (chunked, default
  memory budget); and, for the memory only, the same at twice the tokens.

Each method runs in its own subprocess (Liger's in ``--liger-python``, by default
``.nox/peers/bin/python`` when this interpreter has no ``liger_kernel``): inputs
allocated, one warm-up step (Liger's compilation), then ``--repeats`` timed steps.
The extra peak memory is the process's peak resident size during the timed steps
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``) minus the resident
size before them and the gradients every method holds (the student's hidden states'
and weight's). The children run with ``MALLOC_MMAP_THRESHOLD_=131072`` so that glibc
returns every large freed block and the resident size follows the live memory. The
rounds (``--rounds``) interleave the methods so that a load change on a shared machine
touches them alike; each method's time is the median of its steps over all rounds.

    python benchmarks/hidden_bench.py --repeats 4 --rounds 3 --out benchmarks/results/hidden-cpu
    python benchmarks/hidden_bench.py --quick   # small shapes: checks the script
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))
import bench_stamp  # benchmarks/bench_stamp.py (this folder is no package)

ROOT = Path(__file__).resolve().parents[1]
TEMPERATURE = 2.0
SHAPES = ((2048, 1024, 32000), (1024, 2048, 128256))
QUICK_SHAPES = ((512, 128, 4000), (256, 256, 16000))
METHODS = (
    "composition",
    "logits + kl_div_from_logits",
    "Liger compiled",
    "Liger",
    "kl_div_from_hidden",
    "kl_div_from_hidden, 2x tokens",
)
LIGER = ("Liger compiled", "Liger")
#: Methods timed once per round for their memory only.
MEMORY_ONLY = ("kl_div_from_hidden, 2x tokens",)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise LookupError(key)


def _step(
    method: str,
    tokens: int,
    width: int,
    vocab: int,
    device: str = "cpu",
    dtype: str = "float32",
) -> tuple[Any, Any, Any]:
    """Return ``(step, clear, grads_bytes)``: step() runs one forward + backward.

    step() returns the loss; clear() drops the gradients (before the baseline is read).
    """
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    if method == "kl_div_from_hidden, 2x tokens":
        tokens *= 2
    T = TEMPERATURE  # noqa: N806
    dt = getattr(torch, dtype)

    def make(*shape: int, scale: float = 1.0) -> Any:
        return (torch.randn(*shape, device=device) * scale).to(dt)

    h_s = make(tokens, width).requires_grad_()
    w_s = make(vocab, width, scale=width**-0.5).requires_grad_()
    h_t = make(tokens, width)
    w_t = make(vocab, width, scale=width**-0.5)
    grads = (h_s.numel() + w_s.numel()) * h_s.element_size()

    def clear() -> None:
        h_s.grad = w_s.grad = None

    if method in ("composition", "logits + kl_div_from_logits"):
        import kldiv_spec.torch as kt

        def logits_step() -> float:
            clear()
            s = h_s @ w_s.T
            with torch.no_grad():
                t = h_t @ w_t.T
            if method == "composition":
                s, t = s.float(), t.float()  # (float32 logits: the usual upcast)
                log_q, p = F.log_softmax(s / T, dim=-1), F.softmax(t / T, dim=-1)
                loss = F.kl_div(log_q, p, reduction="batchmean") * T**2
            else:
                loss = kt.kl_div_from_logits(s, t, temperature=T)
            loss.backward()
            return float(loss.detach())

        return logits_step, clear, grads
    if method in LIGER:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0,
            weight_soft_loss=1.0,
            beta=0.0,
            temperature=T,
            compiled=method == "Liger compiled",
            chunk_size=1024,
        )
        labels = torch.randint(0, vocab, (tokens,))

        def liger_step() -> float:
            clear()
            loss = loss_fn(h_s, w_s, h_t, w_t, labels)
            loss.backward()
            return float(loss.detach()) * T**2  # Liger does not scale by T**2

        return liger_step, clear, grads
    if method == "Liger Triton":
        from liger_kernel.transformers import LigerFusedLinearJSD

        fused = LigerFusedLinearJSD(jsd_beta=0.0, temperature=T)

        def liger_triton_step() -> float:
            clear()
            loss = fused(h_s, w_s, h_t, w_t, None)
            loss.backward()
            return float(loss.detach())

        return liger_triton_step, clear, grads
    import kldiv_spec.torch as kt

    def hidden_step() -> float:
        clear()
        loss = kt.kl_div_from_hidden(h_s, w_s, h_t, w_t, temperature=T)
        loss.backward()
        return float(loss.detach())

    return hidden_step, clear, grads


def child(method: str, tokens: int, width: int, vocab: int, repeats: int) -> dict[str, Any]:
    """Run one method: a warm-up step, then ``repeats`` timed steps; time and extra peak."""
    import gc

    step, clear, grads = _step(method, tokens, width, vocab)
    step()  # warm-up (compilation), and every first-use allocation
    times, peaks, loss = [], [], float("nan")
    for _ in range(repeats):
        clear()  # the baseline: the inputs, without gradients
        gc.collect()
        base = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
        peaks.append(_status("VmHWM") - base - grads)
    return {"times": times, "extra_peak": max(peaks), "loss": loss}


def _python(method: str, liger_python: str) -> str:
    if method in LIGER and importlib.util.find_spec("liger_kernel") is None:
        return liger_python
    return sys.executable


def run(
    shapes: tuple[tuple[int, int, int], ...], repeats: int, rounds: int, liger_python: str
) -> list[dict[str, Any]]:
    """Run every method at every shape, in interleaved rounds; return one record per pair."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    records: dict[tuple[Any, ...], dict[str, Any]] = {}
    for _ in range(rounds):
        for shape in shapes:
            for method in METHODS:
                n = 1 if method in MEMORY_ONLY else repeats
                args = ["--child", method, "--shape", "x".join(map(str, shape)), "--repeats"]
                done = subprocess.run(
                    [_python(method, liger_python), __file__, *args, str(n)],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                    env=env,
                    check=False,
                )
                rec = records.setdefault(
                    (shape, method),
                    {"shape": list(shape), "method": method, "times": [], "extra_peaks": []},
                )
                if done.returncode != 0:
                    rec["error"] = done.stderr.strip().splitlines()[-1:]
                    continue
                got = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{shape} {method}: {got}", file=sys.stderr, flush=True)
                rec["times"] += got["times"]
                rec["extra_peaks"].append(got["extra_peak"])
                rec["loss"] = got["loss"]
                rec["python"] = _python(method, liger_python)
    for rec in records.values():
        if rec["times"]:
            rec["median_ms"] = 1e3 * statistics.median(rec["times"])
            rec["extra_peak_mb"] = max(rec["extra_peaks"]) / 1e6
    return list(records.values())


CUDA_METHODS = (*METHODS[:4], "Liger Triton", *METHODS[4:])


def run_cuda(
    shapes: tuple[tuple[int, int, int], ...], repeats: int, device: str, dtype: str
) -> list[dict[str, Any]]:
    """Every method in this process on ``device``: median step time, extra peak memory.

    The time of a step is measured between two synchronisations; the extra peak is
    ``torch.cuda.max_memory_allocated`` during the step above the memory allocated
    before it (the inputs) and the gradients every method holds. On the CPU
    (``--dry-run``) the memory is not measured, and the Triton losses are left out.
    """
    import gc

    import torch

    cuda = device == "cuda"
    records = []
    for shape in shapes:
        for method in CUDA_METHODS:
            rec: dict[str, Any] = {"shape": list(shape), "method": method}
            records.append(rec)
            if (
                method in (*LIGER, "Liger Triton")
                and importlib.util.find_spec("liger_kernel") is None
            ):
                rec["error"] = "liger_kernel is not installed"
                continue
            if method == "Liger Triton" and not cuda:
                rec["error"] = "Liger's Triton loss needs CUDA"
                continue
            try:
                step, clear, grads = _step(method, *shape, device=device, dtype=dtype)
                step()  # warm-up: compilation, autotuning, the caching allocator
                times, peaks, loss = [], [], float("nan")
                for _ in range(repeats):
                    clear()
                    gc.collect()
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                    start = time.perf_counter()
                    loss = step()  # float(loss) synchronises
                    if cuda:
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                    if cuda:
                        peaks.append(torch.cuda.max_memory_allocated() - base - grads)
                del step, clear
            except Exception as error:
                rec["error"] = [f"{type(error).__name__}: {error}"[:300]]
                continue
            finally:
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            rec.update(times=times, loss=loss, median_ms=1e3 * statistics.median(times))
            rec["extra_peak_mb"] = max(peaks) / 1e6 if peaks else 0.0
            print(f"{shape} {method}: {rec['median_ms']:.1f} ms", file=sys.stderr, flush=True)
    return records


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The tables of issue 21, one per shape, with the ratios of the targets."""
    where = meta.get("device", "cpu")
    lines = [f"# Distillation from hidden states, {where.upper()}: forward + backward", ""]
    lines.append(
        f"{meta.get('dtype', 'float32')}, T = {TEMPERATURE:g}, gradients for the student's "
        "hidden states and "
        f"weight; median of {meta['repeats']} step(s) x {meta['rounds']} round(s); extra "
        "peak memory above the inputs and the gradients. Ratios are within this one run."
    )
    for shape in meta["shapes"]:
        rows = [r for r in records if r["shape"] == list(shape)]
        ours = next((r for r in rows if r["method"] == "kl_div_from_hidden"), {})
        tokens, width, vocab = shape
        lines += [
            "",
            f"## {tokens} tokens x H {width} x V {vocab}",
            "",
            "| method | time | time / ours | extra peak memory | loss |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            if "median_ms" not in r:
                lines.append(f"| {r['method']} | failed: {r.get('error')} | | | |")
                continue
            time_text = "" if r["method"] in MEMORY_ONLY else f"{r['median_ms']:.0f} ms"
            ratio = ""
            if r["method"] not in MEMORY_ONLY and ours.get("median_ms"):
                ratio = f"{r['median_ms'] / ours['median_ms']:.2f}"
            lines.append(
                f"| {r['method']} | {time_text} | {ratio} | {r['extra_peak_mb']:.0f} MB | "
                f"{r['loss']:.6g} |"
            )
        lines += ["", *_targets(rows, ours)]
    return "\n".join(lines) + "\n"


def _targets(rows: list[dict[str, Any]], ours: dict[str, Any]) -> list[str]:
    by = {r["method"]: r for r in rows if "median_ms" in r}
    if "median_ms" not in ours:
        return []
    out = []
    others = ("Liger compiled", "Liger Triton", "composition")
    for other, what in ((name, name) for name in others):
        if other in by:
            speed = by[other]["median_ms"] / ours["median_ms"]
            memory = ours["extra_peak_mb"] / max(by[other]["extra_peak_mb"], 1e-9)
            out.append(
                f"- against {what}: {speed:.2f}x its speed, {memory:.2f} of its extra peak memory"
            )
    twice = by.get("kl_div_from_hidden, 2x tokens")
    if twice:
        out.append(
            f"- twice the tokens: extra peak {twice['extra_peak_mb']:.0f} MB "
            f"(against {ours['extra_peak_mb']:.0f} MB)"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: checks the script")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds")
    parser.add_argument(
        "--liger-python",
        default=str(ROOT / ".nox" / "peers" / "bin" / "python"),
        help="the interpreter with liger_kernel, when this one has none",
    )
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: every method in this process on the GPU, bfloat16 (benchmarks/gpu.sh)",
    )
    parser.add_argument("--dry-run", action="store_true", help="with --device cuda: tiny, CPU")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        tokens, width, vocab = map(int, args.shape.split("x"))
        print(json.dumps(child(args.child, tokens, width, vocab, args.repeats)))
        return
    if args.device == "cuda":
        main_cuda(args, argv)
        return
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rounds = 1 if args.quick else args.rounds
    stamp = bench_stamp.stamp(__file__, argv, libraries=("torch",), quick=args.quick)
    meta = {
        "shapes": [list(s) for s in shapes],
        "repeats": args.repeats,
        "rounds": rounds,
        "temperature": TEMPERATURE,
        "cpus": len(os.sched_getaffinity(0)),
        "load": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    records = run(shapes, args.repeats, rounds, args.liger_python)
    text = markdown(records, meta)
    title, _, rest = text.partition("\n")
    text = f"{title}\n\n{bench_stamp.describe(stamp)}\n{rest}"
    print(text)
    if args.out is not None:
        bench_stamp.write_outputs(
            args.out, {"stamp": stamp, "meta": meta, "records": records}, text
        )


def main_cuda(args: argparse.Namespace, argv: list[str]) -> None:
    """``--device cuda``: bfloat16 hidden states and weights, in this process."""
    device = "cpu" if args.dry_run else "cuda"
    shapes = ((64, 32, 500),) if args.dry_run else SHAPES
    dtype = "float32" if args.dry_run else "bfloat16"
    repeats = 1 if args.dry_run else max(args.repeats, 5)
    stamp = bench_stamp.stamp(__file__, argv, libraries=("torch",), quick=args.dry_run)
    meta = {
        "shapes": [list(s) for s in shapes],
        "repeats": repeats,
        "rounds": 1,
        "temperature": TEMPERATURE,
        "device": device,
        "dtype": dtype,
    }
    records = run_cuda(shapes, repeats, device, dtype)
    text = markdown(records, meta)
    title, _, rest = text.partition("\n")
    text = f"{title}\n\n{bench_stamp.describe(stamp)}\n{rest}"
    print(text)
    if args.out is not None:
        bench_stamp.write_outputs(
            args.out, {"stamp": stamp, "meta": meta, "records": records}, text
        )


if __name__ == "__main__":
    main()
