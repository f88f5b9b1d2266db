"""PyTorch's own OpInfo samples for ``nn.functional.kl_div``, as suite cases.

Importing PyTorch's OpInfo database takes many seconds (and needs
``expecttest``), so the samples are a snapshot, ``data/opinfo_samples.json``
beside this module, read by :func:`samples`; :func:`live_samples` reads them
from the installed torch instead.

The snapshot was taken from torch 2.13.0+cpu (the file's ``torch`` field
says which torch wrote it): the 32 samples ``op.sample_inputs("cpu", dtype)``
of the ``OpInfo`` named ``nn.functional.kl_div`` in
``torch.testing._internal.common_methods_invocations.op_db``, float32 then
float64, after ``torch.manual_seed(0)`` (:func:`live_samples`). ``python -m
kldiv_spec.conformance.opinfo``, with torch and ``expecttest`` installed,
rewrites it from the installed torch (:func:`snapshot`). It replaces the
generated module ``_opinfo_samples.py`` that held the same samples as Python
literals.

The file is strict JSON. Each sample is an object: ``dtype``, ``input_shape``,
``input`` (the values in C order), ``target_shape``, ``target`` and ``kwargs``
(``reduction``, ``log_target``). A value is a JSON number written with
Python's ``repr`` of the float64 it holds (a float32 value widened exactly), so
it reads back to the same bits, ``-0.0`` included; NaN and the infinities,
which JSON has no number for, are the strings ``"NaN"``, ``"Infinity"`` and
``"-Infinity"``.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .strategies import Case

__all__ = ["live_samples", "samples", "snapshot"]

#: The snapshot's folder and name, in this package.
_FOLDER, _NAME = "data", "opinfo_samples.json"


def _to_case(x: np.ndarray, t: np.ndarray, kwargs: dict[str, object]) -> Case:
    return Case(x, t, str(kwargs.get("reduction", "mean")), bool(kwargs.get("log_target", False)))


def live_samples() -> list[Case]:
    """Return the OpInfo samples of the installed torch (float32 and float64, CPU)."""
    import torch
    from torch.testing._internal.common_methods_invocations import op_db

    op = next(o for o in op_db if o.name == "nn.functional.kl_div")
    torch.manual_seed(0)
    cases = []
    for dtype in (torch.float32, torch.float64):
        for s in op.sample_inputs("cpu", dtype):
            x = s.input.detach().numpy().copy()
            t = s.args[0].detach().numpy().copy()
            cases.append(_to_case(x, t, dict(s.kwargs)))
    return cases


def _encode(a: np.ndarray) -> list[float | str]:
    """Return ``a``'s values in C order: floats, non-finite ones as JSON's missing names."""
    return [v if math.isfinite(v) else json.dumps(v) for v in a.ravel().tolist()]


def _decode(values: list[float | str], dtype: str, shape: list[int]) -> np.ndarray:
    return np.array([float(v) for v in values], dtype=dtype).reshape(shape)


@functools.cache
def _load() -> dict[str, Any]:
    text = (resources.files(__package__) / _FOLDER / _NAME).read_text(encoding="utf-8")
    return json.loads(text)


def samples() -> list[Case]:
    """Return the snapshotted OpInfo samples (new arrays on every call)."""
    return [
        _to_case(
            _decode(s["input"], s["dtype"], s["input_shape"]),
            _decode(s["target"], s["dtype"], s["target_shape"]),
            s["kwargs"],
        )
        for s in _load()["samples"]
    ]


def _dumps(cases: list[Case], torch_version: str) -> str:
    """Return the snapshot file of ``cases``: strict JSON, one sample a line."""
    head = {
        "about": "OpInfo samples of torch.nn.functional.kl_div (generated: python -m "
        "kldiv_spec.conformance.opinfo)",
        "torch": torch_version,
    }
    rows = [
        json.dumps(
            {
                "dtype": c.input.dtype.name,
                "input_shape": list(c.input.shape),
                "input": _encode(c.input),
                "target_shape": list(c.target.shape),
                "target": _encode(c.target),
                "kwargs": {"reduction": c.reduction, "log_target": c.log_target},
            },
            allow_nan=False,
        )
        for c in cases
    ]
    opening = json.dumps(head, indent=2, allow_nan=False)[:-2]  # without the closing "\n}"
    return opening + ',\n  "samples": [\n    ' + ",\n    ".join(rows) + "\n  ]\n}\n"


def snapshot(path: Path | None = None) -> Path:
    """Write the installed torch's samples to ``data/opinfo_samples.json``; return its path."""
    import torch

    path = path or Path(__file__).parent / _FOLDER / _NAME
    path.write_text(_dumps(live_samples(), torch.__version__), encoding="utf-8")
    _load.cache_clear()
    return path


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(f"{snapshot()}\n")
