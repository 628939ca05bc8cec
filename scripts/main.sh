#!/usr/bin/env bash
# The main job: set up, run the kernel benchmark suite for this machine's device, then the demo that
# swaps ember into a real pretrained model. Results land in bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
python3 -m ember bench "$@"
python3 -m ember demo
