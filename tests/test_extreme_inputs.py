"""Extreme inputs (issue 20): a fork at any moment, temperatures at the edge of their range."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import kldiv_spec
from kldiv_spec._validation import TEMPERATURE_MAX, TEMPERATURE_MIN

# The parent warms the pool, a helper thread takes the pool's lock and holds it while the
# main thread forks, and the child makes a pooled call (1 << 17 float32 elements, summed:
# the blocked kernels on 2 threads). A child that hangs is killed and reported (exit 3).
FORK_SCRIPT = textwrap.dedent(
    """
    import os, sys, threading, time
    import numpy as np
    import kldiv_spec
    from kldiv_spec.backends import _blocks

    rng = np.random.default_rng(0)
    x = np.log(rng.uniform(0.1, 1.0, 1 << 17)).astype(np.float32)
    t = rng.uniform(0.0, 1.0, 1 << 17).astype(np.float32)
    expected = kldiv_spec.kl_div(x, t, reduction="sum")
    assert _blocks._pool is not None, "the call did not use the pool"

    held, release = threading.Event(), threading.Event()

    def hold():
        with _blocks._pool_lock:
            held.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            got = kldiv_spec.kl_div(x, t, reduction="sum")
            if _blocks._pool is None:
                code = 4  # the child did not use the pool: the test would prove nothing
            elif got == expected:
                code = 0
        finally:
            os._exit(code)
    release.set()
    holder.join()
    deadline = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            sys.exit(os.waitstatus_to_exitcode(status))
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    sys.exit(3)
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_while_another_thread_holds_the_pool_lock() -> None:
    env = {**os.environ, "KLDIV_SPEC_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    env.pop("KLDIV_SPEC_NUMPY_MIN_ELEMENTS", None)
    result = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, "20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 3, "the forked child hung on its first pooled call"
    assert result.returncode == 0, (result.returncode, result.stderr)


def logits(dtype: type, rows: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    s = rng.normal(0.0, 3.0, (rows, vocab))
    t = s + rng.normal(0.0, 1.5, (rows, vocab))
    return s.astype(dtype), t.astype(dtype)


def test_temperature_bounds() -> None:
    assert TEMPERATURE_MIN == 2.0**-63
    assert TEMPERATURE_MAX == 2.0**63
    for bound in (TEMPERATURE_MIN, TEMPERATURE_MAX):
        # T, 1/T and T**2 are normal, finite float32 numbers at both bounds
        for factor in (bound, 1.0 / bound, bound**2, 1.0 / bound**2):
            f32 = np.float32(factor)
            assert f32 == factor
            assert np.finfo(np.float32).smallest_normal <= f32 <= np.finfo(np.float32).max


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 5), (64, 4096)], ids=["reference", "fast"])
@pytest.mark.parametrize("temperature", [TEMPERATURE_MIN, 1.0, TEMPERATURE_MAX, 2**63])
def test_temperature_at_the_bounds_is_accepted_and_finite(
    dtype: type, shape: tuple[int, int], temperature: float
) -> None:
    s, t = logits(dtype, *shape)
    # Finite, not accurate: at T near 2**63 the float32 fast path's value is dominated by
    # rounding amplified by T**2 (it can even be negative); the range only rules out inf/NaN.
    loss = kldiv_spec.kl_div_from_logits(s, t, temperature=temperature)
    assert np.isfinite(loss)
    none = kldiv_spec.kl_div_from_logits(s, t, temperature=temperature, reduction="none")
    assert np.all(np.isfinite(none))


OUTSIDE = [
    np.nextafter(TEMPERATURE_MIN, 0.0),
    np.nextafter(TEMPERATURE_MAX, math.inf),
    float(np.nextafter(TEMPERATURE_MIN, 0.0)),
    float(np.nextafter(TEMPERATURE_MAX, math.inf)),
    np.float32(np.nextafter(np.float32(TEMPERATURE_MAX), np.float32(math.inf))),
    1e-320,
    1e-40,
    1e-20,
    1e20,
    1e300,
    2**63 + 2**11,  # the next float64 above 2**63, as an int
    10**400,  # beyond float64
]


@pytest.mark.parametrize("temperature", OUTSIDE, ids=repr)
def test_temperature_outside_the_range_is_a_value_error(temperature: object) -> None:
    s, t = logits(np.float32, 2, 5)
    if temperature is OUTSIDE[-1]:
        message = "temperature must be a positive finite real number"
    else:
        message = r"temperature must be in \[2\*\*-63, 2\*\*63\].*, got "
        message += re.escape(repr(temperature))
    with pytest.raises(ValueError, match=message):
        kldiv_spec.kl_div_from_logits(s, t, temperature=temperature)
    with pytest.raises(ValueError, match=message):
        kldiv_spec.kl_div_from_logits_backward(1.0, s, t, temperature=temperature)


@pytest.mark.parametrize(
    ("temperature", "error"),
    [
        (0.0, ValueError),
        (0, ValueError),
        (-1.0, ValueError),
        (-1e300, ValueError),
        (-(10**400), ValueError),
        (math.inf, ValueError),
        (-math.inf, ValueError),
        (math.nan, ValueError),
        (True, TypeError),
        (False, TypeError),
        ("2", TypeError),
        (None, TypeError),
        (1j, TypeError),
    ],
    ids=repr,
)
def test_temperature_rejections_keep_their_messages(temperature: object, error: type) -> None:
    s, t = logits(np.float32, 2, 5)
    with pytest.raises(error, match="temperature must be a positive finite real number"):
        kldiv_spec.kl_div_from_logits(s, t, temperature=temperature)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("temperature", [100.0, 1e4, 2.0**40])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_large_temperatures_are_evaluated_in_float64_by_the_fast_path(
    dtype: type, temperature: float, direction: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above WIDE_TEMPERATURE the fast path's float32/float16 result is the float64 one
    rounded (where float32 arithmetic loses the value to cancellation amplified by T**2)."""
    from _support import setenv

    from kldiv_spec.backends import _blocks_logits

    setenv(monkeypatch, "KLDIV_SPEC_NUMPY_MIN_ELEMENTS", "0")
    assert temperature > _blocks_logits.WIDE_TEMPERATURE
    s, t = logits(dtype, 16, 300)
    s[1, ::7] = -np.inf  # excluded classes stay exact too
    options = {"temperature": temperature, "direction": direction}
    wide64 = s.astype(np.float64), t.astype(np.float64)
    for reduction in ("batchmean", "none"):
        got = kldiv_spec.kl_div_from_logits(s, t, reduction=reduction, **options)
        want = kldiv_spec.kl_div_from_logits(*wide64, reduction=reduction, **options)
        assert got.dtype == dtype
        with np.errstate(over="ignore"):  # k e_i beyond float16's range: inf, rounded once
            np.testing.assert_array_equal(got, np.asarray(want).astype(dtype))
    g, _ = kldiv_spec.kl_div_from_logits_backward(dtype(1), s, t, **options)
    w, _ = kldiv_spec.kl_div_from_logits_backward(1.0, *wide64, **options)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(g, w.astype(dtype))
