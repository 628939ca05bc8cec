"""What ember's Triton kernels take: the "triton" backend's ``supports`` rules (see ember._backend).

Importing this module needs no triton: "auto" consults these rules before it would import a kernel.
"""
from __future__ import annotations

import torch

from ember._backend import dense_update_rule, supports

_TL_DOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_UPDATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@supports("triton", "linear", "gated_linear", summary="float16, bfloat16, float32 (tl.dot has no float64)")
def _gemm(*, dtype: torch.dtype) -> str | None:
    if dtype not in _TL_DOT_DTYPES:
        return f"the Triton GEMM takes float16, bfloat16 or float32 (tl.dot has no float64), got {dtype}"
    return None


@supports("triton", "int8_linear", summary="per-channel weights, or groups of a multiple of 16 channels")
def _int8(*, mode: str, group: int | None, in_features: int) -> str | None:
    if group is not None and group != in_features and (group & -group) < 16:
        return f"the Triton int8 GEMM needs group_size to be a multiple of 16 (one tl.dot operand), got {group}"
    return None


supports("triton", "optim_step", "adamw8bit_step", summary="dense float16, bfloat16, float32 parameters")(
    dense_update_rule("the Triton optimizer kernels", _UPDATE_DTYPES, "contiguous, gap-free"))


@supports("triton", "linear_cross_entropy", summary="float16, bfloat16, float32 (fp32 logits; no float64)")
def _linear_cross_entropy(*, dtype: torch.dtype) -> str | None:
    if dtype not in _TL_DOT_DTYPES:
        return f"the Triton cross-entropy kernel takes float16, bfloat16 or float32 inputs (fp32 logits), got {dtype}"
    return None


@supports("triton", "grouped_gated_mlp", summary="float16, bfloat16, float32 (tl.dot has no float64)")
def _grouped_gated_mlp(*, dtype: torch.dtype) -> str | None:
    if dtype not in _TL_DOT_DTYPES:
        return f"the Triton grouped GEMM takes float16, bfloat16 or float32 (tl.dot has no float64), got {dtype}"
    return None
