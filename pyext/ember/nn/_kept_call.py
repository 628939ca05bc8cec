"""Eager CPU inference calls that an ember.nn module keeps from one forward to the next.

A module's forward goes through the public op (argument checks, the backend choice), the ``ember::``
op (the dispatcher, the autograd kernel, the Python implementation behind it, which chooses the
backend again) and only then reaches its C++ CPU kernel. That path costs 5 us a call in a warm loop
and 15-20 us inside a model, whose calls run with cold caches: keeping the call made a swapped ViT's
64-token forward 1.039x faster (Xeon, 2 cores, fp32), and is within noise where the GEMMs are large.
Where nothing needs that path (eager CPU inference on the C++ kernel) the first call takes it and
leaves a kept call behind; later calls check only what could make it wrong (``takes``) and call the
kernel overload straight away. Anything else takes the whole path, which keeps a new call or none.

What a kept call checks, and why that is enough:
  - the input: a plain CPU tensor (no subclass, no tracing proxy, no fake tensor) of the kept dtype
    and width with at least one element, no graph being traced, no autograd needed for it;
  - the parameters: the same tensor objects at the same addresses and shapes. The kernel reads them
    live, so an in-place update is seen; ``.data =`` or a move changes the address or the shape, a
    replaced Parameter is another object;
  - the module's settings (its activation) and ``_backend.ambient()`` (the ``with ember.backend``
    stack, ``set_backend``, EMBER_BACKEND, TRITON_INTERPRET): the same backend choice.
The kernel still checks its operands itself, so a change none of this sees raises there, clearly.

A kept call is dropped, not copied, by ``copy.deepcopy`` and pickling (``torch.save`` of a whole
model): it holds references to the module's own tensors, and the copy keeps its own on its first call.
"""
from __future__ import annotations

import torch

from .. import _backend
from ..ops._common import as_rows

_is_compiling = torch.compiler.is_compiling


def plain_cpu_input(x, dtypes: tuple, in_features: int) -> bool:
    """``x`` is a CPU tensor the kernel takes as it is: torch.Tensor itself, of one of ``dtypes``, at
    least 1-D with ``in_features`` columns and not empty, with no graph being traced."""
    return (not _is_compiling() and type(x) is torch.Tensor and x.is_cpu and x.dtype in dtypes and x.ndim > 0
            and x.shape[-1] == in_features and x.numel() > 0)


def needs_autograd(x: torch.Tensor, params) -> bool:
    """Whether a call on ``x`` with ``params`` (tensors or None) must be recorded for backward."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params))


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the (rows, in_features) matrix the kernels take, without a view op where it is one."""
    return x if x.ndim == 2 and x.stride(1) == 1 else as_rows(x)


def shaped_as_rows_of(y: torch.Tensor, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """A kernel's (rows, out_features) output ``y`` in ``x``'s leading shape."""
    return y if x.ndim == 2 else y.view(*x.shape[:-1], out_features)


class KeptCall:
    """One kept call: the C++ kernel's arguments after the input and what they were taken from.

    ``checked`` are the module's parameters as the forward reads them (tensors or None), ``args`` what
    the kernel gets after the input (views of those parameters, the activation, flags), ``setting`` the
    module settings the call depends on. The kernel itself is passed to ``run`` (a module-level
    constant of the caller), so a kept call holds tensors and plain values only."""

    __slots__ = ("backend_state", "checked", "ptrs", "shapes", "args", "setting", "dtype", "in_features",
                 "out_features")

    def __init__(self, checked: tuple, args: tuple, setting, dtype: torch.dtype, in_features: int,
                 out_features: int) -> None:
        self.backend_state = _backend.ambient()
        self.checked = checked
        self.ptrs = tuple(0 if t is None else t.data_ptr() for t in checked)
        self.shapes = tuple(None if t is None else t.shape for t in checked)
        self.args, self.setting = args, setting
        self.dtype, self.in_features, self.out_features = (dtype,), in_features, out_features

    @staticmethod
    def of(module) -> "KeptCall | None":
        """``module``'s kept call; None while a graph is traced (which must not read the module's dict)."""
        return None if _is_compiling() else module.__dict__.get("_kept")

    @classmethod
    def keep(cls, module, op: str, x, checked: tuple, args: tuple, setting, in_features: int,
             out_features: int) -> None:
        """After a call through the whole path: keep it for ``module``'s next call, or keep none where the
        next call must take the whole path too (the op not on the C++ CPU kernel, autograd, an odd input).
        Not while a graph is traced: a graph records no side effects on its module."""
        if _is_compiling():
            return
        call = None
        if (plain_cpu_input(x, (x.dtype,), in_features) and not needs_autograd(x, checked)
                and _backend.for_call(None, x.device, op, dtype=x.dtype) == "cpu"):
            call = cls(checked, args, setting, x.dtype, in_features, out_features)
        module.__dict__["_kept"] = call

    def takes(self, x, checked: tuple, setting) -> bool:
        if not plain_cpu_input(x, self.dtype, self.in_features) or setting != self.setting:
            return False
        for now, kept, ptr, shape in zip(checked, self.checked, self.ptrs, self.shapes):
            if now is not kept or (now is not None and (now.data_ptr() != ptr or now.shape != shape)):
                return False
        return _backend.ambient() == self.backend_state and not needs_autograd(x, checked)

    def run(self, kernel, x: torch.Tensor) -> torch.Tensor:
        """``kernel(rows of x, *args)``; the float kernels return (out, pre-activation): out, shaped."""
        return shaped_as_rows_of(kernel(rows_of(x), *self.args)[0], x, self.out_features)

    def __reduce__(self):
        return (dropped, ())


def dropped() -> None:
    """What a kept call becomes when copied or unpickled: nothing (the copy keeps its own)."""
    return None
