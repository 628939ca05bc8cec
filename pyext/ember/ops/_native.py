"""What ember._C's kernels (csrc/cpu and csrc/cuda) take: the "cpu" and "cuda" backends' ``supports``
rules (see ember._backend). Ops with no rule here take every input their checks accept."""
from __future__ import annotations

import torch

from .._backend import supports

_FLOAT16_32 = (torch.float16, torch.bfloat16, torch.float32)


@supports("cpu", "optim_step", summary="dense float16, bfloat16, float32, float64 parameters")
def _cpu_update(*, dtype: torch.dtype, dense: bool) -> str | None:
    if dtype not in _FLOAT16_32 + (torch.float64,):
        return f"the C++ optimizer kernels update floating-point parameters, got {dtype}"
    if not dense:
        return "the C++ optimizer kernels walk dense (non-overlapping, gap-free) parameters"
    return None


@supports("cpu", "adamw8bit_step", summary="dense float16, bfloat16, float32 parameters")
@supports("cuda", "optim_step", "adamw8bit_step", summary="dense float16, bfloat16, float32 parameters")
def _update(*, dtype: torch.dtype, dense: bool) -> str | None:
    if dtype not in _FLOAT16_32:
        return f"this backend's optimizer kernels update float16, bfloat16 or float32 parameters, got {dtype}"
    if not dense:
        return "this backend's optimizer kernels walk dense (contiguous, gap-free) parameters"
    return None


@supports("cuda", "int8_linear", summary="W8A8, per-channel weights, in_features % 16 == 0")
def _cuda_int8(*, mode: str, group: int | None, in_features: int) -> str | None:
    if mode != "w8a8":
        return "the CUDA C++ int8 kernels are W8A8 only (W8A16 runs on Triton)"
    if group is not None and group != in_features:
        return "the CUDA C++ int8 GEMM takes per-channel weight scales, not groups"
    if in_features % 16:
        return f"the CUDA C++ int8 GEMM needs in_features % 16 == 0, got {in_features}"
    return None
