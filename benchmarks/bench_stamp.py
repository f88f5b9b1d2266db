"""The stamp of a benchmark result: which commit, command, libraries and machine produced it.

Every result file under ``benchmarks/results/`` carries one: the JSON under its
``"stamp"`` key, the Markdown report as its first paragraph (:func:`describe`),
the CSV as columns. A stamp holds

``commit``, ``dirty``, ``dirty_paths``
    ``git rev-parse HEAD`` of the checkout, and whether (and where) its source
    differed from that commit; the benchmarks' own outputs (``benchmarks/results/``,
    ``docs/img/benchmarks-*.png``, ``docs/benchmarks.md``) do not count.
    ``benchmarks/run.py`` takes them once, before it starts, for every result of
    the run. Without git (a bare copy of the tree, as on a GPU machine)
    ``$KLDIV_BENCH_COMMIT`` and ``$KLDIV_BENCH_DIRTY`` (``0``/``1``) give them, else
    the commit is ``"unknown"``.
``command``, ``name``, ``invocation``, ``script``
    the command that regenerates this result (``nox -s bench -- NAME``, set by
    ``benchmarks/run.py`` through ``$KLDIV_BENCH_COMMAND``; the script's own command
    line when it was run by hand), the benchmark's NAME, the command actually typed
    (``nox -s bench -- all``, say) and the script's exact arguments.
``quick``
    whether this was a smoke run (small sizes: never a published figure).
``date``
    when the stamp was taken, as the benchmark ran (UTC).
``versions``
    Python, NumPy and the other libraries the benchmark uses, as installed, and
    where ``kldiv_spec`` was imported from.
``machine``
    CPU model (``/proc/cpuinfo``), logical and usable cores, SIMD extensions,
    memory, whether it is a virtual machine, the load average when the script
    started, and the GPU where one was used.
``env``
    the ``KLDIV_SPEC_*`` and thread-count variables that were set.

This is a module of the source tree's ``benchmarks/`` folder, imported by the
scripts beside it; it uses nothing of ``kldiv_spec`` but its import location.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ENV_COMMAND",
    "ENV_COMMIT",
    "ENV_DIRTY",
    "ENV_DIRTY_PATHS",
    "ENV_INVOCATION",
    "ENV_NAME",
    "ENV_QUICK",
    "describe",
    "git_state",
    "machine",
    "problems",
    "stamp",
    "versions",
]

ROOT = Path(__file__).resolve().parents[1]

ENV_COMMIT = "KLDIV_BENCH_COMMIT"
ENV_DIRTY = "KLDIV_BENCH_DIRTY"
ENV_DIRTY_PATHS = "KLDIV_BENCH_DIRTY_PATHS"
ENV_COMMAND = "KLDIV_BENCH_COMMAND"
ENV_INVOCATION = "KLDIV_BENCH_INVOCATION"
ENV_NAME = "KLDIV_BENCH_NAME"
ENV_QUICK = "KLDIV_BENCH_QUICK"

#: What the benchmarks write: a checkout that differs from its commit only here is clean.
OUTPUTS = ("benchmarks/results", "docs/img/benchmarks-*.png", "docs/benchmarks.md")

#: What to report for each library a script names: (key, distributions that provide it).
_DISTRIBUTIONS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "jax": (("jax", ("jax",)), ("jaxlib", ("jaxlib",))),
    "dask": (("dask", ("dask",)), ("distributed", ("distributed",))),
    "cupy": (("cupy", ("cupy", "cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x")),),
}

#: Environment variables that change what a benchmark measures.
_ENV = re.compile(r"^(KLDIV_SPEC_\w+|OMP_NUM_THREADS|MKL_NUM_THREADS|OPENBLAS_NUM_THREADS)$")

#: The load average when this module was imported (the scripts import it first thing).
_LOAD_AT_START = os.getloadavg() if hasattr(os, "getloadavg") else None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state() -> tuple[str, bool | None, list[str]]:
    """Return (commit, dirty, the first dirty paths) of the checkout the benchmarks run from.

    ``$KLDIV_BENCH_COMMIT`` (with ``$KLDIV_BENCH_DIRTY`` and the newline-separated
    ``$KLDIV_BENCH_DIRTY_PATHS``) wins over git; without either,
    ``("unknown", None, [])``. The benchmarks' outputs (:data:`OUTPUTS`) are not source.
    """
    commit = os.environ.get(ENV_COMMIT, "").strip()
    if commit:
        flag = os.environ.get(ENV_DIRTY, "").strip()
        paths = [p for p in os.environ.get(ENV_DIRTY_PATHS, "").split("\n") if p]
        return commit, (None if flag == "" else flag not in ("0", "false", "no")), paths
    head = _git("rev-parse", "HEAD")
    if head is None:
        return "unknown", None, []
    excluded = [f":(exclude,glob){p}" if "*" in p else f":(exclude){p}" for p in OUTPUTS]
    status = _git("status", "--porcelain", "--", ".", *excluded)
    if status is None:
        return head.strip(), None, []
    paths = [line[3:] for line in status.splitlines() if line.strip()]
    return head.strip(), bool(paths), paths[:20]


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty elsewhere)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    return fields


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def _gpu_name() -> str | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    with contextlib.suppress(Exception):
        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name())
    return None


def machine(*, gpu: bool = False) -> dict[str, Any]:
    """Name the machine: CPU model, cores, SIMD, memory, load at the start (and the GPU)."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out: dict[str, Any] = {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "simd": [f for f in ("avx2", "fma", "avx512f") if f in flags],
        "virtual_machine": "hypervisor" in flags,
        "memory_gib": _memory_gib(),
        "system": f"{platform.system()} {platform.machine()}",
        "load_average_at_start": (
            None if _LOAD_AT_START is None else [round(v, 2) for v in _LOAD_AT_START]
        ),
    }
    if gpu:
        out["gpu"] = _gpu_name()
    return out


def _version(names: Iterable[str]) -> str | None:
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return None


def versions(libraries: Iterable[str] = ()) -> dict[str, Any]:
    """Python, NumPy and ``libraries`` as installed (None: absent), and kldiv_spec's origin."""
    out: dict[str, Any] = {"python": platform.python_version()}
    for lib in ("numpy", *libraries):
        for key, dists in _DISTRIBUTIONS.get(lib, ((lib, (lib,)),)):
            out[key] = _version(dists)
    module = sys.modules.get("kldiv_spec")
    origin = getattr(module, "__file__", None)
    if origin:
        path = Path(origin).resolve().parent
        with contextlib.suppress(ValueError):
            path = path.relative_to(ROOT)
        out["kldiv_spec_from"] = path.as_posix()
    return out


def stamp(
    script: str | Path,
    argv: Sequence[str],
    *,
    libraries: Iterable[str] = (),
    gpu: bool = False,
    quick: bool = False,
) -> dict[str, Any]:
    """Return the stamp of a result that ``script`` (run with ``argv``) is writing now.

    ``libraries``: the ones the benchmark uses besides NumPy (``torch``, ``jax``,
    ``dask``, ...); ``gpu``: name the GPU too; ``quick``: a smoke run (also set by
    ``$KLDIV_BENCH_QUICK=1``).
    """
    path = Path(script).resolve()
    with contextlib.suppress(ValueError):
        path = path.relative_to(ROOT)
    runner = "bash" if path.suffix == ".sh" else "python"
    script_command = shlex.join([runner, path.as_posix(), *map(str, argv)])
    commit, dirty, dirty_paths = git_state()
    command = os.environ.get(ENV_COMMAND, "").strip() or script_command
    return {
        "commit": commit,
        "dirty": dirty,
        "dirty_paths": dirty_paths,
        "command": command,
        "name": os.environ.get(ENV_NAME, "").strip() or None,
        "invocation": os.environ.get(ENV_INVOCATION, "").strip() or command,
        "script": script_command,
        "quick": bool(quick or os.environ.get(ENV_QUICK, "") == "1"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions(libraries),
        "machine": machine(gpu=gpu),
        "env": {k: v for k, v in sorted(os.environ.items()) if _ENV.match(k)},
    }


_LIBRARY_NAMES = {
    "numpy": "NumPy",
    "torch": "PyTorch",
    "jax": "JAX",
    "dask": "Dask",
    "distributed": "distributed",
    "scipy": "SciPy",
    "triton": "Triton",
    "cupy": "CuPy",
    "mpmath": "mpmath",
}


def describe_machine(m: dict[str, Any]) -> str:
    """The machine of a stamp, in a few words."""
    cores = m.get("usable_cores") or m.get("cores")
    parts = [
        f"{m.get('cpu') or 'unknown CPU'}"
        + (" (virtual machine)" * bool(m.get("virtual_machine")))
    ]
    if cores:
        parts.append(f"{cores} cores" + (f" ({', '.join(m['simd'])})" if m.get("simd") else ""))
    if m.get("memory_gib"):
        parts.append(f"{m['memory_gib']} GiB")
    if m.get("gpu"):
        parts.append(str(m["gpu"]))
    return ", ".join(parts)


def describe_commit(s: dict[str, Any], length: int = 12) -> str:
    """The commit of a stamp, shortened, with its state: ``abc123 (clean)``."""
    commit = str(s.get("commit") or "unknown")
    short = commit[:length] if re.fullmatch(r"[0-9a-f]{40}", commit) else commit
    if s.get("stamped") is False:
        state = "written down by hand, not stamped at run time"
    elif s.get("dirty") is None:
        state = "state of the tree unknown"
    else:
        state = "with uncommitted changes" if s["dirty"] else "clean"
    return f"`{short}` ({state})"


def describe(s: dict[str, Any]) -> str:
    """One Markdown paragraph: command, commit, date, machine, versions (safe inside a report)."""
    v = s.get("versions", {})
    libs = ", ".join(
        f"{_LIBRARY_NAMES.get(k, k)} {val}"
        for k, val in v.items()
        if k not in ("python", "kldiv_spec_from") and val
    )
    load = s.get("machine", {}).get("load_average_at_start")
    text = (
        f"Produced by `{s.get('command', '?')}` at commit {describe_commit(s)}, "
        f"{s.get('date', '?')}"
        + (" (a quick smoke run: not a published figure)" if s.get("quick") else "")
        + f"; {describe_machine(s.get('machine', {}))}"
        + (f", load average {load[0]:.2f} at the start" if load else "")
        + f"; Python {v.get('python', '?')}"
        + (f", {libs}" if libs else "")
        + "."
    )
    if s.get("note"):
        text += f" {s['note']}"
    return text


def problems(s: object) -> list[str]:
    """What is missing from a stamp (empty: it names its commit, command, date and machine)."""
    if not isinstance(s, dict):
        return ["no stamp"]
    out = []
    commit = s.get("commit")
    if not (isinstance(commit, str) and re.fullmatch(r"[0-9a-f]{40}", commit)):
        out.append(f"commit is not a full git hash: {commit!r}")
    if not (isinstance(s.get("command"), str) and s["command"].strip()):
        out.append("no command")
    for key in ("date", "versions", "machine"):
        if not s.get(key):
            out.append(f"no {key}")
    if s.get("machine") and not s["machine"].get("cpu"):
        out.append("no CPU model")
    return out


def write_outputs(out: str | Path, result: dict[str, Any], markdown: str) -> None:
    """Write a benchmark's ``OUT.json`` (``result``) and ``OUT.md`` (``markdown``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_name(out.name + ".md").write_text(markdown)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the stamp a result written now would carry: JSON, or one line (``--summary``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    s = stamp(__file__, [])
    if "--summary" not in args:
        print(json.dumps(s, indent=1))
        return 0
    command = os.environ.get(ENV_COMMAND, "").strip()
    what = f"`{command}`" if command else "the command line of the script that writes them"
    print(f"stamp: commit {describe_commit(s)}; results record {what}")
    if s["commit"] == "unknown":
        print(
            f"stamp: no git here: results say commit 'unknown'; set {ENV_COMMIT}=<the output "
            f"of git rev-parse HEAD where this tree came from> (and {ENV_DIRTY}=0 or 1)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
