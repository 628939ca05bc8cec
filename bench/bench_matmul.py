"""The matmul suite's CPU cases at one shape under pytest-benchmark: op x provider x direction.

    pytest bench/bench_matmul.py --benchmark-enable   time every case (pytest-benchmark's table)
    pytest bench/bench_matmul.py                      each case checked against eager and run once
    python -m ember.bench.matmul                      the full report: TFLOP/s, fraction of peak, PNG

Cases (inputs, providers, FLOP counts, checks) come from ``ember.bench.matmul``.
"""
import pytest
import torch

from ember.bench import matmul
from ember.bench.harness import Config, dtype_name

CFG = Config(device="cpu", dtypes=(torch.float32,), sizes="small", quick=True)
SHAPES = {(32, 1024, 1024), (32, 1024, 2816)}
CASES = [c for c in matmul.cases(CFG) if c.shape in SHAPES]


@pytest.mark.bench
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.direction}-{c.provider}" for c in CASES])
def test_matmul(benchmark, case):
    if case.provider == "torch.compile" and not benchmark.enabled:
        pytest.skip("torch.compile cases compile for seconds; they run with --benchmark-enable")
    torch.manual_seed(0)
    fn = case.make(True, warmup=benchmark.enabled)
    benchmark.group = f"{case.op} {case.direction} {dtype_name(case.dtype)} {'x'.join(map(str, case.shape))}"
    benchmark.extra_info.update(flops=matmul.flops(case.op, case.shape, case.direction), provider=case.provider)
    benchmark(fn)
    if benchmark.enabled and benchmark.stats is not None:
        benchmark.extra_info["TFLOP/s"] = round(matmul.flops(case.op, case.shape, case.direction)
                                                / benchmark.stats.stats.median / 1e12, 4)
