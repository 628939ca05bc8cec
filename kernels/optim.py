"""Multi-tensor optimizer step in Triton: one launch updates every tensor of a (device, dtype) group.

The host builds a table with one row per tensor — the addresses of parameter, gradient, the three
state slots and the fp32 master copy, the element count and the index of the tensor's first chunk —
and the kernel runs one program per chunk of CHUNK = BLOCK * ITERS elements. A program finds its
tensor by binary search over the first-chunk column, casts the stored addresses to typed pointers,
and streams its chunk once: fp32 AdamW reads p, g, m, v and writes p, m, v (28 bytes per element).

The table is cached by content, so a training loop whose tensors keep their addresses (and every
CUDA-graph replay) reuses the device copy instead of uploading it again. The update formulas mirror
ember::opt_update (csrc/optim.h) operation for operation.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from . import _target
from .activation import to_output

KIND_IDS = {"sgd": 0, "adam": 1, "adagrad": 2, "rmsprop": 3, "lion": 4}
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_ROW = 8  # int64 columns of the tensor table
_NO_CHUNK = 2**62  # first-chunk value of the padding rows (never <= a program id)


@triton.jit
def _opt_update(p, g, s1, s2, s3, lr, h1, h2, eps, wd, om1, om2, decay, a, b, KIND: tl.constexpr,
                FLAGS: tl.constexpr):
    """ember::opt_update on fp32 blocks; FLAGS as ember::OptFlag. Returns (p, s1, s2, s3).
    om1 = 1 - h1, om2 = 1 - h2, decay = 1 - lr wd, rounded from double on the host as torch does."""
    if FLAGS & 1:  # maximize
        g = -g
    if KIND == 0:  # SGD
        g = g + wd * p
        if FLAGS & 32:  # momentum buffer
            if FLAGS & 64:  # first step: the buffer starts as the gradient
                s1 = g
            else:
                s1 = s1 * h1 + om2 * g
            if FLAGS & 8:  # nesterov
                g = g + h1 * s1
            else:
                g = s1
        p = p - lr * g
    elif KIND == 1:  # Adam / AdamW
        if FLAGS & 2:
            p = p * decay
        else:
            g = g + wd * p
        s1 = s1 + om1 * (g - s1)
        s2 = s2 * h2 + om2 * (g * g)
        v = s2
        if FLAGS & 4:  # amsgrad
            s3 = tl.maximum(s3, s2)
            v = s3
        p = p - a * (s1 / (tl.sqrt(v) / b + eps))
    elif KIND == 2:  # Adagrad
        g = g + wd * p
        s1 = s1 + g * g
        p = p - a * (g / (tl.sqrt(s1) + eps))
    elif KIND == 3:  # RMSprop
        g = g + wd * p
        s1 = s1 * h1 + om1 * (g * g)
        if FLAGS & 16:  # centered
            s2 = s2 + om1 * (g - s2)
            avg = tl.sqrt(s1 - s2 * s2) + eps
        else:
            avg = tl.sqrt(s1) + eps
        if FLAGS & 32:
            s3 = s3 * h2 + g / avg
            p = p - lr * s3
        else:
            p = p - lr * (g / avg)
    else:  # Lion
        p = p * decay
        u = s1 * h1 + om1 * g
        p = p - lr * tl.where(u > 0.0, 1.0, tl.where(u < 0.0, -1.0, 0.0))
        s1 = s1 * h2 + om2 * g
    return p, s1, s2, s3


@triton.jit
def _optim_step_kernel(
    table_ptr,  # int64 [2**LOG_N, 8]: p, g, s1, s2, s3, master addresses, numel, first chunk (padded)
    coef_ptr,  # fp32 [n, 2]: (a, b) of ember::opt_coef per tensor, for this step
    lr_ptr,  # fp32 scalar learning rate when HAS_LR_PTR (a tensor lr), else unused
    scale_ptr,  # fp32 scalar AMP grad scale when HAS_SCALE
    inf_ptr,  # fp32 scalar AMP found_inf when HAS_INF: nonzero skips the update
    lr, h1, h2, eps, wd,  # fp32 hyper-parameters (meaning per KIND as in csrc/optim.h)
    om1, om2, decay,  # 1 - h1, 1 - h2, 1 - lr wd (from double)
    KIND: tl.constexpr, FLAGS: tl.constexpr,
    P_DT: tl.constexpr, S_DT: tl.constexpr,  # parameter / state element types
    HAS_S1: tl.constexpr, HAS_S2: tl.constexpr, HAS_S3: tl.constexpr, HAS_MASTER: tl.constexpr,
    HAS_LR_PTR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,  # see activation.to_output
    LOG_N: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # Branch-free binary search: the last row whose first chunk is <= pid.
    t = pid * 0
    for k in tl.static_range(LOG_N):
        cand = t + (1 << (LOG_N - 1 - k))
        first = tl.load(table_ptr + cand * 8 + 7)
        t = tl.where(first <= pid, cand, t)
    row = table_ptr + t * 8
    numel = tl.load(row + 6)
    begin = (pid - tl.load(row + 7)) * (BLOCK * ITERS)

    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DT))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(P_DT))
    s1_ptr = tl.load(row + 2).to(tl.pointer_type(S_DT))
    s2_ptr = tl.load(row + 3).to(tl.pointer_type(S_DT))
    s3_ptr = tl.load(row + 4).to(tl.pointer_type(S_DT))
    m_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    a = tl.load(coef_ptr + t * 2)
    b = tl.load(coef_ptr + t * 2 + 1)
    if HAS_LR_PTR:
        lr = tl.load(lr_ptr)
        decay = 1.0 - lr * wd
    inv_scale = 1.0
    if HAS_SCALE:
        inv_scale = 1.0 / tl.load(scale_ptr)
    if HAS_INF:  # AMP found an inf/nan: nothing of this step is stored
        numel = tl.where(tl.load(inf_ptr) == 0.0, numel, 0)

    for it in range(0, ITERS):
        offs = begin + it * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        if HAS_MASTER:
            p = tl.load(m_ptr + offs, mask=mask, other=0.0)
        else:
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = g * inv_scale
        s1 = tl.zeros_like(p)
        s2 = tl.zeros_like(p)
        s3 = tl.zeros_like(p)
        if HAS_S1:
            s1 = tl.load(s1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_S2:
            s2 = tl.load(s2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_S3:
            s3 = tl.load(s3_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p, s1, s2, s3 = _opt_update(p, g, s1, s2, s3, lr, h1, h2, eps, wd, om1, om2, decay, a, b, KIND, FLAGS)
        if HAS_MASTER:
            tl.store(m_ptr + offs, p, mask=mask)
        tl.store(p_ptr + offs, to_output(p, p_ptr, INTERPRET_BF16 and P_DT == tl.bfloat16), mask=mask)
        if HAS_S1:
            tl.store(s1_ptr + offs, to_output(s1, s1_ptr, INTERPRET_BF16 and S_DT == tl.bfloat16), mask=mask)
        if HAS_S2:
            tl.store(s2_ptr + offs, to_output(s2, s2_ptr, INTERPRET_BF16 and S_DT == tl.bfloat16), mask=mask)
        if HAS_S3:
            tl.store(s3_ptr + offs, to_output(s3, s3_ptr, INTERPRET_BF16 and S_DT == tl.bfloat16), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host side.
# ---------------------------------------------------------------------------------------------
_TABLES: OrderedDict = OrderedDict()  # (device, rows) -> device table; a few recent groups


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without a sync: staged through pinned memory and copied
    asynchronously on the current stream (the caching host allocator keeps the pinned block until the
    copy is done). A pageable copy would block the host every step."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _table(rows: list, device: torch.device, log_n: int) -> torch.Tensor:
    key = (str(device), tuple(map(tuple, rows)))
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    padded = rows + [[0] * 7 + [_NO_CHUNK]] * ((1 << log_n) - len(rows))
    table = upload(torch.tensor(padded, dtype=torch.int64), device)
    _TABLES[key] = table
    if len(_TABLES) > 32:
        _TABLES.popitem(last=False)
    return table


def _coefficients(kind, steps, lr, lr_t, h1, h2, n, device) -> torch.Tensor:
    """(a, b) per tensor for the step about to be taken (count + 1), as ember::opt_coef."""
    on_host = lr_t is None and (not steps or steps[0].device.type == "cpu")
    if on_host and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("ember.optim: a CUDA graph can only capture a step whose step counts live on the "
                           "device: construct the optimizer with capturable=True")
    if on_host:  # in double, as torch computes them in Python floats
        counts = torch.stack(steps).tolist() if steps else [0.0] * n
        coef = []
        for c in counts:
            s = c + 1.0
            if kind == "adam":
                coef.append((lr / (1.0 - h1**s), math.sqrt(1.0 - h2**s)))
            elif kind == "adagrad":
                coef.append((lr / (1.0 + (s - 1.0) * h1), 1.0))
            else:
                coef.append((lr, 1.0))
        return upload(torch.tensor(coef, dtype=torch.float32), device)
    # Step counts and/or lr on the device (capturable): a few small device ops, no host sync.
    s = (torch.stack(steps).to(device=device, dtype=torch.float64) + 1.0) if steps else torch.ones(n, device=device,
                                                                                                      dtype=torch.float64)
    lr_d = lr_t.to(device=device, dtype=torch.float64) if lr_t is not None else lr
    if kind == "adam":
        a, b = lr_d / (1.0 - torch.pow(h1, s)), torch.sqrt(1.0 - torch.pow(h2, s))
    elif kind == "adagrad":
        a, b = lr_d / (1.0 + (s - 1.0) * h1), torch.ones_like(s)
    else:
        a, b = lr_d * torch.ones_like(s), torch.ones_like(s)
    return torch.stack([a, b], 1).to(torch.float32).contiguous()


def optim_step(kind, params, grads, s1, s2, s3, masters, steps, hyper, flags, lr_t, grad_scale, found_inf):
    if params:
        with _target.device_guard(params[0]):
            _optim_step(kind, params, grads, s1, s2, s3, masters, steps, hyper, flags, lr_t, grad_scale, found_inf)


def _optim_step(kind, params, grads, s1, s2, s3, masters, steps, hyper, flags, lr_t, grad_scale, found_inf):
    n = len(params)
    device = params[0].device
    lr, h1, h2, eps, wd = (float(x) for x in hyper)
    if _target.interpreting():  # interpreter: every program is a Python round trip, so few wide ones
        block, iters, warps = 4096, 4, 1
    else:
        block, iters, warps = 1024, 16, 4
    chunk = block * iters
    rows, first = [], 0
    for i, p in enumerate(params):
        addr = lambda lst: lst[i].data_ptr() if lst else 0  # noqa: E731
        numel = p.numel()
        rows.append([p.data_ptr(), grads[i].data_ptr(), addr(s1), addr(s2), addr(s3), addr(masters), numel, first])
        first += triton.cdiv(numel, chunk)
    if first == 0:
        return
    log_n = max(1, math.ceil(math.log2(n + 1)))
    table = _table(rows, device, log_n)
    coef = _coefficients(kind, steps, lr, lr_t, h1, h2, n, device)
    dummy = coef  # any fp32 tensor for the pointer arguments a launch does not use
    p_dt = _TL_DTYPES[params[0].dtype]
    s_dt = _TL_DTYPES[s1[0].dtype] if s1 else p_dt
    _optim_step_kernel[(first,)](
        table, coef,
        lr_t if lr_t is not None else dummy,
        grad_scale if grad_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        lr, h1, h2, eps, wd, 1.0 - h1, 1.0 - h2, 1.0 - lr * wd,
        KIND=KIND_IDS[kind], FLAGS=int(flags), P_DT=p_dt, S_DT=s_dt,
        HAS_S1=bool(s1), HAS_S2=bool(s2), HAS_S3=bool(s3), HAS_MASTER=bool(masters),
        HAS_LR_PTR=lr_t is not None, HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None,
        INTERPRET_BF16=_target.interpreting(), LOG_N=log_n, BLOCK=block, ITERS=iters, num_warps=warps,
    )
    if steps:  # after the kernel, which read the old counts through `coef`
        torch._foreach_add_(steps, 1.0)
        if found_inf is not None:
            torch._foreach_sub_(steps, [found_inf.to(steps[0].device, steps[0].dtype)] * n)
