"""Knowledge distillation with a temperature: what T does, why T^2, and kl_div_from_logits.

Use case 1 of the document this project started from. It shows that

1. dividing logits by a temperature T > 1 *softens* the softmax (higher entropy,
   smaller top probability) and T < 1 sharpens it; T = 1 is the plain softmax;
2. the gradient of the temperature-scaled KL with respect to the student's
   logits shrinks like 1/T^2, which the customary T^2 factor undoes;
3. ``kl_div_from_logits(s, t, temperature=T)`` is the composition
   ``T**2 * kl_div(log_softmax(s / T), softmax(t / T), reduction='batchmean')``,
   values and gradients, without materialising either distribution;
4. a student trained on the teacher's softened distribution learns it.

    python examples/distillation_temperature.py [--quick] [--out DIR]

Saves ``temperature.png`` (the teacher's distribution at several temperatures,
and the training curve) into ``--out`` when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import kldiv_spec.torch as kt

REQUIRES = ("torch",)
TEMPERATURES = (0.5, 1.0, 2.0, 4.0, 8.0)


def entropy(p: torch.Tensor) -> float:
    """Shannon entropy (nats) of one probability vector."""
    return float(-torch.special.xlogy(p, p).sum())


def composition(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """The textbook distillation loss: T^2 * batchmean KL(softmax(t/T) || softmax(s/T))."""
    log_q = F.log_softmax(s / temperature, dim=1)
    p = F.softmax(t / temperature, dim=1)
    return kt.kl_div(log_q, p, reduction="batchmean") * temperature**2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps (seconds)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "kldiv-examples")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny tensors: threads cost more than they give

    # 1. T > 1 softens: the teacher's distribution over 10 classes for one input.
    teacher_logits = torch.tensor([6.0, 3.5, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
    print("1. the teacher's softmax(z / T) for one input (10 classes):")
    print(f"      T   max prob   entropy (nats; uniform = {math.log(10):.3f})")
    rows = []
    for temperature in TEMPERATURES:
        p = F.softmax(teacher_logits / temperature, dim=0)
        rows.append((temperature, p))
        print(f"   {temperature:4.1f}     {float(p.max()):.3f}      {entropy(p):.3f}")
    entropies = [entropy(p) for _, p in rows]
    assert entropies == sorted(entropies), "entropy must grow with the temperature"
    print("   -> T > 1 softens the distribution (entropy grows with T); T < 1 sharpens it.")

    # 2. Why T^2: the gradient of the softened KL shrinks like 1/T^2.
    s = torch.randn(64, 10, dtype=torch.float64)
    t = torch.randn(64, 10, dtype=torch.float64) * 2
    print("\n2. gradient norm w.r.t. the student's logits, batchmean KL at temperature T:")
    print("      T   without T^2   with T^2")
    scaled = []
    for temperature in (1.0, 2.0, 4.0, 8.0, 16.0):
        s_ = s.clone().requires_grad_()
        plain = composition(s_, t, temperature) / temperature**2
        (grad,) = torch.autograd.grad(plain, s_)
        norm = float(grad.norm())
        scaled.append(norm * temperature**2)
        print(f"   {temperature:4.0f}    {norm:.3e}    {norm * temperature**2:.3e}")
    assert scaled[-1] / scaled[-2] > 0.95 and scaled[-1] / scaled[-2] < 1.05
    print("   -> without the factor the gradient falls like 1/T^2; with it, its scale holds.")

    # 3. kl_div_from_logits is the composition, without materialising p or q.
    s_a = s.clone().requires_grad_()
    s_b = s.clone().requires_grad_()
    fused = kt.kl_div_from_logits(s_a, t, temperature=4.0)
    textbook = composition(s_b, t, 4.0)
    torch_own = (
        F.kl_div(F.log_softmax(s / 4.0, dim=1), F.softmax(t / 4.0, dim=1), reduction="batchmean")
        * 16.0
    )
    fused.backward()
    textbook.backward()
    assert torch.allclose(fused, textbook, rtol=1e-12, atol=0)
    assert torch.allclose(fused, torch_own, rtol=1e-12, atol=0)
    assert torch.allclose(s_a.grad, s_b.grad, rtol=1e-10, atol=1e-15)
    print(
        f"\n3. kl_div_from_logits(s, t, temperature=4) = {fused.item():.12f}\n"
        f"   T^2 * kl_div(log_softmax(s/T), softmax(t/T), 'batchmean') = {textbook.item():.12f}\n"
        "   values and gradients agree (float64, rtol 1e-12 / 1e-10); "
        "the same as torch.nn.functional.kl_div"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mean_trap = (
            kt.kl_div(F.log_softmax(s / 4.0, dim=1), F.softmax(t / 4.0, dim=1), reduction="mean")
            * 16.0
        )
    assert any("batchmean" in str(w.message) for w in caught)  # PyTorch's warning, kept
    print(
        f"   reduction='mean' (KLDivLoss()'s default) gives {mean_trap.item():.6f} = "
        f"batchmean / {(textbook / mean_trap).item():.0f} classes: not the KL per sample\n"
        "   (and warns, as PyTorch does)"
    )

    # 4. Train a student on the teacher's softened outputs.
    steps = 150 if args.quick else 600
    temperature = 4.0
    d_in, classes = 20, 10
    teacher = torch.nn.Sequential(
        torch.nn.Linear(d_in, 64), torch.nn.Tanh(), torch.nn.Linear(64, classes)
    )
    student = torch.nn.Linear(d_in, classes)
    criterion = kt.KLDivFromLogitsLoss(temperature=temperature)
    optimiser = torch.optim.Adam(student.parameters(), lr=0.03)
    x_test = torch.randn(2000, d_in)
    losses = []
    for _ in range(steps):
        x = torch.randn(256, d_in)
        with torch.no_grad():
            target = teacher(x) * 3
        loss = criterion(student(x), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    with torch.no_grad():
        agree = float((student(x_test).argmax(1) == teacher(x_test).argmax(1)).float().mean())
    print(
        f"\n4. a linear student distilled from an MLP teacher, T={temperature}, {steps} steps:\n"
        f"   distillation loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
        f"top-1 agreement with the teacher on new inputs: {agree:.1%}"
    )
    assert losses[-1] < 0.5 * losses[0]

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\nmatplotlib is not installed: no picture")
        return 0
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(rows)
    for i, (temp, p) in enumerate(rows):
        xs = [c + (i - len(rows) / 2 + 0.5) * width for c in range(10)]
        left.bar(xs, p.numpy(), width=width, label=f"T = {temp:g}")
    left.set_xticks(range(10))
    left.set_xlabel("class")
    left.set_ylabel("softmax(z / T)")
    left.set_title("T > 1 softens the teacher's distribution")
    left.legend()
    right.plot(losses)
    right.set_yscale("log")
    right.set_xlabel("step")
    right.set_ylabel("T^2 * batchmean KL")
    right.set_title(f"student training, T = {temperature:g}")
    right.grid(True, alpha=0.3)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "temperature.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
