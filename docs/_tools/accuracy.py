r"""Measure the accuracy of kl_div against an exact oracle; print the tables of docs/accuracy.md.

Usage::

    python docs/_tools/accuracy.py            # the tables (about a minute on one core)
    python docs/_tools/accuracy.py --quick    # smaller arrays, for a smoke run

Method. Inputs are drawn in float64 and rounded once to the dtype under test;
the rounded values are the exact inputs. The oracle is the conformance suite's,
:mod:`kldiv_spec.conformance.oracle`: :func:`~kldiv_spec.conformance.oracle.pointwise`
evaluates the pointwise loss :math:`t \log t - t x` (or :math:`e^t (t - x)`)
of every element in extended precision (x87 80-bit, else 128-bit mpmath), and
:func:`~kldiv_spec.conformance.oracle.exact_sum` sums those values exactly
(``mpmath.fsum``). With the 64-bit significand of x87 the oracle's own error
is about :math:`2^{-64}` of an element's scale (below), a few hundredths of a
float64 ULP where the two terms cancel a hundredfold.
Reported:

* ``'none'``: the error of each element in units in the last place (ULP) of
  the dtype at the exact value, ``|computed - exact| / spacing(exact)``;
  maximum and median over all elements.
* ``'sum'`` and ``'mean'``: the relative error ``|computed - exact| / |exact|``.
* the error of each ``'none'`` element in units of ``u * m``, with ``m`` the
  magnitude ``|t log t| + |t x|`` (``e^t (|t| + |x|)``) of its two terms:
  the normwise error, which stays small where the ULP error is large because
  the two terms cancel;
* the error of ``'sum'`` in units of ``u * M``, with ``u`` the unit roundoff of
  the dtype and ``M = sum(m)``: the normwise error that bounds the reductions.

Each implementation gets the same rounded inputs: kldiv-spec's reference
(``use_reference()``) on NumPy, kldiv-spec's default NumPy route (a fast path
when one is installed) and PyTorch's ``torch.nn.functional.kl_div`` (CPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import mpmath
import numpy as np

import kldiv_spec
from kldiv_spec.conformance import oracle

mpmath.mp.prec = 128

Impl = Callable[[np.ndarray, np.ndarray, str, bool], np.ndarray]


@dataclass(frozen=True)
class Case:
    """One input family: a name and a generator of float64 (input, target) pairs."""

    name: str
    make: Callable[[np.random.Generator, bool, bool], tuple[np.ndarray, np.ndarray]]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _family(
    batch: int, support: int, scale_q: float, scale_p: float, kind: str = "random"
) -> Callable[[np.random.Generator, bool, bool], tuple[np.ndarray, np.ndarray]]:
    def make(rng: np.random.Generator, log_target: bool, quick: bool):
        b, k = (max(2, batch // 4), max(4, support // 100)) if quick else (batch, support)
        x = _log_softmax(scale_q * rng.standard_normal((b, k)))
        if kind == "one-hot":
            log_p = np.full((b, k), -np.inf)
            log_p[np.arange(b), rng.integers(0, k, size=b)] = 0.0
        elif kind == "close":
            log_p = _log_softmax(x + 1e-3 * rng.standard_normal((b, k)))
        else:
            log_p = _log_softmax(scale_p * rng.standard_normal((b, k)))
        return x, (log_p if log_target else np.exp(log_p))

    return make


CASES = [
    Case("softmax(randn), 16 x 1000", _family(16, 1000, 1.0, 1.0)),
    Case("tiny probabilities: softmax(20 randn), 16 x 1000", _family(16, 1000, 1.0, 20.0)),
    Case("one-hot target, 16 x 1000", _family(16, 1000, 1.0, 1.0, "one-hot")),
    Case("p close to q (1e-3 perturbation), 16 x 1000", _family(16, 1000, 1.0, 1.0, "close")),
    Case("large support: softmax(randn), 2 x 50000", _family(2, 50_000, 1.0, 1.0)),
]


def exact_pointwise(x: np.ndarray, t: np.ndarray, log_target: bool) -> oracle.Exact:
    """Return the oracle's exact pointwise loss of the (already rounded) inputs.

    The inputs are given to the oracle in float64, so that it returns the
    mathematical value even where PyTorch's evaluation in the dtype under test
    would underflow (``exp(t)`` for float32 targets below about -104): the
    error of that underflow is measured here, not excused. Its ``scale`` is the
    magnitude of the two terms of every element, ``|t log t| + |t x|`` (or
    ``e^t (|t| + |x|)``): the scale of the rounding errors of the pointwise
    terms, which their difference (and the sum) can cancel.
    """
    return oracle.pointwise(x.astype(np.float64), t.astype(np.float64), log_target=log_target)


def abs_errors(computed: np.ndarray, exact: oracle.Exact) -> np.ndarray:
    """Return |computed - exact| per element, in float64 (inf where ``computed`` is not finite)."""
    c = computed.ravel().astype(np.longdouble)
    with np.errstate(invalid="ignore"):
        err = np.abs(c - exact.value.ravel()).astype(np.float64)
    return np.where(np.isfinite(c), err, np.inf)


def ulp_errors(computed: np.ndarray, exact: oracle.Exact, dtype: type) -> np.ndarray:
    """Return |computed - exact| in ULPs of ``dtype`` at the exact value, per element."""
    spacing = np.spacing(np.abs(exact.value.ravel().astype(dtype))).astype(np.float64)
    return abs_errors(computed, exact) / spacing


def relative_error(computed: float, exact: mpmath.mpf) -> float:
    """Return |computed - exact| / |exact| (absolute error when exact is 0)."""
    if exact == 0:
        return abs(computed)
    return float(abs(mpmath.mpf(computed) - exact) / abs(exact))


def reference(x: np.ndarray, t: np.ndarray, reduction: str, log_target: bool) -> np.ndarray:
    """kldiv-spec's reference on NumPy."""
    with kldiv_spec.use_reference(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(kldiv_spec.kl_div(x, t, reduction=reduction, log_target=log_target))


def default_route(x: np.ndarray, t: np.ndarray, reduction: str, log_target: bool) -> np.ndarray:
    """kldiv-spec's default NumPy route (its fast path when one is installed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(kldiv_spec.kl_div(x, t, reduction=reduction, log_target=log_target))


def torch_kl_div(x: np.ndarray, t: np.ndarray, reduction: str, log_target: bool) -> np.ndarray:
    """PyTorch's own torch.nn.functional.kl_div on the CPU."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = torch.nn.functional.kl_div(
            torch.from_numpy(x), torch.from_numpy(t), reduction=reduction, log_target=log_target
        )
    return out.numpy()


def implementations() -> dict[str, Impl]:
    """Return the implementations measured here."""
    impls: dict[str, Impl] = {"kldiv-spec reference": reference}
    if importlib.util.find_spec("kldiv_spec.backends.numpy") is not None:
        impls["kldiv-spec numpy fast path"] = default_route
    if importlib.util.find_spec("torch") is not None:
        impls["torch F.kl_div"] = torch_kl_div
    return impls


def fmt(v: float) -> str:
    """Format an error for the tables."""
    if v == 0:
        return "0"
    if v >= 100:
        return f"{v:.3g}"
    return f"{v:.2g}" if v < 1e-3 else f"{v:.3f}".rstrip("0").rstrip(".")


def measure(quick: bool) -> list[str]:
    """Return the Markdown lines of one table per dtype and target form."""
    impls = implementations()
    lines: list[str] = []
    for dtype in (np.float32, np.float64):
        for log_target in (False, True):
            lines += [
                f"### {np.dtype(dtype).name}, log_target={log_target}",
                "",
                "| inputs | implementation | max ULP ('none') | median ULP ('none') "
                "| max error / (u m) ('none') "
                "| rel. error 'sum' | rel. error 'mean' | 'sum' error / (u M) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for case in CASES:
                if log_target and case.name.startswith("one-hot"):
                    continue  # log p = -inf gives NaN by specification (0 * -inf)
                rng = np.random.default_rng(20261127)
                x64, t64 = case.make(rng, log_target, quick)
                x, t = x64.astype(dtype), t64.astype(dtype)
                exact = exact_pointwise(x, t, log_target)
                exact_sum = oracle.exact_sum(exact)
                exact_mean = exact_sum / exact.value.size
                unit_roundoff = float(np.finfo(dtype).eps) / 2
                mags = exact.scale.ravel()
                scale = unit_roundoff * float(np.sum(mags))
                for name, impl in impls.items():
                    pointwise = impl(x, t, "none", log_target)
                    ulps = ulp_errors(pointwise, exact, dtype)
                    with np.errstate(invalid="ignore", divide="ignore"):
                        norm_pointwise = np.where(
                            mags == 0, 0.0, abs_errors(pointwise, exact) / (unit_roundoff * mags)
                        )
                    total = float(impl(x, t, "sum", log_target))
                    rel_sum = relative_error(total, exact_sum)
                    normwise = float(abs(mpmath.mpf(total) - exact_sum)) / scale
                    rel_mean = relative_error(float(impl(x, t, "mean", log_target)), exact_mean)
                    lines.append(
                        f"| {case.name} | {name} | {fmt(float(np.max(ulps)))} "
                        f"| {fmt(float(np.median(ulps)))} | {fmt(float(np.max(norm_pointwise)))} "
                        f"| {fmt(rel_sum)} | {fmt(rel_mean)} "
                        f"| {fmt(normwise)} |"
                    )
            lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Print the accuracy tables; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller arrays (smoke run)")
    args = parser.parse_args(argv)
    print("\n".join(measure(args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
