"""Argument checks and layout helpers shared by every ember op."""
from __future__ import annotations

import math

import torch

from .. import _backend

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"ember.ops.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"ember.ops.{op}: {name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"ember.ops.{op}: {name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {t.dtype}"
        )


def check_same(op: str, names: tuple[str, str], a: torch.Tensor, b: torch.Tensor) -> None:
    """Two operands of one elementwise op: same device, dtype and shape (no silent broadcasting)."""
    n1, n2 = names
    if a.device != b.device:
        raise ValueError(f"ember.ops.{op}: {n1} and {n2} must be on the same device, got {a.device} and {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"ember.ops.{op}: {n1} and {n2} must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.shape != b.shape:
        raise ValueError(
            f"ember.ops.{op}: {n1} and {n2} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D (rows, last-dim) view of ``t`` whose rows may be strided but whose last dim is contiguous.

    The halves of a ``[..., 2N]`` tensor (``x.chunk(2, -1)``) qualify, so the gated kernels read them
    in place; any layout that needs more than one row stride is copied once.
    """
    if t.dim() == 2 and (t.shape[1] <= 1 or t.stride(1) == 1):
        return t  # already (rows, cols) with contiguous rows: the common case, without a view op
    cols = t.shape[-1] if t.dim() else 1
    rows = math.prod(t.shape[:-1]) if t.dim() else 1
    try:
        view = t.view(rows, cols)
    except RuntimeError:  # leading dims do not collapse into one row stride
        return t.contiguous().view(rows, cols)
    if cols > 1 and view.stride(1) != 1:
        return t.contiguous().view(rows, cols)
    return view


def plain_reference(backend: str) -> bool:
    """Whether a call on ``backend`` runs the reference as plain torch, outside the ember op: only
    without ember._C, where the op has no autograd (csrc/autograd.cpp is in it). torch's autograd then
    differentiates the reference formulas, which agree with ember's derivatives except, at most, in
    which overflowing elements come out inf or NaN."""
    return backend == "reference" and _backend.extension() is None
