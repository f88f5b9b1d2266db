#!/usr/bin/env bash
# One short GPU check (well under 5 minutes): the CUDA / CuPy / Triton tests, then the GPU
# benchmark (forward sum and forward+backward batchmean on 4096x32000 float32 against torch
# eager F.kl_div and torch.compile, with the device's copy bandwidth as the roofline), printed
# as one table.
#
#   benchmarks/gpu.sh             # on a CUDA machine, from anywhere in the repository
#   benchmarks/gpu.sh --dry-run   # on the CPU, tiny sizes, seconds: checks the script itself
#
# Works offline on a bare copy of the working tree: it needs python with torch, numpy and
# array-api-compat; pytest and hypothesis for the tests (else the tests are skipped, said so);
# triton, cupy are used when present. Missing packages can come from a local wheelhouse:
# WHEELHOUSE=/path/to/wheels benchmarks/gpu.sh. PYTHON selects the interpreter.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        *) echo "gpu.sh: unknown argument: $arg (use --dry-run or nothing)" >&2; exit 64 ;;
    esac
done

say() { printf '== %s\n' "$*"; }
# Whether a module is installed (found, not imported: quick).
has() { "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$1') is None)" 2>/dev/null; }

if ! has torch; then
    echo "gpu.sh: $PY cannot import torch" >&2
    exit 2
fi
if [[ $DRY == 0 ]] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu.sh: torch sees no CUDA device (use --dry-run to check the script on a CPU)" >&2
    exit 2
fi

# kldiv_spec: installed, or run from this tree (backends/ is kldiv_spec.backends once installed).
if ! "$PY" -c "import kldiv_spec.backends" >/dev/null 2>&1; then
    SITE="$(mktemp -d)"
    trap 'rm -rf "$SITE"' EXIT
    mkdir "$SITE/kldiv_spec"
    for f in kldiv_spec/*; do ln -s "$PWD/$f" "$SITE/kldiv_spec/"; done
    ln -s "$PWD/backends" "$SITE/kldiv_spec/backends"
    ln -s "$PWD/conformance" "$SITE/kldiv_spec/conformance"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    say "kldiv_spec is not installed: using this tree through $SITE"
fi
for pkg in array_api_compat pytest hypothesis; do
    if ! has "$pkg" && [[ -n "${WHEELHOUSE:-}" ]]; then
        "$PY" -m pip install -q --no-index --find-links "$WHEELHOUSE" "${pkg//_/-}" || true
    fi
done
if ! has array_api_compat; then
    echo "gpu.sh: array-api-compat is missing (pip install array-api-compat, or WHEELHOUSE=...)" >&2
    exit 2
fi

"$PY" - <<'EOF'
import importlib.metadata as md
for name in ("triton", "cupy", "jax"):
    found = [d.version for d in md.distributions() if (d.name or "").startswith(name)]
    print(f"== {name}: {found[0]}" if found else f"== {name}: not installed (checks skipped)")
EOF
"$PY" -c "import torch; print('== torch', torch.__version__, '| CUDA', torch.version.cuda, '|',
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU (dry run)')"

TESTS=(tests/test_backend_torch.py tests/test_backend_cupy.py tests/test_triton_interpret.py)
if has pytest && has hypothesis; then
    XDIST=()
    has xdist && XDIST=(-n 0)
    if [[ $DRY == 1 ]]; then
        say "tests (dry run: collected, not run)"
        "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" --collect-only "${TESTS[@]}" | tail -n 1
    else
        say "tests"
        "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" -rs "${TESTS[@]}"
    fi
else
    say "tests skipped: pytest and hypothesis are needed (WHEELHOUSE=... can provide them)"
fi

say "benchmark"
if [[ $DRY == 1 ]]; then
    "$PY" benchmarks/gpu_bench.py --dry-run
else
    "$PY" benchmarks/gpu_bench.py --repeats 20
fi
