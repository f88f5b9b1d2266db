"""What a property sees: the implementation, the backend, and helpers to call them."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .assertions import assert_loss
from .implementations import Implementation
from .namespaces import Backend
from .oracle import Exact, pointwise
from .properties import NotApplicable
from .strategies import Case

__all__ = [
    "Call",
    "Context",
    "Record",
    "assert_pointwise",
    "assert_reduced",
    "check_against_oracle",
    "fmt",
]


@dataclass
class Record:
    """The last call a property made: what a reproduction replays.

    ``kind`` says what was checked of it: ``'forward'`` (values, dtype, shape),
    ``'gradient'``, ``'double_backward'``, ``'error'`` (an invalid call; ``errors`` the classes
    accepted), ``'warning'``, ``'layout'`` (non-contiguous views) or
    ``'readonly'`` (read-only NumPy operands).
    """

    case: Case
    kind: str = "forward"
    errors: tuple[type[Exception], ...] = ()
    grad: Any = None


@dataclass
class Call:
    """The outcome of one call: the raw result, its values, the warnings, the operands."""

    result: Any
    value: np.ndarray
    warnings: list[warnings.WarningMessage]
    input: Any
    target: Any


class Context:
    """An implementation on a backend."""

    def __init__(self, impl: Implementation, backend: Backend) -> None:
        self.impl = impl
        self.backend = backend
        self.last: Record | None = None

    @property
    def reductions(self) -> tuple[str, ...]:
        """The reductions the implementation can express."""
        return self.impl.reductions

    @property
    def log_targets(self) -> tuple[bool, ...]:
        """The ``log_target`` forms the implementation can express."""
        return self.impl.log_targets

    def need(self, *reductions: str) -> None:
        """Raise NotApplicable unless every one of ``reductions`` is supported."""
        missing = [r for r in reductions if r not in self.impl.reductions]
        if missing:
            raise NotApplicable(f"{self.impl.name} cannot express reduction {missing[0]!r}")

    def some(self, *reductions: str) -> tuple[str, ...]:
        """Return the supported ones among ``reductions``; NotApplicable if none."""
        found = tuple(r for r in reductions if r in self.impl.reductions)
        if not found:
            raise NotApplicable(f"{self.impl.name} supports none of {', '.join(reductions)}")
        return found

    def asarray(self, a: np.ndarray, /) -> Any:
        """Move a NumPy array to the backend."""
        return self.backend.asarray(a)

    def call(
        self,
        case: Case,
        /,
        reduction: str | None = None,
        *,
        input: Any = None,
        target: Any = None,
        kind: str = "forward",
        errors: tuple[type[Exception], ...] = (),
    ) -> Call:
        """Call the implementation on ``case`` (on backend copies of its arrays).

        The call is recorded as :attr:`last` (see :class:`Record`: ``kind`` and
        ``errors``) for the reproduction of a failure.
        """
        x = self.asarray(case.input) if input is None else input
        t = self.asarray(case.target) if target is None else target
        reduction = case.reduction if reduction is None else reduction
        self.record(Case(case.input, case.target, reduction, case.log_target), kind, errors)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = self.impl.fn(x, t, reduction=reduction, log_target=case.log_target)
            value = self.backend.to_numpy(out)
        return Call(out, value, list(caught), x, t)

    def record(
        self,
        case: Case,
        /,
        kind: str = "forward",
        errors: tuple[type[Exception], ...] = (),
        grad: Any = None,
    ) -> None:
        """Record ``case`` as the last call (what a failure's reproduction replays)."""
        self.last = Record(case, kind, errors, grad)

    def exact(self, case: Case, /) -> Exact:
        """Return the oracle's pointwise values for ``case``, with this backend's error floor.

        On a backend that flushes subnormal numbers to zero (XLA on the CPU, CuPy
        in float32) the implementation sees flushed operands, so the oracle is
        given them too, and intermediates may be flushed: the floor is the
        smallest normal number.
        """
        if self.backend.subnormals:
            return pointwise(case.input, case.target, log_target=case.log_target)
        x, t = (_flush_subnormals(a) for a in (case.input, case.target))
        exact = pointwise(x, t, log_target=case.log_target)
        exact.floor = float(np.finfo(exact.dtype).smallest_normal)
        return exact

    def value(self, case: Case, /, reduction: str | None = None) -> np.ndarray:
        """Return the values of the implementation's result as a float64 NumPy array."""
        return np.asarray(self.call(case, reduction).value, dtype=np.float64)


def _flush_subnormals(a: np.ndarray) -> np.ndarray:
    """Return ``a`` with its subnormal numbers replaced by zeros of the same sign."""
    tiny = np.finfo(a.dtype).smallest_normal
    with np.errstate(invalid="ignore"):
        return np.where(np.abs(a) < tiny, np.copysign(np.zeros_like(a), a), a)


def fmt(a: np.ndarray) -> str:
    """Format an array for a message (17 significant digits, summarised past 20 elements)."""
    return np.array2string(np.asarray(a), precision=17, threshold=20)


def assert_pointwise(got: np.ndarray, exact: Exact, /, what: str = "reduction='none'") -> None:
    """Assert ``got`` matches the exact pointwise values: NaN/inf exactly, else within bound.

    Delegates to :func:`.assertions.assert_loss` (shape, non-finite pattern, bound).
    """
    assert_loss(got, exact, "none", what=what)


def assert_reduced(
    got: np.ndarray, exact: Exact, reduction: str, input_shape: tuple[int, ...]
) -> None:
    """Assert a reduced result is 0-d and matches the exact reduction within its bound.

    Delegates to :func:`.assertions.assert_loss`.
    """
    assert_loss(got, exact, reduction, input_shape)


def check_against_oracle(ctx: Context, case: Case, /, reduction: str | None = None) -> None:
    """Call the implementation and compare with the oracle for ``case``'s reduction."""
    reduction = case.reduction if reduction is None else reduction
    exact = ctx.exact(case)
    got = ctx.call(case, reduction).value
    if reduction == "none":
        assert_pointwise(got, exact)
    else:
        assert_reduced(got, exact, reduction, case.input.shape)
