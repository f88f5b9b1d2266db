r"""The KL loss over more data than fits in memory, on a dask.distributed cluster.

The two float32 operands (``input``: negative log-probability-like values;
``target``: values in [0, 1) with about 1% exact zeros; not normalised rows,
which changes nothing in the cost of the loss) are generated lazily, chunk by
chunk, by a ``map_blocks`` generator seeded with the chunk's index: both
operands of a chunk come from one task (a ``(2, rows, cols)`` block), so a
worker never fetches one operand from another, and nothing is materialised
beyond the chunks in flight. ``kldiv_spec.kl_div(x, t, reduction="batchmean")``
on them is one lazy reduction tree; a ``LocalCluster`` of worker processes with
a bounded ``memory_limit`` computes it. Three timings:

* **cluster, loss**: generate every chunk and reduce it with the loss (each
  chunk through the NumPy fast path inside a worker);
* **cluster, generation only**: the same graph with the loss replaced by a
  constant per chunk: generating data and scheduling, which the loss does not
  cost; the difference of the two is what the loss itself costs;
* **single process, NumPy**: the same chunks, generated and then reduced with
  ``kldiv_spec.kl_div`` on NumPy (its thread pool over every core) one after
  the other in this process, on the first ``--numpy-chunks`` chunks,
  extrapolated to the whole size.

Throughput is bytes of input (both operands) per second, in GB/s (1e9 bytes).
Peak resident memory of each worker process is read after the run
(``getrusage``). ``--repeats`` rounds each run the three, one after the other
(so that a change of load on a shared machine affects all three alike); the
report gives the median and the min-max spread over the rounds.

    python benchmarks/dask_cluster.py --size 32GiB       # larger than a 24 GiB machine
    python benchmarks/dask_cluster.py --size 1GiB --repeats 1   # a quick look

``--out`` files carry the stamp of ``benchmarks/bench_stamp.py`` (commit, command,
versions, machine); the published run is ``nox -s bench -- dask-cluster``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["generate_block", "main", "parse_size"]

_UNITS = {"": 1, "B": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_UNITS |= {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_size(text: str) -> int:
    """Return the number of bytes in ``text``: ``32GiB``, ``500MB``, ``1e9``."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        msg = f"not a size: {text!r} (e.g. 32GiB, 500MB)"
        raise argparse.ArgumentTypeError(msg)
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


#: One random block per (rows, cols, seed) and process: chunks are cheap copies of it.
_BASE: dict[tuple[int, int, int], np.ndarray] = {}


def generate_block(index: int, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Both float32 operands of chunk ``index``, stacked: a new array of shape ``(2, rows, cols)``.

    ``[0]`` (the input) is ``-Exp(1)``, log-probability-like; ``[1]`` (the
    target) is uniform on [0, 1) with about 1% of its values set to exactly 0.
    Drawing random numbers costs far more than the loss (about 20 ns an element
    here, against under 1 ns), so each process draws one block per shape and
    seed, once, and chunk ``index`` is that block rolled by ``index`` columns
    (a copy): distinct chunks at the cost of a memory copy.
    """
    key = (rows, cols, seed)
    base = _BASE.get(key)
    if base is None:
        rng = np.random.default_rng(seed)
        base = np.empty((2, rows, cols), dtype=np.float32)
        rng.standard_exponential(dtype=np.float32, out=base[0])
        np.negative(base[0], out=base[0])
        rng.random(dtype=np.float32, out=base[1])
        base[1][base[1] < 0.01] = 0
        _BASE[key] = base
    return np.roll(base, index % cols, axis=2)


def _block(block_info: Any = None, *, rows: int, cols: int, seed: int) -> np.ndarray:
    return generate_block(block_info[None]["chunk-location"][1], rows, cols, seed)


def _warm(i: int, *, rows: int, cols: int, seed: int) -> float:
    import kldiv_spec

    block = generate_block(i, rows, cols, seed)
    return float(kldiv_spec.kl_div(block[0], block[1], reduction="sum"))


def _nothing(b: np.ndarray) -> np.ndarray:
    return np.zeros((1, 1), dtype=np.float64)


def lazy_operands(n_chunks: int, rows: int, cols: int, seed: int) -> tuple[Any, Any, Any]:
    """The stacked lazy array ``(2, n_chunks * rows, cols)`` and its two operands."""
    import dask.array as da

    stacked = da.map_blocks(
        _self()._block,
        chunks=((2,), (rows,) * n_chunks, (cols,)),
        dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
        rows=rows,
        cols=cols,
        seed=seed,
    )
    return stacked, stacked[0], stacked[1]


def _self() -> Any:
    """This file as an importable module ``dask_cluster`` (not ``__main__``).

    Its functions are then sent to workers by reference, so each worker process
    imports the module once (``Client.upload_file``) and keeps :data:`_BASE`.
    """
    if __name__ != "__main__":
        return sys.modules[__name__]
    import importlib

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        return importlib.import_module("dask_cluster")
    finally:
        sys.path.pop(0)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _machine() -> dict[str, Any]:
    import dask
    import distributed

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        pages = 0
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "ram_gib": round(pages / 2**30, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
    }


def _median_spread(times: list[float]) -> tuple[float, str]:
    return statistics.median(times), f"{min(times):.1f}-{max(times):.1f}"


def single_process(sample: int, rows: int, cols: int, seed: int) -> tuple[float, float, float]:
    """Generate and reduce chunks ``0 .. sample - 1`` here, one after the other.

    Returns the seconds spent generating, the seconds in ``kldiv_spec.kl_div``
    (the NumPy fast path, on its own threads), and the sum of the losses.
    """
    import kldiv_spec

    gen = loss = total = 0.0
    for i in range(sample):
        start = time.perf_counter()
        block = generate_block(i, rows, cols, seed)
        mid = time.perf_counter()
        total += float(kldiv_spec.kl_div(block[0], block[1], reduction="sum"))
        loss += time.perf_counter() - mid
        gen += mid - start
        del block
    return gen, loss, total


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a Markdown report and write it (and JSON) on ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--size",
        type=parse_size,
        default=parse_size("32GiB"),
        help="bytes of input, both operands together (default 32GiB)",
    )
    parser.add_argument("--cols", type=int, default=32000)
    parser.add_argument(
        "--chunk-rows",
        type=int,
        default=256,
        help="rows per chunk (default 256: 31 MiB per operand at 32000 cols)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="2GiB", help="per worker (default 2GiB)")
    parser.add_argument("--repeats", type=int, default=3, help="cluster timings (default 3)")
    parser.add_argument(
        "--numpy-chunks",
        type=int,
        default=32,
        help="chunks timed in a single process (default 32)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="directory for NAME.md and NAME.json")
    parser.add_argument("--name", default="dask-cluster")
    args = parser.parse_args(argv)
    # imported here, not at the top: the workers import this module from a copy elsewhere
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.append(str(Path(__file__).resolve().parent))
    import bench_stamp  # benchmarks/bench_stamp.py (this folder is no package)
    import dask.array as da
    import distributed

    import kldiv_spec

    rows, cols = args.chunk_rows, args.cols
    chunk_bytes = 2 * rows * cols * 4  # both operands
    n_chunks = max(1, round(args.size / chunk_bytes))
    total = n_chunks * chunk_bytes
    stacked, x, t = lazy_operands(n_chunks, rows, cols, args.seed)
    loss = kldiv_spec.kl_div(x, t, reduction="batchmean")  # lazy
    baseline = da.map_blocks(
        _self()._nothing, stacked[0], chunks=((1,) * n_chunks, (1,)), dtype=np.float64
    ).sum()
    gb = total / 1e9
    print(
        f"{total / 2**30:.2f} GiB of float32 input ({n_chunks} chunks of 2 x {rows} x {cols}, "
        f"{chunk_bytes / 2**20:.0f} MiB), graph of {len(loss.__dask_graph__())} tasks",
        file=sys.stderr,
    )

    sample = min(args.numpy_chunks, n_chunks)
    generate_block(0, rows, cols, args.seed)  # draws this process's base block, untimed
    numpy_gen, numpy_loss, partial = [], [], 0.0

    env = {"KLDIV_SPEC_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cluster_loss, cluster_base, value = [], [], None
    with (
        distributed.LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=args.memory_limit,
            dashboard_address=":0",  # a free port: 8787 may be taken
            env=env,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.upload_file(str(Path(_self().__file__)))
        # warm up: every worker imports kldiv_spec and draws its base block
        client.gather(
            client.map(
                _self()._warm,
                range(args.workers),
                rows=rows,
                cols=cols,
                seed=args.seed,
                pure=False,
            )
        )
        # rounds of: the single-process sample, the cluster without the loss, the cluster
        # with it; interleaved, so that a change of load on a shared machine hits all three
        for _ in range(args.repeats):
            gen_s, loss_s, partial = single_process(sample, rows, cols, args.seed)
            numpy_gen.append(gen_s / sample * n_chunks)  # extrapolated to every chunk
            numpy_loss.append(loss_s / sample * n_chunks)
            start = time.perf_counter()
            client.compute(baseline).result()
            cluster_base.append(time.perf_counter() - start)
            start = time.perf_counter()
            value = float(client.compute(loss).result())
            cluster_loss.append(time.perf_counter() - start)
            print(
                f"cluster: generate + loss {cluster_loss[-1]:.1f} s, generation only "
                f"{cluster_base[-1]:.1f} s; single process (extrapolated): generate + loss "
                f"{numpy_gen[-1] + numpy_loss[-1]:.1f} s, loss {numpy_loss[-1]:.1f} s",
                file=sys.stderr,
            )
        worker_peak = client.run(_peak_rss_mib)

    n_rows = n_chunks * rows
    sample_batchmean = partial / (sample * rows)
    both = [a + b for a, b in zip(numpy_gen, numpy_loss, strict=True)]
    loss_only = [a - b for a, b in zip(cluster_loss, cluster_base, strict=True)]
    results = {
        "input_bytes": total,
        "shape": [n_rows, cols],
        "chunk": [rows, cols],
        "n_chunks": n_chunks,
        "workers": args.workers,
        "threads_per_worker": 1,
        "memory_limit": args.memory_limit,
        "worker_env": env,
        "loss": value,
        "numpy_sample_batchmean": sample_batchmean,
        "cluster_loss_s": cluster_loss,
        "cluster_generation_only_s": cluster_base,
        "numpy_sample_chunks": sample,
        "numpy_loss_s": numpy_loss,
        "numpy_generation_s": numpy_gen,
        "worker_peak_rss_mib": worker_peak,
    }
    rows_md = [
        ("cluster: generate + loss", *_median_spread(cluster_loss)),
        ("cluster: generation only", *_median_spread(cluster_base)),
        ("cluster: loss (the difference)", *_median_spread(loss_only)),
        ("single process: generate + loss", *_median_spread(both)),
        ("single process: loss only (NumPy fast path)", *_median_spread(numpy_loss)),
    ]
    table = ["| what | s (median) | min-max s | GB/s of input |", "|---|--:|--:|--:|"]
    table += [f"| {w} | {s:.1f} | {spread} | {gb / s:.2f} |" for w, s, spread in rows_md]
    peak = ", ".join(f"{v:.0f}" for v in worker_peak.values())
    machine = _machine()
    stamp = bench_stamp.stamp(
        __file__, sys.argv[1:] if argv is None else argv, libraries=("dask",)
    )
    command = stamp["command"]
    report = "\n".join(
        [
            bench_stamp.describe(stamp),
            "",
            f"{total / 2**30:.2f} GiB of float32 input ({n_rows} x {cols}, both operands), "
            f"generated lazily in {n_chunks} chunks of {rows} x {cols}; {args.workers} worker "
            f"processes of 1 thread, memory_limit {args.memory_limit} each (peak RSS {peak} MiB); "
            f"{args.repeats} rounds; the single process timed on {sample} chunks per round "
            "and extrapolated.",
            "",
            *table,
            "",
            f"batchmean loss: {value:.6f} (single-process sample of {sample} chunks: "
            f"{sample_batchmean:.6f})",
        ]
    )
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(
            json.dumps(
                {"stamp": stamp, "command": command, "machine": machine, "results": results},
                indent=1,
            )
            + "\n"
        )
        (args.out / f"{args.name}.md").write_text(
            "# The loss on a dask.distributed cluster, over more data than memory\n\n"
            + report
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
