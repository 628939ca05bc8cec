"""Per-dtype tolerances shared by the op tests (a plain module: bench/ has its own conftest)."""
import pytest
import torch

# (dtype, atol, rtol) against the float64 reference rounded to the dtype. Half-precision kernels
# compute in fp32 and round once, so they sit within ~1 ulp of the reference.
DTYPE_TOLS = [
    pytest.param((torch.float32, 1e-5, 1.3e-6), id="fp32"),
    pytest.param((torch.float16, 1e-3, 1e-3), id="fp16"),
    pytest.param((torch.bfloat16, 8e-3, 1.6e-2), id="bf16"),
    pytest.param((torch.float64, 1e-12, 1e-12), id="fp64"),
]
