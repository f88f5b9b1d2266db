"""A VAE's latent KL with gaussian_kl, and when kl_div (KLDivLoss) applies instead.

Use case 2 of the document this project started from. It shows that

1. ``gaussian_kl(mu, logvar)`` is the VAE's KL term
   KL(N(mu, exp(logvar)) || N(0, 1)) in closed form, the same value as the
   starting document's ``0.5 * sum(exp(logvar) + mu**2 - 1 - logvar)`` per sample,
   and that a Monte Carlo estimate from samples, mean(log q(z) - log p(z)),
   converges to it (noisily: the closed form is exact and cheap);
2. feeding the *densities* at samples to ``kl_div`` is wrong: ``kl_div`` compares
   two probability vectors over the same discrete support, and weights each
   term by the target's probability, which a density at a sample is not;
3. where the latent is discrete (a categorical code), the KL term against a
   uniform prior *is* ``kl_div(log prior, posterior, reduction='batchmean')``;
4. a small VAE trains with ``gaussian_kl`` as its KL term (autograd through it).

    python examples/vae_latent_kl.py [--quick] [--out DIR]

Saves ``vae.png`` (the Monte Carlo estimate against the closed form, and the
training curves) into ``--out`` when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

import kldiv_spec
import kldiv_spec.torch as kt

REQUIRES = ("torch",)


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Log-density of the diagonal Gaussian N(mu, exp(logvar)) at z, summed over the last axis."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 / logvar.exp()).sum(-1)


class VAE(torch.nn.Module):
    """A small VAE: 2-d latent, Gaussian encoder and decoder."""

    def __init__(self, d_in: int, latent: int = 2, hidden: int = 64) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.ReLU())
        self.mu = torch.nn.Linear(hidden, latent)
        self.logvar = torch.nn.Linear(hidden, latent)
        self.decoder = torch.nn.Sequential(
            torch.nn.Linear(latent, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, d_in)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()  # reparameterisation
        return self.decoder(z), mu, logvar


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and samples (seconds)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "kldiv-examples")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny tensors: threads cost more than they give

    # 1. The closed form, the starting document's formula, and a Monte Carlo estimate.
    mu = torch.tensor([[0.5, -1.0], [2.0, 0.3]], dtype=torch.float64)
    logvar = torch.tensor([[-0.5, 0.2], [-2.0, 0.0]], dtype=torch.float64)
    closed = kldiv_spec.gaussian_kl(mu, logvar)  # batchmean: KL per sample
    seed_formula = 0.5 * torch.sum(logvar.exp() + mu**2 - 1 - logvar, 1).mean()
    assert torch.allclose(closed, seed_formula, rtol=1e-14, atol=0)
    print(
        f"1. gaussian_kl(mu, logvar) = {closed.item():.6f} (batchmean: per sample)\n"
        f"   0.5 * sum(exp(logvar) + mu^2 - 1 - logvar, 1).mean() = {seed_formula.item():.6f}"
    )
    n_max = 10_000 if args.quick else 1_000_000
    z = mu + torch.randn(n_max, *mu.shape, dtype=torch.float64) * (0.5 * logvar).exp()
    zeros = torch.zeros_like(mu)
    log_ratio = (log_normal(z, mu, logvar) - log_normal(z, zeros, zeros)).mean(-1)
    sizes = [n for n in (10, 100, 1000, 10_000, 100_000, 1_000_000) if n <= n_max]
    estimates = [log_ratio[:n].mean().item() for n in sizes]
    stderr = (log_ratio.std() / math.sqrt(n_max)).item()
    print("   Monte Carlo mean(log q(z) - log p(z)), z ~ q:")
    for n, estimate in zip(sizes, estimates, strict=True):
        print(f"   {n:>9} samples: {estimate:.6f}")
    assert abs(estimates[-1] - closed.item()) < 4 * stderr
    print(f"   -> converges to the closed form (last one within 4 standard errors, {stderr:.1e})")

    # 2. kl_div on densities at samples is not a KL estimate.
    z1 = z[:1000, 0]  # 1000 samples of the first row's q
    log_q = log_normal(z1, mu[0], logvar[0])
    log_p = log_normal(z1, zeros[0], zeros[0])
    wrong = kldiv_spec.kl_div(log_p, log_q, reduction="sum", log_target=True)
    right = (log_q - log_p).mean()
    exact = kldiv_spec.gaussian_kl(mu[:1], logvar[:1])
    print(
        f"\n2. on 1000 samples z ~ q of the first row (exact KL {exact.item():.4f}):\n"
        f"   mean(log q(z) - log p(z)) = {right.item():.4f}  (the Monte Carlo estimate)\n"
        f"   kl_div(log p(z), log q(z), 'sum', log_target=True) = {wrong.item():.4f}"
        "  (densities as if they were probabilities: meaningless)"
    )
    assert abs(right.item() - exact.item()) < 0.2 < abs(wrong.item() - exact.item())

    # 3. A discrete latent: the KL to a uniform prior is kl_div itself.
    codes = 8
    posterior = torch.softmax(torch.randn(4, codes, dtype=torch.float64) * 2, dim=1)
    log_prior = torch.full((4, codes), -math.log(codes), dtype=torch.float64)
    kl = kt.kl_div(log_prior, posterior, reduction="batchmean")  # KL(posterior || prior)
    entropy = -torch.special.xlogy(posterior, posterior).sum(1).mean()
    assert torch.allclose(kl, math.log(codes) - entropy, rtol=1e-13, atol=0)
    print(
        f"\n3. a categorical latent with {codes} codes, uniform prior:\n"
        f"   kl_div(log prior, posterior, 'batchmean') = {kl.item():.6f} "
        f"= log {codes} - H(posterior) = {(math.log(codes) - entropy).item():.6f}"
    )

    # 4. Train a VAE on points near a circle in 10 dimensions.
    steps = 300 if args.quick else 3000
    d_in = 10
    embed = torch.randn(2, d_in)

    def batch(n: int) -> torch.Tensor:
        angle = torch.rand(n, 1) * 2 * math.pi
        circle = torch.cat([angle.cos(), angle.sin()], dim=1)
        return circle @ embed + 0.05 * torch.randn(n, d_in)

    vae = VAE(d_in)
    optimiser = torch.optim.Adam(vae.parameters(), lr=3e-3)
    history = []
    for _ in range(steps):
        x = batch(128)
        reconstruction, mu_x, logvar_x = vae(x)
        recon = ((reconstruction - x) ** 2).sum(1).mean()
        kl_term = kldiv_spec.gaussian_kl(mu_x, logvar_x)  # per sample, autograd through it
        loss = recon + kl_term
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append((recon.item(), kl_term.item()))
    first, last = history[0], history[-1]
    print(
        f"\n4. a VAE (2-d latent) on noisy points of a circle in {d_in}-d, {steps} steps:\n"
        f"   reconstruction {first[0]:.3f} -> {last[0]:.3f}; "
        f"KL term {first[1]:.3f} -> {last[1]:.3f}"
    )
    assert sum(last) < 0.5 * sum(first)

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\nmatplotlib is not installed: no picture")
        return 0
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.semilogx(sizes, estimates, marker="o", label="Monte Carlo mean(log q - log p)")
    left.axhline(closed.item(), color="k", ls="--", label="gaussian_kl (closed form)")
    left.set_xlabel("samples")
    left.set_ylabel("KL per sample (nats)")
    left.set_title("closed form against sampling")
    left.legend()
    steps_axis = range(1, steps + 1)
    right.plot(steps_axis, [h[0] for h in history], label="reconstruction")
    right.plot(steps_axis, [h[1] for h in history], label="gaussian_kl (KL term)")
    right.set_yscale("log")
    right.set_xlabel("step")
    right.set_title("VAE training")
    right.legend()
    right.grid(True, alpha=0.3)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "vae.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
