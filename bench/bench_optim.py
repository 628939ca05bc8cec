"""pytest-benchmark wrapper of ember.bench.optim: one benchmark per (optimizer, provider).

    PYTHONPATH=pyext:. python -m pytest bench/bench_optim.py --benchmark-only
    EMBER_BENCH_PARAMS=5e7 sets the parameter count (default 1e9 on GPU, 5e7 on CPU).
"""
import os

import pytest
import torch

from ember.bench import optim as bo

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOTAL = float(os.environ.get("EMBER_BENCH_PARAMS", 1e9 if DEVICE.type == "cuda" else 5e7))
CASES = [(name, prov) for name in bo.CONFIGS for prov in bo.providers(name, DEVICE)]


@pytest.fixture(scope="module")
def params():
    ps = [torch.randn(s, device=DEVICE) * 0.02 for s in bo.scale_shapes(TOTAL)]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-3
    return ps


@pytest.mark.parametrize("name,provider", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_step(benchmark, params, name, provider):
    kw, bytes_per = bo.CONFIGS[name]
    opt = bo.providers(name, DEVICE)[provider](params, kw)
    opt.step()

    def step():
        opt.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    n = sum(p.numel() for p in params)
    benchmark.extra_info["GBps"] = bytes_per * n / benchmark.stats.stats.median / 1e9
