"""The matmul suite's CPU cases at one shape under pytest-benchmark: op x provider x direction.

    pytest bench/bench_matmul.py --benchmark-enable   time every case (pytest-benchmark's table)
    pytest bench/bench_matmul.py                      each case checked against eager and run once
    python -m ember.bench.matmul                      the full report: TFLOP/s, fraction of peak, PNG

Cases (inputs, providers, FLOP counts, checks) come from ``ember.bench.matmul``; conftest's ``run_case``
hands each to pytest-benchmark.
"""
import pytest
import torch

from ember.bench import matmul
from ember.bench.harness import Config

CFG = Config(device="cpu", dtypes=(torch.float32,), sizes="small", quick=True)
SHAPES = {(32, 1024, 1024), (32, 1024, 2816)}
CASES = [c for c in matmul.cases(CFG) if c.shape in SHAPES]


@pytest.mark.bench
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.direction}-{c.provider}" for c in CASES])
def test_matmul(benchmark, run_case, case):
    if case.provider == "torch.compile" and not benchmark.enabled:
        pytest.skip("torch.compile cases compile for seconds; they run with --benchmark-enable")
    run_case(case, rates={"TFLOP/s": matmul.flops(case.op, case.shape, case.direction) / 1e12})
