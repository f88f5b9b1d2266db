"""Every published benchmark figure names its command and commit, and agrees with its result.

``docs/benchmarks.md``'s figures are generated from ``benchmarks/results/`` by
``docs/_tools/bench_pages.py``; each result file carries the stamp of
``benchmarks/bench_stamp.py``; each result belongs to a NAME of
``benchmarks/run.py`` (``nox -s bench -- NAME``), which regenerates it. The smoke
tests run benchmarks in their ``--quick`` mode through ``benchmarks/run.py``, the
code path of the published runs, into a temporary folder.
"""

from __future__ import annotations

import ast
import csv
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from _support import load_script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMG = ROOT / "docs" / "img"


@pytest.fixture(scope="module")
def run() -> ModuleType:
    return load_script(ROOT / "benchmarks" / "run.py", "_test_bench_run")


@pytest.fixture(scope="module")
def pages(run: ModuleType) -> ModuleType:
    return run.pages_module()


@pytest.fixture(scope="module")
def stamps() -> ModuleType:
    return load_script(ROOT / "benchmarks" / "bench_stamp.py", "_test_bench_stamp")


def _writes(run: ModuleType) -> dict[Path, str]:
    """Every file a NAME writes, to that NAME."""
    return {p.resolve(): b.name for b in run.BENCHMARKS for p in b.outputs(out=RESULTS, img=IMG)}


# ----------------------------------------------------------------------------- the page


def test_the_page_agrees_with_the_result_files(pages):
    text = pages.PAGE.read_text(encoding="utf-8")
    assert pages.replaced(text) == text, "run python docs/_tools/bench_pages.py"


def test_every_region_is_rendered_and_every_renderer_has_its_region(pages):
    found = pages.regions(pages.PAGE.read_text(encoding="utf-8"))
    assert sorted(found) == sorted(pages.RENDERERS)
    assert len(found) == len(set(found))


def test_every_name_has_its_figure_with_its_command_and_commit(run, pages):
    text = pages.PAGE.read_text(encoding="utf-8")
    regions = {m[2]: m[3] for m in pages.REGION.finditer(text)}
    for bench in run.BENCHMARKS:
        assert bench.name in regions, f"docs/benchmarks.md shows no figure of {bench.name}"
        body = regions[bench.name]
        assert f"`nox -s bench -- {bench.name}`" in body
        path = RESULTS / f"{bench.name}.json"
        if path.is_file():
            commit = json.loads(path.read_text(encoding="utf-8"))["stamp"]["commit"]
            assert f"`{commit[:12]}`" in body
            assert f"`{commit[:7]}`" in regions["overview"]
        else:
            assert "Not measured at this commit" in body


# ----------------------------------------------------------------------------- the results


def test_every_result_file_carries_a_stamp_with_a_commit_and_a_command(run, stamps):
    jsons = sorted(RESULTS.glob("*.json"))
    assert jsons
    for path in jsons:
        stamp = json.loads(path.read_text(encoding="utf-8")).get("stamp")
        assert stamps.problems(stamp) == [], path.name
        assert stamp["quick"] is False, f"{path.name} is a smoke run"
        assert stamp["name"] == path.stem and path.stem in run.BY_NAME
        if stamp.get("stamped", True):
            assert stamp["command"] == f"nox -s bench -- {path.stem}", path.name
    for path in sorted(RESULTS.iterdir()):
        stamp = json.loads((RESULTS / f"{path.stem}.json").read_text(encoding="utf-8"))["stamp"]
        if path.suffix == ".md":
            text = path.read_text(encoding="utf-8")
            assert stamp["commit"][:7] in text and stamp["command"] in text, path.name
        elif path.suffix == ".csv":
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            assert all(r["commit"] == stamp["commit"] for r in rows), path.name


def test_every_result_and_plot_is_regenerated_by_a_name(run):
    owners = _writes(run)
    orphans = [p.name for p in RESULTS.iterdir() if p.resolve() not in owners]
    orphans += [p.name for p in IMG.glob("benchmarks-*.png") if p.resolve() not in owners]
    assert orphans == [], "no NAME of benchmarks/run.py writes these"


def test_the_gpu_figure_says_what_it_is(pages):
    """The H100 run predates the stamps and the PyTorch pin: the page says so."""
    result = json.loads((RESULTS / "gpu-h100.json").read_text(encoding="utf-8"))
    body = pages.render("gpu-h100")
    if result["stamp"].get("stamped", True) is False:
        assert "not stamped at run time" in body
    if not result["stamp"]["versions"]["torch"].startswith("2.13.0"):
        assert f"Taken on PyTorch {result['stamp']['versions']['torch']}" in body


def test_a_missing_result_is_said_to_be_missing(pages, tmp_path):
    body = pages.render("cpu-headline", tmp_path, tmp_path / "page.md")
    assert "Not measured at this commit" in body
    assert "`nox -s bench -- cpu-headline`" in body


# ----------------------------------------------------------------------------- the stamp


def test_stamp_without_git_takes_the_commit_from_the_environment(stamps, monkeypatch):
    monkeypatch.setenv("KLDIV_BENCH_COMMIT", "a" * 40)
    monkeypatch.setenv("KLDIV_BENCH_DIRTY", "1")
    monkeypatch.setenv("KLDIV_BENCH_DIRTY_PATHS", "x.py\ny.py")
    monkeypatch.setenv("KLDIV_BENCH_COMMAND", "nox -s bench -- x")
    s = stamps.stamp(ROOT / "benchmarks" / "x.py", ["--a", "b c"], libraries=("dask",))
    assert (s["commit"], s["dirty"], s["dirty_paths"]) == ("a" * 40, True, ["x.py", "y.py"])
    assert s["command"] == "nox -s bench -- x"
    assert s["script"] == "python benchmarks/x.py --a 'b c'"
    assert {"python", "numpy", "dask", "distributed"} <= set(s["versions"])
    assert stamps.problems(s) == []
    assert "with uncommitted changes" in stamps.describe(s)


def test_stamp_problems_name_what_is_missing(stamps):
    assert stamps.problems(None) == ["no stamp"]
    assert any("commit" in p for p in stamps.problems({"commit": "unknown", "command": "x"}))


def test_stamp_ignores_the_benchmarks_own_outputs(stamps):
    if stamps._git("rev-parse", "HEAD") is None:
        pytest.skip("not a git checkout")
    _, _, paths = stamps.git_state()
    assert not [p for p in paths if p.startswith(("benchmarks/results", "docs/img/bench"))]


# ----------------------------------------------------------------------------- run.py, nox


def test_list_names_every_benchmark_and_all(run, capsys):
    assert run.main(["--list"]) == 0
    out = capsys.readouterr().out
    for bench in run.BENCHMARKS:
        assert f"nox -s bench -- {bench.name}" in out
    assert "\nall " in out


def test_unknown_names_are_refused(run, capsys):
    with pytest.raises(SystemExit):
        run.main(["no-such-benchmark"])
    assert "unknown NAME" in capsys.readouterr().err


def test_nox_bench_installs_the_pinned_torch_first():
    tree = ast.parse((ROOT / "noxfile.py").read_text(encoding="utf-8"))
    bench = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "bench")
    source = ast.unparse(bench)
    assert source.index("session.install(TORCH)") < source.index("'-e', '.[all,bench]'")
    assert "benchmarks/run.py" in source


def test_quick_runs_go_through_run_py(run, tmp_path, monkeypatch):
    """accuracy-sum and log-sweep, --quick: their files, stamped, and the page from them."""
    pytest.importorskip("mpmath")
    monkeypatch.setenv("KLDIV_BENCH_LAUNCHER", "nox -s bench --")
    out = tmp_path / "quick"
    assert run.main(["accuracy-sum", "log-sweep", "--quick", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "accuracy-sum.json",
        "accuracy-sum.md",
        "benchmarks.md",
        "log-sweep.json",
        "log-sweep.md",
    ]
    for name in ("accuracy-sum", "log-sweep"):
        stamp = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))["stamp"]
        assert stamp["command"] == f"nox -s bench -- {name} --quick"
        assert stamp["name"] == name and stamp["quick"] is True
        assert "--quick" in stamp["invocation"]
    page = (out / "benchmarks.md").read_text(encoding="utf-8")
    assert page.count("**A quick smoke run: small sizes, not a figure.**") == 2
    assert "| fused log_f32 |" in page


@pytest.mark.slow
def test_quick_cpu_headline_goes_through_run_py(run, tmp_path):
    """The CPU benchmark's smoke run, as ``nox -s bench -- cpu-headline --quick`` runs it."""
    pytest.importorskip("torch")
    out = tmp_path / "quick"
    done = subprocess.run(
        [sys.executable, "benchmarks/run.py", "cpu-headline", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "benchmarks.md",
        "cpu-headline.csv",
        "cpu-headline.json",
        "cpu-headline.md",
    ]
    page = (out / "benchmarks.md").read_text(encoding="utf-8")
    assert "| kldiv_spec numpy |" in page and "| NumPy path >= 8x PyTorch eager" in page
