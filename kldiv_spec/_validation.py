"""The argument checks of every public function, and the operands they hand on.

Each public function validates its arguments here, into one frozen operands object
(:class:`Operands` for ``kl_div``, :class:`LogitsOperands` for the from-logits
functions, :class:`GaussianOperands` for the Gaussian KL) that the dispatcher, the
fast paths and the reference receive; nothing is re-derived elsewhere. Every error
names the argument at fault. Nothing here looks at array *values*
(only types, dtypes, shapes and devices), so checks never trigger computation
on lazy backends (Dask, JAX under ``jit``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from . import _core_logits
from ._core import divisor

Array = Any
Namespace = Any

#: The reductions of :func:`kldiv_spec.kl_div`, in PyTorch's order.
REDUCTIONS: tuple[str, ...] = ("none", "batchmean", "sum", "mean")

__all__: list[str] = []


def check_reduction(reduction: object, /) -> str:
    """Return ``reduction`` if it is one of :data:`REDUCTIONS`, else raise ValueError."""
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        valid = ", ".join(repr(r) for r in REDUCTIONS)
        # The first words are PyTorch's own message, so code matching on it keeps working.
        msg = f"{reduction} is not a valid value for reduction: expected one of {valid}"
        raise ValueError(msg)
    return reduction


def check_log_target(log_target: object, /) -> bool:
    """Return ``log_target`` if it is a bool, else raise TypeError."""
    if not isinstance(log_target, bool):
        kind = type(log_target)
        msg = f"log_target must be a bool, got {kind.__module__}.{kind.__qualname__}"
        raise TypeError(msg)
    return log_target


def check_beta(beta: object, /) -> float | None:
    r"""Return ``beta`` as a float if it is None or a real number in :math:`[0, 1]`, else raise.

    ``beta`` is the weight of the teacher in the mixture
    :math:`m = \beta p + (1 - \beta) q` of the generalised Jensen-Shannon
    divergence (:func:`kldiv_spec.kl_div_from_logits`). Every invalid value
    (a bool, an array, a string, NaN, a number outside :math:`[0, 1]`) raises
    ValueError naming ``beta``: the check reads no array value, so it never
    triggers computation on a lazy backend.
    """
    if beta is None:
        return None
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        kind = type(beta)
        msg = (
            "beta must be None or a real number in [0, 1] (a Python or NumPy scalar, not "
            f"an array), got {kind.__module__}.{kind.__qualname__}"
        )
        raise ValueError(msg)
    value = float(beta)
    if not 0.0 <= value <= 1.0:  # False for NaN
        msg = f"beta must be a real number in [0, 1], got {beta!r}"
        raise ValueError(msg)
    return value


def legacy_reduction(size_average: bool | None, reduce: bool | None, /) -> str:
    """Resolve PyTorch's deprecated ``size_average`` / ``reduce`` flags as PyTorch does.

    Both default to True; ``reduce=False`` wins (``'none'``), then
    ``size_average=False`` (``'sum'``), else ``'mean'``.
    """
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if size_average and reduce:
        return "mean"
    return "sum" if reduce else "none"


def _check_array(a: object, name: str, /) -> None:
    if isinstance(a, (np.ma.MaskedArray, np.matrix)):
        # Their operations do not follow the array API (masked elements are skipped by
        # some reductions and not others; matrix products and shapes differ).
        msg = (
            f"{name} must be an array API array, got {type(a).__module__}.{type(a).__name__}: "
            "fill or drop masked elements (np.ma.filled, np.ma.compressed) or use "
            "np.asarray for a matrix"
        )
        raise TypeError(msg)
    if not array_api_compat.is_array_api_obj(a):
        msg = (
            f"{name} must be an array (NumPy, CuPy, PyTorch, JAX, Dask or any array "
            f"API library), got {type(a).__name__}"
        )
        raise TypeError(msg)


def _check_floating(xp: Namespace, a: Array, name: str, /) -> None:
    if not xp.isdtype(a.dtype, "real floating"):
        msg = (
            f"{name} must have a real floating-point dtype, got {a.dtype}: "
            "kl_div is not defined for integer, boolean or complex arrays"
        )
        raise TypeError(msg)


def broadcast_shape(
    shape_a: tuple[int | None, ...],
    shape_b: tuple[int | None, ...],
    /,
    names: tuple[str, str] = ("input", "target"),
) -> tuple[int | None, ...]:
    """Return the broadcast shape of two shapes, or raise ValueError naming both arguments."""
    ndim = max(len(shape_a), len(shape_b))
    a = (1,) * (ndim - len(shape_a)) + tuple(shape_a)
    b = (1,) * (ndim - len(shape_b)) + tuple(shape_b)
    out: list[int | None] = []
    for n, m in zip(a, b, strict=True):
        if n == 1:
            out.append(m)
        elif m == 1 or m == n:
            out.append(n)
        elif _unknown(n) or _unknown(m):
            out.append(None)
        else:
            msg = (
                f"{names[0]} of shape {tuple(shape_a)} and {names[1]} of shape "
                f"{tuple(shape_b)} cannot be broadcast together"
            )
            raise ValueError(msg)
    return tuple(out)


def _unknown(n: int | float | None) -> bool:
    return n is None or (isinstance(n, float) and math.isnan(n))


@dataclass(frozen=True)
class Operands:
    """One validated call: the operands and everything derived from them, computed once.

    This is what the reference and every fast path receive (see
    :mod:`kldiv_spec.backends`); nothing here is re-derived elsewhere.

    Attributes
    ----------
    xp : namespace
        The array API namespace of ``input`` and ``target``.
    input, target : array
        The arrays as passed (not cast, not broadcast).
    dtype : dtype
        Their common dtype under the array API's promotion rules: the result's.
    output_shape : tuple of int
        The broadcast shape: the shape of the pointwise loss.
    reduction : str
        One of :data:`REDUCTIONS`.
    log_target : bool
        Whether ``target`` holds log-probabilities.
    batch_size : int or None
        ``input.shape[0]``, or None for a 0-d input.
    divisor : int
        What the summed loss is divided by: 1 for ``'none'`` and ``'sum'``, the
        number of elements of the output for ``'mean'``, ``batch_size`` for
        ``'batchmean'`` (1 for a 0-d input). 0 for an empty ``'mean'`` or
        ``'batchmean'`` (whose result is NaN).
    """

    xp: Namespace
    input: Array
    target: Array
    dtype: Any
    output_shape: tuple[int, ...]
    reduction: str
    log_target: bool
    batch_size: int | None
    divisor: int

    @property
    def same_shape_and_dtype(self) -> bool:
        """Whether ``input`` and ``target`` both have the output's shape and dtype.

        Fast paths that take no broadcasting and no promotion check this.
        """
        return (
            tuple(self.input.shape) == self.output_shape
            and tuple(self.target.shape) == self.output_shape
            and self.input.dtype == self.dtype
            and self.target.dtype == self.dtype
        )


def operands(
    input: object, target: object, /, *, reduction: object, log_target: object
) -> Operands:
    """Check one call's arguments and return its :class:`Operands`.

    Raises ValueError for an unknown ``reduction``, TypeError for a non-bool
    ``log_target``, non-arrays, arrays of two libraries, masked arrays and
    non-floating dtypes, and ValueError for arrays on two devices and shapes
    that do not broadcast.
    """
    reduction = check_reduction(reduction)
    log_target = check_log_target(log_target)
    _check_array(input, "input")
    _check_array(target, "target")
    try:
        xp = array_api_compat.array_namespace(input, target)
    except TypeError:
        msg = (
            "input and target must come from the same array library, got "
            f"{type(input).__module__}.{type(input).__name__} and "
            f"{type(target).__module__}.{type(target).__name__}"
        )
        raise TypeError(msg) from None
    _check_floating(xp, input, "input")
    _check_floating(xp, target, "target")
    _same_device({"input": input, "target": target})
    shape = broadcast_shape(input.shape, target.shape)
    if any(_unknown(n) for n in shape):
        msg = (
            f"input of shape {input.shape} and target of shape {target.shape} have "
            "dimensions of unknown size; compute them first (for Dask: "
            "compute_chunk_sizes())"
        )
        raise ValueError(msg)
    output_shape = tuple(int(n) for n in shape)
    batch_size = int(input.shape[0]) if input.ndim > 0 else None
    dtype = input.dtype
    if target.dtype != dtype:
        dtype = xp.result_type(dtype, target.dtype)
    return Operands(
        xp=xp,
        input=input,
        target=target,
        dtype=dtype,
        output_shape=output_shape,
        reduction=reduction,
        log_target=log_target,
        batch_size=batch_size,
        divisor=divisor(reduction, output_shape=output_shape, batch_size=batch_size),
    )


def _devices(device: Any, /) -> frozenset[Any]:
    """Return the devices of a placement: one device, or all those a sharding spans.

    A JAX array sharded over several devices reports its sharding as its device;
    two placements agree when they span the same devices, whatever the layout.
    """
    spanned = getattr(device, "device_set", None)
    return frozenset(spanned) if spanned is not None else frozenset((device,))


def grad_output_array(grad_output: object, ops: Operands, /) -> Array:
    """Check ``grad_output`` against the output of ``kl_div``; return it as an array.

    A Python real number is accepted and placed on the operands' device.
    """
    out_shape = ops.output_shape if ops.reduction == "none" else ()
    return check_grad_output(
        grad_output, xp=ops.xp, like=ops.input, output_shape=out_shape, dtype=ops.dtype
    )


def check_grad_output(
    grad_output: object,
    /,
    *,
    xp: Namespace,
    like: Array,
    output_shape: tuple[int, ...],
    dtype: Any,
) -> Array:
    """Check the upstream gradient of any function against its output; return an array.

    A Python real number becomes a 0-d array of ``dtype`` on ``like``'s device; an
    array must come from ``like``'s library, be real floating, lie on (a subset of)
    ``like``'s devices and broadcast to ``output_shape``. It is returned as passed (the
    callers cast it to the dtype they compute in).
    """
    if isinstance(grad_output, (int, float)) and not isinstance(grad_output, bool):
        device = array_api_compat.device(like)
        if device is not None and len(_devices(device)) > 1:
            # A placement over several devices (a JAX sharding) does not apply to a 0-d
            # array: the library places the number, as it does any scalar beside them.
            device = None
        return xp.asarray(grad_output, dtype=dtype, device=device)
    _check_array(grad_output, "grad_output")
    try:
        array_api_compat.array_namespace(like, grad_output)
    except TypeError:
        msg = (
            "grad_output must come from the same array library as input, got "
            f"{type(grad_output).__module__}.{type(grad_output).__name__}"
        )
        raise TypeError(msg) from None
    _check_floating(xp, grad_output, "grad_output")
    device_g, device_in = array_api_compat.device(grad_output), array_api_compat.device(like)
    if (
        device_g is not None
        and device_in is not None
        and not _devices(device_g) <= _devices(device_in)
    ):
        msg = f"grad_output must be on the same device as input, got {device_g} and {device_in}"
        raise ValueError(msg)
    g_shape = _known_shape(tuple(grad_output.shape), "grad_output")
    if broadcast_shape(g_shape, output_shape, ("grad_output", "the output")) != output_shape:
        msg = (
            f"grad_output of shape {g_shape} does not broadcast to the output's shape "
            f"{output_shape}"
        )
        raise ValueError(msg)
    return grad_output


# --------------------------------------------------------------------------- from logits

LOGITS_REDUCTIONS: tuple[str, ...] = ("none", "batchmean", "sum", "mean", "rowmean")

#: The directions of :func:`kl_div_from_logits`.
DIRECTIONS: tuple[str, ...] = ("forward", "reverse")


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
        or None for the KL of ``direction`` (:meth:`evaluated` turns 0 and 1 into
        the forward and reverse KL, as the fast paths evaluate them).
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

    def evaluated(self) -> LogitsOperands:
        """Return these operands with ``beta`` 0 and 1 as the forward and reverse KL.

        That is :func:`kldiv_spec._core_logits.resolve_beta`'s rule, applied before the
        fast paths choose a kernel, so that the endpoints take the KL's.
        """
        direction, beta = _core_logits.resolve_beta(self.beta, self.direction)
        if beta == self.beta and direction == self.direction:
            return self
        return dataclasses.replace(self, direction=direction, beta=beta)


#: The temperatures the from-logits functions accept: ``2**-63 <= T <= 2**63``.
TEMPERATURE_MIN = 2.0**-63
TEMPERATURE_MAX = 2.0**63


def check_temperature(temperature: object, /) -> float:
    """Return ``temperature`` as a float if it is in the range where the loss is defined.

    That is a real number (not a bool) with ``2**-63 <= temperature <= 2**63``
    (:data:`TEMPERATURE_MIN`, :data:`TEMPERATURE_MAX`); anything else raises, a
    ``TypeError`` for a non-number and a ``ValueError`` naming the range and the
    value otherwise. The loss divides the logits by ``T`` and multiplies the
    terms (and, in the backward, divides the gradients) by ``T**2`` or ``T``,
    in float32 for float16 and float32 logits. In the range, ``T``, ``1 / T``,
    ``T**2`` and ``1 / T**2`` all lie in ``[2**-126, 2**126]``: normal, finite
    float32 numbers, so no factor overflows to inf or flushes to 0 (and no
    float32 kernel loses precision to subnormals) in any dtype. Outside it,
    ``T**2`` overflows (``T`` above about ``1.8e19``) or underflows (below about
    ``1.1e-19``) in float32, and the fast paths and the reference would return
    inf or NaN; the same bounds apply to float64 so that the accepted
    temperatures do not depend on the dtype.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        kind = type(temperature)
        msg = (
            "temperature must be a positive finite real number, got "
            f"{kind.__module__}.{kind.__qualname__}"
        )
        raise TypeError(msg)
    try:
        value = float(temperature)
    except OverflowError:  # an int beyond float64
        value = math.inf if temperature > 0 else -math.inf
    if not (math.isfinite(value) and value > 0):
        msg = f"temperature must be a positive finite real number, got {temperature!r}"
        raise ValueError(msg)
    if not TEMPERATURE_MIN <= value <= TEMPERATURE_MAX:
        msg = (
            "temperature must be in [2**-63, 2**63] (T, 1/T and T**2 normal float32 "
            f"numbers), got {temperature!r}"
        )
        raise ValueError(msg)
    return value


def check_bool(value: object, name: str, /) -> bool:
    if not isinstance(value, bool):
        kind = type(value)
        msg = f"{name} must be a bool, got {kind.__module__}.{kind.__qualname__}"
        raise TypeError(msg)
    return value


def check_choice(value: object, name: str, choices: tuple[str, ...], /) -> str:
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
    """Raise ValueError naming two of ``arrays`` on different devices (unknown: skipped).

    Placements compare by the devices they span (:func:`_devices`), as in :func:`operands`.
    """
    first: tuple[str, Any] | None = None
    for name, a in arrays.items():
        d = array_api_compat.device(a)
        if d is None:  # unknown (a JAX tracer under jax.grad): nothing to compare
            continue
        if first is None:
            first = (name, d)
        elif _devices(d) != _devices(first[1]):
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
    reduction = check_choice(reduction, "reduction", LOGITS_REDUCTIONS)
    direction = check_choice(direction, "direction", DIRECTIONS)
    beta_value = check_beta_direction(beta, direction)
    t_value = check_temperature(temperature)
    scale = check_bool(scale_by_temperature_squared, "scale_by_temperature_squared")
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


# --------------------------------------------------------------------------- from hidden states


@dataclass(frozen=True)
class HiddenOperands:
    r"""One validated call of :func:`kl_div_from_hidden`, computed once.

    The student's logits are :math:`s = h_s W_s^\top (+ b_s)`; the teacher's
    :math:`t = h_t W_t^\top (+ b_t)`, or given (:attr:`teacher_logits`). The
    classes are the last axis of the logits; the rows are the hidden states'
    leading axes.

    Attributes
    ----------
    xp : namespace
        The array API namespace of every array.
    student_hidden, student_weight, student_bias : array (bias: or None)
        ``(..., H_s)``, ``(V, H_s)``, ``(V,)``, as passed.
    teacher_hidden, teacher_weight, teacher_bias : array or None
        ``(..., H_t)``, ``(V, H_t)``, ``(V,)``, as passed; None with
        :attr:`teacher_logits`.
    teacher_logits : array or None
        ``(..., V)``: the teacher's logits, computed already.
    mask : array or None
        The row mask as passed (True keeps a row).
    labels : array or None
        Integer labels of the rows' shape: a row whose label is
        :attr:`ignore_index` is dropped (as a False in ``mask``).
    ignore_index : int
        The label of dropped rows.
    dtype : dtype
        The result's dtype: the common dtype of every floating operand.
    compute_dtype : dtype
        ``dtype``, or float32 for half precision: the loss is computed in it.
    row_shape : tuple of int
        The rows' shape (``student_hidden.shape[:-1]``).
    vocab : int
        :math:`V`, the number of classes.
    temperature, factor, direction, reduction, beta
        As :class:`LogitsOperands`.
    memory_budget : int or None
        Bytes the chunked fast paths may spend on one chunk's temporaries; None
        for their default. The references ignore it.
    """

    xp: Any
    student_hidden: Array
    student_weight: Array
    student_bias: Array | None
    teacher_hidden: Array | None
    teacher_weight: Array | None
    teacher_bias: Array | None
    teacher_logits: Array | None
    mask: Array | None
    labels: Array | None
    ignore_index: int
    dtype: Any
    compute_dtype: Any
    row_shape: tuple[int, ...]
    vocab: int
    temperature: float
    factor: float
    direction: str
    reduction: str
    beta: float | None
    memory_budget: int | None

    @property
    def logits_shape(self) -> tuple[int, ...]:
        """The logits' shape: the rows' shape, then :attr:`vocab`."""
        return (*self.row_shape, self.vocab)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The result's shape: the logits' for ``'none'``, else ``()``."""
        return self.logits_shape if self.reduction == "none" else ()

    def row_mask(self) -> Array | None:
        """Return the rows kept (``mask`` and ``labels != ignore_index``), or None for all.

        An array operation, not a read of values: safe on lazy backends.
        """
        xp = self.xp
        kept = self.mask
        if self.labels is not None:
            labelled = self.labels != self.ignore_index
            kept = labelled if kept is None else xp.logical_and(kept, labelled)
        return kept

    def logits_operands(self, student_logits: Array, teacher_logits: Array, /) -> LogitsOperands:
        """Return the :class:`LogitsOperands` of the logits formed from these operands.

        ``student_logits`` and ``teacher_logits`` are of :attr:`logits_shape` and
        :attr:`dtype` (formed by the caller); nothing is validated again.
        """
        return LogitsOperands(
            xp=self.xp,
            input=student_logits,
            target=teacher_logits,
            mask=self.row_mask(),
            dtype=self.dtype,
            compute_dtype=self.compute_dtype,
            shape=self.logits_shape,
            axis=len(self.row_shape),
            temperature=self.temperature,
            factor=self.factor,
            direction=self.direction,
            reduction=self.reduction,
            beta=self.beta,
        )


def _check_integer(xp: Namespace, a: Array, name: str, /) -> None:
    if not xp.isdtype(a.dtype, "integral"):
        msg = f"{name} must have an integer dtype (class indices), got {a.dtype}"
        raise TypeError(msg)


def check_memory_budget(memory_budget: object, /) -> int | None:
    """Return ``memory_budget`` if it is None or a positive int (bytes), else raise naming it."""
    if memory_budget is None:
        return None
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, numbers.Integral):
        kind = type(memory_budget)
        msg = (
            "memory_budget must be None or a positive int (bytes), got "
            f"{kind.__module__}.{kind.__qualname__}"
        )
        raise TypeError(msg)
    if memory_budget <= 0:
        msg = f"memory_budget must be a positive number of bytes, got {memory_budget!r}"
        raise ValueError(msg)
    return int(memory_budget)


def _check_ignore_index(ignore_index: object, /) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        kind = type(ignore_index)
        msg = f"ignore_index must be an int, got {kind.__module__}.{kind.__qualname__}"
        raise TypeError(msg)
    return int(ignore_index)


def _teacher_arrays(
    teacher_hidden: object,
    teacher_weight: object,
    teacher_bias: object,
    teacher_logits: object,
    /,
) -> dict[str, Any]:
    """Return the teacher's arrays by name: hidden states and weight (and bias), or logits."""
    if teacher_logits is None:
        if teacher_hidden is None or teacher_weight is None:
            missing = "teacher_hidden" if teacher_hidden is None else "teacher_weight"
            msg = (
                f"{missing} is missing: give the teacher's hidden states and weight "
                "(teacher_hidden, teacher_weight), or its logits as teacher_logits="
            )
            raise TypeError(msg)
        arrays = {"teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight}
        if teacher_bias is not None:
            arrays["teacher_bias"] = teacher_bias
        return arrays
    given = [
        name
        for name, a in (
            ("teacher_hidden", teacher_hidden),
            ("teacher_weight", teacher_weight),
            ("teacher_bias", teacher_bias),
        )
        if a is not None
    ]
    if given:
        msg = (
            f"teacher_logits and {' and '.join(given)} were both given: the teacher comes "
            "either as logits or as hidden states and weight (and bias), not both"
        )
        raise TypeError(msg)
    return {"teacher_logits": teacher_logits}


def hidden_operands(
    student_hidden: object,
    student_weight: object,
    teacher_hidden: object,
    teacher_weight: object,
    /,
    *,
    student_bias: object,
    teacher_bias: object,
    teacher_logits: object,
    temperature: object,
    reduction: object,
    direction: object,
    scale_by_temperature_squared: object,
    mask: object,
    labels: object,
    ignore_index: object,
    beta: object,
    memory_budget: object,
) -> HiddenOperands:
    """Check one call of :func:`kl_div_from_hidden`; return its :class:`HiddenOperands`.

    Errors name the argument at fault: TypeError for non-arrays, two libraries,
    non-floating operands, non-integer labels, a non-boolean mask, a teacher given
    twice or not at all, and options of the wrong type; ValueError for shapes that
    do not fit (``(..., H)`` hidden states, ``(V, H)`` weights, ``(V,)`` biases,
    ``(..., V)`` teacher logits, the same rows for both models), arrays on two
    devices, and option values out of range.
    """
    reduction = check_choice(reduction, "reduction", LOGITS_REDUCTIONS)
    direction = check_choice(direction, "direction", DIRECTIONS)
    beta_value = check_beta_direction(beta, direction)
    t_value = check_temperature(temperature)
    scale = check_bool(scale_by_temperature_squared, "scale_by_temperature_squared")
    ignore = _check_ignore_index(ignore_index)
    budget = check_memory_budget(memory_budget)
    floating: dict[str, Any] = {"student_hidden": student_hidden, "student_weight": student_weight}
    if student_bias is not None:
        floating["student_bias"] = student_bias
    floating.update(_teacher_arrays(teacher_hidden, teacher_weight, teacher_bias, teacher_logits))
    arrays = dict(floating)
    if mask is not None:
        arrays["mask"] = mask
    if labels is not None:
        arrays["labels"] = labels
    for name, a in arrays.items():
        _check_array(a, name)
    xp = _namespace(arrays)
    for name, a in floating.items():
        _check_floating(xp, a, name)
    _same_device(arrays)
    shapes = {name: _known_shape(tuple(a.shape), name) for name, a in arrays.items()}
    hs = shapes["student_hidden"]
    if len(hs) == 0:
        msg = "student_hidden must have at least one dimension (the hidden size), got a 0-d array"
        raise ValueError(msg)
    row_shape, width = hs[:-1], hs[-1]
    ws = shapes["student_weight"]
    if len(ws) != 2 or ws[1] != width:
        msg = (
            f"student_weight must be (V, H) with H = student_hidden.shape[-1] = {width} "
            f"(as torch.nn.Linear holds it), got shape {ws}"
        )
        raise ValueError(msg)
    vocab = ws[0]
    _check_bias(shapes, "student_bias", vocab)
    if "teacher_logits" in shapes:
        tl = shapes["teacher_logits"]
        if tl != (*row_shape, vocab):
            msg = (
                f"teacher_logits of shape {tl} must have the rows of student_hidden "
                f"{row_shape} and the classes of student_weight ({vocab}): "
                f"expected {(*row_shape, vocab)}"
            )
            raise ValueError(msg)
    else:
        ht, wt = shapes["teacher_hidden"], shapes["teacher_weight"]
        if len(ht) == 0 or ht[:-1] != row_shape:
            msg = (
                f"teacher_hidden of shape {ht} must have the rows of student_hidden "
                f"{row_shape} (the last axis, the teacher's hidden size, may differ)"
            )
            raise ValueError(msg)
        if len(wt) != 2 or wt != (vocab, ht[-1]):
            msg = (
                f"teacher_weight must be (V, H_t) = {(vocab, ht[-1])} (student_weight's "
                f"classes, teacher_hidden's width), got shape {wt}"
            )
            raise ValueError(msg)
        _check_bias(shapes, "teacher_bias", vocab)
    for name, kind in (("mask", "bool"), ("labels", "integral")):
        if name not in arrays:
            continue
        dt = arrays[name].dtype
        if kind == "bool" and not xp.isdtype(dt, "bool"):
            msg = f"mask must be a boolean array (True keeps a row), got dtype {dt}"
            raise TypeError(msg)
        if kind == "integral":
            _check_integer(xp, arrays[name], name)
        if broadcast_shape(shapes[name], row_shape, (name, "the rows")) != row_shape:
            msg = (
                f"{name} of shape {shapes[name]} does not broadcast to the rows' shape "
                f"{row_shape} (student_hidden's shape {hs} without its last axis)"
            )
            raise ValueError(msg)
    if reduction == "batchmean" and (mask is not None or labels is not None) and len(hs) != 2:
        msg = (
            "reduction='batchmean' with a mask or labels is defined for 2-d hidden states "
            f"(rows = batch), got student_hidden of shape {hs}: use reduction='rowmean' for "
            "the mean over the kept rows (tokens), or 'sum'"
        )
        raise ValueError(msg)
    dtype = xp.result_type(*(a.dtype for a in floating.values()))
    return HiddenOperands(
        xp=xp,
        student_hidden=student_hidden,
        student_weight=student_weight,
        student_bias=student_bias,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        teacher_logits=teacher_logits,
        mask=mask,
        labels=labels,
        ignore_index=ignore,
        dtype=dtype,
        compute_dtype=_compute_dtype(xp, dtype),
        row_shape=row_shape,
        vocab=vocab,
        temperature=t_value,
        factor=t_value * t_value if scale else 1.0,
        direction=direction,
        reduction=reduction,
        beta=beta_value,
        memory_budget=budget,
    )


def _check_bias(shapes: dict[str, tuple[int, ...]], name: str, vocab: int, /) -> None:
    if name in shapes and shapes[name] != (vocab,):
        msg = f"{name} must be a vector of the {vocab} classes, got shape {shapes[name]}"
        raise ValueError(msg)
