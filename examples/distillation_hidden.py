"""Distilling a causal LM's output head from hidden states, without holding the logits.

A small causal language model (random weights: an embedding, one GRU layer, an
output head over the vocabulary) is the teacher; a narrower student learns to
match its next-token distributions with

    kldiv_spec.torch.KLDivFromHiddenLoss(temperature=2.0, reduction="rowmean")

called on the two models' last hidden states and output weights, so neither model's
logits are ever held in full: the loss walks the tokens in chunks (``docs/hidden.md``).
The script shows that

1. the loss equals ``kl_div_from_logits`` of the materialised logits, value and
   gradients, and padding tokens (``labels == -100``) drop out;
2. a few training steps (with a progress bar) lower it;
3. the extra peak memory of one distillation step, measured in a subprocess per
   point, grows with the vocabulary for the composition (logits, ``log_softmax``,
   ``kl_div``) and for logits + ``kl_div_from_logits``, and stays at the chunk's
   budget (``memory_budget=32 MiB`` here) for ``kl_div_from_hidden``.

    python examples/distillation_hidden.py [--quick] [--out DIR]

Saves ``hidden.png`` (the training curve and peak memory against vocabulary size)
into ``--out`` when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import kldiv_spec.torch as kt

REQUIRES = ("torch",)
T = 2.0
METHODS = ("composition", "logits + kl_div_from_logits", "kl_div_from_hidden")


class TinyLM(torch.nn.Module):
    """Embedding, one GRU layer, and an output head ``(vocab, width)``."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.rnn = torch.nn.GRU(width, width, batch_first=True)
        self.head = torch.nn.Linear(width, vocab)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return the last hidden states ``(batch, length, width)``."""
        return self.rnn(self.embed(tokens))[0]


def progress(step: int, total: int, loss: float) -> None:
    """A one-line progress bar on stderr."""
    done = int(30 * step / total)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {step}/{total} loss {loss:.4f}")
    if step == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def check_definition(vocab: int) -> None:
    """The loss is the from-logits loss of the logits, and padding drops out."""
    torch.manual_seed(0)
    teacher, student = TinyLM(vocab, 32), TinyLM(vocab, 16)
    tokens = torch.randint(0, vocab, (4, 12))
    labels = tokens.roll(-1, dims=1)
    labels[:, -3:] = -100  # padding
    with torch.no_grad():
        h_t = teacher.hidden(tokens)
    h_s = student.hidden(tokens)
    loss = kt.kl_div_from_hidden(
        h_s, student.head.weight, h_t, teacher.head.weight,
        student_bias=student.head.bias, teacher_bias=teacher.head.bias,
        temperature=T, reduction="rowmean", labels=labels, memory_budget=1 << 16,
    )  # fmt: skip
    grads = torch.autograd.grad(loss, [student.head.weight, student.head.bias])
    s, t = student.head(h_s), teacher.head(h_t).detach()
    same = kt.kl_div_from_logits(s, t, temperature=T, reduction="rowmean", mask=labels != -100)
    want = torch.autograd.grad(same, [student.head.weight, student.head.bias])
    assert torch.allclose(loss, same, rtol=1e-5)
    for g, w in zip(grads, want, strict=True):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6)
    print(f"loss {loss.item():.5f} = kl_div_from_logits of the logits: same value and gradients")


def train(vocab: int, steps: int) -> list[float]:
    """Distil the teacher's head into the student; return the losses."""
    torch.manual_seed(1)
    teacher, student = TinyLM(vocab, 64), TinyLM(vocab, 32)
    criterion = kt.KLDivFromHiddenLoss(temperature=T, reduction="rowmean")
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for step in range(1, steps + 1):
        tokens = torch.randint(0, vocab, (8, 32))
        with torch.no_grad():
            h_t = teacher.hidden(tokens)
        loss = criterion(
            student.hidden(tokens), student.head.weight, h_t, teacher.head.weight,
            student_bias=student.head.bias, teacher_bias=teacher.head.bias,
        )  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        progress(step, steps, losses[-1])
    return losses


_MEASURE = """
import json, sys, torch, torch.nn.functional as F
import kldiv_spec.torch as kt
method, tokens, width, vocab, budget = sys.argv[1], *map(int, sys.argv[2:])
torch.manual_seed(0)
h_s = torch.randn(tokens, width, requires_grad=True)
w_s = (torch.randn(vocab, width) / width**0.5).requires_grad_()
h_t, w_t = torch.randn(tokens, width), torch.randn(vocab, width) / width**0.5
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def step():
    h_s.grad = w_s.grad = None
    if method == "kl_div_from_hidden":
        loss = kt.kl_div_from_hidden(h_s, w_s, h_t, w_t, temperature=2.0, memory_budget=budget)
    else:
        s = h_s @ w_s.T
        with torch.no_grad():
            t = h_t @ w_t.T
        if method == "composition":
            log_q, p = F.log_softmax(s / 2, -1), F.softmax(t / 2, -1)
            loss = 4.0 * F.kl_div(log_q, p, reduction="batchmean")
        else:
            loss = kt.kl_div_from_logits(s, t, temperature=2.0)
    loss.backward()
step()
h_s.grad = w_s.grad = None
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
step()
print(json.dumps(status("VmHWM") - base - (h_s.numel() + w_s.numel()) * 4))
"""


#: The chunks' memory budget of kl_div_from_hidden in the measurement: 32 MiB.
BUDGET = 32 << 20


def peak_memory(method: str, tokens: int, width: int, vocab: int) -> float:
    """Extra peak memory (MB) of one step, in a fresh process (Linux's VmHWM)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, method, *map(str, (tokens, width, vocab, BUDGET))],
        capture_output=True, text=True, env=env, check=True, timeout=600,
    )  # fmt: skip
    return int(done.stdout.strip().splitlines()[-1]) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, smaller sizes")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "kldiv-examples")
    args = parser.parse_args(argv)
    check_definition(vocab=300)
    steps = 15 if args.quick else 200
    losses = train(vocab=2000 if args.quick else 8000, steps=steps)
    assert losses[-1] < losses[0]
    print(f"training: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {steps} steps")

    tokens, width = (512, 64) if args.quick else (2048, 256)
    vocabs = [4000, 16000, 32000] if args.quick else [8000, 32000, 64000, 128256]
    memory: dict[str, list[float]] = {m: [] for m in METHODS}
    if Path("/proc/self/clear_refs").exists():
        for vocab in vocabs:
            for method in METHODS:
                memory[method].append(peak_memory(method, tokens, width, vocab))
            row = ", ".join(f"{m} {memory[m][-1]:.0f} MB" for m in METHODS)
            print(f"V = {vocab}: extra peak memory {row} (memory_budget 32 MiB)")
        ours, composition = memory["kl_div_from_hidden"][-1], memory["composition"][-1]
        assert ours < composition / 2
        print(f"at V = {vocabs[-1]}: kl_div_from_hidden needs {ours / composition:.2f} of it")
    else:
        print("no /proc/self/clear_refs (not Linux): peak memory not measured")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no picture")
        return 0
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(range(1, steps + 1), losses)
    left.set(xlabel="step", ylabel="loss (T^2 KL per token)", title="distilling the head")
    for method in METHODS:
        if memory[method]:
            right.plot(vocabs, memory[method], marker="o", label=method)
    right.set(xlabel="vocabulary size", ylabel="extra peak memory (MB)",
              title=f"one step, {tokens} tokens x H {width}")  # fmt: skip
    right.legend()
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "hidden.png"
    fig.savefig(path, dpi=100)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
