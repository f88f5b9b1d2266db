"""The four matrix products of a from-hidden step, by rows per chunk (a diagnostic).

``kl_div_from_hidden`` walks the tokens in chunks of rows; per chunk it runs four
matrix products (float32, ``torch.mm``/``addmm_`` into reused buffers):

- the student's logits ``s = h_c W_s^T`` and the teacher's ``t = h_t,c W_t^T``;
- the hidden states' gradient ``G W_s`` and the weight's ``W_s' += G^T h_c``.

This script times exactly those four products (``G`` stands in as the logits' buffer:
the kernel between them is left out) for each chunk size in ``--chunks``, the sizes
interleaved over ``--rounds`` rounds so that a change of load touches them alike, and
prints the median and the minimum of each size's step, one process, on the current
PyTorch threads. It is the measurement behind ``MIN_ROWS`` of
``kldiv_spec.backends.hidden_torch`` (``docs/hidden.md``, the chunk rule); it writes no
result file.

    python benchmarks/hidden_chunks.py                        # 2048 x 1024 x 32000
    python benchmarks/hidden_chunks.py --shape 1024x2048x128256 --chunks 342 512 1024
    python benchmarks/hidden_chunks.py --quick                # a small shape: checks the script
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def step(
    operands: tuple[torch.Tensor, ...], grads: tuple[torch.Tensor, torch.Tensor], chunk: int
) -> float:
    """Seconds for one step's four products in chunks of ``chunk`` rows (evened out)."""
    h_s, w_s, h_t, w_t = operands
    grad_h, grad_w = grads
    rows, vocab = h_s.shape[0], w_s.shape[0]
    chunks = -(-rows // chunk)
    chunk = -(-rows // chunks)
    s = torch.empty(chunk, vocab)
    t = torch.empty(chunk, vocab)
    start = time.perf_counter()
    for i in range(0, rows, chunk):
        j = min(i + chunk, rows)
        n = j - i
        torch.mm(h_s[i:j], w_s.T, out=s[:n])
        torch.mm(h_t[i:j], w_t.T, out=t[:n])
        torch.mm(s[:n], w_s, out=grad_h[i:j])
        if i == 0:
            torch.mm(s[:n].T, h_s[i:j], out=grad_w)
        else:
            grad_w.addmm_(s[:n].T, h_s[i:j])
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2048x1024x32000", help="TOKENSxHxV")
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 342, 512, 1024, 2048])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--quick", action="store_true", help="a small shape, one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.chunks, args.rounds = "96x32x500", [16, 48, 96], 1
    rows, width, vocab = (int(x) for x in args.shape.split("x"))
    if min(rows, width, vocab, *args.chunks) < 1:
        parser.error("--shape and --chunks take positive sizes")
    torch.manual_seed(0)
    operands = (
        torch.randn(rows, width),
        torch.randn(vocab, width) / width**0.5,
        torch.randn(rows, width),
        torch.randn(vocab, width) / width**0.5,
    )
    grads = (torch.empty(rows, width), torch.empty(vocab, width))
    times: dict[int, list[float]] = {c: [] for c in args.chunks}
    for c in args.chunks:  # warm-up: the buffers' first pages, the BLAS threads
        step(operands, grads, c)
    for _ in range(args.rounds):
        for c in args.chunks:
            times[c].append(step(operands, grads, c))
    print(f"{rows} tokens x H {width} x V {vocab}, float32, {torch.get_num_threads()} threads")
    print("| rows per chunk | chunks | median | min |")
    print("|---|---|---|---|")
    for c, ts in times.items():
        chunks = -(-rows // min(c, rows))
        print(f"| {c} | {chunks} | {statistics.median(ts):.3f} s | {min(ts):.3f} s |")


if __name__ == "__main__":
    main()
