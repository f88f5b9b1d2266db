"""Run properties through hypothesis programmatically and collect the outcomes.

Each property ends as ``pass``, ``fail`` (with hypothesis's minimal
counterexample and a copy-paste reproduction) or ``n/a`` (with the reason).
:func:`resolve` turns an ``--impl`` name into the :class:`.Implementation` to run.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed

from . import adapters, checks_hidden, checks_logits, mutants, peers
from .catalog import CouldNotRun, NotApplicable, Property, select
from .context import Context, Record
from .implementations import BUILTIN, Implementation
from .namespaces import BackendUnavailable, load_backend
from .strategies import Case

__all__ = [
    "KINDS",
    "Failure",
    "Outcome",
    "Report",
    "ResolveError",
    "environment_failure",
    "reproduction",
    "resolve",
    "run",
    "run_property",
]

DEFAULT_MAX_EXAMPLES = 15

#: What a ``MODULE:CALLABLE`` is (``--kind``): a ``kl_div`` with PyTorch's signature,
#: a ``kl_div_from_logits``, a ``gaussian_kl``, or a loss of one of the two
#: third-party conventions that :mod:`.adapters` maps onto ``from_logits``.
KINDS: tuple[str, ...] = ("kl-div", "from-logits", "gaussian", "from-hidden", *adapters.STYLES)


class ResolveError(ValueError):
    """``--impl`` names nothing that can be checked: one line says why.

    A :class:`ValueError`, so callers that caught the usage errors of earlier
    versions still do. ``missing`` is the name of a module that is not installed,
    when that is the reason.
    """

    def __init__(self, message: str, /, *, missing: str | None = None) -> None:
        super().__init__(message)
        self.missing = missing


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _import_target(spec: str, module_name: str) -> Any:
    """Import ``module_name``: a ``.py`` file's path, or a module searched from the cwd first.

    A path (it ends in ``.py`` or contains a path separator) is loaded from that
    file, with its folder first on ``sys.path`` as ``python FILE`` has it. A module
    name is searched in the current directory first, as ``python -m`` does.
    """
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name).expanduser().resolve()
        if not path.is_file():
            msg = f"cannot load {spec!r}: no file {str(path)!r}"
            raise ResolveError(msg)
        folder = str(path.parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        name = f"_kldiv_impl_{path.stem}_{abs(hash(str(path))) % 10**8}"
        if name in sys.modules:
            return sys.modules[name]
        file_spec = importlib.util.spec_from_file_location(name, path)
        if file_spec is None or file_spec.loader is None:
            msg = f"cannot load {spec!r}: {str(path)!r} is not a Python file"
            raise ResolveError(msg)
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = module
        try:
            file_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    return importlib.import_module(module_name)


def resolve(spec: str, /, *, kind: str = "kl-div", **style_options: Any) -> Implementation:
    """Return the implementation named by ``spec``.

    ``spec`` is ``reference``, ``torch``, ``numpy`` (the suite's independent
    NumPy implementation), an adapter name (see :mod:`.adapters`),
    ``peer:NAME`` (a real library's function as installed, see ``kldiv_spec.conformance.peers``),
    ``mutant:NAME`` (see :mod:`.mutants`) or ``MODULE:CALLABLE``, where
    ``MODULE`` is a module (searched in the current directory first, as
    ``python -m`` does) or the path of a ``.py`` file. ``kind`` (one of
    ``KINDS``) says what a ``MODULE:CALLABLE`` is:

    - ``'kl-div'``: an :class:`Implementation`, or a function with PyTorch's
      functional signature (a ``backward`` attribute on it, if any, is used as
      its backward; ``from_logits`` and ``gaussian`` attributes, if any, as its
      other two functions);
    - ``'from-logits'``: a function with ``kl_div_from_logits``'s signature
      (a ``backward`` attribute: ``kl_div_from_logits_backward``'s); to declare
      options it cannot express, export an :class:`Implementation` instead;
    - ``'gaussian'``: a function with ``gaussian_kl``'s signature (a
      ``backward`` attribute: ``gaussian_kl_backward``'s);
    - ``'from-hidden'``: a function of the hidden states and output weights
      (``Implementation.from_hidden``'s signature; a ``backward`` attribute:
      ``from_hidden_backward``'s);
    - ``'torchtune-style'``, ``'liger-style'``: a loss of that convention (a
      class is instantiated), wrapped by ``adapters.torchtune_style`` or
      ``adapters.liger_style``; ``style_options`` (``ignore_index``,
      ``direction``) are passed to the wrapper.

    Raises
    ------
    ResolveError
        A :class:`ValueError` with one line: ``spec`` names nothing importable,
        importing it raised, a library it needs is missing (``missing`` names
        it), or ``kind`` is unknown.
    """
    if kind not in KINDS:
        msg = f"--kind must be one of {', '.join(KINDS)}, got {kind!r}"
        raise ResolveError(msg)
    try:
        return _resolve(spec, kind, style_options)
    except ResolveError:
        raise
    except ImportError as exc:
        missing = exc.name or str(exc)
        msg = f"{spec} needs {missing!r}, which is not installed ({_one_line(exc)})"
        raise ResolveError(msg, missing=missing) from None
    except (KeyboardInterrupt, GeneratorExit):
        raise
    except BaseException as exc:  # SystemExit too: importing must not end the check
        msg = f"cannot load {spec!r}: loading it raised {_one_line(exc)}"
        raise ResolveError(msg) from None


def _resolve(spec: str, kind: str, style_options: dict[str, Any]) -> Implementation:
    if spec in BUILTIN:
        return BUILTIN[spec]()
    if spec in adapters.ADAPTERS:
        return adapters.load(spec)
    if spec.startswith("peer:"):
        name = spec.split(":", 1)[1]
        if name not in peers.PEERS:
            msg = f"unknown peer {name!r}; choose from {', '.join(peers.PEERS)}"
            raise ResolveError(msg)
        return peers.PEERS[name]()
    if spec.startswith("mutant:"):
        name = spec.split(":", 1)[1]
        if name not in mutants.MUTANTS:
            msg = f"unknown mutant {name!r}; choose from {', '.join(mutants.MUTANTS)}"
            raise ResolveError(msg)
        return mutants.MUTANTS[name]
    if ":" not in spec:
        known = ", ".join([*BUILTIN, *adapters.ADAPTERS])
        msg = (
            f"--impl must be one of {known}, peer:NAME, mutant:NAME, MODULE:CALLABLE or "
            f"FILE.py:CALLABLE, got {spec!r}"
        )
        raise ResolveError(msg)
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        msg = f"--impl {spec!r}: give MODULE:CALLABLE or FILE.py:CALLABLE"
        raise ResolveError(msg)
    try:
        obj: Any = _import_target(spec, module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.split(".")[0] == exc.name.split(".")[0]:
            msg = (
                f"cannot load {spec!r}: no module named {exc.name!r} (searched the current "
                "directory and sys.path; a file can be given as path/to/file.py:CALLABLE)"
            )
            raise ResolveError(msg) from None
        raise
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            msg = f"cannot load {spec!r}: {module_name} has no attribute {part!r}"
            raise ResolveError(msg) from None
    if isinstance(obj, Implementation):
        return obj
    if not callable(obj):
        msg = f"{spec!r} is not callable"
        raise ResolveError(msg)
    backward = getattr(obj, "backward", None)
    if kind == "from-logits":
        return Implementation(
            spec, from_logits=obj, from_logits_backward=backward, description=spec
        )
    if kind == "gaussian":
        return Implementation(spec, gaussian=obj, gaussian_backward=backward, description=spec)
    if kind == "from-hidden":
        return Implementation(
            spec, from_hidden=obj, from_hidden_backward=backward, description=spec
        )
    if kind in adapters.STYLES:
        return adapters.STYLES[kind](obj, name=spec, **style_options)
    from_logits = getattr(obj, "from_logits", None)
    gaussian = getattr(obj, "gaussian", None)
    return Implementation(
        spec,
        obj,
        backward=backward,
        description=spec,
        from_logits=from_logits,
        from_logits_backward=getattr(from_logits, "backward", None),
        gaussian=gaussian,
        gaussian_backward=getattr(gaussian, "backward", None),
    )


#: Messages and exception types that mean the machine, not the implementation,
#: failed: no GPU driver, a CUDA runtime error, Triton's compiler or interpreter.
_ENVIRONMENT_MESSAGES: tuple[str, ...] = (
    "found no nvidia driver",
    "no cuda gpus are available",
    "cuda driver version is insufficient",
    "torch not compiled with cuda enabled",
    "cudaerrornodevice",
    "cudaerrorinsufficientdriver",
    "libcuda.so",
    "cuda_error_no_device",
)
_ENVIRONMENT_MODULES: tuple[str, ...] = ("triton", "cupy_backends.cuda", "cupy.cuda")


def environment_failure(exc: BaseException, /) -> str | None:
    """Return why ``exc`` is a failure of the machine, not of the implementation, or None.

    :class:`~.properties.CouldNotRun` (raised by an adapter that cannot run here),
    a missing or too old GPU driver, a CUDA runtime error, and errors of
    Triton's compiler or interpreter (its modules) are; the exception's causes
    are looked at too. Such a property is reported as ``could not run``, not as
    a failure of the implementation.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, CouldNotRun):
            return str(current) or type(current).__name__
        module = type(current).__module__ or ""
        if any(module == m or module.startswith(m + ".") for m in _ENVIRONMENT_MODULES):
            return f"{module}.{type(current).__name__}: {_one_line(current)}"
        text = str(current).lower()
        if any(m in text for m in _ENVIRONMENT_MESSAGES):
            return _one_line(current)
        current = current.__cause__ or current.__context__
    return None


@dataclass
class Failure:
    """One distinct failure of a property: what differs, on which case, and how to replay it."""

    reason: str
    counterexample: str = ""
    reproduction: str = ""


@dataclass
class Outcome:
    """The result of one property for one implementation on one backend."""

    name: str
    group: str
    description: str
    status: str  # "pass", "fail" or "n/a"
    examples: int = 0
    reason: str = ""
    counterexample: str = ""
    reproduction: str = ""
    seconds: float = 0.0
    level: str = "MUST"  # the property's requirement level: "MUST" or "SHOULD"
    #: Every distinct failure (the first is ``reason``, ``counterexample`` and
    #: ``reproduction``): a property of fixed cases runs them all and keeps one
    #: failure per cause; a hypothesis property keeps its minimal counterexample.
    failures: list[Failure] = field(default_factory=list)
    #: Cases that were n/a (the implementation declared them unsupported) while
    #: others ran: how many, and the first reason.
    unsupported: int = 0

    def each_failure(self) -> list[Outcome]:
        """Return one outcome per distinct failure (itself when it has at most one)."""
        if len(self.failures) <= 1:
            return [self]
        return [
            replace(
                self,
                reason=f.reason,
                counterexample=f.counterexample,
                reproduction=f.reproduction,
                failures=[f],
            )
            for f in self.failures
        ]


@dataclass
class Report:
    """Every outcome of one implementation on one backend."""

    impl: str
    backend: str
    max_examples: int
    seed: int | None
    outcomes: list[Outcome] = field(default_factory=list)
    #: "pass", "fail" (a MUST failure), "n/a" (nothing could be checked: the backend
    #: or the library is missing) or "error" (the machine failed: no GPU driver, ...).
    status: str = "pass"
    reason: str = ""
    should_status: str = "pass"  # "fail" when a SHOULD property failed
    version: str = ""  # the checked library's version, if it is one

    @property
    def could_not_run(self) -> bool:
        """Whether the machine failed for a property (status ``error``): not a verdict."""
        return any(o.status == "error" for o in self.outcomes)

    @property
    def checked(self) -> bool:
        """Whether at least one property passed or failed (something was checked)."""
        return any(o.status in ("pass", "fail") for o in self.outcomes)

    @property
    def failed(self) -> bool:
        """Whether a MUST property failed: the implementation does not conform."""
        return any(o.status == "fail" and o.level == "MUST" for o in self.outcomes)

    @property
    def should_failed(self) -> bool:
        """Whether a SHOULD property failed (PyTorch's warnings, exact exception classes)."""
        return any(o.status == "fail" and o.level == "SHOULD" for o in self.outcomes)

    def rejected(self, *, strict: bool = False) -> bool:
        """Whether the report fails: a MUST failure, or with ``strict`` any failure."""
        return self.failed or (strict and self.should_failed)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dictionary."""
        return asdict(self)


def _literal(a: Any) -> str:
    """Return NumPy code that rebuilds ``a`` exactly: values, dtype and shape."""
    a = np.asarray(a)
    if a.dtype.kind == "c":
        values = ", ".join(repr(complex(v)) for v in a.ravel())
    elif a.dtype.kind in "biu":
        values = ", ".join(repr(int(v)) for v in a.ravel())
    else:
        values = ", ".join(
            f"float({repr(float(v))!r})" if not np.isfinite(v) else repr(float(v))
            for v in a.ravel().astype(np.float64)
        )
    return f"np.array([{values}], dtype=np.{a.dtype.name}).reshape({tuple(a.shape)!r})"


_SHOW = """\
def show(a):  # one line, 17 significant digits
    return np.array2string(np.asarray(a), max_line_width=10**6, threshold=64, precision=17)
"""

_CALL_OR_ERROR = """\
def call(*args):
    try:
        return impl(*args, **kw)
    except Exception as exc:  # a crash is a result too
        return exc
"""

_FORWARD_VERDICT = """\
exact = oracle.pointwise(x, t, log_target=kw['log_target'])
exact.dtype = min((x.dtype, t.dtype), key=lambda d: d.itemsize)  # as semantics.dtypes
r = kw['reduction']
expected = exact.value if r == 'none' else oracle.reduce(exact, r, x.shape)[0]
shape = np.broadcast_shapes(x.shape, t.shape) if r == 'none' else ()
print('expected:', show(expected), np.result_type(x, t), shape)
if isinstance(got, Exception):
    print('got:      raised', repr(got))
    print('verdict:  differs')
else:
    values = backend.to_numpy(got) if backend.is_array(got) else got
    print('got:     ', show(values), getattr(got, 'dtype', type(got)), getattr(got, 'shape', None))
    try:
        assert backend.is_array(got), f'the result is a {type(got).__name__}, not an array'
        assert_loss(values, exact, r, x.shape, dtype=np.result_type(x, t))
        print('verdict:  agrees')
    except AssertionError as exc:
        print('verdict:  differs:', exc)
"""


def _torch_line() -> list[str]:
    return [
        "try:  # PyTorch's answer, for comparison",
        "    import torch",
        "    print('PyTorch: ', torch.nn.functional.kl_div("
        "torch.from_numpy(x), torch.from_numpy(t), **kw))",
        "except Exception:",
        "    pass",
    ]


def _gradient_lines(record: Record, autograd: str | None) -> list[str]:
    g = record.grad if record.grad is not None else 1.0
    g_code = repr(float(g)) if np.ndim(g) == 0 else _literal(np.asarray(g))
    lines = [f"g = {g_code}  # the upstream gradient"]
    if autograd == "torch":
        lines += [
            "import torch",
            "xb = backend.asarray(x).requires_grad_(True)",
            "tb = backend.asarray(t).requires_grad_(True)",
            "out = impl(xb, tb, **kw)",
            "gout = torch.as_tensor(np.asarray(g), dtype=out.dtype, device=out.device)",
            "gx, gt = torch.autograd.grad(out, (xb, tb), gout.expand(out.shape))",
            "gx, gt = gx.detach().cpu().numpy(), gt.detach().cpu().numpy()",
        ]
    elif autograd == "jax":
        lines += [
            "import jax, jax.numpy as jnp",
            "out, vjp = jax.vjp(lambda a, b: impl(a, b, **kw), "
            "backend.asarray(x), backend.asarray(t))",
            "gx, gt = (np.asarray(a) for a in "
            "vjp(jnp.broadcast_to(jnp.asarray(g, dtype=out.dtype), out.shape)))",
        ]
    else:
        lines += [
            "gb = g if np.ndim(g) == 0 else backend.asarray(g)",
            "gx, gt = impl.backward(gb, backend.asarray(x), backend.asarray(t), **kw)",
            "gx, gt = backend.to_numpy(gx), backend.to_numpy(gt)",
        ]
    lines += [
        "want = oracle.gradients(g, x, t, flush=not backend.subnormals, **kw)",
        "print('got:      grad_input', show(gx), 'grad_target', show(gt))",
        "print('expected: grad_input', show(want[0][0]), 'grad_target', show(want[1][0]))",
        "try:",
        "    assert_gradients((gx, gt), want, dtypes=(x.dtype, t.dtype))",
        "    print('verdict:  agrees')",
        "except AssertionError as exc:",
        "    print('verdict:  differs:', exc)",
    ]
    return lines


def _double_backward_lines() -> list[str]:
    return [
        "import torch",
        "xb = backend.asarray(x).requires_grad_(True)",
        "tb = backend.asarray(t).requires_grad_(True)",
        "try:",
        "    with warnings.catch_warnings():",
        "        warnings.simplefilter('ignore', UserWarning)",
        "        torch.autograd.gradgradcheck(lambda a, b: impl(a, b, **kw), (xb, tb), "
        "raise_exception=True)",
        "    got = 'gradgradcheck passes'",
        "except Exception as exc:",
        "    got = 'gradgradcheck raised ' + repr(exc).splitlines()[0]",
        "print('expected: gradgradcheck passes')",
        "print('got:     ', got)",
        "print('verdict: ', 'agrees' if got == 'gradgradcheck passes' else 'differs')",
    ]


def _error_lines(record: Record) -> list[str]:
    classes = record.errors or (ValueError, TypeError, RuntimeError)
    names = ", ".join(c.__name__ for c in classes)
    return [
        _CALL_OR_ERROR.rstrip("\n"),
        "got = call(backend.asarray(x), backend.asarray(t))",
        f"expected = ({names},)",
        "print('expected: raises', ' or '.join(c.__name__ for c in expected))",
        "print('got:     ', 'raised ' + repr(got) if isinstance(got, Exception) else got)",
        "print('verdict: ', 'agrees' if isinstance(got, expected) else 'differs')",
    ]


def _warning_lines() -> list[str]:
    return [
        "with warnings.catch_warnings(record=True) as caught:",
        "    warnings.simplefilter('always')",
        "    impl(backend.asarray(x), backend.asarray(t), **kw)",
        "users = [w for w in caught if issubclass(w.category, UserWarning)]",
        "others = [w for w in caught if not issubclass(w.category, UserWarning)]",
        "mean = kw['reduction'] == 'mean'",
        "print('expected:', \"one UserWarning naming 'batchmean'\" if mean else 'no warning')",
        "print('got:     ', [f'{w.category.__name__}: {w.message}' for w in caught])",
        "ok = not others and (len(users) == 1 and 'batchmean' in str(users[0].message)"
        " if mean else not users)",
        "print('verdict: ', 'agrees' if ok else 'differs')",
    ]


def _forward_lines(record: Record) -> list[str]:
    lines = [_CALL_OR_ERROR.rstrip("\n")]
    if record.kind == "layout":
        lines += [
            "def strided(a):  # a non-contiguous view holding the values of a",
            "    big = np.zeros((*a.shape[::-1], 2), dtype=a.dtype)",
            "    big[..., 0] = a.T",
            "    rev = tuple(reversed(range(a.ndim)))",
            "    return backend.xp.permute_dims(backend.asarray(big)[..., 0], rev)",
            "xb, tb = strided(x), strided(t)",
        ]
    elif record.kind == "device":
        lines += ["xb, tb = (backend.to_other_device(backend.asarray(a)) for a in (x, t))"]
    elif record.kind == "readonly":
        lines += [
            "xb, tb = x.copy(), t.copy()",
            "xb.flags.writeable = tb.flags.writeable = False",
        ]
    else:
        lines += ["xb, tb = backend.asarray(x), backend.asarray(t)"]
    lines += [
        "with warnings.catch_warnings():",
        "    warnings.simplefilter('ignore', UserWarning)  # the 'mean' warning",
        "    got = call(xb, tb)",
        "if not np.array_equal(backend.to_numpy(xb), x, equal_nan=True):",
        "    got = AssertionError('the call modified its input')",
    ]
    if record.kind == "device":
        lines += [
            "if backend.is_array(got) and backend.device(got) != backend.device(xb):",
            "    got = AssertionError(f'the result is on {backend.device(got)}, "
            "the input on {backend.device(xb)}')",
        ]
    return lines + _FORWARD_VERDICT.rstrip("\n").splitlines() + _torch_line()


_LOGITS_JUDGE = {
    "logits": "judge.assert_from_logits(values, x, t, mask=mask, **kw)",
    "logits_zero": "judge.assert_from_logits_zero(values, x, mask=mask, **kw)",
    "logits_non_negative": "judge.assert_from_logits_non_negative(values, x, t, mask=mask, **kw)",
    "logits_composition": "judge.assert_composition(values, expected, x, t, **kw)",
}
_LOGITS_EXPECTED = {
    "logits": "exact = oracle.from_logits(x, t, mask=mask, **kw)\n"
    "expected = exact.terms if kw['reduction'] == 'none' else oracle.reduce_logits(exact)[0]",
    "logits_zero": "expected = np.zeros(x.shape if kw['reduction'] == 'none' else ())",
    "logits_composition": "expected = judge.compose(judge.composition_kl_div(impl), backend, "
    "x, t, **kw)  # T**2 * kl_div(log_softmax(x / T), softmax(t / T))",
}
_LOGITS_EXPECTED["logits_non_negative"] = _LOGITS_EXPECTED["logits"]

_VERDICT = """\
print('expected:', show(expected))
if isinstance(got, Exception):
    print('got:      raised', repr(got))
    print('verdict:  differs')
else:
    values = backend.to_numpy(got)
    print('got:     ', show(values))
    try:
        {judge}
        print('verdict:  agrees')
    except AssertionError as exc:
        print('verdict:  differs:', exc)
"""


#: The signs of the gradients' zeros against PyTorch's order of operations.
_SIGN_LINES = """\
from kldiv_spec.conformance.checks_semantics import ieee_gradients
signs = ieee_gradients(x, t, log_target=kw['log_target'])
print('expected: zeros signed as grad_input', show(signs[0]), 'grad_target', show(signs[1]))
flipped = [name for name, g, w in zip(('input', 'target'), (gx, gt), signs)
           if np.any((g == 0) & (w == 0) & (np.signbit(g) != np.signbit(w)))]
if values != 'agree':
    print('verdict:  differs: the values', values)
elif flipped:
    print('verdict:  differs: the sign of a zero of the gradient w.r.t.', ', '.join(flipped))
else:
    print('verdict:  agrees')
"""

#: The call of a replay, then whether it left its two operands as they were.
_UNCHANGED = """\
xb, tb = backend.asarray(x), backend.asarray(t)
got = call(xb, tb)
for name, now, was in (('{a}', xb, x), ('{b}', tb, t)):
    if not np.array_equal(backend.to_numpy(now), was, equal_nan=True):
        got = AssertionError(f'the call modified its {{name}}')
"""


def _grad_code(g: Any) -> str:
    return repr(float(g)) if np.ndim(g) == 0 else _literal(np.asarray(g))


def _logits_lines(record: Record, autograd: str | None) -> list[str]:
    """Return the body of a from-logits reproduction: the call, what is expected, the verdict."""
    c = record.case
    mask = c.extra.get("mask")
    keys = [k for k in checks_logits.OPTION_KEYS if k != "reduction"]  # kw's first entry
    options = {k: c.extra[k] for k in keys if k in c.extra}
    lines = [
        "mask = "
        + ("None" if mask is None else f"np.array({np.asarray(mask).tolist()!r}, dtype=bool)")
        + "  # True keeps a row",
        f"kw = dict(reduction={c.reduction!r}, "
        + ", ".join(f"{k}={v!r}" for k, v in options.items())
        + ")",
        "masked = {} if mask is None else {'mask': backend.asarray(mask)}",
    ]
    if record.kind in ("logits_gradient", "logits_teacher_gradient"):
        teacher = record.kind == "logits_teacher_gradient"
        field = "grad_target" if teacher else "grad_input"
        lines += [f"g = {_grad_code(record.grad)}  # the upstream gradient"]
        if autograd == "torch":
            lines += [
                "import torch",
                "xb = backend.asarray(x).requires_grad_(True)",
                f"tb = backend.asarray(t).requires_grad_({teacher})",
                "out = impl.from_logits(xb, tb, **kw, **masked)",
                "gout = torch.as_tensor(np.asarray(g), dtype=out.dtype, device=out.device)",
                "grads = torch.autograd.grad(out, (xb, tb) if tb.requires_grad else (xb,), "
                "gout.expand(out.shape))",
                "gx = grads[-1].detach().cpu().numpy()",
            ]
        elif autograd == "jax":
            lines += [
                "import jax, jax.numpy as jnp",
                "out, vjp = jax.vjp(lambda a, b: impl.from_logits(a, b, **kw, **masked), "
                "backend.asarray(x), backend.asarray(t))",
                "grads = vjp(jnp.broadcast_to(jnp.asarray(g, dtype=out.dtype), out.shape))",
                f"gx = np.asarray(grads[{int(teacher)}])",
            ]
        else:
            lines += [
                "gb = g if np.ndim(g) == 0 else backend.asarray(g)",
                "gx = impl.from_logits_backward(gb, backend.asarray(x), backend.asarray(t), "
                f"**kw, **masked)[{int(teacher)}]",
                "gx = backend.to_numpy(gx)",
            ]
        return [
            *lines,
            f"want = oracle.from_logits(x, t, grad_output=g, mask=mask, **kw).{field}",
            f"print('got:      {field}', show(gx))",
            f"print('expected: {field}', show(want))",
            "try:",
            "    judge.assert_from_logits_gradient(gx, x, t, grad_output=g, mask=mask, "
            f"teacher={teacher}, **kw)",
            "    print('verdict:  agrees')",
            "except AssertionError as exc:",
            "    print('verdict:  differs:', exc)",
        ]
    lines += [
        "def call(*args):",
        "    try:",
        "        return impl.from_logits(*args, **kw, **masked)",
        "    except Exception as exc:  # a crash is a result too",
        "        return exc",
        *_UNCHANGED.format(a="student logits", b="teacher logits").splitlines(),
        *_LOGITS_EXPECTED[record.kind].splitlines(),
    ]
    return lines + _VERDICT.format(judge=_LOGITS_JUDGE[record.kind]).rstrip("\n").splitlines()


def _gaussian_lines(record: Record, autograd: str | None) -> list[str]:
    """Return the body of a Gaussian-KL reproduction (``x`` is ``mu``, ``t`` is ``logvar``)."""
    c = record.case
    priors = {k: v for k, v in c.extra.items() if k in ("mu_prior", "logvar_prior")}
    shown = ", ".join(
        f"{k}={_literal(v) if isinstance(v, np.ndarray) else repr(v)}" for k, v in priors.items()
    )
    lines = [
        f"kw = dict(reduction={c.reduction!r})",
        f"priors = dict({shown})",
        "kwb = {**kw, **{k: backend.asarray(v) if isinstance(v, np.ndarray) else v "
        "for k, v in priors.items()}}",
    ]
    if record.kind == "gaussian_gradient":
        lines += [f"g = {_grad_code(record.grad)}  # the upstream gradient"]
        if autograd == "torch":
            lines += [
                "import torch",
                "xb = backend.asarray(x).requires_grad_(True)",
                "tb = backend.asarray(t).requires_grad_(True)",
                "out = impl.gaussian(xb, tb, **kwb)",
                "gout = torch.as_tensor(np.asarray(g), dtype=out.dtype, device=out.device)",
                "gx, gt = torch.autograd.grad(out, (xb, tb), gout.expand(out.shape))",
                "gx, gt = gx.detach().cpu().numpy(), gt.detach().cpu().numpy()",
            ]
        elif autograd == "jax":
            lines += [
                "import jax, jax.numpy as jnp",
                "out, vjp = jax.vjp(lambda a, b: impl.gaussian(a, b, **kwb), "
                "backend.asarray(x), backend.asarray(t))",
                "gx, gt = (np.asarray(a) for a in "
                "vjp(jnp.broadcast_to(jnp.asarray(g, dtype=out.dtype), out.shape)))",
            ]
        else:
            lines += [
                "gb = g if np.ndim(g) == 0 else backend.asarray(g)",
                "grads = impl.gaussian_backward(gb, backend.asarray(x), backend.asarray(t), "
                "**kwb)",
                "gx, gt = backend.to_numpy(grads[0]), backend.to_numpy(grads[1])",
            ]
        return [
            *lines,
            "want = judge.exact_gaussian_gradients(x, t, grad_output=g, **kw, **priors)",
            "print('got:      grad_mu', show(gx), 'grad_logvar', show(gt))",
            "print('expected: grad_mu', show(want[0]), 'grad_logvar', show(want[1]))",
            "try:",
            "    judge.assert_gaussian_gradient((gx, gt), x, t, grad_output=g, **kw, **priors)",
            "    print('verdict:  agrees')",
            "except AssertionError as exc:",
            "    print('verdict:  differs:', exc)",
        ]
    if record.kind == "gaussian_zero":
        expected = "expected = np.zeros(x.shape if kw['reduction'] == 'none' else ())"
        judge = "judge.assert_gaussian_zero(values, x, t, **kw, **priors)"
    else:
        expected = "expected = judge.gaussian_expected(x, t, **kw, **priors)[0]"
        judge = "judge.assert_gaussian(values, x, t, **kw, **priors)"
    lines += [
        "def call(*args):",
        "    try:",
        "        return impl.gaussian(*args, **kwb)",
        "    except Exception as exc:  # a crash is a result too",
        "        return exc",
        *_UNCHANGED.format(a="mu", b="logvar").splitlines(),
        expected,
    ]
    return lines + _VERDICT.format(judge=judge).rstrip("\n").splitlines()


def _portable_spec(spec: str, /) -> tuple[str, list[str]]:
    """Return ``spec`` as a reproduction names it, and the lines that make it importable."""
    named = spec in BUILTIN or spec in adapters.ADAPTERS
    if named or spec.startswith(("mutant:", "peer:")) or ":" not in spec:
        return spec, []
    module_name, _, attr = spec.rpartition(":")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        return f"{Path(module_name).expanduser().resolve()}:{attr}", []
    return spec, ["import sys", f"sys.path.insert(0, {os.getcwd()!r})  # where --impl was found"]


def reproduction(
    impl_spec: str,
    backend: str,
    case: Case | Record,
    /,
    *,
    autograd: str | None = None,
    kind: str = "kl-div",
    style_options: dict[str, Any] | None = None,
) -> str:
    """Return a Python snippet that replays the failing call and shows the discrepancy.

    It rebuilds the operands exactly (values, dtype, shape), calls the
    implementation with the failing ``reduction`` and ``log_target``, prints
    what it got beside what is expected (the exact oracle's values, gradients,
    error class or warnings) and a last line ``verdict: agrees`` or ``verdict:
    differs: ...``, judged as the property judges. ``case`` is the
    :class:`.context.Record` of the last call (a bare :class:`Case` is replayed
    as a forward call); ``autograd`` says how gradients are taken (``'torch'``,
    ``'jax'``, or None for the implementation's ``backward``); ``kind`` and
    ``style_options`` are what the implementation was resolved with. The
    snippet runs from any folder: a ``FILE.py`` is named by its absolute path,
    and a ``MODULE`` is searched where it was found.

    From-logits failures replay a ``from_logits`` call (``x`` the student
    logits, ``t`` the teacher's, its options and mask) and Gaussian failures a
    ``gaussian`` call (``x`` is ``mu``, ``t`` is ``logvar``, and the priors), judged
    by the ``assert_*`` function the property uses (of :mod:`.checks_logits` or
    :mod:`.checks_gaussian`).
    """
    record = case if isinstance(case, Record) else Record(case)
    c = record.case
    spec, path_lines = _portable_spec(impl_spec)
    arguments = [repr(spec)]
    if kind != "kl-div":
        arguments.append(f"kind={kind!r}")
    arguments += [f"{k}={v!r}" for k, v in (style_options or {}).items()]
    resolved = f"resolve({', '.join(arguments)})"
    if record.kind.startswith("hidden"):
        head = [
            *path_lines,
            "import numpy as np",
            "from kldiv_spec.conformance import load_backend, resolve",
            f"backend = load_backend({backend!r})",
            f"impl = {resolved}",
        ]
        return "\n".join(head + checks_hidden.reproduction_lines(record, autograd))
    if record.kind.startswith(("logits", "gaussian")):
        checks = "checks_logits" if record.kind.startswith("logits") else "checks_gaussian"
        head = [
            *path_lines,
            "import numpy as np",
            f"from kldiv_spec.conformance import {checks} as judge",
            "from kldiv_spec.conformance import load_backend, oracle_logits as oracle, resolve",
            f"backend = load_backend({backend!r})",
            f"impl = {resolved}",
            f"x = {_literal(c.input)}",
            f"t = {_literal(c.target)}",
            *_SHOW.rstrip("\n").splitlines(),
        ]
        if record.kind.startswith("logits"):
            return "\n".join(head + _logits_lines(record, autograd))
        return "\n".join(head + _gaussian_lines(record, autograd))
    head = [
        *path_lines,
        "import warnings",
        "import numpy as np",
        "from kldiv_spec.conformance import load_backend, oracle, resolve",
        "from kldiv_spec.conformance.assertions import assert_gradients, assert_loss",
        f"backend = load_backend({backend!r})",
        f"impl = {resolved}",
        f"x = {_literal(c.input)}",
        f"t = {_literal(c.target)}",
        f"kw = dict(reduction={c.reduction!r}, log_target={c.log_target!r})",
        *_SHOW.rstrip("\n").splitlines(),
    ]
    if record.kind == "gradient":
        body = _gradient_lines(record, autograd)
    elif record.kind == "double_backward":
        body = _double_backward_lines()
    elif record.kind == "error":
        body = _error_lines(record)
    elif record.kind == "warning":
        body = _warning_lines()
    elif record.kind == "signed_zeros":  # values as the forward replay, and their zeros' signs
        judged = "dtype=np.result_type(x, t))"
        body = [
            line.replace(judged, "dtype=np.result_type(x, t), signed_zeros=True)")
            for line in _forward_lines(record)
        ]
    elif record.kind == "signed_zeros_gradient":  # one verdict: the values, then the signs
        body = [
            line.replace("print('verdict:  agrees')", "values = 'agree'").replace(
                "print('verdict:  differs:', exc)", "values = f'differ: {exc}'"
            )
            for line in _gradient_lines(record, autograd)
        ]
        body += _SIGN_LINES.rstrip("\n").splitlines()
    else:
        body = _forward_lines(record)
    return "\n".join(head + body)


def _settings(max_examples: int, shrink: bool) -> settings:
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    if shrink:
        phases.append(Phase.shrink)
    return settings(
        max_examples=max(1, max_examples),
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        report_multiple_bugs=False,
        phases=phases,
        print_blob=False,
    )


@contextlib.contextmanager
def _seeded_draws_only() -> Iterator[None]:
    """Make a seeded run's draws depend on the seed and the strategies alone.

    Hypothesis (6.13x and later) draws, now and then, a literal constant collected
    from every imported module outside site-packages: the checked implementation's
    own module, a user's script, this package in an editable install. The same seed
    then gives other cases on another machine, or after an unrelated edit to any of
    them, and a verdict could not be replayed. Within the run the collection returns
    nothing (Hypothesis's own constants still take part); where the internal hook is
    absent (another Hypothesis version), nothing changes.
    """
    try:
        from hypothesis.internal.conjecture import providers
    except ImportError:  # pragma: no cover - a Hypothesis without providers
        yield
        return
    original = getattr(providers, "_get_local_constants", None)
    empty = getattr(providers, "Constants", None)
    cache = getattr(providers, "CONSTANTS_CACHE", None)
    if original is None or empty is None:
        yield
        return

    def clear() -> None:
        with contextlib.suppress(AttributeError):
            cache.cache.clear()  # type: ignore[union-attr]

    providers._get_local_constants = empty  # a fresh, empty set per call
    clear()
    try:
        yield
    finally:
        providers._get_local_constants = original
        clear()


def _describe_failure(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, AssertionError) and text:
        return text.splitlines()[0]
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def run_property(
    prop: Property,
    ctx: Context,
    /,
    *,
    impl_spec: str,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
    seed: int | None = 0,
    shrink: bool = True,
    kind: str = "kl-div",
    style_options: dict[str, Any] | None = None,
) -> Outcome:
    """Run one property and return its outcome.

    A property whose subject (``kl_div``, ``from_logits``, ``gaussian``) the
    implementation has no function for is n/a. ``kind`` is the ``--kind``
    ``impl_spec`` is resolved with (for the reproduction).
    """
    start = time.perf_counter()
    outcome = Outcome(prop.name, prop.group, prop.description, "pass", level=prop.level)
    reason = prop.applies(ctx) if prop.applies is not None else None
    if ctx.impl.function(prop.subject) is None:
        reason = f"{ctx.impl.name} has no {prop.subject} function"
    if ctx.impl.backends is not None and ctx.backend.name not in ctx.impl.backends:
        reason = f"{ctx.impl.name} runs on {', '.join(ctx.impl.backends)} only"
    for key in (prop.name, prop.group):
        if key in ctx.impl.not_applicable:
            reason = ctx.impl.not_applicable[key]
    if reason is not None:
        outcome.status, outcome.reason = "n/a", reason
        return outcome
    state: dict[str, Any] = {"n": 0, "last": None, "na": None, "skipped": 0}
    autograd = ctx.backend.autograd if ctx.impl.differentiable else None

    def failure(exc: BaseException, drawn: Case | None) -> Failure:
        # The failing call: the last one the property made (its reduction and
        # log_target, not the drawn case's), else the drawn case.
        found = Failure(_describe_failure(exc))
        record = ctx.last if ctx.last is not None else drawn
        if record is not None:
            last = record.case if isinstance(record, Record) else record
            if prop.subject == "kl_div":
                found.counterexample = (
                    f"{last.describe()}\n  input  = {last.input.tolist()!r}\n"
                    f"  target = {last.target.tolist()!r}"
                )
            else:
                found.counterexample = checks_logits.describe(last)
            found.reproduction = reproduction(
                impl_spec,
                ctx.backend.name,
                record,
                autograd=autograd,
                kind=kind,
                style_options=style_options,
            )
        return found

    def once(case: Case) -> None:
        state["n"] += 1
        state["last"] = case
        ctx.last = None
        try:
            prop.check(ctx, case)
        except NotApplicable as exc:
            state["na"] = state["na"] or str(exc)
            state["skipped"] += 1

    failures: list[Failure] = []
    try:
        if prop.strategy is not None:
            n = max(1, round(max_examples * prop.examples_scale))
            test = settings(_settings(n, shrink))(given(prop.strategy(ctx))(once))
            if seed is not None:
                test = hypothesis_seed(seed)(test)
            try:
                with _seeded_draws_only():
                    test()
            except Exception as exc:
                if environment_failure(exc) is not None:
                    raise
                failures.append(failure(exc, state["last"]))
        else:
            assert prop.cases is not None
            # Every fixed case runs: one failure per distinct cause is kept.
            seen: set[str] = set()
            for case in prop.cases(ctx):
                try:
                    once(case)
                except Exception as exc:
                    if environment_failure(exc) is not None:
                        raise
                    found = failure(exc, case)
                    key = _failure_key(found.reason, found.reproduction)
                    if key not in seen:
                        seen.add(key)
                        failures.append(found)
    except NotApplicable as exc:  # raised while building the strategy or cases
        state["na"] = str(exc)
        state["skipped"] = state["n"] = max(state["n"], 1)
    except Exception as exc:
        why = environment_failure(exc)
        if why is None:
            failures.append(failure(exc, state["last"]))
        else:
            outcome.status, outcome.reason = "error", f"could not run: {why}"
    if outcome.status != "error" and failures:
        outcome.status = "fail"
        outcome.failures = failures
        first = failures[0]
        outcome.reason = first.reason
        outcome.counterexample = first.counterexample
        outcome.reproduction = first.reproduction
    outcome.examples = state["n"] - state["skipped"]
    if outcome.status == "pass" and state["na"] is not None:
        if outcome.examples <= 0:
            outcome.status, outcome.reason = "n/a", state["na"]
            outcome.examples = 0
        else:
            outcome.unsupported = state["skipped"]
            outcome.reason = f"{state['skipped']} case(s) n/a: {state['na']}"
    outcome.seconds = time.perf_counter() - start
    return outcome


def _failure_key(reason: str, reproduction: str) -> str:
    """Return what makes two failures of one property distinct: the reason without numbers.

    The reduction named in the reason or in the reproduction's call is part of
    it, so one wrong divisor under three reductions is three failures.
    """
    text = re.sub(r"[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", "#", reason.splitlines()[0])
    reduction = re.search(r"reduction='(\w+)'", reproduction)
    return text + (f" [{reduction.group(1)}]" if reduction else "")


def run(
    impl: str | Implementation,
    backend: str,
    /,
    *,
    groups: Iterable[str] | None = None,
    names: Iterable[str] | None = None,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
    seed: int | None = 0,
    shrink: bool = True,
    progress: Callable[[str, Outcome | None], None] | None = None,
    kind: str = "kl-div",
    style_options: dict[str, Any] | None = None,
) -> Report:
    """Run the selected properties for ``impl`` on ``backend`` and return the report.

    ``impl`` is an :class:`Implementation` or a spec for :func:`.resolve`
    (with ``kind``). ``progress(property_name, outcome_or_None)`` is called
    before and after each property.
    """
    if isinstance(impl, str):
        spec, implementation = impl, resolve(impl, kind=kind, **(style_options or {}))
    else:
        spec, implementation = impl.name, impl
    report = Report(implementation.name, backend, max_examples, seed)
    report.version = implementation.version
    if implementation.backends is not None and backend not in implementation.backends:
        report.status = "n/a"
        report.reason = f"{implementation.name} runs on {', '.join(implementation.backends)} only"
        return report
    try:
        be = load_backend(backend)
    except BackendUnavailable as exc:
        report.status, report.reason = "n/a", str(exc)
        return report
    ctx = Context(implementation, be)
    for prop in select(groups, names):
        if progress is not None:
            progress(prop.name, None)
        outcome = run_property(
            prop,
            ctx,
            impl_spec=spec,
            max_examples=max_examples,
            seed=seed,
            shrink=shrink,
            kind=kind if isinstance(impl, str) else "kl-div",
            style_options=style_options,
        )
        report.outcomes.append(outcome)
        if progress is not None:
            progress(prop.name, outcome)
    report.status = "fail" if report.failed else "pass"
    if report.status == "pass" and report.could_not_run:
        report.status = "error"
        report.reason = next(o.reason for o in report.outcomes if o.status == "error")
    report.should_status = "fail" if report.should_failed else "pass"
    return report
