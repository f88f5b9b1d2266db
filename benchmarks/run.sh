#!/usr/bin/env bash
# Reproduce every CPU figure in docs/benchmarks.md.
#
#   benchmarks/run.sh            full run (about 10 minutes on 2 cores): results/cpu.{json,csv,md},
#                                docs/img/benchmarks-cpu.png
#   benchmarks/run.sh --quick    small shapes only (about a minute): results/cpu-quick.*
#
# Extra arguments go to `kldiv-spec bench` (see `kldiv-spec bench --help`).
# Run it on an otherwise idle machine: the ratios are only meaningful within one run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
exec "$PYTHON" -m kldiv_spec._cli bench --out benchmarks/results "$@"
