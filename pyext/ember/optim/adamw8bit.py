"""AdamW with block-wise 8-bit moments: about 2 bytes of optimizer state per parameter.

Each tensor's moments are cut into blocks of BLOCK elements; a block stores one fp32 absmax and
one byte per element:

    exp_avg     int8,  m ~ absmax * sign(q) * (|q| / 127)^2      (square companding: small values keep
                                                                  resolution where Adam's m lives)
    exp_avg_sq  uint8, v ~ absmax * (q / 255)^4                   (fourth-power companding: v spans
                                                                  many decades; sqrt(v) stays accurate)

Every step dequantizes a block to fp32, runs the ordinary AdamW update (the same formulas as
ember.optim.AdamW) and requantizes with round-to-nearest. Tensors smaller than ``min_8bit_size``
keep fp32 moments, like bitsandbytes: their state is negligible and they are often sensitive
(biases, norms). State keys: 'step', 'exp_avg', 'exp_avg_sq', plus 'exp_avg_absmax' and
'exp_avg_sq_absmax' (fp32, one per block) for quantized tensors.

The update runs as whole-tensor PyTorch ops (the reference backend); fused C++/Triton/CUDA kernels
for it are not written yet.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..ops import optim as _op

BLOCK = 256


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
    q = torch.round(127.0 * torch.sign(unit) * unit.abs().sqrt()).to(torch.int8)
    return q.reshape(-1)[: x.numel()].view(x.shape), absmax.view(-1)


def dequantize_signed(q: Tensor, absmax: Tensor) -> Tensor:
    b = _blocks(q)
    u = b / 127.0
    return (absmax.view(-1, 1) * torch.sign(u) * u * u).reshape(-1)[: q.numel()].view(q.shape)


def quantize_unsigned(x: Tensor) -> tuple[Tensor, Tensor]:
    b = _blocks(x)
    absmax = b.amax(1, keepdim=True)
    unit = (b / absmax.clamp_min(1e-30)).clamp_min(0)
    q = torch.round(255.0 * unit.sqrt().sqrt()).to(torch.uint8)
    return q.reshape(-1)[: x.numel()].view(x.shape), absmax.view(-1)


def dequantize_unsigned(q: Tensor, absmax: Tensor) -> Tensor:
    u = _blocks(q) / 255.0
    u2 = u * u
    return (absmax.view(-1, 1) * u2 * u2).reshape(-1)[: q.numel()].view(q.shape)


class AdamW8bit(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, maximize=False,
                 min_8bit_size=4096):
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize)
        self.min_8bit_size = min_8bit_size
        super().__init__(params, defaults)
        self._step_supports_amp_scaling = True

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            if p.numel() >= self.min_8bit_size:
                nb = math.ceil(p.numel() / BLOCK)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.int8)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.uint8)
                state["exp_avg_absmax"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
                state["exp_avg_sq_absmax"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
            else:
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    def load_state_dict(self, state_dict):
        # torch's loader casts floating-point state to the parameter's dtype but leaves integer state
        # alone only if it was saved as such; restore the byte codes (exact: they are small integers).
        super().load_state_dict(state_dict)
        for st in self.state.values():
            if "exp_avg_absmax" in st:
                st["exp_avg"] = st["exp_avg"].to(torch.int8)
                st["exp_avg_sq"] = st["exp_avg_sq"].to(torch.uint8)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and found_inf.item() != 0:
            return loss
        for group in self.param_groups:
            lr = float(group["lr"])
            b1, b2 = group["betas"]
            flags = _op.DECOUPLED | (_op.MAXIMIZE if group["maximize"] else 0)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or torch.is_complex(p):
                    raise RuntimeError("ember.optim.AdamW8bit does not support sparse or complex gradients")
                st = self._state(p)
                st["step"] += 1
                quant = st["exp_avg"].dtype == torch.int8
                m = dequantize_signed(st["exp_avg"], st["exp_avg_absmax"]) if quant else st["exp_avg"]
                v = dequantize_unsigned(st["exp_avg_sq"], st["exp_avg_sq_absmax"]) if quant else st["exp_avg_sq"]
                g = p.grad.float()
                if grad_scale is not None:
                    g = g / grad_scale.to(g)
                a, b = _op.coefficients("adam", lr, b1, b2, st["step"].item())
                new_p, m, v, _ = _op.update("adam", flags, p.float(), g, m, v, None, lr, b1, b2, group["eps"],
                                            group["weight_decay"], a, b)
                p.copy_(new_p)
                if quant:
                    st["exp_avg"], st["exp_avg_absmax"] = quantize_signed(m)
                    st["exp_avg_sq"], st["exp_avg_sq_absmax"] = quantize_unsigned(v)
                else:
                    st["exp_avg"].copy_(m)
                    st["exp_avg_sq"].copy_(v)
        return loss
