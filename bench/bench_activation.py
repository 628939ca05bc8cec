"""The activation suite's CPU default shape under pytest-benchmark: op x provider x direction.

    pytest bench/ --benchmark-enable     time every case (pytest-benchmark's table, --benchmark-json ...)
    pytest bench/                        pyproject adds --benchmark-disable: each case is checked
                                         against torch eager and run once, as a smoke test; the
                                         torch.compile cases, which spend seconds compiling, skip
    python -m ember bench                the full report: GB/s, fraction of copy bandwidth, targets

The cases (inputs, providers, byte counts, checks) come from ``ember.bench.activations``; this file
only picks the shape and hands each case to pytest-benchmark through conftest's ``run_case``.
"""
import pytest
import torch

from ember.bench import activations
from ember.bench.harness import Config

CFG = Config(device="cpu", dtypes=(torch.float32,), sizes="small", quick=True)
SHAPE = activations.shapes(CFG)[0]
CASES = [c for c in activations.cases(CFG) if c.shape == SHAPE]  # cheap: nothing is allocated yet


@pytest.mark.bench
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.direction}-{c.provider}" for c in CASES])
def test_activation(benchmark, run_case, case):
    if case.provider == "torch.compile" and not benchmark.enabled:
        pytest.skip("torch.compile cases compile for seconds; they run with --benchmark-enable")
    run_case(case)
