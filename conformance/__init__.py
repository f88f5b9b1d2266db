"""The conformance suite: check any KL-divergence implementation against PyTorch's semantics.

Named properties in five groups (``math``, ``accuracy``, ``semantics``,
``gradients``, ``hygiene``) are run through hypothesis against an exact oracle
(:mod:`.oracle`). Run it as ``kldiv-spec check`` (see :mod:`.cli`), as a pytest
plugin (``pytest --pyargs kldiv_spec.conformance --kldiv-impl MODULE:CALLABLE``)
or from Python with :func:`run`.
"""

from .implementations import Implementation, resolve
from .namespaces import load_backend
from .properties import GROUPS, PROPERTIES, NotApplicable, Property, select
from .runner import Outcome, Report, run

__all__ = [
    "GROUPS",
    "PROPERTIES",
    "Implementation",
    "NotApplicable",
    "Outcome",
    "Property",
    "Report",
    "load_backend",
    "resolve",
    "run",
    "select",
]
