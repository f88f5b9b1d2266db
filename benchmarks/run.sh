#!/usr/bin/env bash
# Reproduce every CPU figure in docs/benchmarks.md.
#
#   benchmarks/run.sh            full run (about 10 minutes on 2 cores): results/cpu.{json,csv,md},
#                                docs/img/benchmarks-cpu.png
#   benchmarks/run.sh --quick    small shapes only (about a minute): results/cpu-quick.*,
#                                docs/img/benchmarks-cpu-quick.png
#   benchmarks/run.sh --shapes 4096x32000 --name cpu-headline -v    one shape, named
#
# Extra arguments go to benchmarks/cpu_bench.py (see `python benchmarks/cpu_bench.py --help`);
# a later --out or --plot replaces the ones below. kldiv_spec must be installed (pip install -e .).
# Run it on an otherwise idle machine: the ratios are only meaningful within one run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
exec "$PYTHON" benchmarks/cpu_bench.py --out benchmarks/results \
    --plot 'docs/img/benchmarks-{name}.png' "$@"
