"""Generate the figures of docs/benchmarks.md from the result files in benchmarks/results/.

``docs/benchmarks.md`` holds regions between ``<!-- bench:ID -->`` and
``<!-- bench:ID:end -->``; each is rendered here from the result files, and
nothing in them is typed by hand. Every region names the command that
regenerates its figure (``nox -s bench -- NAME``) and the commit, date and
machine its result file's stamp records (``benchmarks/bench_stamp.py``); a
result that is missing is said to be so, with the command that makes it. The
figures report ratios measured within one run (against PyTorch's ``kl_div``,
plain NumPy, the composition a user would write), not absolute times.

``python docs/_tools/bench_pages.py`` rewrites the page; ``--check`` exits 1 when it
differs from the result files (tests/test_bench_pages.py runs it).
``benchmarks/run.py`` calls :func:`write` after every benchmark it runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["PAGE", "RESULTS", "regions", "render", "replaced", "write"]

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results"
IMG = ROOT / "docs" / "img"
REGION = re.compile(r"(<!-- bench:([\w-]+) -->\n)(.*?)(<!-- bench:\2:end -->)", re.DOTALL)


def _script(name: str) -> ModuleType:
    """Import a script of benchmarks/ by its path (the folder is no package)."""
    key = f"_kldiv_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "benchmarks" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@dataclass
class Context:
    """Where the results are, and where the page that links to them is."""

    results: Path
    page: Path

    def load(self, name: str) -> dict[str, Any] | None:
        path = self.results / f"{name}.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def link(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.page.parent)).as_posix()

    def image(self, name: str, alt: str) -> str:
        """Return the Markdown image of ``benchmarks-NAME.png`` where it is, else nothing."""
        for folder in (self.results, IMG):  # a quick run draws into its results folder
            png = folder / f"benchmarks-{name}.png"
            if png.is_file():
                return f"![{alt}]({self.link(png)})"
        return ""


# ----------------------------------------------------------------------------- provenance


def _run() -> ModuleType:
    return _script("run")


def regenerate(name: str) -> str:
    """Return the command that regenerates result ``name``."""
    return f"{_run().LAUNCHER} {name}"


def provenance(ctx: Context, name: str, result: dict[str, Any]) -> str:
    """One paragraph: the result file, the command that regenerates it, what its stamp says."""
    stamp_mod = _script("bench_stamp")
    s = result.get("stamp") or {}
    files = ", ".join(
        f"[`{p.name}`]({ctx.link(p)})" for p in sorted(ctx.results.glob(f"{name}.*"))
    )
    how = f"`{regenerate(name)}`"
    bench = _run().BY_NAME.get(name)
    if bench is not None and bench.gpu:
        how += (
            f" on a CUDA machine, or `bash benchmarks/gpu.sh --name {name}` in a copy of the "
            "tree there (with `KLDIV_BENCH_COMMIT` set to the commit it came from)"
        )
    parts = [
        f"*Figure of* {files}; regenerate with {how}. "
        f"Recorded at commit {stamp_mod.describe_commit(s)}, {s.get('date', '?')}, "
        f"on {stamp_mod.describe_machine(s.get('machine', {}))}"
    ]
    v = s.get("versions", {})
    libs = [f"Python {v['python']}"] if v.get("python") else []
    for key, label in (("numpy", "NumPy"), ("torch", "PyTorch"), ("jax", "JAX"),
                       ("dask", "Dask"), ("triton", "Triton"), ("cupy", "CuPy")):  # fmt: skip
        if v.get(key):
            libs.append(f"{label} {v[key]}")
    parts[0] += (f"; {', '.join(libs)}" if libs else "") + "."
    if s.get("command") and s["command"] != regenerate(name):
        parts.append(f"Its stamp records the command `{s['command']}`.")
    torch = str(v.get("torch") or "")
    pin = _run().TORCH_PIN
    if torch and not torch.startswith(pin):
        parts.append(f"**Taken on PyTorch {torch}, not the pinned {pin}.**")
    if s.get("quick"):
        parts.append("**A quick smoke run: small sizes, not a figure.**")
    if s.get("note"):
        parts.append(str(s["note"]))
    return " ".join(parts)


def missing(name: str) -> str:
    return (
        f"*Not measured at this commit:* `{regenerate(name)}` writes "
        f"`benchmarks/results/{name}.json`, and this figure is regenerated from it."
    )


# ----------------------------------------------------------------------------- formatting


def _nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _x(v: Any) -> str:
    if _nan(v):
        return "-"
    return f"{v:.2g}x" if v < 1 else f"{v:.1f}x"


def _ratio(d: dict[str, float]) -> str:
    return f"{d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f})"


def _table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    rule = align or "|" + "---|" * len(header)
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(r) + " |" for r in rows)]


def _records(result: dict[str, Any], **match: Any) -> list[dict[str, Any]]:
    return [r for r in result["records"] if all(r.get(k) == v for k, v in match.items())]


def _largest(result: dict[str, Any]) -> list[dict[str, Any]]:
    f32 = _records(result, dtype="float32")
    if not f32:
        return []
    n = max(r["elements"] for r in f32)
    return [r for r in f32 if r["elements"] == n]


HEADLINE_CASES = (("sum", "forward"), ("none", "forward"), ("batchmean", "forward+backward"))


def _one(records: list[dict[str, Any]], impl: str, reduction: str, mode: str) -> dict | None:
    for r in records:
        if r["implementation"] == impl and r["reduction"] == reduction and r["mode"] == mode:
            return r
    return None


# ----------------------------------------------------------------------------- regions


def cpu_headline(ctx: Context) -> str:
    result = ctx.load("cpu-headline")
    if result is None:
        return missing("cpu-headline")
    cpu = _script("cpu_bench")
    head = _largest(result)
    shape = "x".join(map(str, head[0]["shape"])) if head else "?"
    roof = result["roofline"]
    lines = [
        provenance(ctx, "cpu-headline", result),
        "",
        f"Speed-up over torch eager `F.kl_div` and over plain NumPy, and extra peak memory, "
        f"at {shape} float32, every implementation in that one run on the same arrays:",
        "",
    ]
    rows = []
    for impl in cpu.IMPLEMENTATIONS:
        cells = []
        for reduction, mode in HEADLINE_CASES:
            r = _one(head, impl, reduction, mode)
            if r is None:
                cells.append("")
                continue
            peak = "-" if _nan(r["extra_peak_mb"]) else f"{r['extra_peak_mb']:.0f} MiB"
            cells.append(f"{_x(r['speedup_vs_eager'])}, {_x(r['speedup_vs_plain_numpy'])}; {peak}")
        if any(cells):
            rows.append([impl, *cells])
    lines += _table(
        ["implementation", "sum, forward", "none, forward", "batchmean, forward+backward"], rows
    )
    compiled = _one(head, cpu.COMPILE, "sum", "forward")
    lines += [
        "",
        f"Roofline of that run: read bandwidth {roof['read_bandwidth_gbps']:.1f} GB/s "
        f"({roof['threads']} threads); NumPy's float32 `log` "
        f"{roof['np_log_float32_ns_per_element_one_core']:.2f} ns/element on one core, so a "
        f"loss built on it tops out at {roof['log_ceiling_float32_gbps']:.1f} GB/s of input. "
        "The NumPy path's `sum` reached "
        + _fraction(_one(head, cpu.OURS_NUMPY, "sum", "forward"), roof)
        + " of the read bandwidth."
        + (
            f" `torch.compile` compiled for {compiled['compile_s']:.1f} s before its first call."
            if compiled and not _nan(compiled["compile_s"])
            else ""
        ),
    ]
    if result.get("skipped"):
        lines += [
            "",
            "Not installed in that run, so not measured: " + ", ".join(result["skipped"]),
        ]
    return "\n".join(lines)


def _fraction(record: dict[str, Any] | None, roof: dict[str, Any]) -> str:
    if record is None:
        return "-"
    return f"{100 * record['gbps'] / roof['read_bandwidth_gbps']:.0f}%"


def targets(ctx: Context) -> str:
    result, gpu = ctx.load("cpu-headline"), ctx.load("gpu-h100")
    if result is None:
        return missing("cpu-headline")
    cpu = _script("cpu_bench")
    head = _largest(result)

    def rec(impl: str, reduction: str, mode: str) -> dict[str, Any]:
        return _one(head, impl, reduction, mode) or {}

    numpy_sum = rec(cpu.OURS_NUMPY, "sum", "forward")
    torch_bwd = rec(cpu.OURS_TORCH, "batchmean", "forward+backward")
    eager_bwd = rec(cpu.EAGER, "batchmean", "forward+backward")
    compiled = rec(cpu.COMPILE, "sum", "forward")
    rows: list[tuple[str, float | None, Callable[[float], bool], str]] = [
        ("NumPy path >= 8x PyTorch eager (`sum`)", numpy_sum.get("speedup_vs_eager"),
         lambda v: v >= 8, "{:.1f}x"),
        ("NumPy path >= 2.5x plain NumPy (`sum`)", numpy_sum.get("speedup_vs_plain_numpy"),
         lambda v: v >= 2.5, "{:.1f}x"),
        ("NumPy path < 64 MB extra peak memory (`sum`)", numpy_sum.get("extra_peak_mb"),
         lambda v: v * 2**20 < 64e6, "{:.0f} MiB"),
        ("PyTorch CPU path, forward+backward `batchmean` >= 2x eager",
         torch_bwd.get("speedup_vs_eager"), lambda v: v >= 2, "{:.1f}x"),
    ]  # fmt: skip
    ours, theirs = torch_bwd.get("extra_peak_mb"), eager_bwd.get("extra_peak_mb")
    share = None if _nan(ours) or _nan(theirs) or not theirs else ours / theirs
    rows.append(
        ("... with at most 60% of eager's extra peak memory", share, lambda v: v <= 0.6,
         "{:.0%} (" + f"{ours if not _nan(ours) else 0:.0f} against "
         f"{theirs if not _nan(theirs) else 0:.0f} MiB)")
    )  # fmt: skip
    if numpy_sum and compiled:
        rows.append(
            ("torch.compile's throughput without its compile time (an aim)",
             compiled["median_s"] / numpy_sum["median_s"], lambda v: v >= 1,
             "NumPy path {:.1f}x of it, no compile step")
        )  # fmt: skip
    table = []
    for label, value, ok, fmt in rows:
        if _nan(value):
            table.append([label, "not measured", ""])
        else:
            table.append([label, fmt.format(value), "met" if ok(value) else "**not met**"])
    gpu_row = ["GPU: >= 80% of the device's bandwidth (forward `sum`)", "not measured", ""]
    if gpu is not None:
        fractions = {
            r["implementation"]: r["fraction_of_copy_bandwidth"]
            for r in gpu["results"]
            if r["case"] == "forward sum"
        }
        best = fractions.get("kldiv_spec")
        if best is not None:
            others = ", ".join(
                f"{k.removeprefix('kldiv_spec ')} {100 * v:.0f}%"
                for k, v in fractions.items()
                if k.startswith("kldiv_spec (")
            )
            gpu_row[1] = f"{gpu['device']}: {100 * best:.0f}% (torch CUDA tensors)" + (
                f"; {others}" if others else ""
            )
            gpu_row[2] = "met" if best >= 0.8 else "**not met**"
    table.append(gpu_row)
    stamp_mod = _script("bench_stamp")
    sources = [
        f"`{regenerate('cpu-headline')}` at commit "
        f"{stamp_mod.describe_commit(result.get('stamp') or {}, 7)}"
    ]
    if gpu is not None:
        sources.append(
            f"the GPU row `{regenerate('gpu-h100')}` at commit "
            f"{stamp_mod.describe_commit(gpu.get('stamp') or {}, 7)}, see [GPU](#gpu)"
        )
    return "\n".join(
        [
            "Ratios within one run each: " + "; ".join(sources) + ".",
            "",
            *_table(["target", "measured", ""], table),
        ]
    )


def cpu_sweep(ctx: Context) -> str:
    result = ctx.load("cpu-sweep")
    if result is None:
        return missing("cpu-sweep")
    cpu = _script("cpu_bench")
    lines = [provenance(ctx, "cpu-sweep", result), ""]
    picture = ctx.image("cpu-sweep", "throughput against size, float32, with the roofline")
    if picture:
        lines += [picture, ""]
    sizes = sorted({r["elements"] for r in _records(result, dtype="float32")})
    rows = []
    for n in sizes:
        cells = [f"{n:.0e}".replace("e+0", "e")]
        for impl, reduction, mode in (
            (cpu.OURS_NUMPY, "sum", "forward"),
            (cpu.OURS_NUMPY, "batchmean", "forward+backward"),
            (cpu.OURS_TORCH, "batchmean", "forward+backward"),
        ):
            r = _one(
                [x for x in result["records"] if x["elements"] == n and x["dtype"] == "float32"],
                impl,
                reduction,
                mode,
            )
            cells.append(
                ""
                if r is None
                else f"{_x(r['speedup_vs_eager'])}, {_x(r['speedup_vs_plain_numpy'])}"
            )
        rows.append(cells)
    lines += [
        "Speed-up over torch eager and over plain NumPy by size (float32; every size, dtype "
        "and reduction is in the result file):",
        "",
        *_table(
            [
                "elements",
                "NumPy path, `sum`",
                "NumPy path, `batchmean` fwd+bwd",
                "PyTorch path, `batchmean` fwd+bwd",
            ],
            rows,
        ),
    ]
    return "\n".join(lines)


def gpu_h100(ctx: Context) -> str:
    result = ctx.load("gpu-h100")
    if result is None:
        return missing("gpu-h100")
    rows = []
    for r in result["results"]:
        speed = r.get("speedup_vs_eager")
        peak = r.get("extra_peak_mib")
        error = r.get("relative_error")
        rows.append(
            [
                r["case"],
                r["implementation"],
                f"{100 * r['fraction_of_copy_bandwidth']:.0f}",
                "-" if _nan(speed) else f"{speed:.2f}",
                "-" if _nan(peak) else f"{peak:.0f}",
                "-" if _nan(error) else f"{error:.1e}",
            ]
        )
    rows_, cols_ = result["shape"]
    lines = [
        provenance(ctx, "gpu-h100", result),
        "",
        f"{result['device']}, {rows_} x {cols_} float32, every implementation in one run on "
        "the same data (`kldiv_spec`: `kldiv_spec.kl_div` on CUDA tensors, the Triton "
        "kernel); share of the device's copy bandwidth (read + write, measured in the "
        "same run) that reading the two inputs takes, speed-up over torch eager, extra peak "
        "memory, and the forward sum's error relative to PyTorch's float64 sum:",
        "",
        *_table(
            [
                "case",
                "implementation",
                "% of copy bandwidth",
                "x eager",
                "extra MiB",
                "rel. error",
            ],
            rows,
            "|---|---|--:|--:|--:|--:|",
        ),
    ]
    picture = ctx.image("gpu-h100", "share of the copy bandwidth on the GPU")
    if picture:
        lines += ["", picture]
    return "\n".join(lines)


def accuracy_sum(ctx: Context) -> str:
    result = ctx.load("accuracy-sum")
    if result is None:
        return missing("accuracy-sum")

    def table(rows: list[dict[str, Any]]) -> list[str]:
        columns = list(rows[0]["errors"]) if rows else []
        body = [[f"{r['elements']:,}", *(f"{r['errors'][c]:.3g}" for c in columns)] for r in rows]
        return _table(["elements", *columns], body, "|--:|" + "--:|" * len(columns))

    lines = [
        provenance(ctx, "accuracy-sum", result),
        "",
        "The summation alone (against `math.fsum` of the ufunc kernels' own float32 terms):",
        "",
        *table(result["summation"]),
    ]
    if result.get("whole"):
        lines += [
            "",
            "The whole computation, each term's rounding and its `log` included (against the "
            "exact loss of the float32 inputs: extended-precision terms, summed exactly):",
            "",
            *table(result["whole"]),
        ]
    else:
        lines += ["", "(The fused pass was not built where this ran: no second table.)"]
    lines += ["", "In units of u sum(|l|), u = 2^-24."]
    return "\n".join(lines)


def _sweep(ctx: Context, name: str, variable: str) -> str:
    result = ctx.load(name)
    if result is None:
        return missing(name)
    rows = []
    for impl, r in result["results"].items():
        share = 100 * r["not_correctly_rounded"] / max(r["count"], 1)
        rows.append(
            [
                impl,
                f"{r['max_ulp']:.4f}",
                f"{r['argument']:.9g} (`{r['argmax']:#010x}`)",
                f"{share:.2f}%",
                f"{r['not_faithful']:,}",
                f"{r['count']:,}",
            ]
        )
    every = "every value" if result["stride"] == 1 else f"one value in {result['stride']}"
    return "\n".join(
        [
            provenance(ctx, name, result),
            "",
            f"Errors against float64, in ulps of the exact value's binade ({every}):",
            "",
            *_table(
                [
                    "implementation",
                    "max error (ulp)",
                    f"at {variable}",
                    "not correctly rounded",
                    "not faithfully rounded",
                    "values",
                ],
                rows,
                "|---|--:|--:|--:|--:|--:|",
            ),
        ]
    )


def log_sweep(ctx: Context) -> str:
    return _sweep(ctx, "log-sweep", "t")


def exp_sweep(ctx: Context) -> str:
    return _sweep(ctx, "exp-sweep", "x")


def logits_cpu(ctx: Context) -> str:
    result = ctx.load("logits-cpu")
    if result is None:
        return missing("logits-cpu")
    runs = result.get("runs") or [{"meta": result["meta"], "results": result["results"]}]
    meta = runs[0]["meta"]
    base = {"kldiv_spec.torch": "torch composition", "kldiv_spec numpy": "numpy composition"}
    rows = []
    for ours, theirs in base.items():
        speed, memory = [], []
        for run in runs:
            by = {r["implementation"]: r for r in run["results"]}
            if ours in by and theirs in by:
                speed.append(f"{by[theirs]['median_s'] / by[ours]['median_s']:.1f}x")
                if by[theirs]["extra_peak_mb"] > 0:
                    share = by[ours]["extra_peak_mb"] / by[theirs]["extra_peak_mb"]
                    memory.append(f"{100 * share:.0f}%")
        rows.append([f"`{ours}` against the {theirs}", ", ".join(speed), ", ".join(memory)])
    return "\n".join(
        [
            provenance(ctx, "logits-cpu", result),
            "",
            f"One distillation step (loss and student gradient), {meta['rows']} x "
            f"{meta['vocab']} float32, T = 2, median of {meta['repeats']} steps per run, "
            f"{len(runs)} run{'s' * (len(runs) > 1)} one after the other:",
            "",
            *_table(
                [
                    "implementation",
                    "speed vs its composition, per run",
                    "extra peak memory vs its composition, per run",
                ],
                rows,
            ),
        ]
    )


def fast_path_holes(ctx: Context) -> str:
    result = ctx.load("fast-path-holes")
    if result is None:
        return missing("fast-path-holes")
    meta = result["meta"]
    rows = []
    for r in result["rows"]:
        if "skipped" in r:
            rows.append([r["row"], "not run", "", r["skipped"]])
        elif "share" in r:
            met = "yes" if r["met"] else "**no**"
            rows.append(
                [r["row"], f"{100 * r['share']:.0f}%", f"at most {100 * r['target']:.0f}%", met]
            )
        elif r.get("target") is None:  # measured, without a target in the issue
            rows.append([r["row"], f"{r['ratio']:.2f}x", "none", "(measured)"])
        else:
            met = "yes" if r["met"] else "**no**"
            rows.append([r["row"], f"{r['ratio']:.2f}x", f"{r['target']:g}x", met])
    return "\n".join(
        [
            provenance(ctx, "fast-path-holes", result),
            "",
            f"Forward + backward, {meta['rows']} x {meta['vocab']}, median of {meta['repeats']} "
            f"steps per case, each case in its own process, {meta.get('rounds', 1)} "
            "interleaved round(s), a ratio the median of the rounds' (above 1: ours is faster):",
            "",
            *_table(["comparison", "ratio", "target", "met"], rows),
        ]
    )


def half_cpu(ctx: Context) -> str:
    result = ctx.load("half-cpu")
    if result is None:
        return missing("half-cpu")
    part = result["kl_div"]
    rows = []
    for r in part["torch"]:
        if "speedup_vs_F" in r:
            rows.append(
                [
                    f"`{r['implementation']}`, `{r['reduction']}`",
                    f"{r['speedup_vs_F']:.1f}x",
                    f"{r['speedup_vs_ours_float32']:.2f}x",
                ]
            )
    accuracy = [
        [
            f"{a['dtype']}, {a['inputs']} inputs",
            a["implementation"],
            f"{a['max_error_ulp']:.3f}",
            f"{a['not_correctly_rounded']} of {a['sums']}",
        ]
        for a in part["accuracy"]
    ]
    return "\n".join(
        [
            provenance(ctx, "half-cpu", result),
            "",
            f"`kl_div` forward and input gradient, {part['rows']} x {part['vocab']}, median of "
            f"{part['repeats']} interleaved rounds, one run (speed-ups within it):",
            "",
            *_table(["call", "vs `F.kl_div`, same dtype", "vs our float32 call"], rows),
            "",
            "The sum's error against an exact oracle (float64 `math.fsum` of the reference's "
            "terms), in ulps of the dtype:",
            "",
            *_table(
                ["sums", "implementation", "largest error (ulp)", "not correctly rounded"],
                accuracy,
            ),
        ]
    )


def hidden_cpu(ctx: Context) -> str:
    result = ctx.load("hidden-cpu")
    if result is None:
        return missing("hidden-cpu")
    by: dict[tuple[int, ...], dict[str, Any]] = {}
    for r in result["records"]:
        by.setdefault(tuple(r["shape"]), {})[r["method"]] = r
    rows = []
    for shape, methods in by.items():
        ours = methods.get("kl_div_from_hidden")
        for name, r in methods.items():
            speed = memory = ""
            if ours is not None and name != "kl_div_from_hidden" and "median_ms" in r:
                speed = f"{r['median_ms'] / ours['median_ms']:.2f}x"
                if "2x tokens" in name:  # twice the work: only its memory is compared
                    speed = "(twice the tokens)"
                if r.get("extra_peak_mb"):
                    memory = f"{100 * ours['extra_peak_mb'] / r['extra_peak_mb']:.0f}%"
            rows.append(
                [
                    " x ".join(str(v) for v in shape),
                    name,
                    f"{r['median_ms']:.0f}" if "median_ms" in r else "",
                    f"{r['extra_peak_mb']:.0f}" if "extra_peak_mb" in r else "",
                    speed,
                    memory,
                ]
            )
    return "\n".join(
        [
            provenance(ctx, "hidden-cpu", result),
            "",
            "Forward + backward (gradients for the student's hidden states and weight), "
            "tokens x hidden size x classes, float32, T = 2, one run, each method in its own "
            "process:",
            "",
            *_table(
                [
                    "shape",
                    "method",
                    "time (ms)",
                    "extra peak (MB)",
                    "`kl_div_from_hidden`'s speed-up over it",
                    "its memory against this one's",
                ],
                rows,
            ),
        ]
    )


def jsd_cpu(ctx: Context) -> str:
    result = ctx.load("jsd-cpu")
    if result is None:
        return missing("jsd-cpu")
    meta, by = result["meta"], {r["implementation"]: r for r in result["results"]}
    ours = ("kldiv_spec.torch", "kldiv_spec numpy")
    composition = {
        "kldiv_spec.torch": "torch composition",
        "kldiv_spec numpy": "numpy composition",
    }
    rows = []
    for name, r in by.items():
        if name in ours:
            continue
        speed = [
            f"{by[o]['implementation']}: {r['median_s'] / by[o]['median_s']:.1f}x"
            for o in ours
            if o in by
        ]
        rows.append([name, ", ".join(speed), f"{r['extra_peak_mb']:.0f}"])
    for o in ours:
        if o in by and composition[o] in by and by[composition[o]]["extra_peak_mb"] > 0:
            share = by[o]["extra_peak_mb"] / by[composition[o]]["extra_peak_mb"]
            rows.append(
                [
                    o,
                    f"(memory: {100 * share:.0f}% of the {composition[o]}'s)",
                    f"{by[o]['extra_peak_mb']:.0f}",
                ]
            )
    return "\n".join(
        [
            provenance(ctx, "jsd-cpu", result),
            "",
            f"One step (loss and student gradient) of the generalised JSD, beta = "
            f"{meta['beta']:g}, {meta['rows']} x {meta['vocab']} float32, median of "
            f"{meta['repeats']} steps, one run:",
            "",
            *_table(["implementation", "kldiv_spec's speed-up over it", "extra peak (MB)"], rows),
        ]
    )


def jax(ctx: Context) -> str:
    result = ctx.load("jax")
    if result is None:
        return missing("jax")
    by: dict[tuple[str, str], dict[str, float]] = {}
    for r in result["results"]:
        by.setdefault((f"{r['shape']} {r['dtype']}", r["case"]), {})[r["implementation"]] = r[
            "vs_jnp"
        ]
    rows = [
        [shape, f"`{case}`" if " " not in case else case.replace("fwd+bwd", "forward+backward"),
         f"{v.get('kldiv_spec', math.nan):.2f}", f"{v.get('kldiv_spec reference', math.nan):.2f}"]
        for (shape, case), v in by.items()
    ]  # fmt: skip
    repeats = result.get("meta", {}).get("repeats", "?")
    return "\n".join(
        [
            provenance(ctx, "jax", result),
            "",
            "`jax.jit` of a function calling `kldiv_spec.kl_div` against `jax.jit` of the `jnp` "
            "expression `sum(where(t == 0, 0, t log t) - t x)`: the expression's median time "
            f"over ours (above 1: ours is faster), {repeats} timed calls each, in turns:",
            "",
            *_table(
                ["shape", "case", "`kldiv_spec.kl_div`", "in `use_reference()`"],
                rows,
                "|---|---|--:|--:|",
            ),
        ]
    )


def dask_cluster(ctx: Context) -> str:
    result = ctx.load("dask-cluster")
    if result is None:
        return missing("dask-cluster")
    r = result["results"]
    import statistics

    def med(v: list[float]) -> float:
        return statistics.median(v)

    single = med([a + b for a, b in zip(r["numpy_generation_s"], r["numpy_loss_s"], strict=True)])
    rows = [
        ["cluster: generate + loss", med(r["cluster_loss_s"])],
        ["cluster: generation only", med(r["cluster_generation_only_s"])],
        ["single process: generate + loss (NumPy fast path)", single],
        ["single process: loss only (NumPy fast path)", med(r["numpy_loss_s"])],
    ]
    peaks = ", ".join(f"{v:.0f}" for v in r["worker_peak_rss_mib"].values())
    rows_, cols_ = r["shape"]
    return "\n".join(
        [
            provenance(ctx, "dask-cluster", result),
            "",
            f"`batchmean` over {r['input_bytes'] / 2**30:.2f} GiB of float32 (both operands, "
            f"{rows_:,} x {cols_:,}), generated lazily in {r['n_chunks']} chunks of "
            f"{r['chunk'][0]} x {r['chunk'][1]:,} and never materialised, on a `LocalCluster` "
            f"of {r['workers']} worker processes with a {r['memory_limit']} `memory_limit` each "
            f"(peak resident memory {peaks} MiB), against the same chunks generated and reduced "
            "one after the other in one process. Throughput relative to the single process's "
            f"generate + loss (median of {len(r['cluster_loss_s'])} rounds):",
            "",
            *_table(
                ["", "relative throughput"],
                [[w, f"{single / s:.2f}"] for w, s in rows],
                "|---|--:|",
            ),
        ]
    )


def per_call_cpu(ctx: Context) -> str:
    result = ctx.load("per-call-cpu")
    if result is None:
        return missing("per-call-cpu")
    rows = []
    for row in result["per_call"]:
        rows.append(
            [
                f"{row['shape'][0]}x{row['shape'][1]}",
                _ratio(row["torch_ratio"]),
                _ratio(row["numpy_ratio"]) if "numpy_ratio" in row else "-",
            ]
        )
    compiled = [
        [f"{r['shape'][0]}x{r['shape'][1]}", _ratio(r["ratio"]), _ratio(r["control_ratio"])]
        for r in result["compiled"]
    ]
    breaks = ", ".join(f"`{k}` {v}" for k, v in result["graph_breaks"].items())
    lines = [
        provenance(ctx, "per-call-cpu", result),
        "",
        'Forward, `reduction="batchmean"`, float32, no gradient: time of one call of ours over '
        "the peer's, median of the per-round ratios (min-max) over interleaved rounds (below 1: "
        "ours is faster; targets: at most 1.5 for small calls, at most 0.2 for large ones):",
        "",
        *_table(
            [
                "shape",
                "`kldiv_spec.torch.kl_div` / `F.kl_div`",
                "`kldiv_spec.kl_div` / NumPy expression",
            ],
            rows,
            "|---|--:|--:|",
        ),
        "",
        f"Graph breaks under `torch.compile(fullgraph=True)` (target 0): {breaks}.",
        "",
        "Compiled forward+backward step (`log_softmax`, the loss, `backward`), ours over the "
        "compiled `F.kl_div` step (target at most 1); the control is `F.kl_div`'s step "
        "compiled a second time, the harness's own spread:",
        "",
        *_table(["shape", "ratio", "control"], compiled, "|---|--:|--:|"),
    ]
    same = result.get("same_memory")
    if same:
        lines += [
            "",
            f"`'sum'` on {same['shape'][0]}x{same['shape'][1]} CPU tensors against the NumPy "
            "path on the same memory, speed of the tensors' call relative to the NumPy call "
            f"(target at least 1): {_ratio(same['forward_speed_vs_numpy'])}.",
        ]
    ac = result.get("autocast")
    if ac:
        lines += [
            "",
            f"Under `torch.autocast` ({ac['device']}): PyTorch gives {ac['pytorch_dtype']}, "
            f"kldiv_spec {ac['kldiv_spec_dtype']}; "
            + ("equal bit for bit." if ac["equal"] else "**the values differ**."),
        ]
    return "\n".join(lines)


def overview(ctx: Context) -> str:
    stamp_mod = _script("bench_stamp")
    rows = []
    for bench in _run().BENCHMARKS:
        result = ctx.load(bench.name)
        regenerate_it = f"`{regenerate(bench.name)}`" + (" (GPU)" if bench.gpu else "")
        if result is None:
            rows.append([bench.what, regenerate_it, "not measured at this commit", "", ""])
            continue
        s = result.get("stamp") or {}
        rows.append(
            [
                bench.what,
                regenerate_it,
                stamp_mod.describe_commit(s, 7),
                str(s.get("date", "?")).split(" ")[0],
                stamp_mod.describe_machine(s.get("machine", {})),
            ]
        )
    return "\n".join(
        _table(["figure", "regenerate with", "commit of its result", "date", "machine"], rows)
    )


#: The regions of the page, by ID, and what renders each.
RENDERERS: dict[str, Callable[[Context], str]] = {
    "overview": overview,
    "cpu-headline": cpu_headline,
    "targets": targets,
    "cpu-sweep": cpu_sweep,
    "gpu-h100": gpu_h100,
    "log-sweep": log_sweep,
    "accuracy-sum": accuracy_sum,
    "logits-cpu": logits_cpu,
    "fast-path-holes": fast_path_holes,
    "jsd-cpu": jsd_cpu,
    "half-cpu": half_cpu,
    "hidden-cpu": hidden_cpu,
    "exp-sweep": exp_sweep,
    "jax": jax,
    "dask-cluster": dask_cluster,
    "per-call-cpu": per_call_cpu,
}


def regions(text: str) -> list[str]:
    """Return the region IDs of a page, in order."""
    return [m[2] for m in REGION.finditer(text)]


def render(region: str, results: Path = RESULTS, page: Path = PAGE) -> str:
    """Return the Markdown of one region, from the result files in ``results``."""
    return RENDERERS[region](Context(results, page)).rstrip() + "\n"


def replaced(text: str, results: Path = RESULTS, page: Path = PAGE) -> str:
    """``text`` with every region rendered afresh; unknown regions raise KeyError."""

    def one(m: re.Match[str]) -> str:
        return f"{m[1]}\n{render(m[2], results, page)}\n{m[4]}"

    return REGION.sub(one, text)


def write(results: Path = RESULTS, page: Path = PAGE) -> bool:
    """Rewrite ``page``'s regions from ``results``; return whether anything changed."""
    text = page.read_text(encoding="utf-8")
    new = replaced(text, results, page)
    if new != text:
        page.write_text(new, encoding="utf-8")
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    args = parser.parse_args(argv)
    if args.check:
        text = PAGE.read_text(encoding="utf-8")
        if replaced(text) != text:
            print(
                f"{PAGE.relative_to(ROOT)} differs from benchmarks/results/: "
                "run python docs/_tools/bench_pages.py",
                file=sys.stderr,
            )
            return 1
        return 0
    changed = write()
    print(f"{PAGE.relative_to(ROOT)}: {'regenerated' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
