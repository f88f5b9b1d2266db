"""Regenerate the published benchmark figures, one NAME per figure: ``nox -s bench -- NAME``.

Each NAME runs one benchmark script of this folder with the arguments of its
published run, writes exactly its result files under ``benchmarks/results/`` (and
its plot under ``docs/img/``, if it has one), checks that it wrote those and
nothing else, and regenerates the figures of ``docs/benchmarks.md`` from the
result files (``docs/_tools/bench_pages.py``). Every result carries the stamp of
``benchmarks/bench_stamp.py``: the commit, ``nox -s bench -- NAME`` as its command,
the date, the library versions and the machine.

::

    python benchmarks/run.py --list             # the NAMEs: what each writes, how long it takes
    python benchmarks/run.py NAME [NAME ...]    # run them, then regenerate the page
    python benchmarks/run.py all                # every NAME this machine can run (no GPU: the
                                                #   GPU ones are skipped, and said so)
    python benchmarks/run.py NAME --quick       # smoke run: small sizes, seconds, into
                                                #   build/bench-quick/ (or --out DIR), with the
                                                #   page rendered there too; never a figure
    python benchmarks/run.py --pages            # only regenerate docs/benchmarks.md

``nox -s bench -- ARGS`` installs ``torch==2.13.0`` (CPU) first, then ``-e .[all,bench]``,
and runs this script with ARGS. Run the published NAMEs on an otherwise idle machine,
from a committed tree (the stamp says ``with uncommitted changes`` otherwise); a GPU
NAME runs ``benchmarks/gpu.sh`` on a CUDA machine, where it can also be run by hand.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))
import bench_stamp  # benchmarks/bench_stamp.py (this folder is no package)

__all__ = ["BENCHMARKS", "Benchmark", "main"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMG = ROOT / "docs" / "img"
QUICK_OUT = ROOT / "build" / "bench-quick"
PAGES = ROOT / "docs" / "_tools" / "bench_pages.py"

#: The command that regenerates a NAME, as the result files and the page name it.
LAUNCHER = "nox -s bench --"
#: The PyTorch the published figures are taken with (the noxfile's pin).
TORCH_PIN = "2.13.0"


@dataclass(frozen=True)
class Benchmark:
    """One published figure's benchmark: a script, its arguments, and what it writes.

    In ``args``, ``quick`` and ``writes``, ``{out}`` is the results folder and ``{img}``
    the plots' folder (``benchmarks/results`` and ``docs/img``; with ``--quick``, both
    the quick folder).
    """

    name: str
    what: str
    script: str
    #: The published run's arguments (split like a shell command line), and the smoke run's.
    args: str
    quick: str
    writes: tuple[str, ...]
    #: Minutes a full run takes on the 2-core AMD EPYC (KVM) of the published figures, idle
    #: (the GPU ones: on the H100).
    minutes: float
    needs: tuple[str, ...] = ()
    gpu: bool = False

    def argv(self, *, quick: bool, out: Path, img: Path) -> list[str]:
        """The script's command line (the interpreter first)."""
        runner = ["bash"] if self.script.endswith(".sh") else [sys.executable]
        args = shlex.split(self.quick if quick else self.args)
        return [*runner, self.script, *(_fill(a, out, img) for a in args)]

    def outputs(self, *, out: Path, img: Path) -> list[Path]:
        """The files this benchmark writes."""
        return [Path(_fill(w, out, img)) for w in self.writes]


def _fill(text: str, out: Path, img: Path) -> str:
    return text.replace("{out}", _rel(out)).replace("{img}", _rel(img))


def _rel(path: Path) -> str:
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path.resolve())


def _files(stem: str, *suffixes: str) -> tuple[str, ...]:
    return tuple(f"{{out}}/{stem}.{s}" for s in suffixes)


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "cpu-headline",
        "the headline and the targets: 4096x32000 float32, every implementation in one run",
        "benchmarks/cpu_bench.py",
        "--out {out} --name cpu-headline --shapes 4096x32000 --no-plot -v",
        "--out {out} --name cpu-headline --quick --shapes 64x1000 --repeats 1 --no-plot",
        _files("cpu-headline", "json", "csv", "md"),
        3,
        needs=("torch", "jax"),
    ),
    Benchmark(
        "cpu-sweep",
        "throughput against size (1e3 to 1.3e8 elements, float32 and float64), with the plot",
        "benchmarks/cpu_bench.py",
        "--out {out} --name cpu-sweep --plot {img}/benchmarks-cpu-sweep.png -v",
        "--out {out} --name cpu-sweep --quick --shapes 10x100 64x1000 --repeats 1 --no-memory"
        " --plot {img}/benchmarks-cpu-sweep.png",
        (*_files("cpu-sweep", "json", "csv", "md"), "{img}/benchmarks-cpu-sweep.png"),
        10,
        needs=("torch", "jax", "matplotlib"),
    ),
    Benchmark(
        "accuracy-sum",
        "rounding error of the float32 sums against exact oracles",
        "benchmarks/accuracy_sum.py",
        "--out {out}/accuracy-sum",
        "--out {out}/accuracy-sum --quick",
        _files("accuracy-sum", "json", "md"),
        1,
    ),
    Benchmark(
        "log-sweep",
        "the fused pass's float32 log over every positive finite float32",
        "benchmarks/log_sweep.py",
        "--out {out}/log-sweep",
        "--out {out}/log-sweep --stride 100003",
        _files("log-sweep", "json", "md"),
        3,
    ),
    Benchmark(
        "exp-sweep",
        "the from-logits kernel's float32 exp over every float32 in [-104, 89]",
        "benchmarks/exp_sweep.py",
        "--out {out}/exp-sweep",
        "--out {out}/exp-sweep --stride 100003",
        _files("exp-sweep", "json", "md"),
        3,
    ),
    Benchmark(
        "logits-cpu",
        "one distillation step from logits, 2048x32000, against the composition (3 runs)",
        "benchmarks/logits_bench.py",
        "--runs 3 --repeats 5 --out {out}/logits-cpu",
        "--runs 1 --rows 64 --vocab 1000 --repeats 1 --out {out}/logits-cpu",
        _files("logits-cpu", "json", "md"),
        3,
        needs=("torch",),
    ),
    Benchmark(
        "fast-path-holes",
        "issue 20's table: half precision, -inf classes and the JSD against their peers, "
        "2048x32000",
        "benchmarks/holes_bench.py",
        "--repeats 7 --rounds 3 --out {out}/fast-path-holes",
        "--quick --out {out}/fast-path-holes",
        _files("fast-path-holes", "json", "md"),
        16,
        needs=("torch",),
    ),
    Benchmark(
        "half-cpu",
        "kl_div in bfloat16/float16 on the CPU: fwd+bwd against F.kl_div and float32, NumPy "
        "float16, accuracy in ulps, 2048x32000",
        "benchmarks/half_bench.py",
        "--repeats 7 --out {out}/half-cpu",
        "--quick --out {out}/half-cpu",
        _files("half-cpu", "json", "md"),
        8,
        needs=("torch",),
    ),
    Benchmark(
        "jsd-cpu",
        "one generalised-JSD distillation step (beta 0.5), 2048x32000, against trl, "
        "Liger-Kernel and the compositions, with memory",
        "benchmarks/jsd_bench.py",
        "--repeats 5 --out {out}/jsd-cpu",
        "--quick --out {out}/jsd-cpu",
        _files("jsd-cpu", "json", "md"),
        4,
        needs=("torch", "trl", "liger_kernel"),
    ),
    Benchmark(
        "hidden-cpu",
        "issue 21's table: distillation from hidden states against the composition and "
        "Liger-Kernel, 2048x1024x32000 and 1024x2048x128256, time and extra peak memory",
        "benchmarks/hidden_bench.py",
        "--repeats 4 --rounds 3 --out {out}/hidden-cpu",
        "--quick --out {out}/hidden-cpu",
        _files("hidden-cpu", "json", "md"),
        30,
        needs=("torch",),
    ),
    Benchmark(
        "jax",
        "jitted kldiv_spec.kl_div against a jitted jnp expression, 2048x32000",
        "benchmarks/jax_bench.py",
        "--shapes 2048x32000 --repeats 21 --out {out} --name jax",
        "--shapes 64x1000 --repeats 1 --out {out} --name jax",
        _files("jax", "json", "md"),
        2,
        needs=("jax",),
    ),
    Benchmark(
        "dask-cluster",
        "32 GiB (more than memory) on a LocalCluster of 2 bounded workers",
        "benchmarks/dask_cluster.py",
        "--size 32GiB --repeats 2 --out {out}",
        "--size 8MiB --cols 1000 --chunk-rows 256 --workers 1 --repeats 1 --numpy-chunks 2"
        " --out {out}",
        _files("dask-cluster", "json", "md"),
        8,
        needs=("dask", "distributed"),
    ),
    Benchmark(
        "per-call-cpu",
        "per-call cost from 10 to 1e8 elements, torch.compile steps, autocast",
        "benchmarks/per_call.py",
        "--max-elements 1e8 --rounds 21 --compile-rounds 63 --out {out}/per-call-cpu",
        "--quick --out {out}/per-call-cpu",
        _files("per-call-cpu", "json", "md"),
        5,
        needs=("torch",),
    ),
    Benchmark(
        "gpu-h100",
        "the GPU check on an H100: Triton and CuPy paths against torch eager and torch.compile",
        "benchmarks/gpu.sh",
        "--name gpu-h100 --results {out} --img {img}",
        "--dry-run --name gpu-h100 --results {out} --img {img}",
        (*_files("gpu-h100", "json", "md"), "{img}/benchmarks-gpu-h100.png"),
        4,
        needs=("torch",),
        gpu=True,
    ),
)

BY_NAME = {b.name: b for b in BENCHMARKS}


def command(name: str, *, quick: bool = False) -> str:
    """The command that regenerates result ``name``, as its stamp records it."""
    launcher = os.environ.get("KLDIV_BENCH_LAUNCHER", "").strip() or "python benchmarks/run.py"
    return f"{launcher} {name}" + (" --quick" if quick else "")


def _cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    code = "import sys, torch; sys.exit(not torch.cuda.is_available())"
    return subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def _missing(bench: Benchmark) -> list[str]:
    return [m for m in bench.needs if importlib.util.find_spec(m) is None]


def _snapshot(folders: list[Path]) -> dict[Path, float]:
    out: dict[Path, float] = {}
    for folder in folders:
        if folder.is_dir():
            out |= {p.resolve(): p.stat().st_mtime for p in folder.rglob("*") if p.is_file()}
    return out


def run_one(bench: Benchmark, *, quick: bool, out: Path, img: Path, invocation: str) -> None:
    """Run one benchmark; raise RuntimeError unless it wrote exactly its files, stamped."""
    argv = bench.argv(quick=quick, out=out, img=img)
    expected = {p.resolve() for p in bench.outputs(out=out, img=img)}
    out.mkdir(parents=True, exist_ok=True)
    img.mkdir(parents=True, exist_ok=True)
    watched = sorted({out, img, *(p.parent for p in expected)})
    before = _snapshot(watched)
    commit, dirty, dirty_paths = bench_stamp.git_state()
    env = os.environ | {
        bench_stamp.ENV_COMMAND: command(bench.name, quick=quick),
        bench_stamp.ENV_NAME: bench.name,
        bench_stamp.ENV_INVOCATION: invocation,
        bench_stamp.ENV_QUICK: "1" if quick else "0",
        # the tree's state when the run began, for every result of it
        bench_stamp.ENV_COMMIT: commit,
        bench_stamp.ENV_DIRTY: "" if dirty is None else str(int(dirty)),
        bench_stamp.ENV_DIRTY_PATHS: "\n".join(dirty_paths),
        "PYTHON": sys.executable,  # gpu.sh
        "MPLBACKEND": "Agg",
    }
    print(f"== {bench.name}: {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env=env, check=False)
    elapsed = time.perf_counter() - start
    after = _snapshot(watched)
    changed = {p for p, t in after.items() if before.get(p) != t}
    problems = []
    if done.returncode != 0:
        problems.append(f"exit status {done.returncode}")
    problems += [f"did not write {_rel(p)}" for p in sorted(expected - changed)]
    problems += [f"wrote {_rel(p)}, which is not its file" for p in sorted(changed - expected)]
    for path in sorted(p for p in expected & changed if p.suffix == ".json"):
        stamp = json.loads(path.read_text(encoding="utf-8")).get("stamp")
        if not isinstance(stamp, dict) or stamp.get("name") != bench.name:
            problems.append(f"{_rel(path)} carries no stamp of {bench.name}")
    print(f"== {bench.name}: {elapsed:.0f} s" + (f"; {'; '.join(problems)}" if problems else ""))
    if problems:
        raise RuntimeError(f"{bench.name}: " + "; ".join(problems))


def pages_module() -> ModuleType:
    """``docs/_tools/bench_pages.py``, imported by path."""
    spec = importlib.util.spec_from_file_location("_kldiv_bench_pages", PAGES)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def listing() -> str:
    """The NAMEs as a table: estimated minutes, the command, what it writes."""
    lines = []
    for b in BENCHMARKS:
        files = ", ".join(_fill(w, RESULTS, IMG) for w in b.writes)
        gpu = " [a CUDA GPU; `all` skips it without one]" if b.gpu else ""
        lines += [
            f"{b.name:14s} ~{b.minutes:g} min  {b.what}{gpu}",
            f"{'':14s} {LAUNCHER} {b.name}  ->  {files}",
        ]
    total = sum(b.minutes for b in BENCHMARKS if not b.gpu)
    lines.append(f"{'all':14s} ~{total:g} min  every NAME above this machine can run (CPU)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the named benchmarks (or list them); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help="NAMEs, or all")
    parser.add_argument("--list", action="store_true", help="list the NAMEs and exit")
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, seconds")
    parser.add_argument(
        "--out", type=Path, help=f"with --quick: folder (default {_rel(QUICK_OUT)})"
    )
    parser.add_argument("--pages", action="store_true", help="regenerate docs/benchmarks.md")
    parser.add_argument("--keep-going", action="store_true", help="run the others after a failure")
    args = parser.parse_args(argv)
    if args.list:
        print(listing())
        return 0
    if args.out is not None and not args.quick:
        parser.error("--out is for --quick runs: published results go to benchmarks/results")
    unknown = [n for n in args.names if n != "all" and n not in BY_NAME]
    if unknown:
        parser.error(f"unknown NAME {', '.join(unknown)}; --list lists them")
    if not args.names and not args.pages:
        parser.error("name a benchmark (--list lists them), or all, or --pages")
    names = [b.name for b in BENCHMARKS] if "all" in args.names else args.names
    names = list(dict.fromkeys(names))
    out = (args.out or QUICK_OUT) if args.quick else RESULTS
    img = out if args.quick else IMG
    launcher = os.environ.get("KLDIV_BENCH_LAUNCHER", "").strip() or "python benchmarks/run.py"
    invocation = f"{launcher} {shlex.join(argv)}"
    cuda = None
    failed, skipped = [], []
    for name in names:
        bench = BY_NAME[name]
        if bench.gpu and not args.quick:
            cuda = _cuda() if cuda is None else cuda
            if not cuda:
                why = "torch sees no CUDA device: run it on a GPU machine"
                if "all" not in args.names:
                    print(f"{name}: {why} ({bench.script})", file=sys.stderr)
                    return 2
                skipped.append(f"{name} ({why})")
                continue
        missing = _missing(bench)
        if missing:
            failed.append(f"{name} (not installed: {', '.join(missing)})")
            continue
        try:
            run_one(bench, quick=args.quick, out=out, img=img, invocation=invocation)
        except RuntimeError as error:
            failed.append(str(error))
            if not (args.keep_going or "all" in args.names):
                break
    if names or args.pages:
        pages = pages_module()
        page = out / "benchmarks.md" if args.quick else pages.PAGE
        if args.quick:
            page.write_text(pages.replaced(pages.PAGE.read_text(encoding="utf-8"), out, page))
        else:
            pages.write()
        print(f"regenerated the figures of {_rel(page)} from {_rel(out)}")
    for line in skipped:
        print(f"skipped: {line}", file=sys.stderr)
    for line in failed:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
