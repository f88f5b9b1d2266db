"""Policy distillation: a student policy learns a teacher's action distributions.

Use case 4 of the document this project started from. A teacher policy (a
network over states) gives log-probabilities of actions; a smaller student is
trained to match them on a batch of visited states with

    kl_div(student_log_probs, teacher_log_probs, reduction='batchmean', log_target=True)

KL(teacher || student) per state, mass-covering: the student is penalised
wherever the teacher would act and it would not. The script shows that

1. ``log_target=True`` on the teacher's log-probabilities gives the value and
   gradients of the probability form (``target = softmax``), without the
   ``exp`` a probability target needs;
2. actions masked out (illegal in a state) need care: where both policies
   give an action log-probability ``-inf``, ``kl_div`` gives NaN, with
   ``log_target=True`` (exp(-inf) * (-inf - (-inf))) and without it
   (0 * -inf): PyTorch's semantics, kept by the specification.
   ``kl_div_from_logits`` on the masked logits gives 0 for such actions, and so
   does the composition when the mask value is a large finite negative number;
3. training the student on the teacher's states: the loss falls and the
   student's greedy action matches the teacher's.

    python examples/policy_distillation.py [--quick] [--out DIR]

Saves ``policy.png`` (the training curve and both policies on a few states)
into ``--out`` when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import kldiv_spec.torch as kt

REQUIRES = ("torch",)
ACTIONS = 6
STATE = 8


def legal_actions(states: torch.Tensor) -> torch.Tensor:
    """A boolean (batch, actions) mask: action a is illegal where state[a] < -1 (never all)."""
    legal = states[:, :ACTIONS] > -1.0
    legal[:, 0] = True  # "no-op" is always legal
    return legal


def masked_logits(logits: torch.Tensor, legal: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~legal, float("-inf"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps (seconds)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "kldiv-examples")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny tensors: threads cost more than they give

    teacher = torch.nn.Sequential(
        torch.nn.Linear(STATE, 64), torch.nn.Tanh(), torch.nn.Linear(64, ACTIONS)
    ).double()
    states = torch.randn(256, STATE, dtype=torch.float64)

    # 1. log_target=True on log-probabilities = the probability form.
    with torch.no_grad():
        teacher_log_probs = F.log_softmax(teacher(states) * 2, dim=1)
    z = torch.randn(256, ACTIONS, dtype=torch.float64, requires_grad=True)
    a = kt.kl_div(F.log_softmax(z, 1), teacher_log_probs, reduction="batchmean", log_target=True)
    (g_a,) = torch.autograd.grad(a, z)
    b = kt.kl_div(F.log_softmax(z, 1), teacher_log_probs.exp(), reduction="batchmean")
    (g_b,) = torch.autograd.grad(b, z)
    assert torch.allclose(a, b, rtol=1e-13, atol=0)
    assert torch.allclose(g_a, g_b, rtol=1e-11, atol=1e-16)
    print(
        "1. KL(teacher || student) per state, 256 states, 6 actions:\n"
        f"   log_target=True on the teacher's log-probabilities: {a.item():.12f}\n"
        f"   the probability form, target = exp(log-probabilities): {b.item():.12f}\n"
        "   same value and gradients"
    )

    # 2. Illegal actions: -inf log-probabilities give NaN with log_target=True.
    legal = legal_actions(states)
    with torch.no_grad():
        t_logits = masked_logits(teacher(states) * 2, legal)
        s_logits = masked_logits(torch.randn(256, ACTIONS, dtype=torch.float64), legal)
    log_p, log_q = F.log_softmax(t_logits, 1), F.log_softmax(s_logits, 1)
    with_log_target = kt.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    prob_form = kt.kl_div(log_q, log_p.exp(), reduction="batchmean")
    from_logits = kt.kl_div_from_logits(s_logits, t_logits)
    # The composition's fix: a large finite mask value, whose probability underflows to 0.
    big = -1e4
    log_p_finite = F.log_softmax(t_logits.clamp(min=big), 1)
    log_q_finite = F.log_softmax(s_logits.clamp(min=big), 1)
    finite = kt.kl_div(log_q_finite, log_p_finite, reduction="batchmean", log_target=True)
    assert torch.isnan(with_log_target) and torch.isnan(prob_form)
    assert torch.isfinite(from_logits)
    assert torch.allclose(finite, from_logits, rtol=1e-12, atol=0)
    print(
        f"\n2. {int((~legal).sum())} of {legal.numel()} (state, action) pairs illegal, "
        "logits masked with -inf in both policies:\n"
        f"   kl_div(log_q, log_p, log_target=True)  = {with_log_target.item()}"
        "  (exp(-inf) * (-inf - (-inf)) = 0 * NaN)\n"
        f"   kl_div(log_q, exp(log_p))              = {prob_form.item()}"
        "  (0 * log q = 0 * -inf)\n"
        f"   kl_div_from_logits(s_logits, t_logits) = {from_logits.item():.12f}"
        "  (masked actions contribute 0)\n"
        f"   masking with {big:g} instead of -inf, log_target=True: {finite.item():.12f}"
    )

    # 3. Distil the teacher into a smaller student on its states.
    steps = 300 if args.quick else 3000
    student = torch.nn.Sequential(
        torch.nn.Linear(STATE, 16), torch.nn.Tanh(), torch.nn.Linear(16, ACTIONS)
    ).double()
    optimiser = torch.optim.Adam(student.parameters(), lr=1e-2)
    replay = torch.randn(4096, STATE, dtype=torch.float64)  # states the teacher visited
    with torch.no_grad():
        replay_log_probs = F.log_softmax(teacher(replay) * 2, dim=1)
    losses = []
    for step in range(steps):
        index = torch.randint(len(replay), (256,), generator=torch.Generator().manual_seed(step))
        log_q = F.log_softmax(student(replay[index]), dim=1)
        loss = kt.kl_div(log_q, replay_log_probs[index], reduction="batchmean", log_target=True)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    test = torch.randn(2000, STATE, dtype=torch.float64)
    with torch.no_grad():
        agree = (student(test).argmax(1) == teacher(test).argmax(1)).double().mean().item()
    print(
        f"\n3. a student with 16 hidden units distilled from a teacher with 64, {steps} steps:\n"
        f"   KL per state {losses[0]:.4f} -> {losses[-1]:.4f}; greedy action agrees with "
        f"the teacher's on {agree:.1%} of new states"
    )
    assert losses[-1] < 0.25 * losses[0]

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\nmatplotlib is not installed: no picture")
        return 0
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
    axes[0].plot(losses)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title("KL(teacher || student) per state")
    axes[0].grid(True, alpha=0.3)
    with torch.no_grad():
        p = F.softmax(teacher(test[:3]) * 2, 1).numpy()
        q = F.softmax(student(test[:3]), 1).numpy()
    xs = np.arange(ACTIONS)
    for k, ax in enumerate(axes[1:]):
        ax.bar(xs - 0.2, p[k], width=0.4, label="teacher")
        ax.bar(xs + 0.2, q[k], width=0.4, label="student")
        ax.set_xticks(range(ACTIONS))
        ax.set_xlabel("action")
        ax.set_title(f"policy in a new state {k + 1}")
    axes[1].legend()
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "policy.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
