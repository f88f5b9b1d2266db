"""The public API: ``KLDivLoss``, the warnings, the torch front end, ``__all__``, input safety."""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import math
import warnings
from typing import Any

import _support
import array_api_compat
import numpy as np
import pytest
from _support import CONFIGURATIONS

import kldiv_spec
from kldiv_spec import REDUCTIONS, KLDivLoss

LEGACY = list(itertools.product([None, True, False], repeat=2))


def quietly(f: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``f`` with the ``'mean'`` UserWarning silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="reduction: 'mean'", category=UserWarning)
        return f(*args, **kwargs)


# Dask results are computed inside np.errstate here, as these tests always did: whether
# computing them is silent is not what they check.
to_numpy = functools.partial(_support.to_numpy, quiet=True)


def operands(xp: Any) -> tuple[Any, Any]:
    x = xp.log(xp.asarray([[0.25, 0.75], [0.5, 0.5], [0.9, 0.1]], dtype=xp.float64))
    t = xp.asarray([[0.5, 0.5], [0.1, 0.9], [0.0, 1.0]], dtype=xp.float64)
    return x, t


def torch_warning_text() -> str:
    """PyTorch's own ``'mean'`` warning, as emitted by the installed torch."""
    torch = pytest.importorskip("torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.nn.functional.kl_div(torch.zeros(2), torch.ones(2))
    (warning,) = caught
    return str(warning.message)


# --------------------------------------------------------------------------- KLDivLoss


def test_defaults_and_read_only_properties():
    loss = KLDivLoss()
    assert loss.reduction == "mean"
    assert loss.log_target is False
    with pytest.raises(AttributeError):
        loss.reduction = "sum"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        loss.log_target = True  # type: ignore[misc]
    with pytest.raises(AttributeError):
        loss.other = 1  # type: ignore[attr-defined]
    assert (loss.reduction, loss.log_target) == ("mean", False)


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_repr_equality_and_hash(reduction, log_target):
    loss = KLDivLoss(reduction=reduction, log_target=log_target)
    assert repr(loss) == f"KLDivLoss(reduction={reduction!r}, log_target={log_target!r})"
    assert eval(repr(loss), {"KLDivLoss": KLDivLoss}) == loss
    same = KLDivLoss(reduction=reduction, log_target=log_target)
    assert loss == same
    assert hash(loss) == hash(same)
    assert loss != KLDivLoss(reduction=reduction, log_target=not log_target)
    other = "sum" if reduction != "sum" else "none"
    assert loss != KLDivLoss(reduction=other, log_target=log_target)
    assert loss != (reduction, log_target)
    assert len({loss, same}) == 1


def test_forward_call_and_backward(xp, evaluation):
    x, t = operands(xp)
    for reduction, log_target in CONFIGURATIONS:
        loss = KLDivLoss(reduction=reduction, log_target=log_target)
        options = {"reduction": reduction, "log_target": log_target}
        expected = quietly(kldiv_spec.kl_div, x, t, **options)
        np.testing.assert_array_equal(to_numpy(quietly(loss, x, t)), to_numpy(expected))
        np.testing.assert_array_equal(to_numpy(quietly(loss.forward, x, t)), to_numpy(expected))
        ones = 1.0 if reduction != "none" else xp.ones((3, 2), dtype=xp.float64)
        want = kldiv_spec.kl_div_backward(ones, x, t, **options)
        for got, exp in zip(loss.backward(x, t), want, strict=True):
            np.testing.assert_array_equal(to_numpy(got), to_numpy(exp))
        g = 2.5 if reduction != "none" else xp.full((3, 2), 2.5, dtype=xp.float64)
        want = kldiv_spec.kl_div_backward(g, x, t, **options)
        for got, exp in zip(loss.backward(x, t, grad_output=g), want, strict=True):
            np.testing.assert_array_equal(to_numpy(got), to_numpy(exp))


# --------------------------------------------------------------------------- legacy flags


@pytest.mark.parametrize(("size_average", "reduce"), LEGACY)
def test_legacy_flags_resolve_like_torch(size_average, reduce):
    torch = pytest.importorskip("torch")
    from torch.nn._reduction import legacy_get_string

    import kldiv_spec.torch as kt

    if size_average is None and reduce is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert KLDivLoss(reduction="batchmean").reduction == "batchmean"
            assert KLDivLoss().reduction == legacy_get_string(None, None, emit_warning=False)
            assert kt.KLDivLoss(reduction="sum").reduction == "sum"
        return
    expected = legacy_get_string(size_average, reduce, emit_warning=False)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        torch_module = torch.nn.KLDivLoss(size_average, reduce, reduction="batchmean")
    assert torch_module.reduction == expected
    text = f"size_average and reduce args will be deprecated, please use reduction='{expected}'"
    assert [str(w.message) for w in theirs] == [text + " instead."]
    for make in (
        lambda: KLDivLoss(size_average=size_average, reduce=reduce, reduction="batchmean"),
        lambda: kt.KLDivLoss(size_average, reduce, reduction="batchmean"),
    ):
        with pytest.warns(DeprecationWarning, match=text) as record:
            loss = make()
        assert loss.reduction == expected
        assert [w.filename for w in record] == [__file__]


@pytest.mark.parametrize(("size_average", "reduce"), LEGACY)
def test_torch_functional_with_legacy_flags(size_average, reduce):
    torch = pytest.importorskip("torch")
    import kldiv_spec.torch as kt

    x = torch.log(torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=torch.float64))
    t = torch.tensor([[0.5, 0.5], [0.1, 0.9]], dtype=torch.float64)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        expected = torch.nn.functional.kl_div(x, t, size_average, reduce)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        got = kt.kl_div(x, t, size_average, reduce)
    torch.testing.assert_close(got, expected)
    # The same messages (PyTorch's deprecation notice is a UserWarning, ours a
    # DeprecationWarning); no 'mean' warning when the legacy flags give 'mean'.
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    assert all(w.filename == __file__ for w in ours)
    if size_average is not None or reduce is not None:
        assert [w.category for w in ours] == [DeprecationWarning]


# --------------------------------------------------------------------------- the 'mean' warning


def test_mean_warning_text_is_torchs_and_points_at_the_caller(xp):
    text = torch_warning_text()
    x, t = operands(xp)
    loss = KLDivLoss()
    for call in (
        lambda: kldiv_spec.kl_div(x, t),
        lambda: kldiv_spec.kl_div(x, t, reduction="mean"),
        lambda: loss(x, t),
        lambda: loss.forward(x, t),
    ):
        with pytest.warns(UserWarning) as record:
            call()
        assert [str(w.message) for w in record] == [text]
        assert [w.category for w in record] == [UserWarning]
        assert record[0].filename == __file__


@pytest.mark.parametrize("reduction", ["none", "batchmean", "sum"])
def test_no_warning_for_other_reductions(xp, reduction):
    x, t = operands(xp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kldiv_spec.kl_div(x, t, reduction=reduction)
        KLDivLoss(reduction=reduction)(x, t)
        kldiv_spec.kl_div_backward(1.0, x, t, reduction=reduction)


def test_backward_does_not_warn_for_mean(xp):
    x, t = operands(xp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kldiv_spec.kl_div_backward(1.0, x, t)
        KLDivLoss().backward(x, t)


def test_torch_functional_mean_warning_points_at_the_caller():
    torch = pytest.importorskip("torch")
    import kldiv_spec.torch as kt

    with pytest.warns(UserWarning) as record:
        kt.kl_div(torch.zeros(2), torch.ones(2))
    assert [str(w.message) for w in record] == [torch_warning_text()]
    assert record[0].filename == __file__


def test_torch_module_mean_warning_points_at_the_caller():
    torch = pytest.importorskip("torch")
    import kldiv_spec.torch as kt

    with pytest.warns(UserWarning) as record:
        kt.KLDivLoss()(torch.zeros(2), torch.ones(2))
    assert [str(w.message) for w in record] == [torch_warning_text()]
    assert record[0].filename == __file__


# --------------------------------------------------------------------------- torch front end


def test_torch_signatures_are_torchs():
    torch = pytest.importorskip("torch")
    import kldiv_spec.torch as kt

    def parameters(f: Any) -> list[tuple[str, Any, Any]]:
        return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

    assert parameters(kt.kl_div) == parameters(torch.nn.functional.kl_div)
    assert parameters(kt.KLDivLoss.__init__) == parameters(torch.nn.KLDivLoss.__init__)


def test_torch_module_is_a_module_with_a_useful_repr():
    torch = pytest.importorskip("torch")
    import kldiv_spec.torch as kt

    module = kt.KLDivLoss(reduction="batchmean", log_target=True)
    assert isinstance(module, torch.nn.Module)
    assert repr(module) == "KLDivLoss(reduction='batchmean', log_target=True)"
    assert repr(kt.KLDivLoss()) == "KLDivLoss(reduction='mean', log_target=False)"
    assert dict(module.state_dict()) == {}
    assert list(module.parameters()) == []


@pytest.mark.parametrize("log_target", [False, True])
def test_torch_module_trains_a_step_like_torchs(evaluation, log_target):
    torch = pytest.importorskip("torch")
    import kldiv_spec.torch as kt

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 5), torch.nn.LogSoftmax(-1)
    )
    twin = copy.deepcopy(model)
    inputs = torch.randn(6, 4)
    target = torch.softmax(torch.randn(6, 5), dim=-1)
    target = torch.log(target) if log_target else target
    steps = []
    for net, criterion in (
        (model, kt.KLDivLoss(reduction="batchmean", log_target=log_target)),
        (twin, torch.nn.KLDivLoss(reduction="batchmean", log_target=log_target)),
    ):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
        optimizer.zero_grad()
        loss = criterion(net(inputs), target)
        loss.backward()
        grads = [p.grad.clone() for p in net.parameters()]
        optimizer.step()
        after = criterion(net(inputs), target)
        steps.append((loss.detach(), after.detach(), grads))
    (ours, ours_after, our_grads), (theirs, theirs_after, their_grads) = steps
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_after, theirs_after)
    assert ours_after < ours  # the step trained
    for a, b in zip(our_grads, their_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_torch_module_in_sequential_container():
    torch = pytest.importorskip("torch")
    import kldiv_spec.torch as kt

    criterion = kt.KLDivLoss(reduction="sum")
    container = torch.nn.ModuleDict({"loss": criterion})
    assert container["loss"] is criterion
    x = torch.log_softmax(torch.randn(2, 3, dtype=torch.float64), -1)
    t = torch.softmax(torch.randn(2, 3, dtype=torch.float64), -1)
    torch.testing.assert_close(
        container["loss"](x, t), torch.nn.functional.kl_div(x, t, reduction="sum")
    )


# --------------------------------------------------------------------------- the namespace


def test_all_lists_exactly_the_public_api():
    assert set(kldiv_spec.__all__) == {
        "kl_div",
        "kl_div_backward",
        "KLDivLoss",
        "REDUCTIONS",
        "use_reference",
        "kl_div_from_logits",
        "kl_div_from_logits_backward",
        "kl_div_from_hidden",
        "kl_div_from_hidden_backward",
        "LOGITS_REDUCTIONS",
        "gaussian_kl",
        "gaussian_kl_backward",
    }
    assert len(kldiv_spec.__all__) == len(set(kldiv_spec.__all__))
    for name in kldiv_spec.__all__:
        assert getattr(kldiv_spec, name) is not None
    public = {
        name
        for name, value in vars(kldiv_spec).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public == set(kldiv_spec.__all__)
    assert kldiv_spec.REDUCTIONS == ("none", "batchmean", "sum", "mean")


def test_torch_all():
    pytest.importorskip("torch")
    import kldiv_spec.torch as kt

    assert sorted(kt.__all__) == [
        "KLDivFromHiddenLoss",
        "KLDivFromLogitsLoss",
        "KLDivLoss",
        "kl_div",
        "kl_div_from_hidden",
        "kl_div_from_hidden_sharded",
        "kl_div_from_logits",
    ]


def test_signatures_positional_arrays_keyword_options():
    for f in (kldiv_spec.kl_div, kldiv_spec.kl_div_backward):
        kinds = {p.name: p.kind for p in inspect.signature(f).parameters.values()}
        arrays = [n for n in kinds if n in ("grad_output", "input", "target")]
        assert all(kinds[n] is inspect.Parameter.POSITIONAL_ONLY for n in arrays)
        assert kinds["reduction"] is inspect.Parameter.KEYWORD_ONLY
        assert kinds["log_target"] is inspect.Parameter.KEYWORD_ONLY
    x, t = np.zeros(2), np.full(2, 0.5)
    with pytest.raises(TypeError):
        kldiv_spec.kl_div(x, t, "sum")  # type: ignore[misc]
    with pytest.raises(TypeError):
        kldiv_spec.kl_div(input=x, target=t, reduction="sum")  # type: ignore[call-arg]


# --------------------------------------------------------------------------- input safety


def test_inputs_are_never_modified(xp, evaluation):
    inf, nan = math.inf, math.nan
    x = xp.asarray([[-inf, -1.0, 0.0], [2.0, nan, -0.5]], dtype=xp.float64)
    t = xp.asarray([[0.0, 0.5, -1.0], [inf, 0.25, nan]], dtype=xp.float64)
    t1 = xp.asarray([0.0, 0.5, 2.0], dtype=xp.float64)
    g = xp.asarray([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]], dtype=xp.float64)
    before = [to_numpy(a) for a in (x, t, t1, g)]
    for reduction, log_target in CONFIGURATIONS:
        options = {"reduction": reduction, "log_target": log_target}
        grad = g if reduction == "none" else 1.0
        for target in (t, t1):
            quietly(kldiv_spec.kl_div, x, target, **options)
            kldiv_spec.kl_div_backward(grad, x, target, **options)
            loss = KLDivLoss(**options)
            quietly(loss, x, target)
            loss.backward(x, target, grad_output=grad)
    after = [to_numpy(a) for a in (x, t, t1, g)]
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(np.signbit(a), np.signbit(b))


def test_read_only_numpy_inputs_work(evaluation):
    x = np.log(np.asarray([[0.25, 0.75], [0.5, 0.5]]))
    t = np.asarray([[0.5, 0.5], [0.0, 1.0]])
    g = np.ones((2, 2))
    writable = [quietly(kldiv_spec.kl_div, x, t, reduction=r) for r in REDUCTIONS]
    grads = kldiv_spec.kl_div_backward(g, x, t, reduction="none")
    for a in (x, t, g):
        a.flags.writeable = False
    for r, want in zip(REDUCTIONS, writable, strict=True):
        np.testing.assert_array_equal(quietly(kldiv_spec.kl_div, x, t, reduction=r), want)
    for got, want in zip(
        kldiv_spec.kl_div_backward(g, x, t, reduction="none"), grads, strict=True
    ):
        np.testing.assert_array_equal(got, want)
    # Broadcast (zero-stride) read-only views too.
    tb = np.broadcast_to(np.asarray([0.5, 0.5]), (2, 2))
    np.testing.assert_array_equal(
        kldiv_spec.kl_div(x, tb, reduction="sum"),
        kldiv_spec.kl_div(x, t * 0 + 0.5, reduction="sum"),
    )


def test_results_live_on_the_inputs_device(xp, evaluation):
    x, t = operands(xp)
    device = array_api_compat.device(x)
    for reduction in REDUCTIONS:
        out = quietly(kldiv_spec.kl_div, x, t, reduction=reduction)
        assert array_api_compat.device(out) == device
        grad = 1.0 if reduction != "none" else xp.ones((3, 2), dtype=xp.float64)
        for g in kldiv_spec.kl_div_backward(grad, x, t, reduction=reduction):
            assert array_api_compat.device(g) == device


def test_results_are_arrays_of_the_inputs_library(xp, evaluation):
    x, t = operands(xp)
    expected = array_api_compat.array_namespace(x)
    for reduction in REDUCTIONS:
        out = quietly(kldiv_spec.kl_div, x, t, reduction=reduction)
        assert array_api_compat.array_namespace(out, x) is expected


def test_importing_the_package_imports_no_optional_or_test_library():
    """``import kldiv_spec`` stays light: hypothesis and mpmath are for the conformance
    suite only, and array libraries are imported when their arrays are first seen."""
    import subprocess
    import sys

    heavy = ("hypothesis", "mpmath", "torch", "jax", "dask", "cupy", "array_api_strict", "triton")
    code = (
        "import sys, kldiv_spec, kldiv_spec.backends._registry; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]"
