"""Print the edge-value table of ``docs/spec.md`` and check kldiv-spec against PyTorch.

Usage::

    python docs/_tools/edge_table.py

For every case (one input value ``x``, one target value ``t``, float64) it
computes the pointwise loss and its two derivatives with PyTorch's own
``torch.nn.functional.kl_div`` (autograd), prints them as a Markdown table on
stdout, and checks that kldiv-spec gives the same numbers, NaN for NaN and the
sign of zero reported, through every route available here:

* ``kldiv_spec.kl_div`` + ``kl_div_backward`` on NumPy, on one element and on
  arrays of :data:`LARGE` copies (large enough for the fast path),
* the same with the reference forced (``kldiv_spec.use_reference()``),
* array-api-strict (always the reference),
* Dask (built lazily, computed by ``float()``),
* ``kldiv_spec.torch.kl_div`` with autograd, on one element and on
  :data:`LARGE` copies,
* JAX with ``jax.grad`` (when JAX is installed).

PyTorch's values are also checked against the exact oracle of the tests and the
conformance suite (:mod:`kldiv_spec.conformance.oracle`). The routes checked and
any disagreement go to stderr; the exit status is 1 if
any route disagrees, else 0. ``tests/test_docs.py`` checks that the table in
``docs/spec.md`` is exactly what this prints.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable

import numpy as np
import torch

import kldiv_spec
import kldiv_spec.torch as kt
from kldiv_spec.conformance import oracle
from kldiv_spec.conformance.assertions import assert_gradients, assert_loss
from kldiv_spec.conformance.strategies import SPEC_EDGE_TABLE

#: (label of x, x, label of t, t, log_target): the spec's table, kept in one place.
CASES = SPEC_EDGE_TABLE

Triple = tuple[float, float, float]

#: Arrays this large take the fast paths (small ones are left to the reference).
LARGE = 1 << 17


def fmt(v: float) -> str:
    """Format one float64 for the table: NaN, +inf, -inf, signed zero, 6 digits."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+inf" if v > 0 else "-inf"
    if v == 0:
        return "-0" if math.copysign(1.0, v) < 0 else "0"
    return f"{v:.6g}"


def compare(a: float, b: float) -> str:
    """Return ``'same'``, ``'zero sign'`` (both zero, signs differ) or ``'different'``.

    Floats are the same when both are NaN, or equal with the same sign
    (relative tolerance 1e-14 for nonzero values).
    """
    if math.isnan(a) or math.isnan(b):
        return "same" if math.isnan(a) and math.isnan(b) else "different"
    if a == 0 and b == 0:
        return "same" if math.copysign(1.0, a) == math.copysign(1.0, b) else "zero sign"
    if a == b or abs(a - b) <= 1e-14 * abs(a):
        return "same"
    return "different"


def torch_oracle(x: float, t: float, log_target: bool) -> Triple:
    """Return loss, d/dx, d/dt from torch.nn.functional.kl_div with autograd."""
    xt = torch.tensor([x], dtype=torch.float64, requires_grad=True)
    tt = torch.tensor([t], dtype=torch.float64, requires_grad=True)
    out = torch.nn.functional.kl_div(xt, tt, reduction="none", log_target=log_target)
    out.backward(torch.ones_like(out))
    return out.item(), xt.grad.item(), tt.grad.item()


def via_kldiv_torch(size: int) -> Callable[[float, float, bool], Triple]:
    """Return a route through kldiv_spec.torch.kl_div with autograd, on ``size`` copies."""

    def route(x: float, t: float, log_target: bool) -> Triple:
        xt = torch.full((size,), x, dtype=torch.float64, requires_grad=True)
        tt = torch.full((size,), t, dtype=torch.float64, requires_grad=True)
        out = kt.kl_div(xt, tt, reduction="none", log_target=log_target)
        out.backward(torch.ones_like(out))
        return out[-1].item(), xt.grad[-1].item(), tt.grad[-1].item()

    return route


def via_namespace(xp: object, size: int = 1) -> Callable[[float, float, bool], Triple]:
    """Return a route through kl_div / kl_div_backward on ``size`` copies in namespace ``xp``."""

    def route(x: float, t: float, log_target: bool) -> Triple:
        xa = xp.full((size,), x, dtype=xp.float64)  # type: ignore[attr-defined]
        ta = xp.full((size,), t, dtype=xp.float64)  # type: ignore[attr-defined]
        out = kldiv_spec.kl_div(xa, ta, reduction="none", log_target=log_target)
        gx, gt = kldiv_spec.kl_div_backward(1.0, xa, ta, reduction="none", log_target=log_target)
        return float(out[-1]), float(gx[-1]), float(gt[-1])

    return route


def via_numpy_reference(x: float, t: float, log_target: bool) -> Triple:
    """Return the triple on NumPy with the reference forced."""
    with kldiv_spec.use_reference():
        return via_namespace(np)(x, t, log_target)


def via_jax(x: float, t: float, log_target: bool) -> Triple:
    """Return the triple on JAX (x64) from kl_div and jax.grad of it."""
    import jax
    import jax.numpy as jnp

    def loss(xa: object, ta: object) -> object:
        return kldiv_spec.kl_div(xa, ta, reduction="none", log_target=log_target)[0]

    xa = jnp.asarray([x], dtype=jnp.float64)
    ta = jnp.asarray([t], dtype=jnp.float64)
    gx, gt = jax.grad(loss, argnums=(0, 1))(xa, ta)
    return float(loss(xa, ta)), float(gx[0]), float(gt[0])


def routes() -> dict[str, Callable[[float, float, bool], Triple]]:
    """Return every kldiv-spec route that can run here."""
    found: dict[str, Callable[[float, float, bool], Triple]] = {
        "numpy (kl_div + kl_div_backward)": via_namespace(np),
        f"numpy, {LARGE} elements (fast path when there is one)": via_namespace(np, LARGE),
        "numpy, reference forced": via_numpy_reference,
        "torch autograd (kldiv_spec.torch.kl_div)": via_kldiv_torch(1),
        f"torch autograd, {LARGE} elements (fast path when there is one)": via_kldiv_torch(LARGE),
    }
    if importlib.util.find_spec("array_api_strict") is not None:
        import array_api_strict

        found["array_api_strict"] = via_namespace(array_api_strict)
    if importlib.util.find_spec("dask") is not None:
        import array_api_compat.dask.array as dask_xp

        found["dask (lazy, then computed)"] = via_namespace(dask_xp, 4)
    if importlib.util.find_spec("jax") is not None:
        import jax

        jax.config.update("jax_enable_x64", True)
        found["jax (jax.grad)"] = via_jax
    return found


def table() -> list[str]:
    """Return the Markdown table of PyTorch's values, one line per row."""
    lines = [
        "| log_target | input $x$ | target $t$ | loss $\\ell$ | $\\partial\\ell/\\partial x$ "
        "| $\\partial\\ell/\\partial t$ |",
        "|---|---|---|---|---|---|",
    ]
    for x_label, x, t_label, t, log_target in CASES:
        value, dx, dt = torch_oracle(x, t, log_target)
        lines.append(
            f"| {log_target} | {x_label} | {t_label} | {fmt(value)} | {fmt(dx)} | {fmt(dt)} |"
        )
    return lines


def check_oracle() -> int:
    """Compare PyTorch with the exact oracle on every case; return the number of mismatches.

    The oracle (:mod:`kldiv_spec.conformance.oracle`, the one the tests and the
    conformance suite use) must give PyTorch's value, with the sign of a zero,
    and its two derivatives, within its bounds and NaN for NaN.
    """
    bad = 0
    for x_label, x, t_label, t, log_target in CASES:
        xa, ta = np.asarray([x]), np.asarray([t])
        value, dx, dt = torch_oracle(x, t, log_target)
        try:
            exact = oracle.pointwise(xa, ta, log_target=log_target)
            assert_loss(np.asarray([value]), exact, "none", signed_zeros=True)
            want = oracle.gradients(1.0, xa, ta, reduction="none", log_target=log_target)
            assert_gradients((np.asarray([dx]), np.asarray([dt])), want)
        except AssertionError as error:
            bad += 1
            print(
                f"MISMATCH exact oracle: x={x_label} t={t_label} log_target={log_target}: {error}",
                file=sys.stderr,
            )
    status = "agrees" if bad == 0 else f"{bad} mismatches"
    print(
        f"exact oracle (kldiv_spec.conformance.oracle): {len(CASES)} cases, {status}",
        file=sys.stderr,
    )
    return bad


def check() -> int:
    """Compare every route with PyTorch on every case; return the number of mismatches.

    A difference only in the sign of a zero is reported on stderr but is not
    counted: the specification does not fix the sign of zero results.
    """
    mismatches = 0
    for name, route in routes().items():
        bad = zero_sign = 0
        for x_label, x, t_label, t, log_target in CASES:
            want = torch_oracle(x, t, log_target)
            got = route(x, t, log_target)
            verdicts = {compare(a, b) for a, b in zip(want, got, strict=True)}
            if verdicts == {"same"}:
                continue
            kind = "MISMATCH" if "different" in verdicts else "zero sign differs"
            if kind == "MISMATCH":
                bad += 1
            else:
                zero_sign += 1
            print(
                f"{kind} {name}: x={x_label} t={t_label} log_target={log_target}: "
                f"torch {tuple(map(fmt, want))} vs {tuple(map(fmt, got))}",
                file=sys.stderr,
            )
        status = "agrees" if bad == 0 else f"{bad} mismatches"
        if zero_sign:
            status += f" ({zero_sign} differing only in the sign of a zero)"
        print(f"{name}: {len(CASES)} cases, {status}", file=sys.stderr)
        mismatches += bad
    return mismatches


def main() -> int:
    """Print the table and check every route; return the exit status."""
    print(f"# torch {torch.__version__}, kldiv_spec {kldiv_spec.__version__}", file=sys.stderr)
    print("\n".join(table()))
    return 1 if check_oracle() + check() else 0


if __name__ == "__main__":
    sys.exit(main())
