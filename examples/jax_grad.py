"""Gradients of the KL loss with ``jax.grad`` under ``jax.jit``.

``kldiv_spec.kl_div`` on JAX arrays carries its analytic gradient as a
``jax.custom_vjp``, so ``jax.grad`` gives the specified derivatives, and the
whole step compiles with ``jax.jit``. The script fits the logits of a model
distribution Q to a target P and checks the gradient against the closed form
``(softmax(z) - p) / B``. Last, ``jax.vmap`` gives the KL divergence of each
row: mapped over rows, each call sees one 1-D row, so the per-row divergence is
``reduction="sum"`` (``"batchmean"`` would divide each row by its length, its
``shape[0]``).

    python examples/jax_grad.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import kldiv_spec


def loss(logits: jax.Array, p: jax.Array) -> jax.Array:
    log_q = jax.nn.log_softmax(logits, axis=-1)  # input: log Q
    return kldiv_spec.kl_div(log_q, p, reduction="batchmean")  # KL(P || Q) per row


@jax.jit
def step(logits: jax.Array, p: jax.Array) -> tuple[jax.Array, jax.Array]:
    value, grad = jax.value_and_grad(loss)(logits, p)
    return logits - 12.0 * grad, value


def main() -> None:
    key_p, key_z = jax.random.split(jax.random.key(0))
    batch, classes = 4, 6
    p = jax.nn.softmax(2.0 * jax.random.normal(key_p, (batch, classes)), axis=-1)
    logits = jax.random.normal(key_z, (batch, classes))

    grad = jax.jit(jax.grad(loss))(logits, p)
    expected = (jax.nn.softmax(logits, axis=-1) - p) / batch
    assert jnp.allclose(grad, expected, atol=1e-6), (grad, expected)

    first = float(loss(logits, p))
    start = logits
    for _ in range(500):
        logits, _ = step(logits, p)
    last = float(loss(logits, p))
    assert last < 1e-4 < first, (first, last)
    print("jax.grad matches (softmax(z) - p) / B")
    print(f"batchmean KL(P || Q) under jax.jit: {first:.4f} -> {last:.2e}")

    per_row = jax.jit(jax.vmap(lambda z, q: kldiv_spec.kl_div(z, q, reduction="sum")))
    rows = per_row(jax.nn.log_softmax(start, axis=-1), p)  # before the fit
    assert rows.shape == (batch,) and jnp.allclose(rows.mean(), first, rtol=1e-5)
    print("per-row KL with jax.vmap, before the fit: " + ", ".join(f"{r:.4f}" for r in rows))


if __name__ == "__main__":
    main()
