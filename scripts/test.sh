#!/usr/bin/env bash
# Set up and run every test: the nvcc compile check of each CUDA source (sm_80 and sm_90a, when nvcc
# exists), the test suite (Triton kernels through the interpreter when there is no GPU) and the
# benchmark cases once each.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
if command -v nvcc >/dev/null 2>&1; then
  cmake -S . -B cmake-build >/dev/null  # torch found: the CUDA glue is type-checked too
  cmake --build cmake-build --target cuda_compile_check -j "$(nproc)"
else
  echo "nvcc not found: skipping the CUDA compile check"
fi
python3 -m pytest tests bench -q "$@"
