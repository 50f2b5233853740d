#!/usr/bin/env bash
# One GPU check of tram_dist (kernel tests on CUDA, FSDP1 tests, bench_kernels, bench_step for
# GPT-2 124M and GPT2-XL from local configs), offline, under 8 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh                  # full run on the GPU; JSON in benchmarks/results/
#   bash benchmarks/gpu_check.sh --smoke          # CPU plumbing check (tiny sizes), temp results dir
#   bash benchmarks/gpu_check.sh --results-dir DIR [--only PART,...] [--budget SECONDS]
#
# The results directory can also be given as GPU_CHECK_RESULTS=DIR. Exit status: 0 when every
# part passed, 1 when one failed or timed out, 2 for a usage error. The parts, their timeouts
# and the files written are described in benchmarks/gpu_check.py and benchmarks/README.md.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$ROOT/.venv/bin/python" ]; then
    PY="$ROOT/.venv/bin/python"
else
    PY="$(command -v python || command -v python3)"
fi
if [ -z "$PY" ]; then
    echo "gpu_check: no python found (no $ROOT/.venv/bin/python, no python on PATH)" >&2
    exit 2
fi
cd "$ROOT" || exit 2
exec "$PY" "$ROOT/benchmarks/gpu_check.py" --python "$PY" "$@"
