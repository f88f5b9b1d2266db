"""Run by ``tests/test_hidden.py``: the class-sharded loss on N gloo processes equals one process.

    python tests/_hidden_sharded_check.py NPROCS DIR

Every rank builds the same operands (float64), takes its slice of the classes of
both output layers (uneven slices: the classes split at random points), computes
``kl_div_from_hidden_sharded`` and its gradients, and compares them with the
single-process ``kl_div_from_hidden`` on the full weights: the loss and the hidden
states' gradient on every rank, the weight's and bias's gradients slice by slice.
Several option sets are checked (reductions, direction, mask and labels, teacher
logits, chunks of a few rows). Prints ``rank R: OK (K cases)`` per rank; a failure
raises (a non-zero exit status).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CASES = [
    {"temperature": 2.0},
    {"temperature": 0.7, "reduction": "sum", "direction": "reverse"},
    {"reduction": "rowmean", "labels": True, "memory_budget": 3 * 6 * 8 * 100},
    {"reduction": "mean", "mask": True, "scale_by_temperature_squared": False},
    {"temperature": 1.5, "teacher_logits": True},
]


def _operands(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows, width, t_width, vocab = (3, 7), 5, 4, 97
    return {
        "h_s": torch.randn(*rows, width, generator=g, dtype=torch.float64),
        "w_s": torch.randn(vocab, width, generator=g, dtype=torch.float64),
        "b_s": torch.randn(vocab, generator=g, dtype=torch.float64),
        "h_t": torch.randn(*rows, t_width, generator=g, dtype=torch.float64),
        "w_t": torch.randn(vocab, t_width, generator=g, dtype=torch.float64),
        "b_t": torch.randn(vocab, generator=g, dtype=torch.float64),
        "labels": torch.where(
            torch.rand(rows, generator=g) < 0.3,
            torch.tensor(-100),
            torch.randint(0, vocab, rows, generator=g),
        ),
        "mask": torch.rand(rows, generator=g) < 0.7,
    }


def _run(case: dict, ops: dict, sl: slice | None, group: object = None) -> list[torch.Tensor]:
    import kldiv_spec.torch as kt

    def cut(a: torch.Tensor) -> torch.Tensor:
        return a if sl is None else a[..., sl].contiguous() if a.ndim == 1 else a[sl]

    h_s = ops["h_s"].clone().requires_grad_()
    w_s = cut(ops["w_s"]).clone().requires_grad_()
    b_s = cut(ops["b_s"]).clone().requires_grad_()
    options = {k: v for k, v in case.items() if k not in ("labels", "mask", "teacher_logits")}
    if case.get("labels"):
        options["labels"] = ops["labels"]
    if case.get("mask"):
        options["mask"] = ops["mask"]
    teacher: dict = {}
    if case.get("teacher_logits"):
        logits = ops["h_t"] @ ops["w_t"].T + ops["b_t"]
        teacher["teacher_logits"] = logits if sl is None else logits[..., sl].contiguous()
        args = (h_s, w_s)
    else:
        teacher["teacher_bias"] = cut(ops["b_t"])
        args = (h_s, w_s, ops["h_t"], cut(ops["w_t"]))
    if sl is None:
        loss = kt.kl_div_from_hidden(*args, student_bias=b_s, **teacher, **options)
    else:
        loss = kt.kl_div_from_hidden_sharded(
            *args, group=group, student_bias=b_s, **teacher, **options
        )
    loss.backward()
    return [loss.detach(), h_s.grad, w_s.grad, b_s.grad]


def _worker(rank: int, nprocs: int, init: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=nprocs)
    ops = _operands()
    vocab = ops["w_s"].shape[0]
    cuts = sorted(torch.randperm(vocab - 1, generator=torch.Generator().manual_seed(1))[
        : nprocs - 1
    ].add(1).tolist())  # fmt: skip
    bounds = [0, *cuts, vocab]
    sl = slice(bounds[rank], bounds[rank + 1])
    for case in CASES:
        full = _run(case, ops, None)
        mine = _run(case, ops, sl)
        want = [full[0], full[1], full[2][sl], full[3][sl]]
        for name, a, b in zip(("loss", "grad_h", "grad_w", "grad_b"), mine, want, strict=True):
            scale = float(b.abs().max()) if b.numel() else 0.0
            if not torch.allclose(a, b, rtol=1e-10, atol=1e-12 * max(scale, 1.0)):
                msg = f"rank {rank}, case {case}: {name} differs by {(a - b).abs().max()}"
                raise AssertionError(msg)
    print(f"rank {rank}: OK ({len(CASES)} cases)", flush=True)
    # No rank tears its connections down while another may still be finishing the last
    # collective's traffic: gloo aborts a process whose peer closes under it.
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    nprocs, folder = int(sys.argv[1]), Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    init = f"file://{folder / 'rendezvous'}"
    mp.spawn(_worker, args=(nprocs, init), nprocs=nprocs, join=True)


if __name__ == "__main__":
    main()
