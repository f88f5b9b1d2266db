"""The Triton kernels on the CPU, in Triton's interpreter, against the reference.

Triton reads ``TRITON_INTERPRET=1`` when it is imported, so the kernel tests
run in a fresh interpreter process (``test_kernels_in_the_interpreter`` starts
``pytest`` on this file with the variable set). On a CUDA machine the same
kernels run compiled through the fast path (``tests/test_backend_torch.py``).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

import kldiv_spec  # noqa: E402
from kldiv_spec.backends import _triton_kernels as kernels  # noqa: E402

INTERPRETED = kernels.interpreting()
in_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="runs in a subprocess with TRITON_INTERPRET=1 (see below)"
)

TARGETS = [0.0, -0.0, 1e-45, 1e-40, 0.3, 1.0, 2.0, -0.5, math.inf, -math.inf, math.nan, -1000.0]
INPUTS = [math.log(1e-40), -100.0, -1.0, 0.0, 0.5, math.inf, -math.inf, math.nan, -0.0, 3e38]


@pytest.mark.skipif(INTERPRETED, reason="this is the subprocess")
def test_kernels_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


def assert_same(got: torch.Tensor, want: torch.Tensor, *, atol: float = 0.0) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    eps = torch.finfo(got.dtype).eps
    tiny = torch.finfo(got.dtype).smallest_normal * eps
    torch.testing.assert_close(got, want, rtol=4 * eps, atol=max(atol, 2 * tiny), equal_nan=True)


@in_interpreter
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean", "mean"])
def test_edge_values(dtype: torch.dtype, log_target: bool, reduction: str) -> None:
    t, x = torch.meshgrid(
        torch.tensor(TARGETS, dtype=dtype), torch.tensor(INPUTS, dtype=dtype), indexing="ij"
    )
    x, t = x.contiguous(), t.contiguous()
    d = {"none": 1, "sum": 1, "batchmean": x.shape[0], "mean": x.numel()}[reduction]
    g = torch.linspace(0.5, 1.5, x.numel() if reduction == "none" else 1, dtype=dtype)
    g = g.reshape(x.shape) if reduction == "none" else g.reshape(())
    with kldiv_spec.use_reference():
        want = kldiv_spec.kl_div(x, t, reduction=reduction, log_target=log_target)
        want_x, want_t = kldiv_spec.kl_div_backward(
            g, x, t, reduction=reduction, log_target=log_target
        )
    got = kernels.forward(x, t, reduction=reduction, log_target=log_target, divisor=d)
    grad_x, grad_t = kernels.backward(g / d, x, t, log_target=log_target, need=(True, True))
    assert_same(got, want)
    assert grad_x is not None and grad_t is not None
    assert_same(grad_x, want_x)
    assert_same(grad_t, want_t)
    only_x, none_t = kernels.backward(g / d, x, t, log_target=log_target, need=(True, False))
    assert none_t is None and only_x is not None
    assert_same(only_x, want_x)


@in_interpreter
@pytest.mark.parametrize("log_target", [False, True])
def test_sum_over_several_blocks(log_target: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    n = 2 * kernels.BLOCK + 123  # three programs, the last one partly masked
    x = torch.log_softmax(torch.randn(n, generator=gen), dim=0)
    t = torch.softmax(torch.randn(n, generator=gen), dim=0)
    if log_target:
        t = t.log()
    got = kernels.forward(x, t, reduction="sum", log_target=log_target, divisor=1)
    terms = torch.nn.functional.kl_div(
        x.double(), t.double(), reduction="none", log_target=log_target
    )
    assert got.dtype == torch.float32
    bound = 2 * torch.finfo(torch.float32).eps * float(terms.abs().sum())
    assert abs(float(got) - float(terms.sum())) <= bound


def test_cpu_tensors_need_the_interpreter() -> None:
    if INTERPRETED:
        pytest.skip("the interpreter is on in this process")
    x = torch.zeros(10)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.forward(x, x, reduction="sum", log_target=False, divisor=1)


def _rounding_witness(divisor: int) -> tuple[float, float]:
    """Return float32 values ``a`` (in [1, 2)) and ``delta`` (3/8 of an ulp of ``a``).

    ``a + delta`` rounds to ``a`` in float32, and dividing the rounded ``a`` by ``divisor``
    in float32 gives another float32 than dividing ``a + delta`` in float64 and rounding.
    """
    ulp = 2.0**-23
    delta = 0.375 * ulp
    for k in range(1, 1 << 16):
        a = 1.0 + k * ulp
        rounded_first = torch.tensor(a, dtype=torch.float32) / divisor
        divided_first = torch.tensor((a + delta) / divisor, dtype=torch.float64).float()
        if rounded_first != divided_first:
            return a, delta
    raise AssertionError(f"no witness for divisor {divisor}")  # pragma: no cover


@in_interpreter
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_reductions_round_the_total_then_divide(reduction: str) -> None:
    # The reductions' one rounding rule: the float64 total is rounded to float32 first,
    # then divided in float32, as the reference divides its float32 sum.
    rows, cols = 3, 1500  # 4500 elements: two programs
    divisor = rows if reduction == "batchmean" else rows * cols
    a, delta = _rounding_witness(divisor)
    # t = 1 gives the loss -x exactly; t = 0 (with x = 0) gives 0. The loss is a in the
    # first program and delta in the second: their float32 sum is a, their float64 sum not.
    x = torch.zeros(rows * cols, dtype=torch.float32)
    t = torch.zeros(rows * cols, dtype=torch.float32)
    x[0], x[-1] = -a, -delta
    t[0], t[-1] = 1.0, 1.0
    x, t = x.reshape(rows, cols), t.reshape(rows, cols)
    with kldiv_spec.use_reference():
        want = kldiv_spec.kl_div(x, t, reduction=reduction)
    got = kernels.forward(x, t, reduction=reduction, log_target=False, divisor=divisor)
    assert got.dtype == want.dtype == torch.float32
    rounded_first = torch.tensor(a, dtype=torch.float32) / divisor
    assert got.item() == want.item() == rounded_first.item()
    divided_first = torch.tensor((a + delta) / divisor, dtype=torch.float64).float()
    assert got != divided_first  # the case tells the two orders apart
