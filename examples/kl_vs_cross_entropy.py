"""KL divergence against cross-entropy: they differ by the target's entropy only.

Use case 3 of the document this project started from. With P the target and
Q = softmax(z) the model, KL(P || Q) = H(P, Q) - H(P): the KL divergence is the
cross-entropy minus the target's entropy, which does not depend on the model.
The script shows that

1. with one-hot targets H(P) = 0, so ``kl_div(log_softmax(z), one_hot,
   reduction='batchmean')`` equals ``cross_entropy(z, labels)``, value and
   gradient (and that the starting document's ``reduction='mean'`` is off by
   the number of classes);
2. with label smoothing H(P) > 0: the values differ by that constant (the KL
   reaches 0 at the optimum, the cross-entropy H(P)), the gradients with
   respect to the model still agree;
3. what stops holding when the target itself is learned: the gradients with
   respect to the *target* differ (by log P + 1), so KL and cross-entropy are
   different objectives for a target that is trained (a learned prior, a
   teacher updated jointly).

    python examples/kl_vs_cross_entropy.py [--quick] [--out DIR]

Saves ``kl_vs_ce.png`` (training curves of both losses under label smoothing)
into ``--out`` when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import kldiv_spec.torch as kt

REQUIRES = ("torch",)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the Shannon entropy (nats); 0 log 0 = 0."""
    return -torch.special.xlogy(p, p).sum(1).mean()


def grad(
    loss_fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the loss at z and its gradient with respect to z."""
    z = z.detach().clone().requires_grad_()
    loss = loss_fn(z)
    (g,) = torch.autograd.grad(loss, z)
    return loss.detach(), g


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps (seconds)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "kldiv-examples")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny tensors: threads cost more than they give

    batch, classes = 32, 10
    z = torch.randn(batch, classes, dtype=torch.float64)
    labels = torch.randint(classes, (batch,))
    one_hot = F.one_hot(labels, classes).to(torch.float64)

    # 1. One-hot targets: KL (batchmean) = cross-entropy, values and gradients.
    ce, g_ce = grad(lambda v: F.cross_entropy(v, labels), z)
    kl, g_kl = grad(lambda v: kt.kl_div(F.log_softmax(v, 1), one_hot, reduction="batchmean"), z)
    assert torch.allclose(kl, ce, rtol=1e-13, atol=0)
    assert torch.allclose(g_kl, g_ce, rtol=1e-12, atol=1e-15)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")  # 'mean' warns, as in PyTorch
        kl_mean = kt.kl_div(F.log_softmax(z, 1), one_hot, reduction="mean")
    print(
        "1. one-hot targets, H(P) = 0:\n"
        f"   cross_entropy(z, labels)                          = {ce.item():.12f}\n"
        f"   kl_div(log_softmax(z), one_hot, 'batchmean')      = {kl.item():.12f}\n"
        f"   gradients w.r.t. z: max difference {float((g_kl - g_ce).abs().max()):.1e}\n"
        f"   KLDivLoss() with its default 'mean' gives {kl_mean.item():.6f}: "
        f"cross-entropy / {(ce / kl_mean).item():.0f} (the number of classes)"
    )

    # 2. Label smoothing: the values differ by H(P), the gradients do not.
    eps = 0.1
    smooth = one_hot * (1 - eps) + eps / classes
    ce_s, g_ce_s = grad(lambda v: F.cross_entropy(v, labels, label_smoothing=eps), z)
    kl_s, g_kl_s = grad(lambda v: kt.kl_div(F.log_softmax(v, 1), smooth, reduction="batchmean"), z)
    h = entropy(smooth)
    assert torch.allclose(ce_s - kl_s, h, rtol=1e-12, atol=0)
    assert torch.allclose(g_kl_s, g_ce_s, rtol=1e-12, atol=1e-15)
    print(
        f"\n2. label smoothing {eps}: P = 0.9 one_hot + 0.01, H(P) = {h.item():.6f}\n"
        f"   cross_entropy(..., label_smoothing={eps}) = {ce_s.item():.6f}\n"
        f"   kl_div(log_softmax(z), P, 'batchmean')   = {kl_s.item():.6f}\n"
        f"   difference = {(ce_s - kl_s).item():.6f} = H(P); gradients w.r.t. z: max difference "
        f"{float((g_kl_s - g_ce_s).abs().max()):.1e}"
    )

    # 3. A learned target: the gradients with respect to the target differ by log P + 1.
    p = torch.softmax(torch.randn(batch, classes, dtype=torch.float64), 1).requires_grad_()
    log_q = F.log_softmax(z, 1)
    (g_t_kl,) = torch.autograd.grad(kt.kl_div(log_q, p, reduction="sum"), p)
    (g_t_ce,) = torch.autograd.grad(-(p * log_q).sum(), p)
    assert torch.allclose(g_t_kl - g_t_ce, p.detach().log() + 1, rtol=1e-12, atol=1e-12)
    print(
        "\n3. a target that is itself trained (a learned prior, a teacher updated jointly):\n"
        "   d KL / d P - d CE / d P = log P + 1 (checked): the two losses pull a learned\n"
        "   target differently (KL also rewards the target's entropy), so they are\n"
        "   interchangeable only while the target is fixed"
    )

    # Training curves under label smoothing: parallel, H(P) apart.
    steps = 200 if args.quick else 2000
    x = torch.randn(512, 20)
    y = (x[:, :classes] + 0.5 * torch.randn(512, classes)).argmax(1)
    target = F.one_hot(y, classes).float() * (1 - eps) + eps / classes
    model = torch.nn.Linear(20, classes)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    curves: list[tuple[float, float]] = []
    for _ in range(steps):
        logits = model(x)
        loss_ce = F.cross_entropy(logits, y, label_smoothing=eps)
        loss_kl = kt.kl_div(F.log_softmax(logits, 1), target, reduction="batchmean")
        optimiser.zero_grad()
        loss_ce.backward()
        optimiser.step()
        curves.append((loss_ce.item(), loss_kl.item()))
    gap = [c - k for c, k in curves]
    h_target = entropy(target.double()).item()
    assert max(abs(g - h_target) for g in gap) < 1e-4
    print(
        f"\n   training a linear classifier with label smoothing, {steps} steps: "
        f"CE {curves[0][0]:.3f} -> {curves[-1][0]:.3f}, KL {curves[0][1]:.3f} -> "
        f"{curves[-1][1]:.3f}; CE - KL = H(P) = {h_target:.4f} at every step"
    )

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\nmatplotlib is not installed: no picture")
        return 0
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([c for c, _ in curves], label="cross_entropy(label_smoothing=0.1)")
    ax.plot([k for _, k in curves], label="kl_div(..., 'batchmean')")
    ax.axhline(h_target, color="gray", ls=":", label=f"H(P) = {h_target:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per sample)")
    ax.set_title("same gradients, values H(P) apart")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "kl_vs_ce.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
