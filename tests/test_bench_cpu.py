"""The CPU benchmark script (``benchmarks/cpu_bench.py``) writes only where it is told, stamped.

It is a script of the source tree, not part of the installed package, and the
``kldiv-spec`` command has no ``bench`` subcommand (``nox -s bench`` runs the
benchmarks). The roofline (hundreds of MB read) is replaced by fixed figures here:
these tests check the files, not speed.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from kldiv_spec._cli import main as kldiv_spec_main

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "cpu_bench.py"
TINY = ["--shapes", "4x10", "--repeats", "1", "--no-memory", "--name", "tiny"]
TINY += ["--implementations", "kldiv_spec numpy", "plain numpy"]


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("cpu_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "cpu_bench", module)  # its dataclass looks itself up
    spec.loader.exec_module(module)
    roof = {
        "threads": 1,
        "read_bandwidth_gbps": 10.0,
        "np_log_float32_ns_per_element_one_core": 1.0,
        "log_ceiling_float32_gbps": 8.0,
    }
    monkeypatch.setattr(module, "roofline", lambda quick: roof)
    for name in ("KLDIV_BENCH_COMMAND", "KLDIV_BENCH_NAME", "KLDIV_BENCH_QUICK"):
        monkeypatch.delenv(name, raising=False)
    return module


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_writes_only_into_out(bench, tmp_path, monkeypatch, capsys):
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert bench.main(["--out", str(out), *TINY]) == 0
    plotted = importlib.util.find_spec("matplotlib") is not None
    assert files(out) == ["tiny.csv", "tiny.json", "tiny.md"] + ["tiny.png"] * plotted
    assert files(cwd) == []
    result = json.loads((out / "tiny.json").read_text())
    # three headline cases (sum, none, batchmean with its gradients) per implementation
    assert len(result["records"]) == 6
    assert result["command"].startswith("python benchmarks/cpu_bench.py --out ")
    assert "'kldiv_spec numpy'" in result["command"]  # quoted: the command can be rerun
    assert "| kldiv_spec numpy |" in capsys.readouterr().out


def test_every_file_is_stamped(bench, tmp_path):
    out = tmp_path / "out"
    assert bench.main(["--out", str(out), "--no-plot", *TINY]) == 0
    assert files(out) == ["tiny.csv", "tiny.json", "tiny.md"]
    stamp = json.loads((out / "tiny.json").read_text())["stamp"]
    assert stamp["command"] == stamp["script"]  # run by hand: its own command line
    assert stamp["quick"] is False
    assert stamp["machine"]["cpu"] and stamp["machine"]["cores"]
    assert stamp["versions"]["python"] and stamp["versions"]["numpy"]
    assert isinstance(stamp["commit"], str) and stamp["commit"]
    short = stamp["commit"][:12]
    assert f"Produced by `{stamp['command']}` at commit `{short}`" in (out / "tiny.md").read_text()
    with (out / "tiny.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["commit"] == stamp["commit"] for r in rows)
    assert all(r["command"] == stamp["command"] for r in rows)


def test_stamp_takes_the_command_from_run_py(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("KLDIV_BENCH_COMMAND", "nox -s bench -- tiny")
    monkeypatch.setenv("KLDIV_BENCH_NAME", "tiny")
    monkeypatch.setenv("KLDIV_BENCH_COMMIT", "0" * 40)
    monkeypatch.setenv("KLDIV_BENCH_DIRTY", "0")
    assert bench.main(["--out", str(tmp_path), "--no-plot", *TINY]) == 0
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert result["command"] == result["stamp"]["command"] == "nox -s bench -- tiny"
    assert result["stamp"]["script"].startswith("python benchmarks/cpu_bench.py --out ")
    assert (result["stamp"]["commit"], result["stamp"]["dirty"]) == ("0" * 40, False)
    assert result["stamp"]["name"] == "tiny"


def test_plot_goes_where_told(bench, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    plot = tmp_path / "img" / "benchmarks-{name}.png"
    assert bench.main(["--out", "results", "--plot", str(plot), *TINY]) == 0
    assert files(tmp_path) == [
        "img/benchmarks-tiny.png",
        "results/tiny.csv",
        "results/tiny.json",
        "results/tiny.md",
    ]


def test_out_is_required(bench, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(TINY)
    assert exit_info.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_kldiv_spec_has_no_bench_command(capsys):
    assert kldiv_spec_main(["bench"]) == 2
    assert kldiv_spec_main(["--help"]) == 0
    assert "bench" not in capsys.readouterr().out
