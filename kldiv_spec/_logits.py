r"""The functions from logits and for Gaussians: validate, pick a fast path, else the reference.

``kl_div_from_logits`` is knowledge distillation in one call: the value of
``T**2 * kl_div(log_softmax(input / T), softmax(target / T), reduction=...)``
without materialising either distribution; ``gaussian_kl`` is the closed-form
KL divergence between diagonal Gaussians (the VAE term). Both run on every
array library of the package, with analytic gradients (``*_backward``, and
through autograd on PyTorch and JAX). See ``docs/logits.md``.

Fast paths for the logits functions are modules ``kldiv_spec.backends.logits_<name>``
(``<name>`` the backend registry's name), looked up here and not by
:mod:`kldiv_spec._dispatch`, whose protocol is ``kl_div``'s. Each has::

    kl_div_from_logits(ops) -> array | NotImplemented
    kl_div_from_logits_backward(grad_output, ops, target_grad)
        -> (grad_input, grad_target or None) | NotImplemented

with ``ops`` a :class:`LogitsOperands`; ``NotImplemented`` leaves the call to
the reference. :func:`kldiv_spec.use_reference` forces the reference here too.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from . import _core_logits
from ._dispatch import reference_forced
from ._floating_point import quiet
from ._validation import (
    _check_array,
    _check_floating,
    _unknown,
    broadcast_shape,
    check_beta,
    check_reduction,
)

__all__ = [
    "LOGITS_REDUCTIONS",
    "gaussian_kl",
    "gaussian_kl_backward",
    "kl_div_from_logits",
    "kl_div_from_logits_backward",
]

Array = Any

#: The reductions of :func:`kl_div_from_logits`: ``kl_div``'s and ``'rowmean'``.
LOGITS_REDUCTIONS: tuple[str, ...] = ("none", "batchmean", "sum", "mean", "rowmean")

#: The directions of :func:`kl_div_from_logits`.
DIRECTIONS: tuple[str, ...] = ("forward", "reverse")


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class LogitsOperands:
    r"""One validated call of :func:`kl_div_from_logits`, computed once.

    Attributes
    ----------
    xp : namespace
        The array API namespace of the operands.
    input, target : array
        Student and teacher logits, as passed (same shape).
    mask : array or None
        The row mask as passed (True keeps a row), broadcastable to :attr:`row_shape`.
    dtype : dtype
        The result's dtype: the common dtype of ``input`` and ``target``.
    compute_dtype : dtype
        The dtype the values are computed in: ``dtype``, or float32 for half precision.
    shape : tuple of int
        The logits' shape.
    axis : int
        The class axis, non-negative.
    temperature : float
        :math:`T > 0`.
    factor : float
        :math:`T^2`, or 1 without the scaling.
    direction : str
        ``'forward'`` (KL(teacher || student)) or ``'reverse'``.
    reduction : str
        One of :data:`LOGITS_REDUCTIONS`.
    beta : float or None
        The generalised Jensen-Shannon divergence's :math:`\beta \in [0, 1]`,
        or None for the KL of ``direction``. Fast paths return
        ``NotImplemented`` for any ``beta`` that is not None.
    """

    xp: Any
    input: Array
    target: Array
    mask: Array | None
    dtype: Any
    compute_dtype: Any
    shape: tuple[int, ...]
    axis: int
    temperature: float
    factor: float
    direction: str
    reduction: str
    beta: float | None = None

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The shape of the rows: the logits' shape without ``axis``."""
        return tuple(n for i, n in enumerate(self.shape) if i != self.axis)

    @property
    def vocab(self) -> int:
        """The number of classes (the length of ``axis``)."""
        return self.shape[self.axis]

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The result's shape: the logits' for ``'none'``, else ``()``."""
        return self.shape if self.reduction == "none" else ()

    def kept_mask(self) -> Array | None:
        """Return the mask with ``axis`` restored (size 1), broadcast to the rows, or None."""
        if self.mask is None:
            return None
        xp = self.xp
        rows = xp.broadcast_to(self.mask, self.row_shape)
        return xp.expand_dims(rows, axis=self.axis)


def check_temperature(temperature: object, /) -> float:
    """Return ``temperature`` as a float if it is a positive finite real number, else raise."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        kind = type(temperature)
        msg = (
            "temperature must be a positive finite real number, got "
            f"{kind.__module__}.{kind.__qualname__}"
        )
        raise TypeError(msg)
    value = float(temperature)
    if not (math.isfinite(value) and value > 0):
        msg = f"temperature must be a positive finite real number, got {temperature!r}"
        raise ValueError(msg)
    return value


def _check_bool(value: object, name: str, /) -> bool:
    if not isinstance(value, bool):
        kind = type(value)
        msg = f"{name} must be a bool, got {kind.__module__}.{kind.__qualname__}"
        raise TypeError(msg)
    return value


def _check_choice(value: object, name: str, choices: tuple[str, ...], /) -> str:
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        msg = f"{value!r} is not a valid value for {name}: expected one of {valid}"
        raise ValueError(msg)
    return value


def check_axis(axis: object, ndim: int, /, name: str = "axis") -> int:
    """Return ``axis`` normalised to ``0 <= axis < ndim``, or raise naming ``name``."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        kind = type(axis)
        msg = f"{name} must be an int, got {kind.__module__}.{kind.__qualname__}"
        raise TypeError(msg)
    a = int(axis)
    if ndim == 0:
        msg = f"input must have at least one dimension (the class {name}), got a 0-d array"
        raise ValueError(msg)
    if not -ndim <= a < ndim:
        msg = f"{name} {a} is out of range for input of {ndim} dimensions"
        raise ValueError(msg)
    return a % ndim


def check_beta_direction(beta: object, direction: str, /) -> float | None:
    """Return ``beta`` checked (:func:`~kldiv_spec._validation.check_beta`), with ``direction``.

    ``beta`` chooses the divergence itself (0: forward KL, 1: reverse KL, in
    between the mixture), so it is a ValueError together with ``direction='reverse'``.
    """
    value = check_beta(beta)
    if value is not None and direction != "forward":
        msg = (
            f"beta={beta!r} with direction={direction!r}: beta chooses the divergence "
            "(beta=0 is the forward KL, beta=1 the reverse KL); leave direction at 'forward'"
        )
        raise ValueError(msg)
    return value


def _namespace(arrays: dict[str, Any], /) -> Any:
    try:
        return array_api_compat.array_namespace(*arrays.values())
    except TypeError:
        kinds = ", ".join(f"{type(a).__module__}.{type(a).__name__}" for a in arrays.values())
        msg = f"{' and '.join(arrays)} must come from the same array library, got {kinds}"
        raise TypeError(msg) from None


def _same_device(arrays: dict[str, Any], /) -> None:
    devices = {name: array_api_compat.device(a) for name, a in arrays.items()}
    known = {name: d for name, d in devices.items() if d is not None}
    first = next(iter(known.items()), None)
    for name, d in known.items():
        if first is not None and d != first[1]:
            msg = f"{first[0]} and {name} must be on the same device, got {first[1]} and {d}"
            raise ValueError(msg)


def _known_shape(shape: tuple[Any, ...], name: str, /) -> tuple[int, ...]:
    if any(_unknown(n) for n in shape):
        msg = (
            f"{name} of shape {shape} has dimensions of unknown size; compute them "
            "first (for Dask: compute_chunk_sizes())"
        )
        raise ValueError(msg)
    return tuple(int(n) for n in shape)


def _compute_dtype(xp: Any, dtype: Any, /) -> Any:
    """Return float32 for half-precision dtypes (float16, bfloat16), else ``dtype``."""
    return xp.float32 if xp.finfo(dtype).bits < 32 else dtype


def logits_operands(
    input: object,
    target: object,
    /,
    *,
    temperature: object,
    reduction: object,
    axis: object,
    direction: object,
    scale_by_temperature_squared: object,
    mask: object,
    beta: object = None,
) -> LogitsOperands:
    """Check one call's arguments and return its :class:`LogitsOperands` (errors name them)."""
    reduction = _check_choice(reduction, "reduction", LOGITS_REDUCTIONS)
    direction = _check_choice(direction, "direction", DIRECTIONS)
    beta_value = check_beta_direction(beta, direction)
    t_value = check_temperature(temperature)
    scale = _check_bool(scale_by_temperature_squared, "scale_by_temperature_squared")
    _check_array(input, "input")
    _check_array(target, "target")
    arrays = {"input": input, "target": target}
    if mask is not None:
        _check_array(mask, "mask")
        arrays["mask"] = mask
    xp = _namespace(arrays)
    _check_floating(xp, input, "input")
    _check_floating(xp, target, "target")
    _same_device(arrays)
    shape = _known_shape(tuple(input.shape), "input")
    if _known_shape(tuple(target.shape), "target") != shape:
        msg = (
            f"input of shape {shape} and target of shape {tuple(target.shape)} must have "
            "the same shape (student and teacher logits)"
        )
        raise ValueError(msg)
    ax = check_axis(axis, len(shape))
    row_shape = tuple(n for i, n in enumerate(shape) if i != ax)
    if mask is not None:
        if not xp.isdtype(mask.dtype, "bool"):
            msg = f"mask must be a boolean array (True keeps a row), got dtype {mask.dtype}"
            raise TypeError(msg)
        mask_shape = _known_shape(tuple(mask.shape), "mask")
        if broadcast_shape(mask_shape, row_shape, ("mask", "the rows")) != row_shape:
            msg = (
                f"mask of shape {mask_shape} does not broadcast to the rows' shape {row_shape} "
                f"(input's shape {shape} without axis {ax})"
            )
            raise ValueError(msg)
        if reduction == "batchmean" and not (len(shape) == 2 and ax == 1):
            msg = (
                "reduction='batchmean' with a mask is defined for 2-d logits with the classes "
                f"on axis 1 (rows = batch), got shape {shape} and axis {ax}: use "
                "reduction='rowmean' for the mean over unmasked rows (tokens), or 'sum'"
            )
            raise ValueError(msg)
    dtype = xp.result_type(input.dtype, target.dtype)
    return LogitsOperands(
        xp=xp,
        input=input,
        target=target,
        mask=mask,
        dtype=dtype,
        compute_dtype=_compute_dtype(xp, dtype),
        shape=shape,
        axis=ax,
        temperature=t_value,
        factor=t_value * t_value if scale else 1.0,
        direction=direction,
        reduction=reduction,
        beta=beta_value,
    )


def _grad_output(
    grad_output: object, xp: Any, like: Any, out_shape: tuple[int, ...], dtype: Any
) -> Any:
    """Check ``grad_output`` against the forward's output; return it as an array of ``dtype``."""
    if isinstance(grad_output, (int, float)) and not isinstance(grad_output, bool):
        return xp.asarray(grad_output, dtype=dtype, device=array_api_compat.device(like))
    _check_array(grad_output, "grad_output")
    try:
        array_api_compat.array_namespace(like, grad_output)
    except TypeError:
        msg = (
            "grad_output must come from the same array library as the operands, got "
            f"{type(grad_output).__module__}.{type(grad_output).__name__}"
        )
        raise TypeError(msg) from None
    _check_floating(xp, grad_output, "grad_output")
    _same_device({"grad_output": grad_output, "input": like})
    g_shape = _known_shape(tuple(grad_output.shape), "grad_output")
    if broadcast_shape(g_shape, out_shape, ("grad_output", "the output")) != out_shape:
        msg = (
            f"grad_output of shape {g_shape} does not broadcast to the output's shape {out_shape}"
        )
        raise ValueError(msg)
    return xp.astype(grad_output, dtype, copy=False)


# --------------------------------------------------------------------------- dispatch

_LOADED: dict[str, ModuleType | None] = {}


def fast_path(xp: Any, /) -> ModuleType | None:
    """Return ``kldiv_spec.backends.logits_<name>`` for namespace ``xp``, or None (reference).

    ``<name>`` is the backend registry's name of the library; a library without
    such a module, and calls under :func:`kldiv_spec.use_reference` (or
    ``KLDIV_SPEC_REFERENCE=1``), get None. An ImportError inside an existing
    module propagates.
    """
    if reference_forced():
        return None
    from kldiv_spec.backends._registry import for_namespace

    spec = for_namespace(xp)
    if spec is None:
        return None
    if spec.name not in _LOADED:
        name = f"kldiv_spec.backends.logits_{spec.name}"
        found = importlib.util.find_spec(name) is not None
        _LOADED[spec.name] = importlib.import_module(name) if found else None
    return _LOADED[spec.name]


def _zero_dim_array(result: Array) -> Array:
    return np.asarray(result) if isinstance(result, np.generic) else result


# --------------------------------------------------------------------------- reference


def reference_forward(ops: LogitsOperands, /) -> Array:
    """Evaluate :func:`kl_div_from_logits` with the core (autodiff attached on torch and JAX)."""
    xp = ops.xp
    if array_api_compat.is_torch_namespace(xp):
        from ._autodiff_logits_torch import from_logits_with_gradient

        return from_logits_with_gradient(ops)
    if array_api_compat.is_jax_namespace(xp):
        from ._autodiff_logits_jax import from_logits_with_gradient

        return from_logits_with_gradient(ops)
    s, t = (xp.astype(a, ops.compute_dtype, copy=False) for a in (ops.input, ops.target))
    with quiet(xp):
        out = core_forward(ops, s, t, ops.kept_mask())
        return xp.astype(out, ops.dtype, copy=False)


def core_forward(ops: LogitsOperands, s: Array, t: Array, mask: Array | None, /) -> Array:
    """Call :func:`kldiv_spec._core_logits.from_logits` with the options of ``ops``."""
    return _core_logits.from_logits(
        s,
        t,
        temperature=ops.temperature,
        factor=ops.factor,
        reduction=ops.reduction,
        axis=ops.axis,
        direction=ops.direction,
        mask=mask,
        xp=ops.xp,
        beta=ops.beta,
    )


def core_backward(
    ops: LogitsOperands, g: Array, s: Array, t: Array, mask: Array | None, /, target_grad: bool
) -> tuple[Array, Array | None]:
    """Call :func:`kldiv_spec._core_logits.from_logits_backward` with the options of ``ops``."""
    return _core_logits.from_logits_backward(
        g,
        s,
        t,
        temperature=ops.temperature,
        factor=ops.factor,
        reduction=ops.reduction,
        axis=ops.axis,
        direction=ops.direction,
        mask=mask,
        target_grad=target_grad,
        xp=ops.xp,
        beta=ops.beta,
    )


def reference_backward(
    g: Array, ops: LogitsOperands, /, target_grad: bool
) -> tuple[Array, Array | None]:
    """Evaluate the gradients with the core, each in its own argument's dtype."""
    xp = ops.xp
    s, t = (xp.astype(a, ops.compute_dtype, copy=False) for a in (ops.input, ops.target))
    g = xp.astype(g, ops.compute_dtype, copy=False)
    with quiet(xp):
        gs, gt = core_backward(ops, g, s, t, ops.kept_mask(), target_grad=target_grad)
        gs = xp.astype(gs, ops.input.dtype, copy=False)
        gt = None if gt is None else xp.astype(gt, ops.target.dtype, copy=False)
    return gs, gt


# --------------------------------------------------------------------------- public


def kl_div_from_logits(
    input: Array,
    target: Array,
    /,
    *,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    axis: int = -1,
    direction: str = "forward",
    scale_by_temperature_squared: bool = True,
    mask: Array | None = None,
    beta: float | None = None,
) -> Array:
    r"""KL divergence between the softmax distributions of two sets of logits (distillation).

    With :math:`s` the student logits (``input``), :math:`t` the teacher
    logits (``target``), :math:`q = \operatorname{softmax}(s/T)` and
    :math:`p = \operatorname{softmax}(t/T)` along ``axis``, the value is

    .. math::

        k \cdot \operatorname{reduce}_i \; p_i \,(\log p_i - \log q_i),
        \qquad k = T^2 \text{ (or 1)},

    that is ``T**2 * kl_div(log_softmax(input / T), softmax(target / T),
    reduction=reduction)`` with a numerically stable log-softmax, and without
    materialising either distribution on the fast paths. ``direction='reverse'``
    gives :math:`\mathrm{KL}(q \,\|\, p)` instead (the student's distribution
    weights the terms: mode-seeking). ``beta`` gives the generalised
    Jensen-Shannon divergence instead (trl's ``GKDTrainer.generalized_jsd_loss``,
    Liger-Kernel's ``LigerJSD``): with the mixture :math:`m = \beta p + (1 - \beta) q`,

    .. math::

        k \cdot \operatorname{reduce}_i \;
        \beta\, p_i (\log p_i - \log m_i) + (1 - \beta)\, q_i (\log q_i - \log m_i),

    whose row sums are
    :math:`\beta\,\mathrm{KL}(p \,\|\, m) + (1 - \beta)\,\mathrm{KL}(q \,\|\, m)`.

    Parameters
    ----------
    input : array
        Student logits, real floating dtype.
    target : array
        Teacher logits, of the same shape, library and device.
    temperature : float, default 1.0
        :math:`T`, a positive finite real number; both logits are divided by it.
    reduction : {'batchmean', 'sum', 'mean', 'rowmean', 'none'}, default 'batchmean'
        ``'none'``: the elementwise terms (times :math:`k`), of ``input``'s
        shape, as the composition's ``'none'``. ``'sum'``: their sum.
        ``'batchmean'``: the sum divided by ``input.shape[0]``, exactly as the
        composition: for ``(batch, seq, vocab)`` logits that is the **batch
        size, not the number of tokens**. ``'rowmean'``: the sum divided by
        the number of rows (every axis but ``axis``: tokens), the per-token
        mean KL. ``'mean'``: the sum divided by the number of elements (the
        composition's, not a KL divergence).
    axis : int, default -1
        The class (vocabulary) axis.
    direction : {'forward', 'reverse'}, default 'forward'
        ``'forward'``: :math:`\mathrm{KL}(p \,\|\, q)`, teacher || student;
        ``'reverse'``: :math:`\mathrm{KL}(q \,\|\, p)`, student || teacher.
    scale_by_temperature_squared : bool, default True
        Multiply by :math:`T^2` (Hinton et al.), which keeps the gradients'
        scale independent of :math:`T`.
    mask : boolean array, optional
        Of the rows' shape (``input.shape`` without ``axis``), broadcastable:
        True keeps a row (a token), False drops it (padding). Dropped rows
        contribute exactly 0 (whatever their logits hold, NaN included) and
        get zero gradients; ``'rowmean'`` and ``'batchmean'`` divide by the
        number of kept rows, ``'mean'`` by that times the number of classes,
        and a batch with no kept row gives 0. With a mask, ``'batchmean'`` is
        only accepted for 2-d logits with the classes on axis 1.
    beta : float, optional
        :math:`\beta \in [0, 1]`, the teacher's weight in the mixture of the
        generalised Jensen-Shannon divergence; None (the default) for the KL of
        ``direction``. As in trl and Liger-Kernel, ``beta=0`` is exactly the
        forward KL and ``beta=1`` exactly the reverse KL, although the mixture's
        formula tends to 0 there (``docs/logits.md``). Always evaluated by the
        reference (no fused kernel yet); not combinable with ``direction='reverse'``.

    Returns
    -------
    array
        Of the common dtype of ``input`` and ``target`` (half precision is
        computed in float32 and rounded once); 0-d unless ``reduction='none'``.

    Raises
    ------
    TypeError
        For non-arrays, arrays of two libraries, a non-floating dtype, a
        non-boolean mask, or options of the wrong type.
    ValueError
        For unknown options, a temperature that is not positive and finite,
        an axis out of range, logits of two shapes, a mask that does not
        broadcast to the rows, arrays on two devices, or a ``beta`` that is not
        a real number in :math:`[0, 1]` (NaN, a bool or an array included) or
        comes with ``direction='reverse'``.

    Notes
    -----
    Edge values (see ``docs/logits.md``): a class whose teacher probability is
    0 (logit ``-inf``) contributes 0, also where the student's is ``-inf``
    too; a student ``-inf`` where the teacher's probability is positive gives
    ``+inf``; a row of ``-inf`` only, or holding ``+inf`` or NaN, gives NaN
    unless it is masked; no classes (an empty ``axis``) give 0.

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv_spec
    >>> student = np.asarray([[2.0, 1.0, 0.1], [0.5, 0.5, 3.0]])
    >>> teacher = np.asarray([[1.5, 1.0, 0.5], [0.1, 0.2, 2.5]])
    >>> loss = kldiv_spec.kl_div_from_logits(student, teacher, temperature=2.0)
    >>> round(float(loss), 6)
    0.034543
    >>> jsd = kldiv_spec.kl_div_from_logits(student, teacher, temperature=2.0, beta=0.5)
    >>> round(float(jsd), 6)
    0.008539
    """
    ops = logits_operands(
        input,
        target,
        temperature=temperature,
        reduction=reduction,
        axis=axis,
        direction=direction,
        scale_by_temperature_squared=scale_by_temperature_squared,
        mask=mask,
        beta=beta,
    )
    path = fast_path(ops.xp)
    if path is not None:
        with quiet(ops.xp):
            result = path.kl_div_from_logits(ops)
        if result is not NotImplemented:
            return _zero_dim_array(result)
    return _zero_dim_array(reference_forward(ops))


def kl_div_from_logits_backward(
    grad_output: Array | float,
    input: Array,
    target: Array,
    /,
    *,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    axis: int = -1,
    direction: str = "forward",
    scale_by_temperature_squared: bool = True,
    mask: Array | None = None,
    target_grad: bool = False,
    beta: float | None = None,
) -> tuple[Array, Array | None]:
    r"""Gradients of :func:`kl_div_from_logits` w.r.t. the student (and teacher) logits.

    For libraries without autograd. With :math:`g` the gradient w.r.t. the
    output, :math:`D` the reduction's divisor and :math:`c = k / T`, the
    forward direction gives, per row of a reduced loss,

    .. math::

        \frac{\partial L}{\partial s} = \frac{c\,g}{D}\,(q - p), \qquad
        \frac{\partial L}{\partial t} = \frac{c\,g}{D}\,p \odot (r - \mathrm{KL}),
        \quad r = \log p - \log q,

    (the reverse direction swaps the roles), and 0 in masked rows; for
    ``'none'`` the general chain rule (``docs/logits.md``). With ``beta``
    (:math:`0 < \beta < 1`) and :math:`G` each term's upstream gradient,

    .. math::

        \frac{\partial L}{\partial s} = c\,q \odot \Bigl(h - \sum_j q_j h_j\Bigr),
        \quad h = G \odot (1 - \beta)(\log q - \log m),

    and the teacher's with :math:`p` and :math:`h' = G \odot \beta(\log p - \log m)`.

    Parameters
    ----------
    grad_output : array or float
        Gradient w.r.t. the output: 0-d for the reductions, broadcastable to
        ``input``'s shape for ``'none'``.
    input, target, temperature, reduction, axis, direction, scale_by_temperature_squared, mask
        As for :func:`kl_div_from_logits`.
    target_grad : bool, default False
        Also compute the gradient w.r.t. the teacher logits (an extra pass).
    beta : float, optional
        As for :func:`kl_div_from_logits`.

    Returns
    -------
    grad_input : array
        Of ``input``'s shape and dtype.
    grad_target : array or None
        Of ``target``'s shape and dtype; None unless ``target_grad``.

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv_spec
    >>> s, t = np.zeros((1, 2)), np.log(np.asarray([[0.25, 0.75]]))
    >>> gs, gt = kldiv_spec.kl_div_from_logits_backward(1.0, s, t)
    >>> gs  # q - p
    array([[ 0.25, -0.25]])
    """
    ops = logits_operands(
        input,
        target,
        temperature=temperature,
        reduction=reduction,
        axis=axis,
        direction=direction,
        scale_by_temperature_squared=scale_by_temperature_squared,
        mask=mask,
        beta=beta,
    )
    target_grad = _check_bool(target_grad, "target_grad")
    g = _grad_output(grad_output, ops.xp, ops.input, ops.output_shape, ops.dtype)
    path = fast_path(ops.xp)
    if path is not None:
        with quiet(ops.xp):
            result = path.kl_div_from_logits_backward(g, ops, target_grad)
        if result is not NotImplemented:
            return result
    return reference_backward(g, ops, target_grad)


# --------------------------------------------------------------------------- Gaussian


@dataclass(frozen=True)
class GaussianOperands:
    """One validated call of :func:`gaussian_kl`: four arrays of one library, dtype and device.

    ``mu_prior`` / ``logvar_prior`` given as Python numbers are 0-d arrays here,
    and ``prior_is_array`` says which were arrays (only those get gradients).
    """

    xp: Any
    mu: Array
    logvar: Array
    mu_prior: Array
    logvar_prior: Array
    prior_is_array: tuple[bool, bool]
    dtype: Any
    output_shape: tuple[int, ...]
    reduction: str
    batch_size: int | None


def gaussian_operands(
    mu: object, logvar: object, /, *, mu_prior: object, logvar_prior: object, reduction: object
) -> GaussianOperands:
    """Check one call of :func:`gaussian_kl` and return its :class:`GaussianOperands`."""
    reduction = check_reduction(reduction)
    _check_array(mu, "mu")
    _check_array(logvar, "logvar")
    arrays: dict[str, Any] = {"mu": mu, "logvar": logvar}
    priors = {"mu_prior": mu_prior, "logvar_prior": logvar_prior}
    for name, value in priors.items():
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            continue
        if isinstance(value, bool) or not array_api_compat.is_array_api_obj(value):
            kind = type(value)
            msg = (
                f"{name} must be a real number or an array, got "
                f"{kind.__module__}.{kind.__qualname__}"
            )
            raise TypeError(msg)
        arrays[name] = value
    xp = _namespace(arrays)
    for name, a in arrays.items():
        _check_floating(xp, a, name)
    _same_device(arrays)
    shapes = {name: _known_shape(tuple(a.shape), name) for name, a in arrays.items()}
    shape: tuple[Any, ...] = ()
    names: list[str] = []
    for name, s in shapes.items():
        try:
            shape = broadcast_shape(shape, s, (" and ".join(names) or "mu", name))
        except ValueError:
            listed = ", ".join(f"{n} of shape {shapes[n]}" for n in shapes)
            msg = f"{listed} cannot be broadcast together"
            raise ValueError(msg) from None
        names.append(name)
    dtype = xp.result_type(*(a.dtype for a in arrays.values()))
    device = array_api_compat.device(mu)

    def prior(name: str) -> Any:
        value = priors[name]
        if name in arrays:
            return value
        return xp.asarray(float(value), dtype=dtype, device=device)  # type: ignore[arg-type]

    return GaussianOperands(
        xp=xp,
        mu=mu,
        logvar=logvar,
        mu_prior=prior("mu_prior"),
        logvar_prior=prior("logvar_prior"),
        prior_is_array=("mu_prior" in arrays, "logvar_prior" in arrays),
        dtype=dtype,
        output_shape=tuple(int(n) for n in shape),
        reduction=reduction,
        batch_size=int(mu.shape[0]) if mu.ndim > 0 else None,
    )


def gaussian_cast(ops: GaussianOperands, /) -> tuple[Any, Any, Any, Any]:
    """Return the four operands in the common dtype."""
    xp = ops.xp
    return tuple(  # type: ignore[return-value]
        xp.astype(a, ops.dtype, copy=False)
        for a in (ops.mu, ops.logvar, ops.mu_prior, ops.logvar_prior)
    )


def gaussian_kl(
    mu: Array,
    logvar: Array,
    /,
    *,
    mu_prior: Array | float = 0.0,
    logvar_prior: Array | float = 0.0,
    reduction: str = "batchmean",
) -> Array:
    r"""KL divergence between diagonal Gaussians, in closed form, reduced like ``kl_div``.

    .. math::

        \mathrm{KL}\bigl(\mathcal N(\mu, e^{\lambda}) \,\|\, \mathcal N(\mu_0, e^{\lambda_0})\bigr)
        = \tfrac12 \sum \Bigl( e^{\lambda - \lambda_0} + \frac{(\mu - \mu_0)^2}{e^{\lambda_0}}
          - 1 - (\lambda - \lambda_0) \Bigr)

    elementwise (:math:`\lambda` = ``logvar``, the log-variance), evaluated as
    ``0.5 * ((expm1(d) - d) + (mu - mu_prior)**2 / exp(logvar_prior))`` with
    ``d = logvar - logvar_prior``: accurate near the prior and exactly 0 at it.
    The default prior is the standard normal (the VAE's KL term).

    Parameters
    ----------
    mu, logvar : array
        Mean and log-variance, real floating, broadcastable.
    mu_prior, logvar_prior : array or float, default 0.0
        The prior's mean and log-variance, broadcastable with ``mu``.
    reduction : {'batchmean', 'sum', 'mean', 'none'}, default 'batchmean'
        As ``kl_div``'s: ``'batchmean'`` divides the sum by ``mu.shape[0]``
        (the KL per sample), ``'mean'`` by the number of elements.

    Returns
    -------
    array
        Of the common dtype of the arrays; the broadcast shape for ``'none'``, else 0-d.

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv_spec
    >>> float(kldiv_spec.gaussian_kl(np.zeros((2, 3)), np.zeros((2, 3))))
    0.0
    >>> round(float(kldiv_spec.gaussian_kl(np.ones((1, 2)), np.zeros((1, 2)))), 6)
    1.0
    """
    ops = gaussian_operands(
        mu, logvar, mu_prior=mu_prior, logvar_prior=logvar_prior, reduction=reduction
    )
    xp = ops.xp
    if array_api_compat.is_torch_namespace(xp):
        from ._autodiff_logits_torch import gaussian_with_gradient

        return gaussian_with_gradient(ops)
    if array_api_compat.is_jax_namespace(xp):
        from ._autodiff_logits_jax import gaussian_with_gradient

        return gaussian_with_gradient(ops)
    with quiet(xp):
        out = _core_logits.gaussian_kl(
            *gaussian_cast(ops), reduction=ops.reduction, batch_size=ops.batch_size, xp=xp
        )
    return _zero_dim_array(out)


def gaussian_kl_backward(
    grad_output: Array | float,
    mu: Array,
    logvar: Array,
    /,
    *,
    mu_prior: Array | float = 0.0,
    logvar_prior: Array | float = 0.0,
    reduction: str = "batchmean",
) -> tuple[Array, Array, Array | None, Array | None]:
    r"""Gradients of :func:`gaussian_kl` w.r.t. ``mu``, ``logvar`` and array priors.

    With :math:`d = \lambda - \lambda_0` and :math:`D` the reduction's divisor:

    .. math::

        \frac{\partial L}{\partial \mu} = \frac{g}{D}\,\frac{\mu - \mu_0}{e^{\lambda_0}}, \quad
        \frac{\partial L}{\partial \lambda} = \frac{g}{D}\,\tfrac12 (e^{d} - 1), \quad
        \frac{\partial L}{\partial \mu_0} = -\frac{\partial L}{\partial \mu}, \quad
        \frac{\partial L}{\partial \lambda_0} = -\frac{g}{D}\,\tfrac12
            \Bigl(e^{d} - 1 + \frac{(\mu - \mu_0)^2}{e^{\lambda_0}}\Bigr),

    each summed back to its argument's shape.

    Returns
    -------
    grad_mu, grad_logvar : array
    grad_mu_prior, grad_logvar_prior : array or None
        None for a prior given as a number.

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv_spec
    >>> mu, logvar = np.ones(2), np.zeros(2)
    >>> g_mu, g_lv, _, _ = kldiv_spec.gaussian_kl_backward(1.0, mu, logvar, reduction="sum")
    >>> g_mu
    array([1., 1.])
    """
    ops = gaussian_operands(
        mu, logvar, mu_prior=mu_prior, logvar_prior=logvar_prior, reduction=reduction
    )
    xp = ops.xp
    out_shape = ops.output_shape if ops.reduction == "none" else ()
    g = _grad_output(grad_output, xp, ops.mu, out_shape, ops.dtype)
    with quiet(xp):
        grads = _core_logits.gaussian_kl_backward(
            g,
            *gaussian_cast(ops),
            reduction=ops.reduction,
            batch_size=ops.batch_size,
            output_shape=ops.output_shape,
            xp=xp,
        )
        likes = (ops.mu, ops.logvar, ops.mu_prior, ops.logvar_prior)
        cast = [xp.astype(gr, a.dtype, copy=False) for gr, a in zip(grads, likes, strict=True)]
    return (
        cast[0],
        cast[1],
        cast[2] if ops.prior_is_array[0] else None,
        cast[3] if ops.prior_is_array[1] else None,
    )
