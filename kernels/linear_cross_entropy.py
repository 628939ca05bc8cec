"""The row epilogue of the fused linear + cross-entropy in Triton (the chunk loop and its GEMMs are
pyext/ember/ops/linear_cross_entropy.py's ``chunked``, with torch matmuls, i.e. cuBLAS on GPU).

One program per row of fp32 logits, as the CPU and CUDA kernels compute it: a first pass keeping an
online max and sum of exp (one read of the row) and the sum of the logits, then the loss
``lse - (1 - eps) l[t] - eps / V sum(l)`` (0 for an ignored row), and with WRITE_GRAD a second pass
writing the gradient ``(softmax - eps / V - (1 - eps) onehot(t)) * scale_row`` over the logits.
"""
import torch
import triton
import triton.language as tl

from . import _target


@triton.jit
def _cross_entropy_rows(logits_ptr, target_ptr, loss_ptr, row_scale_ptr, V, ignore_index, eps, scale,
                        WRITE_GRAD: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * V
    t = tl.load(target_ptr + row)
    keep = t != ignore_index
    safe_t = tl.where(keep, t, 0)
    cols = tl.arange(0, BLOCK)
    m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    s = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    sum_l = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    for off in range(0, V, BLOCK):
        mask = off + cols < V
        x = tl.load(base + off + cols, mask=mask, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # exp(-inf - -inf) is NaN: while the row so far is all -inf there is nothing to rescale
        s = tl.where(m == float("-inf"), 0.0, s * tl.exp(m - m_new)) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        sum_l += tl.sum(tl.where(mask, x, 0.0), axis=0)
    lse = m + tl.log(s)
    picked = tl.load(base + safe_t)
    loss = lse - (1.0 - eps) * picked - eps / V * sum_l
    tl.store(loss_ptr + row, tl.where(keep, loss, 0.0))
    if WRITE_GRAD:
        if HAS_ROW_SCALE:
            sc = tl.load(row_scale_ptr + row)
        else:
            sc = scale
        for off in range(0, V, BLOCK):
            mask = off + cols < V
            x = tl.load(base + off + cols, mask=mask, other=0.0)
            g = tl.exp(x - lse) * sc - sc * eps / V
            g = tl.where(off + cols == safe_t, g - sc * (1.0 - eps), g)
            g = tl.where(keep, g, 0.0)
            tl.store(base + off + cols, g, mask=mask)


def _block(V: int) -> tuple[int, int]:
    """(BLOCK, num_warps): up to 4096 columns a step (16 per thread at 8 warps) on GPU, one wide
    block under the interpreter (each step is a Python round trip there)."""
    if _target.interpreting():
        return min(triton.next_power_of_2(max(V, 1)), 1 << 16), 1
    return min(triton.next_power_of_2(max(V, 1)), 4096), 8


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor, ignore_index: int, eps: float,
                       write_grad: bool, scale: float, row_scale: torch.Tensor | None) -> None:
    """The row epilogue over ``logits`` (rows, V) fp32 contiguous, in place (see the module docstring)."""
    rows, V = logits.shape
    if rows == 0:
        return
    if logits.dtype != torch.float32 or not logits.is_contiguous():
        raise ValueError("ember.kernels.linear_cross_entropy: logits must be contiguous float32")
    block, warps = _block(V)
    with _target.device_guard(logits):
        _cross_entropy_rows[(rows,)](
            logits, target, loss, row_scale if row_scale is not None else loss, V, ignore_index, float(eps),
            float(scale), WRITE_GRAD=write_grad, HAS_ROW_SCALE=row_scale is not None, BLOCK=block,
            num_warps=warps,
        )


def epilogue(ignore_index: int, eps: float):
    """The chunk loop's epilogue callback (ember.ops.linear_cross_entropy.chunked)."""
    def run(logits, target, loss, write_grad, scale, row_scale):
        cross_entropy_rows(logits, target, loss, ignore_index, eps, write_grad, scale,
                           None if row_scale is None else row_scale.float().contiguous())
    return run
