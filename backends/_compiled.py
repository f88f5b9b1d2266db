"""The compiled kernels (``backends/_fused.c``, ``_fused_logits.c``, ``_fused_jsd.c``), if built.

Each is optional: an install without a C compiler has none of them, and the NumPy fast
paths then use NumPy's ufuncs (about 3x slower). A build that exists but fails to load
raises. A *source checkout* whose kernels are not built, which Python started in the
clone's root imports instead of an installed copy, warns once: that is never silently
slower. The C sources ship only in a checkout (the wheel leaves them out), so their
presence beside this module tells a checkout from an install.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from pathlib import Path
from typing import Any

from kldiv_spec import _settings

__all__: list[str] = []

_HERE = Path(__file__).resolve().parent


def _load(name: str, /) -> Any:
    """Return the compiled module ``name`` of this package, or None where it was not built."""
    full = f"{__package__}.{name}"
    return importlib.import_module(full) if importlib.util.find_spec(full) is not None else None


#: The fused ``kl_div`` passes (the float32 sum, the half-precision terms and sums), or None.
fused: Any = _load("_fused")
#: The fused float32 from-logits kernels, or None.
fused_logits: Any = _load("_fused_logits")
#: The fused float32 Jensen-Shannon (``beta``) from-logits kernel, or None.
fused_jsd: Any = _load("_fused_jsd")
#: The fused float64 from-logits kernel, or None.
fused_logits64: Any = _load("_fused_logits64")

_MISSING = [
    name
    for name, module in (
        ("_fused", fused),
        ("_fused_logits", fused_logits),
        ("_fused_jsd", fused_jsd),
        ("_fused_logits64", fused_logits64),
    )
    if module is None and (_HERE / f"{name}.c").is_file()
]
if _MISSING and _settings.current.numpy_fused:
    _root = _HERE.parent
    warnings.warn(
        f"kldiv_spec is imported from the source checkout {_root}, where its compiled "
        f"kernels ({', '.join(f'backends/{n}.c' for n in _MISSING)}) are not built: the "
        "NumPy fast paths run without them, about 3x slower. Run `pip install -e .` in "
        f"{_root} to build them in place, or start Python outside {_root} to import the "
        "installed copy (KLDIV_SPEC_NUMPY_FUSED=0 runs without them and silences this).",
        RuntimeWarning,
        stacklevel=2,
    )
