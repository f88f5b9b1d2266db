r"""One assertion helper: a computed result against the exact oracle.

Every comparison of a computed ``kl_div`` (or gradient) with :mod:`.oracle` in
the conformance suite, the tests and the documentation tools goes through
:func:`assert_matches`, which checks, in this order:

1. the **dtype** of the result (when one is expected);
2. the **shape**;
3. the **non-finite pattern** exactly: NaN where, and only where, the oracle
   has NaN, and infinities of the same sign;
4. the **finite values** within the oracle's absolute bound,
   :math:`|\hat y_i - y_i| \le b_i`;
5. optionally, the **sign of zero** where the oracle's value is a zero.

In ``kldiv-spec check`` the sign of a zero is a SHOULD requirement: the MUST
properties call these functions without ``signed_zeros`` (a ``-0.0`` for a
``+0.0`` is never a MUST failure on its own), and ``semantics.signed_zeros``
compares the signs on the rows of the edge-value table. The bounds are those of
the ``dtype`` of the :class:`.oracle.Exact` given: the suite sets it to the
precision of the result (:meth:`.context.Context.judge_at_result`), so a
float32 result of float64 operands is judged against float32's bound, its
dtype being the finding of ``semantics.dtypes``.

A failure names what differs, how many elements, and the first index.
:func:`assert_loss` and :func:`assert_gradients` take the oracle's own objects
(:class:`.oracle.Exact`, the pairs of :func:`.oracle.gradients`) and supply the
bounds of :mod:`.oracle`: :func:`.oracle.pointwise_tolerance` for
``reduction='none'``, :func:`.oracle.reduce` for the reductions.

The result may be an array of any library (NumPy, PyTorch, JAX, Dask, CuPy,
array-api-strict) or a Python float: :func:`to_numpy` reads its values.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .oracle import Exact, pointwise_tolerance, reduce

__all__ = ["assert_gradients", "assert_loss", "assert_matches", "dtype_name", "to_numpy"]


def dtype_name(dtype: Any, /) -> str:
    """Return ``'float32'`` for any library's float32 dtype object (and so on for the others)."""
    if isinstance(dtype, np.dtype):
        return dtype.name
    return str(dtype).rsplit(".", 1)[-1]


def to_numpy(a: Any, /) -> np.ndarray:
    """Return the values of an array of any library as a float64 NumPy array.

    PyTorch tensors are detached and moved to the CPU first (``bfloat16``
    included), Dask arrays computed (synchronously, with floating-point
    warnings silenced as ``kl_div`` silences them) and CuPy arrays copied to
    the host. Signed zeros, NaN and infinities are preserved.
    """
    import array_api_compat

    if array_api_compat.is_torch_array(a):
        return a.detach().cpu().double().numpy()
    if array_api_compat.is_dask_array(a):
        with np.errstate(all="ignore"):
            a = a.compute(scheduler="synchronous")
    if array_api_compat.is_cupy_array(a):
        a = a.get()
    return np.asarray(a, dtype=np.float64)


def _index(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _fail(what: str, kind: str, bad: np.ndarray, got: np.ndarray, want: np.ndarray) -> None:
    idx = _index(bad)
    msg = (
        f"{what}: {kind} in {int(bad.sum())} of {bad.size} elements; first at index {idx}: "
        f"got {float(got[idx])!r}, expected {float(want[idx])!r}"
    )
    raise AssertionError(msg)


def assert_matches(
    got: Any,
    expected: Any,
    bound: Any,
    /,
    *,
    dtype: Any = None,
    shape: tuple[int, ...] | None = None,
    what: str = "result",
    signed_zeros: bool = False,
) -> None:
    r"""Assert that ``got`` is the oracle's ``expected`` within ``bound``.

    Parameters
    ----------
    got
        The computed result: an array of any library, or a float.
    expected
        The exact values (any float dtype, NaN and signed infinities included).
    bound
        The absolute bound on :math:`|\hat y - y|` of each finite element,
        broadcastable to ``expected``.
    dtype
        The dtype the result must have (a NumPy dtype, any library's dtype or a
        name such as ``'float32'``); ``None`` leaves it unchecked.
    shape
        The shape the result must have; by default ``expected``'s.
    what
        What is compared, to begin the failure message.
    signed_zeros
        Also require ``-0.0`` where ``expected`` is ``-0.0`` and ``+0.0`` where
        it is ``+0.0``.

    Raises
    ------
    AssertionError
        Naming the first difference found: dtype, shape, NaN, infinity, bound or
        sign of zero, with its count and first index.
    """
    if dtype is not None:
        want_dtype, got_dtype = dtype_name(dtype), dtype_name(getattr(got, "dtype", "float"))
        if got_dtype != want_dtype:
            msg = f"{what}: dtype {got_dtype}, expected {want_dtype}"
            raise AssertionError(msg)
    want = np.asarray(expected, dtype=np.float64)
    shape = want.shape if shape is None else tuple(shape)
    got_shape = tuple(getattr(got, "shape", ()))
    if got_shape != shape:
        msg = f"{what}: result shape {got_shape}, expected {shape}"
        raise AssertionError(msg)
    values = to_numpy(got).reshape(shape)
    want = np.broadcast_to(want, shape)
    tol = np.broadcast_to(np.asarray(bound, dtype=np.float64), shape)
    nan = np.isnan(values) != np.isnan(want)
    if nan.any():
        _fail(what, "NaN where the oracle has none, or a number for its NaN", nan, values, want)
    inf = (np.isinf(values) | np.isinf(want)) & (values != want) & ~np.isnan(want)
    if inf.any():
        _fail(what, "an infinity that differs (or its sign)", inf, values, want)
    finite = np.isfinite(want)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(finite, np.abs(values - want), 0.0)
    outside = finite & ~(err <= tol)
    if outside.any():
        idx = _index(outside)
        msg = (
            f"{what}: {int(outside.sum())} of {outside.size} elements differ from PyTorch's "
            f"exact values; first at index {idx}: got {float(values[idx])!r}, expected "
            f"{float(want[idx])!r} (error {float(err[idx]):.3g} > bound {float(tol[idx]):.3g})"
        )
        raise AssertionError(msg)
    if signed_zeros:
        sign = (want == 0) & (values == 0) & (np.signbit(values) != np.signbit(want))
        if sign.any():
            _fail(what, "the sign of a zero differs", sign, values, want)


def assert_loss(
    got: Any,
    exact: Exact,
    /,
    reduction: str = "none",
    input_shape: tuple[int, ...] | None = None,
    *,
    dtype: Any = None,
    what: str | None = None,
    signed_zeros: bool = False,
) -> None:
    r"""Assert a loss matches the oracle's ``exact`` pointwise values under ``reduction``.

    ``'none'`` is held elementwise to :func:`.oracle.pointwise_tolerance`
    (:data:`.oracle.POINTWISE_ULPS` ULPs of :math:`|t\log t| + |t x|`); the
    reductions must be 0-d and within the bound of :func:`.oracle.reduce`,
    whose divisor needs ``input_shape`` (for ``'batchmean'``, ``input.shape[0]``).
    ``dtype``, ``what`` and ``signed_zeros`` are as for :func:`assert_matches`.
    """
    what = f"reduction={reduction!r}" if what is None else what
    if reduction == "none":
        assert_matches(
            got,
            exact.value,
            pointwise_tolerance(exact),
            dtype=dtype,
            what=what,
            signed_zeros=signed_zeros,
        )
        return
    if input_shape is None:
        input_shape = exact.value.shape
    value, tol = reduce(exact, reduction, tuple(input_shape))
    assert_matches(
        got,
        value,
        tol if math.isfinite(value) else 0.0,
        dtype=dtype,
        shape=(),
        what=what,
        signed_zeros=signed_zeros,
    )


def assert_gradients(
    got: tuple[Any, Any],
    expected: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    /,
    *,
    dtypes: tuple[Any, Any] = (None, None),
    what: str = "",
    which: tuple[int, ...] = (0, 1),
) -> None:
    r"""Assert ``(grad_input, grad_target)`` match :func:`.oracle.gradients`' pairs.

    ``expected`` is what :func:`.oracle.gradients` returns,
    ``((grad_x, tol_x), (grad_t, tol_t))``: each gradient must have its
    argument's shape (the oracle's), the dtype in ``dtypes`` (unchecked where
    ``None``), the oracle's NaN and infinity pattern and finite values within
    its bound. ``which`` selects the gradients checked (0: input, 1: target).
    """
    names = ("input", "target")
    for i in which:
        value, tol = expected[i]
        label = f"gradient w.r.t. {names[i]}" + (f", {what}" if what else "")
        assert_matches(got[i], value, tol, dtype=dtypes[i], what=label)
