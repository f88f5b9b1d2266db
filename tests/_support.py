"""Constants and helpers shared by several test modules (importable: pytest's pythonpath)."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace
from typing import TYPE_CHECKING, Any

import array_api_compat
import numpy as np

if TYPE_CHECKING:
    import pytest

    from kldiv_spec.conformance.oracle import Exact

# Every reduction, each log_target at least once: enough where shapes or laziness are
# the point, and cheaper on JAX and Dask, which build anew for every configuration.
CONFIGURATIONS = [
    ("none", False),
    ("batchmean", True),
    ("sum", False),
    ("mean", True),
    ("none", True),
    ("sum", True),
]

# JAX compiles every operation anew for every new shape (about a second each on
# this machine), so JAX runs the shape-heavy tests on these few shapes only; the
# broadcasting logic is the same core code on every backend.
JAX_SHAPES = [((3,), ()), ((4, 1), (1, 3)), ((2, 1, 3), (4, 1))]


def few_shapes_on_jax(xp: Any, shapes: list[Any]) -> list[Any]:
    """Return ``shapes``, or :data:`JAX_SHAPES` when ``xp`` is JAX."""
    return JAX_SHAPES if array_api_compat.is_jax_namespace(xp) else shapes


def cupy_skip_reason() -> str | None:
    """Return why CuPy tests cannot run here ("no GPU: ..."), or None when they can."""
    try:
        import cupy
    except ImportError:
        return "no GPU: CuPy is not installed (it needs a CUDA device)"
    try:
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return None
    except Exception:  # CUDA driver missing or broken
        pass
    return "no GPU: CuPy tests need a CUDA device"


def flushes_subnormals(xp: Any, dtype: str) -> bool:
    """Whether ``xp`` computes in ``dtype`` with subnormal numbers flushed to zero.

    JAX does (XLA on the CPU), and so does CuPy in float32: it compiles every
    kernel, its own and kldiv_spec's, with ``-ftz=true``. That is the platform's
    arithmetic, not kldiv-spec's (docs/backends.md), so the tests give the
    oracle the flushed operands there.
    """
    if array_api_compat.is_jax_namespace(xp):
        return True
    if array_api_compat.is_cupy_namespace(xp):
        half_tiny = xp.asarray(np.finfo(dtype).smallest_normal, dtype=getattr(xp, dtype)) / 2
        return bool(half_tiny == 0)
    return False


def as_computed(xp: Any, a: np.ndarray, dtype: str) -> np.ndarray:
    """The values ``xp`` computes with: ``a``, its subnormals flushed where ``xp`` flushes them.

    JAX (XLA on CPU) and CuPy in float32 flush subnormals to zero. That is a
    property of the platform, not of kldiv-spec (documented as such), so the
    oracle is given the flushed values there.
    """
    if not flushes_subnormals(xp, dtype):
        return a
    tiny = np.finfo(dtype).smallest_normal
    return np.where(np.abs(a) < tiny, np.copysign(0.0, a), a)


def to_numpy(a: Any, /, *, quiet: bool = False) -> np.ndarray:
    """Return a fresh NumPy copy of an array of any backend, in its own dtype.

    Dask arrays are computed with the synchronous scheduler; ``quiet=True`` computes
    them inside ``np.errstate(all="ignore")`` (where a test does not check that the
    computation is silent).
    """
    if array_api_compat.is_torch_array(a):
        return a.detach().cpu().numpy().copy()
    if array_api_compat.is_dask_array(a):
        with np.errstate(all="ignore") if quiet else contextlib.nullcontext():
            return np.asarray(a.compute(scheduler="synchronous"))
    if array_api_compat.is_cupy_array(a):
        return a.get()
    return np.array(a, copy=True)


def kl_div(x: Any, t: Any, **options: Any) -> Any:
    """Call ``kldiv_spec.kl_div`` with the ``'mean'`` UserWarning silenced (test_api checks it)."""
    import warnings

    import kldiv_spec

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="reduction: 'mean'", category=UserWarning)
        return kldiv_spec.kl_div(x, t, **options)


def exact(
    xp: Any, x: np.ndarray, t: np.ndarray, *, log_target: bool, dtype: str = "float64"
) -> Exact:
    """The oracle's exact pointwise loss of ``x`` and ``t`` in ``dtype``, as ``xp`` sees them.

    Where ``xp`` flushes subnormals (:func:`flushes_subnormals`) the oracle gets
    the flushed operands and its absolute error floor is the smallest normal
    number, as in the conformance suite (``Context.exact``).
    """
    from kldiv_spec.conformance import oracle

    xc, tc = (as_computed(xp, np.asarray(a, dtype=np.float64), dtype) for a in (x, t))
    result = oracle.pointwise(xc.astype(dtype), tc.astype(dtype), log_target=log_target)
    if flushes_subnormals(xp, dtype):
        result.floor = float(np.finfo(dtype).smallest_normal)
    return result


def edge_grid(finfo: Any) -> tuple[np.ndarray, np.ndarray]:
    """Every (input, target) pair of edge values of a dtype, as two flat float64 arrays.

    ``finfo`` is ``numpy.finfo(dtype)`` (or ``torch.finfo``): subnormals, +-inf,
    NaN, -0.0, targets above 1 and below 0, an overflowing ``exp`` and values
    whose products overflow.
    """
    big = float(finfo.max) / 4
    tiny = float(finfo.smallest_normal)
    sub = tiny / 4  # a subnormal, exactly representable
    exp_overflow = math.log(float(finfo.max)) + 1
    inf, nan = math.inf, math.nan
    xs = [-inf, -big, -30.0, -1.0, -0.0, 0.0, sub, tiny, 0.5, 2.0, big, inf, nan]
    ts = [-inf, -1000.0, -1.0, -sub, -0.0, 0.0, sub, tiny, 0.25, 1.0, 2.5]
    ts += [exp_overflow, big, inf, nan]
    x, t = np.meshgrid(np.asarray(xs), np.asarray(ts), indexing="ij")
    return x.ravel(), t.ravel()


def finite_edge_grid(finfo: Any) -> tuple[np.ndarray, np.ndarray]:
    """Pairs whose pointwise loss is finite: non-negative finite targets, moderate inputs."""
    sub = float(finfo.smallest_normal) / 4
    xs = [-30.0, -1.0, -0.0, 0.0, sub, 0.5, 2.0]
    ts = [0.0, -0.0, sub, float(finfo.smallest_normal), 0.25, 1.0, 2.5]
    x, t = np.meshgrid(np.asarray(xs), np.asarray(ts), indexing="ij")
    return x.ravel(), t.ravel()


def gradient_edge_grid(finfo: Any) -> tuple[np.ndarray, np.ndarray]:
    """The edge pairs of the gradient tests, flat, as float64 arrays."""
    big, tiny = float(finfo.max) / 4, float(finfo.smallest_normal)
    sub = tiny / 4
    inf, nan = math.inf, math.nan
    xs = [-inf, -big, -30.0, -1.0, -0.0, 0.0, sub, 0.5, 2.0, big, inf, nan]
    ts = [-inf, -1000.0, -1.0, -0.0, 0.0, sub, tiny, 0.25, 1.0, 2.5]
    ts += [math.log(float(finfo.max)) + 1, big, inf, nan]
    x, t = np.meshgrid(np.asarray(xs), np.asarray(ts), indexing="ij")
    return x.ravel(), t.ravel()


def random_operands(
    x_shape: tuple[int, ...], t_shape: tuple[int, ...], *, log_target: bool, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Log-probability-like inputs and probability (or log-probability) targets."""
    rng = np.random.default_rng(seed)
    x = np.log(rng.uniform(0.01, 1.0, size=x_shape))
    t = rng.uniform(0.0, 1.0, size=t_shape)
    return np.asarray(x), np.asarray(np.log(t) if log_target else t)


#: The protocol functions a fast-path module may define (``kldiv_spec.backends``): the
#: dispatcher looks them up on the module at call time, so a test can wrap them.
PROTOCOL = ("kl_div", "kl_div_backward", "kl_div_from_logits", "kl_div_from_logits_backward")


@dataclass
class FastPathCalls:
    """What the spied-on protocol functions were asked: ``(module.function, taken)`` each,
    ``taken`` False where the function returned ``NotImplemented`` (declined)."""

    calls: list[tuple[str, bool]] = field(default_factory=list)

    @property
    def taken(self) -> list[str]:
        """The functions that returned a result, one entry per call."""
        return [name for name, took in self.calls if took]

    @property
    def declined(self) -> list[str]:
        """The functions that returned ``NotImplemented``, one entry per call."""
        return [name for name, took in self.calls if not took]

    def took(self, function: str) -> int:
        """How many calls of ``function`` (``"kl_div"``, or ``"numpy.kl_div"``) were taken."""
        return sum(1 for name in self.taken if name == function or name.endswith(f".{function}"))

    def clear(self) -> None:
        self.calls.clear()


def spy_fast_paths(
    monkeypatch: pytest.MonkeyPatch, modules: Iterable[ModuleType], /
) -> FastPathCalls:
    """Wrap the protocol functions of the fast-path ``modules``; return the record of calls.

    Names are recorded without the ``kldiv_spec.backends.`` prefix (``numpy.kl_div``,
    ``logits_torch.kl_div_from_logits_backward``). The wrappers only watch: arguments
    and results pass through unchanged.
    """
    record = FastPathCalls()

    def watch(real: Any, name: str) -> Any:
        def spy(*args: Any, **kwargs: Any) -> Any:
            out = real(*args, **kwargs)
            record.calls.append((name, out is not NotImplemented))
            return out

        return spy

    for module in modules:
        short = module.__name__.rsplit(".", 1)[-1]
        for function in PROTOCOL:
            real = getattr(module, function, None)
            if real is not None:
                monkeypatch.setattr(module, function, watch(real, f"{short}.{function}"))
    return record


# The NumPy fast path's compiled kernels: whether they run here is the backends' private
# business (built, AVX2, not switched off), asked in this one place.


def numpy_fused_available() -> bool:
    """Whether the NumPy fast path's compiled fused float32 sum runs here."""
    from kldiv_spec.backends import _blocks

    return bool(_blocks.fused_available())


def logits_fused_available() -> bool:
    """Whether the NumPy from-logits fast path's compiled float32 kernel runs here."""
    from kldiv_spec.backends import _blocks_logits

    return bool(_blocks_logits.fused_available())


# kldiv_spec's environment variables (docs/settings.md). Tests set them with setenv(), which
# makes them take effect whether kldiv_spec reads them on every call or once (a settings
# module with reload(): then they are read again here, and once more by conftest.py after
# the test, when monkeypatch has restored the environment).


def reread_settings() -> None:
    """Make kldiv_spec read its environment variables again, where it keeps what it read."""
    settings = sys.modules.get("kldiv_spec._settings")
    reload = getattr(settings, "reload", None)
    if reload is not None:
        reload()


def setenv(monkeypatch: pytest.MonkeyPatch, name: str, value: str | None) -> None:
    """Set (``None``: unset) one of kldiv_spec's environment variables, taking effect now.

    An invalid value raises ``ValueError`` here or on the next call.
    """
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    reread_settings()


def set_torch_min_elements(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """The PyTorch fast path's size threshold: its ``MIN_ELEMENTS`` (and its variable)."""
    from kldiv_spec.backends import torch as fast

    monkeypatch.setattr(fast, "MIN_ELEMENTS", n)
    setenv(monkeypatch, "KLDIV_SPEC_TORCH_MIN_ELEMENTS", str(n))


def misaligned(a: np.ndarray, offset: int) -> np.ndarray:
    """A writable copy of ``a`` whose data start ``offset`` bytes past a 32-byte boundary.

    The compiled kernels read and write any alignment; the tests pass such copies.
    """
    raw = np.empty(a.nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 32 + offset
    out = raw[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    assert out.ctypes.data % 32 == offset
    return out


def spy_kernel_rows(
    monkeypatch: pytest.MonkeyPatch, owner: ModuleType, attr: str, entry: str
) -> list[int]:
    """Record the rows of every block the compiled kernel ``owner.attr.entry`` evaluates.

    ``owner.attr`` (a compiled module, as ``_blocks_logits._fused_logits``) is replaced for
    the test by one whose ``entry`` (``rows_f32``, ``rows_f64``) counts each call's rows
    and calls the real one; ``available`` is the real one's.
    """
    calls: list[int] = []
    real = getattr(owner, attr)

    def rows(*args: Any) -> Any:
        calls.append(len(args[0]))
        return getattr(real, entry)(*args)

    fake = SimpleNamespace(**{entry: rows, "available": real.available})
    monkeypatch.setattr(owner, attr, fake)
    return calls


def load_script(path: Any, name: str, /) -> ModuleType:
    """Import the script at ``path`` (a benchmark or tool, no package) as module ``name``.

    Imported once per session and kept in ``sys.modules`` (a dataclass in it looks its
    module up there).
    """
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
