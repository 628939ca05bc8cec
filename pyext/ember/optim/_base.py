"""What every ember optimizer shares: state creation in torch's layout, grouping of the parameters
into (device, dtype, master-weights) groups, and one ``ember::optim_step`` call per group.

A subclass names its kind and its state (``_slots``: torch's state key for s1, s2, s3 of
csrc/optim.h, None where unused) and turns a param group into (hyper, flags); everything else —
closures, AMP's grad_scale / found_inf, tensor lr, capturable step counts, master weights,
state_dict interchange with torch.optim — is handled here once.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch import _prims_common

from .. import _backend
from ..ops import optim as _op

_LOW_DTYPES = (torch.float16, torch.bfloat16)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_STRIDED = torch.strided


@torch.compiler.assume_constant_result
def _choose(requested, device: torch.device, op: str, label: str, dtype: torch.dtype, dense: bool) -> str:
    # The backend for one (device, dtype) group: what its kernels take is declared by each backend
    # (ember._backend.supports); "auto" takes the fastest that takes the group, an explicit request
    # that cannot raises. Inside a torch.compile'd step Dynamo cannot trace the availability probes
    # (imports, caches); the answer is a constant for the process, so the trace takes it as one.
    return _backend.choose(requested, device, op, label=label, dtype=dtype, dense=dense)


# torch 2.13 renamed is_non_overlapping_and_dense to ..._or_false.
_non_overlapping_and_dense = getattr(_prims_common, "is_non_overlapping_and_dense", None) or \
    _prims_common.is_non_overlapping_and_dense_or_false


def _dense(t: Tensor) -> bool:
    return t.is_contiguous() or _non_overlapping_and_dense(t)


def host_lr(group) -> float:
    """The lr for a group's hyper list. A tensor lr is never read on the host (that .item() would be a
    device sync every step, and is illegal under CUDA-graph capture): the kernels load it through its
    pointer, and _plan_group puts 0.0 in its hyper slot."""
    lr = group["lr"]
    return 0.0 if isinstance(lr, Tensor) else float(lr)


def _scalar_dtype():
    # torch.optim's _get_scalar_dtype(): step counts are float32 unless the default dtype is float64.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class MultiTensorOptimizer(torch.optim.Optimizer):
    _kind: str = ""
    _name: str = ""
    _kernel_op = "optim_step"  # the op whose backends' supports rules judge a group
    _has_step = True  # keeps torch's per-parameter 'step' state

    def __init__(self, params, defaults: dict, *, backend: str | None = None, master_weights: bool = False):
        if defaults.get("differentiable"):
            raise ValueError(f"ember.optim.{self._name}: differentiable=True is not supported")
        if defaults.get("foreach") and defaults.get("fused"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        lr = defaults["lr"]
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if backend is not None:
            _backend._check_name(backend)
        # Optimizer-wide, not param-group keys, so param_groups keep torch's exact layout.
        self.backend = backend
        self.master_weights = bool(master_weights)
        super().__init__(params, defaults)
        # GradScaler hands grad_scale / found_inf to step() instead of unscaling the grads itself.
        self._step_supports_amp_scaling = True

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            self._setdefault_group(group)

    def _setdefault_group(self, group):
        """Subclasses: torch's own __setstate__ defaults for older checkpoints."""
        group.setdefault("maximize", False)
        group.setdefault("foreach", None)
        group.setdefault("differentiable", False)

    # -- subclass interface ---------------------------------------------------------------------
    _slots: tuple = (None, None, None)

    def _active_slots(self, group) -> tuple:
        """The state keys this group uses for s1, s2, s3 (None where unused)."""
        return self._slots

    def _hyper(self, group) -> tuple[list, int]:
        raise NotImplementedError

    def _init_slot(self, group, key, p) -> Tensor:
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    # -- state -----------------------------------------------------------------------------------
    def _new_step(self, group, p) -> Tensor:
        if group.get("capturable") or group.get("fused"):
            return torch.zeros((), dtype=torch.float32, device=p.device)
        return torch.tensor(0.0, dtype=_scalar_dtype())

    def _state_for(self, group, p, slots, master: bool) -> dict:
        if not (self._has_step or master or any(slots)):
            return {}  # e.g. SGD without momentum: torch keeps no state entry at all
        state = self.state[p]
        if self._has_step and "step" not in state:
            state["step"] = self._new_step(group, p)
        like = p.detach().float() if master else p
        for key in slots:
            if key is not None and key not in state:
                state[key] = self._init_slot(group, key, like)
        if master:
            if "master_param" not in state:
                state["master_param"] = p.detach().float().clone(memory_format=torch.preserve_format)
            for key in slots:  # a torch checkpoint (or load_state_dict's cast) leaves them in p.dtype
                if key is not None and state[key].dtype != torch.float32:
                    state[key] = state[key].float()
        return state

    # -- step ------------------------------------------------------------------------------------
    def _check_grad(self, p: Tensor) -> Tensor:
        g = p.grad
        # The common case in one test: same floating dtype, dense, same strides (complex and sparse
        # gradients fail it and get their error below).
        if g.dtype is p.dtype and p.dtype in _FLOAT_DTYPES and g.layout is _STRIDED and g.stride() == p.stride():
            return g
        if g.is_sparse:
            raise RuntimeError(f"ember.optim.{self._name} does not support sparse gradients")
        if torch.is_complex(p) or torch.is_complex(g):
            raise RuntimeError(f"ember.optim.{self._name} does not support complex parameters or gradients")
        if not p.is_floating_point():
            raise RuntimeError(f"ember.optim.{self._name}: parameters must be floating point, got {p.dtype}")
        if g.dtype != p.dtype:
            g = g.to(p.dtype)
        if g.stride() != p.stride():  # the kernels walk parameter, gradient and state in one layout
            g = torch.empty_like(p).copy_(g)
        return g

    @staticmethod
    def _local(t: Tensor) -> Tensor:
        # FSDP2 / DTensor parameters: the update is elementwise, so each rank updates its own shard.
        # (Looked up on the class: hasattr on a plain tensor instance is a slow failed lookup.)
        return t.to_local() if hasattr(type(t), "to_local") else t

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # Every group is planned (gradients checked, backends chosen) before any parameter changes, so
        # a step that raises (a sparse gradient, an explicit backend that cannot take a group) leaves
        # every parameter and its state as it was.
        launches = [launch for group in self.param_groups for launch in self._plan_group(group, grad_scale, found_inf)]
        for launch in launches:
            launch()
        return loss

    def _plan_group(self, group, grad_scale, found_inf) -> list:
        """The group's kernel launches, as callables, each with its backend already chosen."""
        slots = self._active_slots(group)
        hyper, flags = self._hyper(group)
        lr = group["lr"]
        lr_t = lr if isinstance(lr, Tensor) else None
        if lr_t is not None:
            hyper[0] = 0.0
        keys = [k for k in slots if k is not None]
        local = self._local
        # bucket key -> (params, grads, {slot: states}, masters, steps, original params); the lists
        # are built in the one pass over the parameters (this loop is most of the step's Python time).
        buckets: dict = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            g = self._check_grad(p)
            master = self.master_weights and p.dtype in _LOW_DTYPES
            extra = self._bucket_key(group, self.state.get(p, {}), slots)
            state = self._state_for(group, p, slots, master)
            lp = local(p)
            kernel_ok = lp.dtype in _FLOAT_DTYPES and _dense(lp)
            key = (lp.device, lp.dtype, master, kernel_ok, extra)
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = ([], [], {k: [] for k in keys}, [], [], [])
            b[0].append(lp)
            b[1].append(local(g))
            for k in keys:
                b[2][k].append(local(state[k]))
            if master:
                b[3].append(local(state["master_param"]))
            if self._has_step:
                b[4].append(state["step"])
            b[5].append(p)
        launches = []
        for (device, dtype, master, kernel_ok, extra), (params, grads, states, masters, steps, ps) in buckets.items():
            backend = _choose(self.backend, device, self._kernel_op, f"optim.{self._name}", dtype, kernel_ok)
            lists = [states[k] if k is not None else [] for k in slots]
            gs = fi = None
            if grad_scale is not None:
                gs = grad_scale.to(device, non_blocking=True)
            if found_inf is not None:
                fi = found_inf.to(device=device, dtype=torch.float32, non_blocking=True)
            lt = lr_t
            if lt is not None and backend != "cpu":
                lt = lt.to(device=device, dtype=torch.float32, non_blocking=True)
            launches.append(functools.partial(self._launch_and_finish, group, extra, backend, ps, params, grads, lists,
                                              masters, steps, list(hyper), flags | self._bucket_flags(extra), lt, gs,
                                              fi))
        return launches

    def _launch_and_finish(self, group, extra, *launch_args):
        self._launch(*launch_args)
        self._after_group(group, launch_args[1], extra)

    def _launch(self, backend, ps, params, grads, lists, masters, steps, hyper, flags, lr, grad_scale, found_inf):
        """One bucket's kernel call(s); ``ps`` are the original parameters (state keys). AdamW8bit
        splits its buckets between two ops."""
        _op.step(self._kind, params, grads, *lists, masters, steps, hyper, flags, lr, grad_scale, found_inf,
                 backend)

    # Hooks for SGD's first momentum step (a buffer created from the gradient itself).
    def _bucket_key(self, group, state, slots):
        return None

    def _bucket_flags(self, extra) -> int:
        return 0

    def _after_group(self, group, params, extra):
        pass

    # -- checkpoints -----------------------------------------------------------------------------
    def load_state_dict(self, state_dict):
        # torch's loader casts every floating state tensor to its parameter's dtype; master weights
        # and their fp32 moments must stay fp32, so they are put back after it.
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        fp32 = {pid: {k: v for k, v in st.items() if isinstance(v, Tensor) and k != "step" and v.dtype == torch.float32}
                for pid, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if not self.master_weights or p not in self.state:
                continue
            for k, v in fp32.get(pid, {}).items():
                self.state[p][k] = v.to(device=p.device, copy=True)
