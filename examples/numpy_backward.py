"""Fit a distribution q to a target p by gradient descent, on NumPy, with ``kl_div_backward``.

NumPy has no autograd, so the gradient comes from ``kldiv_spec.kl_div_backward``
and the chain rule through ``log_softmax`` is written by hand: for
``x = log_softmax(z)`` and an upstream gradient ``g`` on ``x``,
``dL/dz = g - softmax(z) * sum(g)`` along the class axis. For the KL loss this
is ``(q - p) / B`` per row, which the script checks.

    python examples/numpy_backward.py
"""

from __future__ import annotations

import numpy as np

import kldiv_spec


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def main() -> None:
    rng = np.random.default_rng(0)
    batch, classes = 8, 5
    p = np.exp(log_softmax(2.0 * rng.standard_normal((batch, classes))))  # the target P
    z = np.zeros((batch, classes))  # logits of the model Q, starting uniform
    learning_rate = 2.0 * batch  # 'batchmean' divides the gradient by the batch size

    first = float(kldiv_spec.kl_div(log_softmax(z), p, reduction="batchmean"))
    for _ in range(500):
        x = log_softmax(z)
        grad_x, _ = kldiv_spec.kl_div_backward(1.0, x, p, reduction="batchmean")
        grad_z = grad_x - np.exp(x) * grad_x.sum(axis=-1, keepdims=True)
        z -= learning_rate * grad_z
    x = log_softmax(z)
    last = float(kldiv_spec.kl_div(x, p, reduction="batchmean"))

    grad_x, grad_p = kldiv_spec.kl_div_backward(1.0, x, p, reduction="batchmean")
    assert np.allclose(grad_x, -p / batch)  # d/dx of batchmean KL is -p / B
    assert np.allclose(grad_p, (np.log(p) + 1 - x) / batch)
    assert np.allclose(grad_x - np.exp(x) * grad_x.sum(-1, keepdims=True), (np.exp(x) - p) / batch)
    assert last < 1e-6 < first, (first, last)
    print(f"batchmean KL(P || Q): {first:.4f} -> {last:.2e}")
    print(f"max |q - p| = {np.abs(np.exp(x) - p).max():.1e}")


if __name__ == "__main__":
    main()
