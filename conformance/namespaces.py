"""The array libraries the suite can run on, behind one small interface.

Every property builds its cases as NumPy ``float64``/``float32`` arrays (so the
oracle sees the exact values) and moves them to the backend under test with
:meth:`Backend.asarray`; results come back with :meth:`Backend.to_numpy`.

The backends come from the one registry of array libraries,
:data:`kldiv_spec.backends._registry.BACKENDS`: each entry gives one backend per
device it lists, named after the library on its first device (``torch``) and
``<library>_<device>`` on the others (``torch_cuda``), with the entry's autograd
and read-only support. What is library-specific here is only how NumPy arrays
are moved there and back: one construction function per registry name in
:data:`CONSTRUCTORS`. An entry without one is an error on import, so adding a
library to the registry adds it to ``kldiv-spec check --backend`` or fails loudly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import array_api_compat
import numpy as np

from kldiv_spec.backends import _registry

__all__ = [
    "BACKENDS",
    "CONSTRUCTORS",
    "Backend",
    "BackendUnavailable",
    "Parts",
    "backend_names",
    "backends_from",
    "infer_backend",
    "installed_backends",
    "load_backend",
]

Array = Any


class BackendUnavailable(RuntimeError):  # noqa: N818 (reads as a status)
    """The backend's library is not installed (or has no usable device)."""


@dataclass
class Backend:
    """One array library on one device, as the suite sees it.

    Attributes
    ----------
    name : str
        The ``--backend`` name.
    xp : module
        Its array API namespace (the array-api-compat wrapper where there is one).
    library : str
        The registry entry's name (``torch`` for both ``torch`` and ``torch_cuda``).
    device_name : str
        The registry device its arrays are created on (``"cpu"``, ``"cuda"``, ...).
    autograd : {'torch', 'jax', None}
        Which automatic differentiation the gradient properties use.
    readonly : bool
        Whether arrays can be made read-only (NumPy only).
    subnormals : bool
        Whether arithmetic on subnormal numbers works (XLA on CPU flushes them).
    """

    name: str
    xp: Any
    library: str = ""
    device_name: str = "cpu"
    autograd: str | None = None
    readonly: bool = False
    subnormals: bool = True
    _to_numpy: Callable[[Array], np.ndarray] = field(default=np.asarray, repr=False)
    _asarray: Callable[[np.ndarray], Array] | None = field(default=None, repr=False)
    _other_device: Callable[[Array], Array] | None = field(default=None, repr=False)

    @property
    def non_default_device(self) -> bool:
        """Whether arrays can be placed on a device other than the library's default.

        True on a backend whose own device is not the CPU (``torch_cuda``,
        ``jax_gpu``, ``cupy``) and where :meth:`to_other_device` can move them.
        """
        return self.device_name != "cpu" or self._other_device is not None

    def to_other_device(self, a: Array, /) -> Array:
        """Return ``a`` on a device other than the default one, where the library has one."""
        return a if self._other_device is None else self._other_device(a)

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
        if not array_api_compat.is_array_api_obj(a):
            return False
        try:
            ns = array_api_compat.array_namespace(a)
        except TypeError:
            return False
        return _namespace_name(ns) == _namespace_name(self.xp)

    def device(self, a: Array, /) -> Any:
        """Return the device of ``a``."""
        return array_api_compat.device(a)


@dataclass
class Parts:
    """What a construction function returns: the library-specific part of a :class:`Backend`.

    Attributes
    ----------
    xp : module
        The array API namespace.
    asarray : callable, optional
        NumPy array -> backend array on the device (default ``xp.asarray``).
    to_numpy : callable
        Backend array -> NumPy array.
    subnormals : bool
        Whether arithmetic on subnormal numbers works on the device.
    other_device : callable, optional
        Backend array -> the same values on a non-default device, for a CPU
        library that has one (array-api-strict's ``device1``).
    """

    xp: Any
    asarray: Callable[[np.ndarray], Array] | None = None
    to_numpy: Callable[[Array], np.ndarray] = np.asarray
    subnormals: bool = True
    other_device: Callable[[Array], Array] | None = None


def _namespace_name(ns: Any) -> str:
    name = getattr(ns, "__name__", "")
    return name.replace("array_api_compat.", "").split(".")[0]


def _numpy(device: str) -> Parts:
    import array_api_compat.numpy as cnp

    return Parts(cnp)


def _array_api_strict(device: str) -> Parts:
    import array_api_strict

    device1 = array_api_strict.Device("device1")

    def to_numpy(a: Any) -> np.ndarray:
        return np.from_dlpack(a.to_device(array_api_strict.Device("CPU_DEVICE")))

    return Parts(array_api_strict, to_numpy=to_numpy, other_device=lambda a: a.to_device(device1))


def _torch(device: str) -> Parts:
    import array_api_compat.torch as ctorch
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("torch sees no CUDA device")

    def to_numpy(a: Any) -> np.ndarray:
        return a.detach().cpu().numpy()

    def asarray(a: np.ndarray) -> Any:
        return torch.from_numpy(a.copy()).to(device)

    return Parts(ctorch, asarray, to_numpy)


def _jax(device: str) -> Parts:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    try:
        where = jax.devices(device)[0]
    except RuntimeError as exc:  # no such platform
        raise BackendUnavailable(f"jax has no {device} device ({exc})") from None

    def asarray(a: np.ndarray) -> Any:
        return jax.device_put(a, where)

    # XLA on the CPU flushes subnormal numbers to zero.
    tiny = asarray(np.asarray(math.ulp(0.0))) * 1.0
    return Parts(jnp, asarray, subnormals=bool(tiny != 0))


def _dask(device: str) -> Parts:
    import array_api_compat.dask.array as cda
    import dask.array as da

    def asarray(a: np.ndarray) -> Any:
        chunks = tuple(max(1, (n + 1) // 2) for n in a.shape)
        return da.from_array(a.copy(), chunks=chunks)

    def to_numpy(a: Any) -> np.ndarray:
        return np.asarray(a.compute(scheduler="synchronous"))

    return Parts(cda, asarray, to_numpy)


def _cupy(device: str) -> Parts:
    import array_api_compat.cupy as ccp
    import cupy

    if cupy.cuda.runtime.getDeviceCount() == 0:  # pragma: no cover - needs a GPU
        raise BackendUnavailable("no CUDA device")
    # CuPy compiles every kernel with -ftz=true: float32 subnormals are flushed to zero.
    half_tiny = cupy.asarray(np.finfo(np.float32).smallest_normal, dtype=cupy.float32) / 2
    return Parts(ccp, cupy.asarray, cupy.asnumpy, subnormals=bool(half_tiny != 0))


#: How to build each registry entry's backends: ``construct(device) -> Parts``, which
#: imports the library (ImportError: not installed) and raises BackendUnavailable when
#: the device is absent. Keyed by registry name.
CONSTRUCTORS: dict[str, Callable[[str], Parts]] = {
    "numpy": _numpy,
    "array_api_strict": _array_api_strict,
    "torch": _torch,
    "jax": _jax,
    "dask": _dask,
    "cupy": _cupy,
}


def backend_names(spec: _registry.BackendSpec, /) -> dict[str, str]:
    """Return ``{backend name: device}`` for a registry entry.

    The first device listed gives the library's own name, each other one
    ``<library>_<device>``: ``torch`` (cpu) and ``torch_cuda``; ``cupy`` (cuda).
    """
    return {
        spec.name if i == 0 else f"{spec.name}_{device}": device
        for i, device in enumerate(spec.devices)
    }


def _build(spec: _registry.BackendSpec, name: str, device: str, construct: Callable) -> Backend:
    parts = construct(device)
    return Backend(
        name,
        parts.xp,
        library=spec.name,
        device_name=device,
        autograd=spec.autograd,
        readonly=spec.read_only,
        subnormals=parts.subnormals,
        _to_numpy=parts.to_numpy,
        _asarray=parts.asarray,
        _other_device=parts.other_device,
    )


def backends_from(
    specs: Iterable[_registry.BackendSpec], constructors: Mapping[str, Callable[[str], Parts]]
) -> tuple[dict[str, Callable[[], Backend]], dict[str, _registry.BackendSpec]]:
    """Return ``(factories, entries)``: every backend of ``specs``, by ``--backend`` name.

    Raises
    ------
    LookupError
        If an entry has no construction function in ``constructors``.
    """
    factories: dict[str, Callable[[], Backend]] = {}
    entries: dict[str, _registry.BackendSpec] = {}
    for spec in specs:
        if spec.name not in constructors:
            msg = (
                f"the backend registry lists {spec.name!r}, but kldiv_spec.conformance.namespaces "
                f"has no construction function for it: add one to CONSTRUCTORS"
            )
            raise LookupError(msg)
        construct = constructors[spec.name]
        for name, device in backend_names(spec).items():
            factories[name] = functools.partial(_build, spec, name, device, construct)
            entries[name] = spec
    return factories, entries


#: Every backend the suite knows: ``--backend`` name -> factory, in registry order.
BACKENDS, _ENTRIES = backends_from(_registry.BACKENDS, CONSTRUCTORS)

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
        except BackendUnavailable as exc:
            raise BackendUnavailable(f"{name}: {exc}") from None
        except Exception as exc:  # a broken CUDA driver, say
            raise BackendUnavailable(f"{name} cannot run here: {exc}") from None
    return _CACHE[name]


def installed_backends() -> list[str]:
    """Return the names of the backends that can run on this machine."""
    names = []
    for name in BACKENDS:
        if not _ENTRIES[name].installed():
            continue
        try:
            load_backend(name)
        except BackendUnavailable:
            continue
        names.append(name)
    return names


#: Packages that take a registry library's arrays without being it: package -> registry name.
_ALIASES: dict[str, str] = {"jaxlib": "jax", "optax": "jax", "flax": "jax", "equinox": "jax"}


def _library_of(module_name: str) -> str | None:
    """Return the registry name whose arrays the package ``module_name`` works on, or None."""
    top = module_name.split(".")[0]
    for spec in _registry.BACKENDS:
        if spec.module.split(".")[0] == top:
            return spec.name
    return _ALIASES.get(top)


def infer_backend(fn: Callable[..., Any], /) -> str | None:
    """Return the ``--backend`` name for the arrays ``fn`` takes, or None if it cannot tell.

    First the module ``fn`` is defined in (``torch.nn.functional.kl_div`` ->
    ``torch``); else the array libraries among the modules bound in ``fn``'s
    globals (what its module imported): the only one that is not NumPy, else
    NumPy. None when there is none, or more than one besides NumPy.
    """
    func = getattr(fn, "func", fn)  # functools.partial
    func = getattr(func, "__wrapped__", func)
    own = _library_of(getattr(func, "__module__", None) or "")
    if own is not None:
        return own
    found = set()
    for value in (getattr(func, "__globals__", None) or {}).values():
        name = getattr(value, "__name__", None)
        if isinstance(name, str) and type(value).__name__ == "module":
            lib = _library_of(name)
            if lib is not None:
                found.add(lib)
    others = found - {"numpy"}
    if len(others) == 1:
        return others.pop()
    if not others and found:
        return "numpy"
    return None
