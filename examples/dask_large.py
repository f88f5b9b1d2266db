"""A KL divergence over an array larger than one chunk, lazily with Dask, then computed.

``kldiv_spec.kl_div`` on Dask arrays builds a task graph and computes nothing:
argument checks use only shapes and dtypes. ``.compute()`` then evaluates it
chunk by chunk (here 8 chunks of 8 rows each), so the pointwise loss is never
held in memory all at once. The result equals the NumPy computation on the
same data.

By default the local threads compute the graph. ``--scheduler`` sends the same
graph to a ``dask.distributed`` cluster instead: ``local`` starts a
``LocalCluster`` of two worker processes with bounded memory, and a scheduler
address (``tcp://host:8786``) or a scheduler file (``/shared/scheduler.json``,
written by ``dask scheduler --scheduler-file ...``) connects to a running one.
The code that builds the loss does not change.

    python examples/dask_large.py
    python examples/dask_large.py --scheduler local
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

import kldiv_spec


def log_softmax(z: da.Array) -> da.Array:
    z = z - z.max(axis=-1, keepdims=True)
    return z - da.log(da.exp(z).sum(axis=-1, keepdims=True))


@contextlib.contextmanager
def scheduler(where: str) -> Iterator[dict[str, Any]]:
    """Yield the keyword arguments of ``dask.compute`` for ``where``, closing what it opens."""
    if where == "threads":
        yield {"scheduler": "threads", "num_workers": 2}
        return
    from dask.distributed import Client, LocalCluster

    with contextlib.ExitStack() as stack:
        if where == "local":
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=2,
                    threads_per_worker=1,
                    memory_limit="1GiB",
                    dashboard_address=":0",  # a free port: 8787 may be taken
                    # one NumPy fast-path thread per single-threaded worker
                    env={"KLDIV_SPEC_NUM_THREADS": "1"},
                )
            )
            client = stack.enter_context(Client(cluster))
        elif Path(where).is_file():
            client = stack.enter_context(Client(scheduler_file=where))
        else:
            client = stack.enter_context(Client(where))
        print(f"computing on {client.scheduler.address} ({len(client.nthreads())} workers)")
        yield {"scheduler": client}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--scheduler",
        default="threads",
        help="threads (default), local (a LocalCluster), an address or a scheduler file",
    )
    args = parser.parse_args()
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

    with scheduler(args.scheduler) as how:
        value, grad, log_q_np, p_np = dask.compute(loss, grad_log_q, log_q, p, **how)
    with kldiv_spec.use_reference():
        expected = kldiv_spec.kl_div(log_q_np, p_np, reduction="batchmean")
    assert np.isclose(value, expected, rtol=1e-12, atol=0.0), (value, expected)
    assert np.allclose(grad, -p_np / rows)
    print(
        f"batchmean KL over {rows} x {classes}: {float(value):.6f} (NumPy: {float(expected):.6f})"
    )


if __name__ == "__main__":
    main()
