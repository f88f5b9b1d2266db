"""kldiv-spec: the Kullback-Leibler divergence loss, specified once for every array library.

``kl_div`` / ``KLDivLoss`` give PyTorch's ``torch.nn.functional.kl_div`` semantics
on NumPy, CuPy, PyTorch, JAX, Dask and array-api-strict arrays, written against
the Python array API standard; ``kl_div_backward`` gives the analytic gradients.
``kldiv_spec.torch`` holds a ``torch.nn.Module``; ``kldiv_spec.conformance``
checks any implementation against the specification.
"""

import importlib as _importlib
from typing import Any as _Any

# The environment variables are read now (and an invalid one fails the import), whatever
# is used later: see docs/settings.md.
from . import _settings  # noqa: F401

#: Public name -> the module that defines it. Nothing is imported until a name is used
#: (PEP 562), so that importing a subpackage alone (the conformance suite's pytest
#: plugin, loaded by every pytest run where kldiv-spec is installed) costs nothing.
_EXPORTS = {
    "LOGITS_REDUCTIONS": "_validation",
    "REDUCTIONS": "_validation",
    "KLDivLoss": "_loss",
    "gaussian_kl": "_gaussian",
    "gaussian_kl_backward": "_gaussian",
    "kl_div": "_functional",
    "kl_div_backward": "_functional",
    "kl_div_from_logits": "_logits",
    "kl_div_from_logits_backward": "_logits",
    "kl_div_from_hidden": "_hidden",
    "kl_div_from_hidden_backward": "_hidden",
    "use_reference": "_dispatch",
}

__all__ = [
    "LOGITS_REDUCTIONS",
    "REDUCTIONS",
    "KLDivLoss",
    "gaussian_kl",
    "gaussian_kl_backward",
    "kl_div",
    "kl_div_backward",
    "kl_div_from_hidden",
    "kl_div_from_hidden_backward",
    "kl_div_from_logits",
    "kl_div_from_logits_backward",
    "use_reference",
]


def __getattr__(name: str) -> _Any:
    """Import the public API on first use of any of its names (see :data:`_EXPORTS`)."""
    if name not in _EXPORTS:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    _load_api()
    return globals()[name]


def _load_api() -> None:
    """Import every public name at once (one first use loads the whole API)."""
    for export, module in _EXPORTS.items():
        globals()[export] = getattr(_importlib.import_module(f".{module}", __name__), export)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__version__ = "0.1.0"
