"""Exit statuses, loading implementations, and reports that say what failed (issue 18).

``kldiv-spec check`` exits 0 only when something was checked and passed, 1 on a
MUST failure, 2 when nothing could be judged (a usage error, an implementation
that cannot be loaded, a backend that is not installed, a machine that failed).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import kldiv_spec
from kldiv_spec.conformance import (
    CouldNotRun,
    Implementation,
    ResolveError,
    resolve,
    run,
)
from kldiv_spec.conformance.cli import main
from kldiv_spec.conformance.report import headline, summary, table

CHEAP = ["--property", "semantics.edge_values", "--max-examples", "2", "--quiet", "--no-isolate"]
NUMPY = ["--backend", "numpy", *CHEAP]

GOOD = """\
import kldiv_spec


def my_kl(input, target, reduction="mean", log_target=False):
    return kldiv_spec.kl_div(input, target, reduction=reduction, log_target=log_target)
"""


def _write(folder, name, text):
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


# --------------------------------------------------------------------------- exit 2


def test_a_backend_that_cannot_run_exits_2_in_one_line(capsys):
    # CuPy needs a GPU: on this machine (and in CI) it cannot run
    pytest.importorskip("numpy")
    status = main(["--impl", "mutant:no_xlogy_mask", "--backend", "cupy", *CHEAP])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and "--backend cupy cannot run here" in err[0]


def test_an_implementation_whose_library_is_missing_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    status = main(["--impl", "torch", *CHEAP])
    err = capsys.readouterr().err
    assert status == 2
    assert "needs 'torch'" in err and "pip install torch" in err
    assert "Traceback" not in err


def test_a_known_wrong_function_whose_backend_is_missing_does_not_pass(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    assert main(["--impl", "torch", "--backend", "torch", *CHEAP]) == 2


def test_an_exception_at_import_is_exit_2_with_one_line(tmp_path, capsys):
    path = _write(tmp_path, "broken.py", "raise RuntimeError('no config file')\n")
    status = main(["--impl", f"{path}:kl", *CHEAP])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and "RuntimeError: no config file" in err[0]


def test_sys_exit_at_import_does_not_end_the_check(tmp_path, capsys):
    path = _write(tmp_path, "quits.py", "import sys\nsys.exit(0)\n")
    assert main(["--impl", f"{path}:kl", *CHEAP]) == 2
    assert "SystemExit" in capsys.readouterr().err


def test_nothing_checked_exits_2(capsys):
    # a from-logits property of an implementation that has no from-logits function
    status = main(["--impl", "numpy", "--property", "math.logits_zero_at_identity", "--quiet"])
    assert status == 2
    assert "nothing was checked" in capsys.readouterr().err


# --------------------------------------------------------------------------- your own file


def test_a_file_path_works(tmp_path, capsys):
    path = _write(tmp_path, "mykl.py", GOOD)
    assert main(["--impl", f"{path}:my_kl", *NUMPY]) == 0


def test_a_relative_file_path_and_a_module_in_the_current_directory(tmp_path, monkeypatch, capsys):
    _write(tmp_path, "mykl_cwd.py", GOOD)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert main(["--impl", "./mykl_cwd.py:my_kl", *NUMPY]) == 0
    assert main(["--impl", "mykl_cwd:my_kl", *NUMPY]) == 0


def test_a_missing_module_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ResolveError, match="searched the current directory") as info:
        resolve("no_such_module_here:kl")
    assert "\n" not in str(info.value)
    with pytest.raises(ResolveError, match="no file"):
        resolve(str(tmp_path / "missing.py") + ":kl")
    with pytest.raises(ResolveError, match="has no attribute 'nope'"):
        resolve("math:nope")


# --------------------------------------------------------------------------- reports


def test_the_first_line_counts_must_and_should_apart():
    report = run("mutant:no_xlogy_mask", "numpy", max_examples=3, shrink=False)
    first = table(report).splitlines()[0]
    n_must = sum(o.status == "fail" and o.level == "MUST" for o in report.outcomes)
    assert n_must > 1
    assert first.startswith(f"{report.impl} on numpy: FAIL: ")
    assert f"{n_must} MUST properties failing" in first and "SHOULD failing" in first


def test_fixed_cases_all_run_and_every_distinct_failure_is_kept():
    # PyTorch's OpInfo samples are fixed cases under every reduction: a function
    # wrong under two of them has two distinct failures, each with its reproduction
    def kl(input, target, reduction="mean", log_target=False):
        out = kldiv_spec.kl_div(input, target, reduction=reduction, log_target=log_target)
        return {"sum": 2.0, "batchmean": 3.0}.get(reduction, 1.0) * out

    report = run(Implementation("two-bugs", kl), "numpy", names=["semantics.opinfo"])
    (outcome,) = report.outcomes
    assert outcome.status == "fail"
    shown = [f.reproduction for f in outcome.failures]
    assert len(outcome.failures) == 2
    assert any("reduction='sum'" in r for r in shown)
    assert any("reduction='batchmean'" in r for r in shown)
    assert "2 failure(s), 2 cause(s)" in table(report)


def test_one_unsupported_case_does_not_make_the_property_na():
    def from_logits(input, target, /, *, reduction="batchmean", mask=None, **options):
        if mask is not None and reduction == "none":  # as trl: 'none' with a mask
            raise NotImplementedError("'none' with a mask")
        return kldiv_spec.kl_div_from_logits(
            input, target, reduction=reduction, mask=mask, **options
        )

    impl = Implementation("no-none-with-mask", from_logits=from_logits)
    report = run(impl, "numpy", names=["accuracy.logits_options"], max_examples=2)
    (outcome,) = report.outcomes
    assert outcome.status == "pass", outcome.reason
    assert outcome.unsupported > 0 and outcome.examples > 0
    assert "n/a" in outcome.reason


def test_a_could_not_run_is_not_a_failure_and_exits_2(capsys):
    def no_driver(input, target, reduction="mean", log_target=False):
        raise RuntimeError("Found no NVIDIA driver on your system.")

    def no_kernel(input, target, reduction="mean", log_target=False):
        raise CouldNotRun("the kernel cannot run under TRITON_INTERPRET=1")

    for fn in (no_driver, no_kernel):
        report = run(Implementation("gpu-only", fn), "numpy", names=["math.non_negative"])
        assert report.status == "error", table(report)
        assert not report.failed
        assert "COULD NOT RUN" in headline(report)
        assert report.outcomes[0].reason.startswith("could not run: ")


def test_summary_has_one_line_per_cause():
    report = run("mutant:no_xlogy_mask", "numpy", max_examples=3, shrink=False)
    text = summary(report)
    assert "reproduce with" not in text and "minimal counterexample" not in text
    assert "cause(s):" in text


def test_reproduction_files_run_from_any_folder(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    _write(
        work,
        "bad_kl.py",
        """\
        import kldiv_spec


        def bad(input, target, reduction="mean", log_target=False):
            return 2 * kldiv_spec.kl_div(input, target, reduction=reduction, log_target=log_target)
        """,
    )
    out = tmp_path / "repro"
    status = main(
        [
            "--impl",
            f"{work / 'bad_kl.py'}:bad",
            "--property",
            "accuracy.pointwise",
            "--backend",
            "numpy",
            "--max-examples",
            "5",
            "--quiet",
            "--no-isolate",
            "--summary",
            "--repro-dir",
            str(out),
        ]
    )
    assert status == 1
    files = sorted(out.glob("*.py"))
    assert files
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(
        [sys.executable, str(files[0])], cwd=elsewhere, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "verdict:  differs" in done.stdout


def test_the_plugin_reports_a_bad_impl_as_one_usage_error(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--pyargs",
            "kldiv_spec.conformance",
            "--kldiv-impl",
            "no_such_module_here:kl",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 4, done.stdout + done.stderr
    assert "--kldiv-impl" in done.stderr and "no_such_module_here" in done.stderr
    assert "failed" not in done.stdout


# --------------------------------------------------------------------------- isolation


@pytest.mark.parametrize(
    ("body", "cause"),
    [
        ("raise SystemExit(0)", "SystemExit"),
        ("import os; os._exit(0)", "exit status 0"),
        ("import time; time.sleep(10**6)", "within"),
    ],
    ids=["sys.exit", "os._exit", "hang"],
)
def test_an_implementation_cannot_end_or_hang_the_check(tmp_path, capsys, body, cause):
    path = _write(
        tmp_path,
        "rogue.py",
        f"""\
        import numpy as np


        def kl(input, target, reduction="mean", log_target=False):
            {body}
        """,
    )
    argv = ["--impl", f"{path}:kl", "--property", "math.non_negative", "--max-examples", "2"]
    status = main([*argv, "--quiet", "--timeout", "1"])
    out = capsys.readouterr().out
    assert status == 1, out
    assert "FAIL math.non_negative [MUST]" in out
    assert cause in out


def test_os_exit_at_import_is_not_a_pass(tmp_path, capsys):
    path = _write(tmp_path, "exits_on_import.py", "import os\nos._exit(0)\n")
    argv = ["--impl", f"{path}:kl", "--backend", "numpy", "--property", "math.non_negative"]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exit status 0" in err[0]


def test_version_and_python_m():
    import kldiv_spec
    from kldiv_spec._cli import main as kldiv_spec_main

    done = subprocess.run(
        [sys.executable, "-m", "kldiv_spec", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0
    assert done.stdout.strip() == f"kldiv-spec {kldiv_spec.__version__}"
    assert kldiv_spec_main(["-V"]) == 0


def test_an_exception_is_its_own_cause_not_a_wrong_value():
    """torchtune's fully masked loss is a constant: taking its gradient raises."""
    from kldiv_spec.conformance.report import cause
    from kldiv_spec.conformance.runner import Outcome

    reason = "RuntimeError: element 0 of tensors does not require grad and does not have a grad_fn"
    raised = Outcome(
        "gradients.logits_oracle", "gradients", "", "fail", reason=reason,
        reproduction="kw = dict(reduction='rowmean', temperature=1.0)",
    )  # fmt: skip
    assert cause(raised) == "RuntimeError from the gradient, reduction='rowmean'"
    call = Outcome("accuracy.logits_oracle", "accuracy", "", "fail", reason="ValueError: bad")
    assert cause(call) == "ValueError from the call"
    wrong = Outcome("gradients.input", "gradients", "", "fail", reason="gradient w.r.t. input: 1")
    assert cause(wrong) == "values of the gradient w.r.t. input"
