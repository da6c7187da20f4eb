#!/usr/bin/env bash
# Run the four network benchmarks at full size, one after another; tables to the terminal (and OUT/*.txt),
# results to OUT/*.json. Usage: benchmarks/run_all.sh [OUT] (default benchmarks/results). About 10 minutes.
# Use the benchmark environment (litellm, aiolimiter, openai[aiohttp]): PYTHON=/work/venv-bench/bin/python.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/results}"
py="${PYTHON:-python}"
mkdir -p "$out"
for bench in overhead rate_fidelity tail hidden_cap; do
  echo "== $bench"
  "$py" "$here/$bench.py" --json "$out/$bench.json" | tee "$out/$bench.txt"
done
