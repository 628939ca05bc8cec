"""Int8 Linear under pytest-benchmark: ember W8A8 / W8A16 against fp32, bf16 and torch.ao quantize_dynamic
on a BERT-base FFN shape (CPU). The full table (decode and prefill shapes, TOPS, speedups) and the
decoder tokens/s come from ``python -m ember.bench.int8 --decoder``.

    pytest bench/bench_int8.py --benchmark-enable
"""
import warnings

import pytest
import torch
from torch import nn

import ember

SHAPES = [(1024, 768, 3072), (1, 2048, 8192)]  # BERT-base FFN up at 8 x 128 tokens; a decode GEMV
PROVIDERS = ["torch-fp32", "torch-bf16", "torch.ao-dynamic", "ember-w8a8", "ember-w8a16"]


def _make(provider, lin):
    if provider == "torch-fp32":
        return lin, torch.float32
    if provider == "torch-bf16":
        return nn.Linear(lin.in_features, lin.out_features).to(torch.bfloat16).requires_grad_(False), torch.bfloat16
    if provider == "torch.ao-dynamic":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8), torch.float32
    return ember.nn.Int8Linear.from_linear(lin, provider.split("-")[1]), torch.float32


@pytest.mark.bench
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int8_linear(benchmark, provider, shape):
    M, K, N = shape
    torch.manual_seed(0)
    lin = nn.Linear(K, N).requires_grad_(False)
    mod, dtype = _make(provider, lin)
    x = torch.randn(M, K, dtype=dtype)
    benchmark.group = f"linear {M}x{K}x{N}"
    with torch.inference_mode():
        benchmark(mod, x)
