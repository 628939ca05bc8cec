"""SGD, Adam, AdamW, Adagrad, RMSprop and Lion: drop-in replacements for torch.optim.

Same constructor arguments, defaults, param-group keys and state layout as torch 2.13's classes, so
checkpoints move between them in both directions; ``foreach`` / ``fused`` are accepted and
ignored (ember always runs one multi-tensor kernel per (device, dtype) group). ember adds two
keyword-only options: ``backend`` (see ember.backend) and ``master_weights`` (fp32 copies of
fp16/bf16 parameters kept in the state as 'master_param', with fp32 moments).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops import optim as _op
from ._base import MultiTensorOptimizer, host_lr as _lr


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(msg)


def _float(x) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _maximize(group) -> int:
    return _op.MAXIMIZE if group["maximize"] else 0


class SGD(MultiTensorOptimizer):
    _kind, _name, _has_step = "sgd", "SGD", False

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, backend=None,
                 master_weights=False):
        _check(_float(lr) >= 0.0, f"Invalid learning rate: {lr}")
        _check(momentum >= 0.0, f"Invalid momentum value: {momentum}")
        _check(weight_decay >= 0.0, f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights)

    def _setdefault_group(self, group):
        super()._setdefault_group(group)
        group.setdefault("nesterov", False)
        group.setdefault("fused", False)

    def _active_slots(self, group):
        return ("momentum_buffer" if group["momentum"] != 0 else None, None, None)

    def _hyper(self, group):
        flags = _maximize(group) | (_op.MOMENTUM if group["momentum"] != 0 else 0)
        flags |= _op.NESTEROV if group["nesterov"] else 0
        return [_lr(group), group["momentum"], group["dampening"], 0.0, _float(group["weight_decay"])], flags

    # torch creates the momentum buffer as a copy of the first (decayed) gradient; the kernel does the
    # same for the tensors whose buffer is new this step (FIRST_STEP bucket).
    def _bucket_key(self, group, state, slots):
        return slots[0] is not None and state.get("momentum_buffer") is None

    def _bucket_flags(self, extra):
        return _op.FIRST_STEP if extra else 0

    def _init_slot(self, group, key, p):
        return torch.empty_like(p, memory_format=torch.preserve_format)


class Adam(MultiTensorOptimizer):
    _kind, _name = "adam", "Adam"
    _decoupled_default = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, backend=None, master_weights=False):
        _check(0.0 <= _float(lr), f"Invalid learning rate: {lr}")
        _check(0.0 <= eps, f"Invalid epsilon value: {eps}")
        _check(0.0 <= _float(betas[0]) < 1.0, f"Invalid beta parameter at index 0: {betas[0]}")
        _check(0.0 <= _float(betas[1]) < 1.0, f"Invalid beta parameter at index 1: {betas[1]}")
        _check(0.0 <= weight_decay, f"Invalid weight_decay value: {weight_decay}")
        betas = tuple(_float(b) for b in betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights)

    def _setdefault_group(self, group):
        super()._setdefault_group(group)
        group.setdefault("amsgrad", False)
        group.setdefault("capturable", False)
        group.setdefault("fused", None)
        group.setdefault("decoupled_weight_decay", self._decoupled_default)

    def _active_slots(self, group):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq" if group["amsgrad"] else None)

    def _hyper(self, group):
        b1, b2 = group["betas"]
        flags = _maximize(group) | (_op.AMSGRAD if group["amsgrad"] else 0)
        flags |= _op.DECOUPLED if group["decoupled_weight_decay"] else 0
        return [_lr(group), _float(b1), _float(b2), group["eps"], group["weight_decay"]], flags


class AdamW(Adam):
    _name = "AdamW"
    _decoupled_default = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None, backend=None,
                 master_weights=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, backend=backend, master_weights=master_weights)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


class Adagrad(MultiTensorOptimizer):
    _kind, _name = "adagrad", "Adagrad"

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10,
                 foreach=None, *, maximize=False, differentiable=False, fused=None, backend=None,
                 master_weights=False):
        _check(0.0 <= _float(lr), f"Invalid learning rate: {lr}")
        _check(0.0 <= lr_decay, f"Invalid lr_decay value: {lr_decay}")
        _check(0.0 <= weight_decay, f"Invalid weight_decay value: {weight_decay}")
        _check(0.0 <= initial_accumulator_value, f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        _check(0.0 <= eps, f"Invalid epsilon value: {eps}")
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, foreach=foreach, maximize=maximize,
                        differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights)
        # Like torch, Adagrad creates its state at construction (step 0, sum = initial value).
        for group in self.param_groups:
            for p in group["params"]:
                master = self.master_weights and p.dtype in (torch.float16, torch.bfloat16)
                self._state_for(group, p, self._slots, master)

    _slots = ("sum", None, None)

    def _setdefault_group(self, group):
        super()._setdefault_group(group)
        group.setdefault("fused", None)

    def _init_slot(self, group, key, p):
        return torch.full_like(p, self.defaults["initial_accumulator_value"], memory_format=torch.preserve_format)

    def _hyper(self, group):
        return [_lr(group), group["lr_decay"], 0.0, group["eps"], group["weight_decay"]], _maximize(group)


class RMSprop(MultiTensorOptimizer):
    _kind, _name = "rmsprop", "RMSprop"

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False, *, backend=None,
                 master_weights=False):
        _check(0.0 <= _float(lr), f"Invalid learning rate: {lr}")
        _check(0.0 <= eps, f"Invalid epsilon value: {eps}")
        _check(0.0 <= momentum, f"Invalid momentum value: {momentum}")
        _check(0.0 <= weight_decay, f"Invalid weight_decay value: {weight_decay}")
        _check(0.0 <= alpha, f"Invalid alpha value: {alpha}")
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered, weight_decay=weight_decay,
                        capturable=capturable, foreach=foreach, maximize=maximize, differentiable=differentiable)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights)

    def _setdefault_group(self, group):
        super()._setdefault_group(group)
        group.setdefault("momentum", 0)
        group.setdefault("centered", False)
        group.setdefault("capturable", False)

    def _new_step(self, group, p):
        # RMSprop has no fused variant in torch: its step follows only `capturable`.
        if group.get("capturable"):
            return torch.zeros((), dtype=torch.float32 if torch.get_default_dtype() != torch.float64 else torch.float64,
                               device=p.device)
        return super()._new_step(group, p)

    def _active_slots(self, group):
        return ("square_avg", "grad_avg" if group["centered"] else None,
                "momentum_buffer" if group["momentum"] > 0 else None)

    def _hyper(self, group):
        flags = _maximize(group) | (_op.CENTERED if group["centered"] else 0)
        flags |= _op.MOMENTUM if group["momentum"] > 0 else 0
        return [_lr(group), group["alpha"], group["momentum"], group["eps"], group["weight_decay"]], flags


class Lion(MultiTensorOptimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):

        p <- p (1 - lr wd) - lr sign(beta1 m + (1 - beta1) g);   m <- beta2 m + (1 - beta2) g

    One state tensor per parameter, 'exp_avg' (the key lion-pytorch uses). torch has no Lion; the
    reference backend is its oracle.
    """

    _kind, _name, _has_step = "lion", "Lion", False
    _slots = ("exp_avg", None, None)

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False, foreach=None,
                 differentiable=False, backend=None, master_weights=False):
        _check(0.0 <= _float(lr), f"Invalid learning rate: {lr}")
        _check(0.0 <= betas[0] < 1.0, f"Invalid beta parameter at index 0: {betas[0]}")
        _check(0.0 <= betas[1] < 1.0, f"Invalid beta parameter at index 1: {betas[1]}")
        _check(0.0 <= weight_decay, f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, maximize=maximize, foreach=foreach,
                        differentiable=differentiable)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights)

    def _hyper(self, group):
        b1, b2 = group["betas"]
        return [_lr(group), b1, b2, 0.0, group["weight_decay"]], _maximize(group)
