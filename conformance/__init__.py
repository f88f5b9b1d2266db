"""The conformance suite: check any KL-divergence implementation against PyTorch's semantics.

Named properties in five groups (``math``, ``accuracy``, ``semantics``,
``gradients``, ``hygiene``) are run through hypothesis against an exact oracle
(:mod:`.oracle`). Run it as ``kldiv-spec check`` (see :mod:`.cli`), as a pytest
plugin (``pytest --pyargs kldiv_spec.conformance --kldiv-impl MODULE:CALLABLE``)
or from Python with :func:`run`.
"""

if (
    __name__ != "kldiv_spec.conformance"
):  # the folder conformance/ imported by its own name, from a checkout's root
    msg = (
        "conformance/ is the package kldiv_spec.conformance: import it by that name (a "
        "second copy under the name 'conformance' would hold a second copy of every module)"
    )
    raise ImportError(msg)


# Importing the checks_* modules registers their properties in PROPERTIES, in the order
# of these imports (the report's order within a group): the from-logits properties, then
# the Gaussian KL's, then the from-hidden ones.
from . import checks_accuracy, checks_gradients, checks_logits  # noqa: F401

# isort: split
from . import (
    checks_gaussian,  # noqa: F401
    checks_hidden,  # noqa: F401
    checks_hygiene,  # noqa: F401
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
