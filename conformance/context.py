"""What a property sees: the implementation, the backend, and helpers to call them.

Two rules hold for every call made through :meth:`Context.call`:

- the result must be an array of the backend with the expected shape (the
  broadcast shape for ``'none'``, ``()`` for a reduction), else the call fails
  with an AssertionError naming what came back (``returned a float, expected a
  numpy array of shape ()``), before any of the suite's code reads it;
- values are judged at the precision the result has: a result less precise
  than the operands' dtype (float32 for float64 operands), or an
  implementation that declares a ``compute_dtype``, is held to the bounds of
  that dtype (:meth:`Context.precision`). The dtype itself is the finding of
  ``semantics.dtypes`` and ``semantics.result``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .assertions import assert_loss, dtype_name
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
        #: The floating dtype of the last result (None before a call, or for a non-float).
        self.result_dtype: np.dtype | None = None

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
        ``errors``) for the reproduction of a failure. Except for an invalid call
        (``kind='error'``), the result must be an array of the backend of the
        expected shape (:meth:`check_result`); its dtype is kept in
        :attr:`result_dtype` (see :meth:`precision`).
        """
        x = self.asarray(case.input) if input is None else input
        t = self.asarray(case.target) if target is None else target
        reduction = case.reduction if reduction is None else reduction
        self.record(Case(case.input, case.target, reduction, case.log_target), kind, errors)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = self.impl.fn(x, t, reduction=reduction, log_target=case.log_target)
            if kind != "error":
                self.check_result(out, _result_shape(case, reduction))
            value = self.backend.to_numpy(out)
        dtype = getattr(value, "dtype", None)
        self.result_dtype = np.dtype(dtype) if dtype is not None and dtype.kind == "f" else None
        return Call(out, value, list(caught), x, t)

    def check_result(self, out: Any, shape: tuple[int, ...] | None, /) -> None:
        """Assert ``out`` is an array of the backend with ``shape`` (None: any shape).

        The AssertionError names what came back: ``returned a float`` (a
        tuple, a list, ...) or ``returned shape (2,), expected shape ()``.
        """
        if not self.backend.is_array(out):
            kind = type(out).__name__
            if type(out).__module__ != "builtins":  # another library's array, say
                kind = f"{type(out).__module__.split('.')[0]}.{kind}"
            article = "an" if kind[:1].lower() in "aeiou" else "a"
            want = "" if shape is None else f" of shape {tuple(shape)}"
            msg = f"returned {article} {kind}, expected a {self.backend.name} array{want}"
            raise AssertionError(msg)
        if shape is not None and tuple(out.shape) != tuple(shape):
            msg = f"returned shape {tuple(out.shape)}, expected shape {tuple(shape)}"
            raise AssertionError(msg)

    def precision(self, dtype: Any, /) -> np.dtype:
        """Return the dtype whose bounds judge the last result, for operands of ``dtype``.

        The least precise of ``dtype``, the last result's floating dtype and the
        implementation's declared ``compute_dtype`` (an optional attribute).
        """
        found = [np.dtype(dtype)]
        if self.result_dtype is not None:
            found.append(self.result_dtype)
        declared = getattr(self.impl, "compute_dtype", None)
        if declared is not None:
            found.append(np.dtype(dtype_name(declared)))
        return min(found, key=lambda d: (d.itemsize, d.name))

    def judge_at_result(self, exact: Exact, /) -> Exact:
        """Hold ``exact``'s bounds to the precision of the last result (see :meth:`precision`)."""
        dtype = self.precision(exact.dtype)
        if dtype.itemsize < exact.dtype.itemsize:
            exact.dtype = dtype
            exact.floor = max(exact.floor, float(np.finfo(dtype).smallest_subnormal))
        return exact

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


def _result_shape(case: Case, reduction: str) -> tuple[int, ...] | None:
    """Return the shape of ``kl_div``'s result for ``case`` (None: no broadcast shape)."""
    if reduction != "none":
        return ()
    try:
        return tuple(np.broadcast_shapes(case.input.shape, case.target.shape))
    except ValueError:
        return None


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
    """Call the implementation and compare with the oracle for ``case``'s reduction.

    The values are judged at the precision of the result (:meth:`Context.precision`).
    """
    reduction = case.reduction if reduction is None else reduction
    exact = ctx.exact(case)
    got = ctx.call(case, reduction).value
    ctx.judge_at_result(exact)
    if reduction == "none":
        assert_pointwise(got, exact)
    else:
        assert_reduced(got, exact, reduction, case.input.shape)
