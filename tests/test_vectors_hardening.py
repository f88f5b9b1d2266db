"""``kldiv-spec vectors verify`` on hostile and malformed files, its memory, and signed zeros.

Every malformed file exits 2 with one line on stderr naming the file (and, where it
applies, the case and the field), never a traceback: nesting past the limit, integers
past Python's digit limit, bytes that are not UTF-8, wrong types, bad shapes, data that
does not fit its shape, missing fields, files over ``--max-bytes`` (``/dev/zero``
included) and running out of memory. Exit 1 stays for results that disagree with the
vectors. A result that differs only in the sign of a zero is a SHOULD: reported, and
failing only with ``--strict``. The vectors are built by hand here, so that the module
needs no export.
"""

from __future__ import annotations

import copy
import io
import json
import os
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kldiv_spec.conformance import vectors as v
from kldiv_spec.conformance import vectors_cli
from kldiv_spec.conformance.vectors_cli import main as vectors_main

PREFIX = "kldiv-spec vectors verify: error: "
FLOAT_ID = "semantics.edge_values/table/21"
BACKWARD_ID = "gradients.edge_values/table/04"
PLAIN_ID = "accuracy.pointwise/plain"
INT_ID = "semantics.non_float_input/int64"


def array(
    dtype: str, shape: list[int], data: list[str], atol: str | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"dtype": dtype, "shape": shape, "data": data}
    if atol is not None:
        out["atol"] = atol
    return out


def case(cid: str, prop: str, function: str = "kl_div", **extra: Any) -> dict[str, Any]:
    one = array("float64", [1], ["1.0"])
    out = {
        "id": cid,
        "property": prop,
        "level": "MUST",
        "function": function,
        "reduction": "none",
        "log_target": False,
        "input": one,
        "target": one,
    }
    if function == "kl_div_backward":
        out["grad_output"] = one
    return {**out, **extra}


def documents() -> tuple[dict[str, Any], dict[str, Any]]:
    """A vectors document of four cases (two compare signed zeros) and results that pass."""
    cases = [
        case(
            FLOAT_ID,
            "semantics.edge_values",
            signed_zeros=True,
            expected=array("float64", [2], ["-0.0", "0.5"], atol="0.0"),
        ),
        case(
            BACKWARD_ID,
            "gradients.edge_values",
            "kl_div_backward",
            signed_zeros=True,
            expected={
                "grad_input": array("float64", [1], ["-0.0"], atol="0.0"),
                "grad_target": array("float64", [1], ["0.0"], atol="1e-300"),
            },
        ),
        case(  # no "signed_zeros": version 1 files may leave it out
            PLAIN_ID,
            "accuracy.pointwise",
            expected=array("float32", [2, 2], ["0.0", "1.5", "-2.0", "nan"], atol="1e-6"),
        ),
        case(
            INT_ID,
            "semantics.non_float_input",
            input=array("int64", [1], ["3"]),
            signed_zeros=False,
            expected_error=True,
        ),
    ]
    vectors = {"format": v.FORMAT_VECTORS, "version": 1, "generator": "test", "cases": cases}
    results = {
        "format": v.FORMAT_RESULTS,
        "version": 1,
        "implementation": "hand",
        "results": {
            FLOAT_ID: array("float64", [2], ["-0.0", "0.5"]),
            BACKWARD_ID: {
                "grad_input": array("float64", [1], ["-0.0"]),
                "grad_target": array("float64", [1], ["0.0"]),
            },
            PLAIN_ID: array("float32", [2, 2], ["0", "1.5", "-2", "nan"]),
            INT_ID: {"error": "TypeError: int64"},
        },
    }
    return vectors, results


def write(tmp_path: Path, name: str, data: Any) -> Path:
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def run(tmp_path: Path, vectors: Any, results: Any, *flags: str) -> int:
    vpath = write(tmp_path, "vectors.json", vectors)
    rpath = write(tmp_path, "results.json", results)
    return vectors_main(["verify", str(vpath), str(rpath), *flags])


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """Return the error line, asserting that it is the only output on stderr."""
    err = capsys.readouterr().err
    assert err.startswith(PREFIX) and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err[len(PREFIX) : -1]


def test_the_documents_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vectors, results = documents()
    assert run(tmp_path, vectors, results) == 0
    out = capsys.readouterr().out
    assert ": PASS (4 cases: 4 passed, 0 failed, 0 skipped)" in out  # the normal summary
    header = out.splitlines()[1].split()
    assert header == ["property", "group", "level", "status", "passed", "failed", "skipped"]


# --------------------------------------------------------------------------------------
# Malformed files: exit 2, one line


def test_json_nested_too_deeply(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vectors, _ = documents()
    deep = "[" * 10**5 + "]" * 10**5
    assert run(tmp_path, vectors, deep) == 2
    msg = one_line_error(capsys)
    assert msg.startswith(f"{tmp_path / 'results.json'}: nested more than {v.MAX_DEPTH} levels")
    objects = '{"results": ' + '{"a": ' * 10**5 + "1" + "}" * 10**5 + "}"
    assert run(tmp_path, objects, {}) == 2
    assert "vectors.json: nested more than 64 levels deep (line 1 column" in one_line_error(capsys)


def test_a_json_integer_of_5000_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vectors, results = documents()
    text = json.dumps(results).replace('"version": 1', '"version": ' + "9" * 5000)
    assert run(tmp_path, vectors, text) == 2
    assert one_line_error(capsys).endswith(
        "results.json: field 'version': <a number of 5000 digits>, expected 1"
    )
    text = json.dumps(results).replace('"shape": [2, 2]', '"shape": [2, ' + "9" * 5000 + "]")
    assert run(tmp_path, vectors, text) == 2
    msg = one_line_error(capsys)
    assert f"results.json: case {PLAIN_ID!r}: field 'results': shape [2, <a number" in msg


def test_an_integer_element_out_of_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vectors, results = documents()
    vectors["cases"][3]["input"]["data"] = ["9" * 5000]
    assert run(tmp_path, vectors, results) == 2
    msg = one_line_error(capsys)
    assert f"case {INT_ID!r}: field 'input': element 0 " in msg
    assert msg.endswith("is out of the range of int64")


def test_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vectors, results = documents()
    raw = json.dumps(results).replace('"hand"', '"caf\\u00e9"').encode("ascii")
    raw = raw.replace(b"caf\\u00e9", b"caf\xe9")  # Latin-1
    assert run(tmp_path, vectors, raw) == 2
    msg = one_line_error(capsys)
    offset = raw.index(b"\xe9")
    assert msg.endswith(f"results.json: not UTF-8: byte 0xe9 at offset {offset}")
    assert run(tmp_path, vectors, b"\xef\xbb\xbf" + json.dumps(results).encode()) == 2
    assert "results.json: not JSON: it begins with a byte order mark" in one_line_error(capsys)
    assert run(tmp_path, b"\x00\xff", results) == 2
    assert "vectors.json: not UTF-8: byte 0xff at offset 1" in one_line_error(capsys)


def _set(path: list[Any], value: Any) -> Any:
    def edit(doc: dict[str, Any]) -> None:
        node: Any = doc
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    edit.path, edit.in_case = path, len(path) > 2  # type: ignore[attr-defined]
    return edit


R = ["results"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # wrong types
        (_set(R, []), "field 'results': missing, or not an object"),
        (_set(["implementation"], 5), "field 'implementation': missing, or not a string"),
        (_set([*R, PLAIN_ID], ["0"]), "'results': not an object with 'dtype', 'shape' and"),
        (_set([*R, PLAIN_ID, "data"], 5), "'results': 'data' is not a list"),
        (_set([*R, PLAIN_ID, "data"], ["0", 1.5, "1", "2"]), "element 1 is 1.5, not a string"),
        (_set([*R, PLAIN_ID, "data"], ["0", "x", "1", "2"]), 'element 1 "x" is not a decimal'),
        (_set([*R, PLAIN_ID, "dtype"], ["float32"]), 'dtype ["float32"] is not one of'),
        (_set([*R, PLAIN_ID, "shape"], "2x2"), 'shape "2x2" is not a list of non-negative'),
        (_set([*R, PLAIN_ID, "shape"], [2.0, 2]), "shape [2.0, 2] is not a list of non-negative"),
        (_set([*R, INT_ID, "error"], 3), "field 'error': not a string"),
        (_set([*R, BACKWARD_ID], array("float64", [1], ["0"])), "not {'grad_input': ARRAY"),
        # negative and huge shapes
        (_set([*R, PLAIN_ID, "shape"], [-1, -4]), "shape [-1, -4] is not a list of non-negative"),
        (
            _set([*R, PLAIN_ID, "shape"], [0, 10**30]),
            "shape [0, 10**30]: 10**30 elements is too large",
        ),
        (_set([*R, PLAIN_ID, "shape"], [2**41]), "shape [2199023255552]: 2199023255552 elem"),
        (_set([*R, PLAIN_ID, "shape"], [1] * 40), "shape has 40 dimensions; at most 32"),
        # values that do not fit the shape
        (_set([*R, PLAIN_ID, "shape"], [2, 3]), "'data' has 4 elements, shape [2, 3] needs 6"),
        (_set([*R, PLAIN_ID, "data"], ["1"] * 5), "'data' has 5 elements, shape [2, 2] needs 4"),
        # missing fields
        (_set([*R, PLAIN_ID, "shape"], KeyError), "field 'results': missing 'shape'"),
        (_set([*R, PLAIN_ID, "data"], KeyError), "field 'results': missing 'data'"),
        (_set([*R, BACKWARD_ID, "grad_target"], KeyError), "field 'results': not {'grad_input'"),
        (_set(["implementation"], KeyError), "field 'implementation': missing"),
        (_set(["format"], KeyError), "field 'format': null, expected 'kldiv-spec-results'"),
        (_set([*R, "no/such/case"], {"error": "x"}), "no case of the vectors has this id"),
    ],
)
def test_malformed_results_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: Any, message: str
) -> None:
    vectors, results = documents()
    edit(results)
    assert run(tmp_path, vectors, results) == 2
    msg = one_line_error(capsys)
    assert msg.startswith(f"{tmp_path / 'results.json'}: ") and message in msg, msg
    if edit.in_case:
        assert f"results.json: case {edit.path[1]!r}: field " in msg


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set(["cases"], ["a", "b"]), "field 'cases[0]': not an object"),
        (_set(["cases", 0, "level"], 1), "case 'semantics.edge_values/table/21': field 'level'"),
        (_set(["cases", 0, "signed_zeros"], "yes"), "field 'signed_zeros': not a boolean"),
        (_set(["cases", 0, "expected", "atol"], ["0"]), "'atol' has 1 elements, 'data' 2"),
        (_set(["cases", 0, "expected", "shape"], [0, 10**30]), "10**30 elements is too large"),
        (_set(["cases", 1, "expected"], KeyError), "field 'expected': missing"),
        (_set(["cases", 2, "input"], KeyError), "field 'input': not an object with"),
    ],
)
def test_malformed_vectors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: Any, message: str
) -> None:
    vectors, results = documents()
    edit(vectors)
    assert run(tmp_path, vectors, results) == 2
    msg = one_line_error(capsys)
    assert msg.startswith(f"{tmp_path / 'vectors.json'}: ") and message in msg, msg


def test_control_characters_stay_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vectors, results = documents()
    results["results"]["bad\nid\ud800"] = {"error": "x"}
    assert run(tmp_path, vectors, results) == 2
    assert "'bad\\nid\\ud800'" in one_line_error(capsys)


# --------------------------------------------------------------------------------------
# Size limits and memory


def test_dev_zero_is_read_up_to_the_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    _, results = documents()
    rpath = write(tmp_path, "results.json", results)
    start = time.perf_counter()
    assert vectors_main(["verify", "/dev/zero", str(rpath), "--max-bytes", "100000"]) == 2
    assert time.perf_counter() - start < 2
    assert (
        one_line_error(capsys) == "/dev/zero: larger than the limit of 100000 bytes (--max-bytes)"
    )


def test_a_file_over_the_limit_is_refused_unread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vectors, results = documents()
    results["implementation"] += " " * len(json.dumps(vectors))  # the larger file
    size = len(json.dumps(results).encode())
    assert run(tmp_path, vectors, results, "--max-bytes", str(size)) == 0
    capsys.readouterr()
    assert run(tmp_path, vectors, results, "--max-bytes", str(size - 1)) == 2
    msg = one_line_error(capsys)
    assert msg.endswith(
        f"results.json: {size} bytes, larger than the limit of {size - 1} (--max-bytes)"
    )
    assert run(tmp_path, vectors, results, "--max-bytes", "0") == 2
    assert one_line_error(capsys) == "--max-bytes must be >= 1"


def test_stdin_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    class Stdin:
        buffer = io.BytesIO(b"[" * 5000)

    monkeypatch.setattr("sys.stdin", Stdin)
    with pytest.raises(v.MalformedError, match=r"^-: larger than the limit of 1000 bytes"):
        v.load("-", max_bytes=1000)
    Stdin.buffer = io.BytesIO(b'{"a": ["1", "2"]}')
    assert v.load("-") == {"a": ["1", "2"]}


def test_unreadable_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, results = documents()
    rpath = write(tmp_path, "results.json", results)
    assert vectors_main(["verify", str(tmp_path), str(rpath)]) == 2
    assert one_line_error(capsys) == f"{tmp_path}: cannot read it: Is a directory"
    assert vectors_main(["verify", str(tmp_path / "none.json"), str(rpath)]) == 2
    assert "none.json: cannot read it: No such file or directory" in one_line_error(capsys)


def test_out_of_memory_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors, results = documents()

    def no_memory(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError

    with monkeypatch.context() as m:
        m.setattr(v, "_decoder", no_memory)  # while reading a file
        assert run(tmp_path, vectors, results) == 2
        size = len(json.dumps(vectors).encode())
        assert one_line_error(capsys).endswith(
            f"vectors.json: not enough memory to read it ({size} bytes)"
        )
    monkeypatch.setattr(vectors_cli, "verify", no_memory)  # while comparing
    assert run(tmp_path, vectors, results) == 2
    msg = one_line_error(capsys)
    assert msg.endswith(
        "results.json: not enough memory to compare it with " + str(tmp_path / "vectors.json")
    )


def synthetic(n_cases: int, size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Vectors and passing results of ``n_cases`` float64 arrays of ``size`` elements."""
    rng = np.random.default_rng(0)
    cases, results = [], {}
    for i in range(n_cases):
        data = [repr(x) for x in rng.standard_normal(size).tolist()]
        data[::7] = ["0.0"] * len(data[::7])
        cid = f"accuracy.pointwise/synthetic/{i}"
        one = array("float64", [], ["1.0"])
        expected = array("float64", [size], data, atol="1e-300")
        cases.append(case(cid, "accuracy.pointwise", input=one, target=one, expected=expected))
        results[cid] = array("float64", [size], data)
    vectors = {"format": v.FORMAT_VECTORS, "version": 1, "generator": "test", "cases": cases}
    return vectors, {**documents()[1], "results": results}


def test_memory_is_a_small_multiple_of_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vectors, results = synthetic(40, 4096)
    vpath = write(tmp_path, "vectors.json", v.dumps(vectors))
    rpath = write(tmp_path, "results.json", v.dumps(results))
    rsize, vsize = rpath.stat().st_size, vpath.stat().st_size
    assert rsize > 3_000_000
    cases = v.read_vectors(v.load(vpath, compact=True))
    tracemalloc.start()
    try:
        _, got = v.read_results(v.load(rpath, compact=True), cases)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        assert len(got) == 40
        del got, cases
        assert vectors_main(["verify", str(vpath), str(rpath)]) == 0
        _, peak_verify = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the text and its bytes (2x while decoding), then 8 bytes a value: about 2x in all;
    # json.load took about 6x for these values, 11x for short ones
    assert peak < 3 * rsize, peak / rsize
    assert peak_verify < 3 * (rsize + vsize), peak_verify / (rsize + vsize)
    assert ": PASS (40 cases: 40 passed" in capsys.readouterr().out


def test_compact_and_plain_loads_read_the_same(tmp_path: Path) -> None:
    vectors, results = synthetic(3, 50)
    results["results"]["spaced"] = {"data": ["1", "x y", ",", "", "nan"], "shape": [[" "]]}
    for doc in (vectors, results):
        for text in (v.dumps(doc), json.dumps(doc, indent=3)):
            path = write(tmp_path, "doc.json", text)
            assert v.load(path) == json.loads(text)
            compact = v.load(path, compact=True)
            data = compact["cases"][1]["expected"]["data"] if "cases" in doc else None
            if data is not None:
                assert isinstance(data, v.StringArray)
                assert list(data) == doc["cases"][1]["expected"]["data"] == data
                assert [s for c in data.chunks(size=30) for s in c] == list(data)


def test_parse_array_reads_a_string_array_in_chunks() -> None:
    values = [repr(x) for x in np.linspace(-1, 1, 1001).tolist()] + ["nan", "-inf", "-0.0"]
    text = ",\n ".join(json.dumps(s) for s in values)
    data = v.StringArray(text, len(values))
    chunks = list(data.chunks(size=100))
    assert len(chunks) > 10 and [s for c in chunks for s in c] == values
    got = v.parse_array({"dtype": "float32", "shape": [len(values)], "data": data})
    want = np.asarray([float(s) for s in values]).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    assert np.signbit(got[-1])
    bad = v.StringArray(text.replace('"0.5"', '"0.5x"'), len(values))
    with pytest.raises(v.MalformedError, match=r"element 750 \"0\.5x\" is not a decimal"):
        v.parse_array({"dtype": "float64", "shape": [len(values)], "data": bad})


# --------------------------------------------------------------------------------------
# The sign of a zero: a SHOULD


def flip_signs(results: dict[str, Any]) -> dict[str, Any]:
    results = copy.deepcopy(results)
    res = results["results"]
    res[FLOAT_ID]["data"][0] = "0.0"  # -0.0 expected
    res[BACKWARD_ID]["grad_input"]["data"][0] = "0"  # -0.0 expected
    res[PLAIN_ID]["data"][0] = "-0.0"  # no signed zeros: holds
    return results


def test_a_zero_of_the_other_sign_is_reported_not_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vectors, results = documents()
    flipped = flip_signs(results)
    assert run(tmp_path, vectors, flipped, "--json", str(tmp_path / "out.json")) == 0
    out = capsys.readouterr().out
    assert (
        ": PASS (4 cases: 2 passed, 0 failed, 2 with a zero of the other sign, 0 skipped)" in out
    )
    assert out.splitlines()[1].split()[-2:] == ["zero_sign", "skipped"]
    assert "\nZERO SIGN semantics.edge_values (SHOULD: a zero of the other sign; passes" in out
    assert f"  {FLOAT_ID}: result: the sign of a zero differs in 1 of 2 elements" in out
    assert f"  {BACKWARD_ID}: grad_input: the sign of a zero differs" in out
    assert "\nFAIL " not in out
    outcomes = json.loads((tmp_path / "out.json").read_text())
    assert outcomes["status"] == "pass"
    status = {o["id"]: o["status"] for o in outcomes["outcomes"]}
    assert status == {
        FLOAT_ID: "zero_sign",
        BACKWARD_ID: "zero_sign",
        PLAIN_ID: "pass",
        INT_ID: "pass",
    }


def test_a_zero_of_the_other_sign_fails_with_strict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vectors, results = documents()
    assert run(tmp_path, vectors, flip_signs(results), "--strict") == 1
    out = capsys.readouterr().out
    assert ": FAIL (4 cases: 2 passed, 0 failed, 2 with a zero of the other sign" in out
    assert "\nZERO SIGN gradients.edge_values (SHOULD: a zero of the other sign; fails)" in out
    assert run(tmp_path, vectors, results, "--strict") == 0  # nothing else fails


def test_the_api_counts_zero_signs_per_case() -> None:
    vectors, results = documents()
    report = v.verify(vectors, flip_signs(results))
    assert report.counts() == {"pass": 2, "fail": 0, v.ZERO_SIGN: 2, "skipped": 0}
    assert not report.failed() and report.failed(strict=True)
    both = flip_signs(results)
    both["results"][FLOAT_ID]["data"][0] = "-0.0"
    both["results"][BACKWARD_ID]["grad_input"]["data"] = ["-0.0"]
    assert v.verify(vectors, both).counts()[v.ZERO_SIGN] == 0


def test_a_real_failure_outranks_the_sign_of_a_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vectors, results = documents()
    flipped = flip_signs(results)
    flipped["results"][BACKWARD_ID]["grad_target"]["data"] = ["1.0"]  # 0.0 expected
    flipped["results"][FLOAT_ID]["data"][1] = "0.75"  # 0.5 expected
    report = v.verify(vectors, flipped)
    status = {o.id: (o.status, o.reason) for o in report.outcomes}
    assert status[BACKWARD_ID][0] == "fail" and "grad_target" in status[BACKWARD_ID][1]
    assert (
        status[FLOAT_ID][0] == "fail" and "differ from the expected values" in status[FLOAT_ID][1]
    )
    assert run(tmp_path, vectors, flipped) == 1
    assert "\nFAIL gradients.edge_values (MUST)" in capsys.readouterr().out
