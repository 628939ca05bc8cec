"""How far an output is from a reference: the numbers the tests assert on and the benchmarks report.

Every function takes ``(ref, out)`` in that order and returns a Python float (``cosine_per_row``: a
tensor). The sums run in float64, so a bf16 or fp16 output is judged on its values, not on rounding
inside the metric.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (ref - out)^2); +inf when
    ``out`` equals ``ref``."""
    ref, out = ref.double(), out.double()
    return (10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())).item()


def cosine_per_row(ref: torch.Tensor, out: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Cosine similarity of every slice along ``dim``: per row (token, sentence) for dim=-1 on (rows,
    features), per channel when ``dim`` is the token axis. Leading dimensions are kept."""
    return F.cosine_similarity(ref.double(), out.double(), dim=dim)


def min_cosine(ref: torch.Tensor, out: torch.Tensor, dim: int = -1) -> float:
    """The worst slice's cosine similarity (see ``cosine_per_row``): one bad token is not averaged away."""
    return cosine_per_row(ref, out, dim).min().item()


def cosine(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Cosine similarity of the two tensors taken whole (flattened)."""
    return F.cosine_similarity(ref.double().flatten(), out.double().flatten(), dim=0).item()


def max_abs_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max |out - ref|; 0 for empty tensors."""
    if ref.numel() == 0:
        return 0.0
    return (out.double() - ref.double()).abs().max().item()


def max_rel_error(ref: torch.Tensor, out: torch.Tensor, floor: float = 1.0) -> float:
    """max |out - ref| over max(floor, max |ref|): the error relative to the reference's scale, with
    ``floor`` keeping a near-zero reference from turning rounding into a huge ratio."""
    if ref.numel() == 0:
        return 0.0
    return max_abs_error(ref, out) / max(floor, ref.double().abs().max().item())


__all__ = ["sqnr_db", "cosine_per_row", "min_cosine", "cosine", "max_abs_error", "max_rel_error"]
