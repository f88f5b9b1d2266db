"""Jitted ``kldiv_spec.kl_div`` on JAX against a jitted ``jnp`` expression of the same loss.

Every implementation is a function compiled with ``jax.jit`` and called on the
same device arrays (``input``: rows of a log-softmax; ``target``: probability
rows with about 1% exact zeros):

* ``kldiv_spec`` -- ``kldiv_spec.kl_div`` (the fast path: ``jax.jit`` + ``custom_vjp``),
* ``kldiv_spec reference`` -- the same call traced inside ``kldiv_spec.use_reference()``,
* ``jnp expression`` -- ``where(t == 0, 0, t log t) - t x``, summed (and divided by the
  rows for ``batchmean``), as a user would write it.

Cases: forward ``sum`` and ``batchmean``, and forward+backward of ``batchmean``
(``jax.value_and_grad`` with respect to both operands). Each function is
called once to compile, then timed ``--repeats`` times (``block_until_ready``);
the table gives the median, the spread (min-max) and the ratio of medians to the
``jnp`` expression's. Nothing here asserts a time.

    python benchmarks/jax_bench.py                       # 2048x32000 float32, 15 repeats
    python benchmarks/jax_bench.py --shapes 64x1000 2048x32000 --out benchmarks/results

``--out`` files carry the stamp of ``benchmarks/bench_stamp.py`` (commit, command,
versions, machine); the published run is ``nox -s bench -- jax``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))
import bench_stamp  # benchmarks/bench_stamp.py (this folder is no package)

__all__ = ["implementations", "main", "measure"]

CASES = ("sum", "batchmean", "batchmean fwd+bwd")


def _expression(x: Any, t: Any, reduction: str) -> Any:
    import jax.numpy as jnp

    total = jnp.sum(jnp.where(t == 0, 0, t * jnp.log(t)) - t * x)
    return total / x.shape[0] if reduction == "batchmean" else total


def implementations(case: str) -> dict[str, Callable[[Any, Any], Any]]:
    """Return the jitted functions to compare for ``case``, by name (traced lazily)."""
    import jax

    import kldiv_spec

    reduction = "sum" if case == "sum" else "batchmean"
    backward = case.endswith("fwd+bwd")

    def ours(x: Any, t: Any) -> Any:
        return kldiv_spec.kl_div(x, t, reduction=reduction)

    def theirs(x: Any, t: Any) -> Any:
        return _expression(x, t, reduction)

    def reference(x: Any, t: Any) -> Any:
        # main() makes the first (tracing) call inside kldiv_spec.use_reference()
        return kldiv_spec.kl_div(x, t, reduction=reduction)

    fns = {"kldiv_spec": ours, "kldiv_spec reference": reference, "jnp expression": theirs}
    if backward:
        fns = {k: jax.value_and_grad(f, argnums=(0, 1)) for k, f in fns.items()}
    return {k: jax.jit(f) for k, f in fns.items()}


def _data(rows: int, cols: int, dtype: Any) -> tuple[Any, Any]:
    import jax
    import jax.numpy as jnp

    kx, kt, kz = jax.random.split(jax.random.key(0), 3)
    x = jax.nn.log_softmax(jax.random.normal(kx, (rows, cols), dtype), axis=-1)
    t = jax.nn.softmax(jax.random.normal(kt, (rows, cols), dtype), axis=-1)
    t = jnp.where(jax.random.uniform(kz, (rows, cols)) < 0.01, 0, t).astype(dtype)
    return jax.block_until_ready((x, t))


def measure(
    fns: dict[str, Callable[[Any, Any], Any]], x: Any, t: Any, repeats: int
) -> dict[str, dict[str, Any]]:
    """Compile each function (first call), then time ``repeats`` rounds of one call each.

    The calls are interleaved, round after round, so that a change of load on a
    shared machine affects every implementation alike. The function named
    ``... reference`` is traced inside ``kldiv_spec.use_reference()``.
    """
    import jax

    import kldiv_spec

    out: dict[str, dict[str, Any]] = {}
    for name, fn in fns.items():
        with kldiv_spec.use_reference(name.endswith("reference")), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            start = time.perf_counter()
            value = jax.block_until_ready(fn(x, t))
            first = time.perf_counter() - start
        loss = value[0] if isinstance(value, tuple) else value
        out[name] = {"first_call_s": first, "loss": float(loss), "times_s": []}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(x, t))
            out[name]["times_s"].append(time.perf_counter() - start)
    for r in out.values():
        times = r["times_s"]
        r |= {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
    return out


def _machine() -> dict[str, Any]:
    import jax

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "x64": bool(jax.config.read("jax_enable_x64")),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the comparison, print a Markdown table, and write JSON and Markdown on ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shapes", nargs="+", default=["2048x32000"], help="ROWSxCOLS ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--x64", action="store_true", help="enable jax_enable_x64 (float64)")
    parser.add_argument("--out", type=Path, help="directory for STEM.json and STEM.md")
    parser.add_argument("--name", default="jax", help="file stem (default: jax)")
    args = parser.parse_args(argv)

    import jax

    if args.x64 or args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    dtype = jnp.dtype(args.dtype)
    rows_out = []
    for shape in args.shapes:
        rows, cols = (int(n) for n in shape.lower().split("x"))
        x, t = _data(rows, cols, dtype)
        for case in CASES:
            results = measure(implementations(case), x, t, args.repeats)
            base = results["jnp expression"]["median_s"]
            for name, r in results.items():
                rows_out.append(
                    {"shape": shape, "dtype": args.dtype, "case": case, "implementation": name}
                    | r
                    | {"vs_jnp": base / r["median_s"]}
                )
            print(
                f"{shape} {case}: "
                + ", ".join(f"{k} {1e3 * v['median_s']:.1f} ms" for k, v in results.items()),
                file=sys.stderr,
            )

    lines = [
        "| shape | case | implementation | median ms | min-max ms | x jnp expression | loss |",
        "|---|---|---|--:|--:|--:|--:|",
    ]
    for r in rows_out:
        lines.append(
            f"| {r['shape']} {r['dtype']} | {r['case']} | {r['implementation']} "
            f"| {1e3 * r['median_s']:.1f} | {1e3 * r['min_s']:.1f}-{1e3 * r['max_s']:.1f} "
            f"| {r['vs_jnp']:.2f} | {r['loss']:.6g} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = bench_stamp.stamp(
            __file__, sys.argv[1:] if argv is None else argv, libraries=("jax",)
        )
        meta = {"repeats": args.repeats, "machine": _machine()}
        (args.out / f"{args.name}.json").write_text(
            json.dumps({"stamp": stamp, "meta": meta, "results": rows_out}, indent=1) + "\n"
        )
        m = meta["machine"]
        (args.out / f"{args.name}.md").write_text(
            f"# JAX: jitted kldiv_spec.kl_div against a jitted jnp expression\n\n"
            f"{bench_stamp.describe(stamp)}\n\n"
            f"JAX {m['jax']}, devices {m['devices']}, x64 {m['x64']}; "
            f"{args.repeats} timed calls after one compiling call, in turns.\n\n{table}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
