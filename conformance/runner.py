"""Run properties through hypothesis programmatically and collect the outcomes.

Each property ends as ``pass``, ``fail`` (with hypothesis's minimal
counterexample and a copy-paste reproduction) or ``n/a`` (with the reason).
:func:`resolve` turns an ``--impl`` name into the :class:`.Implementation` to run.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed

from . import adapters, mutants
from .context import Context
from .implementations import BUILTIN, Implementation
from .namespaces import BackendUnavailable, load_backend
from .properties import NotApplicable, Property, select
from .strategies import Case

__all__ = ["Outcome", "Report", "reproduction", "resolve", "run", "run_property"]

DEFAULT_MAX_EXAMPLES = 15


def resolve(spec: str, /) -> Implementation:
    """Return the implementation named by ``spec``.

    ``spec`` is ``reference``, ``torch``, ``numpy`` (the suite's independent
    NumPy implementation), an adapter name (see :mod:`.adapters`), ``mutant:NAME``
    (see :mod:`.mutants`) or ``MODULE:CALLABLE``. The callable may be an
    :class:`Implementation`, or a function with PyTorch's functional signature
    (a ``backward`` attribute on it, if any, is used as its backward).

    Raises
    ------
    ValueError
        If ``spec`` names nothing importable.
    """
    if spec in BUILTIN:
        return BUILTIN[spec]()
    if spec in adapters.ADAPTERS:
        return adapters.load(spec)
    if spec.startswith("mutant:"):
        name = spec.split(":", 1)[1]
        if name not in mutants.MUTANTS:
            msg = f"unknown mutant {name!r}; choose from {', '.join(mutants.MUTANTS)}"
            raise ValueError(msg)
        return mutants.MUTANTS[name]
    if ":" not in spec:
        known = ", ".join([*BUILTIN, *adapters.ADAPTERS])
        msg = f"--impl must be one of {known}, mutant:NAME or MODULE:CALLABLE, got {spec!r}"
        raise ValueError(msg)
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        msg = f"cannot load {spec!r}: {exc}"
        raise ValueError(msg) from None
    if isinstance(obj, Implementation):
        return obj
    if not callable(obj):
        msg = f"{spec!r} is not callable"
        raise ValueError(msg)
    return Implementation(spec, obj, backward=getattr(obj, "backward", None), description=spec)


@dataclass
class Outcome:
    """The result of one property for one implementation on one backend."""

    name: str
    group: str
    description: str
    status: str  # "pass", "fail" or "n/a"
    examples: int = 0
    reason: str = ""
    counterexample: str = ""
    reproduction: str = ""
    seconds: float = 0.0
    level: str = "MUST"  # the property's requirement level: "MUST" or "SHOULD"


@dataclass
class Report:
    """Every outcome of one implementation on one backend."""

    impl: str
    backend: str
    max_examples: int
    seed: int | None
    outcomes: list[Outcome] = field(default_factory=list)
    status: str = "pass"  # "pass", "fail" (a MUST failure), or "n/a" when it cannot run
    reason: str = ""
    should_status: str = "pass"  # "fail" when a SHOULD property failed

    @property
    def failed(self) -> bool:
        """Whether a MUST property failed: the implementation does not conform."""
        return any(o.status == "fail" and o.level == "MUST" for o in self.outcomes)

    @property
    def should_failed(self) -> bool:
        """Whether a SHOULD property failed (PyTorch's warnings, exact exception classes)."""
        return any(o.status == "fail" and o.level == "SHOULD" for o in self.outcomes)

    def rejected(self, *, strict: bool = False) -> bool:
        """Whether the report fails: a MUST failure, or with ``strict`` any failure."""
        return self.failed or (strict and self.should_failed)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dictionary."""
        return asdict(self)


def _literal(a: np.ndarray) -> str:
    values = ", ".join(
        f"float({repr(float(v))!r})" if not np.isfinite(v) else repr(float(v))
        for v in a.ravel().astype(np.float64)
    )
    return f"np.array([{values}], dtype=np.{a.dtype.name}).reshape({tuple(a.shape)!r})"


def reproduction(impl_spec: str, backend: str, case: Case) -> str:
    """Return a Python snippet that replays ``case`` and prints PyTorch's answer beside it."""
    return "\n".join(
        [
            "import numpy as np",
            "from kldiv_spec.conformance import load_backend, resolve",
            f"backend = load_backend({backend!r})",
            f"impl = resolve({impl_spec!r})",
            f"x = {_literal(case.input)}",
            f"t = {_literal(case.target)}",
            f"kw = dict(reduction={case.reduction!r}, log_target={case.log_target!r})",
            "try:  # PyTorch's answer, for comparison",
            "    import torch",
            "    print('PyTorch: ', torch.nn.functional.kl_div("
            "torch.from_numpy(x), torch.from_numpy(t), **kw))",
            "except ImportError:",
            "    pass",
            "print('got:     ', impl(backend.asarray(x), backend.asarray(t), **kw))",
        ]
    )


def _settings(max_examples: int, shrink: bool) -> settings:
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    if shrink:
        phases.append(Phase.shrink)
    return settings(
        max_examples=max(1, max_examples),
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        report_multiple_bugs=False,
        phases=phases,
        print_blob=False,
    )


def _describe_failure(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, AssertionError) and text:
        return text.splitlines()[0]
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def run_property(
    prop: Property,
    ctx: Context,
    /,
    *,
    impl_spec: str,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
    seed: int | None = 0,
    shrink: bool = True,
) -> Outcome:
    """Run one property and return its outcome."""
    start = time.perf_counter()
    outcome = Outcome(prop.name, prop.group, prop.description, "pass", level=prop.level)
    reason = prop.applies(ctx) if prop.applies is not None else None
    if ctx.impl.backends is not None and ctx.backend.name not in ctx.impl.backends:
        reason = f"{ctx.impl.name} runs on {', '.join(ctx.impl.backends)} only"
    for key in (prop.name, prop.group):
        if key in ctx.impl.not_applicable:
            reason = ctx.impl.not_applicable[key]
    if reason is not None:
        outcome.status, outcome.reason = "n/a", reason
        return outcome
    state: dict[str, Any] = {"n": 0, "last": None, "na": None}

    def once(case: Case) -> None:
        state["n"] += 1
        state["last"] = case
        try:
            prop.check(ctx, case)
        except NotApplicable as exc:
            state["na"] = str(exc)

    try:
        if prop.strategy is not None:
            n = max(1, round(max_examples * prop.examples_scale))
            test = settings(_settings(n, shrink))(given(prop.strategy(ctx))(once))
            if seed is not None:
                test = hypothesis_seed(seed)(test)
            test()
        else:
            assert prop.cases is not None
            for case in prop.cases(ctx):
                once(case)
    except NotApplicable as exc:  # raised while building the strategy or cases
        state["na"] = str(exc)
    except Exception as exc:
        outcome.status = "fail"
        outcome.reason = _describe_failure(exc)
        last = state["last"]
        if last is not None:
            outcome.counterexample = (
                f"{last.describe()}\n  input  = {last.input.tolist()!r}\n"
                f"  target = {last.target.tolist()!r}"
            )
            outcome.reproduction = reproduction(impl_spec, ctx.backend.name, last)
    outcome.examples = state["n"]
    if outcome.status == "pass" and state["na"] is not None:
        outcome.status, outcome.reason = "n/a", state["na"]
    outcome.seconds = time.perf_counter() - start
    return outcome


def run(
    impl: str | Implementation,
    backend: str,
    /,
    *,
    groups: Iterable[str] | None = None,
    names: Iterable[str] | None = None,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
    seed: int | None = 0,
    shrink: bool = True,
    progress: Callable[[str, Outcome | None], None] | None = None,
) -> Report:
    """Run the selected properties for ``impl`` on ``backend`` and return the report.

    ``impl`` is an :class:`Implementation` or a spec for :func:`.resolve`.
    ``progress(property_name, outcome_or_None)`` is called before and after each property.
    """
    if isinstance(impl, str):
        spec, implementation = impl, resolve(impl)
    else:
        spec, implementation = impl.name, impl
    report = Report(implementation.name, backend, max_examples, seed)
    if implementation.backends is not None and backend not in implementation.backends:
        report.status = "n/a"
        report.reason = f"{implementation.name} runs on {', '.join(implementation.backends)} only"
        return report
    try:
        be = load_backend(backend)
    except BackendUnavailable as exc:
        report.status, report.reason = "n/a", str(exc)
        return report
    ctx = Context(implementation, be)
    for prop in select(groups, names):
        if progress is not None:
            progress(prop.name, None)
        outcome = run_property(
            prop, ctx, impl_spec=spec, max_examples=max_examples, seed=seed, shrink=shrink
        )
        report.outcomes.append(outcome)
        if progress is not None:
            progress(prop.name, outcome)
    report.status = "fail" if report.failed else "pass"
    report.should_status = "fail" if report.should_failed else "pass"
    return report
