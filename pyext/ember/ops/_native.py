"""What ember._C's kernels (csrc/cpu and csrc/cuda) take: the "cpu" and "cuda" backends' ``supports``
rules (see ember._backend). Ops with no rule here take every input their checks accept."""
from __future__ import annotations

import torch

from .._backend import dense_update_rule, supports

_FLOAT16_32 = (torch.float16, torch.bfloat16, torch.float32)


supports("cpu", "optim_step", summary="dense float16, bfloat16, float32, float64 parameters")(
    dense_update_rule("the C++ optimizer kernels", _FLOAT16_32 + (torch.float64,), "non-overlapping, gap-free"))
_update_16_32 = dense_update_rule("this backend's optimizer kernels", _FLOAT16_32, "contiguous, gap-free")
supports("cpu", "adamw8bit_step", summary="dense float16, bfloat16, float32 parameters")(_update_16_32)
supports("cuda", "optim_step", "adamw8bit_step", summary="dense float16, bfloat16, float32 parameters")(_update_16_32)


@supports("cuda", "int8_linear", summary="W8A8, per-channel weights, in_features % 16 == 0")
def _cuda_int8(*, mode: str, group: int | None, in_features: int) -> str | None:
    if mode != "w8a8":
        return "the CUDA C++ int8 kernels are W8A8 only (W8A16 runs on Triton)"
    if group is not None and group != in_features:
        return "the CUDA C++ int8 GEMM takes per-channel weight scales, not groups"
    if in_features % 16:
        return f"the CUDA C++ int8 GEMM needs in_features % 16 == 0, got {in_features}"
    return None


@supports("cuda", "grouped_gated_mlp", summary="no CUDA C++ kernel (the Triton one runs on GPU)")
def _cuda_grouped(*, dtype: torch.dtype) -> str | None:
    return "ember has no CUDA C++ kernel for the grouped gated MLP; its Triton kernel runs it on GPU"
