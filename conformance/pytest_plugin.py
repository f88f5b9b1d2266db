"""The suite as a pytest plugin: one test per property.

Run it in any project's CI::

    pytest --pyargs kldiv_spec.conformance --kldiv-impl MODULE:CALLABLE --kldiv-backend torch

(or ``-p kldiv_spec.conformance.pytest_plugin`` with ``test_conformance_suite.py``
collected from the package). n/a properties are reported as skipped; a failing
SHOULD property (PyTorch's exact warnings and exception classes) as xfailed,
unless ``--kldiv-strict`` makes it a failure.

The plugin is loaded (``pytest11`` entry point) by every pytest run wherever
kldiv-spec is installed, so it costs nothing unless it is used: this module
imports pytest alone. The suite's machinery (and with it hypothesis, mpmath,
the array libraries) is imported when a ``--kldiv-*`` option asks for it, in
:func:`pytest_configure`, or when a property runs (:func:`run_one`).
"""

from __future__ import annotations

from typing import Any

import pytest

__all__ = ["pytest_addoption", "pytest_configure"]

_IMPLEMENTATION = pytest.StashKey[Any]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the suite's options: those of ``kldiv-spec check``, prefixed with ``kldiv-``.

    ``--kldiv-impl``, ``--kldiv-kind``, ``--kldiv-backend``, ``--kldiv-max-examples``,
    ``--kldiv-seed``, and ``--kldiv-strict`` (SHOULD failures fail too).
    """
    group = parser.getgroup("kldiv-spec conformance")
    group.addoption(
        "--kldiv-impl",
        default="reference",
        help="implementation to check (as kldiv-spec check --impl)",
    )
    group.addoption(
        "--kldiv-kind",
        default="kl-div",
        help="what --kldiv-impl is (as kldiv-spec check --kind; default kl-div)",
    )
    group.addoption("--kldiv-backend", default="numpy", help="array library (default numpy)")
    group.addoption("--kldiv-max-examples", type=int, default=15, help="examples per property")
    group.addoption("--kldiv-seed", type=int, default=0, help="hypothesis seed")
    group.addoption(
        "--kldiv-strict",
        action="store_true",
        help="SHOULD failures fail (default: reported as xfailed)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Resolve an ``--kldiv-impl`` given on the command line once: a bad one is a usage error.

    One line says why (a module that is not found, a library that is not
    installed, an exception at import), instead of one failing test per property.
    With the defaults (``--kldiv-impl reference``, ``--kldiv-backend numpy``) there
    is nothing to check here, and nothing is imported.
    """
    backend = config.getoption("--kldiv-backend", default="numpy")
    if backend != "numpy":  # asked for: a backend that cannot run is not a skip
        from .namespaces import BackendUnavailable, load_backend

        try:
            load_backend(backend)
        except ValueError as exc:  # not a backend's name
            raise pytest.UsageError(f"--kldiv-backend: {exc}") from None
        except (ImportError, BackendUnavailable) as exc:
            msg = f"--kldiv-backend {backend} cannot run here: {str(exc).splitlines()[0]}"
            raise pytest.UsageError(msg) from None
    spec = config.getoption("--kldiv-impl", default="reference")
    if spec == "reference":  # the default: resolved when a property runs
        return
    from .runner import ResolveError, resolve

    try:
        config.stash[_IMPLEMENTATION] = resolve(spec, kind=config.getoption("--kldiv-kind"))
    except ResolveError as exc:
        msg = f"--kldiv-impl: {exc}"
        raise pytest.UsageError(msg) from None


def run_one(config: Any, name: str) -> None:
    """Run property ``name`` with the options of ``config``; fail or skip the test."""
    from .catalog import select
    from .context import Context
    from .namespaces import BackendUnavailable, load_backend
    from .runner import resolve, run_property

    spec = config.getoption("--kldiv-impl")
    kind = config.getoption("--kldiv-kind")
    impl = config.stash.get(_IMPLEMENTATION, None) or resolve(spec, kind=kind)
    try:
        backend = load_backend(config.getoption("--kldiv-backend"))
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    prop = select(names=[name])[0]
    outcome = run_property(
        prop,
        Context(impl, backend),
        impl_spec=spec,
        max_examples=config.getoption("--kldiv-max-examples"),
        seed=config.getoption("--kldiv-seed"),
        kind=kind,
    )
    if outcome.status == "n/a":
        pytest.skip(outcome.reason)
    if outcome.status == "error":  # the machine failed: no verdict, and no pass either
        pytest.fail(outcome.reason, pytrace=False)
    strict = config.getoption("--kldiv-strict")
    if outcome.status == "fail" and outcome.level == "SHOULD" and not strict:
        pytest.xfail(f"SHOULD: {outcome.reason}")
    if outcome.status == "fail":
        pytest.fail(
            f"{outcome.reason}\nminimal counterexample: {outcome.counterexample}\n"
            f"reproduce with:\n{outcome.reproduction}",
            pytrace=False,
        )
