"""The registry of named properties, each with a group and a one-line description.

A property is a check of one implementation on one backend. It is either
property-based (a ``strategy`` drawing :class:`~.strategies.Case` objects,
run through hypothesis) or a fixed list of ``cases``. Its ``check`` raises
:class:`AssertionError` when the implementation disagrees with PyTorch's
semantics, and :class:`NotApplicable` when the implementation or backend cannot
express what it checks (reported as n/a).

This module imports nothing from the suite: the ``checks_*`` modules import it
and register their properties, and the package imports every ``checks_*``
module, so :data:`PROPERTIES` is complete once ``kldiv_spec.conformance`` is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GROUPS",
    "LEVELS",
    "PROPERTIES",
    "SUBJECTS",
    "CouldNotRun",
    "NotApplicable",
    "Property",
    "register",
    "select",
]

#: The property groups, in report order.
GROUPS: tuple[str, ...] = ("math", "accuracy", "semantics", "gradients", "hygiene")

#: Requirement levels, as standards use them (RFC 2119). A ``MUST`` property is
#: the specification: values, NaN/inf patterns, dtypes, shapes, refusing invalid
#: arguments, gradients. A ``SHOULD`` property is PyTorch's behaviour that a
#: conforming implementation may have a reason to differ from: the exact warning
#: text, silence about floating-point warnings, the exact exception class. A MUST
#: failure fails ``kldiv-spec check``; a SHOULD failure is reported, and fails it
#: only under ``--strict``.
LEVELS: tuple[str, ...] = ("MUST", "SHOULD")


#: What a property checks: which of an implementation's functions it calls
#: (:class:`~.implementations.Implementation`'s ``fn``, ``from_logits`` or
#: ``gaussian``). An implementation without that function gets n/a for it.
SUBJECTS: tuple[str, ...] = ("kl_div", "from_logits", "gaussian", "from_hidden")


class NotApplicable(Exception):  # noqa: N818 (a verdict, not an error)
    """The property cannot be expressed for this implementation or backend."""


class CouldNotRun(Exception):  # noqa: N818 (a verdict, not an error)
    """The machine, not the implementation, failed: no GPU driver, a Triton interpreter error.

    Raised by an adapter (or recognised by ``runner.environment_failure``),
    it makes the property ``could not run`` with its message, never a failure.
    """


@dataclass(frozen=True)
class Property:
    """One named property.

    Attributes
    ----------
    name : str
        ``group.short_name``.
    group : str
        One of :data:`GROUPS`.
    description : str
        One line.
    check : callable
        ``check(ctx, case)``; raises AssertionError on a violation.
    strategy : callable, optional
        ``strategy(ctx)`` -> hypothesis strategy of cases.
    cases : callable, optional
        ``cases(ctx)`` -> iterable of fixed cases (when there is no strategy).
    applies : callable, optional
        ``applies(ctx)`` -> None, or the reason it is n/a.
    examples_scale : float
        Multiplier of ``--max-examples`` (for expensive properties).
    level : {'MUST', 'SHOULD'}
        Its requirement level (see :data:`LEVELS`).
    subject : {'kl_div', 'from_logits', 'gaussian'}
        The function of the implementation it checks (see ``SUBJECTS``).
    """

    name: str
    group: str
    description: str
    check: Callable[[Any, Any], None]
    strategy: Callable[[Any], Any] | None = None
    cases: Callable[[Any], Iterable[Any]] | None = None
    applies: Callable[[Any], str | None] | None = None
    examples_scale: float = 1.0
    level: str = "MUST"
    subject: str = "kl_div"


#: Every property, by name, in registration (report) order.
PROPERTIES: dict[str, Property] = {}


def register(
    name: str,
    description: str,
    *,
    strategy: Callable[[Any], Any] | None = None,
    cases: Callable[[Any], Iterable[Any]] | None = None,
    applies: Callable[[Any], str | None] | None = None,
    examples_scale: float = 1.0,
    level: str = "MUST",
    subject: str = "kl_div",
) -> Callable[[Callable[[Any, Any], None]], Callable[[Any, Any], None]]:
    """Register the decorated ``check(ctx, case)`` as property ``name`` (``group.short``).

    ``level`` is ``'MUST'`` (the default) or ``'SHOULD'``; see :data:`LEVELS`.
    ``subject`` is the implementation's function it calls; see ``SUBJECTS``.
    """
    group = name.split(".", 1)[0]
    if group not in GROUPS:
        msg = f"unknown group in {name!r}"
        raise ValueError(msg)
    if (strategy is None) == (cases is None):
        msg = "give exactly one of strategy and cases"
        raise ValueError(msg)
    if level not in LEVELS:
        msg = f"level must be one of {', '.join(LEVELS)}, got {level!r}"
        raise ValueError(msg)
    if subject not in SUBJECTS:
        msg = f"subject must be one of {', '.join(SUBJECTS)}, got {subject!r}"
        raise ValueError(msg)

    def decorate(check: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        PROPERTIES[name] = Property(
            name,
            group,
            description,
            check,
            strategy,
            cases,
            applies,
            examples_scale,
            level,
            subject,
        )
        return check

    return decorate


def select(
    groups: Iterable[str] | None = None, names: Iterable[str] | None = None
) -> list[Property]:
    """Return the registered properties in the given groups and/or with the given names."""
    groups = set(groups) if groups else None
    names = set(names) if names else None
    chosen = [
        p
        for p in PROPERTIES.values()
        if (groups is None or p.group in groups) and (names is None or p.name in names)
    ]
    return sorted(chosen, key=lambda p: GROUPS.index(p.group))
