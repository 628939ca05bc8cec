#!/usr/bin/env bash
# The main job: set up, run the kernel benchmark suite for this machine's device, serve a decoder through
# generate per provider (the decoder suite), train one (the train suite), time swap per architecture (the swap suite), then the demo that swaps ember into a real pretrained model.
# Results land in bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
python3 -m ember bench "$@"
# the decoder served end to end (opt-in in the CLI: minutes, not seconds); its own model size per device
python3 -m ember bench --suites decoder
# a Llama-style decoder trained end to end per provider (issue #13): step time, memory, loss curves
python3 -m ember bench --suites linear_cross_entropy train
# what ember.swap fuses per transformers architecture, and the whole-model speed it gives (issue #14)
python3 -m ember bench --suites swap
python3 -m ember.bench.swap --dtype bf16   # the same zoo in bf16 (errors checked against the fp32 models)
python3 -m ember demo
