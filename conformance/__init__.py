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


import importlib as _importlib
from typing import Any as _Any

#: Public name -> the module that defines it. Nothing is imported until a name is used
#: (PEP 562): the package's pytest plugin is loaded by every pytest run where kldiv-spec
#: is installed, and importing the suite costs about 0.3 s.
_EXPORTS = {
    "GROUPS": "catalog",
    "LEVELS": "catalog",
    "PROPERTIES": "catalog",
    "CouldNotRun": "catalog",
    "NotApplicable": "catalog",
    "Property": "catalog",
    "select": "catalog",
    "Implementation": "implementations",
    "load_backend": "namespaces",
    "Outcome": "runner",
    "Report": "runner",
    "ResolveError": "runner",
    "resolve": "runner",
    "run": "runner",
}

__all__ = sorted(_EXPORTS, key=lambda name: (not name.isupper(), name[0].islower(), name))


def __getattr__(name: str) -> _Any:
    """Import the module of a public name on first use (see :data:`_EXPORTS`)."""
    module = _EXPORTS.get(name)
    if module is None:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
