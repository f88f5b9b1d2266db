"""The ``kldiv-spec check`` command and the pytest plugin."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from kldiv_spec._cli import main as kldiv_spec_main
from kldiv_spec.conformance.cli import main


def test_passing_run_exits_0_and_writes_json(tmp_path, capsys):
    path = tmp_path / "report.json"
    status = main(
        [
            "--impl",
            "numpy",
            "--group",
            "semantics",
            "--max-examples",
            "3",
            "--json",
            str(path),
            "--quiet",
        ]
    )
    assert status == 0
    data = json.loads(path.read_text())
    assert data["status"] == "pass"
    (report,) = data["reports"]
    assert report["impl"] == "numpy" and report["backend"] == "numpy"
    assert {o["group"] for o in report["outcomes"]} == {"semantics"}
    out = capsys.readouterr().out
    assert "semantics.edge_values" in out and "property" in out


def test_failing_run_exits_1_and_prints_a_reproduction(capsys):
    status = main(["--impl", "mutant:eps_clamp", "--property", "semantics.edge_values", "--quiet"])
    assert status == 1
    out = capsys.readouterr().out
    assert "FAIL semantics.edge_values" in out
    assert "reproduce with:" in out and "resolve('mutant:eps_clamp')" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--backend", "fortran"],
        ["--impl", "no_such_impl"],
        ["--impl", "math:nope"],
        ["--property", "no.such"],
        ["--max-examples", "x"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2


def test_markdown_matrix(tmp_path):
    path = tmp_path / "matrix.md"
    status = main(
        [
            "--impl",
            "numpy",
            "--impl",
            "mutant:crash_empty",
            "--group",
            "semantics",
            "--max-examples",
            "2",
            "--no-shrink",
            "--markdown",
            str(path),
            "--quiet",
        ]
    )
    assert status == 1
    text = path.read_text()
    assert "| numpy | numpy | " in text
    assert "FAIL: empty" in text


def test_top_level_command_dispatches_to_check():
    assert (
        kldiv_spec_main(["check", "--impl", "numpy", "--property", "semantics.empty", "--quiet"])
        == 0
    )


def test_module_callable_impl(tmp_path):
    status = main(
        [
            "--impl",
            "kldiv_spec.conformance.numpy_impl:kl_div",
            "--backend",
            "numpy",
            "--group",
            "math",
            "--max-examples",
            "2",
            "--quiet",
        ]
    )
    assert status == 0


def test_pytest_plugin_runs_the_suite(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "kldiv_spec.conformance.pytest_plugin",
        "--pyargs",
        "kldiv_spec.conformance",
        "--kldiv-impl",
        "mutant:crash_empty",
        "--kldiv-max-examples",
        "2",
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        "semantics and (empty or opinfo)",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 failed, 1 passed" in proc.stdout, proc.stdout


def test_pytest_plugin_checks_a_from_logits_function(tmp_path):
    """``--kldiv-kind from-logits``: the user's function is checked as kl_div_from_logits."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "kldiv_spec.conformance.pytest_plugin",
        "--pyargs",
        "kldiv_spec.conformance",
        "--kldiv-impl",
        "kldiv_spec:kl_div_from_logits",
        "--kldiv-kind",
        "from-logits",
        "--kldiv-max-examples",
        "2",
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        "logits_zero_at_identity or logits_non_negative or semantics.empty",
        "-rs",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the two from-logits properties ran; the kl_div one is n/a (no kl_div function)
    assert "2 passed, 1 skipped" in proc.stdout, proc.stdout
    assert "no kl_div function" in proc.stdout or "has no kl_div" in proc.stdout, proc.stdout


def test_all_mutants_are_listed_and_one_property_rejects_one_of_them(tmp_path):
    from kldiv_spec.conformance.mutants import MUTANTS

    path = tmp_path / "report.json"
    status = main(
        ["--all-mutants", "--property", "semantics.empty", "--json", str(path), "--quiet"]
    )
    assert status == 1
    reports = json.loads(path.read_text())["reports"]
    assert [r["impl"] for r in reports] == [f"mutant:{m}" for m in MUTANTS]
    failed = {r["impl"] for r in reports if r["status"] == "fail"}
    assert "mutant:crash_empty" in failed
    assert "mutant:no_mean_warning" not in failed


@pytest.mark.parametrize("backend", ["jax", "dask"])
def test_max_examples_means_the_same_on_every_backend(backend, tmp_path, capsys):
    """The default of --help is what runs: no backend is silently given fewer examples."""
    pytest.importorskip("dask.array" if backend == "dask" else backend)
    from kldiv_spec.conformance.runner import DEFAULT_MAX_EXAMPLES

    path = tmp_path / "report.json"
    argv = ["--backend", backend, "--property", "semantics.empty", "--quiet", "--json", str(path)]
    assert main(argv) == 0
    (report,) = json.loads(path.read_text())["reports"]
    assert report["max_examples"] == DEFAULT_MAX_EXAMPLES
    header = capsys.readouterr().out.splitlines()[0]
    assert f"up to {DEFAULT_MAX_EXAMPLES} examples per property" in header
    assert main([*argv, "--max-examples", "7"]) == 0
    assert json.loads(path.read_text())["reports"][0]["max_examples"] == 7


def test_should_failures_are_reported_and_fail_only_under_strict(tmp_path, capsys):
    """A SHOULD failure (no 'mean' warning) exits 0, but 1 with --strict; MUST exits 1."""
    path, md = tmp_path / "report.json", tmp_path / "matrix.md"
    argv = ["--impl", "mutant:no_mean_warning", "--group", "semantics", "--max-examples", "2"]
    argv += ["--no-shrink", "--quiet", "--json", str(path), "--markdown", str(md)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "PASS: 0 MUST properties failing, 1 SHOULD failing" in out.splitlines()[0]
    assert "FAIL semantics.mean_warning [SHOULD]" in out
    data = json.loads(path.read_text())
    assert (data["status"], data["should_status"]) == ("pass", "fail")
    (report,) = data["reports"]
    levels = {o["name"]: o["level"] for o in report["outcomes"]}
    assert levels["semantics.mean_warning"] == "SHOULD" and levels["semantics.empty"] == "MUST"
    row = next(r for r in md.read_text().splitlines() if r.startswith("| mutant:no_mean"))
    assert row.endswith("| FAIL: semantics.mean_warning |")
    semantics = row.split("|")[5].strip()  # the MUST properties of the group only
    assert semantics.startswith("pass"), row
    assert main([*argv, "--strict"]) == 1
    must = ["--impl", "mutant:any_reduction", "--property", "semantics.bad_reduction", "--quiet"]
    assert main(must) == 1


def test_help_documents_the_levels_and_the_error_class_rule(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--strict" in out and "SHOULD" in out and "MUST" in out
    assert "AttributeError" in out  # a crash is a MUST failure


def test_the_backend_is_inferred_from_the_callables_module(tmp_path):
    """A torch callable without --backend runs on torch tensors, not on NumPy arrays."""
    pytest.importorskip("torch")
    path = tmp_path / "report.json"
    argv = ["--impl", "torch.nn.functional:kl_div", "--property", "semantics.empty"]
    assert main([*argv, "--quiet", "--json", str(path)]) == 0
    (report,) = json.loads(path.read_text())["reports"]
    assert report["backend"] == "torch" and report["status"] == "pass"


def test_inference_from_the_functions_imports():
    from kldiv_spec.conformance import numpy_impl
    from kldiv_spec.conformance.namespaces import infer_backend

    assert infer_backend(numpy_impl.kl_div) == "numpy"  # its module imports numpy only
    if importlib.util.find_spec("jax") is not None:
        import jax.numpy as jnp

        assert infer_backend(jnp.sum) == "jax"


def test_an_undecidable_backend_fails_fast_with_one_line(capsys):
    assert main(["--impl", "math:fsum", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --backend" in err[0] and "math:fsum" in err[0], err
