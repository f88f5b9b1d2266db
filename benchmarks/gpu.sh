#!/usr/bin/env bash
# One short GPU check (about 4 minutes on an H100; every step has a time limit): the GPU
# benchmark (forward sum and forward+backward batchmean on 4096x32000 float32 against torch
# eager F.kl_div, torch.compile and the CuPy path, with the device's copy bandwidth as the
# roofline, plus a Triton block/warp sweep), the per-call and compiled-step check on CUDA
# (benchmarks/per_call.py --device cuda: kldiv_spec.torch.kl_div against F.kl_div per call
# from 10 to 10^7 elements, compiled fwd+bwd steps against the compiled F.kl_div step, graph
# breaks, float16 autocast), the distillation-from-logits benchmark (benchmarks/logits_bench.py
# --device cuda: the Triton kernel against the composition, eager and compiled, at 2048x32000 and
# 4096x128000 float32), the half-precision and JSD cases (benchmarks/holes_bench.py --device cuda:
# bfloat16 kl_div, from logits and the generalised JSD against F.kl_div, the composition and
# Liger-Kernel's LigerKLDIVLoss and LigerJSD), distillation from hidden states
# (benchmarks/hidden_bench.py --device cuda: the chunked Triton path against the composition and
# Liger-Kernel's chunked and Triton fused linear losses, bfloat16), the CUDA and CuPy tests (with tests/test_torch_compile.py: CUDA
# graph capture, CUDA autocast; tests/test_triton_logits_interpret.py: the logits kernel on CUDA),
# and the conformance suite on torch CUDA and CuPy. It ends
# with a summary of the steps and the benchmark table.
#
#   benchmarks/gpu.sh                 # on a CUDA machine, from anywhere in the repository
#   benchmarks/gpu.sh --out DIR       # ... and keep each step's log and the JSON in DIR
#   benchmarks/gpu.sh --name gpu-h100 # ... and publish the benchmark: benchmarks/results/gpu-h100.
#                                     #   {json,md} and docs/img/benchmarks-gpu-h100.png
#                                     #   (--results DIR and --img DIR put them elsewhere)
#   benchmarks/gpu.sh --dry-run       # on the CPU, tiny sizes, seconds: checks the script itself
#
# Every result is stamped (benchmarks/bench_stamp.py): commit, command, versions, CPU and GPU.
# On a bare copy of the tree (no .git) give the commit it was copied from:
#   KLDIV_BENCH_COMMIT=$(git rev-parse HEAD) KLDIV_BENCH_DIRTY=0 benchmarks/gpu.sh --name gpu-h100
#
# Works offline on a bare copy of the working tree: it needs python with torch, numpy and
# array-api-compat; pytest and hypothesis for the tests; triton and cupy are used when present.
# Missing packages can come from a local wheelhouse: WHEELHOUSE=/path/to/wheels
# benchmarks/gpu.sh. PYTHON selects the interpreter. A failing step does not stop the others;
# the exit status is 1 if any step failed.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
DRY=0
OUTDIR=""
NAME=""
RESULTS="benchmarks/results"
IMG="docs/img"
ARGS=("$@")
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUTDIR="${2:?--out needs a directory}"; shift ;;
        --name) NAME="${2:?--name needs a result name, e.g. gpu-h100}"; shift ;;
        --results) RESULTS="${2:?--results needs a directory}"; shift ;;
        --img) IMG="${2:?--img needs a directory}"; shift ;;
        *) echo "gpu.sh: unknown argument: $1 (use --dry-run, --out DIR, --name NAME," \
                "--results DIR, --img DIR)" >&2; exit 64 ;;
    esac
    shift
done
# The command every result of this run records (benchmarks/run.py sets its own).
export KLDIV_BENCH_COMMAND="${KLDIV_BENCH_COMMAND:-bash benchmarks/gpu.sh${ARGS[*]:+ ${ARGS[*]}}}"
CLEANUP=()
trap 'rm -rf "${CLEANUP[@]}"' EXIT
if [[ -n $OUTDIR ]]; then
    mkdir -p "$OUTDIR"
    LOGS="$OUTDIR"
else
    LOGS="$(mktemp -d)"
    CLEANUP+=("$LOGS")
fi

say() { printf '\n== %s\n' "$*"; }
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
    CLEANUP+=("$SITE")
    mkdir "$SITE/kldiv_spec"
    for f in kldiv_spec/*; do ln -s "$PWD/$f" "$SITE/kldiv_spec/"; done
    ln -s "$PWD/backends" "$SITE/kldiv_spec/backends"
    ln -s "$PWD/conformance" "$SITE/kldiv_spec/conformance"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    # `python -m` would put this directory first on sys.path, and its kldiv_spec/ (without
    # backends/ and conformance/ inside) would shadow the linked one (Python >= 3.11).
    export PYTHONSAFEPATH=1
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

say "versions"
"$PY" - <<'EOF'
import importlib.metadata as md
import platform
import torch
for name in ("numpy", "torch", "triton", "cupy", "jax", "array-api-compat", "hypothesis"):
    # CuPy's distribution is named after its CUDA version (cupy-cuda13x, say).
    found = [
        d.version
        for d in md.distributions()
        if (d.name or "").lower() == name or (d.name or "").lower().startswith(name + "-cuda")
    ]
    print(f"{name}: {found[0] if found else 'not installed (its checks are skipped)'}")
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (dry run)"
print(f"python {platform.python_version()} | CUDA {torch.version.cuda} | {gpu}")
EOF
"$PY" benchmarks/bench_stamp.py --summary \
    || echo "gpu.sh: benchmarks/bench_stamp.py failed: results will lack their stamp" >&2

SUMMARY=()
# step NAME SECONDS COMMAND...: run with a time limit, log to $LOGS/NAME.log, record the outcome.
step() {
    local name="$1" limit="$2" start rc
    shift 2
    say "$name (limit ${limit} s)"
    start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) SUMMARY+=("$name: ok ($((SECONDS - start)) s)") ;;
        124) SUMMARY+=("$name: TIMED OUT after $limit s") ;;
        *) SUMMARY+=("$name: FAILED, exit status $rc ($((SECONDS - start)) s)") ;;
    esac
}

PUBLISH=()
if [[ -n $NAME ]]; then
    mkdir -p "$RESULTS" "$IMG"
    PUBLISH=(--out "$RESULTS/$NAME")
fi
if [[ $DRY == 1 ]]; then
    step benchmark 120 "$PY" benchmarks/gpu_bench.py --dry-run --json "$LOGS/gpu_bench.json" \
        "${PUBLISH[@]}"
    step logits 120 "$PY" benchmarks/logits_bench.py --device cuda --dry-run \
        --out "$LOGS/logits-cuda"
    step holes 120 "$PY" benchmarks/holes_bench.py --device cuda --dry-run \
        --out "$LOGS/holes-cuda"
    step hidden 120 "$PY" benchmarks/hidden_bench.py --device cuda --dry-run \
        --out "$LOGS/hidden-cuda"
else
    step benchmark 150 "$PY" benchmarks/gpu_bench.py --repeats 20 --sweep \
        --json "$LOGS/gpu_bench.json" "${PUBLISH[@]}"
    step per-call 150 "$PY" benchmarks/per_call.py --device cuda --rounds 5 --target-ms 20 \
        --out "$LOGS/per-call-cuda"
    # Distillation from logits: the Triton kernel against the composition, eager and compiled.
    step logits 240 "$PY" benchmarks/logits_bench.py --device cuda --repeats 10 \
        --out "$LOGS/logits-cuda"
    # Half precision and the JSD (issue 20): bfloat16 kl_div, from logits and the JSD against
    # F.kl_div, the composition and Liger-Kernel's Triton losses, 2048x32000.
    step holes 120 "$PY" benchmarks/holes_bench.py --device cuda --repeats 20 \
        --out "$LOGS/holes-cuda"
    # Distillation from hidden states (issue 21): the chunked Triton path against the
    # composition and Liger-Kernel's chunked and Triton fused linear losses, bfloat16.
    step hidden 150 "$PY" benchmarks/hidden_bench.py --device cuda --repeats 5 \
        --out "$LOGS/hidden-cuda"
fi

# The CUDA and CuPy tests: the fast-path files and every xp-fixture test on torch_gpu/cupy.
SELECT=(tests/test_backend_torch.py tests/test_backend_cupy.py tests/test_api.py
        tests/test_values.py tests/test_errors.py tests/test_gradients.py
        tests/test_torch_compile.py tests/test_triton_logits_interpret.py tests/test_hidden.py
        tests/test_logits_weight_excludes.py)
# (-p no:benchmark: pytest-benchmark warns under xdist, and the tests make warnings errors.)
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -p no:benchmark -rs -k "cuda or torch_gpu or cupy")
if has xdist && [[ $DRY == 0 ]]; then PYTEST+=(-n 4); fi
if has pytest && has hypothesis; then
    if [[ $DRY == 1 ]]; then
        step tests 120 "${PYTEST[@]}" --collect-only "${SELECT[@]}"
    else
        step tests 150 "${PYTEST[@]}" "${SELECT[@]}"
    fi
else
    SUMMARY+=("tests: SKIPPED (pytest and hypothesis are needed; WHEELHOUSE=... can provide them)")
fi

# The conformance suite: the reference on the GPU backends, and PyTorch's own CUDA kl_div.
CHECK=("$PY" -m kldiv_spec check --quiet)
if [[ $DRY == 1 ]]; then
    step conformance 120 "${CHECK[@]}" --backend torch --max-examples 2 --group semantics
else
    step conformance 120 "${CHECK[@]}" --backend torch_cuda --backend cupy \
        --json "$LOGS/conformance.json"
    step conformance-torch-cuda 60 "${CHECK[@]}" --impl torch --backend torch_cuda
fi

if [[ -n $OUTDIR && -s "$LOGS/gpu_bench.json" ]] && has matplotlib; then
    "$PY" benchmarks/plot_gpu.py "$LOGS/gpu_bench.json" "$LOGS/gpu_bench.png" >/dev/null \
        || echo "gpu.sh: the plot failed (the table below stands)" >&2
fi
if [[ -n $NAME && -s "$RESULTS/$NAME.json" ]]; then
    if has matplotlib; then
        "$PY" benchmarks/plot_gpu.py "$RESULTS/$NAME.json" "$IMG/benchmarks-$NAME.png" \
            >/dev/null || echo "gpu.sh: the plot $IMG/benchmarks-$NAME.png failed" >&2
    else
        echo "gpu.sh: matplotlib is not installed: no $IMG/benchmarks-$NAME.png" >&2
    fi
fi

say "summary"
printf '%s\n' "${SUMMARY[@]}"
if [[ -s "$LOGS/benchmark.log" ]]; then
    say "benchmark"
    awk '/^\| BLOCK/{exit} /^(#|\|)/{print}' "$LOGS/benchmark.log"
fi
for line in "${SUMMARY[@]}"; do
    [[ $line == *": ok"* ]] || exit 1
done
exit 0
