"""AdamW8bit step in Triton: one launch over every 256-element block of every tensor of a group.

Same host-side table as kernels/optim.py (one row per tensor: addresses of parameter, gradient, the
int8 / uint8 codes and the two fp32 absmax arrays, element count, first chunk), and the kernel runs
one program per chunk of ROWS blocks, held as a [ROWS, 256] tile: a row is one block, so its new
absmax is a reduction along the row inside the program. The math is that of
pyext/ember/ops/optim8bit.py operation for operation, with correctly rounded divisions and square
roots (tl.div_rn / tl.sqrt_rn; Triton's `/` and tl.sqrt are approximate on GPUs) and
round-half-to-even, so the codes match the reference and the C++ backends bit for bit. That is why
the Adam update is spelled out here instead of reusing optim._opt_update.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _target
from .activation import to_output
from .optim import _TL_DTYPES, _coefficients, _table

QBLOCK = 256


@triton.jit
def _round_half_even(x):
    """round(x) for x >= 0, ties to even (torch.round, rint)."""
    r = tl.floor(x)
    f = x - r  # exact for x >= 0
    odd = r - 2.0 * tl.floor(r * 0.5)
    return tl.where((f > 0.5) | ((f == 0.5) & (odd == 1.0)), r + 1.0, r)


@triton.jit
def _nan_max(a, b):
    # torch.amax (and the CUDA / C++ kernels) propagate NaN; the GPU's plain tl.max (max.f32) drops it,
    # which would give a block with a NaN moment a finite absmax on Triton alone.
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _adamw8bit_kernel(
    table_ptr,  # int64 [2**LOG_N, 8]: p, g, exp_avg, exp_avg_sq, their absmax addresses, numel, first chunk
    coef_ptr,  # fp32 [n, 2]: Adam's (a, b) per tensor for this step
    lr_ptr,  # fp32 scalar learning rate when HAS_LR_PTR
    scale_ptr,  # fp32 scalar AMP grad scale when HAS_SCALE
    inf_ptr,  # fp32 scalar AMP found_inf when HAS_INF: nonzero skips the update
    b1, b2, eps, wd, om1, om2, decay,  # fp32; om = 1 - beta, decay = 1 - lr wd (from double)
    FLAGS: tl.constexpr,  # ember::OptFlag bits (maximize, decoupled)
    P_DT: tl.constexpr, HAS_LR_PTR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
    INTERPRET_BF16: tl.constexpr, LOG_N: tl.constexpr, ROWS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t = pid * 0
    for k in tl.static_range(LOG_N):  # branch-free binary search: last row whose first chunk <= pid
        cand = t + (1 << (LOG_N - 1 - k))
        first = tl.load(table_ptr + cand * 8 + 7)
        t = tl.where(first <= pid, cand, t)
    row = table_ptr + t * 8
    numel = tl.load(row + 6)
    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DT))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(P_DT))
    qm_ptr = tl.load(row + 2).to(tl.pointer_type(tl.int8))
    qv_ptr = tl.load(row + 3).to(tl.pointer_type(tl.uint8))
    am_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    av_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    a = tl.load(coef_ptr + t * 2)
    b = tl.load(coef_ptr + t * 2 + 1)
    if HAS_LR_PTR:
        decay = 1.0 - tl.load(lr_ptr) * wd
    if HAS_INF:  # AMP found an inf/nan: nothing of this step is stored
        numel = tl.where(tl.load(inf_ptr) == 0.0, numel, 0)

    blocks = (pid - tl.load(row + 7)) * ROWS + tl.arange(0, ROWS)
    offs = blocks[:, None] * 256 + tl.arange(0, 256)[None, :]
    mask = offs < numel
    bmask = blocks * 256 < numel
    am = tl.load(am_ptr + blocks, mask=bmask, other=0.0)[:, None]
    av = tl.load(av_ptr + blocks, mask=bmask, other=0.0)[:, None]
    # Past the end codes, p and g load as 0, which keeps the padded moments exactly 0.
    u = tl.div_rn(tl.load(qm_ptr + offs, mask=mask, other=0).to(tl.float32), 127.0)
    m = (am * tl.abs(u)) * u
    u = tl.div_rn(tl.load(qv_ptr + offs, mask=mask, other=0).to(tl.float32), 255.0)
    u2 = u * u
    v = (av * u2) * u2
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * (1.0 / tl.load(scale_ptr))

    # ember::opt_update's Adam.
    if FLAGS & 1:  # maximize
        g = -g
    if FLAGS & 2:  # decoupled (AdamW); decay is exactly 1 when wd = 0
        p = p * decay
    else:
        g = g + wd * p
    m = m + om1 * (g - m)
    v = v * b2 + om2 * (g * g)
    p = p - a * tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), b) + eps)
    tl.store(p_ptr + offs, to_output(p, p_ptr, INTERPRET_BF16 and P_DT == tl.bfloat16), mask=mask)

    absm = tl.reduce(tl.abs(m), 1, _nan_max)
    absv = tl.reduce(v, 1, _nan_max)
    unit = tl.div_rn(m, tl.maximum(absm, 1e-30)[:, None])
    r = _round_half_even(127.0 * tl.sqrt_rn(tl.abs(unit)))
    tl.store(qm_ptr + offs, tl.where(unit < 0.0, -r, r).to(tl.int8), mask=mask)
    unit = tl.maximum(tl.div_rn(v, tl.maximum(absv, 1e-30)[:, None]), 0.0)
    tl.store(qv_ptr + offs, _round_half_even(255.0 * tl.sqrt_rn(tl.sqrt_rn(unit))).to(tl.uint8), mask=mask)
    tl.store(am_ptr + blocks, absm, mask=bmask)
    tl.store(av_ptr + blocks, absv, mask=bmask)


def adamw8bit_step(params, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, steps, hyper, flags, lr_t,
                   grad_scale, found_inf):
    if params:
        with _target.device_guard(params[0]):
            _adamw8bit_step(params, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, steps, hyper, flags,
                            lr_t, grad_scale, found_inf)


def _adamw8bit_step(params, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, steps, hyper, flags, lr_t,
                    grad_scale, found_inf):
    n = len(params)
    device = params[0].device
    lr, b1, b2, eps, wd = (float(x) for x in hyper)
    # Interpreter: every program is a Python round trip, so few wide ones.
    rows_per_prog, warps = (64, 1) if _target.interpreting() else (8, 8)
    chunk = rows_per_prog * QBLOCK
    rows, first = [], 0
    for i, p in enumerate(params):
        rows.append([p.data_ptr(), grads[i].data_ptr(), exp_avg[i].data_ptr(), exp_avg_sq[i].data_ptr(),
                     exp_avg_absmax[i].data_ptr(), exp_avg_sq_absmax[i].data_ptr(), p.numel(), first])
        first += triton.cdiv(p.numel(), chunk)
    if first == 0:
        return
    log_n = max(1, math.ceil(math.log2(n + 1)))
    table = _table(rows, device, log_n)
    coef = _coefficients("adam", steps, lr, lr_t, b1, b2, n, device)
    dummy = coef
    _adamw8bit_kernel[(first,)](
        table, coef,
        lr_t if lr_t is not None else dummy,
        grad_scale if grad_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        b1, b2, eps, wd, 1.0 - b1, 1.0 - b2, 1.0 - lr * wd,
        FLAGS=int(flags), P_DT=_TL_DTYPES[params[0].dtype], HAS_LR_PTR=lr_t is not None,
        HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None, INTERPRET_BF16=_target.interpreting(),
        LOG_N=log_n, ROWS=rows_per_prog, num_warps=warps,
        enable_fp_fusion=False,  # no a*b+c -> fma: the codes must round like the reference's, bit for bit
    )
    if steps:  # after the kernel, which read the old counts through `coef`
        torch._foreach_add_(steps, 1.0)
        if found_inf is not None:
            torch._foreach_sub_(steps, [found_inf.to(steps[0].device, steps[0].dtype)] * n)
