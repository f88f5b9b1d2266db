"""Knowledge distillation with ``kldiv_spec.torch.KLDivLoss`` (temperature 4, batchmean).

A small teacher network (fixed, random) labels random inputs; a student of the
same shape learns to match the teacher's *softened* distribution. The loss is

    T**2 * KL(softmax(teacher / T) || softmax(student / T))   per sample,

computed as ``KLDivLoss(reduction="batchmean")(log_softmax(s / T), softmax(t / T))``.
A temperature T > 1 flattens both distributions, so the student also learns
how the teacher ranks the wrong classes; the T**2 factor keeps the gradient
scale independent of T (Hinton et al., 2015).
``kt.kl_div_from_logits(student, teacher, temperature=T)`` computes the same value
straight from the logits, without materialising the two softmaxes
(examples/distillation_temperature.py uses it); the end of this script checks
that both agree. Runs in a few seconds on a CPU.

    python examples/distillation_torch.py
"""

from __future__ import annotations

import torch

import kldiv_spec.torch as kt

TEMPERATURE = 4.0
STEPS = 200


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    n_features, n_classes = 20, 10
    teacher = torch.nn.Sequential(
        torch.nn.Linear(n_features, 64), torch.nn.Tanh(), torch.nn.Linear(64, n_classes)
    )
    student = torch.nn.Sequential(
        torch.nn.Linear(n_features, 64), torch.nn.Tanh(), torch.nn.Linear(64, n_classes)
    )
    teacher.requires_grad_(False)
    criterion = kt.KLDivLoss(reduction="batchmean")
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    inputs = torch.randn(256, n_features)

    def distillation_loss(x: torch.Tensor) -> torch.Tensor:
        log_q = torch.log_softmax(student(x) / TEMPERATURE, dim=-1)  # input: log Q (student)
        p = torch.softmax(teacher(x) / TEMPERATURE, dim=-1)  # target: P (teacher)
        return criterion(log_q, p) * TEMPERATURE**2

    with torch.no_grad():
        first = distillation_loss(inputs).item()
    for _ in range(STEPS):
        batch = inputs[torch.randint(0, len(inputs), (64,))]
        optimizer.zero_grad()
        distillation_loss(batch).backward()
        optimizer.step()

    with torch.no_grad():
        last = distillation_loss(inputs).item()
        log_q = torch.log_softmax(student(inputs) / TEMPERATURE, dim=-1)
        p = torch.softmax(teacher(inputs) / TEMPERATURE, dim=-1)
        ours = criterion(log_q, p)
        theirs = torch.nn.functional.kl_div(log_q, p, reduction="batchmean")
        fused = kt.kl_div_from_logits(
            student(inputs), teacher(inputs), temperature=TEMPERATURE, reduction="batchmean"
        )
        agreement = (student(inputs).argmax(-1) == teacher(inputs).argmax(-1)).float().mean()
    assert last < first / 10, (first, last)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-7), (ours, theirs)
    assert torch.allclose(fused, ours * TEMPERATURE**2, rtol=1e-4, atol=1e-7), (fused, ours)
    print(f"distillation loss (T^2 * batchmean KL, T={TEMPERATURE:g}): {first:.4f} -> {last:.4f}")
    print(f"student agrees with the teacher's top class on {agreement:.0%} of inputs")
    print("kldiv_spec.torch.KLDivLoss matches torch.nn.functional.kl_div")
    print("kldiv_spec.torch.kl_div_from_logits gives the same loss from the logits")


if __name__ == "__main__":
    main()
