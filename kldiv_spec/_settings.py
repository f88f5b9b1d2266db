"""Every environment variable kldiv-spec reads, read in one place, once.

The variables are read when :mod:`kldiv_spec` is first imported (as NumPy and PyTorch
read theirs) and kept in :data:`current`, a :class:`Settings`. Code that depends on a
setting reads ``_settings.current.<field>`` when it runs, so :func:`reload` (after
changing ``os.environ``) or :func:`override` (for a block of code, in tests) takes effect
on the next call. Reading a variable on every call would cost about 0.7 microseconds
each (``os.environ.get`` raises and catches a ``KeyError`` for an unset name), a
fifth of a small call. Within a process, switch fast paths off with
:func:`kldiv_spec.use_reference`.

:data:`VARIABLES` documents each one: its default and its effect. The table in
``docs/settings.md`` is generated from it (``docs/_tools/settings_table.py``, checked
by ``tests/test_docs.py``). An invalid value raises ``ValueError`` naming the variable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__: list[str] = []

#: Default size (elements) from which NumPy calls take the blocked kernels.
NUMPY_MIN_ELEMENTS = 1 << 16
#: Default size (elements) from which eager PyTorch calls take the blocked or Triton kernels.
TORCH_MIN_ELEMENTS = 1 << 15
#: At most this many worker threads by default.
MAX_DEFAULT_THREADS = 8

_TRUE = ("1", "true", "on", "yes")


@dataclass(frozen=True)
class Variable:
    """One environment variable: its name, the :class:`Settings` field it sets, its docs."""

    name: str
    field: str
    default: str
    effect: str
    parse: Callable[[str, str], Any]
    scope: str = "package"


@dataclass(frozen=True)
class Settings:
    """The values of :data:`VARIABLES` (see there for each field's meaning)."""

    reference: bool = False
    numpy_min_elements: int = NUMPY_MIN_ELEMENTS
    num_threads: int | None = None
    numpy_fused: bool = True
    torch_min_elements: int = TORCH_MIN_ELEMENTS
    triton_interpret: bool = False

    def threads(self) -> int:
        """Return the number of worker threads: the setting, or the usable cores (at most 8)."""
        if self.num_threads is not None:
            return self.num_threads
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        return max(1, min(cores, MAX_DEFAULT_THREADS))


def _integer(minimum: int, /) -> Callable[[str, str], int]:
    def parse(name: str, value: str, /) -> int:
        try:
            n = int(value)
        except ValueError:
            n = minimum - 1
        if n < minimum:
            msg = f"{name} must be an integer >= {minimum}, got {value!r}"
            raise ValueError(msg)
        return n

    return parse


def _switch(name: str, value: str, /) -> bool:
    """``0`` is off, ``1`` is on (as every variable here; the empty string is the default)."""
    if value not in ("0", "1"):
        msg = f"{name} must be 0 or 1, got {value!r}"
        raise ValueError(msg)
    return value == "1"


def _reference(name: str, value: str, /) -> bool:
    """Any value but ``0`` forces the reference (as it always did)."""
    return value != "0"


def _triton(name: str, value: str, /) -> bool:
    """Triton's own reading of ``TRITON_INTERPRET``: a true-ish word turns it on."""
    return value.lower() in _TRUE


#: Every variable, in the order ``docs/settings.md`` lists them.
VARIABLES: tuple[Variable, ...] = (
    Variable(
        "KLDIV_SPEC_REFERENCE",
        "reference",
        "0",
        "Any value but `0` evaluates every call with the reference, never a fast path "
        "(process-wide; `kldiv_spec.use_reference()` does it for a block of code).",
        _reference,
    ),
    Variable(
        "KLDIV_SPEC_NUMPY_MIN_ELEMENTS",
        "numpy_min_elements",
        str(NUMPY_MIN_ELEMENTS),
        "NumPy calls (and PyTorch CPU tensors of the from-logits functions) of at least this "
        "many elements take the blocked, multithreaded kernels; smaller ones take the "
        "reference's operations. `0` sends every non-empty, non-0-d call to the kernels "
        "(to run the conformance suite on them).",
        _integer(0),
    ),
    Variable(
        "KLDIV_SPEC_NUM_THREADS",
        "num_threads",
        f"the usable cores, at most {MAX_DEFAULT_THREADS}",
        "Worker threads of the blocked NumPy kernels (also used for PyTorch CPU tensors).",
        _integer(1),
    ),
    Variable(
        "KLDIV_SPEC_NUMPY_FUSED",
        "numpy_fused",
        "1",
        "`0` turns the compiled AVX2 passes off (`backends/_fused.c`, "
        "`backends/_fused_logits.c`, `backends/_fused_logits64.c`, `backends/_fused_jsd.c`): "
        "the blocked kernels use "
        "NumPy's ufuncs instead (NumPy float16 `kl_div` too), PyTorch's half-precision "
        "`kl_div` the reference's ATen operations summed in float64 (the same values), and "
        "half-precision logits and the Jensen-Shannon divergence (`beta`) the reference.",
        _switch,
    ),
    Variable(
        "KLDIV_SPEC_TORCH_MIN_ELEMENTS",
        "torch_min_elements",
        str(TORCH_MIN_ELEMENTS),
        "Eager `kl_div` calls on PyTorch tensors of at least this many elements take the "
        "blocked (CPU) or Triton (CUDA) kernels; smaller ones, and every call under "
        "`torch.compile`, take ATen's own `kl_div`. `0` sends every call there.",
        _integer(0),
    ),
    Variable(
        "TRITON_INTERPRET",
        "triton_interpret",
        "0",
        "Triton's own variable. Set (`1`) before Triton is imported, it makes the "
        "from-logits functions run their Triton kernels on PyTorch CPU tensors in Triton's "
        "interpreter (slow: for testing the CUDA kernels without a GPU) instead of the "
        "blocked NumPy kernels.",
        _triton,
        scope="Triton",
    ),
)


def read(environ: Mapping[str, str] | None = None, /) -> Settings:
    """Return the :class:`Settings` of ``environ`` (default: ``os.environ``).

    An unset or empty variable takes its default; an invalid value raises ValueError.
    """
    environ = os.environ if environ is None else environ
    values = {}
    for variable in VARIABLES:
        raw = environ.get(variable.name, "").strip()
        if raw:
            values[variable.field] = variable.parse(variable.name, raw)
    return Settings(**values)


#: The settings in force; replaced (never mutated) by :func:`reload` and :func:`override`.
current: Settings = read()


def reload() -> Settings:
    """Read the environment again (after changing ``os.environ``) and return the settings."""
    global current
    current = read()
    return current


@contextlib.contextmanager
def override(**values: Any) -> Iterator[Settings]:
    """Replace some settings for the duration of a block (process-wide: for tests).

    >>> from kldiv_spec import _settings
    >>> with _settings.override(numpy_min_elements=0) as s:
    ...     s.numpy_min_elements
    0
    """
    global current
    saved = current
    current = dataclasses.replace(current, **values)
    try:
        yield current
    finally:
        current = saved
