"""The whole catalogue of the suite's properties: importing this module registers them all.

Each ``checks_*`` module registers its properties in :data:`.properties.PROPERTIES` when
it is imported, in the order of these imports (the report's order within a group): the
from-logits properties, then the Gaussian KL's, then the from-hidden ones. Everything
that lists, selects or runs properties imports them from here, so the list is complete
whichever module was imported first; :mod:`kldiv_spec.conformance` itself imports
nothing until one of its names is used (its pytest plugin is loaded by every pytest run
where the package is installed).
"""

from . import checks_accuracy, checks_gradients, checks_logits  # noqa: F401

# isort: split
from . import (
    checks_gaussian,  # noqa: F401
    checks_hidden,  # noqa: F401
    checks_hygiene,  # noqa: F401
    checks_math,  # noqa: F401
    checks_semantics,  # noqa: F401
)
from .properties import (
    GROUPS,
    LEVELS,
    PROPERTIES,
    CouldNotRun,
    NotApplicable,
    Property,
    select,
)

__all__ = [
    "GROUPS",
    "LEVELS",
    "PROPERTIES",
    "CouldNotRun",
    "NotApplicable",
    "Property",
    "select",
]
