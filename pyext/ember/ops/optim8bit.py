"""``ember::adamw8bit_step``: one AdamW step with block-wise 8-bit moments over a whole group of tensors.

The op behind ``ember.optim.AdamW8bit`` for its quantized tensors. Each tensor's moments are cut into
blocks of BLOCK elements in logical (row-major) order; a block stores one fp32 absmax per moment and
one byte per element:

    exp_avg     int8,  m = absmax * sign(q) * (|q| / 127)^2      (square companding: small values keep
                                                                  resolution where Adam's m lives)
    exp_avg_sq  uint8, v = absmax * (q / 255)^4                   (fourth-power companding: v spans
                                                                  many decades; sqrt(v) stays accurate)

A step dequantizes a block to fp32, runs the AdamW update of ``ember::optim_step`` (csrc/optim.h,
the same formulas and order as ember.optim.AdamW), and requantizes against the block's new absmax
with round-half-to-even. The C++ CPU kernel runs one parallel loop over all blocks of all tensors,
Triton and CUDA one launch; each block is one work item, so its absmax needs no cross-thread
reduction. Every backend performs the reference's fp32 operations in the reference's order (true
divisions, correctly rounded square roots), so codes agree bit for bit given the same inputs.

``steps`` (one 0-dim float tensor per parameter) advance by one inside the op; ``grad_scale``
divides the gradients; a nonzero ``found_inf`` skips the whole step, read on the device by the
Triton and CUDA kernels (no host sync unless the step counts themselves live on the host).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from . import optim as _op
from ._schemas import impl

BLOCK = 256


# ---------------------------------------------------------------------------------------------
# Pure-PyTorch reference (the oracle): whole-tensor ops, one tensor at a time.
# ---------------------------------------------------------------------------------------------
def _sqrt(x: Tensor) -> Tensor:
    """Correctly rounded fp32 square root. torch's CPU kernel for fp32 sqrt is not (about 1 in 5
    results is 1 ulp off on an AVX-512 build), which would make 8-bit codes depend on the backend;
    the double root rounded to float is exact (53 >= 2 * 24 + 2 bits), like sqrtf and sqrt.rn."""
    return x.double().sqrt().to(x.dtype) if x.device.type == "cpu" else x.sqrt()


def _blocks(t: Tensor) -> Tensor:
    """t as (nblocks, BLOCK) fp32, zero-padded."""
    flat = t.reshape(-1).float()
    pad = (-flat.numel()) % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK)


def quantize_signed(x: Tensor) -> tuple[Tensor, Tensor]:
    b = _blocks(x)
    absmax = b.abs().amax(1, keepdim=True)
    unit = b / absmax.clamp_min(1e-30)
    q = torch.round(127.0 * torch.sign(unit) * _sqrt(unit.abs())).to(torch.int8)
    return q.reshape(-1)[: x.numel()].view(x.shape), absmax.view(-1)


def dequantize_signed(q: Tensor, absmax: Tensor) -> Tensor:
    b = _blocks(q)
    u = b / b.new_full((), 127.0)  # a tensor divisor: torch's CUDA kernel multiplies by 1 / a scalar one
    return (absmax.view(-1, 1) * torch.sign(u) * u * u).reshape(-1)[: q.numel()].view(q.shape)


def quantize_unsigned(x: Tensor) -> tuple[Tensor, Tensor]:
    b = _blocks(x)
    absmax = b.amax(1, keepdim=True)
    unit = (b / absmax.clamp_min(1e-30)).clamp_min(0)
    q = torch.round(255.0 * _sqrt(_sqrt(unit))).to(torch.uint8)
    return q.reshape(-1)[: x.numel()].view(x.shape), absmax.view(-1)


def dequantize_unsigned(q: Tensor, absmax: Tensor) -> Tensor:
    b = _blocks(q)
    u = b / b.new_full((), 255.0)
    u2 = u * u
    return (absmax.view(-1, 1) * u2 * u2).reshape(-1)[: q.numel()].view(q.shape)


def _step_reference(params, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, steps, hyper, flags,
                    lr_t, grad_scale, found_inf):
    lr, b1, b2, eps, wd = hyper
    skip = None if found_inf is None else found_inf.ne(0)
    for i, param in enumerate(params):
        m = dequantize_signed(exp_avg[i], exp_avg_absmax[i])
        v = dequantize_unsigned(exp_avg_sq[i], exp_avg_sq_absmax[i])
        g = grads[i].float()
        if grad_scale is not None:
            g = g / grad_scale.to(g)
        step = 1.0
        if steps:
            step = steps[i] + 1 if skip is None else steps[i] + 1 - skip.to(steps[i])
            steps[i].copy_(step)
            step = step.item() if not steps[i].is_cuda and not torch.compiler.is_compiling() else step
        lr_i = lr if lr_t is None else lr_t.to(device=param.device, dtype=torch.float64)
        if isinstance(step, Tensor):
            step = step.to(device=param.device, dtype=torch.float64)
        a, b = _op.coefficients("adam", lr_i, b1, b2, step)
        new_p, m, v, _ = _op.update("adam", flags, param.float(), g, m, v, None, lr_i, b1, b2, eps, wd, a, b,
                                    sqrt=_sqrt)
        (qm, am), (qv, av) = quantize_signed(m), quantize_unsigned(v)
        outs = [(param, new_p), (exp_avg[i], qm), (exp_avg_sq[i], qv), (exp_avg_absmax[i], am),
                (exp_avg_sq_absmax[i], av)]
        for dst, val in outs:
            val = val.to(dst.dtype).view(dst.shape)
            dst.copy_(val if skip is None else torch.where(skip, dst, val))


def _check_triton(params, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, flags):
    """The C++ op's argument contract, for the Triton launcher (which cannot check raw addresses)."""
    if flags & _op.AMSGRAD:
        raise ValueError("ember.ops.adamw8bit_step: amsgrad is not supported")
    lists = dict(grads=grads, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, exp_avg_absmax=exp_avg_absmax,
                 exp_avg_sq_absmax=exp_avg_sq_absmax)
    for name, lst in lists.items():
        if len(lst) != len(params):
            raise ValueError(f"ember.ops.adamw8bit_step: {name} has {len(lst)} tensors, params {len(params)}")
    for i, p in enumerate(params):
        nb = -(-p.numel() // BLOCK)
        want = dict(params=(p.dtype, p.numel()), grads=(p.dtype, p.numel()), exp_avg=(torch.int8, p.numel()),
                    exp_avg_sq=(torch.uint8, p.numel()), exp_avg_absmax=(torch.float32, nb),
                    exp_avg_sq_absmax=(torch.float32, nb))
        for name, (dtype, numel) in want.items():
            t = p if name == "params" else lists[name][i]
            if t.dtype != dtype or t.numel() != numel or not t.is_contiguous() or t.device != params[0].device:
                raise ValueError(f"ember.ops.adamw8bit_step: {name}[{i}] must be a contiguous {dtype} tensor of "
                                 f"{numel} elements on {params[0].device}, got {t.dtype} {tuple(t.shape)} "
                                 f"strides {t.stride()} on {t.device}")
    if params and params[0].dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"ember.ops.adamw8bit_step: params must be float32, float16 or bfloat16, got {params[0].dtype}")


# ---------------------------------------------------------------------------------------------
# The op (schema in _schemas.py). "cpu" and "cuda" are the same ember_C op; the dispatcher picks the
# device's kernel.
# ---------------------------------------------------------------------------------------------
@impl("adamw8bit_step")
def _adamw8bit_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg: list[Tensor],
    exp_avg_sq: list[Tensor],
    exp_avg_absmax: list[Tensor],
    exp_avg_sq_absmax: list[Tensor],
    steps: list[Tensor],
    hyper: list[float],
    flags: int,
    lr: Tensor | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    backend: str,
) -> None:
    args = (params, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, steps, hyper, flags, lr,
            grad_scale, found_inf)
    if backend == "reference":
        with torch.no_grad():
            _step_reference(*args)
    elif backend == "triton":
        from ember.kernels import optim8bit as tk

        _check_triton(*args[:6], flags)
        tk.adamw8bit_step(*args)
    else:
        _backend.extension()  # registers ember_C (normally done by backend resolution)
        torch.ops.ember_C.adamw8bit_step(*args)


adamw8bit_step = torch.ops.ember.adamw8bit_step.default
