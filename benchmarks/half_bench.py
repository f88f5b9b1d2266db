"""Half precision (bfloat16, float16) on the CPU: time and accuracy of ``kl_div``.

The ``kl_div`` section, at ``--rows x --vocab`` (default 2048 x 32000), inputs
``log_softmax`` and targets ``softmax`` of standard normal logits (drawn in float32,
then rounded to the dtype):

- **time, PyTorch**: one forward + backward (the input's gradient) of
  ``kldiv_spec.torch.kl_div`` in bfloat16 and float16 (the compiled half-precision sum
  and ATen's input gradient), ``torch.nn.functional.kl_div`` in the same dtype, and
  ``kldiv_spec.torch.kl_div`` in float32 (the fused float32 pass), for each
  ``--reductions`` (``batchmean`` and ``sum``). The implementations are timed in
  interleaved rounds (one step of each per round, ``--repeats`` rounds, after one
  warm-up round), so that a change in the machine's load hits them alike; the report
  gives the medians and the ratios within the run: against ``F.kl_div`` in the same
  dtype, and against ours in float32;
- **time, NumPy**: ``kldiv_spec.kl_div`` on float16 arrays (the NumPy fast path), with
  the compiled kernel and with it turned off (``KLDIV_SPEC_NUMPY_FUSED=0``: NumPy's
  float16 ufuncs), ``'sum'`` and ``'none'``, and on float32 arrays (the fused pass);
- **accuracy** (``'sum'``): the exact sum of the reference's pointwise values in the
  dtype (each operation rounded to the dtype, as ``kldiv_spec.use_reference()`` computes
  them; summed in float64 by ``math.fsum``), against ours, ``F.kl_div`` and the
  reference's own sum (``torch.sum`` in the dtype), as the error in units of the dtype's
  ulp at the exact sum, and whether each pointwise value of ours equals the reference's.

::

    python benchmarks/half_bench.py --out benchmarks/results/half-cpu
    python benchmarks/half_bench.py --quick --out /tmp/half   # 64 x 1000, one round

Every ``--out`` file carries the stamp of ``benchmarks/bench_stamp.py``. Further
sections (other losses in half precision) add a function that returns their part of
the result, and their lines of the report.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))
import bench_stamp  # benchmarks/bench_stamp.py (this folder is no package)

HALF_DTYPES = ("bfloat16", "float16")
REDUCTIONS = ("batchmean", "sum")
QUICK_SHAPE = (64, 1000)
#: At least this many elements per sum of the accuracy measurement (the PyTorch fast
#: path's threshold is 32768).
ACCURACY_ELEMENTS = 60_000


# --- shared ----------------------------------------------------------------------------------


def interleaved(steps: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, Any]]:
    """Time ``steps`` in rounds (one call of each per round) after a warm-up round.

    Returns, per name, the median, min and max seconds and every time.
    """
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {
        name: {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "max_s": max(ts),
            "times_s": ts,
        }
        for name, ts in times.items()
    }


def half_ulp(value: float, dtype: str) -> float:
    """Return the ulp of ``dtype`` (bfloat16 or float16) at ``value``: the spacing there."""
    mantissa_bits, min_exponent = (7, -126) if dtype == "bfloat16" else (10, -14)
    if value == 0 or not math.isfinite(value):
        return math.ldexp(1.0, min_exponent - mantissa_bits)
    exponent = max(math.frexp(abs(value))[1] - 1, min_exponent)
    return math.ldexp(1.0, exponent - mantissa_bits)


def exact_sum(values: Any) -> float:
    """Return ``math.fsum`` of an array's values (the float64 nearest their exact sum).

    Fed in chunks, so that the Python floats of a large array never exist all at once.
    """
    import numpy as np

    flat = np.asarray(values, np.float64).reshape(-1)
    chunks = (flat[i : i + (1 << 20)].tolist() for i in range(0, flat.size, 1 << 20))
    return math.fsum(itertools.chain.from_iterable(chunks))


@contextlib.contextmanager
def numpy_fused(on: bool) -> Iterator[None]:
    """Run with the NumPy fast path's compiled kernels on or off (``KLDIV_SPEC_NUMPY_FUSED``)."""
    from kldiv_spec import _settings

    name = "KLDIV_SPEC_NUMPY_FUSED"
    before = os.environ.get(name)
    os.environ[name] = "1" if on else "0"
    _settings.reload()
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before
        _settings.reload()


# --- kl_div ----------------------------------------------------------------------------------


def kl_div_inputs(rows: int, vocab: int, seed: int = 0) -> tuple[Any, Any]:
    """Return float32 ``log_softmax`` inputs and ``softmax`` targets of normal logits."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.log_softmax(torch.randn(rows, vocab, generator=gen), dim=-1)
    t = torch.softmax(torch.randn(rows, vocab, generator=gen), dim=-1)
    return x, t


def kl_div_torch_steps(x32: Any, t32: Any, reduction: str) -> dict[str, Callable[[], Any]]:
    """Return one forward + backward step per implementation, on the tensors given."""
    import torch
    import torch.nn.functional as F

    import kldiv_spec.torch as kt

    def step(fn: Callable[..., Any], x: Any, t: Any) -> Callable[[], Any]:
        x = x.detach().clone().requires_grad_()

        def run() -> Any:
            x.grad = None
            loss = fn(x, t, reduction=reduction)
            loss.backward()
            return loss

        return run

    steps = {}
    for name in HALF_DTYPES:
        dtype = getattr(torch, name)
        x, t = x32.to(dtype), t32.to(dtype)
        steps[f"kldiv_spec {name}"] = step(kt.kl_div, x, t)
        steps[f"F.kl_div {name}"] = step(F.kl_div, x, t)
    steps["kldiv_spec float32"] = step(kt.kl_div, x32, t32)
    return steps


def kl_div_torch_timing(
    x32: Any, t32: Any, reductions: tuple[str, ...], repeats: int
) -> list[dict[str, Any]]:
    """Time the PyTorch steps for each reduction; one row per implementation."""
    rows = []
    for reduction in reductions:
        times = interleaved(kl_div_torch_steps(x32, t32, reduction), repeats)
        ours32 = times["kldiv_spec float32"]["median_s"]
        for name, t in times.items():
            library, dtype = name.split(" ")
            row = {"reduction": reduction, "implementation": name, "dtype": dtype, **t}
            if library == "kldiv_spec" and dtype != "float32":
                row["speedup_vs_F"] = times[f"F.kl_div {dtype}"]["median_s"] / t["median_s"]
                row["speedup_vs_ours_float32"] = ours32 / t["median_s"]
            rows.append(row)
    return rows


def kl_div_numpy_timing(x32: Any, t32: Any, repeats: int) -> list[dict[str, Any]]:
    """Time ``kldiv_spec.kl_div`` on float16 arrays with the kernel on and off, and float32."""
    import numpy as np

    import kldiv_spec

    x16, t16 = x32.numpy().astype(np.float16), t32.numpy().astype(np.float16)
    xf, tf = x32.numpy(), t32.numpy()
    rows = []
    for reduction in ("sum", "none"):
        steps = {}
        for on in (True, False):

            def run(on: bool = on, reduction: str = reduction) -> Any:
                with numpy_fused(on):
                    return kldiv_spec.kl_div(x16, t16, reduction=reduction)

            steps[f"float16, kernel {'on' if on else 'off'}"] = run
        steps["float32"] = lambda reduction=reduction: kldiv_spec.kl_div(
            xf, tf, reduction=reduction
        )
        times = interleaved(steps, repeats)
        off = times["float16, kernel off"]["median_s"]
        for name, t in times.items():
            rows.append(
                {
                    "reduction": reduction,
                    "implementation": name,
                    **t,
                    "speedup_vs_off": off / t["median_s"],
                }
            )
    return rows


def kl_div_close_inputs(rows: int, vocab: int, seed: int = 1) -> tuple[Any, Any]:
    """Return a student close to its teacher: ``log_softmax(z + 0.05 e)`` and ``softmax(z)``.

    The divergence is small against the sum of the terms' sizes (the terms ``t log t`` and
    ``t x`` nearly cancel): the case where a float32 accumulation loses digits.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=gen)
    x = torch.log_softmax(z + 0.05 * torch.randn(rows, vocab, generator=gen), dim=-1)
    return x, torch.softmax(z, dim=-1)


def kl_div_accuracy(inputs: dict[str, tuple[Any, Any]], rows_per_sum: int) -> list[dict[str, Any]]:
    """Errors of ``'sum'`` over blocks of ``rows_per_sum`` rows, in ulps of the dtype.

    For each kind of inputs and half dtype: the reference's pointwise values (whether
    ours are the same, bit for bit), then for every block of rows the exact sum of those
    values (:func:`exact_sum`) and the error of ours, ``F.kl_div`` and the reference's own
    sum, in ulps of the dtype at the exact sum: the largest, and how many sums were off
    by more than half an ulp (not the correctly rounded value).
    """
    import torch
    import torch.nn.functional as F

    import kldiv_spec
    import kldiv_spec.torch as kt

    implementations: dict[str, Callable[[Any, Any], Any]] = {
        "kldiv_spec": lambda x, t: kt.kl_div(x, t, reduction="sum"),
        "F.kl_div": lambda x, t: F.kl_div(x, t, reduction="sum"),
    }
    out = []
    for kind, (x32, t32) in inputs.items():
        for name in HALF_DTYPES:
            dtype = getattr(torch, name)
            x, t = x32.to(dtype), t32.to(dtype)
            with kldiv_spec.use_reference():
                terms = kt.kl_div(x, t, reduction="none")
            ours = kt.kl_div(x, t, reduction="none")
            same = bool(torch.equal(ours.view(torch.int16), terms.view(torch.int16)))
            errors: dict[str, list[float]] = {n: [] for n in (*implementations, "reference")}
            for start in range(0, x.shape[0], rows_per_sum):
                xs, ts = x[start : start + rows_per_sum], t[start : start + rows_per_sum]
                exact = exact_sum(terms[start : start + rows_per_sum].float().numpy())
                ulp = half_ulp(exact, name)
                for implementation, fn in implementations.items():
                    errors[implementation].append(abs(float(fn(xs, ts)) - exact) / ulp)
                with kldiv_spec.use_reference():
                    value = float(kt.kl_div(xs, ts, reduction="sum"))
                errors["reference"].append(abs(value - exact) / ulp)
            for implementation, errs in errors.items():
                out.append(
                    {
                        "inputs": kind,
                        "dtype": name,
                        "implementation": implementation,
                        "sums": len(errs),
                        "elements_per_sum": rows_per_sum * x.shape[1],
                        "max_error_ulp": max(errs),
                        "median_error_ulp": statistics.median(errs),
                        "not_correctly_rounded": sum(e > 0.5 for e in errs),
                        "pointwise_equal_to_reference": (
                            same if implementation == "kldiv_spec" else None
                        ),
                    }
                )
    return out


def kl_div_section(rows: int, vocab: int, repeats: int, accuracy_rows: int) -> dict[str, Any]:
    """The ``kl_div`` part of the result: PyTorch and NumPy times, and the accuracy.

    The accuracy is measured on the first ``accuracy_rows`` rows.
    """
    x32, t32 = kl_div_inputs(rows, vocab)
    return {
        "rows": rows,
        "vocab": vocab,
        "repeats": repeats,
        "torch": kl_div_torch_timing(x32, t32, REDUCTIONS, repeats),
        "numpy": kl_div_numpy_timing(x32, t32, min(repeats, 3)),
        "accuracy": kl_div_accuracy(
            {
                "independent": (x32[:accuracy_rows], t32[:accuracy_rows]),
                "close": kl_div_close_inputs(min(rows, accuracy_rows), vocab),
            },
            rows_per_sum=max(1, -(-ACCURACY_ELEMENTS // vocab)),
        ),
    }


def kl_div_markdown(section: dict[str, Any]) -> list[str]:
    """The report's lines of the ``kl_div`` section."""
    shape = f"{section['rows']} x {section['vocab']}"
    lines = [
        f"## kl_div, {shape}",
        "",
        f"PyTorch, forward + backward (the input's gradient), median of {section['repeats']} "
        "interleaved rounds:",
        "",
        "| reduction | implementation | median (ms) | min (ms) | vs F.kl_div, same dtype "
        "| vs kldiv_spec float32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in section["torch"]:
        vs_f = f"{r['speedup_vs_F']:.2f}x" if "speedup_vs_F" in r else ""
        vs_32 = f"{r['speedup_vs_ours_float32']:.2f}x" if "speedup_vs_ours_float32" in r else ""
        lines.append(
            f"| {r['reduction']} | {r['implementation']} | {1e3 * r['median_s']:.1f} | "
            f"{1e3 * r['min_s']:.1f} | {vs_f} | {vs_32} |"
        )
    lines += [
        "",
        "NumPy, `kldiv_spec.kl_div` (forward), median of at most 3 interleaved rounds:",
        "",
        "| reduction | arrays | median (ms) | vs float16 with the kernel off |",
        "|---|---|---|---|",
    ]
    for r in section["numpy"]:
        lines.append(
            f"| {r['reduction']} | {r['implementation']} | {1e3 * r['median_s']:.1f} | "
            f"{r['speedup_vs_off']:.2f}x |"
        )
    acc = section["accuracy"]
    lines += [
        "",
        f"Accuracy of `reduction='sum'` over {acc[0]['sums']} sums of "
        f"{acc[0]['elements_per_sum']} terms each (blocks of rows): the error against the "
        "exact sum of the reference's pointwise values (float64, math.fsum), in ulps of the "
        "dtype at that sum; inputs `independent` (the timed ones) and `close` (a student "
        "close to its teacher: the terms nearly cancel):",
        "",
        "| inputs | dtype | implementation | max error (ulp) | median error (ulp) "
        "| sums not correctly rounded | pointwise values = reference's |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in acc:
        same = r["pointwise_equal_to_reference"]
        lines.append(
            f"| {r['inputs']} | {r['dtype']} | {r['implementation']} | "
            f"{r['max_error_ulp']:.4g} | {r['median_error_ulp']:.3g} | "
            f"{r['not_correctly_rounded']} | {'' if same is None else same} |"
        )
    return lines


# --- the command line ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: {QUICK_SHAPE[0]} x {QUICK_SHAPE[1]}, one round",
    )
    parser.add_argument(
        "--accuracy-rows",
        type=int,
        default=2048,
        help="rows of the accuracy measurement (sums of blocks of rows)",
    )
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md (stamped)")
    args = parser.parse_args(argv)
    rows, vocab, repeats = args.rows, args.vocab, args.repeats
    if args.quick:
        (rows, vocab), repeats = QUICK_SHAPE, 1
    stamp = bench_stamp.stamp(__file__, argv, libraries=("torch",), quick=args.quick)
    kl = kl_div_section(rows, vocab, repeats, args.accuracy_rows)
    result = {"stamp": stamp, "kl_div": kl}
    lines = ["# Half precision on the CPU", "", bench_stamp.describe(stamp), ""]
    lines += kl_div_markdown(kl)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        bench_stamp.write_outputs(args.out, result, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
