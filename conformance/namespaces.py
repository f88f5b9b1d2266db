"""The array libraries the suite can run on, behind one small interface.

Every property builds its cases as NumPy ``float64``/``float32`` arrays (so the
oracle sees the exact values) and moves them to the backend under test with
:meth:`Backend.asarray`; results come back with :meth:`Backend.to_numpy`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "installed_backends", "load_backend"]

Array = Any


class BackendUnavailable(RuntimeError):  # noqa: N818 (reads as a status)
    """The backend's library is not installed (or has no usable device)."""


@dataclass
class Backend:
    """One array library as the suite sees it.

    Attributes
    ----------
    name : str
        The ``--backend`` name.
    xp : module
        Its array API namespace (the array-api-compat wrapper where there is one).
    autograd : {'torch', 'jax', None}
        Which automatic differentiation the gradient properties use.
    readonly : bool
        Whether arrays can be made read-only (NumPy only).
    subnormals : bool
        Whether arithmetic on subnormal numbers works (XLA on CPU flushes them).
    torch_device : str
        For the torch backends, the device their tensors live on.
    """

    name: str
    xp: Any
    autograd: str | None = None
    readonly: bool = False
    subnormals: bool = True
    torch_device: str = "cpu"
    _to_numpy: Callable[[Array], np.ndarray] = field(default=np.asarray, repr=False)
    _asarray: Callable[[np.ndarray], Array] | None = field(default=None, repr=False)

    def asarray(self, a: np.ndarray, /) -> Array:
        """Return a backend array holding exactly the values (and dtype) of ``a``."""
        a = np.array(a, order="C", copy=True)
        if self._asarray is not None:
            return self._asarray(a)
        return self.xp.asarray(a.copy())

    def to_numpy(self, a: Array, /) -> np.ndarray:
        """Return the values of backend array ``a`` as a NumPy array (computing it if lazy)."""
        return np.asarray(self._to_numpy(a))

    def is_array(self, a: object, /) -> bool:
        """Whether ``a`` is an array of this backend's library."""
        import array_api_compat

        if not array_api_compat.is_array_api_obj(a):
            return False
        try:
            ns = array_api_compat.array_namespace(a)
        except TypeError:
            return False
        return _namespace_name(ns) == _namespace_name(self.xp)

    def device(self, a: Array, /) -> Any:
        """Return the device of ``a``."""
        import array_api_compat

        return array_api_compat.device(a)


def _namespace_name(ns: Any) -> str:
    name = getattr(ns, "__name__", "")
    return name.replace("array_api_compat.", "").split(".")[0]


def _numpy() -> Backend:
    import array_api_compat.numpy as cnp

    return Backend("numpy", cnp, readonly=True)


def _array_api_strict() -> Backend:
    import array_api_strict

    return Backend("array_api_strict", array_api_strict, _to_numpy=np.from_dlpack)


def _torch_on(device: str) -> Backend:
    """PyTorch, tensors on ``device``: backend ``torch`` on the CPU, else ``torch_<device>``."""
    import array_api_compat.torch as ctorch
    import torch

    name = "torch" if device == "cpu" else f"torch_{device}"
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"{name}: torch sees no CUDA device")

    def to_numpy(a: Any) -> np.ndarray:
        return a.detach().cpu().numpy()

    def asarray(a: np.ndarray) -> Any:
        return torch.from_numpy(a.copy()).to(device)

    return Backend(
        name,
        ctorch,
        autograd="torch",
        torch_device=device,
        _to_numpy=to_numpy,
        _asarray=asarray,
    )


def _jax() -> Backend:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    tiny = jnp.asarray(math.ulp(0.0)) * 1.0
    return Backend("jax", jnp, autograd="jax", subnormals=bool(tiny != 0))


def _dask() -> Backend:
    import array_api_compat.dask.array as cda
    import dask.array as da

    def asarray(a: np.ndarray) -> Any:
        chunks = tuple(max(1, (n + 1) // 2) for n in a.shape)
        return da.from_array(a.copy(), chunks=chunks)

    def to_numpy(a: Any) -> np.ndarray:
        return np.asarray(a.compute(scheduler="synchronous"))

    return Backend("dask", cda, _to_numpy=to_numpy, _asarray=asarray)


def _cupy() -> Backend:
    import array_api_compat.cupy as ccp
    import cupy

    if cupy.cuda.runtime.getDeviceCount() == 0:  # pragma: no cover - needs a GPU
        raise BackendUnavailable("cupy: no CUDA device")
    # CuPy compiles every kernel with -ftz=true: float32 subnormals are flushed to zero.
    half_tiny = cupy.asarray(np.finfo(np.float32).smallest_normal, dtype=cupy.float32) / 2
    return Backend(
        "cupy",
        ccp,
        subnormals=bool(half_tiny != 0),
        _to_numpy=cupy.asnumpy,
        _asarray=cupy.asarray,
    )


#: Every backend the suite knows, by ``--backend`` name.
BACKENDS: dict[str, Callable[[], Backend]] = {
    "numpy": _numpy,
    "array_api_strict": _array_api_strict,
    "torch": functools.partial(_torch_on, "cpu"),
    "torch_cuda": functools.partial(_torch_on, "cuda"),
    "jax": _jax,
    "dask": _dask,
    "cupy": _cupy,
}

#: The module a backend needs, where its name is not the module's.
_MODULES = {"torch_cuda": "torch"}

_CACHE: dict[str, Backend] = {}


def load_backend(name: str, /) -> Backend:
    """Return the backend called ``name``; raise BackendUnavailable if it cannot run here."""
    if name not in BACKENDS:
        msg = f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}"
        raise ValueError(msg)
    if name not in _CACHE:
        try:
            _CACHE[name] = BACKENDS[name]()
        except ImportError as exc:
            raise BackendUnavailable(f"{name} is not installed ({exc})") from None
        except BackendUnavailable:
            raise
        except Exception as exc:  # a broken CUDA driver, say
            raise BackendUnavailable(f"{name} cannot run here: {exc}") from None
    return _CACHE[name]


def installed_backends() -> list[str]:
    """Return the names of the backends that can run on this machine."""
    names = []
    for name in BACKENDS:
        try:
            if importlib.util.find_spec(_MODULES.get(name, name)) is None:
                continue
            load_backend(name)
        except (ImportError, BackendUnavailable):
            continue
        names.append(name)
    return names
