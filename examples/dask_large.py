"""A KL divergence over an array larger than one chunk, lazily with Dask, then computed.

``kldiv_spec.kl_div`` on Dask arrays builds a task graph and computes nothing:
argument checks use only shapes and dtypes. ``.compute()`` then evaluates it
chunk by chunk (here 8 chunks of 8 rows each), so the pointwise loss is never
held in memory all at once. The result equals the NumPy computation on the
same data.

    python examples/dask_large.py
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np

import kldiv_spec


def log_softmax(z: da.Array) -> da.Array:
    z = z - z.max(axis=-1, keepdims=True)
    return z - da.log(da.exp(z).sum(axis=-1, keepdims=True))


def main() -> None:
    rows, classes, chunk_rows = 64, 20_000, 8
    rng = da.random.default_rng(0)
    student = rng.standard_normal((rows, classes), chunks=(chunk_rows, classes))
    teacher = rng.standard_normal((rows, classes), chunks=(chunk_rows, classes))
    log_q = log_softmax(student)  # input: log Q
    p = da.exp(log_softmax(teacher))  # target: P

    loss = kldiv_spec.kl_div(log_q, p, reduction="batchmean")  # lazy: nothing computed yet
    grad_log_q, _ = kldiv_spec.kl_div_backward(1.0, log_q, p, reduction="batchmean")
    assert isinstance(loss, da.Array) and isinstance(grad_log_q, da.Array)
    print(f"lazy loss: {len(dict(loss.__dask_graph__()))} tasks over {log_q.npartitions} chunks")

    with dask.config.set(scheduler="threads", num_workers=2):
        value, grad, log_q_np, p_np = dask.compute(loss, grad_log_q, log_q, p)
    with kldiv_spec.use_reference():
        expected = kldiv_spec.kl_div(log_q_np, p_np, reduction="batchmean")
    assert np.isclose(value, expected, rtol=1e-12, atol=0.0), (value, expected)
    assert np.allclose(grad, -p_np / rows)
    print(
        f"batchmean KL over {rows} x {classes}: {float(value):.6f} (NumPy: {float(expected):.6f})"
    )


if __name__ == "__main__":
    main()
