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
  difference taken in float64 (binary64) arithmetic.

Where the case has ``"signed_zeros": true`` and :math:`e` is a zero, :math:`r`
should be a zero of the same sign: a SHOULD whatever the case's level, so a
result that holds but for it has the status :data:`ZERO_SIGN`, which fails only
with ``strict``.

:func:`run_python` produces a results document for a Python implementation.
:func:`load` reads a file with limits (size, depth, memory) and reports any
malformation as :class:`MalformedError`, naming the file (and, in
:func:`verify`, the case and the field).
"""

from __future__ import annotations

import functools
import json
import json.decoder
import json.scanner
import math
import os
import re
import stat
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import numpy as np

from .assertions import assert_matches, dtype_name, to_numpy
from .properties import GROUPS
from .vectors_cases import Expected, Spec, expected, property_info, specs

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ELEMENTS",
    "DTYPES",
    "FLOAT_DTYPES",
    "FORMAT_RESULTS",
    "FORMAT_VECTORS",
    "FUNCTIONS",
    "MAX_ARRAY_ELEMENTS",
    "MAX_DEPTH",
    "MAX_NDIM",
    "VERSION",
    "ZERO_SIGN",
    "CaseOutcome",
    "MalformedError",
    "StringArray",
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

#: The default limit on the size of a file :func:`load` reads: 1 GiB.
DEFAULT_MAX_BYTES = 2**30
#: How deep arrays and objects may nest in a file :func:`load` reads (the formats need 5).
MAX_DEPTH = 64
#: The most dimensions an array's shape may have.
MAX_NDIM = 32
#: The most elements a shape may span: the product of its non-zero dimensions.
MAX_ARRAY_ELEMENTS = 2**40
#: The status of a case that holds but for the sign of a zero (a SHOULD: see :func:`verify`).
ZERO_SIGN = "zero_sign"

_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_FLOAT_TEXT = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|nan|inf|-inf")
_INTEGER = re.compile(r"-?\d+")
_SPECIAL = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
#: Integers of more digits than this are not read (Python refuses over 4300 by default).
_MAX_INT_DIGITS = 4000
#: The characters of a chunk of a :class:`StringArray` read at once.
_CHUNK = 1 << 20
#: What an array of plain strings (see ``_plain_strings``) may not have; then with spaces.
_NOT_VALUE_TEXT = re.compile(r'[^0-9.eE+\-naiftrusl",\t\n\r ]')
_VALUE_TEXT_SPACE = re.compile(r"[\t\n\r ]")
_NESTED_OR_STRING = re.compile(r'[\[{"]')
#: Whitespace in a string, where every gap between two strings has a comma.
_SPACE_IN_STRING = re.compile(r'"[^",]*[\t\n\r ][^",]*"')
_JSON_WHITESPACE = str.maketrans("", "", " \t\n\r")
_VALUE_LETTERS = str.maketrans("", "", "0123456789.eE+-naiftrusl")


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


class StringArray(Sequence[str]):
    """A JSON array of plain strings, kept as its text until it is read.

    :func:`load` with ``compact=True`` returns the arrays of strings without
    escapes (the ``"data"`` and ``"atol"`` of the formats) as these: the text of
    the values takes a fraction of the memory of a list of Python strings, and
    :func:`parse_array` reads it in chunks into a NumPy array. It is a read-only
    sequence of the strings; indexing it splits the whole text (slow; iterate).

    Parameters
    ----------
    text
        The text between the brackets: ``n`` strings of the letters of
        decimals, ``nan``, ``inf``, ``true`` and ``false`` (no escapes or
        whitespace), separated by commas and JSON whitespace.
    n
        How many strings.
    """

    __slots__ = ("_n", "_text")

    def __init__(self, text: str, n: int) -> None:
        self._text = text
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[str]:
        for chunk in self.chunks():
            yield from chunk

    def __getitem__(self, index: Any) -> Any:
        return self._text.split('"')[1::2][index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StringArray | list):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"StringArray({_show(self)}, n={self._n})"

    def chunks(self, size: int = _CHUNK) -> Iterator[list[str]]:
        """Yield the strings in lists of those of about ``size`` characters of text."""
        text, pos, end, quotes = self._text, 0, len(self._text), 0
        while pos < end:
            stop = text.find('"', pos + size) if pos + size < end else -1
            if stop < 0:
                stop = end
            elif (quotes + text.count('"', pos, stop)) % 2:  # cut after a closing quote
                stop += 1
            piece = text[pos:stop]
            quotes += piece.count('"')
            pos = stop
            yield piece.split('"')[1::2]


class _HugeNumber:
    """A JSON integer of more than ``_MAX_INT_DIGITS`` digits, which is not read."""

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<a number of {self.digits} digits>"


def _count(n: int) -> str:
    """Return an integer as text: its digits, or ``10**k`` / ``about 10**k`` when long."""
    if abs(n) < 10**15:
        return str(n)
    k = max(0, int(abs(n).bit_length() * 0.30103) - 1)
    while 10 ** (k + 1) <= abs(n):
        k += 1
    sign = "-" if n < 0 else ""
    return f"{sign}10**{k}" if abs(n) == 10**k else f"{sign}about 10**{k}"


def _render(value: Any, depth: int) -> str:
    if value is None or isinstance(value, bool | float):
        return json.dumps(value)
    if isinstance(value, int):
        return _count(value)
    if isinstance(value, str):
        return json.dumps(value[:40] + ("..." if len(value) > 40 else ""), ensure_ascii=True)
    if isinstance(value, list | StringArray | dict):
        if depth <= 0:
            return "{...}" if isinstance(value, dict) else "[...]"
        items = iter(value.items()) if isinstance(value, dict) else iter(value)
        shown = []
        for _, item in zip(range(6), items, strict=False):
            if isinstance(value, dict):
                shown.append(f"{_render(item[0], 0)}: {_render(item[1], depth - 1)}")
            else:
                shown.append(_render(item, depth - 1))
        more = ", ..." if len(value) > len(shown) else ""
        inner = ", ".join(shown) + more
        return f"{{{inner}}}" if isinstance(value, dict) else f"[{inner}]"
    return repr(value) if isinstance(value, _HugeNumber) else f"<{type(value).__name__}>"


def _show(value: Any, /, limit: int = 80) -> str:
    """Return a short JSON-like text of a parsed value, for a message (at most ``limit``)."""
    text = _render(value, 3)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(doc: str, case: str | None, fld: str, msg: str) -> MalformedError:
    if case is not None and len(case) > 100:
        case = case[:97] + "..."
    where = f"{doc}: case {case!r}: field {fld!r}" if case else f"{doc}: field {fld!r}"
    return MalformedError(f"{where}: {msg}")


def _diagnose(
    items: Sequence[Any], dtype: str, start: int, err: Callable[[str], MalformedError]
) -> NoReturn:
    """Raise the error for the first element of ``items`` that is not a value of ``dtype``."""
    info = np.iinfo(dtype) if dtype in ("int32", "int64") else None
    for i, s in enumerate(items, start):
        if not isinstance(s, str):
            raise err(f"element {i} is {_show(s)}, not a string")
        if dtype == "bool":
            if s not in ("true", "false"):
                raise err(f"element {i} {_show(s)} is not 'true' or 'false'")
        elif info is not None:
            if not _INTEGER.fullmatch(s):
                raise err(f"element {i} {_show(s)} is not an integer")
            if len(s.lstrip("-")) > 20 or not info.min <= int(s) <= info.max:
                raise err(f"element {i} {_show(s)} is out of the range of {dtype}")
        elif s not in _SPECIAL and not _NUMBER.fullmatch(s):
            raise err(f"element {i} {_show(s)} is not a decimal number, 'nan', 'inf' or '-inf'")
    msg = f"an element is not a value of {dtype}"  # pragma: no cover (the chunk was refused)
    raise err(msg)  # pragma: no cover


def _read_chunk(items: list[Any], dtype: str, out: np.ndarray, start: int) -> bool:
    """Write the values of ``items`` to ``out[start:]``; False if one is not of ``dtype``."""
    n = len(items)
    try:
        if dtype in FLOAT_DTYPES:
            if not all(map(_FLOAT_TEXT.fullmatch, items)):
                return False
            out[start : start + n] = np.fromiter(map(float, items), np.float64, n)
        elif dtype == "bool":
            if not all(s == "true" or s == "false" for s in items):
                return False
            out[start : start + n] = [s == "true" for s in items]
        else:
            if not all(map(_INTEGER.fullmatch, items)) or any(len(s) > 20 for s in items):
                return False
            values = [int(s) for s in items]
            info = np.iinfo(dtype)
            if values and not (info.min <= min(values) and max(values) <= info.max):
                return False
            out[start : start + n] = values
    except TypeError:  # an element that is not a string
        return False
    return True


def _read_values(data: Any, dtype: str, err: Callable[[str], MalformedError]) -> np.ndarray:
    """Return the values of a list or :class:`StringArray` of strings as a flat array.

    Floating dtypes are read as float64 (the caller rounds them to the dtype).
    """
    out = np.empty(len(data), dtype=np.float64 if dtype in FLOAT_DTYPES else dtype)
    if isinstance(data, StringArray):
        chunks: Iterator[list[Any]] = data.chunks()
    else:
        step = _CHUNK // 16
        chunks = (data[i : i + step] for i in range(0, len(data), step))
    start = 0
    for items in chunks:
        if not _read_chunk(items, dtype, out, start):
            _diagnose(items, dtype, start, err)
        start += len(items)
    return out


def _check_shape(shape: Any, err: Callable[[str], MalformedError]) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise err(f"shape {_show(shape)} is not a list of non-negative integers")
    if len(shape) > MAX_NDIM:
        raise err(f"shape has {len(shape)} dimensions; at most {MAX_NDIM} are supported")
    span = 1
    for n in shape:
        if n > MAX_ARRAY_ELEMENTS:
            span = n
            break
        span *= max(n, 1)
    if span > MAX_ARRAY_ELEMENTS:
        limit = f"2**{MAX_ARRAY_ELEMENTS.bit_length() - 1}"
        msg = f"shape {_show(shape)}: {_count(span)} elements is too large (at most {limit})"
        raise err(msg)
    return tuple(shape)


def parse_array(obj: Any, /, *, doc: str = "array", case: str | None = None, fld: str = "") -> Any:
    """Return the NumPy array that ``{"dtype", "shape", "data"}`` describes.

    Decimal strings are read as float64 and rounded to the dtype (exact for
    the shortest strings this module writes). ``doc``, ``case`` and ``fld``
    name the place for the :class:`MalformedError` raised on a malformed array:
    an unknown dtype; a shape that is not a list of non-negative integers, or
    of more than :data:`MAX_NDIM` dimensions, or spanning more than
    :data:`MAX_ARRAY_ELEMENTS` elements (its non-zero dimensions multiplied);
    ``data`` that is not a list (or :class:`StringArray`) of as many strings as
    the shape has elements, each a value of the dtype.
    """

    def err(msg: str) -> MalformedError:
        return _fail(doc, case, fld, msg)

    if not isinstance(obj, dict):
        raise err("not an object with 'dtype', 'shape' and 'data'")
    missing = [k for k in ("dtype", "shape", "data") if k not in obj]
    if missing:
        raise err(f"missing {', '.join(repr(k) for k in missing)}")
    dtype, data = obj["dtype"], obj["data"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise err(f"dtype {_show(dtype)} is not one of {', '.join(DTYPES)}")
    shape = _check_shape(obj["shape"], err)
    if not isinstance(data, list | StringArray):
        raise err("'data' is not a list")
    if len(data) != math.prod(shape):
        raise err(f"'data' has {len(data)} elements, shape {list(shape)} needs {math.prod(shape)}")
    values = _read_values(data, dtype, err)
    with np.errstate(over="ignore"):
        return values.astype(dtype, copy=False).reshape(shape)


def _parse_atol(obj: dict[str, Any], size: int, err: Callable[[str], MalformedError]) -> Any:
    if "atol" not in obj:
        raise err("missing 'atol'")
    atol = obj["atol"]
    items = atol if isinstance(atol, list | StringArray) else [atol]
    if isinstance(atol, list | StringArray) and len(atol) != size:
        raise err(f"'atol' has {len(atol)} elements, 'data' {size}")
    values = _read_values(items, "float64", err)
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


class _TooDeepError(Exception):
    """Raised by the decoder of ``_decoder`` at the position past :data:`MAX_DEPTH`."""

    def __init__(self, pos: int) -> None:
        super().__init__(pos)
        self.pos = pos


def _parse_int(text: str) -> int | _HugeNumber:
    if len(text) > _MAX_INT_DIGITS:
        return _HugeNumber(len(text.lstrip("-")))
    try:
        return int(text)
    except ValueError:  # over sys.get_int_max_str_digits()
        return _HugeNumber(len(text.lstrip("-")))


def _plain_strings(s: str, idx: int) -> tuple[StringArray, int] | None:
    """Return the array of plain strings whose text starts at ``s[idx]`` (after ``[``).

    Plain strings are those of the letters of decimals, ``nan``, ``inf``,
    ``true`` and ``false``: the values of arrays. None where the array is not
    one of them (empty, nested, another string): the general parser reads it.
    The checks are on the whole text at once (no Python step per element):
    without the letters, the text is pairs of quotes with one comma between
    each two; the commas touch quotes on both sides; whitespace is only
    outside the strings.
    """
    close = s.find("]", idx)
    if close < 0 or _NOT_VALUE_TEXT.search(s, idx, close):
        return None
    quotes = s.count('"', idx, close)
    if quotes == 0 or quotes % 2:
        return None
    n = quotes // 2
    text = s[idx:close]
    spaced = _VALUE_TEXT_SPACE.search(text) is not None
    packed = text.translate(_JSON_WHITESPACE) if spaced else text
    # the quotes and commas alone: pairs of quotes with one comma between each two
    if packed.translate(_VALUE_LETTERS) != '"",' * (n - 1) + '""':
        return None
    # and nothing but that comma between two strings, nothing around them
    if not (packed[0] == packed[-1] == '"' and packed.count('","') == n - 1):
        return None
    if spaced and _SPACE_IN_STRING.search(text):
        return None
    return StringArray(text, n), close + 1


def _decoder(compact: bool) -> json.JSONDecoder:
    """Return a JSON decoder that refuses nesting past :data:`MAX_DEPTH`.

    Arrays of plain strings are read at once (as :class:`StringArray` with
    ``compact``), flat arrays without strings by the C parser; integers of more
    than ``_MAX_INT_DIGITS`` digits become ``_HugeNumber``. The rest is the
    standard library's parser (its pure-Python scanner, with the C string
    scanner), which counts the depth.
    """
    decoder = json.JSONDecoder(parse_int=_parse_int)
    flat = json.JSONDecoder(parse_int=_parse_int)
    depth = 0

    def parse_object(s_and_end: tuple[str, int], *args: Any) -> Any:
        nonlocal depth
        depth += 1
        try:
            if depth > MAX_DEPTH:
                raise _TooDeepError(s_and_end[1] - 1)
            return json.decoder.JSONObject(s_and_end, *args)
        finally:
            depth -= 1

    def parse_array(s_and_end: tuple[str, int], scan_once: Any) -> Any:
        nonlocal depth
        plain = _plain_strings(*s_and_end)
        if plain is not None:
            return (plain[0] if compact else list(plain[0])), plain[1]
        s, idx = s_and_end
        close = s.find("]", idx)
        if close > idx and not _NESTED_OR_STRING.search(s, idx, close):
            try:  # a flat array of numbers and literals: the C parser
                return flat.decode(s[idx - 1 : close + 1]), close + 1
            except json.JSONDecodeError:
                pass  # the general parser says where
        depth += 1
        try:
            if depth > MAX_DEPTH:
                raise _TooDeepError(s_and_end[1] - 1)
            return json.decoder.JSONArray(s_and_end, scan_once)
        finally:
            depth -= 1

    decoder.parse_object = parse_object  # type: ignore[assignment]
    decoder.parse_array = parse_array  # type: ignore[assignment]
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]
    return decoder


def _read_stream(f: BinaryIO, name: str, max_bytes: int, size: int) -> bytearray:
    """Return the bytes of ``f`` (``size`` of them if known, else 0); refuse past ``max_bytes``."""
    buf = bytearray(size)
    got = f.readinto(buf) if size else 0
    del buf[got or 0 :]  # a file that shrank
    while True:  # a file that grew, or one that is not regular: in bounded chunks
        chunk = f.read(min(_CHUNK, max_bytes + 1 - len(buf)))
        if not chunk:
            return buf
        buf += chunk
        if len(buf) > max_bytes:
            msg = f"{name}: larger than the limit of {max_bytes} bytes (--max-bytes)"
            raise MalformedError(msg)


def _read_bytes(path: str | Path, name: str, max_bytes: int) -> bytearray:
    """Return the bytes of ``path`` (``-``: stdin); MalformedError past ``max_bytes``.

    A regular file larger than the limit is refused by its size, unread.
    """
    if str(path) == "-":
        return _read_stream(sys.stdin.buffer, name, max_bytes, 0)
    with open(path, "rb") as f:
        info = os.fstat(f.fileno())
        size = info.st_size if stat.S_ISREG(info.st_mode) else 0
        if size > max_bytes:
            msg = f"{name}: {size} bytes, larger than the limit of {max_bytes} (--max-bytes)"
            raise MalformedError(msg)
        return _read_stream(f, name, max_bytes, size)


def load(
    path: str | Path,
    /,
    *,
    doc: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    compact: bool = False,
) -> Any:
    """Return the JSON document at ``path`` (``-`` for stdin).

    Parameters
    ----------
    path
        The file; ``-`` reads standard input.
    doc
        The name of the document in messages (default: ``path``).
    max_bytes
        Refuse a file of more bytes. A regular file is refused by its size,
        without reading it; anything else (a pipe, ``/dev/zero``) is read in
        chunks up to the limit.
    compact
        Return arrays of plain strings as :class:`StringArray`, which keep their
        text instead of a Python string per element (:func:`verify` and
        :func:`parse_array` read both).

    Returns
    -------
    Any
        The document, as :func:`json.load` reads it (but for ``compact``).

    Raises
    ------
    MalformedError
        Naming the file, where it is larger than ``max_bytes``, not UTF-8, not
        JSON, nested more than :data:`MAX_DEPTH` deep, or too large for the
        memory.
    OSError
        Where it cannot be opened or read.
    """
    name = doc or str(path)
    size, text = -1, ""
    try:
        data = _read_bytes(path, name, max_bytes)
        size = len(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            msg = f"{name}: not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}"
            raise MalformedError(msg) from None
        del data
        if text.startswith("\ufeff"):
            raise MalformedError(f"{name}: not JSON: it begins with a byte order mark")
        return _decoder(compact).decode(text)
    except json.JSONDecodeError as exc:
        raise MalformedError(f"{name}: not JSON: {exc}") from None
    except _TooDeepError as exc:
        line = text.count("\n", 0, exc.pos) + 1
        column = exc.pos - text.rfind("\n", 0, exc.pos)
        msg = f"{name}: nested more than {MAX_DEPTH} levels deep (line {line} column {column})"
        raise MalformedError(msg) from None
    except (MemoryError, RecursionError) as exc:
        what = "memory" if isinstance(exc, MemoryError) else "stack"
        bytes_ = f" ({size} bytes)" if size >= 0 else ""
        raise MalformedError(f"{name}: not enough {what} to read it{bytes_}") from None


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
            raise _fail(doc, cid, name, f"{_show(v)} has the wrong type")
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
        raise _fail(doc, None, "format", f"{_show(data.get('format'))}, expected {fmt!r}")
    if data.get("version") != VERSION:
        raise _fail(doc, None, "version", f"{_show(data.get('version'))}, expected {VERSION}")


def read_vectors(data: Any, /, *, doc: str = "vectors") -> list[VectorCase]:
    """Return the cases of a vectors document; :class:`MalformedError` where it is malformed."""
    _check_header(data, FORMAT_VECTORS, doc)
    cases = data.get("cases")
    if isinstance(cases, StringArray):  # strings, not cases: reported below
        cases = list(cases)
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
    """The verdict on one case: ``'pass'``, ``'fail'``, ``'zero_sign'`` or ``'skipped'``.

    ``'zero_sign'`` (:data:`ZERO_SIGN`): the case holds but for the sign of a
    zero that it compares; ``reason`` says where (and for ``'fail'``, why).
    """

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
        """Whether a MUST case failed (with ``strict``: any case, or a sign of a zero differed)."""
        return any(
            (o.status == "fail" and (strict or o.level == "MUST"))
            or (strict and o.status == ZERO_SIGN)
            for o in self.outcomes
        )

    def counts(self) -> dict[str, int]:
        """Return how many cases have each status: pass, fail, zero_sign and skipped."""
        out = dict.fromkeys(("pass", "fail", ZERO_SIGN, "skipped"), 0)
        for o in self.outcomes:
            out[o.status] += 1
        return out

    def by_property(self) -> dict[str, list[CaseOutcome]]:
        """Return the outcomes grouped by property, in report (group) order."""
        out: dict[str, list[CaseOutcome]] = {}
        for o in sorted(self.outcomes, key=lambda o: GROUPS.index(o.group)):
            out.setdefault(o.property, []).append(o)
        return out


def _compare(case: VectorCase, got: Any) -> tuple[str, str]:
    """Return the status of ``got`` for ``case`` and why: ``('pass', '')``, ``('fail', why)``...

    ... or ``(ZERO_SIGN, where)`` when the result holds but for the sign of a zero.
    """
    if case.expected_error:
        if isinstance(got, str):
            return "pass", ""
        return "fail", "returned a result; an error was expected"
    if isinstance(got, str):
        return "fail", f"raised an error: {got}"
    if isinstance(case.expected, ExpectedArray):
        pairs = [("result", got, case.expected)]
    else:
        assert case.expected is not None
        if not isinstance(got, tuple):
            return "fail", "a single array where the two gradients were expected"
        pairs = [
            ("grad_input", got[0], case.expected[0]),
            ("grad_target", got[1], case.expected[1]),
        ]
    signs = []
    for what, value, exp in pairs:
        if isinstance(value, tuple):
            return "fail", f"{what}: two arrays where one was expected"
        for signed in (False, True) if case.signed_zeros else (False,):
            try:
                assert_matches(
                    value,
                    exp.value,
                    exp.atol,
                    dtype=exp.value.dtype.name,
                    shape=exp.value.shape,
                    what=what,
                    signed_zeros=signed,
                )
            except AssertionError as exc:
                why = str(exc).replace("PyTorch's exact values", "the expected values")
                if not signed:
                    return "fail", why
                signs.append(why)
    return (ZERO_SIGN, "; ".join(signs)) if signs else ("pass", "")


def verify(
    vectors: Any,
    results: Any,
    /,
    *,
    vectors_doc: str = "vectors",
    results_doc: str = "results",
) -> Verification:
    """Compare a results document with a vectors document, case by case.

    Cases without a result are skipped. A result that holds but for the sign
    of a zero, where the case compares it (``"signed_zeros": true``), has the
    status :data:`ZERO_SIGN`: the sign of a zero is a SHOULD, whatever the
    case's level, and fails :meth:`Verification.failed` only with ``strict``.
    Raises :class:`MalformedError` (naming the document, the case and the
    field) where either document is malformed.

    ``vectors`` and ``results`` are the parsed documents, as :func:`load`
    returns them (with or without ``compact``).
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
            status, reason = _compare(case, got[case.id])
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
