#!/usr/bin/env bash
# Set-up on a fresh machine with Python 3.10+ and nothing else: a .venv with PyTorch, DeepSpeed,
# Hugging Face and tram_dist (editable). Idempotent: a second run only checks.
#
# TORCH_SPEC chooses the PyTorch build (default torch==2.13.0, the CPU build on this project's
# machines). It is installed FIRST, so no later requirement can pull a different (CUDA) build;
# DeepSpeed and tram_dist are built with --no-build-isolation against that torch.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=${VENV:-.venv}
# versions the suite last passed with; CONSTRAINTS= (empty) installs the newest releases
CONSTRAINTS=${CONSTRAINTS-scripts/constraints.txt}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
constrained=()
[ -z "$CONSTRAINTS" ] || constrained=(-c "$CONSTRAINTS")

pip install -q "$TORCH_SPEC"
pip install -q "${constrained[@]}" setuptools wheel packaging ninja
pip install -q "${constrained[@]}" --no-build-isolation "deepspeed>=0.15"
pip install -q "${constrained[@]}" --no-build-isolation -e ".[dev,plot,tensorboard,trainer]"

# Without a GPU DeepSpeed runs on its CPU accelerator, which JIT-compiles its shared-memory
# collective op (shm_comm, about a minute) the first time a process group starts: compile it
# here, once (cached under ~/.cache/torch_extensions), not inside the first DeepSpeed run.
DS_ACCELERATOR=cpu "$VENV/bin/python" - <<'PY' || echo "bootstrap: DeepSpeed's CPU shm op was not prebuilt; the first DeepSpeed run on CPU compiles it"
import torch
if not torch.cuda.is_available():
    from deepspeed.comm.torch import build_shm_op
    build_shm_op()
PY

# Guard: the set-up must never have swapped in a different torch build.
"$VENV/bin/python" - "$TORCH_SPEC" <<'PY'
import sys, torch
spec = sys.argv[1]
want = spec.split("==", 1)[1] if "==" in spec else None
if want and not torch.__version__.startswith(want):
    sys.exit(f"bootstrap: expected {spec}, found torch {torch.__version__}: a dependency replaced it")
print(f"bootstrap: ok (torch {torch.__version__}, python {sys.version.split()[0]})")
PY
