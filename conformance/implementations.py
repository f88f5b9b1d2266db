"""What the suite checks: up to three functions of one implementation.

An :class:`Implementation` wraps ``fn(input, target, reduction=..., log_target=...)``
(PyTorch's ``kl_div`` signature), a from-logits function
``from_logits(input, target, **options)`` (the keywords of
``kldiv_spec.kl_div_from_logits``) and a Gaussian KL ``gaussian(mu, logvar,
**options)`` (those of ``kldiv_spec.gaussian_kl``), any of which may be absent:
the properties of an absent function are n/a. It declares what each can
express: reductions, ``log_target`` forms, directions, temperature scaling,
masks, the backends it runs on, and properties that do not apply to it
(reported as n/a, never as failures). :data:`BUILTIN` holds the built-in ones
(``reference``, ``torch``, ``numpy``); :func:`.runner.resolve` turns any
``--impl`` name into one.

This module sits below every other that builds implementations
(:mod:`.adapters`, :mod:`.mutants`): it imports only :mod:`.numpy_impl`, which
imports nothing from the suite.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kldiv_spec

from . import hidden_reference, numpy_impl

__all__ = ["BUILTIN", "DIRECTIONS", "LOGITS_REDUCTIONS", "REDUCTIONS", "Implementation"]

#: ``kl_div``'s reductions (and ``gaussian_kl``'s).
REDUCTIONS: tuple[str, ...] = ("none", "batchmean", "sum", "mean")
#: ``kl_div_from_logits``'s reductions: ``kl_div``'s and the per-row mean ``'rowmean'``.
LOGITS_REDUCTIONS: tuple[str, ...] = ("none", "batchmean", "sum", "mean", "rowmean")
#: ``kl_div_from_logits``'s directions: KL(teacher || student) and KL(student || teacher).
DIRECTIONS: tuple[str, ...] = ("forward", "reverse")


@dataclass(frozen=True)
class Implementation:
    r"""A KL-divergence implementation under test.

    Parameters
    ----------
    name : str
        How reports name it.
    fn : callable, optional
        ``fn(input, target, reduction=..., log_target=...)`` on arrays of the
        backend. Without it the ``kl_div`` properties are n/a.
    backward : callable, optional
        ``backward(grad_output, input, target, reduction=..., log_target=...)``
        returning ``(grad_input, grad_target)``; used on backends without
        autograd. Without it (and without autograd) the gradient group is n/a.
    reductions : tuple of str
        The reductions it can express; properties needing others are n/a.
    log_targets : tuple of bool
        The ``log_target`` forms it can express.
    backends : tuple of str, optional
        The backends it runs on (None: any).
    not_applicable : mapping
        Property (or group) name -> why it does not apply.
    differentiable : bool
        Whether gradients through the backend's autograd are part of its contract.
    description : str
        One line for reports.
    from_logits : callable, optional
        ``from_logits(input, target, *, temperature, reduction, direction,
        scale_by_temperature_squared, mask=...)``: the KL divergence between
        ``softmax(target / T)`` and ``softmax(input / T)`` as
        ``kldiv_spec.kl_div_from_logits`` defines it (student logits first).
        ``mask`` is passed only when a case has one. Declare what it cannot
        express with the ``logits_*`` fields below: those cases are then not
        drawn. Raising ``NotImplementedError`` makes that case n/a.
    from_logits_backward : callable, optional
        ``from_logits_backward(grad_output, input, target, **options)`` returning
        ``(grad_input, grad_target)`` (``grad_target`` may be None), as
        ``kldiv_spec.kl_div_from_logits_backward``; used on backends without
        autograd (or when ``differentiable`` is False).
    logits_reductions : tuple of str
        The reductions ``from_logits`` can express (of ``LOGITS_REDUCTIONS``).
    logits_directions : tuple of str
        The directions it can express (of ``DIRECTIONS``).
    logits_scalings : tuple of bool
        The values of ``scale_by_temperature_squared`` it can express: ``(True,)``
        for a function that always multiplies by :math:`T^2`, ``(False,)`` for
        one that never does.
    logits_temperature : bool
        Whether it takes temperatures other than 1.
    logits_masks : bool
        Whether it takes a row mask (``mask=``, True keeps a row).
    gaussian : callable, optional
        ``gaussian(mu, logvar, *, reduction, mu_prior=..., logvar_prior=...)``,
        the closed-form KL between diagonal Gaussians as ``kldiv_spec.gaussian_kl``.
    gaussian_backward : callable, optional
        ``gaussian_backward(grad_output, mu, logvar, **options)`` returning
        ``(grad_mu, grad_logvar, ...)``, as ``kldiv_spec.gaussian_kl_backward``.
    gaussian_reductions : tuple of str
        The reductions ``gaussian`` can express.
    gaussian_priors : bool
        Whether it takes ``mu_prior`` and ``logvar_prior`` (else: the standard normal).
    logits_beta : bool
        Whether ``from_logits`` takes ``beta=`` (the generalised Jensen-Shannon
        divergence, :math:`0 \le \beta \le 1`); cases with a ``beta`` are
        drawn only for one that does.
    logits_symmetric : bool
        Whether ``from_logits`` takes ``symmetric=r``: torchtune's mix
        :math:`r\,\mathrm{KL}(p \,\|\, q) + (1 - r)\,\mathrm{KL}(q \,\|\, p)`
        (``direction`` is then ignored); cases with a ratio are drawn only for one
        that does. ``kldiv_spec.kl_div_from_logits`` has no such option.
    logits_axes : tuple of int
        The class axes ``from_logits`` takes as ``axis=`` (``(-1,)``: the last
        only); cases on another axis are drawn only for the ones listed.
    from_hidden : callable, optional
        ``from_hidden(student_hidden, student_weight, teacher_hidden,
        teacher_weight, *, student_bias=..., teacher_bias=..., temperature,
        reduction, direction, scale_by_temperature_squared, mask=...)``: the
        from-logits divergence of the logits ``h @ W.T (+ b)`` of each model,
        hidden states ``(..., H)`` and weights ``(V, H)`` as ``torch.nn.Linear``
        holds them; the biases are passed only when a case has them. It shares
        the ``logits_*`` declarations.
    from_hidden_backward : callable, optional
        ``from_hidden_backward(grad_output, *operands, **options)`` returning the
        gradients w.r.t. the student's hidden states, weight and bias (the bias's
        None without one); used on backends without autograd.
    hidden_biases : bool
        Whether ``from_hidden`` takes ``student_bias`` and ``teacher_bias``.
    unsupported : callable, optional
        ``unsupported(options) -> str | None``: why the implementation cannot take
        one case (``options`` are the keywords of the call, ``reduction``,
        ``temperature``, ``direction``, ``mask``, ...), or None when it can. Only
        that case is n/a; the property's other cases still run. Raising
        ``NotImplementedError`` from a call has the same effect for that call.
    version : str
        The library's version, for reports (``""``: not a library release).
    """

    name: str
    fn: Callable[..., Any] | None = None
    backward: Callable[..., Any] | None = None
    reductions: tuple[str, ...] = REDUCTIONS
    log_targets: tuple[bool, ...] = (False, True)
    backends: tuple[str, ...] | None = None
    not_applicable: Mapping[str, str] = field(default_factory=dict)
    differentiable: bool = True
    description: str = ""
    from_logits: Callable[..., Any] | None = None
    from_logits_backward: Callable[..., Any] | None = None
    logits_reductions: tuple[str, ...] = LOGITS_REDUCTIONS
    logits_directions: tuple[str, ...] = DIRECTIONS
    logits_scalings: tuple[bool, ...] = (True, False)
    logits_temperature: bool = True
    logits_masks: bool = True
    gaussian: Callable[..., Any] | None = None
    gaussian_backward: Callable[..., Any] | None = None
    gaussian_reductions: tuple[str, ...] = REDUCTIONS
    gaussian_priors: bool = True
    logits_beta: bool = False
    logits_axes: tuple[int, ...] = (-1,)
    logits_symmetric: bool = False
    from_hidden: Callable[..., Any] | None = None
    from_hidden_backward: Callable[..., Any] | None = None
    hidden_biases: bool = True
    unsupported: Callable[[Mapping[str, Any]], str | None] | None = None
    version: str = ""

    def __call__(self, input: Any, target: Any, /, **kwargs: Any) -> Any:
        """Call the wrapped ``kl_div`` function."""
        if self.fn is None:
            msg = f"{self.name} has no kl_div function"
            raise TypeError(msg)
        return self.fn(input, target, **kwargs)

    def function(self, subject: str, /) -> Callable[..., Any] | None:
        """Return the function a property of ``subject`` checks, or None.

        ``subject`` is one of ``properties.SUBJECTS``: ``'kl_div'``
        (``fn``), ``'from_logits'``, ``'gaussian'`` or ``'from_hidden'``.
        """
        return {
            "kl_div": self.fn,
            "from_logits": self.from_logits,
            "gaussian": self.gaussian,
            "from_hidden": self.from_hidden,
        }[subject]

    @property
    def primary(self) -> Callable[..., Any]:
        """The first function it has (``fn``, ``from_logits``, ``gaussian``, ``from_hidden``).

        What the backend is inferred from when none is given.
        """
        for f in (self.fn, self.from_logits, self.gaussian, self.from_hidden):
            if f is not None:
                return f
        msg = f"{self.name} has no function to check"
        raise TypeError(msg)


def _with_teacher_gradient(g: Any, input: Any, target: Any, /, **options: Any) -> Any:
    """``kl_div_from_logits_backward`` with the teacher's gradient (``target_grad=True``)."""
    return kldiv_spec.kl_div_from_logits_backward(g, input, target, target_grad=True, **options)


def _reference() -> Implementation:
    def fn(input: Any, target: Any, reduction: str = "mean", log_target: bool = False) -> Any:
        return kldiv_spec.kl_div(input, target, reduction=reduction, log_target=log_target)

    def backward(
        g: Any, input: Any, target: Any, reduction: str = "mean", log_target: bool = False
    ) -> Any:
        return kldiv_spec.kl_div_backward(
            g, input, target, reduction=reduction, log_target=log_target
        )

    return Implementation(
        "reference",
        fn,
        backward,
        description=(
            "kldiv_spec.kl_div, kl_div_from_logits, gaussian_kl (+ their backward), "
            "from_hidden (the logits composed)"
        ),
        from_logits=kldiv_spec.kl_div_from_logits,
        logits_axes=(-1, 0, 1, -2),
        from_logits_backward=_with_teacher_gradient,
        gaussian=kldiv_spec.gaussian_kl,
        gaussian_backward=kldiv_spec.gaussian_kl_backward,
        from_hidden=hidden_reference.from_hidden,
        from_hidden_backward=hidden_reference.from_hidden_backward,
        logits_beta=True,
    )


def _torch() -> Implementation:
    import torch

    return Implementation(
        "torch",
        torch.nn.functional.kl_div,
        backends=("torch", "torch_cuda"),
        description="torch.nn.functional.kl_div",
    )


def _numpy() -> Implementation:
    return Implementation(
        "numpy",
        numpy_impl.kl_div,
        numpy_impl.kl_div_backward,
        backends=("numpy",),
        description="kldiv_spec.conformance.numpy_impl (independent NumPy code)",
    )


#: The built-in implementations, by ``--impl`` name (factories: ``torch`` is imported on call).
BUILTIN: dict[str, Callable[[], Implementation]] = {
    "reference": _reference,
    "torch": _torch,
    "numpy": _numpy,
}
