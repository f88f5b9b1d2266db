"""Run an implementation where it cannot end or hang the check.

An implementation under test is arbitrary code: it may raise :class:`SystemExit`,
call :func:`os._exit`, crash the interpreter or never return. Two layers turn
each of these into a reported failure of the property that was running:

- :func:`guard` wraps the implementation's functions. Inside a call,
  ``SystemExit``, ``KeyboardInterrupt``, ``GeneratorExit`` (any
  :class:`BaseException` that is not an :class:`Exception`) becomes an
  :class:`ImplementationError`, and a call that runs past its time limit is
  interrupted with :class:`CallTimeout` (``SIGALRM``, in the main thread where
  the platform has it). Both are :class:`AssertionError` subclasses: what a
  property reports as a failure, never as an accepted refusal.
- :func:`run_isolated` runs :func:`.runner.run` in a child process that streams
  its outcomes over a pipe of its own (the implementation's prints go
  elsewhere). When the child dies (``os._exit``, a signal, a segmentation
  fault) or stops answering (a hang in C code the alarm cannot interrupt), the
  property in progress fails with the cause and a fresh child runs the
  remaining properties.

The child runs ``_child_main`` (``python -c "from kldiv_spec.conformance.isolation
import _child_main; _child_main()"``, the same as ``python -m
kldiv_spec.conformance.isolation`` without importing this module twice), its
arguments as JSON on stdin. Its stdout and stderr (the implementation's prints,
faulthandler's traceback of a crash or a hang) go to a temporary file, whose end
is shown with a failure of a dead child. It writes one JSON object a line to the
file descriptor it is given (``pass_fds``):

- ``{"event": "resolved", "name": ..., "version": ..., "backends": [...] or
  null, "backend": INFERRED or null}`` once the implementation is loaded (all
  :func:`probe` waits for), or ``{"event": "resolve_error", "message": ...,
  "missing": ...}`` when it cannot be (then it exits);
- ``{"event": "start", "name": PROPERTY}`` before each property and
  ``{"event": "outcome", "outcome": {...}}`` (``dataclasses.asdict`` of the
  :class:`.runner.Outcome`) after it;
- ``{"event": "call", "call": "fn(float64[2, 3], ...)"}`` when a call of the
  implementation begins and ``{"event": "return"}`` when it ends (how the
  parent tells a hang in a call from slow suite code);
- ``{"event": "aborted", "reason": ...}`` when something escaped the
  property, then it exits;
- ``{"event": "done", "report": {...}}`` (``Report.as_dict()``) last.

Anything else the child does before its ``done`` line (any exit status, 0
too) is a failure of the property in progress, never a pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from typing import IO, Any

from . import runner
from .catalog import PROPERTIES
from .catalog import select as select_properties
from .implementations import Implementation
from .namespaces import infer_backend
from .runner import DEFAULT_MAX_EXAMPLES, Outcome, Report, ResolveError

__all__ = [
    "CALLABLES",
    "DEFAULT_TIMEOUT",
    "CallTimeout",
    "ImplementationError",
    "Loaded",
    "Monitor",
    "ResolveError",
    "describe_call",
    "guard",
    "probe",
    "run_isolated",
]

#: The per-call time limit in seconds (``--timeout``).
DEFAULT_TIMEOUT = 60.0

#: The fields of :class:`.Implementation` that hold the implementation's own code.
CALLABLES: tuple[str, ...] = (
    "fn",
    "backward",
    "from_logits",
    "from_logits_backward",
    "gaussian",
    "gaussian_backward",
    "unsupported",
)

#: After a call of a property timed out, its later calls get this fraction of
#: the limit (at least :data:`_RETRY_FLOOR` seconds): hypothesis replays and
#: shrinks a failing example, and each replay of a hang would cost the full limit.
_RETRY_FRACTION = 0.1
_RETRY_FLOOR = 1.0
#: Once calls of one property have spent this many limits timing out, its later
#: calls are not made: they fail at once with the same message.
_TIMEOUT_BUDGET = 2.0
#: The parent kills a child whose call has not returned ``timeout`` + this
#: (at least :data:`_GRACE_FLOOR` s) after it began: the alarm could not interrupt it.
_GRACE_FRACTION = 0.5
_GRACE_FLOOR = 5.0
#: The parent kills a child that sent nothing for ``timeout * factor + margin``
#: seconds while no call was running (loading, suite code, a hang outside a call).
_SILENCE_FACTOR = 2.0
_SILENCE_MARGIN = 60.0
#: Lines of the child's output shown with a failure of a dead child.
_TAIL_LINES = 20


class ImplementationError(AssertionError):
    """The implementation raised a ``BaseException`` that is not an ``Exception``.

    ``SystemExit``, ``KeyboardInterrupt`` or ``GeneratorExit`` from a call would
    end the check; a call must return or raise an :class:`Exception`. An
    :class:`AssertionError`, so properties report it as a failure (and never
    accept it as a refusal of invalid arguments).
    """


class CallTimeout(AssertionError):  # noqa: N818 (a verdict, not an error)
    """A call of the implementation did not return within its time limit."""


def _check_timeout(timeout: float, /) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        msg = f"timeout must be a number of seconds, got {timeout!r}"
        raise TypeError(msg)
    if not (timeout > 0 and math.isfinite(timeout)):
        msg = f"timeout must be a positive number of seconds, got {timeout!r}"
        raise ValueError(msg)
    return float(timeout)


def _timeout_message(timeout: float) -> str:
    return f"the call did not return within {timeout:g} s (--timeout)"


def _describe_value(value: Any) -> str:
    """Return a short description of one argument: ``float32[2, 3]``, ``'sum'``, ``list``."""
    try:
        shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
        if shape is not None and dtype is not None:
            name = str(dtype).removeprefix("torch.")
            return f"{name}{list(shape)}"
        if value is None or isinstance(value, (bool, int, float, str)):
            text = repr(value)
            return text if len(text) <= 40 else text[:37] + "..."
        return type(value).__name__
    except Exception:
        return "?"


def describe_call(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], /) -> str:
    """Return one line naming a call: ``fn(float64[2, 3], float64[2, 3], reduction='sum')``."""
    parts = [_describe_value(a) for a in args]
    parts += [f"{k}={_describe_value(v)}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


class Monitor:
    """What the guarded calls of one property did, and who hears of each call.

    :func:`guard` reports each call to it. It keeps the first failure the guard
    raised (:attr:`failure`) until :meth:`reset`, so a property that caught
    the error (``except Exception``) is still reported as failing, and it
    shortens the time limit of the calls after a timeout (see
    :data:`_RETRY_FRACTION`, :data:`_TIMEOUT_BUDGET`).

    Parameters
    ----------
    emit : callable, optional
        ``emit(event)`` with ``{"event": "call", "call": DESCRIPTION}`` when a
        call begins and ``{"event": "return"}`` when it ends.
    """

    def __init__(self, emit: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.emit = emit
        self.failure: str | None = None
        self.timed_out = 0.0
        self.timeouts = 0
        self.timed_out_call = ""

    def reset(self) -> None:
        """Forget the failures: a new property begins."""
        self.failure = None
        self.timed_out = 0.0
        self.timeouts = 0
        self.timed_out_call = ""

    def limit(self, timeout: float, /) -> float | None:
        """Return the time limit of the next call, or None when it must not be made."""
        if self.timeouts == 0:
            return timeout
        if self.timed_out >= _TIMEOUT_BUDGET * timeout:
            return None
        return min(timeout, max(_RETRY_FLOOR, _RETRY_FRACTION * timeout))

    def enter(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], /) -> None:
        """Report that a call begins."""
        if self.emit is not None:
            self.emit({"event": "call", "call": describe_call(name, args, kwargs)})

    def exit(self) -> None:
        """Report that the call ended (it returned or raised)."""
        if self.emit is not None:
            self.emit({"event": "return"})

    def failed(self, message: str, /, *, timed_out: float = 0.0, call: str = "") -> None:
        """Record that the guard raised ``message``.

        ``timed_out`` is the limit that ran out, if one did, and ``call`` that call.
        """
        if self.failure is None:
            self.failure = message
        if timed_out:
            if not self.timeouts:
                self.timed_out_call = call
            self.timeouts += 1
            self.timed_out += timed_out


def _alarm_available() -> bool:
    return (
        hasattr(signal, "SIGALRM")
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )


class _Alarm:
    """A one-shot ``SIGALRM`` that raises :class:`CallTimeout` after ``seconds``.

    A timer already running (an enclosing guarded call, pytest-timeout) keeps its
    deadline: the earlier of the two fires first, the outer one through its own
    handler, and the outer timer is re-armed with what is left of it on exit.
    """

    def __init__(self, seconds: float, message: str) -> None:
        self.seconds = seconds
        self.message = message
        self.fired = False
        self.armed = False
        self.outer_fired = False
        self.old_handler: Any = None
        self.outer: tuple[float, float] | None = None
        self.deadline = self.outer_deadline = 0.0

    def __enter__(self) -> _Alarm:
        if not _alarm_available():
            return self
        now = time.monotonic()
        self.deadline = now + self.seconds
        old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, 0)
        if old_delay > 0:
            self.outer = (old_delay, old_interval)
            self.outer_deadline = now + old_delay
        self.armed = True
        self.old_handler = signal.signal(signal.SIGALRM, self._handle)
        delay = self.seconds if self.outer is None else min(self.seconds, old_delay)
        signal.setitimer(signal.ITIMER_REAL, max(delay, 1e-6))
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        outer_first = self.outer is not None and self.outer_deadline <= self.deadline
        if outer_first and not self.outer_fired:
            # The enclosing timer's deadline came first (it was armed): its handler decides.
            self.outer_fired = True
            if callable(self.old_handler):
                self.old_handler(signum, frame)
            # It did not raise: keep our own deadline.
            signal.setitimer(signal.ITIMER_REAL, max(self.deadline - time.monotonic(), 1e-6))
            return
        if self.fired:
            return
        self.fired = True
        raise CallTimeout(self.message)

    def __exit__(self, *exc_info: object) -> None:
        if not self.armed:
            return
        self.armed = False
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            handler = self.old_handler if self.old_handler is not None else signal.SIG_DFL
            signal.signal(signal.SIGALRM, handler)
            if self.outer is not None and not self.outer_fired:
                left = self.outer_deadline - time.monotonic()
                signal.setitimer(signal.ITIMER_REAL, max(left, 1e-6), self.outer[1])


def _wrap(
    fn: Callable[..., Any], name: str, timeout: float, monitor: Monitor | None
) -> Callable[..., Any]:
    """Return ``fn`` guarded: see :func:`guard`."""

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        limit = timeout if monitor is None else monitor.limit(timeout)
        if limit is None:  # earlier calls of this property timed out: do not wait again
            assert monitor is not None
            msg = (
                f"a call did not return within {timeout:g} s (--timeout): "
                f"{monitor.timed_out_call}; the property's later calls were not made"
            )
            raise CallTimeout(msg)
        message = _timeout_message(limit)
        if limit < timeout:
            message += f" (cut from {timeout:g} s after an earlier call timed out)"
        if monitor is not None:
            monitor.enter(name, args, kwargs)
        alarm = _Alarm(limit, message)
        try:
            with alarm:
                try:
                    result = fn(*args, **kwargs)
                except CallTimeout:
                    raise
                except Exception as exc:
                    if alarm.fired:  # the implementation caught CallTimeout and raised another
                        raise CallTimeout(message) from exc
                    raise
                except BaseException as exc:
                    if alarm.fired:
                        raise CallTimeout(message) from exc
                    msg = (
                        f"the implementation raised {exc!r} (a call must return or raise "
                        "an Exception)"
                    )
                    raise ImplementationError(msg) from exc
            if alarm.fired:  # it caught CallTimeout and returned anyway
                raise CallTimeout(message)
            return result
        except (CallTimeout, ImplementationError) as exc:
            if monitor is not None:
                timed_out = isinstance(exc, CallTimeout)
                monitor.failed(
                    str(exc),
                    timed_out=limit if timed_out else 0.0,
                    call=describe_call(name, args, kwargs) if timed_out else "",
                )
            raise
        finally:
            if monitor is not None:
                monitor.exit()

    return guarded


def guard(
    impl: Implementation, /, *, timeout: float = DEFAULT_TIMEOUT, monitor: Monitor | None = None
) -> Implementation:
    """Return ``impl`` with each of its functions guarded.

    A guarded function calls the original (plain Python, so torch autograd and
    jax tracing go through it; attributes such as ``backward`` are kept by
    :func:`functools.wraps`) and:

    - turns a ``BaseException`` that is not an ``Exception`` (``SystemExit``,
      ``KeyboardInterrupt``, ``GeneratorExit``) into :class:`ImplementationError`;
    - in the main thread, where the platform has ``SIGALRM``, interrupts a call
      that runs longer than ``timeout`` seconds with :class:`CallTimeout`, also
      when the implementation catches it and returns or raises something else.
      The previous ``SIGALRM`` handler and timer are restored afterwards (a timer
      that was running keeps its deadline, so nested guarded calls are limited
      by the outermost). Elsewhere no call is interrupted: :func:`run_isolated`'s
      watchdog ends the process instead.

    Parameters
    ----------
    impl : Implementation
        The implementation under test.
    timeout : float
        The per-call time limit in seconds (``--timeout``).
    monitor : Monitor, optional
        Told of each call and each failure (see :class:`Monitor`).

    Returns
    -------
    Implementation
        A copy of ``impl`` whose functions (:data:`CALLABLES`) are guarded.
    """
    timeout = _check_timeout(timeout)
    wrapped = {
        name: _wrap(fn, name, timeout, monitor)
        for name in CALLABLES
        if (fn := getattr(impl, name, None)) is not None
    }
    return dataclasses.replace(impl, **wrapped)


# --------------------------------------------------------------------------- the parent


def _outcome_from_dict(data: dict[str, Any], /) -> Outcome:
    """Rebuild an :class:`.Outcome` sent by the child (nested failures included)."""
    names = {f.name for f in dataclasses.fields(Outcome)}
    values = {k: v for k, v in data.items() if k in names}
    failure_type = getattr(runner, "Failure", None)
    if failure_type is not None and isinstance(values.get("failures"), list):
        values["failures"] = [failure_type(**f) for f in values["failures"]]
    return Outcome(**values)


def _report_from_dict(data: dict[str, Any], /) -> Report:
    """Rebuild a :class:`.Report` sent by the child."""
    names = {f.name for f in dataclasses.fields(Report)}
    values = {k: v for k, v in data.items() if k in names}
    values["outcomes"] = [_outcome_from_dict(o) for o in values.get("outcomes", [])]
    return Report(**values)


def _finish(report: Report, /) -> None:
    """Set the report's statuses from its outcomes, as :func:`.runner.run` does."""
    report.status = "fail" if report.failed else "pass"
    if report.status == "pass" and getattr(report, "could_not_run", False):
        report.status = "error"
        report.reason = next(o.reason for o in report.outcomes if o.status == "error")
    report.should_status = "fail" if report.should_failed else "pass"


def _exit_cause(returncode: int, /) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"the process was killed by signal {name}"
    return f"the process ended with exit status {returncode}"


def _tail(output: IO[bytes], /) -> str:
    """Return the end of what the child printed: from its last fatal error, else its last lines."""
    try:
        output.flush()
        size = output.seek(0, os.SEEK_END)
        output.seek(max(0, size - 16384))
        text = output.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return ""
    fatal = text.rfind("Fatal Python error")
    if fatal >= 0:
        text = text[fatal:]
    lines = [
        line.rstrip()
        for line in text.splitlines()
        if line.strip() and not line.startswith("Extension modules:")
    ]
    return "\n".join(lines[: _TAIL_LINES * 2] if fatal >= 0 else lines[-_TAIL_LINES:])


class _Child:
    """One child process running properties and the state of its stream."""

    def __init__(self, request: dict[str, Any], output: IO[bytes]) -> None:
        read_fd, write_fd = os.pipe()
        request = {**request, "fd": write_fd}
        code = "from kldiv_spec.conformance.isolation import _child_main; _child_main()"
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", code],
                stdin=subprocess.PIPE,
                stdout=output,
                stderr=output,
                pass_fds=(write_fd,),
                start_new_session=True,  # Ctrl-C reaches the parent only; killpg ends it all
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.fd = read_fd
        self.buffer = b""
        self.eof = False
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(request).encode())
            self.process.stdin.close()
        except OSError:  # it died at once: its exit status says so
            pass

    def events(self, wait: float, /) -> list[dict[str, Any]]:
        """Return the events that arrive within ``wait`` seconds (none at EOF)."""
        if self.eof:
            return []
        ready, _, _ = select.select([self.fd], [], [], max(wait, 0.0))
        if not ready:
            return []
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            self.eof = True
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    out.append(event)
        return out

    def kill(self) -> None:
        """End the child and what it started: its Python traceback first, then SIGKILL."""
        if self.process.returncode is None:
            with contextlib.suppress(OSError):
                os.kill(self.process.pid, signal.SIGUSR1)  # faulthandler's traceback
                time.sleep(0.3)
            # Not reaped yet (at worst a zombie), so its process group is still its own.
            with contextlib.suppress(OSError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def close(self) -> None:
        """Reap the child (ending it if it does not end by itself) and close the pipe."""
        if self.process.returncode is None:
            try:
                self.process.wait(5.0)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def run_isolated(
    spec: str,
    backend: str,
    /,
    *,
    kind: str = "kl-div",
    groups: Iterable[str] | None = None,
    names: Iterable[str] | None = None,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
    seed: int | None = 0,
    shrink: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[str, Outcome | None], None] | None = None,
    style_options: dict[str, Any] | None = None,
) -> Report:
    """Run :func:`.runner.run` for ``spec`` in a child process; return the same report.

    The child loads the implementation (with the parent's ``sys.path`` in front
    of its own, in the same directory), wraps it with :func:`guard` (per-call
    limit ``timeout``) and runs the selected properties one by one. When it dies
    (``os._exit``, any exit status before it is done, a signal, a segmentation
    fault) or stops answering (a call still running ``timeout`` plus a grace
    period after it began, or nothing heard for ``timeout * 2 + 60`` seconds
    outside a call), the property in progress fails with the cause (the call
    that was running, the child's last output) and a new child runs the
    properties left. A well-behaved implementation gets the report
    :func:`.runner.run` gives (but for the ``seconds``).

    Parameters
    ----------
    spec : str
        What :func:`.runner.resolve` takes (``reference``, ``mutant:NAME``,
        ``MODULE:CALLABLE``, ...).
    backend : str
        The backend's name.
    kind, groups, names, max_examples, seed, shrink, progress, style_options
        As :func:`.runner.run` (``style_options`` only where it takes them).
    timeout : float
        The per-call time limit in seconds (``--timeout``; default :data:`DEFAULT_TIMEOUT`).

    Returns
    -------
    Report
        The report of every selected property.

    Raises
    ------
    ResolveError
        One line: ``spec`` cannot be loaded (a missing module, an exception or
        an exit while importing it, a bad spec). ``missing`` names a module
        that is not installed, when that is why.
    """
    if os.name != "posix":  # pragma: no cover - pass_fds and process groups are POSIX
        msg = "run_isolated needs a POSIX system (pass_fds, process groups)"
        raise NotImplementedError(msg)
    timeout = _check_timeout(timeout)
    remaining = [p.name for p in select_properties(groups, names)]
    request = {
        "spec": spec,
        "backend": backend,
        "kind": kind,
        "max_examples": max_examples,
        "seed": seed,
        "shrink": shrink,
        "timeout": timeout,
        "style_options": style_options or None,
        "path": [p for p in sys.path if isinstance(p, str)],
    }
    header: Report | None = None
    outcomes: list[Outcome] = []
    first = True
    while first or remaining:
        with tempfile.TemporaryFile() as output:
            child = _Child({**request, "names": remaining}, output)
            try:
                result = _serve(child, output, spec, remaining, timeout, progress, first=first)
            except ResolveError:  # the child ends by itself
                raise
            except BaseException:  # KeyboardInterrupt, a failing progress callback
                child.kill()
                raise
            finally:
                child.close()
        first = False
        if header is None and result.name is not None:
            header = Report(result.name, backend, max_examples, seed)
            if hasattr(header, "version"):
                header.version = result.version
        if result.final is not None:
            if not outcomes:
                return result.final  # one child ran everything: runner.run's report as is
            header = result.final
            outcomes += result.final.outcomes
            break
        outcomes += result.outcomes
        done = {o.name for o in result.outcomes}
        remaining = [n for n in remaining if n not in done]
    assert header is not None  # the first child loaded it, or ResolveError was raised
    header.outcomes = outcomes
    _finish(header)
    return header


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What :func:`probe` learnt of an implementation, loaded in a child process.

    Attributes
    ----------
    name : str
        How reports name it (:attr:`.Implementation.name`).
    backends : tuple of str or None
        The backends it runs on (None: any).
    backend : str or None
        The backend inferred from its module (:func:`.namespaces.infer_backend`), if any.
    version : str
        Its library's version (``""``: not a library release).
    """

    name: str
    backends: tuple[str, ...] | None
    backend: str | None
    version: str = ""


def probe(
    spec: str,
    /,
    *,
    kind: str = "kl-div",
    style_options: dict[str, Any] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Loaded:
    """Load ``spec`` in a child process and return what choosing its backends needs.

    What ``kldiv-spec check`` asks before it runs anything (which backends, its
    name), without importing the implementation into the checking process: an
    import that exits, crashes or hangs cannot end the check.

    Raises
    ------
    ResolveError
        One line: ``spec`` cannot be loaded, or loading it ended or hung the
        process (no answer within ``timeout * 2 + 60`` seconds).
    """
    if os.name != "posix":  # pragma: no cover - pass_fds and process groups are POSIX
        msg = "probe needs a POSIX system (pass_fds, process groups)"
        raise NotImplementedError(msg)
    timeout = _check_timeout(timeout)
    request = {
        "spec": spec,
        "backend": "",
        "kind": kind,
        "max_examples": 0,
        "seed": None,
        "shrink": False,
        "timeout": timeout,
        "style_options": style_options or None,
        "path": [p for p in sys.path if isinstance(p, str)],
        "names": [],
        "probe": True,
    }
    silence = timeout * _SILENCE_FACTOR + _SILENCE_MARGIN
    with tempfile.TemporaryFile() as output:
        child = _Child(request, output)
        try:
            deadline = time.monotonic() + silence
            while time.monotonic() < deadline:
                for event in child.events(min(deadline - time.monotonic(), 0.5)):
                    if event.get("event") == "resolved":
                        backends = event.get("backends")
                        return Loaded(
                            str(event.get("name", spec)),
                            None if backends is None else tuple(backends),
                            event.get("backend"),
                            str(event.get("version") or ""),
                        )
                    if event.get("event") == "resolve_error":
                        message = str(event.get("message") or f"cannot load {spec!r}")
                        raise ResolveError(message, missing=event.get("missing"))
                ended = child.eof or child.process.poll() is not None
                # Ended, and nothing it wrote is left to read (a grandchild may hold the pipe).
                if ended and (child.eof or not select.select([child.fd], [], [], 0.2)[0]):
                    child.process.wait()
                    cause = _exit_cause(child.process.returncode)
                    break
            else:
                child.kill()
                cause = f"hung: no answer within {silence:g} s"
        except ResolveError:
            raise
        except BaseException:
            child.kill()
            raise
        finally:
            child.close()
    msg = f"cannot load {spec!r}: {cause} while loading it"
    raise ResolveError(msg)


@dataclasses.dataclass
class _Result:
    """What one child did: the implementation's name, its outcomes, its final report."""

    name: str | None = None
    version: str = ""
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)
    final: Report | None = None


def _serve(
    child: _Child,
    output: IO[bytes],
    spec: str,
    names: list[str],
    timeout: float,
    progress: Callable[[str, Outcome | None], None] | None,
    *,
    first: bool,
) -> _Result:
    """Read one child's events until it is done or dead; fail the property it died in."""
    result = _Result()
    grace = max(_GRACE_FLOOR, _GRACE_FRACTION * timeout)
    silence = timeout * _SILENCE_FACTOR + _SILENCE_MARGIN
    state: dict[str, Any] = {"current": None, "started": time.perf_counter(), "note": None}
    calls: list[tuple[str, float]] = []  # the calls running, outermost first

    def handle(event: dict[str, Any]) -> bool:
        kind = event.get("event")
        if kind == "call":
            calls.append((str(event.get("call", "?")), time.monotonic()))
        elif kind == "return":
            if calls:
                calls.pop()
        elif kind == "resolved":
            result.name = str(event.get("name", spec))
            result.version = str(event.get("version") or "")
        elif kind == "resolve_error":
            message = str(event.get("message") or f"cannot load {spec!r}")
            if first:
                raise ResolveError(message, missing=event.get("missing"))
            state["note"] = f"the implementation could not be loaded again: {message}"
        elif kind == "start":
            state["current"], state["started"] = str(event.get("name")), time.perf_counter()
            calls.clear()
            if progress is not None:
                progress(state["current"], None)
        elif kind == "outcome":
            outcome = _outcome_from_dict(event["outcome"])
            result.outcomes.append(outcome)
            state["current"] = None
            calls.clear()
            if progress is not None:
                progress(outcome.name, outcome)
        elif kind == "aborted":
            state["note"] = str(event.get("reason") or "the check was aborted")
        elif kind == "done":
            result.final = _report_from_dict(event["report"])
            return True
        return False

    heard = time.monotonic()
    while True:
        deadline = calls[0][1] + timeout + grace if calls else heard + silence
        events = child.events(min(deadline - time.monotonic(), 0.5))
        if events:
            heard = time.monotonic()
        for event in events:
            if handle(event):
                return result
        if child.eof or child.process.poll() is not None:
            # It ended: read what it wrote before (a grandchild may hold the pipe open).
            while not child.eof and select.select([child.fd], [], [], 0.2)[0]:
                for event in child.events(0):
                    if handle(event):
                        return result
            child.process.wait()
            cause = _exit_cause(child.process.returncode)
            break
        if time.monotonic() >= deadline:
            if calls:
                limit = timeout + grace
                cause = f"hung: the call did not return within {limit:g} s and was not interrupted"
            else:
                cause = f"hung: no answer within {silence:g} s"
            child.kill()
            break
    current: str | None = state["current"]
    note: str | None = state["note"]
    if result.name is None and first:
        raise ResolveError(f"cannot load {spec!r}: {note or cause} while loading it")
    if result.name is None:
        where = "while loading the implementation again"
    elif calls:
        where = "while the implementation was being called"
    elif current is not None:
        where = "during this property, outside a call of the implementation"
    else:
        where = "between properties"
    if note is not None:
        reason = f"{note} ({cause})"
    elif cause.startswith("hung"):
        reason = f"{cause} ({where})"
    else:
        crash = "os._exit or a crash" if child.process.returncode >= 0 else "a crash"
        reason = f"{cause} {where} ({crash})"
    lines = []
    if calls:
        lines.append(f"the call: {calls[-1][0]}")
    tail = _tail(output)
    if tail:
        lines.append("the process's last output:")
        lines += ["    " + x for x in tail.splitlines()]
    done = {o.name for o in result.outcomes}
    # The property in progress, else the next one (it died before announcing it),
    # else none is left: fail the run with an outcome of its own.
    name = current or next((n for n in names if n not in done), "hygiene.process")
    prop = PROPERTIES.get(name)
    if current is None and progress is not None:
        progress(name, None)
    outcome = Outcome(
        name,
        prop.group if prop is not None else "hygiene",
        prop.description if prop is not None else "the check's process runs to its end",
        "fail",
        reason=reason,
        counterexample="\n".join(lines),
        seconds=time.perf_counter() - state["started"],
        level=prop.level if prop is not None else "MUST",
    )
    result.outcomes.append(outcome)
    if progress is not None:
        progress(name, outcome)
    return result


# --------------------------------------------------------------------------- the child


def _child_main() -> None:
    """Run the properties the parent asks for (JSON on stdin); report on the given fd."""
    import faulthandler

    request = json.loads(sys.stdin.read())
    fd = int(request["fd"])
    os.set_inheritable(fd, False)  # not for the implementation's own subprocesses
    lock = threading.Lock()

    def emit(event: dict[str, Any]) -> None:
        data = (json.dumps(event) + "\n").encode()
        with lock:
            while data:
                data = data[os.write(fd, data) :]

    faulthandler.enable(all_threads=True)
    if hasattr(faulthandler, "register") and hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    for path in reversed(request["path"]):
        if path not in sys.path:
            sys.path.insert(0, path)
    spec, kind = request["spec"], request["kind"]
    style_options = request.get("style_options") or {}
    resolve = runner.resolve
    try:
        impl = resolve(spec, kind=kind, **style_options)
    except BaseException as exc:
        missing = getattr(exc, "missing", None)
        if missing is None and isinstance(exc, ImportError):
            missing = exc.name
        if isinstance(exc, ValueError) and str(exc):
            message = str(exc).strip().splitlines()[0]
        else:
            text = str(exc).strip().splitlines()
            what = f"{type(exc).__name__}: {text[0]}" if text else repr(exc)
            message = f"cannot load {spec!r}: loading it raised {what}"
        emit({"event": "resolve_error", "message": message, "missing": missing})
        os._exit(0)
    inferred = None
    with contextlib.suppress(Exception):
        inferred = infer_backend(impl.primary)
    emit(
        {
            "event": "resolved",
            "name": impl.name,
            "version": getattr(impl, "version", ""),
            "backends": None if impl.backends is None else list(impl.backends),
            "backend": inferred,
        }
    )
    if request.get("probe"):
        os._exit(0)
    monitor = Monitor(emit)
    guarded = guard(impl, timeout=float(request["timeout"]), monitor=monitor)

    def resolve_guarded(_spec: str, /, **_: Any) -> Implementation:
        return guarded

    def progress(name: str, outcome: Outcome | None) -> None:
        if outcome is None:
            monitor.reset()
            emit({"event": "start", "name": name})
            return
        if monitor.failure is not None and outcome.status != "fail":
            # The property caught the guard's error (``except Exception``): still a failure.
            outcome.status, outcome.reason = "fail", monitor.failure
        emit({"event": "outcome", "outcome": dataclasses.asdict(outcome)})

    runner.resolve = resolve_guarded  # run() resolves spec: give it the guarded one
    names = request["names"] or ["\0"]  # no names: nothing (select() takes [] as all)
    extra = {"style_options": style_options} if style_options else {}
    try:
        report = runner.run(
            spec,
            request["backend"],
            names=names,
            max_examples=int(request["max_examples"]),
            seed=request["seed"],
            shrink=bool(request["shrink"]),
            progress=progress,
            kind=kind,
            **extra,
        )
    except BaseException as exc:  # escaped a property (outside the guarded calls)
        text = str(exc).strip().splitlines()
        what = f"{type(exc).__name__}: {text[0]}" if text else repr(exc)
        emit({"event": "aborted", "reason": f"the check was ended by {what}"})
        os._exit(3)
    finally:
        runner.resolve = resolve
    emit({"event": "done", "report": report.as_dict()})
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(0)  # not atexit handlers or threads the implementation left behind


if __name__ == "__main__":  # pragma: no cover - the child process
    from kldiv_spec.conformance.isolation import _child_main as _main

    _main()
