r"""Generalised Jensen-Shannon distillation on the CPU: forward + backward, time and memory.

One distillation step (the loss and the gradient w.r.t. the student logits) of the
generalised JSD with :math:`\beta = 0.5` (``--beta``) at ``--rows x --vocab`` float32
logits (default 2048 x 32000), temperature 1, reduction ``batchmean``, of

- ``trl generalized_jsd_loss``: ``trl``'s ``GKDTrainer.generalized_jsd_loss``
  (``trl.experimental.gkd`` in trl 1.x) and ``.backward()``;
- ``liger distillation_loss_fn``: Liger-Kernel's chunked-loss
  ``LigerFusedLinearJSDFunction.distillation_loss_fn`` (plain torch; it sums over the
  rows, divided here by their number) on the same logits, and ``.backward()``;
- ``torch composition``: the textbook formula in torch eager,
  ``p, q = softmax(t), softmax(s)``, ``log m = log(beta p + (1 - beta) q)``,
  ``beta kl_div(log m, p) + (1 - beta) kl_div(log m, q)`` (``batchmean``);
- ``kldiv_spec.torch``: ``kldiv_spec.kl_div_from_logits(s, t, beta=beta)`` and
  ``.backward()`` (the fused CPU kernel on the tensors' memory);
- ``numpy composition``: the same formula and its gradient
  :math:`(1 - \beta)\,q \odot (r - \sum q r) / N`, :math:`r = \log q - \log m`, in NumPy;
- ``kldiv_spec numpy``: ``kl_div_from_logits`` and ``kl_div_from_logits_backward``.

Each implementation runs in its own subprocess of the same interpreter: one step on tiny
logits (the imports and one-time set-ups), then the inputs are allocated (row by row, so
that no temporary raises the high-water mark), the resident set size is read (the
baseline), one step is run, and the extra peak memory is the
process's maximum resident set size (``getrusage``) minus the baseline; then
``--repeats`` timed steps give the median (and min, max). Run it with an interpreter
that has trl and Liger-Kernel (``nox -s peers`` makes one) so that every ratio comes
from one run on one machine; the peers that are not installed are left out::

    .nox/peers/bin/python benchmarks/jsd_bench.py --out benchmarks/results/jsd-cpu
    .nox/peers/bin/python benchmarks/jsd_bench.py --quick --out /tmp/jsd-quick

``--quick`` is a smoke run (256 x 8000, two repeats). The ``--out`` files carry the stamp
of ``benchmarks/bench_stamp.py`` (commit, command, versions, machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
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
    "trl generalized_jsd_loss",
    "liger distillation_loss_fn",
    "torch composition",
    "kldiv_spec.torch",
    "numpy composition",
    "kldiv_spec numpy",
)
#: The peers' implementations and the module each needs.
PEERS = {"trl generalized_jsd_loss": "trl", "liger distillation_loss_fn": "liger_kernel"}
#: Each of ours and the composition it is compared with.
COMPOSITION = {"kldiv_spec.torch": "torch composition", "kldiv_spec numpy": "numpy composition"}
TEMPERATURE = 1.0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _logits(rows: int, vocab: int) -> tuple[Any, Any]:
    """Return float32 student and teacher logits (the teacher a noisy copy of the student)."""
    import numpy as np

    rng = np.random.default_rng(0)
    s = np.empty((rows, vocab), np.float32)
    t = np.empty((rows, vocab), np.float32)
    for i in range(0, rows, 64):  # in chunks, so that the temporaries stay small
        s[i : i + 64] = rng.standard_normal(s[i : i + 64].shape, dtype=np.float32)
        t[i : i + 64] = s[i : i + 64] + rng.standard_normal(s[i : i + 64].shape, dtype=np.float32)
    return s, t


def _torch_step(name: str, s_np: Any, t_np: Any, beta: float) -> Any:
    """Return step() of one torch implementation: one forward + backward, the loss."""
    import torch
    import torch.nn.functional as F

    import kldiv_spec

    s = torch.from_numpy(s_np).requires_grad_()
    t = torch.from_numpy(t_np)
    rows = s.shape[0]
    if name == "trl generalized_jsd_loss":
        from trl.experimental.gkd import GKDTrainer

        trl_loss = GKDTrainer.generalized_jsd_loss
    if name == "liger distillation_loss_fn":
        from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction

        liger_loss = LigerFusedLinearJSDFunction.distillation_loss_fn

    def loss_of() -> Any:
        if name == "trl generalized_jsd_loss":
            return trl_loss(s, t, beta=beta, temperature=TEMPERATURE)
        if name == "liger distillation_loss_fn":
            return liger_loss(s, t, beta=beta) / rows
        if name == "torch composition":
            p, q = F.softmax(t, dim=-1), F.softmax(s, dim=-1)
            log_m = torch.log(beta * p + (1 - beta) * q)
            kl_p = F.kl_div(log_m, p, reduction="batchmean")
            return beta * kl_p + (1 - beta) * F.kl_div(log_m, q, reduction="batchmean")
        return kldiv_spec.kl_div_from_logits(s, t, beta=beta, temperature=TEMPERATURE)

    def step() -> float:
        s.grad = None
        loss = loss_of()
        loss.backward()
        return float(loss.detach())

    return step


def _numpy_step(name: str, s: Any, t: Any, beta: float) -> Any:
    """Return step() of one NumPy implementation: the loss and the student gradient."""
    import numpy as np

    import kldiv_spec

    rows = s.shape[0]

    def composition() -> float:
        a = s - s.max(axis=1, keepdims=True)
        log_q = a - np.log(np.exp(a).sum(axis=1, keepdims=True))
        b = t - t.max(axis=1, keepdims=True)
        log_p = b - np.log(np.exp(b).sum(axis=1, keepdims=True))
        p, q = np.exp(log_p), np.exp(log_q)
        log_m = np.log(beta * p + (1 - beta) * q)
        r = log_q - log_m
        loss = float((beta * np.sum(p * (log_p - log_m)) + (1 - beta) * np.sum(q * r)) / rows)
        grad = q * (r - np.sum(q * r, axis=1, keepdims=True)) * ((1 - beta) / rows)
        del grad
        return loss

    def ours() -> float:
        options = {"beta": beta, "temperature": TEMPERATURE}
        loss = kldiv_spec.kl_div_from_logits(s, t, **options)
        grad, _ = kldiv_spec.kl_div_from_logits_backward(np.float32(1.0), s, t, **options)
        del grad
        return float(loss)

    return composition if name == "numpy composition" else ours


def child(name: str, rows: int, vocab: int, repeats: int, beta: float) -> dict[str, Any]:
    """Measure one implementation in this process (run as a subprocess)."""
    make = _numpy_step if "numpy" in name else _torch_step
    # one step on tiny logits first: the imports and one-time set-ups of every library
    # (kldiv_spec's dispatch, torch's kernels, trl's transformers) are not the step's memory
    make(name, *_logits(2, 64), beta)()
    s, t = _logits(rows, vocab)
    step = make(name, s, t, beta)
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
        "extra_peak_mb": max(peak - baseline, 0) / 2**20,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
    }


def available(name: str) -> bool:
    """Return whether this interpreter has what ``name`` needs."""
    module = PEERS.get(name, "torch" if "torch" in name else "numpy")
    return importlib.util.find_spec(module) is not None


def run_all(rows: int, vocab: int, repeats: int, beta: float) -> list[dict[str, Any]]:
    """Run every available implementation in its own subprocess of this interpreter."""
    results = []
    for name in IMPLEMENTATIONS:
        if not available(name):
            print(f"{name}: not installed here, left out", file=sys.stderr)
            continue
        command = [sys.executable, "-W", "ignore", __file__, "--child", name]
        command += ["--rows", str(rows), "--vocab", str(vocab), "--repeats", str(repeats)]
        command += ["--beta", repr(beta)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(results[-1], file=sys.stderr)
    return results


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Return the Markdown table of one run, with the ratios computed within it."""
    by = {r["implementation"]: r for r in results}
    lines = [
        f"# Generalised JSD distillation on the CPU: {meta['rows']} x {meta['vocab']} float32, "
        f"beta = {meta['beta']:g}, T = {TEMPERATURE:g}",
        "",
        f"Forward + backward (gradient w.r.t. the student logits), median of {meta['repeats']} "
        "repeats; extra peak memory over the inputs (resident set high-water mark, one "
        "subprocess each). Speed-ups are the peer's median time over ours, within this run.",
        "",
        "| implementation | loss | median (s) | min (s) | max (s) | extra peak (MB) | "
        "kldiv_spec's speed-up over it | memory vs its composition |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ours = [by[n] for n in COMPOSITION if n in by]
    for r in results:
        name = r["implementation"]
        speed = ""
        if name not in COMPOSITION and ours:
            speed = ", ".join(
                f"{o['implementation']}: {r['median_s'] / o['median_s']:.1f}x" for o in ours
            )
        mem = ""
        base = by.get(COMPOSITION.get(name, ""))
        if base and base["extra_peak_mb"] > 0:
            mem = f"{100 * r['extra_peak_mb'] / base['extra_peak_mb']:.0f}%"
        lines.append(
            f"| {name} | {r['loss']:.6f} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
            f"{r['max_s']:.3f} | {r['extra_peak_mb']:.0f} | {speed} | {mem} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 256 x 8000, 2 repeats")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.vocab, args.repeats = 256, 8000, 2
    if args.child:
        result = child(args.child, args.rows, args.vocab, args.repeats, args.beta)
        print(json.dumps(result))
        return
    stamp = bench_stamp.stamp(
        __file__, argv, libraries=("torch", "trl", "liger_kernel"), quick=args.quick
    )
    meta = {"rows": args.rows, "vocab": args.vocab, "repeats": args.repeats, "beta": args.beta}
    results = run_all(args.rows, args.vocab, args.repeats, args.beta)
    text = markdown(results, meta)
    title, _, rest = text.partition("\n")
    text = f"{title}\n\n{bench_stamp.describe(stamp)}\n{rest}"
    print(text)
    if args.out is not None:
        data = {"stamp": stamp, "meta": meta, "results": results}
        bench_stamp.write_outputs(args.out, data, text)


if __name__ == "__main__":
    main()
