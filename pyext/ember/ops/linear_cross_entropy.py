"""linear_cross_entropy: ``cross_entropy(x @ W^T + b, target)`` without ever storing the logits, the
``ember::linear_cross_entropy`` op, forward and backward.

The LM head of a language model multiplies every token's hidden state by a (vocab, hidden) weight and
feeds the logits to cross-entropy. Those logits are the largest tensor of training: tokens x vocab in
fp32 (8k tokens x 128k vocab = 4 GB), written by the GEMM, read by log-softmax, saved for backward and
matched by a gradient of the same size. This op processes the tokens in chunks of up to 256 rows
of logits (at most 16 MB or 0.4x the weight's size, whichever is larger): each chunk's GEMM, then one
pass per row computing the log-sum-exp, the loss and (when a gradient is needed) the logits' gradient
in place, then that chunk's share of dX, dW and db. So the extra memory is one chunk, not four
tokens x vocab tensors.

Where the gradient is computed: with reduction "mean" or "sum" the loss is a scalar, so its upstream
gradient is one number; the forward computes dX, dW, db of the loss itself while each chunk's
logits are hot, autograd keeps those (not x and not the logits) and the backward only multiplies them
by that number. That is 3 GEMMs per chunk, the same 6·tokens·vocab·hidden FLOPs as torch's forward +
backward. Recomputing the logits in backward instead (what a "save the row statistics" design does)
would cost a fourth GEMM, +33% of the LM head's FLOPs, for no memory gain: dW has the weight's size
either way. With reduction "none" the upstream gradient differs per row and is known only in
backward, so x, W, b and the targets are kept and the backward recomputes the logits chunk by chunk.

Numerics: GEMMs run in the inputs' dtype (bf16/fp16 GEMMs accumulate in fp32, as F.linear's), the
softmax and loss in fp32 (fp64 for fp64 inputs), and the loss is returned in fp32, as transformers'
``logits.float()`` before cross-entropy gives it. Matches ``F.cross_entropy(F.linear(x, w, b).float(),
target, ignore_index=, reduction=, label_smoothing=)``: mean over the targets that are not
ignore_index (none of them: NaN, as torch), ignored rows 0 in "none", and out-of-range targets raise
torch's IndexError.

Backends: "cpu" (C++: csrc/cpu/linear_cross_entropy.cpp, the chunk loop of csrc/linear_cross_entropy.h
with a vectorised row epilogue), "cuda" (the same loop with a CUDA row kernel,
csrc/cuda/linear_cross_entropy.cu), "triton" (the loop here, with the Triton row kernel of
kernels/linear_cross_entropy.py) and "reference" (the loop here, the row epilogue in torch: the
oracle in float64).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import _backend
from ._common import check_float, plain_reference
from ._schemas import impl

REDUCTIONS = ("mean", "sum", "none")
CHUNK_MIN_BYTES, CHUNK_MAX_ROWS = 16 << 20, 256  # csrc/linear_cross_entropy.h's kChunkMinBytes, kChunkMaxRows


def chunk_rows(rows: int, hidden: int, vocab: int, elem_size: int, requested: int) -> int:
    """Token rows per chunk: ``requested`` when > 0, else as the C++ loop (csrc/linear_cross_entropy.h):
    up to CHUNK_MAX_ROWS, the logits capped at the larger of CHUNK_MIN_BYTES and 0.4x the weight."""
    if requested > 0:
        return min(requested, max(rows, 1))
    cap = max(CHUNK_MIN_BYTES, vocab * hidden * elem_size * 2 // 5)
    c = max(1, min(CHUNK_MAX_ROWS, cap // max(1, vocab * elem_size)))
    if c >= 16:
        c -= c % 16
    return min(c, max(rows, 1))


# ---------------------------------------------------------------------------------------------
# The chunk loop (reference and Triton backends; the C++ one is csrc/linear_cross_entropy.h).
# epilogue(logits, target, loss, write_grad, scale, row_scale): see that header.
# ---------------------------------------------------------------------------------------------
Epilogue = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float, Optional[torch.Tensor]], None]


def torch_epilogue(ignore_index: int, eps: float) -> Epilogue:
    """The row epilogue in torch: the reference's."""
    def run(logits, target, loss, write_grad, scale, row_scale):
        vocab = logits.shape[1]
        keep = target != ignore_index
        safe = torch.where(keep, target, 0)
        lse = torch.logsumexp(logits, dim=1)
        picked = logits.gather(1, safe[:, None])[:, 0]
        rows = lse - (1 - eps) * picked - eps / vocab * logits.sum(1)
        loss.copy_(torch.where(keep, rows, 0))
        if not write_grad:
            return
        s = row_scale if row_scale is not None else torch.full_like(lse, scale)
        s = torch.where(keep, s, 0)
        grad = torch.exp(logits - lse[:, None]) * s[:, None] - (s * eps / vocab)[:, None]
        grad.scatter_add_(1, safe[:, None], -(s * (1 - eps))[:, None])
        logits.copy_(grad)
    return run


def chunked(x, weight, bias, target, need_dx, need_dw, need_db, scale, row_scale, rows_per_chunk,
            epilogue: Epilogue):
    """(loss per row, dx, dw, db) as csrc/linear_cross_entropy.h's lce_chunked computes them."""
    rows, vocab = x.shape[0], weight.shape[0]
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    low = x.dtype != wide
    grad = need_dx or need_dw or need_db
    loss = x.new_empty(rows, dtype=wide)
    dx = x.new_zeros(x.shape) if need_dx else None
    dw = x.new_zeros(weight.shape, dtype=wide) if need_dw else None
    db = x.new_zeros(vocab, dtype=wide) if need_db else None
    c = chunk_rows(rows, x.shape[1], vocab, torch.finfo(wide).bits // 8, rows_per_chunk)
    for r0 in range(0, rows, c):
        xc = x[r0:r0 + c]
        logits = F.linear(xc, weight, bias).to(wide)
        rs = None if row_scale is None else row_scale[r0:r0 + c]
        epilogue(logits, target[r0:r0 + c], loss[r0:r0 + c], grad, scale, rs)
        if not grad:
            continue
        g = logits.to(x.dtype) if low else logits
        if need_dx:
            dx[r0:r0 + c] = g @ weight
        if need_dw:
            dw += (g.t() @ xc).to(wide)
        if need_db:
            db += logits.sum(0)
    return loss, dx, None if dw is None else dw.to(x.dtype), None if db is None else db.to(x.dtype)


def _reduce(loss_rows: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total if reduction == "sum" else total / (target != ignore_index).sum()


def _scale(target: torch.Tensor, ignore_index: int, reduction: str) -> float:
    if reduction != "mean":
        return 1.0
    kept = int((target != ignore_index).sum())
    return 1.0 / kept if kept else 0.0


def check_targets(target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """torch's IndexError for a target outside [0, vocab) that is not ignore_index (the C++ kernel checks
    its own; the Python backends check here, with one device sync on GPU)."""
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if target.numel() and bool(bad.any()):
        raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")


def _epilogue_for(backend: str, ignore_index: int, eps: float) -> Epilogue:
    if backend == "triton":
        from ember.kernels import linear_cross_entropy as tk

        return tk.epilogue(ignore_index, eps)
    return torch_epilogue(ignore_index, eps)


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((0,))


# ---------------------------------------------------------------------------------------------
# ember::linear_cross_entropy (schema in _schemas.py; its autograd is csrc/autograd.cpp's)
# ---------------------------------------------------------------------------------------------
lce_op = torch.ops.ember.linear_cross_entropy.default


@impl("linear_cross_entropy")
def _(x, weight, bias, target, ignore_index, reduction, label_smoothing, need_dx, need_dw, need_db, chunk_rows_,
      backend):
    backend = _backend.choose(backend, x.device, "linear_cross_entropy", dtype=x.dtype)
    if backend in ("cpu", "cuda"):
        return torch.ops.ember_C.linear_cross_entropy(x, weight, bias, target, ignore_index, reduction,
                                                      label_smoothing, need_dx, need_dw, need_db, chunk_rows_)
    check_targets(target, weight.shape[0], ignore_index)
    need_db = need_db and bias is not None
    loss, dx, dw, db = chunked(x, weight, bias, target, need_dx, need_dw, need_db,
                               _scale(target, ignore_index, reduction), None, chunk_rows_,
                               _epilogue_for(backend, ignore_index, label_smoothing))
    e = _empty(x)
    return (_reduce(loss, target, ignore_index, reduction), dx if need_dx else e, dw if need_dw else e,
            db if need_db else e)


@impl("linear_cross_entropy_backward")
def _(grad_loss, x, weight, bias, target, ignore_index, label_smoothing, need_dx, need_dw, need_db, chunk_rows_,
      backend):
    backend = _backend.choose(backend, x.device, "linear_cross_entropy", dtype=x.dtype)
    if backend in ("cpu", "cuda"):
        return torch.ops.ember_C.linear_cross_entropy_backward(grad_loss, x, weight, bias, target, ignore_index,
                                                               label_smoothing, need_dx, need_dw, need_db,
                                                               chunk_rows_)
    need_db = need_db and bias is not None
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    _, dx, dw, db = chunked(x, weight, bias, target, need_dx, need_dw, need_db, 1.0, grad_loss.to(wide), chunk_rows_,
                            _epilogue_for(backend, ignore_index, label_smoothing))
    e = _empty(x)
    return dx if need_dx else e, dw if need_dw else e, db if need_db else e


# ---------------------------------------------------------------------------------------------
# The public function: argument checks, then the op.
# ---------------------------------------------------------------------------------------------
def _check(x, weight, target, bias, ignore_index, reduction, label_smoothing, chunk_size):
    op = "ember.ops.linear_cross_entropy"
    check_float("linear_cross_entropy", "x", x)
    check_float("linear_cross_entropy", "weight", weight)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension (..., hidden), got a scalar")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"{op}: weight must be 2-D (vocab >= 1, hidden), got shape {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: x has {x.shape[-1]} features (shape {tuple(x.shape)}) but weight expects "
                         f"hidden={weight.shape[1]} (shape {tuple(weight.shape)})")
    for name, t, shape in (("weight", weight, None), ("bias", bias, (weight.shape[0],))):
        if t is None:
            continue
        check_float("linear_cross_entropy", name, t)
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} must be on x's device {x.device}, got {t.device}")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{op}: bias must have shape {shape}, got {tuple(t.shape)}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{op}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.uint8):
        raise TypeError(f"{op}: target must hold class indices as int64 (or uint8, as torch accepts), got {target.dtype}")
    if target.device != x.device:
        raise ValueError(f"{op}: target must be on x's device {x.device}, got {target.device}")
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"{op}: target must have x's leading shape {tuple(x.shape[:-1])}, got {tuple(target.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"{op}: label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{op}: chunk_size must be a positive int (token rows per chunk) or None, got {chunk_size!r}")


def reference(x, weight, target, bias=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """The formula itself: torch's cross-entropy of the materialised fp32 logits."""
    logits = F.linear(x, weight, bias)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    loss = F.cross_entropy(logits.reshape(-1, weight.shape[0]), target.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing)
    return loss.reshape(target.shape) if reduction == "none" else loss


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias).float(), target, ...)`` without the logits.

    x (..., hidden); weight (vocab, hidden) as ``nn.Linear.weight``; target (...) class indices
    (int64); the loss is 0-d for "mean" / "sum" and has target's shape for "none", in fp32 (fp64 for
    fp64 inputs). chunk_size: token rows per chunk (default: up to 256, at most the larger of 16 MB and
    0.4x the weight's size of fp32 logits).
    """
    _check(x, weight, target, bias, ignore_index, reduction, label_smoothing, chunk_size)
    name = _backend.for_call(backend, x.device, "linear_cross_entropy", dtype=x.dtype)
    if target.dtype == torch.uint8:
        target = target.long()
    if plain_reference(name):
        check_targets(target, weight.shape[0], ignore_index)
        return reference(x, weight, target, bias, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing)
    rows = math.prod(x.shape[:-1])
    x2 = x.reshape(rows, x.shape[-1])  # not (-1, H): ambiguous for 0 rows
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    t = target.reshape(rows).contiguous()
    loss = lce_op(x2, weight, bias, t, ignore_index, reduction, float(label_smoothing), False, False, False,
                  chunk_size or 0, name)[0]
    return loss.reshape(target.shape) if reduction == "none" else loss
