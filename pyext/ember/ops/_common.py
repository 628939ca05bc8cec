"""Argument checks and layout helpers shared by every ember op."""
from __future__ import annotations

import math

import torch

from .. import _backend

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"ember.ops.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"ember.ops.{op}: {name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"ember.ops.{op}: {name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {t.dtype}"
        )


def check_same(op: str, names: tuple[str, str], a: torch.Tensor, b: torch.Tensor) -> None:
    """Two operands of one elementwise op: same device, dtype and shape (no silent broadcasting)."""
    n1, n2 = names
    if a.device != b.device:
        raise ValueError(f"ember.ops.{op}: {n1} and {n2} must be on the same device, got {a.device} and {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"ember.ops.{op}: {n1} and {n2} must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.shape != b.shape:
        raise ValueError(
            f"ember.ops.{op}: {n1} and {n2} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D (rows, last-dim) view of ``t`` whose rows may be strided but whose last dim is contiguous.

    The halves of a ``[..., 2N]`` tensor (``x.chunk(2, -1)``) qualify, so the gated kernels read them
    in place; any layout that needs more than one row stride is copied once.
    """
    if t.dim() == 2 and (t.shape[1] <= 1 or t.stride(1) == 1):
        return t  # already (rows, cols) with contiguous rows: the common case, without a view op
    cols = t.shape[-1] if t.dim() else 1
    rows = math.prod(t.shape[:-1]) if t.dim() else 1
    try:
        view = t.view(rows, cols)
    except RuntimeError:  # leading dims do not collapse into one row stride
        return t.contiguous().view(rows, cols)
    if cols > 1 and view.stride(1) != 1:
        return t.contiguous().view(rows, cols)
    return view


# ---------------------------------------------------------------------------------------------
# The eager fast path. Each ember op is a torch.library custom op (what torch.compile, torch.export,
# opcheck and dispatch modes see), but on CPU one trip through it costs ~15-30 us of Python and
# dispatcher work per call, and its registered autograd as much again, which at M = 1 is as much
# as the GEMM itself. Plain eager calls that resolve to ember's compiled kernels therefore make one
# call into ember._C (csrc/eager.cpp), which checks, reshapes, runs the kernels and, when a gradient
# is wanted, records a C++ autograd node. Everything else keeps the custom op: tracing/compiling, a
# dispatch mode (FakeTensorMode, FlopCounterMode, export's make_fx), functorch transforms (vmap/grad,
# whose wrapped tensors look plain) and tensor subclasses.
# ---------------------------------------------------------------------------------------------
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_is_compiling = torch.compiler.is_compiling
_dispatch_depth = torch._C._len_torch_dispatch_stack
_functorch_top = torch._C._functorch.peek_interpreter_stack

# What ember._C's eager entry points raise for bad arguments. The caller then runs its Python checks,
# which name the argument in ember.ops' words (and re-raise through the custom op if those pass).
ARG_ERRORS = (RuntimeError, TypeError, ValueError, IndexError)


def eager_native(backend, op: str, x, *rest) -> bool:
    """True when this call may skip the custom op and call ``eager()``'s entry point directly."""
    if type(x) not in _PLAIN or _is_compiling() or _dispatch_depth() or _functorch_top() is not None:
        return False
    for t in rest:
        if t is not None and type(t) not in _PLAIN:
            return False
    return _backend.native(backend, x.device, op)


def eager():
    """ember._C, whose ``linear``, ``gated_linear``, ``unary_act`` and ``gated_act`` are the fast path."""
    return _backend.extension()


def wants_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)
