"""The settings: read once from the environment, validated, documented by a generated table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kldiv_spec
from kldiv_spec import _settings
from kldiv_spec.backends import numpy as numpy_path

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_table_is_generated_from_the_settings() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "_tools" / "settings_table.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_defaults() -> None:
    s = _settings.read({})
    assert s == _settings.Settings()
    assert not s.reference and s.numpy_fused and not s.triton_interpret
    assert s.numpy_min_elements == 1 << 16 and s.torch_min_elements == 1 << 15
    assert 1 <= s.threads() <= _settings.MAX_DEFAULT_THREADS


@pytest.mark.parametrize(
    ("environ", "field", "value"),
    [
        ({"KLDIV_SPEC_REFERENCE": "1"}, "reference", True),
        ({"KLDIV_SPEC_REFERENCE": "0"}, "reference", False),
        ({"KLDIV_SPEC_REFERENCE": " "}, "reference", False),  # empty: the default
        ({"KLDIV_SPEC_NUMPY_MIN_ELEMENTS": " 0 "}, "numpy_min_elements", 0),
        ({"KLDIV_SPEC_NUM_THREADS": "3"}, "num_threads", 3),
        ({"KLDIV_SPEC_NUMPY_FUSED": "0"}, "numpy_fused", False),
        ({"KLDIV_SPEC_TORCH_MIN_ELEMENTS": "0"}, "torch_min_elements", 0),
        ({"TRITON_INTERPRET": "True"}, "triton_interpret", True),
    ],
)
def test_each_variable_sets_its_field(environ: dict[str, str], field: str, value: object) -> None:
    assert getattr(_settings.read(environ), field) == value


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KLDIV_SPEC_NUMPY_MIN_ELEMENTS", "-1"),
        ("KLDIV_SPEC_NUMPY_MIN_ELEMENTS", "many"),
        ("KLDIV_SPEC_NUM_THREADS", "0"),
        ("KLDIV_SPEC_NUMPY_FUSED", "2"),
        ("KLDIV_SPEC_TORCH_MIN_ELEMENTS", "1e5"),
    ],
)
def test_an_invalid_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        _settings.read({name: value})


def test_an_invalid_value_fails_the_import() -> None:
    env = {"KLDIV_SPEC_NUM_THREADS": "0", "PATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", "import kldiv_spec"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode != 0
    assert "KLDIV_SPEC_NUM_THREADS must be an integer >= 1, got '0'" in done.stderr


def test_the_environment_is_read_at_import_and_on_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.log(np.full(8, 0.125))
    t = np.full(8, 0.125)
    calls = []  # the calls the NumPy fast path took (did not decline)
    real = numpy_path.kl_div

    def spy(ops: object) -> object:
        result = real(ops)
        if result is not NotImplemented:
            calls.append(1)
        return result

    monkeypatch.setattr(numpy_path, "kl_div", spy)
    monkeypatch.setenv("KLDIV_SPEC_NUMPY_MIN_ELEMENTS", "0")
    kldiv_spec.kl_div(x, t[None, :], reduction="sum")  # broadcast: the full route
    assert calls == []  # not re-read: 8 elements stay below the default threshold
    try:
        assert _settings.reload().numpy_min_elements == 0
        kldiv_spec.kl_div(x, t[None, :], reduction="sum")
        assert calls == [1]
    finally:
        monkeypatch.delenv("KLDIV_SPEC_NUMPY_MIN_ELEMENTS")
        _settings.reload()


def test_override_is_undone_after_the_block() -> None:
    before = _settings.current
    with _settings.override(reference=True) as inside:
        assert _settings.current is inside and inside.reference
    assert _settings.current is before


def test_no_private_attribute_of_os_environ_is_read() -> None:
    for folder in ("kldiv_spec", "backends", "conformance"):
        for path in (ROOT / folder).glob("*.py"):
            text = path.read_text(encoding="utf-8")
            assert "environ._data" not in text and "encodekey" not in text, path


def test_only_the_settings_module_reads_the_package_variables() -> None:
    names = [v.name for v in _settings.VARIABLES]
    for folder in ("kldiv_spec", "backends"):
        for path in (ROOT / folder).glob("*.py"):
            if path.name in ("_settings.py",):
                continue
            text = path.read_text(encoding="utf-8")
            assert "os.environ" not in text and "getenv" not in text, path
            for name in names:
                assert f'"{name}"' not in text, (path, name)
