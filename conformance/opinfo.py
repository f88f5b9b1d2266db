"""PyTorch's own OpInfo samples for ``nn.functional.kl_div``, as suite cases.

Importing PyTorch's OpInfo database takes many seconds (and needs
``expecttest``), so the samples are snapshotted into
:mod:`._opinfo_samples` by :func:`snapshot` (``python -m
kldiv_spec.conformance.opinfo``) and read from there; :func:`live_samples`
reads them from the installed torch instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ._opinfo_samples import SAMPLES
from .strategies import Case

__all__ = ["live_samples", "samples", "snapshot"]


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


def samples() -> list[Case]:
    """Return the snapshotted OpInfo samples."""
    return [
        _to_case(
            np.array(x, dtype=dt).reshape(shape_x),
            np.array(t, dtype=dt).reshape(shape_t),
            kwargs,
        )
        for dt, shape_x, x, shape_t, t, kwargs in SAMPLES
    ]


def snapshot(path: Path | None = None) -> Path:
    """Write the installed torch's samples to ``_opinfo_samples.py`` and return its path."""
    import torch

    path = path or Path(__file__).with_name("_opinfo_samples.py")
    lines = [
        "# ruff: noqa: E501",
        f'"""OpInfo samples of nn.functional.kl_div, torch {torch.__version__} (generated)."""',
        "",
        "SAMPLES = [  # (dtype, input shape, input, target shape, target, kwargs)",
    ]
    for c in live_samples():
        lines.append(
            f"    ({c.input.dtype.name!r}, {c.input.shape!r}, {c.input.ravel().tolist()!r}, "
            f"{c.target.shape!r}, {c.target.ravel().tolist()!r}, "
            f"{{'reduction': {c.reduction!r}, 'log_target': {c.log_target!r}}}),"
        )
    lines.append("]")
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(f"{snapshot()}\n")
