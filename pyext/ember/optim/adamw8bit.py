"""AdamW with block-wise 8-bit moments: about 2 bytes of optimizer state per parameter.

Tensors of at least ``min_8bit_size`` elements keep their moments in the 8-bit block format of
ember.ops.optim8bit (int8 exp_avg with square companding, uint8 exp_avg_sq with fourth-power
companding, one fp32 absmax per 256 elements of each) and are updated by ``ember::adamw8bit_step``:
dequantize, the ordinary AdamW update (the same formulas as ember.optim.AdamW), requantize with
round-to-nearest-even. Smaller tensors keep fp32 moments, like bitsandbytes: their state is
negligible and they are often sensitive (biases, norms); they go through ``ember::optim_step``'s Adam
in the same step() call. State keys: 'step', 'exp_avg', 'exp_avg_sq', plus 'exp_avg_absmax' and
'exp_avg_sq_absmax' (fp32, one per block) for quantized tensors.

Everything else — backend choice (``backend=``, ``ember.backend()``, EMBER_BACKEND, auto), one launch
per (device, dtype) group, AMP's grad_scale / found_inf (read on the device by the GPU kernels),
tensor lr, closures — is MultiTensorOptimizer's. Step counts live on the parameter's device, so on
a GPU a found_inf skip never syncs with the host.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _backend
from ..ops import optim as _op
from ..ops import optim8bit as _q8
from ..ops.optim8bit import (BLOCK, dequantize_signed, dequantize_unsigned, quantize_signed,  # noqa: F401
                             quantize_unsigned)
from ._base import MultiTensorOptimizer, host_lr


class AdamW8bit(MultiTensorOptimizer):
    _kind, _name = "adam", "AdamW8bit"
    _kernel_op = "adamw8bit_step"
    _slots = ("exp_avg", "exp_avg_sq", None)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, maximize=False,
                 min_8bit_size=4096, backend=None):
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize)
        self.min_8bit_size = min_8bit_size
        super().__init__(params, defaults, backend=backend)

    def _setdefault_group(self, group):
        group.setdefault("maximize", False)

    def _hyper(self, group):
        b1, b2 = group["betas"]
        flags = _op.DECOUPLED | (_op.MAXIMIZE if group["maximize"] else 0)
        return [host_lr(group), b1, b2, group["eps"], float(group["weight_decay"])], flags

    def _new_step(self, group, p):
        return torch.zeros((), dtype=torch.float32, device=p.device)

    def _state_for(self, group, p, slots, master):
        state = self.state[p]
        if not state:
            state["step"] = self._new_step(group, p)
            if p.numel() >= self.min_8bit_size:
                # Contiguous whatever p's layout: blocks are runs of the logical order.
                nb = math.ceil(p.numel() / BLOCK)
                state["exp_avg"] = torch.zeros(p.shape, dtype=torch.int8, device=p.device)
                state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
                state["exp_avg_absmax"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
                state["exp_avg_sq_absmax"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
            else:
                # float64 parameters keep float64 moments: the C++ kernel's float64 path reads and writes
                # its state as float64 (fp32 buffers here overran the heap; found by tests/test_fuzz.py)
                sdt = torch.float64 if p.dtype == torch.float64 else torch.float32
                state["exp_avg"] = torch.zeros_like(p, dtype=sdt, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=sdt, memory_format=torch.preserve_format)
        return state

    def _plan_group(self, group, grad_scale, found_inf):
        launches = super()._plan_group(group, grad_scale, found_inf)
        # The strided quantized parameters' backend is chosen again in _launch; an explicit one that
        # cannot take them must raise here, before any parameter of the step has changed.
        for p in group["params"]:
            if p.grad is not None and "exp_avg_absmax" in self.state.get(p, {}) and not p.is_contiguous():
                _backend.choose(self.backend, p.device, "adamw8bit_step", label=f"optim.{self._name}",
                                dtype=p.dtype, dense=False)
        return launches

    def _launch(self, backend, ps, params, grads, lists, masters, steps, hyper, flags, lr, grad_scale, found_inf):
        m, v = lists[0], lists[1]
        quantized = ["exp_avg_absmax" in self.state[p] for p in ps]
        small = [i for i, q in enumerate(quantized) if not q]
        if small:
            pick = lambda lst: [lst[i] for i in small]  # noqa: E731
            _op.step("adam", pick(params), pick(grads), pick(m), pick(v), [], [], pick(steps), hyper, flags,
                           lr, grad_scale, found_inf, backend)
        quant = [i for i, q in enumerate(quantized) if q]
        # The kernels walk blocks in memory order, which is the logical order only for contiguous
        # parameters; the rare others (e.g. a transposed view) need a backend that takes them ("auto":
        # the reference; an explicit kernel backend raises, naming the reason).
        strided = [i for i in quant if not params[i].is_contiguous()]
        for run, ids in ((backend, [i for i in quant if params[i].is_contiguous()]), (None, strided)):
            if not ids:
                continue
            if run is None:
                run = _backend.choose(self.backend, params[ids[0]].device, "adamw8bit_step",
                                      label=f"optim.{self._name}", dtype=params[ids[0]].dtype, dense=False)
            pick = lambda lst: [lst[i] for i in ids]  # noqa: E731
            sts = [self.state[ps[i]] for i in ids]
            _q8.adamw8bit_step(pick(params), pick(grads), pick(m), pick(v), [st["exp_avg_absmax"] for st in sts],
                               [st["exp_avg_sq_absmax"] for st in sts], pick(steps), hyper, flags, lr, grad_scale,
                               found_inf, run)

    def load_state_dict(self, state_dict):
        # torch's loader casts floating state to the parameter's dtype and leaves 'step' where it was
        # saved: restore the saved codes, fp32 absmax and fp32 moments exactly, and steps on the
        # parameter's device. (A torch.optim.AdamW checkpoint's moments become fp32 ones.)
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        saved = {pid: dict(st) for pid, st in state_dict["state"].items()}
        torch.optim.Optimizer.load_state_dict(self, state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if p not in self.state or pid not in saved:
                continue
            st, quantized = self.state[p], "exp_avg_absmax" in saved[pid]
            for k, v in saved[pid].items():
                if not isinstance(v, Tensor):
                    continue
                if k == "step" or (k in ("exp_avg", "exp_avg_sq") and not quantized):
                    st[k] = v.to(device=p.device, dtype=torch.float32, copy=True)
                else:
                    st[k] = v.to(device=p.device, copy=True)
