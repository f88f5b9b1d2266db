r"""The real libraries' KL functions as installed, each wrapped as an :class:`Implementation`.

Where :mod:`.adapters` holds generic wrappers and models written from
documentation, this module wraps one function (or loss class) of one released
library per entry of :data:`PEERS`, so that ``kldiv-spec check --impl
peer:NAME`` (or :func:`.runner.run` on ``PEERS[NAME]()``) gives the verdicts on
the library itself. A factory imports its library when called and raises
``ImportError`` when it is missing (the caller reports "not installed").

Each adapter maps conventions and nothing else: the suite's boolean row mask
becomes ``ignore_index`` labels, the classes move to the axis the library
takes, ``direction`` picks ``beta`` 0 (forward) or 1 (reverse) of a generalised
JSD, the logits are divided by the temperature for a library that has none. It
never corrects the library's numbers: no cast back to the input's dtype, and
no :math:`T^2` the library does not apply (no distillation loss here applies
it: ``scale_by_temperature_squared=True`` is declared unsupported except at
:math:`T = 1`, where :math:`T^2 = 1`). What an adapter cannot express is
declared (``logits_*`` fields, ``unsupported``), so that those cases are n/a,
not failures.

:data:`PINS` are versions that install and import together with the CPU build
of ``torch==2.13.0``: the ``peers`` nox session installs them and writes
their conformance matrix, ``docs/conformance-peers.md``, with ``kldiv-spec
check --impl peer:NAME ...``. The differences each library shows, confirmed by
hand, are asserted in ``tests/test_peers.py``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from . import adapters
from . import properties as _properties
from .implementations import Implementation

__all__ = [
    "NO_DEPS",
    "PEERS",
    "PINS",
    "CouldNotRun",
    "keras_kl_divergence",
    "liger_fused_linear_jsd",
    "liger_jsd",
    "optax_kl_divergence",
    "torch_composition",
    "torchdistill_kd_loss",
    "torchmetrics_kl_divergence",
    "torchtune_forward_kl",
    "torchtune_forward_kl_chunked",
    "torchtune_reverse_kl",
    "torchtune_reverse_kl_chunked",
    "torchtune_symmetric_kl",
    "trl_generalized_jsd",
]

#: Versions that install and import together with ``torch==2.13.0`` (CPU build),
#: found in a fresh virtual environment (December 2026). torchvision is left out:
#: the only 0.28.0 wheel on PyPI is a CUDA build, whose operators do not load
#: with the CPU torch (``operator torchvision::nms does not exist``), and an
#: unpinned one replaces torch by a CUDA build. torchdistill requires
#: torchvision without importing it for its losses, so it is installed with
#: ``--no-deps`` (:data:`NO_DEPS`) and its other requirements are pinned here.
PINS: tuple[str, ...] = (
    "torch==2.13.0",
    "torchtune==0.6.1",
    "torchao==0.10.0",  # torchtune 0.6.1 imports torchao.dtypes.nf4tensor, gone after 0.10
    "torchdata==0.11.0",
    "trl==1.16.0",
    "transformers==5.25.0",
    "accelerate==1.16.0",
    "datasets==5.2.0",
    "torchdistill==1.1.5",
    "scipy==1.17.1",
    "PyYAML==6.0.4",
    "Cython==3.3.1",
    "liger-kernel==0.8.5",
    "triton==3.9.0",
    "optax==0.2.8",
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "torchmetrics==1.9.0",
    "keras==3.15.1",
)

#: The distributions of :data:`PINS` to install with ``pip install --no-deps``.
NO_DEPS: tuple[str, ...] = ("torchdistill",)

_TORCH = ("torch",)
_INTERPRETER_WARNING = r"triton(\..*)?$"


class CouldNotRun(_properties.CouldNotRun):
    """The library cannot run on this machine (a Triton kernel without a GPU or interpreter).

    A subclass of :class:`.properties.CouldNotRun`: the runner reports the
    property as ``could not run`` with this message, never as a verdict.
    """


def _version(distribution: str) -> str:
    """Return the installed version of ``distribution`` (as pip knows it)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:  # an uninstalled source tree
        return ""


def _labels(input: Any, mask: Any, ignore_index: int = -100) -> Any:
    """Return integer labels of the rows' shape: 0 keeps a row, ``ignore_index`` drops it."""
    import torch

    rows = input.shape[:-1]
    if mask is None:
        return torch.zeros(rows, dtype=torch.int64, device=input.device)
    keep = torch.broadcast_to(torch.as_tensor(mask, device=input.device), rows)
    return torch.where(
        keep,
        torch.zeros((), dtype=torch.int64, device=input.device),
        torch.full((), ignore_index, dtype=torch.int64, device=input.device),
    )


def _check_axis(input: Any, axis: int) -> None:
    if axis not in (-1, input.ndim - 1):
        msg = "the adapter takes the classes on the last axis"
        raise NotImplementedError(msg)


def _no_t2(options: Mapping[str, Any]) -> str | None:
    """Return why a loss without :math:`T^2` cannot take ``options``, or None.

    Such a loss is declared ``logits_scalings=(False,)``; the suite calls it at
    :math:`T = 1` with the value it declares, since :math:`T^2 = 1` there. The
    adapter still takes ``scale_by_temperature_squared=True`` at :math:`T = 1`
    (one value) from a direct caller, and refuses it at any other temperature:
    it never multiplies :math:`T^2` in itself.
    """
    if options.get("scale_by_temperature_squared") and options.get("temperature", 1.0) != 1.0:
        return "the library applies no T**2 (scale_by_temperature_squared=True only at T=1)"
    return None


def _either(
    *checks: Callable[[Mapping[str, Any]], str | None],
) -> Callable[[Mapping[str, Any]], str | None]:
    """Return an ``unsupported`` giving the first reason of ``checks``."""

    def unsupported(options: Mapping[str, Any]) -> str | None:
        for check in checks:
            why = check(options)
            if why is not None:
                return why
        return None

    return unsupported


def _refuse(
    options: Mapping[str, Any], unsupported: Callable[[Mapping[str, Any]], str | None]
) -> None:
    """Raise NotImplementedError when ``unsupported(options)`` gives a reason."""
    why = unsupported(options)
    if why is not None:
        raise NotImplementedError(why)


def _refuse_t2(temperature: float, scale_by_temperature_squared: bool) -> None:
    """Raise NotImplementedError for a :math:`T^2` the library does not apply (:func:`_no_t2`)."""
    options = {
        "temperature": temperature,
        "scale_by_temperature_squared": scale_by_temperature_squared,
    }
    _refuse(options, _no_t2)


#: What every distillation loss here declares about :math:`T^2` (see :func:`_no_t2`).
_NO_T2: dict[str, Any] = {"logits_scalings": (False,), "unsupported": _no_t2}


def _beta(direction: str) -> float:
    """Return the generalised-JSD ``beta`` of a direction (trl's and Liger's convention)."""
    if direction == "forward":
        return 0.0
    if direction == "reverse":
        return 1.0
    msg = f"direction must be 'forward' or 'reverse', not {direction!r}"
    raise ValueError(msg)


# --------------------------------------------------------------------------- torchtune


def _torchtune(cls_name: str, direction: str, what: str) -> Implementation:
    from torchtune.modules import loss

    impl = adapters.torchtune_style(
        getattr(loss, cls_name),
        direction=direction,
        name=f"torchtune.{cls_name}",
        description=(
            f"torchtune.modules.loss.{cls_name}()(s / T, t / T, labels) ({what}); the adapter "
            "divides by T, passes the mask as labels (-100: dropped), 'sum' as normalize=False"
        ),
        backends=_TORCH,
    )
    inner = impl.from_logits
    assert inner is not None

    def from_logits(input: Any, target: Any, /, **options: Any) -> Any:
        _refuse(options, _no_t2)
        return inner(input, target, **options)

    return dataclasses.replace(
        impl, from_logits=from_logits, **_NO_T2, version=_version("torchtune")
    )


def torchtune_forward_kl() -> Implementation:
    r"""Return torchtune's ``ForwardKLLoss`` (documented as the forward KL), per-token mean or sum.

    It computes :math:`-\sum_i p_i \log q_i`, the cross-entropy, in float32.
    """
    return _torchtune("ForwardKLLoss", "forward", "forward")


def torchtune_reverse_kl() -> Implementation:
    r"""Return torchtune's ``ReverseKLLoss``: :math:`\sum_i q_i (\log q_i - \log p_i)`, float32."""
    return _torchtune("ReverseKLLoss", "reverse", "reverse")


#: How many chunks the chunked losses get: small cases then span several of them.
_CHUNKS = 3


def _torchtune_chunked(cls_name: str, direction: str) -> Implementation:
    """Return a torchtune ``*WithChunkedOutputLoss``, fed the logits as lists of chunks.

    The loss takes ``(batch, tokens, vocab)`` logits split along the tokens into
    ``num_output_chunks`` pieces (as a model's output layer gives them, one chunk
    of hidden states at a time) and ``(batch, tokens)`` labels; it returns the
    mean over the kept tokens (``'rowmean'``). The adapter divides the logits by
    the temperature, views rows of 2-d logits as one sequence, splits both with
    ``torch.chunk`` into ``_CHUNKS`` pieces, and turns the mask into labels.
    """
    from torchtune.modules import loss

    instance = getattr(loss, cls_name)(num_output_chunks=_CHUNKS)

    def from_logits(
        input: Any,
        target: Any,
        /,
        *,
        temperature: float = 1.0,
        reduction: str = "rowmean",
        axis: int = -1,
        direction: str = direction,
        scale_by_temperature_squared: bool = False,
        mask: Any = None,
    ) -> Any:
        import torch

        _check_axis(input, axis)
        _refuse_t2(temperature, scale_by_temperature_squared)
        if reduction != "rowmean" or direction != declared:
            msg = f"the loss is the per-token mean of the {declared} direction only"
            raise NotImplementedError(msg)
        labels = _labels(input, mask)
        if input.ndim != 3:  # rows of 2-d logits: one sequence
            vocab = input.shape[-1]
            input, target = (torch.reshape(a, (1, -1, vocab)) for a in (input, target))
            labels = torch.reshape(labels, (1, -1))
        student = list(torch.chunk(input / temperature, _CHUNKS, dim=1))
        teacher = list(torch.chunk(target / temperature, _CHUNKS, dim=1))
        return instance(student, teacher, labels)

    declared = direction
    return Implementation(
        f"torchtune.{cls_name}",
        backends=_TORCH,
        description=(
            f"torchtune.modules.loss.{cls_name}(num_output_chunks={_CHUNKS})(chunks of s / T, "
            "chunks of t / T, labels): the per-token mean, logits split along the tokens"
        ),
        from_logits=from_logits,
        logits_reductions=("rowmean",),
        logits_directions=(direction,),
        **_NO_T2,
        version=_version("torchtune"),
    )


def torchtune_forward_kl_chunked() -> Implementation:
    """Return torchtune's ``ForwardKLWithChunkedOutputLoss`` (chunks of the forward loss)."""
    return _torchtune_chunked("ForwardKLWithChunkedOutputLoss", "forward")


def torchtune_reverse_kl_chunked() -> Implementation:
    """Return torchtune's ``ReverseKLWithChunkedOutputLoss`` (chunks of the reverse loss)."""
    return _torchtune_chunked("ReverseKLWithChunkedOutputLoss", "reverse")


def torchtune_symmetric_kl() -> Implementation:
    r"""Return torchtune's ``SymmetricKLLoss``: the mix :math:`r F + (1 - r) R` of its two losses.

    ``SymmetricKLLoss(sym_kd_ratio=r)`` returns ``r`` times its forward loss plus
    ``1 - r`` times its reverse loss; the suite's ``symmetric=r`` option states
    :math:`r\,\mathrm{KL}(p \,\|\, q) + (1 - r)\,\mathrm{KL}(q \,\|\, p)`
    (``logits_symmetric``). The adapter divides the logits by the temperature
    (no :math:`T^2`), passes the mask as labels, ``'sum'`` as
    ``normalize=False``; the cases without a ratio are not its convention.
    """
    from torchtune.modules.loss import SymmetricKLLoss

    def from_logits(
        input: Any,
        target: Any,
        /,
        *,
        temperature: float = 1.0,
        reduction: str = "rowmean",
        axis: int = -1,
        direction: str = "forward",
        scale_by_temperature_squared: bool = False,
        mask: Any = None,
        symmetric: float | None = None,
    ) -> Any:
        import torch

        _check_axis(input, axis)
        why = unsupported(
            {
                "symmetric": symmetric,
                "reduction": reduction,
                "temperature": temperature,
                "scale_by_temperature_squared": scale_by_temperature_squared,
            }
        )
        if why is not None:
            raise NotImplementedError(why)
        vocab = input.shape[-1]
        s, t = (torch.reshape(a, (-1, vocab)) / temperature for a in (input, target))
        labels = torch.reshape(_labels(input, mask), (-1,))
        loss = SymmetricKLLoss(sym_kd_ratio=symmetric)
        return loss(s, t, labels, normalize=reduction == "rowmean")

    def unsupported(options: Mapping[str, Any]) -> str | None:
        if options.get("symmetric") is None:
            return "SymmetricKLLoss mixes the two directions: a case without a ratio"
        return _no_t2(options)

    return Implementation(
        "torchtune.SymmetricKLLoss",
        backends=_TORCH,
        description=(
            "torchtune.modules.loss.SymmetricKLLoss(sym_kd_ratio=r)(s / T, t / T, labels): "
            "r * its forward loss + (1 - r) * its reverse loss"
        ),
        from_logits=from_logits,
        logits_reductions=("sum", "rowmean"),
        logits_directions=("forward",),
        logits_scalings=(False,),
        logits_symmetric=True,
        unsupported=unsupported,
        version=_version("torchtune"),
    )


# --------------------------------------------------------------------------- trl


def _trl_none_masked(options: Mapping[str, Any]) -> str | None:
    if options.get("mask") is not None and options.get("reduction") == "none":
        return (
            "trl's reduction='none' with labels returns the kept rows' terms only "
            "(jsd[mask], shape (kept, vocab)), not the input's shape"
        )
    return None


_trl_unsupported = _either(_no_t2, _trl_none_masked)


def trl_generalized_jsd() -> Implementation:
    """Return trl's ``GKDTrainer.generalized_jsd_loss``: any ``beta``, 0 (forward) and 1 (reverse).

    The library divides by the temperature itself and applies no :math:`T^2`;
    its reductions are ``kl_div``'s (on the elementwise terms), and a mask is
    passed as labels (-100: dropped).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"You are importing from 'trl\.experimental'")
        from trl.experimental.gkd import GKDTrainer

    loss = GKDTrainer.generalized_jsd_loss

    def from_logits(
        input: Any,
        target: Any,
        /,
        *,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        axis: int = -1,
        direction: str = "forward",
        scale_by_temperature_squared: bool = False,
        mask: Any = None,
        beta: float | None = None,
    ) -> Any:
        _check_axis(input, axis)
        options = {
            "mask": mask,
            "reduction": reduction,
            "temperature": temperature,
            "scale_by_temperature_squared": scale_by_temperature_squared,
        }
        _refuse(options, _trl_unsupported)
        if reduction == "rowmean":
            msg = "trl has no 'rowmean'"
            raise NotImplementedError(msg)
        labels = None if mask is None else _labels(input, mask)
        return loss(
            input,
            target,
            labels=labels,
            beta=_beta(direction) if beta is None else beta,
            temperature=temperature,
            reduction=reduction,
        )

    return Implementation(
        "trl.generalized_jsd_loss",
        backends=_TORCH,
        description=(
            "trl.experimental.gkd.GKDTrainer.generalized_jsd_loss(s, t, labels, beta, "
            "temperature=T, reduction) (no T**2)"
        ),
        from_logits=from_logits,
        logits_reductions=("none", "batchmean", "sum", "mean"),
        logits_scalings=(False,),
        unsupported=_trl_unsupported,
        logits_beta=True,
        version=_version("trl"),
    )


# --------------------------------------------------------------------------- torchdistill


def torchdistill_kd_loss() -> Implementation:
    r"""Return torchdistill's ``KDLoss`` with ``alpha=0`` (the soft loss alone), forward direction.

    ``KDLoss`` documents :math:`\alpha L_{CE} + (1 - \alpha) T^2 L_{KL}`, but
    with ``alpha=0`` it returns the plain ``nn.KLDivLoss`` of
    ``log_softmax(s / T, dim=1)`` and ``softmax(t / T, dim=1)``, without
    :math:`T^2` (``scale_by_temperature_squared=True`` only at :math:`T = 1`). It takes the
    classes on axis 1: ``axis=1`` (or its negative form) is passed as it is, and
    for the last axis the adapter moves it there (and back for ``'none'``); it
    has no mask.
    """
    import torch
    from torchdistill.losses.mid_level import KDLoss

    def from_logits(
        input: Any,
        target: Any,
        /,
        *,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        axis: int = -1,
        direction: str = "forward",
        scale_by_temperature_squared: bool = False,
        mask: Any = None,
    ) -> Any:
        _refuse_t2(temperature, scale_by_temperature_squared)
        if mask is not None or direction != "forward":
            msg = "KDLoss: the forward direction, without a mask"
            raise NotImplementedError(msg)
        if input.ndim < 2:
            msg = "KDLoss takes the classes on axis 1: at least 2-d logits"
            raise NotImplementedError(msg)
        native = axis % input.ndim == 1  # KDLoss's own axis: passed as it is
        if not native and axis % input.ndim != input.ndim - 1:
            msg = "KDLoss takes the classes on axis 1 (the adapter moves the last axis there)"
            raise NotImplementedError(msg)
        fn = KDLoss(
            "student", "output", "teacher", "output", temperature, alpha=0, reduction=reduction
        )
        s, t = (input, target) if native else (torch.movedim(a, -1, 1) for a in (input, target))
        out = fn({"student": {"output": s}}, {"teacher": {"output": t}})
        return torch.movedim(out, 1, -1) if reduction == "none" and not native else out

    return Implementation(
        "torchdistill.KDLoss",
        backends=_TORCH,
        description=(
            "torchdistill.losses.mid_level.KDLoss(temperature=T, alpha=0, reduction) on "
            "{'student': {'output': s}}, classes on axis 1 (no T**2 at alpha=0)"
        ),
        from_logits=from_logits,
        logits_reductions=("none", "batchmean", "sum", "mean"),
        logits_directions=("forward",),
        logits_masks=False,
        logits_axes=(-1, 1, -2),
        **_NO_T2,
        version=_version("torchdistill"),
    )


# --------------------------------------------------------------------------- Liger-Kernel


def liger_fused_linear_jsd() -> Implementation:
    r"""Return Liger-Kernel's ``LigerFusedLinearJSDLoss`` (plain PyTorch): hidden states, logits.

    The loss takes hidden states :math:`h` and weights :math:`W` (and biases)
    and forms the logits :math:`h W^\top + b` a chunk of rows at a time
    (:func:`_fused_linear`): its ``from_hidden`` passes them as they are (the
    ``from-hidden`` properties). Its ``from_logits`` passes logits as :math:`h`
    and the identity as :math:`W`, so that :math:`h W^\top` equals them exactly
    for finite logits; non-finite logits cannot cross the product (``inf * 0``
    is NaN), so those cases are n/a (``NotImplementedError``). ``beta`` any
    value (0 and 1 for the directions), the temperature passed as is (the
    library applies no :math:`T^2`), the mask as labels; it divides by the
    kept tokens: ``'rowmean'``.
    """
    import torch
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    def from_logits(
        input: Any,
        target: Any,
        /,
        *,
        temperature: float = 1.0,
        reduction: str = "rowmean",
        axis: int = -1,
        direction: str = "forward",
        scale_by_temperature_squared: bool = False,
        mask: Any = None,
        beta: float | None = None,
    ) -> Any:
        _check_axis(input, axis)
        _refuse_t2(temperature, scale_by_temperature_squared)
        if reduction != "rowmean":
            msg = "LigerFusedLinearJSDLoss averages over the kept tokens ('rowmean')"
            raise NotImplementedError(msg)
        if not (bool(torch.isfinite(input).all()) and bool(torch.isfinite(target).all())):
            msg = "non-finite logits cannot pass through h @ I.T (inf * 0 is NaN)"
            raise NotImplementedError(msg)
        vocab = input.shape[-1]
        h_s, h_t = torch.reshape(input, (-1, vocab)), torch.reshape(target, (-1, vocab))
        labels = torch.reshape(_labels(input, mask), (-1,))
        eye = torch.eye(vocab, dtype=input.dtype, device=input.device)
        fn = _fused_linear(LigerFusedLinearJSDLoss, direction, beta, temperature)
        return fn(h_s, eye, h_t, eye.to(target.dtype), labels)

    def from_hidden(
        student_hidden: Any,
        student_weight: Any,
        teacher_hidden: Any,
        teacher_weight: Any,
        /,
        *,
        student_bias: Any = None,
        teacher_bias: Any = None,
        temperature: float = 1.0,
        reduction: str = "rowmean",
        direction: str = "forward",
        scale_by_temperature_squared: bool = False,
        mask: Any = None,
    ) -> Any:
        _refuse_t2(temperature, scale_by_temperature_squared)
        if reduction != "rowmean":
            msg = "LigerFusedLinearJSDLoss averages over the kept tokens ('rowmean')"
            raise NotImplementedError(msg)
        h_s = torch.reshape(student_hidden, (-1, student_hidden.shape[-1]))
        h_t = torch.reshape(teacher_hidden, (-1, teacher_hidden.shape[-1]))
        rows = student_hidden[..., 0]
        labels = torch.reshape(_labels(rows[..., None], mask), (-1,))
        fn = _fused_linear(LigerFusedLinearJSDLoss, direction, None, temperature)
        return fn(h_s, student_weight, h_t, teacher_weight, labels, student_bias, teacher_bias)

    return Implementation(
        "liger.LigerFusedLinearJSDLoss",
        backends=_TORCH,
        description=(
            "liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(weight_hard_loss=0, beta=0|1, "
            "temperature=T, compiled=False)(s, I, t, I, labels): hidden states = logits, "
            "identity weights (finite logits only; no T**2)"
        ),
        from_logits=from_logits,
        from_hidden=from_hidden,
        logits_reductions=("rowmean",),
        logits_beta=True,
        **_NO_T2,
        version=_version("liger-kernel"),
    )


#: Rows per chunk of the fused linear loss: small cases then span several chunks.
_LIGER_CHUNK = 2


def _fused_linear(cls: Any, direction: str, beta: float | None, temperature: float) -> Any:
    """Return ``LigerFusedLinearJSDLoss`` as the adapters call it: the soft loss alone.

    ``weight_hard_loss=0``, ``weight_soft_loss=1``, ``beta`` (or 0 / 1 for the
    direction), the temperature as is (no :math:`T^2`), ``compiled=False`` (no
    C++ compiler needed) and ``chunk_size=_LIGER_CHUNK`` rows.
    """
    return cls(
        weight_hard_loss=0.0,
        weight_soft_loss=1.0,
        beta=_beta(direction) if beta is None else beta,
        temperature=temperature,
        compiled=False,
        chunk_size=_LIGER_CHUNK,
    )


def _interpreted(kernel: Any) -> bool:
    """Whether a Triton kernel was built for Triton's CPU interpreter."""
    return type(kernel).__name__ == "InterpretedFunction"


def liger_jsd() -> Implementation:
    """Return Liger-Kernel's ``LigerJSD`` (Triton) through :func:`.adapters.liger_style`.

    On CPU tensors its kernel runs only under Triton's interpreter, which
    ``TRITON_INTERPRET=1`` selects when Triton compiles the kernel (the
    variable must be set before ``liger_kernel`` is first imported); otherwise
    each call raises :class:`CouldNotRun`. The interpreter's NumPy warnings
    (on the masked lanes of a block) are silenced; the kernel's values are not
    touched. No :math:`T^2` (``scale_by_temperature_squared=True`` only at :math:`T = 1`).
    """
    from liger_kernel.ops import jsd as jsd_ops
    from liger_kernel.transformers import LigerJSD

    generic = adapters.liger_style(LigerJSD, name="liger.LigerJSD", backends=_TORCH)
    inner = generic.from_logits
    assert inner is not None

    def from_logits(input: Any, target: Any, /, **options: Any) -> Any:
        if input.device.type == "cpu" and not _interpreted(jsd_ops._jsd_kernel):
            msg = (
                "LigerJSD is a Triton kernel: on CPU tensors it runs only under Triton's "
                "interpreter (TRITON_INTERPRET=1 set before liger_kernel is imported)"
            )
            raise CouldNotRun(msg)
        _refuse(options, _no_t2)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=RuntimeWarning, module=_INTERPRETER_WARNING)
            return inner(input, target, **options)

    return dataclasses.replace(
        generic,
        from_logits=from_logits,
        **_NO_T2,
        description=(
            "liger_kernel.transformers.LigerJSD(beta=0|1)(log_softmax(s / T), "
            "log_softmax(t / T), labels) (Triton; on CPU under TRITON_INTERPRET=1; no T**2)"
        ),
        version=_version("liger-kernel"),
    )


# --------------------------------------------------------------------------- kl_div-style


def optax_kl_divergence() -> Implementation:
    """Return optax's ``kl_divergence`` (``_with_log_targets`` for log-targets), on JAX."""
    impl = adapters.load("optax")
    return dataclasses.replace(impl, name="optax.kl_divergence", version=_version("optax"))


def torchmetrics_kl_divergence() -> Implementation:
    """Return torchmetrics' functional ``kl_divergence(p, q)`` (2-d, renormalising), PyTorch."""
    impl = adapters.load("torchmetrics")
    return dataclasses.replace(
        impl, name="torchmetrics.kl_divergence", backends=_TORCH, version=_version("torchmetrics")
    )


def keras_kl_divergence() -> Implementation:
    """Return Keras 3's ``losses.KLDivergence`` on the JAX backend (``KERAS_BACKEND=jax``)."""
    impl = adapters.load("keras")
    return dataclasses.replace(impl, name="keras.KLDivergence", version=_version("keras"))


# --------------------------------------------------------------------------- PyTorch


def torch_composition() -> Implementation:
    """Return PyTorch's own recipe, ``T**2 * F.kl_div(F.log_softmax(s / T), F.softmax(t / T))``.

    The reverse direction swaps the two logits; without
    ``scale_by_temperature_squared`` the :math:`T^2` is left out. The
    reductions are ``kl_div``'s; there is no mask.
    """
    import torch
    import torch.nn.functional as F

    def from_logits(
        input: Any,
        target: Any,
        /,
        *,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        axis: int = -1,
        direction: str = "forward",
        scale_by_temperature_squared: bool = True,
        mask: Any = None,
    ) -> Any:
        _check_axis(input, axis)
        if mask is not None or reduction == "rowmean":
            msg = "the composition has no mask and no 'rowmean'"
            raise NotImplementedError(msg)
        _beta(direction)  # ValueError for an unknown direction
        s, t = (input, target) if direction == "forward" else (target, input)
        out = F.kl_div(
            F.log_softmax(s / temperature, dim=-1),
            F.softmax(t / temperature, dim=-1),
            reduction=reduction,
        )
        return out * (temperature * temperature) if scale_by_temperature_squared else out

    return Implementation(
        "torch.composition",
        backends=_TORCH,
        description=(
            "T**2 * F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction) "
            "(reverse: s and t swapped)"
        ),
        from_logits=from_logits,
        logits_reductions=("none", "batchmean", "sum", "mean"),
        logits_masks=False,
        version=torch.__version__,
    )


#: The real libraries' functions, by name (``--impl peer:NAME``): factories that
#: import the library when called (``ImportError`` when it is not installed).
PEERS: dict[str, Callable[[], Implementation]] = {
    "torchtune.ForwardKLLoss": torchtune_forward_kl,
    "torchtune.ReverseKLLoss": torchtune_reverse_kl,
    "torchtune.SymmetricKLLoss": torchtune_symmetric_kl,
    "torchtune.ForwardKLWithChunkedOutputLoss": torchtune_forward_kl_chunked,
    "torchtune.ReverseKLWithChunkedOutputLoss": torchtune_reverse_kl_chunked,
    "trl.generalized_jsd_loss": trl_generalized_jsd,
    "torchdistill.KDLoss": torchdistill_kd_loss,
    "liger.LigerFusedLinearJSDLoss": liger_fused_linear_jsd,
    "liger.LigerJSD": liger_jsd,
    "optax.kl_divergence": optax_kl_divergence,
    "torchmetrics.kl_divergence": torchmetrics_kl_divergence,
    "keras.KLDivergence": keras_kl_divergence,
    "torch.composition": torch_composition,
}
