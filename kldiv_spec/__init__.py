"""kldiv-spec: the Kullback-Leibler divergence loss, specified once for every array library.

``kl_div`` / ``KLDivLoss`` give PyTorch's ``torch.nn.functional.kl_div`` semantics
on NumPy, CuPy, PyTorch, JAX, Dask and array-api-strict arrays, written against
the Python array API standard; ``kl_div_backward`` gives the analytic gradients.
``kldiv_spec.torch`` holds a ``torch.nn.Module``; ``kldiv_spec.conformance``
checks any implementation against the specification.
"""

from pathlib import Path as _Path

from . import _source_tree

_source_tree.install(_Path(__file__).resolve().parent)

from ._dispatch import use_reference  # noqa: E402
from ._functional import kl_div, kl_div_backward  # noqa: E402
from ._logits import (  # noqa: E402
    LOGITS_REDUCTIONS,
    gaussian_kl,
    gaussian_kl_backward,
    kl_div_from_logits,
    kl_div_from_logits_backward,
)
from ._loss import KLDivLoss  # noqa: E402
from ._validation import REDUCTIONS  # noqa: E402

__all__ = [
    "LOGITS_REDUCTIONS",
    "REDUCTIONS",
    "KLDivLoss",
    "gaussian_kl",
    "gaussian_kl_backward",
    "kl_div",
    "kl_div_backward",
    "kl_div_from_logits",
    "kl_div_from_logits_backward",
    "use_reference",
]
__version__ = "0.1.0"
