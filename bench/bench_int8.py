"""The int8 suite's CPU shapes under pytest-benchmark: ember W8A8 / W8A16 against fp32, bf16 and
torch.ao quantize_dynamic on BERT-base layers (8 x 128 tokens) and decode rows.

    pytest bench/bench_int8.py --benchmark-enable   time every case
    pytest bench/                                   (--benchmark-disable) each case checked once: smoke test
    python -m ember bench --suites int8             the full report with the >= 1.5x quantize_dynamic target
    python -m ember.bench.int8 --decoder            + greedy-decoding tokens/s of a Llama-style model

The cases come from ``ember.bench.int8`` and go to pytest-benchmark through conftest's ``run_case``;
without --benchmark-enable only the decode shapes run (the 1024-token ones would cost seconds of the
test suite for a smoke check).
"""
import pytest
import torch

from ember.bench import int8
from ember.bench.harness import Config

CFG = Config(device="cpu", dtypes=(torch.float32,), sizes="small")
CASES = int8.cases(CFG)  # cheap: nothing is allocated yet


@pytest.mark.bench
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{'x'.join(map(str, c.shape))}-{c.provider}" for c in CASES])
def test_int8_linear(benchmark, run_case, case):
    if case.shape[0] > 16 and not benchmark.enabled:
        pytest.skip("prefill shapes run with --benchmark-enable")
    run_case(case)
