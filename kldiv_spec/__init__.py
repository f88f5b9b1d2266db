"""kldiv-spec: the Kullback-Leibler divergence loss, specified once for every array library.

``kl_div`` / ``KLDivLoss`` give PyTorch's ``torch.nn.functional.kl_div`` semantics
on NumPy, CuPy, PyTorch, JAX, Dask and array-api-strict arrays, written against
the Python array API standard; ``kl_div_backward`` gives the analytic gradients.
``kldiv_spec.torch`` holds a ``torch.nn.Module``; ``kldiv_spec.conformance``
checks any implementation against the specification.
"""

from ._dispatch import use_reference
from ._functional import kl_div, kl_div_backward
from ._gaussian import gaussian_kl, gaussian_kl_backward
from ._logits import LOGITS_REDUCTIONS, kl_div_from_logits, kl_div_from_logits_backward
from ._loss import KLDivLoss
from ._validation import REDUCTIONS

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
