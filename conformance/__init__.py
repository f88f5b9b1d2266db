"""The conformance suite: check any KL-divergence implementation against PyTorch's semantics.

Named properties in five groups (``math``, ``accuracy``, ``semantics``,
``gradients``, ``hygiene``) are run through hypothesis against an exact oracle
(:mod:`.oracle`). Run it as ``kldiv-spec check`` (see :mod:`.cli`), as a pytest
plugin (``pytest --pyargs kldiv_spec.conformance --kldiv-impl MODULE:CALLABLE``)
or from Python with :func:`run`.
"""

# Importing the checks_* modules registers their properties in PROPERTIES.
from . import (
    checks_accuracy,  # noqa: F401
    checks_gradients,  # noqa: F401
    checks_hidden,  # noqa: F401
    checks_hygiene,  # noqa: F401
    checks_logits,  # noqa: F401
    checks_math,  # noqa: F401
    checks_semantics,  # noqa: F401
)
from .implementations import Implementation
from .namespaces import load_backend
from .properties import (
    GROUPS,
    LEVELS,
    PROPERTIES,
    CouldNotRun,
    NotApplicable,
    Property,
    select,
)
from .runner import Outcome, Report, ResolveError, resolve, run

__all__ = [
    "GROUPS",
    "LEVELS",
    "PROPERTIES",
    "CouldNotRun",
    "Implementation",
    "NotApplicable",
    "Outcome",
    "Property",
    "Report",
    "ResolveError",
    "load_backend",
    "resolve",
    "run",
    "select",
]
