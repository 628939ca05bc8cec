"""The optimizer suite on a small CPU parameter list under pytest-benchmark: optimizer x provider.

    pytest bench/ --benchmark-enable     time every case (pytest-benchmark's table, --benchmark-json ...)
    pytest bench/                        pyproject adds --benchmark-disable: each case is checked
                                         (ember and peers against torch, three steps on small
                                         tensors) and steps once, as a smoke test
    python -m ember bench --suites optim the full report: ~5e7 parameters on CPU, 1e9 on a GPU,
                                         GB/s, fraction of copy bandwidth, state memory, targets

The cases (parameter list, providers, byte counts, checks) come from ``ember.bench.optim``; this file
only picks a smaller parameter list (~1.3M parameters in 15 tensors) and hands each case to
pytest-benchmark through conftest's ``run_case`` (which also records the state bytes).
"""
import pytest
import torch

from ember.bench import optim
from ember.bench.harness import Config

CFG = Config(device="cpu", dtypes=(torch.float32,), sizes="small", quick=True)
CASES = optim.cases(CFG, shapes=optim.llm_shapes(1e6, d=256, vocab=2048))  # cheap: nothing allocated yet


@pytest.mark.bench
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.provider}" for c in CASES])
def test_optim(run_case, case):
    run_case(case)
