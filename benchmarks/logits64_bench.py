"""The float64 from-logits kernel (backends/_fused_logits64.c): its exp's accuracy and its speed.

``--exp-sweep N`` measures the kernel's ``exp_f64`` on N arguments over [-745.2, 709.8]
(half uniform over the range, a quarter over the subnormal results, the rest near 0 and
over [-30, 30]) against ``exp`` in x87 long double (11 bits more than float64, so the
errors are measured to about 0.001 ulp), then checks the worst arguments found and a
random sample against mpmath (40 digits): the largest error in ulps of the exact value,
where, and the share of results not correctly rounded (error > 0.5 ulp) and not faithful
(>= 1 ulp); NumPy's float64 exp on the same arguments for comparison.

    python benchmarks/logits64_bench.py --exp-sweep 12000000

Otherwise it times, in this process, one distillation step (the loss and the gradient of
the student's logits, T = 2, 'batchmean') at ``--shapes`` (default 512x32000 and
2048x32000) of float64 logits: ``kl_div_from_logits`` and ``kl_div_from_logits_backward``
through the float64 kernel, the same through NumPy's ufuncs (the kernel switched off by
patching ``_blocks_logits._float64_kernel``), the float32 kernel on float32 copies, the
float64 torch composition where torch is installed, and the kernel alone (one direct
``rows_f64`` call over all rows, one thread). Best of ``--repeats``; the load average is
printed before and after.

    python benchmarks/logits64_bench.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

TEMPERATURE = 2.0


def sweep_arguments(n: int, seed: int = 0) -> np.ndarray:
    """The sweep's arguments (see the module's docstring)."""
    rng = np.random.default_rng(seed)
    near_zero = rng.choice([-1.0, 1.0], n // 8) * 2.0 ** rng.uniform(-60, 0, n // 8)
    borders = np.array([709.782712893384, -708.3964185322641, -745.1332191019411, -745.2])
    parts = [
        rng.uniform(-745.2, 709.78, n // 2),
        rng.uniform(-745.14, -708.39, n // 4),
        near_zero,
        rng.uniform(-30.0, 30.0, n - n // 2 - n // 4 - n // 8),
        np.concatenate([borders, np.nextafter(borders, 0), np.nextafter(borders, -1000)]),
    ]
    return np.concatenate(parts)


def ulp_errors(x: np.ndarray, got: np.ndarray) -> np.ndarray:
    """|got - e^x| in ulps of e^x (long double), 0 where e^x overflows and got is inf."""
    exact = np.exp(x.astype(np.longdouble))
    unit = np.where(
        exact >= 2.0**-1022,
        np.ldexp(np.longdouble(1), (np.frexp(exact)[1] - 53).astype(np.int64)),
        np.longdouble(2.0**-1074),
    )
    over = exact > np.finfo(np.float64).max
    with np.errstate(invalid="ignore"):
        err = np.asarray(np.abs(got.astype(np.longdouble) - exact) / unit, dtype=np.float64)
    return np.where(over & np.isinf(got), 0.0, err)


def exp_sweep(n: int) -> None:
    import mpmath

    from kldiv_spec.backends import _blocks_logits

    kernel = _blocks_logits._fused_logits64
    x = sweep_arguments(n)
    got = np.empty_like(x)
    kernel.exp_f64(x, got)
    with np.errstate(over="ignore"):
        numpy_exp = np.exp(x)
    stats = {}
    for name, values in (("kernel exp_f64", got), ("numpy exp", numpy_exp)):
        err = np.concatenate([ulp_errors(part, v) for part, v in _chunks(x, values)])
        normal = np.exp(x.astype(np.longdouble)) >= 2.0**-1022
        worst = int(np.argmax(err))
        worst_normal = int(np.flatnonzero(normal)[np.argmax(err[normal])])
        stats[name] = err
        print(
            f"{name}: {x.size} arguments, max {err[worst]:.4f} ulp at x = {x[worst]!r}; "
            f"normal results: max {err[worst_normal]:.4f} ulp at x = {x[worst_normal]!r}; "
            f"not correctly rounded {np.mean(err > 0.5):.4%}, not faithful {np.mean(err >= 1):.6%}"
        )
    # the worst arguments and a sample, against mpmath
    err = stats["kernel exp_f64"]
    rng = np.random.default_rng(1)
    pick = np.concatenate([np.argsort(err)[-200:], rng.integers(0, x.size, 20000)])
    worst = 0.0
    with mpmath.workdps(40):
        for i in pick:
            exact = mpmath.exp(mpmath.mpf(float(x[i])))
            if exact > np.finfo(np.float64).max:
                continue
            unit = 2.0 ** (mpmath.frexp(exact)[1] - 53) if exact >= 2.0**-1022 else 2.0**-1074
            e = float(abs(mpmath.mpf(float(got[i])) - exact) / unit)
            worst = max(worst, e)
            assert abs(e - err[i]) < 1e-3, (x[i], e, err[i])
    print(f"mpmath check of {pick.size} arguments (the 200 worst included): max {worst:.4f} ulp")


def _chunks(x: np.ndarray, y: np.ndarray, size: int = 1 << 20) -> Any:
    for i in range(0, x.size, size):
        yield x[i : i + size], y[i : i + size]


def best(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def timings(shapes: list[tuple[int, int]], repeats: int) -> None:
    print("load average before:", os.getloadavg())
    for rows, vocab in shapes:
        results = time_shape(rows, vocab, repeats)
        base = results["float64 kernel, loss + backward"]
        print(f"\n{rows} x {vocab}, T = {TEMPERATURE}, best of {repeats}:")
        for name, seconds in results.items():
            print(f"  {name:45s} {seconds * 1e3:9.1f} ms  ({seconds / base:5.2f}x the kernel)")
    print("load average after:", os.getloadavg())


def time_shape(rows: int, vocab: int, repeats: int) -> dict[str, float]:
    """Return the best time of each implementation at ``rows x vocab`` (seconds)."""
    import kldiv_spec
    from kldiv_spec.backends import _blocks_logits

    kernel = _blocks_logits._fused_logits64
    real = _blocks_logits._float64_kernel
    rng = np.random.default_rng(0)
    s = rng.standard_normal((rows, vocab))
    t = s + rng.standard_normal((rows, vocab))
    s32, t32 = s.astype(np.float32), t.astype(np.float32)

    def step(a: np.ndarray, b: np.ndarray) -> Callable[[], Any]:
        def run() -> Any:
            loss = kldiv_spec.kl_div_from_logits(a, b, temperature=TEMPERATURE)
            grad, _ = kldiv_spec.kl_div_from_logits_backward(1.0, a, b, temperature=TEMPERATURE)
            return float(loss), grad

        return run

    def one_pass() -> Any:  # the loss and the gradient in one pass (as torch's forward)
        return _blocks_logits.from_logits(
            s, t, temperature=TEMPERATURE, direction="forward", kept=None, grad_scale=1.0 / rows
        )

    kl, grad = np.empty(rows), np.empty_like(s)

    def alone() -> Any:
        return kernel.rows_f64(s, t, vocab, kl, grad, None, TEMPERATURE, 1.0, 1.0, False)

    results = {}
    results["float64 kernel, loss + backward"] = best(step(s, t), repeats)
    results["float64 kernel, one pass (from_logits)"] = best(one_pass, repeats)
    results["float64 kernel alone (rows_f64, 1 thread)"] = best(alone, repeats)
    _blocks_logits._float64_kernel = lambda *args: None
    try:
        results["float64 ufuncs, loss + backward"] = best(step(s, t), repeats)
        results["float64 ufuncs, one pass (from_logits)"] = best(one_pass, repeats)
    finally:
        _blocks_logits._float64_kernel = real
    results["float32 kernel, loss + backward"] = best(step(s32, t32), repeats)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return results
    st = torch.from_numpy(s).requires_grad_()
    tt = torch.from_numpy(t)

    def composition() -> Any:
        st.grad = None
        loss = F.kl_div(
            F.log_softmax(st / TEMPERATURE, dim=-1),
            F.softmax(tt / TEMPERATURE, dim=-1),
            reduction="batchmean",
        ) * (TEMPERATURE**2)
        loss.backward()
        return float(loss.detach())

    results["float64 torch composition"] = best(composition, repeats)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp-sweep", type=int, default=0, metavar="N")
    parser.add_argument("--shapes", nargs="*", default=["512x32000", "2048x32000"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.exp_sweep:
        exp_sweep(args.exp_sweep)
        return
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes]
    timings([(r, c) for r, c in shapes], args.repeats)


if __name__ == "__main__":
    main()
