"""Argument checks shared by the public functions.

Every error names the argument at fault. Nothing here looks at array *values*
(only types, dtypes, shapes and devices), so checks never trigger computation
on lazy backends (Dask, JAX under ``jit``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

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
    device_in = array_api_compat.device(input)
    device_tg = array_api_compat.device(target)
    # A device of None is unknown (JAX tracers under jax.grad): nothing to compare.
    if (
        device_in is not None
        and device_tg is not None
        and _devices(device_in) != _devices(device_tg)
    ):
        msg = f"input and target must be on the same device, got {device_in} and {device_tg}"
        raise ValueError(msg)
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
    """Check ``grad_output`` against the output of the forward and return it as an array.

    A Python real number is accepted and placed on the operands' device.
    """
    out_shape = ops.output_shape if ops.reduction == "none" else ()
    xp = ops.xp
    if isinstance(grad_output, (int, float)) and not isinstance(grad_output, bool):
        device = array_api_compat.device(ops.input)
        if device is not None and len(_devices(device)) > 1:
            # A placement over several devices (a JAX sharding) does not apply to a 0-d
            # array: the library places the number, as it does any scalar beside them.
            device = None
        return xp.asarray(grad_output, dtype=ops.dtype, device=device)
    _check_array(grad_output, "grad_output")
    try:
        array_api_compat.array_namespace(ops.input, grad_output)
    except TypeError:
        msg = (
            "grad_output must come from the same array library as input, got "
            f"{type(grad_output).__module__}.{type(grad_output).__name__}"
        )
        raise TypeError(msg) from None
    _check_floating(xp, grad_output, "grad_output")
    device_g, device_in = array_api_compat.device(grad_output), array_api_compat.device(ops.input)
    if (
        device_g is not None
        and device_in is not None
        and not _devices(device_g) <= _devices(device_in)
    ):
        msg = "grad_output must be on the same device as input"
        raise ValueError(msg)
    if broadcast_shape(grad_output.shape, out_shape, ("grad_output", "the output")) != out_shape:
        msg = (
            f"grad_output of shape {tuple(grad_output.shape)} does not broadcast to the "
            f"output's shape {out_shape}"
        )
        raise ValueError(msg)
    return grad_output
