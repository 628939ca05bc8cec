"""``ember::optim_step``: one optimizer step over a whole (device, dtype) group of tensors.

The kernel-level op behind ``ember.optim``. One call updates every tensor of the group (multi-tensor
apply): the C++ CPU kernel runs one parallel loop over all (tensor, chunk) items, the Triton and
CUDA kernels one launch over a table of tensors. Lists, by slot (see csrc/optim.h):

    kind      s1               s2           s3               hyper = [lr, h1, h2, eps, weight_decay]
    sgd       momentum_buffer  -            -                h1 = momentum, h2 = dampening
    adam      exp_avg          exp_avg_sq   max_exp_avg_sq   h1, h2 = betas
    adagrad   sum              -            -                h1 = lr_decay
    rmsprop   square_avg       grad_avg     momentum_buffer  h1 = alpha, h2 = momentum
    lion      exp_avg          -            -                h1, h2 = betas

``steps`` (one 0-dim float tensor per parameter, as torch keeps them) are advanced by one inside the
op; ``masters`` (optional) are fp32 copies of fp16/bf16 parameters that the update reads and writes.
With ``grad_scale`` the gradients are divided by it on the fly; a nonzero ``found_inf`` skips the
whole step, step counts included (torch.amp.GradScaler's contract for fused optimizers).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._schemas import impl

KINDS = ("sgd", "adam", "adagrad", "rmsprop", "lion")

# Option bits, as ember::OptFlag in csrc/optim.h.
MAXIMIZE, DECOUPLED, AMSGRAD, NESTEROV, CENTERED, MOMENTUM, FIRST_STEP = 1, 2, 4, 8, 16, 32, 64


# ---------------------------------------------------------------------------------------------
# Pure-PyTorch reference: the same formulas as ember::opt_update, one tensor at a time, in fp32
# with one rounding per stored tensor. Device-side throughout (no .item()), so it also works under
# CUDA graph capture and torch.compile.
# ---------------------------------------------------------------------------------------------
def coefficients(kind: str, lr, h1: float, h2: float, step):
    """(a, b) of ember::opt_coef. ``step`` is the count after this step (a float or a tensor)."""
    if kind == "adam":
        return lr / (1.0 - h1**step), (1.0 - h2**step) ** 0.5
    if kind == "adagrad":
        return lr / (1.0 + (step - 1.0) * h1), 1.0
    return lr, 1.0


def update(kind, flags, p, g, s1, s2, s3, lr, h1, h2, eps, wd, a, b, sqrt=torch.sqrt):
    """One update on fp32 tensors; returns the new (p, s1, s2, s3). Mirrors ember::opt_update.
    ``sqrt``: AdamW8bit's reference passes a correctly rounded one (see ops/optim8bit.py)."""
    if flags & MAXIMIZE:
        g = -g
    if kind == "sgd":
        if wd != 0:
            g = g + wd * p
        if flags & MOMENTUM:
            s1 = g if flags & FIRST_STEP else s1 * h1 + (1.0 - h2) * g
            g = g + h1 * s1 if flags & NESTEROV else s1
        p = p - lr * g
    elif kind == "adam":
        if wd != 0:
            if flags & DECOUPLED:
                p = p * (1.0 - lr * wd)
            else:
                g = g + wd * p
        s1 = s1 + (1.0 - h1) * (g - s1)
        s2 = s2 * h2 + (1.0 - h2) * (g * g)
        v = s2
        if flags & AMSGRAD:
            s3 = torch.maximum(s3, s2)
            v = s3
        p = p - a * (s1 / (sqrt(v) / b + eps))
    elif kind == "adagrad":
        if wd != 0:
            g = g + wd * p
        s1 = s1 + g * g
        p = p - a * (g / (s1.sqrt() + eps))
    elif kind == "rmsprop":
        if wd != 0:
            g = g + wd * p
        s1 = s1 * h1 + (1.0 - h1) * (g * g)
        if flags & CENTERED:
            s2 = s2 + (1.0 - h1) * (g - s2)
            avg = (s1 - s2 * s2).sqrt() + eps
        else:
            avg = s1.sqrt() + eps
        if flags & MOMENTUM:
            s3 = s3 * h2 + g / avg
            p = p - lr * s3
        else:
            p = p - lr * (g / avg)
    elif kind == "lion":
        p = p * (1.0 - lr * wd)
        u = s1 * h1 + (1.0 - h1) * g
        p = p - lr * torch.sign(u)
        s1 = s1 * h2 + (1.0 - h2) * g
    else:
        raise ValueError(f"ember.optim: unknown optimizer kind {kind!r}; expected one of {KINDS}")
    return p, s1, s2, s3


def _step_reference(kind, params, grads, s1, s2, s3, masters, steps, hyper, flags, lr_t, grad_scale, found_inf):
    lr, h1, h2, eps, wd = hyper
    if lr_t is not None:
        lr = lr_t
    skip = None if found_inf is None else found_inf.ne(0)
    for i, param in enumerate(params):
        def f32(t):
            return None if t is None else t.float() if t.dtype != torch.float64 else t

        pick = lambda lst: lst[i] if lst else None  # noqa: E731
        master = pick(masters)
        p = master if master is not None else f32(param)
        g = f32(grads[i])
        if grad_scale is not None:
            g = g / grad_scale.to(g)
        a_, b_, c_ = (f32(pick(s)) for s in (s1, s2, s3))
        zeros = torch.zeros((), dtype=p.dtype, device=p.device)
        step = 1.0
        if steps:
            step = steps[i] + 1 if skip is None else steps[i] + 1 - skip.to(steps[i])
            steps[i].copy_(step)
            step = step.item() if not steps[i].is_cuda and not torch.compiler.is_compiling() else step
        lr_i = lr if not isinstance(lr, Tensor) else lr.to(device=p.device, dtype=torch.float64)
        if isinstance(step, Tensor):
            step = step.to(device=p.device, dtype=torch.float64)
        a, b = coefficients(kind, lr_i, h1, h2, step)
        np_, na, nb, nc = update(kind, flags, p, g, *(t if t is not None else zeros for t in (a_, b_, c_)),
                                 lr_i, h1, h2, eps, wd, a, b)
        outs = [(param, np_), (master, np_), (pick(s1), na), (pick(s2), nb), (pick(s3), nc)]
        for dst, val in outs:
            if dst is None:
                continue
            val = val.to(dst.dtype)
            dst.copy_(val if skip is None else torch.where(skip, dst, val))


# ---------------------------------------------------------------------------------------------
# The op (schema in _schemas.py). "cpu" and "cuda" are the same ember_C op; the dispatcher picks the
# device's kernel, which bumps the version counters of what it updates.
# ---------------------------------------------------------------------------------------------
@impl("optim_step")
def _optim_step(
    kind: str,
    params: list[Tensor],
    grads: list[Tensor],
    s1: list[Tensor],
    s2: list[Tensor],
    s3: list[Tensor],
    masters: list[Tensor],
    steps: list[Tensor],
    hyper: list[float],
    flags: int,
    lr: Tensor | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    backend: str,
) -> None:
    args = (kind, params, grads, s1, s2, s3, masters, steps, hyper, flags, lr, grad_scale, found_inf)
    if backend == "reference":
        with torch.no_grad():
            _step_reference(*args)
    elif backend == "triton":
        from ember.kernels import optim as tk

        tk.optim_step(*args)
    else:
        torch.ops.ember_C.optim_step(*args)


def step(kind, params, grads, s1, s2, s3, masters, steps, hyper, flags, lr, grad_scale, found_inf, backend):
    """``ember::optim_step`` as ember.optim calls it."""
    _OP(kind, params, grads, s1, s2, s3, masters, steps, hyper, flags, lr, grad_scale, found_inf, backend)


_OP = torch.ops.ember.optim_step.default
