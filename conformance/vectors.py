r"""Golden vectors: the conformance suite as data, for implementations in any language.

:func:`export` writes the cases of :mod:`.vectors_cases` (edge table, reductions,
0-d, empty, broadcasting, dtypes, subnormal targets, large supports, invalid
arguments; forward and backward) with their expected values from the exact
oracle, as one JSON document (``"format": "kldiv-spec-vectors"``); another
implementation runs every case and writes a results document
(``"format": "kldiv-spec-results"``); :func:`verify` compares the two.
``docs/vectors.md`` describes both formats, and ``schemas/*.schema.json`` (see
:func:`schema`) are their JSON Schemas.

Arrays are ``{"dtype": ..., "shape": [...], "data": [...]}`` with the values in
row-major order as strings: the shortest decimal that reads back to the same
value of the dtype (:func:`format_value`), or ``"nan"``, ``"inf"``, ``"-inf"``.

An element of a result :math:`r` holds against the expected value :math:`e`
with tolerance :math:`a` (``atol``) when

* :math:`e` is NaN and :math:`r` is NaN; or
* :math:`e` is an infinity and :math:`r` is the same infinity; or
* :math:`e` is finite, :math:`r` is finite and :math:`|r - e| \le a`, the
  difference taken in float64 (binary64) arithmetic; and, where the case has
  ``"signed_zeros": true`` and :math:`e` is a zero, :math:`r` is a zero of the
  same sign.

:func:`run_python` produces a results document for a Python implementation.
"""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .assertions import assert_matches, dtype_name, to_numpy
from .properties import GROUPS
from .vectors_cases import Expected, Spec, expected, property_info, specs

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "DTYPES",
    "FLOAT_DTYPES",
    "FORMAT_RESULTS",
    "FORMAT_VECTORS",
    "FUNCTIONS",
    "VERSION",
    "CaseOutcome",
    "MalformedError",
    "VectorCase",
    "Verification",
    "dumps",
    "export",
    "format_array",
    "format_tolerance",
    "format_value",
    "load",
    "parse_array",
    "read_results",
    "read_vectors",
    "run_python",
    "schema",
    "verify",
]

FORMAT_VECTORS = "kldiv-spec-vectors"
FORMAT_RESULTS = "kldiv-spec-results"
#: The version of both formats.
VERSION = 1
FUNCTIONS: tuple[str, ...] = ("kl_div", "kl_div_backward")
FLOAT_DTYPES: tuple[str, ...] = ("float16", "float32", "float64")
#: Every dtype an array may have: the floating ones, and those of the invalid-argument cases.
DTYPES: tuple[str, ...] = (*FLOAT_DTYPES, "int32", "int64", "bool")
#: The default limit on the elements of any one array of a case.
DEFAULT_MAX_ELEMENTS = 4096

_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INTEGER = re.compile(r"-?\d+")
_SPECIAL = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class MalformedError(ValueError):
    """A vectors or results document that does not follow its format.

    The message names the document, the case and the field.
    """


# --------------------------------------------------------------------------------------
# Values and arrays


def format_value(v: Any, dtype: str, /) -> str:
    """Return the shortest decimal string that reads back to ``v`` in ``dtype``.

    ``"nan"``, ``"inf"``, ``"-inf"``; ``"-0.0"`` for a negative zero; for float64
    ``repr(float(v))``; for float32 and float16 the shortest unique digits of
    that dtype (NumPy's Dragon4), in the same style: positional for decimal
    exponents from -4 to 15, else scientific (``"1e-45"``). Integers as
    decimals, booleans as ``"true"``/``"false"``. ``v`` must be a value of
    ``dtype`` (it is not rounded to it).
    """
    if dtype == "bool":
        return "true" if bool(v) else "false"
    if dtype in ("int32", "int64"):
        return str(int(v))
    f = float(v)
    if dtype == "float64" or not math.isfinite(f):
        return "nan" if math.isnan(f) else repr(f)
    if f == 0:
        return "-0.0" if math.copysign(1.0, f) < 0 else "0.0"
    return _shortest(f, dtype)


@functools.lru_cache(maxsize=4096)
def _shortest(f: float, dtype: str) -> str:
    """Return the shortest decimal of the finite nonzero ``f`` of a float32/float16."""
    x = np.dtype(dtype).type(f)
    sci = np.format_float_scientific(x, unique=True, trim="-")
    mantissa, exp_text = sci.split("e")
    exponent = int(exp_text)
    if not -4 <= exponent < 16:
        return sci
    sign = "-" if mantissa.startswith("-") else ""
    digits = mantissa.lstrip("-").replace(".", "")
    if exponent < 0:
        return f"{sign}0.{'0' * (-exponent - 1)}{digits}"
    whole, frac = digits[: exponent + 1], digits[exponent + 1 :]
    return f"{sign}{whole.ljust(exponent + 1, '0')}.{frac or '0'}"


def format_array(a: Any, /, atol: np.ndarray | None = None) -> dict[str, Any]:
    """Return a NumPy array as ``{"dtype", "shape", "data"}`` (and ``"atol"`` when given).

    ``atol`` is written as one string when every element has the same, else as
    one string per element.
    """
    a = np.asarray(a)
    name = a.dtype.name
    out: dict[str, Any] = {
        "dtype": name,
        "shape": [int(n) for n in a.shape],
        "data": [format_value(v, name) for v in a.ravel().tolist()],  # Python scalars
    }
    if atol is not None:
        tol = np.broadcast_to(np.asarray(atol, dtype=np.float64), a.shape).ravel()
        if tol.size and np.all(tol == tol[0]):
            out["atol"] = format_tolerance(float(tol[0]))
        elif tol.size == 0:
            out["atol"] = "0.0"
        else:
            out["atol"] = [format_tolerance(v) for v in tol.tolist()]
    return out


def format_tolerance(v: float, /) -> str:
    """Return ``v`` rounded *up* to three significant digits (``"0.0"`` for zero).

    A tolerance is an upper bound, so it may only grow; three digits keep the
    files small and loosen a bound by less than 1 %.
    """
    if v == 0:
        return "0.0"
    if not math.isfinite(v) or v < 0:
        msg = f"a tolerance must be a finite non-negative number, got {v!r}"
        raise ValueError(msg)
    mantissa, exponent = f"{v:.2e}".split("e")
    digits = int(mantissa.replace(".", ""))
    while float(f"{digits}e{int(exponent) - 2}") < v:
        digits += 1
    return repr(float(f"{digits}e{int(exponent) - 2}"))


def _fail(doc: str, case: str | None, fld: str, msg: str) -> MalformedError:
    where = f"{doc}: case {case!r}: field {fld!r}" if case else f"{doc}: field {fld!r}"
    return MalformedError(f"{where}: {msg}")


def _parse_numbers(data: list[Any], dtype: str, err: Callable[[str], MalformedError]) -> list:
    out: list[Any] = []
    for i, s in enumerate(data):
        if not isinstance(s, str):
            raise err(f"element {i} is {json.dumps(s)}, not a string")
        if dtype == "bool":
            if s not in ("true", "false"):
                raise err(f"element {i} {s!r} is not 'true' or 'false'")
            out.append(s == "true")
        elif dtype in ("int32", "int64"):
            if not _INTEGER.fullmatch(s):
                raise err(f"element {i} {s!r} is not an integer")
            out.append(int(s))
        elif s in _SPECIAL:
            out.append(_SPECIAL[s])
        elif _NUMBER.fullmatch(s):
            out.append(float(s))
        else:
            raise err(f"element {i} {s!r} is not a decimal number, 'nan', 'inf' or '-inf'")
    return out


def parse_array(obj: Any, /, *, doc: str = "array", case: str | None = None, fld: str = "") -> Any:
    """Return the NumPy array that ``{"dtype", "shape", "data"}`` describes.

    Decimal strings are read as float64 and rounded to the dtype (exact for
    the shortest strings this module writes). ``doc``, ``case`` and ``fld``
    name the place for the :class:`MalformedError` raised on a malformed array.
    """

    def err(msg: str) -> MalformedError:
        return _fail(doc, case, fld, msg)

    if not isinstance(obj, dict):
        raise err("not an object with 'dtype', 'shape' and 'data'")
    missing = [k for k in ("dtype", "shape", "data") if k not in obj]
    if missing:
        raise err(f"missing {', '.join(repr(k) for k in missing)}")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype not in DTYPES:
        raise err(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise err(f"shape {json.dumps(shape)} is not a list of non-negative integers")
    if not isinstance(data, list):
        raise err("'data' is not a list")
    if len(data) != math.prod(shape):
        raise err(f"'data' has {len(data)} elements, shape {shape} needs {math.prod(shape)}")
    values = _parse_numbers(data, dtype, err)
    with np.errstate(over="ignore"):
        if dtype in FLOAT_DTYPES:
            return np.asarray(values, dtype=np.float64).astype(dtype).reshape(shape)
        return np.asarray(values, dtype=dtype).reshape(shape)


def _parse_atol(obj: dict[str, Any], size: int, err: Callable[[str], MalformedError]) -> Any:
    if "atol" not in obj:
        raise err("missing 'atol'")
    atol = obj["atol"]
    items = atol if isinstance(atol, list) else [atol]
    if isinstance(atol, list) and len(atol) != size:
        raise err(f"'atol' has {len(atol)} elements, 'data' {size}")
    values = np.asarray(_parse_numbers(items, "float64", err), dtype=np.float64)
    if np.any(np.isnan(values) | (values < 0)):
        raise err("'atol' must be non-negative numbers")
    return values


# --------------------------------------------------------------------------------------
# Export


def _case_json(spec: Spec) -> dict[str, Any]:
    _, level, _ = property_info(spec.property)
    out: dict[str, Any] = {"id": spec.id, "property": spec.property, "level": level}
    out["function"] = spec.function
    if spec.description:
        out["description"] = spec.description
    out["reduction"] = spec.reduction
    out["log_target"] = spec.log_target
    out["input"] = format_array(spec.input)
    out["target"] = format_array(spec.target)
    if spec.function == "kl_div_backward":
        out["grad_output"] = format_array(spec.grad_output)
    out["signed_zeros"] = spec.signed_zeros
    if spec.expected_error:
        out["expected_error"] = True
        return out
    exp = expected(spec)
    if isinstance(exp, Expected):
        out["expected"] = format_array(exp.value, exp.atol)
    else:
        assert exp is not None
        gi, gt = exp
        out["expected"] = {
            "grad_input": format_array(gi.value, gi.atol),
            "grad_target": format_array(gt.value, gt.atol),
        }
    return out


def export(
    *,
    functions: Sequence[str] = FUNCTIONS,
    dtypes: Sequence[str] = FLOAT_DTYPES,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Return the vectors document: every selected case with its expected values.

    Parameters
    ----------
    functions
        ``'kl_div'`` and/or ``'kl_div_backward'``.
    dtypes
        Keep the cases whose floating-point arrays all have one of these dtypes.
    max_elements
        Drop the cases with an array (operand or result) of more elements.
    groups
        Keep only the cases of these property groups (default: all).
    """
    from kldiv_spec import __version__

    chosen = specs(
        functions=tuple(functions),
        dtypes=tuple(dtypes),
        max_elements=max_elements,
        groups=tuple(groups) if groups else None,
    )
    cases = [_case_json(s) for s in chosen]
    names = sorted(
        {s.property for s in chosen},
        key=lambda n: (GROUPS.index(n.split(".", 1)[0]), [s.property for s in chosen].index(n)),
    )
    properties = {}
    for name in names:
        group, level, description = property_info(name)
        properties[name] = {"group": group, "level": level, "description": description}
    return {
        "format": FORMAT_VECTORS,
        "version": VERSION,
        "generator": f"kldiv-spec {__version__}",
        "options": {
            "functions": [f for f in FUNCTIONS if f in functions],
            "dtypes": [d for d in FLOAT_DTYPES if d in dtypes],
            "max_elements": max_elements,
            "groups": [g for g in GROUPS if groups is None or g in groups],
        },
        "properties": properties,
        "cases": cases,
    }


def dumps(document: Mapping[str, Any], /) -> str:
    """Return a vectors or results document as JSON text, deterministically.

    The header is indented; each case (or result) is on a line of its own, in
    compact form, so that the text is small and a change shows as a line diff.
    """
    key = "cases" if "cases" in document else "results"
    head = {k: v for k, v in document.items() if k != key}
    text = json.dumps({**head, key: None}, indent=2, ensure_ascii=True)
    body = document[key]
    compact = {"separators": (",", ":"), "ensure_ascii": True}
    if key == "cases":
        items = ["    " + json.dumps(c, **compact) for c in body]  # type: ignore[arg-type]
    else:
        items = [
            f"    {json.dumps(k)}: {json.dumps(v, **compact)}"  # type: ignore[arg-type]
            for k, v in body.items()
        ]
    opening, closing = ("[", "]") if key == "cases" else ("{", "}")
    inner = opening + ("\n" + ",\n".join(items) + "\n  " if items else "") + closing
    return text.replace(f'"{key}": null', f'"{key}": {inner}') + "\n"


def load(path: str | Path, /, *, doc: str | None = None) -> Any:
    """Return the JSON document at ``path`` (``-`` for stdin); MalformedError if not JSON."""
    name = doc or str(path)
    try:
        if str(path) == "-":
            import sys

            return json.load(sys.stdin)
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        msg = f"{name}: not JSON: {exc}"
        raise MalformedError(msg) from None


def schema(kind: str, /) -> dict[str, Any]:
    """Return the JSON Schema of the ``'vectors'`` or ``'results'`` format (a dict)."""
    if kind not in ("vectors", "results"):
        msg = f"kind must be 'vectors' or 'results', got {kind!r}"
        raise ValueError(msg)
    text = resources.files(__package__).joinpath("schemas", f"{kind}.schema.json").read_text()
    return json.loads(text)


# --------------------------------------------------------------------------------------
# Reading


@dataclass
class ExpectedArray:
    """An expected array: values (in its dtype) and the tolerance of each element."""

    value: np.ndarray
    atol: np.ndarray


@dataclass
class VectorCase:
    """One case of a vectors document, parsed."""

    id: str
    property: str
    group: str
    level: str
    function: str
    reduction: str
    log_target: bool
    input: np.ndarray
    target: np.ndarray
    grad_output: np.ndarray | None
    signed_zeros: bool
    expected_error: bool
    expected: ExpectedArray | tuple[ExpectedArray, ExpectedArray] | None
    description: str = ""


def _expected_array(obj: Any, doc: str, case: str, fld: str) -> ExpectedArray:
    value = parse_array(obj, doc=doc, case=case, fld=fld)
    atol = _parse_atol(obj, value.size, lambda m: _fail(doc, case, f"{fld}.atol", m))
    return ExpectedArray(value, np.broadcast_to(atol, value.size).reshape(value.shape))


def _read_case(c: Any, i: int, doc: str) -> VectorCase:
    if not isinstance(c, dict):
        raise _fail(doc, None, f"cases[{i}]", "not an object")
    cid = c.get("id")
    if not isinstance(cid, str) or not cid:
        raise _fail(doc, None, f"cases[{i}].id", "missing, or not a non-empty string")

    def get(name: str, kind: type | tuple[type, ...]) -> Any:
        if name not in c:
            raise _fail(doc, cid, name, "missing")
        v = c[name]
        if not isinstance(v, kind) or (kind is str and isinstance(v, bool)):
            raise _fail(doc, cid, name, f"{json.dumps(v)} has the wrong type")
        return v

    prop = get("property", str)
    if "." not in prop or prop.split(".", 1)[0] not in GROUPS:
        raise _fail(doc, cid, "property", f"{prop!r} is not GROUP.NAME with a known group")
    level = get("level", str)
    if level not in ("MUST", "SHOULD"):
        raise _fail(doc, cid, "level", f"{level!r} is not 'MUST' or 'SHOULD'")
    function = get("function", str)
    if function not in FUNCTIONS:
        raise _fail(doc, cid, "function", f"{function!r} is not one of {', '.join(FUNCTIONS)}")
    reduction = get("reduction", str)
    log_target = get("log_target", bool)
    x = parse_array(c.get("input"), doc=doc, case=cid, fld="input")
    t = parse_array(c.get("target"), doc=doc, case=cid, fld="target")
    g = None
    if function == "kl_div_backward":
        g = parse_array(c.get("grad_output"), doc=doc, case=cid, fld="grad_output")
    signed = c.get("signed_zeros", False)
    if not isinstance(signed, bool):
        raise _fail(doc, cid, "signed_zeros", "not a boolean")
    error = c.get("expected_error", False)
    if error is not False and error is not True:
        raise _fail(doc, cid, "expected_error", "not a boolean")
    exp: Any = None
    if error:
        if "expected" in c:
            raise _fail(doc, cid, "expected", "a case with expected_error has no 'expected'")
    elif "expected" not in c:
        raise _fail(doc, cid, "expected", "missing (and no 'expected_error': true)")
    elif function == "kl_div":
        exp = _expected_array(c["expected"], doc, cid, "expected")
    else:
        e = c["expected"]
        if not isinstance(e, dict) or set(e) != {"grad_input", "grad_target"}:
            raise _fail(doc, cid, "expected", "not {'grad_input': ..., 'grad_target': ...}")
        exp = (
            _expected_array(e["grad_input"], doc, cid, "expected.grad_input"),
            _expected_array(e["grad_target"], doc, cid, "expected.grad_target"),
        )
    return VectorCase(
        cid,
        prop,
        prop.split(".", 1)[0],
        level,
        function,
        reduction,
        log_target,
        x,
        t,
        g,
        signed,
        bool(error),
        exp,
        str(c.get("description", "")),
    )


def _check_header(data: Any, fmt: str, doc: str) -> None:
    if not isinstance(data, dict):
        raise _fail(doc, None, "format", "the document is not a JSON object")
    if data.get("format") != fmt:
        raise _fail(doc, None, "format", f"{json.dumps(data.get('format'))}, expected {fmt!r}")
    if data.get("version") != VERSION:
        raise _fail(doc, None, "version", f"{json.dumps(data.get('version'))}, expected {VERSION}")


def read_vectors(data: Any, /, *, doc: str = "vectors") -> list[VectorCase]:
    """Return the cases of a vectors document; :class:`MalformedError` where it is malformed."""
    _check_header(data, FORMAT_VECTORS, doc)
    cases = data.get("cases")
    if not isinstance(cases, list):
        raise _fail(doc, None, "cases", "missing, or not a list")
    out = [_read_case(c, i, doc) for i, c in enumerate(cases)]
    seen: set[str] = set()
    for c in out:
        if c.id in seen:
            raise _fail(doc, c.id, "id", "appears twice")
        seen.add(c.id)
    return out


def _read_result(obj: Any, case: VectorCase, doc: str) -> Any:
    cid = case.id
    if isinstance(obj, dict) and set(obj) == {"error"}:
        if not isinstance(obj["error"], str):
            raise _fail(doc, cid, "error", "not a string")
        return obj["error"]
    if case.function == "kl_div_backward" and not case.expected_error:
        if not isinstance(obj, dict) or set(obj) != {"grad_input", "grad_target"}:
            msg = "not {'grad_input': ARRAY, 'grad_target': ARRAY} or {'error': MESSAGE}"
            raise _fail(doc, cid, "results", msg)
        return (
            parse_array(obj["grad_input"], doc=doc, case=cid, fld="grad_input"),
            parse_array(obj["grad_target"], doc=doc, case=cid, fld="grad_target"),
        )
    if isinstance(obj, dict) and set(obj) == {"grad_input", "grad_target"}:
        return (
            parse_array(obj["grad_input"], doc=doc, case=cid, fld="grad_input"),
            parse_array(obj["grad_target"], doc=doc, case=cid, fld="grad_target"),
        )
    return parse_array(obj, doc=doc, case=cid, fld="results")


def read_results(
    data: Any, cases: Sequence[VectorCase], /, *, doc: str = "results"
) -> tuple[str, dict[str, Any]]:
    """Return ``(implementation, {case id: result})`` of a results document.

    A result is an array, a pair of arrays (a backward) or an error message
    (a string). Results for ids that ``cases`` does not have are malformed.
    """
    _check_header(data, FORMAT_RESULTS, doc)
    impl = data.get("implementation")
    if not isinstance(impl, str):
        raise _fail(doc, None, "implementation", "missing, or not a string")
    results = data.get("results")
    if not isinstance(results, dict):
        raise _fail(doc, None, "results", "missing, or not an object")
    by_id = {c.id: c for c in cases}
    out = {}
    for cid, obj in results.items():
        if cid not in by_id:
            raise _fail(doc, cid, "results", "no case of the vectors has this id")
        out[cid] = _read_result(obj, by_id[cid], doc)
    return impl, out


# --------------------------------------------------------------------------------------
# Verification


@dataclass
class CaseOutcome:
    """The verdict on one case: ``'pass'``, ``'fail'`` (with the reason) or ``'skipped'``."""

    id: str
    property: str
    group: str
    level: str
    status: str
    reason: str = ""


@dataclass
class Verification:
    """Every case's outcome, for one implementation against one vectors document."""

    implementation: str
    generator: str
    outcomes: list[CaseOutcome] = field(default_factory=list)
    descriptions: dict[str, str] = field(default_factory=dict)

    def failed(self, *, strict: bool = False) -> bool:
        """Whether a MUST case failed (any case, with ``strict``)."""
        return any(o.status == "fail" and (strict or o.level == "MUST") for o in self.outcomes)

    def by_property(self) -> dict[str, list[CaseOutcome]]:
        """Return the outcomes grouped by property, in report (group) order."""
        out: dict[str, list[CaseOutcome]] = {}
        for o in sorted(self.outcomes, key=lambda o: GROUPS.index(o.group)):
            out.setdefault(o.property, []).append(o)
        return out


def _compare(case: VectorCase, got: Any) -> str | None:
    """Return why ``got`` does not hold for ``case``, or None when it does."""
    if case.expected_error:
        if isinstance(got, str):
            return None
        return "returned a result; an error was expected"
    if isinstance(got, str):
        return f"raised an error: {got}"
    if isinstance(case.expected, ExpectedArray):
        pairs = [("result", got, case.expected)]
    else:
        assert case.expected is not None
        if not isinstance(got, tuple):
            return "a single array where the two gradients were expected"
        pairs = [
            ("grad_input", got[0], case.expected[0]),
            ("grad_target", got[1], case.expected[1]),
        ]
    for what, value, exp in pairs:
        if isinstance(value, tuple):
            return f"{what}: two arrays where one was expected"
        try:
            assert_matches(
                value,
                exp.value,
                exp.atol,
                dtype=exp.value.dtype.name,
                shape=exp.value.shape,
                what=what,
                signed_zeros=case.signed_zeros,
            )
        except AssertionError as exc:
            return str(exc).replace("PyTorch's exact values", "the expected values")
    return None


def verify(
    vectors: Any,
    results: Any,
    /,
    *,
    vectors_doc: str = "vectors",
    results_doc: str = "results",
) -> Verification:
    """Compare a results document with a vectors document, case by case.

    Cases without a result are skipped. Raises :class:`MalformedError` (naming
    the document, the case and the field) where either document is malformed.
    """
    cases = read_vectors(vectors, doc=vectors_doc)
    impl, got = read_results(results, cases, doc=results_doc)
    props = vectors.get("properties", {}) if isinstance(vectors, dict) else {}
    report = Verification(impl, str(vectors.get("generator", "")))
    for name, info in props.items() if isinstance(props, dict) else ():
        if isinstance(info, dict):
            report.descriptions[name] = str(info.get("description", ""))
    for case in cases:
        if case.id not in got:
            status, reason = "skipped", "no result"
        else:
            why = _compare(case, got[case.id])
            status, reason = ("pass", "") if why is None else ("fail", why)
        report.outcomes.append(
            CaseOutcome(case.id, case.property, case.group, case.level, status, reason)
        )
    return report


# --------------------------------------------------------------------------------------
# Python implementations


def _result_json(r: Any) -> dict[str, Any]:
    name = dtype_name(getattr(r, "dtype", np.asarray(r).dtype))
    values = to_numpy(r)
    with np.errstate(over="ignore"):
        return format_array(values.astype(name) if name in FLOAT_DTYPES else values)


def run_python(
    vectors: Any,
    fn: Callable[..., Any],
    /,
    backward: Callable[..., Any] | None = None,
    *,
    implementation: str = "python",
    asarray: Callable[[np.ndarray], Any] | None = None,
) -> dict[str, Any]:
    """Run a Python implementation on every case; return the results document.

    Parameters
    ----------
    vectors
        A vectors document (the parsed JSON).
    fn
        ``fn(input, target, reduction=..., log_target=...)``, PyTorch's functional form.
    backward
        ``backward(grad_output, input, target, reduction=..., log_target=...)``
        returning ``(grad_input, grad_target)``; without it the backward cases
        are left out (and reported as skipped).
    implementation
        The name the results document gives.
    asarray
        Converts each NumPy operand to the implementation's array type (default:
        NumPy arrays as they are). Results of any array library are read back
        with :func:`.assertions.to_numpy`, in their own dtype.

    Every exception becomes ``{"error": "ExceptionClass: message"}``; warnings
    (``reduction='mean'`` warns) and floating-point warnings are silenced.

    Examples
    --------
    >>> import kldiv_spec
    >>> from kldiv_spec.conformance import vectors as v
    >>> doc = v.export(groups=["math"])  # no case: a tiny document
    >>> results = v.run_python(doc, kldiv_spec.kl_div, kldiv_spec.kl_div_backward)
    >>> v.verify(doc, results).failed()
    False
    """
    conv = asarray or (lambda a: a)
    out: dict[str, Any] = {}
    for case in read_vectors(vectors):
        if case.function == "kl_div_backward" and backward is None:
            continue
        kw = {"reduction": case.reduction, "log_target": case.log_target}
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                x, t = conv(case.input), conv(case.target)
                if case.function == "kl_div":
                    out[case.id] = _result_json(fn(x, t, **kw))
                else:
                    assert backward is not None and case.grad_output is not None
                    gx, gt = backward(conv(case.grad_output), x, t, **kw)
                    out[case.id] = {
                        "grad_input": _result_json(gx),
                        "grad_target": _result_json(gt),
                    }
        except Exception as exc:
            text = str(exc).splitlines()[0] if str(exc) else ""
            out[case.id] = {"error": f"{type(exc).__name__}: {text}".rstrip(": ")}
    return {
        "format": FORMAT_RESULTS,
        "version": VERSION,
        "implementation": implementation,
        "results": out,
    }
