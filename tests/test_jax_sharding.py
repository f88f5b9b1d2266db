"""kl_div on JAX arrays sharded over two devices (NamedSharding), in a subprocess.

The CPU platform gets two devices from ``XLA_FLAGS=--xla_force_host_platform_device_count=2``,
which JAX reads once, when it is first imported; so the checks run in their own
interpreter (``tests/_jax_sharding_check.py``, which asserts everything itself)
and the rest of the suite keeps its single device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")

SCRIPT = Path(__file__).with_name("_jax_sharding_check.py")


@pytest.fixture(scope="module")
def report() -> dict:
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    env.pop("KLDIV_SPEC_REFERENCE", None)
    done = subprocess.run(
        [sys.executable, "-W", "error", str(SCRIPT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # one interpreter that compiles about 30 programs: 10-15 s on 2 cores
def test_sharded_values_gradients_and_layout(report: dict) -> None:
    """Every reduction, fast path and reference, eager and jit: correct, and 'none' and the
    gradients keep the operands' sharding (the script asserts each case)."""
    assert report["devices"] == 2
    assert report["cases"] == 32  # 4 configurations x fast/reference x 4 reductions


@pytest.mark.slow
def test_kl_div_backward_of_a_reduction_on_sharded_operands(report: dict) -> None:
    assert report["reduced_backward"] == {"float": "ok", "0-d array": "ok"}
