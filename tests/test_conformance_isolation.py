"""The implementation under test cannot end or hang the check (issue 18).

``guard`` turns SystemExit-like exceptions and overlong calls into failures inside
the process; ``run_isolated`` runs the check in a child process so that
``os._exit``, a crash or a hang the alarm cannot interrupt is a failure of the
property in progress, and the properties after it still run.
"""

from __future__ import annotations

import dataclasses
import signal
import textwrap
import time

import pytest

from kldiv_spec.conformance import Implementation, isolation, runner
from kldiv_spec.conformance.isolation import (
    DEFAULT_TIMEOUT,
    CallTimeout,
    ImplementationError,
    Monitor,
    ResolveError,
    guard,
    run_isolated,
)
from kldiv_spec.conformance.namespaces import infer_backend

pytestmark = pytest.mark.skipif(
    not hasattr(signal, "SIGALRM"), reason="POSIX only (SIGALRM, pass_fds)"
)

#: Cheap properties: a hypothesis one, fixed cases, and one that expects a refusal.
NAMES = ["math.non_negative", "semantics.edge_values", "semantics.bad_reduction"]

_SIGNATURE = "def kl(input, target, reduction='mean', log_target=False):"

IMPLEMENTATIONS = {
    "good": f"""
        import kldiv_spec
        {_SIGNATURE}
            return kldiv_spec.kl_div(input, target, reduction=reduction, log_target=log_target)
    """,
    "exits": f"""
        {_SIGNATURE}
            raise SystemExit(0)
    """,
    "interrupts": f"""
        {_SIGNATURE}
            raise KeyboardInterrupt
    """,
    "os_exit": f"""
        import os
        {_SIGNATURE}
            print("about to leave")
            os._exit(0)
    """,
    "sleeps": f"""
        import time
        {_SIGNATURE}
            time.sleep(1e6)
    """,
    "deaf": f"""
        import signal, time
        {_SIGNATURE}
            signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGALRM}})  # as C code would
            time.sleep(1e6)
    """,
    "segfaults": f"""
        import os, signal
        {_SIGNATURE}
            os.kill(os.getpid(), signal.SIGSEGV)
    """,
    "raises_at_import": """
        raise RuntimeError("boom at import")
    """,
    "exits_at_import": """
        import os
        os._exit(0)
    """,
    # Fine until a reduction it dislikes: it dies on 'batch_mean' only.
    "dies_on_bad_reduction": f"""
        import os
        import kldiv_spec
        {_SIGNATURE}
            if reduction == "batch_mean":
                os._exit(3)
            return kldiv_spec.kl_div(input, target, reduction=reduction, log_target=log_target)
    """,
}


@pytest.fixture
def impls(tmp_path, monkeypatch):
    """Write the implementations as modules ``isol_NAME`` importable here and in the child."""
    for name, code in IMPLEMENTATIONS.items():
        (tmp_path / f"isol_{name}.py").write_text(textwrap.dedent(code))
    monkeypatch.syspath_prepend(str(tmp_path))
    return lambda name: f"isol_{name}:kl"


def _check(spec: str, /, **kwargs):
    kwargs.setdefault("names", NAMES)
    kwargs.setdefault("max_examples", 3)
    kwargs.setdefault("timeout", 1.0)
    return run_isolated(spec, "numpy", **kwargs)


def _by_name(report):
    return {o.name: o for o in report.outcomes}


# --------------------------------------------------------------------------- run_isolated


def test_a_conforming_implementation_passes(impls):
    report = _check(impls("good"))
    assert report.status == "pass"
    assert [o.name for o in report.outcomes] == NAMES
    assert {o.status for o in report.outcomes} == {"pass"}


@pytest.mark.parametrize("spec", ["reference", "mutant:no_xlogy_mask"])
def test_the_report_is_runner_runs(spec):
    names = [*NAMES, "semantics.empty", "math.zero_at_identity"]
    direct = runner.run(spec, "numpy", names=names, max_examples=4, seed=5)
    isolated = run_isolated(spec, "numpy", names=names, max_examples=4, seed=5)
    a, b = direct.as_dict(), isolated.as_dict()
    for outcome in a["outcomes"] + b["outcomes"]:
        outcome.pop("seconds")
    assert isolated.status == ("pass" if spec == "reference" else "fail")
    if spec == "reference":
        assert a == b
        return
    # A failing property's example may differ: hypothesis mixes the literals of the
    # modules loaded in the process into its draws, and this test process has loaded
    # many more (the other tests') than the child. What the report says must agree.
    assert a.keys() == b.keys()
    assert [(o["name"], o["status"]) for o in a["outcomes"]] == [
        (o["name"], o["status"]) for o in b["outcomes"]
    ]
    assert {k: v for k, v in a.items() if k != "outcomes"} == {
        k: v for k, v in b.items() if k != "outcomes"
    }


def test_progress_sees_each_property_start_and_end(impls):
    seen = []
    _check(impls("os_exit"), progress=lambda name, o: seen.append((name, o and o.status)))
    assert seen == [x for name in NAMES for x in ((name, None), (name, "fail"))]


@pytest.mark.parametrize(
    ("name", "cause"),
    [("exits", "SystemExit(0)"), ("interrupts", "KeyboardInterrupt()")],
)
def test_system_exit_in_a_call_is_a_failure(impls, name, cause):
    report = _check(impls(name))
    assert report.status == "fail" and report.failed
    outcomes = _by_name(report)
    assert list(outcomes) == NAMES
    for outcome in outcomes.values():
        assert outcome.status == "fail"
        assert f"the implementation raised {cause}" in outcome.reason
    # A property that expects an error must not take it as a refusal.
    assert "a crash, not an error" in outcomes["semantics.bad_reduction"].reason


def test_a_caught_guard_error_still_fails_the_property(impls):
    # semantics.error_class passes on a crash (`except Exception`): the MUST
    # properties report crashes. SystemExit is not a crash to forgive.
    report = _check(impls("exits"), names=["semantics.error_class"])
    (outcome,) = report.outcomes
    assert outcome.status == "fail" and "SystemExit(0)" in outcome.reason
    assert report.should_status == "fail"


def test_os_exit_fails_the_property_and_the_rest_still_run(impls):
    report = _check(impls("os_exit"))
    assert report.status == "fail"
    assert [o.name for o in report.outcomes] == NAMES
    for outcome in report.outcomes:
        assert outcome.status == "fail"
        assert "exit status 0" in outcome.reason and "os._exit" in outcome.reason
        assert "while the implementation was being called" in outcome.reason
        assert "the call: fn(" in outcome.counterexample
        assert "about to leave" in outcome.counterexample  # its output, not the protocol's


def test_a_crash_fails_only_the_property_it_happens_in(impls):
    report = _check(impls("dies_on_bad_reduction"))
    outcomes = _by_name(report)
    assert outcomes["math.non_negative"].status == "pass"
    assert outcomes["semantics.edge_values"].status == "pass"
    bad = outcomes["semantics.bad_reduction"]
    assert bad.status == "fail" and "exit status 3" in bad.reason
    assert "reduction='batch_mean'" in bad.counterexample
    assert report.status == "fail"
    # The properties after the crash still run, in a new process.
    after = _check(
        impls("dies_on_bad_reduction"), names=["semantics.bad_reduction", "semantics.empty"]
    )
    assert [(o.name, o.status) for o in after.outcomes] == [
        ("semantics.empty", "pass"),  # the registry's order
        ("semantics.bad_reduction", "fail"),
    ]


def test_a_segfault_is_a_failure(impls):
    report = _check(impls("segfaults"), names=NAMES[:2])
    assert [o.name for o in report.outcomes] == NAMES[:2]
    for outcome in report.outcomes:
        assert outcome.status == "fail"
        assert "SIGSEGV" in outcome.reason and "a crash" in outcome.reason
        assert "Fatal Python error" in outcome.counterexample  # faulthandler's traceback


def test_a_hang_times_out_per_call(impls):
    start = time.monotonic()
    report = _check(impls("sleeps"), names=NAMES[:2])
    elapsed = time.monotonic() - start
    for outcome in report.outcomes:
        assert outcome.status == "fail"
        assert "did not return within 1 s (--timeout)" in outcome.reason
    # The first timeout costs 1 s, the replays 1 s each until 2 s are spent: then
    # later calls fail at once (hypothesis shrinks, edge_values has 500 cases).
    assert elapsed < 15


def test_a_hang_the_alarm_cannot_interrupt_is_killed(impls, monkeypatch):
    monkeypatch.setattr(isolation, "_GRACE_FLOOR", 0.5)
    start = time.monotonic()
    report = _check(impls("deaf"), names=NAMES[:2])
    assert time.monotonic() - start < 15
    for outcome in report.outcomes:
        assert outcome.status == "fail"
        assert outcome.reason.startswith("hung: the call did not return within 1.5 s")
        assert "while the implementation was being called" in outcome.reason


def test_an_exception_at_import_is_a_one_line_resolve_error(impls):
    with pytest.raises(ResolveError) as info:
        _check(impls("raises_at_import"))
    message = str(info.value)
    assert "\n" not in message
    assert "RuntimeError: boom at import" in message
    assert isinstance(info.value, Exception)


def test_an_exit_at_import_is_a_resolve_error(impls):
    with pytest.raises(ResolveError, match="exit status 0 while loading it"):
        _check(impls("exits_at_import"))


@pytest.mark.parametrize("spec", ["isol_no_such_module:kl", "mutant:no_such_mutant", "bogus"])
def test_a_bad_spec_is_a_resolve_error(impls, spec):
    with pytest.raises(ResolveError) as info:
        _check(spec)
    assert "\n" not in str(info.value)


def test_no_property_selected_gives_an_empty_report(impls):
    report = _check(impls("good"), names=["no.such_property"])
    assert report.outcomes == [] and report.status == "pass"


@pytest.mark.parametrize("timeout", [0, -1.0, float("inf"), float("nan")])
def test_the_timeout_must_be_positive(timeout):
    with pytest.raises(ValueError, match="timeout"):
        run_isolated("reference", "numpy", timeout=timeout)
    with pytest.raises(ValueError, match="timeout"):
        guard(runner.resolve("reference"), timeout=timeout)


# --------------------------------------------------------------------------- guard, in process


def _impl(fn, **kwargs):
    return Implementation("test", fn, **kwargs)


def test_guard_turns_system_exit_into_an_assertion_error():
    def fn(*args, **kwargs):
        raise SystemExit(2)

    guarded = guard(_impl(fn), timeout=5)
    with pytest.raises(ImplementationError, match=r"raised SystemExit\(2\)") as info:
        guarded.fn(1, 2)
    assert isinstance(info.value, AssertionError)
    assert isinstance(info.value.__cause__, SystemExit)


def test_guard_keeps_names_attributes_and_ordinary_exceptions():
    def fn(input, target, reduction="mean", log_target=False):
        if reduction == "bad":
            raise ValueError("bad reduction")
        return input + target

    def backward(*args, **kwargs):
        return args

    fn.backward = backward  # type: ignore[attr-defined]
    impl = _impl(fn, backward=backward, description="d")
    guarded = guard(impl, timeout=DEFAULT_TIMEOUT)
    assert guarded.fn is not fn and guarded.fn.__wrapped__ is fn
    assert guarded.fn.backward is backward and guarded.fn.__name__ == "fn"
    assert guarded.backward.__wrapped__ is backward
    assert guarded.from_logits is None and guarded.gaussian is None
    assert dataclasses.replace(guarded, fn=fn, backward=backward) == impl
    assert guarded.fn(1, 2) == 3
    with pytest.raises(ValueError, match="bad reduction"):
        guarded.fn(1, 2, reduction="bad")


def test_guard_interrupts_a_call_and_restores_the_alarm():
    def handler(signum, frame):  # pragma: no cover - never fires
        raise AssertionError("the outer alarm fired")

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        guarded = guard(_impl(lambda *a, **k: time.sleep(60)), timeout=0.2)
        start = time.monotonic()
        with pytest.raises(CallTimeout, match=r"did not return within 0.2 s \(--timeout\)"):
            guarded.fn(1, 2)
        assert time.monotonic() - start < 5
        # The outer timer and handler are back, less the time spent.
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25 < left <= 30
        assert signal.getsignal(signal.SIGALRM) is handler
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_guard_leaves_no_timer_behind():
    previous = signal.getsignal(signal.SIGALRM)
    guarded = guard(_impl(lambda *a, **k: 1), timeout=0.5)
    assert guarded.fn(1, 2) == 1
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is previous


def test_nested_guarded_calls_keep_the_outer_limit():
    inner = guard(_impl(lambda *a, **k: time.sleep(60)), timeout=30)

    def outer_fn(*args, **kwargs):
        return inner.fn(*args, **kwargs)

    outer = guard(_impl(outer_fn), timeout=0.3)
    start = time.monotonic()
    with pytest.raises(CallTimeout, match=r"within 0.3 s"):
        outer.fn(1, 2)
    assert time.monotonic() - start < 5
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_an_implementation_that_swallows_the_timeout_still_times_out():
    def fn(*args, **kwargs):
        try:
            time.sleep(60)
        except Exception:
            return 0.0  # "recovers"
        return 1.0

    def refusing(*args, **kwargs):
        try:
            time.sleep(60)
        except Exception as exc:
            raise ValueError("refused") from exc  # looks like a refusal

    for f in (fn, refusing):
        with pytest.raises(CallTimeout):
            guard(_impl(f), timeout=0.2).fn(1, 2)


def test_a_timed_out_call_fails_an_error_property_in_process():
    def fn(*args, **kwargs):
        time.sleep(60)

    monitor = Monitor()
    impl = guard(_impl(fn), timeout=0.2, monitor=monitor)
    report = runner.run(impl, "numpy", names=["semantics.bad_reduction"], max_examples=2)
    (outcome,) = report.outcomes
    assert outcome.status == "fail" and "CallTimeout" in outcome.reason
    # After the first timeout the property's later calls were cut short.
    assert monitor.timeouts >= 1 and monitor.failure is not None
    assert monitor.limit(0.2) is None or monitor.limit(0.2) <= 1.0


def test_the_monitor_hears_each_call():
    events = []
    impl = guard(_impl(lambda x, t, **k: x), timeout=1, monitor=Monitor(events.append))
    impl.fn(1.5, 2, reduction="sum")
    assert events == [
        {"event": "call", "call": "fn(1.5, 2, reduction='sum')"},
        {"event": "return"},
    ]


def test_outside_the_main_thread_no_alarm_is_set():
    import threading

    guarded = guard(_impl(lambda *a, **k: time.sleep(0.3) or 7), timeout=0.05)
    found = []
    thread = threading.Thread(target=lambda: found.append(guarded.fn(1, 2)))
    thread.start()
    thread.join()
    assert found == [7]  # only run_isolated's watchdog limits calls there


# --------------------------------------------------------------------------- probe


def test_probe_loads_the_implementation_in_a_child(impls):
    loaded = isolation.probe(impls("good"))
    assert loaded.name == impls("good") and loaded.backends is None
    assert loaded.backend == infer_backend(runner.resolve(impls("good")).primary)
    assert isolation.probe("numpy").backends == ("numpy",)
    assert isolation.probe("mutant:no_xlogy_mask").name.endswith("no_xlogy_mask")


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("raises_at_import", "RuntimeError: boom at import"),
        ("exits_at_import", "exit status 0 while loading it"),
    ],
)
def test_probe_reports_a_failed_import(impls, name, match):
    with pytest.raises(ResolveError, match=match) as info:
        isolation.probe(impls(name))
    assert "\n" not in str(info.value)
