"""Bad arguments get a clear error that names the argument at fault, on every backend.

The calls use the default ``reduction='mean'`` on purpose: with warnings as
errors, they also prove that arguments are checked before the ``'mean'``
warning is emitted.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import numpy as np
import pytest

import kldiv_spec
from kldiv_spec import KLDivLoss, kl_div, kl_div_backward

VALID = ("'none'", "'batchmean'", "'sum'", "'mean'")


def operands(xp: Any) -> tuple[Any, Any]:
    x = xp.log(xp.asarray([[0.25, 0.75], [0.5, 0.5]], dtype=xp.float64))
    t = xp.asarray([[0.5, 0.5], [0.1, 0.9]], dtype=xp.float64)
    return x, t


def foreign_array(xp: Any) -> Any:
    """A float64 array of another library than ``xp``'s."""
    if isinstance(xp.asarray([1.0]), np.ndarray):
        array_api_strict = pytest.importorskip("array_api_strict")
        return array_api_strict.asarray([[0.5, 0.5], [0.1, 0.9]])
    return np.asarray([[0.5, 0.5], [0.1, 0.9]])


# --------------------------------------------------------------------------- reduction


@pytest.mark.parametrize("reduction", ["avg", "Mean", "", None, 1, "batch_mean", ("sum",)])
def test_unknown_reduction_lists_the_four(xp, reduction):
    x, t = operands(xp)
    with pytest.raises(ValueError, match="valid value for reduction") as info:
        kl_div(x, t, reduction=reduction)
    message = str(info.value)
    assert all(name in message for name in VALID), message
    with pytest.raises(ValueError, match="valid value for reduction"):
        kl_div_backward(1.0, x, t, reduction=reduction)
    with pytest.raises(ValueError, match="valid value for reduction"):
        KLDivLoss(reduction=reduction)


def test_unknown_reduction_starts_like_torchs_message():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError) as theirs:
        torch.nn.functional.kl_div(torch.zeros(2), torch.zeros(2), reduction="avg")
    with pytest.raises(ValueError) as ours:
        kl_div(np.zeros(2), np.zeros(2), reduction="avg")
    assert str(ours.value).startswith(str(theirs.value))


@pytest.mark.parametrize("log_target", [1, 0, None, "True", np.bool_(True), 1.0])
def test_log_target_must_be_a_bool(xp, log_target):
    x, t = operands(xp)
    with pytest.raises(TypeError, match="log_target"):
        kl_div(x, t, reduction="sum", log_target=log_target)
    with pytest.raises(TypeError, match="log_target"):
        kl_div_backward(1.0, x, t, reduction="sum", log_target=log_target)
    with pytest.raises(TypeError, match="log_target"):
        KLDivLoss(log_target=log_target)


# --------------------------------------------------------------------------- dtypes


def non_floating(xp: Any) -> list[tuple[str, Any]]:
    arrays = [
        ("int64", xp.asarray([[1, 2], [3, 4]])),
        ("int32", xp.asarray([[1, 2], [3, 4]], dtype=xp.int32)),
        ("bool", xp.asarray([[True, False], [False, True]])),
        ("uint8", xp.asarray([[1, 2], [3, 4]], dtype=xp.uint8)),
    ]
    if hasattr(xp, "complex128"):
        arrays.append(("complex128", xp.asarray([[1j, 2.0], [3.0, 4.0]], dtype=xp.complex128)))
    return arrays


def test_non_floating_dtypes_are_type_errors(xp):
    x, t = operands(xp)
    for label, bad in non_floating(xp):
        with pytest.raises(TypeError, match=r"^input must have a real floating") as info:
            kl_div(bad, t)
        assert label in str(info.value) or "int" in str(info.value), str(info.value)
        with pytest.raises(TypeError, match=r"^target must have a real floating"):
            kl_div(x, bad)
        with pytest.raises(TypeError, match=r"^input must have a real floating"):
            kl_div_backward(1.0, bad, t)
        with pytest.raises(TypeError, match=r"^target must have a real floating"):
            kl_div_backward(1.0, x, bad, reduction="none")
        with pytest.raises(TypeError, match=r"^input must have a real floating"):
            KLDivLoss(reduction="sum")(bad, t)


def test_torch_also_refuses_integers():
    torch = pytest.importorskip("torch")
    with pytest.raises(RuntimeError, match="Integral inputs not supported"):
        torch.nn.functional.kl_div(
            torch.zeros(2), torch.ones(2, dtype=torch.int64), reduction="sum"
        )


# --------------------------------------------------------------------------- non-arrays


@pytest.mark.parametrize(
    "bad", [[0.5, 0.5], (0.5, 0.5), 0.5, 1, None, "0.5", {"a": 1.0}], ids=repr
)
def test_non_arrays_are_type_errors(xp, bad):
    x, t = operands(xp)
    with pytest.raises(TypeError, match=r"^input must be an array.*got " + type(bad).__name__):
        kl_div(bad, t)
    with pytest.raises(TypeError, match=r"^target must be an array.*got " + type(bad).__name__):
        kl_div(x, bad)
    with pytest.raises(TypeError, match=r"^input must be an array"):
        kl_div_backward(1.0, bad, t)
    with pytest.raises(TypeError, match=r"^target must be an array"):
        kl_div_backward(1.0, x, bad)


# --------------------------------------------------------------------------- libraries, devices


def test_arrays_of_two_libraries(xp):
    x, t = operands(xp)
    other = foreign_array(xp)
    for a, b in ((x, other), (other, t)):
        with pytest.raises(TypeError, match="input and target must come from the same array"):
            kl_div(a, b)
        with pytest.raises(TypeError, match="input and target must come from the same array"):
            kl_div_backward(1.0, a, b)


def test_numpy_and_torch_do_not_mix():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"same array library.*numpy\.ndarray.*torch\.Tensor"):
        kl_div(np.zeros(2), torch.ones(2))
    with pytest.raises(TypeError, match=r"same array library.*torch\.Tensor.*numpy\.ndarray"):
        kl_div(torch.zeros(2), np.ones(2))


@pytest.mark.parametrize("meta", ["input", "target"])
def test_arrays_on_two_devices(meta):
    torch = pytest.importorskip("torch")
    x, t = torch.zeros(2, 3), torch.full((2, 3), 0.5)
    if meta == "input":
        x = x.to("meta")
    else:
        t = t.to("meta")
    with pytest.raises(ValueError, match=r"input and target must be on the same device.*meta"):
        kl_div(x, t)
    with pytest.raises(ValueError, match=r"input and target must be on the same device"):
        kl_div_backward(1.0, x, t)
    with pytest.raises(ValueError, match=r"input and target must be on the same device"):
        kldiv_spec.KLDivLoss(reduction="sum")(x, t)


def test_arrays_on_two_cuda_devices_or_cpu_and_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no GPU: needs a CUDA device")
    with pytest.raises(ValueError, match="same device"):
        kl_div(torch.zeros(2), torch.ones(2, device="cuda"))


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("x_shape", "t_shape"),
    [((3,), (4,)), ((2, 3), (3, 2)), ((2, 3), (2,)), ((0,), (2,)), ((4, 1, 3), (2, 2, 3))],
    ids=str,
)
def test_shapes_that_do_not_broadcast(xp, x_shape, t_shape):
    x, t = xp.zeros(x_shape, dtype=xp.float64), xp.ones(t_shape, dtype=xp.float64)
    pattern = re.escape(f"input of shape {x_shape} and target of shape {t_shape} cannot be")
    with pytest.raises(ValueError, match=pattern):
        kl_div(x, t)
    with pytest.raises(ValueError, match=pattern):
        kl_div_backward(1.0, x, t)


# --------------------------------------------------------------------------- grad_output


def test_grad_output_checks(xp):
    x, t = operands(xp)
    with pytest.raises(ValueError, match=r"grad_output of shape \(3,\)"):
        kl_div_backward(xp.ones(3, dtype=xp.float64), x, t, reduction="none")
    # (PyTorch prints the shape as torch.Size([2]).)
    with pytest.raises(ValueError, match=r"grad_output of shape \S*\(\[?2,?\]?\)\S* does not"):
        kl_div_backward(xp.ones(2, dtype=xp.float64), x, t, reduction="sum")
    with pytest.raises(
        ValueError, match=r"grad_output of shape \S*\(\[?1, 2, 2,?\]?\)\S* does not"
    ):
        kl_div_backward(xp.ones((1, 2, 2), dtype=xp.float64), x, t, reduction="none")
    with pytest.raises(TypeError, match=r"^grad_output must have a real floating"):
        kl_div_backward(xp.asarray(1), x, t, reduction="sum")
    with pytest.raises(TypeError, match=r"^grad_output must be an array.*got list"):
        kl_div_backward([1.0], x, t, reduction="sum")
    with pytest.raises(TypeError, match=r"^grad_output must be an array.*got bool"):
        kl_div_backward(True, x, t, reduction="sum")
    with pytest.raises(TypeError, match=r"^grad_output must come from the same array library"):
        kl_div_backward(foreign_array(xp), x, t, reduction="none")


def test_grad_output_that_broadcasts_is_accepted(xp):
    x, t = operands(xp)
    gx, gt = kl_div_backward(xp.ones((2,), dtype=xp.float64), x, t, reduction="none")
    assert tuple(gx.shape) == (2, 2)
    assert tuple(gt.shape) == (2, 2)
    gx, _ = kl_div_backward(2, x, t, reduction="sum")
    assert tuple(gx.shape) == (2, 2)


def test_grad_output_on_another_device():
    torch = pytest.importorskip("torch")
    x, t = torch.zeros(2), torch.full((2,), 0.5)
    with pytest.raises(ValueError, match="grad_output must be on the same device as input"):
        kl_div_backward(torch.ones((), device="meta"), x, t, reduction="sum")


# --------------------------------------------------------------------------- front ends


def test_kldivloss_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        KLDivLoss("sum")  # type: ignore[misc]


def test_kldivloss_checks_its_call(xp):
    x, _ = operands(xp)
    loss = KLDivLoss(reduction="batchmean")
    with pytest.raises(TypeError, match=r"^target must be an array"):
        loss(x, [0.5, 0.5])
    with pytest.raises(ValueError, match="cannot be broadcast"):
        loss(x, xp.ones(3, dtype=xp.float64))
    with pytest.raises(ValueError, match=r"grad_output of shape \S*\(\[?2,?\]?\)\S* does not"):
        loss.backward(x, xp.ones((2, 2), dtype=xp.float64), xp.ones(2, dtype=xp.float64))


def test_torch_module_checks_at_construction():
    pytest.importorskip("torch")
    import kldiv_spec.torch as kt

    with pytest.raises(ValueError, match="valid value for reduction"):
        kt.KLDivLoss(reduction="avg")
    with pytest.raises(TypeError, match="log_target"):
        kt.KLDivLoss(log_target=1)
    with pytest.raises(ValueError, match="valid value for reduction"):
        kt.kl_div(*_torch_operands(), reduction="avg")


def _torch_operands() -> tuple[Any, Any]:
    import torch

    return torch.zeros(2), torch.full((2,), 0.5)


# --------------------------------------------------------------------------- masked arrays


@pytest.mark.parametrize("which", ["input", "target", "grad_output"])
@pytest.mark.parametrize(
    "make",
    [
        lambda a: np.ma.masked_array(a, mask=np.zeros(a.shape, bool)),
        lambda a: np.ma.masked_array(a, mask=np.eye(*a.shape, dtype=bool)),
        lambda a: _matrix(a),
    ],
    ids=["masked_nothing", "masked_diagonal", "matrix"],
)
def test_masked_arrays_and_matrices_are_refused_by_name(which, make):
    """``np.ma`` and ``np.matrix`` are not array API arrays: some NumPy reductions skip
    masked elements and others do not, so no answer would be the specified one."""
    x = np.log(np.asarray([[0.25, 0.75], [0.5, 0.5]]))
    t = np.asarray([[0.5, 0.5], [0.1, 0.9]])
    args = {"input": x, "target": t, "grad_output": np.ones((2, 2))}
    args[which] = make(args[which])
    pattern = f"^{which} must be an array API array, got numpy"
    if which != "grad_output":
        for reduction in ("none", "sum", "mean", "batchmean"):
            with pytest.raises(TypeError, match=pattern):
                kl_div(args["input"], args["target"], reduction=reduction)
    with pytest.raises(TypeError, match=pattern):
        kl_div_backward(args["grad_output"], args["input"], args["target"], reduction="none")


def _matrix(a: np.ndarray) -> Any:
    with warnings.catch_warnings():  # NumPy's own advice against np.matrix
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.asmatrix(a)
