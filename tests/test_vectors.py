"""Golden vectors: export, the two formats and their schemas, verify, and ports in Python and JS.

One default export is shared by the module. The reference (``kldiv_spec`` on NumPy),
PyTorch's own ``kl_div`` and the JavaScript port in ``examples/js`` (where ``node`` is
on the PATH) must pass ``kldiv-spec vectors verify``; the port's deliberately broken
variant, a clamping Python implementation and edited results must not; malformed
files exit 2 naming the case and the field.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import mpmath
import numpy as np
import pytest

import kldiv_spec
from kldiv_spec._cli import main as kldiv_spec_main
from kldiv_spec.conformance import PROPERTIES
from kldiv_spec.conformance import vectors as v
from kldiv_spec.conformance.vectors_cases import EDGE_TABLE, round_exact, round_to_dtype
from kldiv_spec.conformance.vectors_cli import main as vectors_main

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "conformance" / "schemas"
JS = ROOT / "examples" / "js"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not on the PATH")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vectors") / "vectors.json"
    assert vectors_main(["export", str(path), "--quiet"]) == 0
    return path


@pytest.fixture(scope="module")
def document(exported: Path) -> dict[str, Any]:
    return json.loads(exported.read_text())


@pytest.fixture(scope="module")
def reference_results(document: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = v.run_python(
        document, kldiv_spec.kl_div, kldiv_spec.kl_div_backward, implementation="kldiv_spec"
    )
    path = tmp_path_factory.mktemp("results") / "reference.json"
    path.write_text(v.dumps(results))
    return path


@pytest.fixture(scope="module")
def small(document: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The edge table and a few cases of every other property, and the reference's results."""
    per_property: dict[str, int] = {}
    cases = []
    for c in document["cases"]:
        if "/table/" in c["id"] or (
            per_property.get(c["property"], 0) < 4 and "large" not in c["property"]
        ):
            per_property[c["property"]] = per_property.get(c["property"], 0) + 1
            cases.append(c)
    doc = {**document, "cases": cases}
    results = v.run_python(doc, kldiv_spec.kl_div, kldiv_spec.kl_div_backward)
    return doc, results


def write(tmp_path: Path, name: str, data: Any) -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def verify_files(tmp_path: Path, vectors: Any, results: Any) -> int:
    return vectors_main(
        [
            "verify",
            str(write(tmp_path, "v.json", vectors)),
            str(write(tmp_path, "r.json", results)),
        ]
    )


# --------------------------------------------------------------------------------------
# A validator for the subset of JSON Schema (2020-12) the schemas use.


def _resolve(root: dict[str, Any], ref: str) -> dict[str, Any]:
    node: Any = root
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _type_ok(inst: Any, kind: str) -> bool:
    checks = {
        "object": lambda x: isinstance(x, dict),
        "array": lambda x: isinstance(x, list),
        "string": lambda x: isinstance(x, str),
        "boolean": lambda x: isinstance(x, bool),
        "integer": lambda x: isinstance(x, int) and not isinstance(x, bool),
        "number": lambda x: isinstance(x, int | float) and not isinstance(x, bool),
    }
    return checks[kind](inst)


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def schema_errors(inst: Any, sch: dict[str, Any], root: dict[str, Any], path: str = "$") -> list:
    """Return the violations of ``sch`` by ``inst`` (the keywords the schemas use)."""
    errors: list[str] = []
    if "$ref" in sch:
        errors += schema_errors(inst, _resolve(root, sch["$ref"]), root, path)
    if "type" in sch and not _type_ok(inst, sch["type"]):
        return [*errors, f"{path}: not of type {sch['type']}"]
    if "const" in sch and not _same(inst, sch["const"]):
        errors.append(f"{path}: not {sch['const']!r}")
    if "enum" in sch and not any(_same(inst, e) for e in sch["enum"]):
        errors.append(f"{path}: not one of {sch['enum']}")
    if isinstance(inst, str):
        if "pattern" in sch and not re.search(sch["pattern"], inst):
            errors.append(f"{path}: {inst!r} does not match {sch['pattern']}")
        if len(inst) < sch.get("minLength", 0):
            errors.append(f"{path}: too short")
    if isinstance(inst, int) and "minimum" in sch and inst < sch["minimum"]:
        errors.append(f"{path}: below {sch['minimum']}")
    if isinstance(inst, dict):
        props = sch.get("properties", {})
        errors += [f"{path}: missing {k!r}" for k in sch.get("required", []) if k not in inst]
        for k, value in inst.items():
            if k in props:
                errors += schema_errors(value, props[k], root, f"{path}.{k}")
            elif sch.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected {k!r}")
            elif isinstance(sch.get("additionalProperties"), dict):
                errors += schema_errors(value, sch["additionalProperties"], root, f"{path}.{k}")
    if isinstance(inst, list) and "items" in sch:
        for i, item in enumerate(inst):
            errors += schema_errors(item, sch["items"], root, f"{path}[{i}]")
    for sub in sch.get("allOf", []):
        errors += schema_errors(inst, sub, root, path)
    if "oneOf" in sch:
        passing = sum(not schema_errors(inst, sub, root, path) for sub in sch["oneOf"])
        if passing != 1:
            errors.append(f"{path}: matches {passing} of the oneOf branches, not 1")
    return errors


def assert_valid(inst: Any, kind: str) -> None:
    sch = json.loads((SCHEMAS / f"{kind}.schema.json").read_text())
    assert sch == v.schema(kind)  # the installed copy is the source tree's
    assert schema_errors(inst, sch, sch) == []
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.Draft202012Validator(sch).validate(inst)


# --------------------------------------------------------------------------------------
# Export


def test_export_is_deterministic(exported: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.json"
    code = "import sys; from kldiv_spec._cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", code, "vectors", "export", str(again)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"wrote \d+ cases \(\d+ bytes\) to .*\n", proc.stderr)
    assert again.read_bytes() == exported.read_bytes()


def test_default_export_is_a_few_megabytes(exported: Path) -> None:
    assert 500_000 < exported.stat().st_size < 4_000_000


def test_coverage(document: dict[str, Any]) -> None:
    cases = document["cases"]
    ids = [c["id"] for c in cases]
    assert len(ids) == len(set(ids))
    by_prop: dict[str, list[dict[str, Any]]] = {}
    for c in cases:
        by_prop.setdefault(c["property"], []).append(c)
    # every row of the spec's edge table, forward and backward, with signed zeros
    for prop in ("semantics.edge_values", "gradients.edge_values"):
        rows = [c for c in by_prop[prop] if "/table/" in c["id"]]
        assert len(rows) == len(EDGE_TABLE) and all(c["signed_zeros"] for c in rows)
    # every reduction with and without log_target, forward and backward, in each dtype
    for fn in v.FUNCTIONS:
        combos = {
            (c["reduction"], c["log_target"], c["input"]["dtype"])
            for c in cases
            if c["function"] == fn and not c.get("expected_error")
        }
        for red in ("none", "sum", "mean", "batchmean"):
            for lt in (False, True):
                for dtype in v.FLOAT_DTYPES:
                    assert (red, lt, dtype) in combos, (fn, red, lt, dtype)
    shapes = {(tuple(c["input"]["shape"]), tuple(c["target"]["shape"])) for c in cases}
    for pair in [((1, 4), (3, 4)), ((4,), (3, 4)), ((3, 1), (1, 4)), ((), (3, 4)), ((), ())]:
        assert pair in shapes
    assert any(0 in c["input"]["shape"] for c in by_prop["semantics.empty"])
    mixed = {
        (c["input"]["dtype"], c["target"]["dtype"], c["expected"]["dtype"])
        for c in by_prop["semantics.dtypes"]
    }
    assert ("float16", "float32", "float32") in mixed and (
        "float64",
        "float16",
        "float64",
    ) in mixed
    assert max(max(c["target"]["shape"]) for c in by_prop["accuracy.large_support"]) == 4096
    subnormal = [
        float(s)
        for c in by_prop["accuracy.subnormal"]
        if not c["log_target"]
        for s in c["target"]["data"]
    ]
    assert min(subnormal) == 2.0**-1074
    errors = {c["property"] for c in cases if c.get("expected_error")}
    assert errors == {
        "semantics.bad_reduction",
        "semantics.non_float_input",
        "semantics.incompatible_shapes",
    }
    # each case names its property, whose level is the suite's where the suite has it
    for c in cases:
        info = document["properties"][c["property"]]
        assert c["level"] == info["level"]
        if c["property"] in PROPERTIES:
            assert info["level"] == PROPERTIES[c["property"]].level


def test_export_options(tmp_path: Path) -> None:
    doc = v.export(functions=["kl_div"], dtypes=["float64"], max_elements=8, groups=["semantics"])
    assert doc["cases"] and doc["options"]["max_elements"] == 8
    for c in doc["cases"]:
        assert c["function"] == "kl_div" and c["property"].startswith("semantics.")
        arrays = [c["input"], c["target"]] + ([c["expected"]] if "expected" in c else [])
        assert all(a["dtype"] in ("float64", "int32", "int64", "bool") for a in arrays)
        assert all(math.prod(a["shape"]) <= 8 for a in arrays)


def test_export_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert kldiv_spec_main(["vectors", "export", "--help"]) == 0
    text = capsys.readouterr().out
    assert all(opt in text for opt in ("--function", "--dtype", "--max-elements", "--group"))
    assert kldiv_spec_main(["vectors"]) == 2
    assert kldiv_spec_main(["vectors", "export", "x.json", "--dtype", "bfloat16"]) == 2
    assert kldiv_spec_main(["vectors", "export", "x.json", "--max-elements", "0"]) == 2
    assert "vectors" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# Values: correct rounding, shortest decimals, the rounding rule of the means


def test_round_to_dtype_rounds_once_from_the_exact_value() -> None:
    # 1 + 2^-11 + 2^-60 rounds up in float16; through float64 it would round to 1.
    v16 = np.longdouble(1) + np.longdouble(2) ** -11 + np.longdouble(2) ** -60
    got = round_to_dtype(np.asarray([v16, -v16]), np.float16).tolist()
    assert got == [1.0009765625, -1.0009765625]
    assert round_exact(Fraction(1) + Fraction(1, 2**11) + Fraction(1, 2**60), "float16") == (
        1.0009765625
    )
    assert round_exact(Fraction(65520), "float16") == math.inf  # the tie rounds to even: up
    assert round_exact(Fraction(65519), "float16") == 65504.0
    assert round_exact(Fraction(3, 2**26), "float16") == 2.0**-24  # subnormal, rounds up
    assert round_exact(Fraction(1, 2**25), "float16") == 0.0  # the tie rounds to even: 0
    rng = np.random.default_rng(0)
    values = rng.standard_normal(500).astype(np.longdouble) * np.longdouble(10) ** rng.integers(
        -40, 30, 500
    )
    for dtype in v.FLOAT_DTYPES:
        want = [round_exact(Fraction(*x.as_integer_ratio()), dtype) for x in values]
        with np.errstate(over="ignore"):
            assert round_to_dtype(values, dtype).astype(np.float64).tolist() == want


def test_format_value_is_the_shortest_round_trip() -> None:
    assert [v.format_value(x, "float32") for x in (0.1, 1.0, 1e-45, -0.0, math.inf)] == [
        "0.1",
        "1.0",
        "1e-45",
        "-0.0",
        "inf",
    ]
    assert v.format_value(65504, "float16") == "65500.0"
    assert v.format_value(math.nan, "float64") == "nan"
    rng = np.random.default_rng(1)
    for dtype, top in (("float16", 4), ("float32", 30)):
        xs = (rng.standard_normal(3000) * 10.0 ** rng.integers(-top, top, 3000)).astype(dtype)
        for x in xs:
            s = v.format_value(x, dtype)
            assert np.asarray(float(s)).astype(dtype) == x
            mantissa = np.format_float_scientific(x, unique=True).split("e")[0]
            assert re.sub(r"e.*|\D|^0+", "", s).strip("0") == mantissa.replace(".", "").strip("-0")
    assert v.format_tolerance(1.2300000001e-8) == "1.24e-08"
    assert float(v.format_tolerance(4.45e-323)) >= 4.45e-323


MP = mpmath.MPContext()
MP.prec = 200


def _mp_loss(x: float, t: float, log_target: bool) -> Any:
    mx, mt = MP.mpf(x), MP.mpf(t)
    if log_target:
        return MP.exp(mt) * (mt - mx)
    return (mt * MP.log(mt) if t else 0) - mt * mx


def _half_ulp(e: float, dtype: str) -> Any:
    return MP.mpf(float(np.spacing(np.abs(np.asarray(e, dtype=dtype))))) / 2


def test_expected_values_are_correctly_rounded(document: dict[str, Any]) -> None:
    """Within half an ULP of the dtype of an independent 200-bit evaluation."""
    checked = 0
    for c in document["cases"]:
        if not c["property"].startswith("accuracy.") or c["function"] != "kl_div":
            continue
        if "large" in c["property"]:
            continue
        x = v.parse_array(c["input"]).astype(np.float64).ravel()
        t = v.parse_array(c["target"]).astype(np.float64).ravel()
        dtype = c["expected"]["dtype"]
        want = v.parse_array(c["expected"]).astype(np.float64).ravel().tolist()
        exact = [_mp_loss(a, b, c["log_target"]) for a, b in zip(x, t, strict=True)]
        with np.errstate(under="ignore"):
            # where e^t underflows in the dtype, the loss is PyTorch's IEEE 0 * (t - x)
            ieee = c["log_target"] & (np.exp(t.astype(dtype)) == 0)
        if c["reduction"] == "none":
            for e, m, special in zip(want, exact, ieee, strict=True):
                assert special or abs(MP.mpf(e) - m) <= _half_ulp(e, dtype), c["id"]
        elif ieee.any():
            continue
        elif c["reduction"] == "sum":
            assert abs(MP.mpf(want[0]) - MP.fsum(exact)) <= _half_ulp(want[0], dtype)
        else:  # the rounding rule: the sum rounded, then divided and rounded once
            total = np.asarray(round_exact(MP.fsum(exact), dtype), dtype=dtype)
            d = x.size if c["reduction"] == "mean" else v.parse_array(c["input"]).shape[0]
            if dtype == "float16":
                q = np.asarray(np.float32(total) / np.float32(d)).astype(np.float16)
            else:
                q = total / np.asarray(d, dtype=dtype)
            assert want[0] == float(q), c["id"]
        checked += 1
    assert checked > 100


# --------------------------------------------------------------------------------------
# The formats


def test_both_files_follow_their_schemas(
    document: dict[str, Any], reference_results: Path
) -> None:
    assert_valid(document, "vectors")
    assert_valid(json.loads(reference_results.read_text()), "results")


def test_the_schema_check_is_not_vacuous(small: tuple[dict[str, Any], dict[str, Any]]) -> None:
    doc, results = small
    sch = v.schema("vectors")
    bad = copy.deepcopy(doc)
    bad["cases"][0]["input"]["data"][0] = 1.5  # a number, not a string
    del bad["cases"][1]["reduction"]
    errors = schema_errors(bad, sch, sch)
    assert any("input.data[0]" in e for e in errors) and any("reduction" in e for e in errors)
    rsch = v.schema("results")
    bad_results = copy.deepcopy(results)
    first = next(iter(bad_results["results"]))
    bad_results["results"][first] = {"dtype": "float64", "shape": [], "data": ["1,5"]}
    assert schema_errors(bad_results, rsch, rsch)


# --------------------------------------------------------------------------------------
# Verify


def test_the_reference_passes(
    exported: Path, reference_results: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert vectors_main(["verify", str(exported), str(reference_results)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("kldiv_spec against ") and ": PASS (" in out
    header = out.splitlines()[1].split()
    assert header == ["property", "group", "level", "status", "passed", "failed", "skipped"]
    assert re.search(r"^semantics\.edge_values +semantics +MUST +pass ", out, re.MULTILINE)


def test_pytorch_passes_but_for_a_should(small: tuple[dict[str, Any], dict[str, Any]]) -> None:
    torch = pytest.importorskip("torch")
    doc = small[0]

    def fn(x: Any, t: Any, **kw: Any) -> Any:
        return torch.nn.functional.kl_div(x, t, **kw)

    def backward(g: Any, x: Any, t: Any, **kw: Any) -> Any:
        x, t = x.clone().requires_grad_(), t.clone().requires_grad_()
        out = torch.nn.functional.kl_div(x, t, **kw)
        return torch.autograd.grad(out, (x, t), g.to(out.dtype).expand(out.shape))

    results = v.run_python(doc, fn, backward, asarray=torch.from_numpy)
    report = v.verify(doc, results)
    assert not report.failed()
    failing = {(o.property, o.level) for o in report.outcomes if o.status == "fail"}
    assert failing <= {("gradients.subnormal", "SHOULD")}
    assert report.failed(strict=True) == bool(failing)


def test_skipped_cases(
    small: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    doc, results = small
    half = {k: r for k, r in results["results"].items() if "float16" not in json.dumps(r)}
    assert len(half) < len(results["results"])
    assert verify_files(tmp_path, doc, {**results, "results": half}) == 0
    out = capsys.readouterr().out
    skipped = len(results["results"]) - len(half)
    assert f"0 failed, {skipped} skipped)" in out
    no_backward = v.run_python(doc, kldiv_spec.kl_div)  # backward cases left out
    report = v.verify(doc, no_backward)
    assert {o.status for o in report.outcomes if o.property.startswith("gradients.")} == {
        "skipped"
    }


def test_a_clamping_implementation_fails(
    small: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    doc, _ = small

    def clamped(x: Any, t: Any, **kw: Any) -> Any:
        return kldiv_spec.kl_div(x, np.maximum(t, np.asarray(1e-12, t.dtype)), **kw)

    assert verify_files(tmp_path, doc, v.run_python(doc, clamped)) == 1
    out = capsys.readouterr().out
    assert ": FAIL (" in out and "\nFAIL semantics.edge_values (MUST: " in out


def _result_of(results: dict[str, Any], prefix: str) -> tuple[str, dict[str, Any]]:
    return next((k, r) for k, r in results["results"].items() if k.startswith(prefix))


@pytest.mark.parametrize(
    ("prefix", "edit", "reason"),
    [  # the sign of a zero is a SHOULD: tests/test_vectors_hardening.py
        (
            "semantics.edge_values/table/08",
            lambda r: r["data"].__setitem__(0, "-inf"),  # +inf expected
            "an infinity that differs",
        ),
        (
            "semantics.edge_values/table/05",
            lambda r: r["data"].__setitem__(0, "0.0"),  # NaN expected
            "NaN where the oracle has none, or a number for its NaN",
        ),
        (
            "accuracy.reductions/",
            lambda r: r["data"].__setitem__(0, repr(float(r["data"][0]) * 1.5)),
            "differ from the expected values",
        ),
        ("accuracy.reductions/", lambda r: r.__setitem__("dtype", "float32"), "dtype float32"),
        ("semantics.zero_dim/", lambda r: r.__setitem__("shape", [1]), "result shape (1,)"),
        ("semantics.bad_reduction/", lambda r: r.update(v.format_array(np.zeros(()))), "error"),
    ],
)
def test_verify_rejects(
    small: tuple[dict[str, Any], dict[str, Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    prefix: str,
    edit: Any,
    reason: str,
) -> None:
    doc, results = small
    results = copy.deepcopy(results)
    cid, result = _result_of(results, prefix)
    if "error" in result:
        result.clear()
    edit(result)
    assert verify_files(tmp_path, doc, results) == 1
    out = capsys.readouterr().out
    assert f"  {cid}: " in out and reason in out


def test_signed_zeros_only_where_the_case_says(
    small: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    doc, results = small
    results = copy.deepcopy(results)
    flipped = 0
    for c in doc["cases"]:
        r = results["results"].get(c["id"])
        if c["signed_zeros"] or c["function"] != "kl_div" or not isinstance(r, dict):
            continue
        if "data" in r and "0.0" in r["data"]:
            r["data"] = ["-0.0" if s == "0.0" else s for s in r["data"]]
            flipped += 1
    assert flipped and not v.verify(doc, results).failed()


@pytest.mark.parametrize(
    ("which", "edit", "message"),
    [
        ("results", lambda d, c: d["results"][c].__setitem__("data", ["abc"]), "field 'results'"),
        ("results", lambda d, c: d["results"][c]["data"].append("1.0"), "'data' has"),
        ("results", lambda d, c: d.__setitem__("format", "other"), "field 'format'"),
        ("results", lambda d, c: d["results"].__setitem__("no/such/case", {}), "'no/such/case'"),
        ("results", lambda d, c: d["results"][c].__setitem__("dtype", "float8"), "dtype"),
        ("vectors", lambda d, c: d["cases"][0].pop("expected"), "field 'expected'"),
        ("vectors", lambda d, c: d["cases"][0]["expected"].__setitem__("atol", "-1"), "atol"),
        ("vectors", lambda d, c: d["cases"][0]["input"].__setitem__("shape", [7]), "'input'"),
        ("vectors", lambda d, c: d.__setitem__("version", 2), "field 'version'"),
    ],
)
def test_malformed_files_exit_2(
    small: tuple[dict[str, Any], dict[str, Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    which: str,
    edit: Any,
    message: str,
) -> None:
    doc, results = copy.deepcopy(small[0]), copy.deepcopy(small[1])
    first = doc["cases"][0]["id"]
    edit(results if which == "results" else doc, first)
    assert verify_files(tmp_path, doc, results) == 2
    err = capsys.readouterr().err
    assert err.startswith("kldiv-spec vectors verify: error: ") and message in err
    if which == "results" and "format" not in message and "no/such" not in message:
        assert f"case {first!r}" in err


def test_unreadable_files_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert verify_files(tmp_path, "{not json", {}) == 2
    assert "not JSON" in capsys.readouterr().err
    assert vectors_main(["verify", str(tmp_path / "missing.json"), str(tmp_path / "x")]) == 2


# --------------------------------------------------------------------------------------
# The JavaScript port


def run_node(exported: Path, tmp_path: Path, *flags: str) -> Path:
    assert NODE is not None
    proc = subprocess.run(
        [NODE, str(JS / "run.js"), str(exported), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "js-results.json"
    path.write_text(proc.stdout)
    return path


@needs_node
def test_the_javascript_port_passes(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = run_node(exported, tmp_path)
    assert_valid(json.loads(results.read_text()), "results")
    assert kldiv_spec_main(["vectors", "verify", str(exported), str(results)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("examples/js/kldiv.js against ") and " 0 failed, 0 skipped)" in out


@needs_node
def test_the_broken_javascript_variant_fails(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = run_node(exported, tmp_path, "--bug", "batchmean-divisor")
    assert kldiv_spec_main(["vectors", "verify", str(exported), str(results)]) == 1
    out = capsys.readouterr().out
    assert "\nFAIL semantics.broadcasting (MUST: " in out
    assert "\nFAIL gradients.broadcasting (MUST: " in out
    assert "/[1,4]x[3,4]/float32/prob_target/batchmean: result: " in out


@needs_node
def test_the_javascript_port_can_skip_float16(exported: Path, tmp_path: Path) -> None:
    results = json.loads(run_node(exported, tmp_path, "--skip-dtype", "float16").read_text())
    report = v.verify(json.loads(exported.read_text()), results)
    skipped = [o for o in report.outcomes if o.status == "skipped"]
    assert skipped and not report.failed()


# -- from logits: the generalised Jensen-Shannon divergence (beta) -----------------------------


def _holds(got: Any, want: Any) -> bool:
    from kldiv_spec.conformance.vectors_cases import Expected

    assert isinstance(want, Expected)
    got = np.asarray(got, dtype=np.float64)
    e = want.value.astype(np.float64)
    assert got.shape == e.shape
    with np.errstate(invalid="ignore"):
        ok = np.where(
            np.isnan(e),
            np.isnan(got),
            np.where(np.isinf(e), got == e, np.abs(got - e) <= want.atol),
        )
    return bool(ok.all())


def _logits_call(spec: Any, fn: Any = None) -> tuple[Any, Any, Any]:
    options = dict(spec.options)
    if spec.mask is not None:
        options["mask"] = spec.mask
    value = (fn or kldiv_spec.kl_div_from_logits)(spec.input, spec.target, **options)
    g = spec.grad_output if spec.options["reduction"] == "none" else float(spec.grad_output)
    gs, gt = kldiv_spec.kl_div_from_logits_backward(
        g, spec.input, spec.target, target_grad=True, **options
    )
    return value, gs, gt


def test_logits_beta_vectors_are_deterministic_and_cover_every_beta():
    from kldiv_spec.conformance.vectors_cases import LOGITS_BETAS, logits_specs

    first, second = logits_specs(), logits_specs()
    assert [s.id for s in first] == [s.id for s in second]
    assert len({s.id for s in first}) == len(first)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.input, b.input)
        np.testing.assert_array_equal(a.target, b.target)
    assert {s.options["beta"] for s in first} == set(LOGITS_BETAS)
    assert {s.input.dtype.name for s in first} == {"float16", "float32", "float64"}
    # the exported document is unchanged: no from-logits case in it
    assert all(spec.function in ("kl_div", "kl_div_backward") for spec in v.specs())


def test_the_reference_holds_every_logits_beta_vector():
    from kldiv_spec.conformance.vectors_cases import logits_expected, logits_specs

    for spec in logits_specs():
        want = logits_expected(spec)
        value, gs, gt = _logits_call(spec)
        assert _holds(value, want.value), spec.id
        assert _holds(gs, want.grad_input), spec.id
        assert _holds(gt, want.grad_target), spec.id


def test_the_numpy_fast_paths_hold_every_logits_beta_vector(monkeypatch: Any) -> None:
    """The same vectors through the NumPy fast paths (every size taken): float16 and float32
    through the compiled kernels where they are built, the loss and the student gradient."""
    from _support import setenv

    from kldiv_spec.conformance.vectors_cases import logits_expected, logits_specs

    setenv(monkeypatch, "KLDIV_SPEC_NUMPY_MIN_ELEMENTS", "0")
    for spec in logits_specs():
        want = logits_expected(spec)
        options = dict(spec.options)
        if spec.mask is not None:
            options["mask"] = spec.mask
        value = kldiv_spec.kl_div_from_logits(spec.input, spec.target, **options)
        assert _holds(value, want.value), spec.id
        if options["reduction"] != "none":
            g = float(spec.grad_output)
            gs, _ = kldiv_spec.kl_div_from_logits_backward(g, spec.input, spec.target, **options)
            assert _holds(gs, want.grad_input), spec.id


def test_the_logits_beta_vectors_state_the_edges():
    from kldiv_spec.conformance.vectors_cases import logits_expected, logits_specs

    edges = {
        s.options["beta"]: logits_expected(s).value.value
        for s in logits_specs()
        if s.id.endswith("/edges")
    }
    assert edges[0.0][0, 1] == math.inf and edges[1.0][1, 1] == math.inf  # the KLs' +inf
    for beta in (0.3, 0.5):
        assert np.isfinite(edges[beta][:3]).all() and edges[beta][2, 3] == 0.0
        assert np.isnan(edges[beta][3]).all()


def test_the_logits_vectors_state_the_zero_gradient_where_the_weight_is_zero():
    from kldiv_spec.conformance.vectors_cases import logits_expected, logits_specs

    grads = {
        s.id: logits_expected(s).grad_input.value
        for s in logits_specs()
        if "/weight_excludes/" in s.id
    }
    assert len(grads) == 4
    for beta, reduction in itertools.product(("0.0", "1.0"), ("none", "sum")):
        g = grads[f"logits/beta={beta}/weight_excludes/{reduction}"]
        if beta == "1.0":  # reverse: the student weights; +inf rows 0 and 1
            np.testing.assert_array_equal(np.isnan(g[0]), [True, False, False, False])
            np.testing.assert_array_equal(g[0, 1:], 0.0)
            np.testing.assert_array_equal(np.isnan(g[1]), [False, True, True, True])
            assert g[1, 0] == 0.0
            np.testing.assert_array_equal(g[2, 2:], 0.0)
        else:  # forward: the student gradient is c G (q - p) or its chain rule, finite
            assert np.isfinite(g).all()


def test_a_swapped_mixture_fails_the_logits_beta_vectors():
    from kldiv_spec.conformance.mutants import np_from_logits
    from kldiv_spec.conformance.vectors_cases import logits_expected, logits_specs

    def swapped(s: Any, t: Any, **options: Any) -> Any:
        return np_from_logits(s, t, bug="jsd_beta_swapped", **options)

    failed = {
        spec.id
        for spec in logits_specs()
        if not _holds(_logits_call(spec, swapped)[0], logits_expected(spec).value)
    }
    assert failed and all("beta=0.3" in cid for cid in failed)
    assert any("/float32/" in cid for cid in failed) and any("/float64/" in cid for cid in failed)
