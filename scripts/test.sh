#!/usr/bin/env bash
# Set up and run every test: every GPU kernel compiled for the GPUs it targets (no GPU needed), the test
# suite (Triton kernels through the interpreter when there is no GPU) with the benchmark cases once each,
# and a rehearsal of the device check on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
# 1. Every Triton kernel at the specialisations dispatch can pick, compiled for sm_90a and sm_80 through a
#    stand-in driver, and every csrc/cuda/*.cu through nvcc (warnings as errors) with ptxas' resource
#    report; fails on a compile error, shared memory over the limit, or a CUDA kernel spilling.
python3 -m ember compile-check --quick
# 2. The CUDA torch glue, type-checked against torch's c10/cuda headers (CPU wheels ship them).
if command -v nvcc >/dev/null 2>&1; then
  cmake -S . -B cmake-build >/dev/null
  cmake --build cmake-build --target ember_cuda_glue_check -j "$(nproc)"
else
  echo "nvcc not found: skipping the CUDA glue check"
fi
# 3. The tests and benchmark cases.
python3 -m pytest tests bench -q "$@"
# 4. The prepared device run, rehearsed on the CPU, so the script is proven before device minutes go.
bash scripts/gpu_check.sh --rehearse
