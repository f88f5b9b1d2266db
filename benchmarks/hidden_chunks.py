"""The four matrix products of a from-hidden step, by rows per chunk and column block.

``kl_div_from_hidden`` walks the tokens in chunks of rows; per chunk it runs four
matrix products (float32, ``torch.mm``/``addmm_`` into reused buffers):

- the student's logits ``s = h_c W_s^T`` and the teacher's ``t = h_t,c W_t^T``;
- the hidden states' gradient ``G W_s`` and the weight's ``W_s' += G^T h_c``.

This script times exactly those four products (``G`` stands in as the logits' buffer:
the kernel between them is left out) for each chunk size in ``--chunks`` and each
column block in ``--columns`` (the logits' products written ``COLUMNS`` classes at a
time, as ``_mm_transposed`` of ``kldiv_spec.backends.hidden_torch`` does in float32 on
the CPU; 0: one product over all the classes), the settings interleaved over
``--rounds`` rounds so that a change of load touches them alike, and prints the
median and the minimum of each setting's step, one process, on the current PyTorch
threads. It is the measurement behind ``MIN_ROWS`` and ``COLUMN_BLOCK``
(``docs/hidden.md``, the chunk rule); it writes no result file.

    python benchmarks/hidden_chunks.py                        # 2048 x 1024 x 32000
    python benchmarks/hidden_chunks.py --shape 1024x2048x128256 --chunks 342 512 1024
    python benchmarks/hidden_chunks.py --chunks 512 --columns 0 256 512 1024
    python benchmarks/hidden_chunks.py --quick                # a small shape: checks the script
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def logits(h: torch.Tensor, w: torch.Tensor, out: torch.Tensor, columns: int) -> None:
    """Write ``h @ w.T`` into ``out``, ``columns`` classes at a time (0: all at once)."""
    vocab = w.shape[0]
    step = columns or vocab
    for v in range(0, vocab, step):
        torch.mm(h, w[v : v + step].T, out=out[:, v : v + step])


def step(
    operands: tuple[torch.Tensor, ...],
    grads: tuple[torch.Tensor, torch.Tensor],
    chunk: int,
    columns: int,
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
        logits(h_s[i:j], w_s, s[:n], columns)
        logits(h_t[i:j], w_t, t[:n], columns)
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
    parser.add_argument(
        "--columns", type=int, nargs="+", default=[0], help="classes per product (0: all)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--quick", action="store_true", help="a small shape, one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.chunks, args.rounds = "96x32x500", [16, 48, 96], 1
        args.columns = [0, 128]
    rows, width, vocab = (int(x) for x in args.shape.split("x"))
    if min(rows, width, vocab, *args.chunks) < 1:
        parser.error("--shape and --chunks take positive sizes")
    if min(args.columns) < 0:
        parser.error("--columns takes sizes of 0 (all the classes) or more")
    torch.manual_seed(0)
    operands = (
        torch.randn(rows, width),
        torch.randn(vocab, width) / width**0.5,
        torch.randn(rows, width),
        torch.randn(vocab, width) / width**0.5,
    )
    grads = (torch.empty(rows, width), torch.empty(vocab, width))
    settings = [(c, k) for c in args.chunks for k in args.columns]
    times: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
    for c, k in settings:  # warm-up: the buffers' first pages, the BLAS threads
        step(operands, grads, c, k)
    for _ in range(args.rounds):
        for c, k in settings:
            times[c, k].append(step(operands, grads, c, k))
    print(f"{rows} tokens x H {width} x V {vocab}, float32, {torch.get_num_threads()} threads")
    print("| rows per chunk | chunks | classes per logits product | median | min |")
    print("|---|---|---|---|---|")
    for (c, k), ts in times.items():
        chunks = -(-rows // min(c, rows))
        block = k if 0 < k < vocab else f"all {vocab}"
        median, least = statistics.median(ts), min(ts)
        print(f"| {c} | {chunks} | {block} | {median:.3f} s | {least:.3f} s |")


if __name__ == "__main__":
    main()
