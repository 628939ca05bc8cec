"""linear and gated_linear: matmuls with fused epilogues, the ``ember::linear_act`` and
``ember::gated_linear`` ops, forward and backward.

    linear        out = act(x @ W^T + b) [+ residual]           act: none or any of ember.activations
    gated_linear  h = act(x @ Wg^T + bg) * (x @ Wu^T + bu)       act: silu (SwiGLU), gelu, gelu_tanh (GeGLU)

Why fused: torch eager runs ``addmm`` and then the activation as a second kernel, which reads and
writes the whole output again; the fused epilogue applies bias, activation and residual while the
GEMM's tile is still in registers (GPU) or in one cache-friendly pass (CPU).

Memory (what autograd keeps): x, W and the pre-activation ``x @ W^T + b``, exactly what eager keeps
(eager's activation saves its input, which is that pre-activation). Recomputing it instead would cost
a third GEMM in backward (+50% backward FLOPs), so it is kept; inference (no grad needed) keeps
nothing and the CPU epilogue then runs in place. With act="none" nothing but x and W is kept. The
gated op keeps x and the (rows, 2I) [gate | up] pre-activations; eager keeps those two plus
act(gate), so it holds a third less activation memory.

Backward: dpre = grad * act'(pre) in one pass that also accumulates the bias gradient (its column
sum), then dx = dpre @ W and dW = dpre^T @ x.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _backend, activations
from ._common import check_float, plain_reference
from ._schemas import impl
from .activation import act_backward_reference, act_reference

LINEAR_ACTS = activations.EPILOGUE
GATED_ACTS = activations.GATED


# ---------------------------------------------------------------------------------------------
# Pure-PyTorch reference (the test oracle in float64, and the fallback on any device). Low-precision
# tensors: the GEMM rounds to the dtype (as torch's addmm), the epilogue computes in fp32 and rounds once.
# ---------------------------------------------------------------------------------------------
def _wide(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def linear_reference(x2, weight, bias, residual2, act: str):
    pre = F.linear(x2, weight, bias)
    if act == "none" and residual2 is None:
        return pre, pre
    out = _wide(pre) if act == "none" else act_reference(_wide(pre), act)
    if residual2 is not None:
        out = out + _wide(residual2)
    return out.to(x2.dtype), pre


def linear_backward_reference(grad2, x2, weight, pre, act: str):
    dpre = grad2 if act == "none" else act_backward_reference(grad2, pre, act)
    db = _wide(dpre).sum(0).to(dpre.dtype)
    return dpre @ weight, dpre.t() @ x2, db


def gated_linear_reference(x2, w_gate, w_up, b_gate, b_up, act: str):
    pre = torch.cat([F.linear(x2, w_gate, b_gate), F.linear(x2, w_up, b_up)], dim=-1)
    gate, up = pre.chunk(2, dim=-1)
    h = act_reference(_wide(gate), act) * _wide(up)
    return h.to(x2.dtype), pre


def gated_linear_backward_reference(grad2, x2, w_gate, w_up, pre, act: str):
    gate, up = (_wide(t) for t in pre.chunk(2, dim=1))
    g = _wide(grad2)
    dgate = act_backward_reference(g * up, gate, act).to(x2.dtype)
    dup = (g * act_reference(gate, act)).to(x2.dtype)
    dx = dgate @ w_gate + dup @ w_up
    return dx, dgate.t() @ x2, dup.t() @ x2, _wide(dgate).sum(0).to(x2.dtype), _wide(dup).sum(0).to(x2.dtype)


# ---------------------------------------------------------------------------------------------
# Layout helpers. The kernels take 2-D (rows, features) operands; a custom op must not return views
# of its inputs or of each other, and _unsafe_view reshapes without creating one.
# ---------------------------------------------------------------------------------------------
def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(_nrows(t), t.shape[-1])  # not (-1, K): ambiguous when K == 0 (found by test_fuzz)
    return t2 if t2.shape[1] <= 1 or t2.stride(1) == 1 else t2.contiguous()


def _shaped(t: torch.Tensor, shape) -> torch.Tensor:
    return torch.ops.aten._unsafe_view.default(t, tuple(shape))


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def _nrows(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])


# ---------------------------------------------------------------------------------------------
# ember::linear_act (schema in _schemas.py; its autograd is csrc/autograd.cpp's)
# ---------------------------------------------------------------------------------------------
linear_act = torch.ops.ember.linear_act.default
gated_linear_op = torch.ops.ember.gated_linear.default


def _linear_fwd(x, weight, bias, residual, act, save_preact, backend):
    backend = _backend.choose(backend, x.device, "linear", dtype=x.dtype)
    x2 = _rows(x)
    r2 = None if residual is None else _rows(residual)
    if backend == "reference":
        out, pre = linear_reference(x2, weight, bias, r2, act)
        if out is pre:
            out = out.clone()
    elif backend == "triton":
        from ember.kernels import linear as tk

        out, pre = tk.linear_act(x2, weight, bias, r2, act, save_preact)
    else:
        out, pre = torch.ops.ember_C.linear_act(x2, weight, bias, r2, act, save_preact)
    keep = save_preact and act != "none"
    return out, (pre if keep else _empty(x))


@impl("linear_act")
def _(x, weight, bias, residual, act, save_preact, backend):
    out, pre = _linear_fwd(x, weight, bias, residual, act, save_preact, backend)
    if pre.numel() and pre.data_ptr() == out.data_ptr():
        pre = pre.clone()
    return _shaped(out, (*x.shape[:-1], weight.shape[0])), pre


@impl("linear_act_backward")
def _(grad_out, x, weight, bias, preact, act, need_dx, need_dw, need_db, backend):
    backend = _backend.choose(backend, x.device, "linear", dtype=x.dtype)
    x2, g2 = _rows(x), _rows(grad_out)
    if act != "none" and preact.numel() == 0 and g2.numel():
        # Forward ran without keeping the pre-activation (grad mode off): recompute it.
        preact = F.linear(x2, weight, bias)
    if backend == "reference":
        dx, dw, db = linear_backward_reference(g2, x2, weight, preact, act)
    elif backend == "triton":
        from ember.kernels import linear as tk

        dx, dw, db = tk.linear_act_backward(g2, x2, weight, preact, act, need_dx, need_dw, need_db)
    else:
        dx, dw, db = torch.ops.ember_C.linear_act_backward(g2, x2, weight, preact, act, need_dx, need_dw, need_db)
    dx = _shaped(dx, x.shape) if need_dx else _empty(x)
    dw = dw if need_dw else _empty(x)
    db = db if need_db else _empty(x)
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# ember::gated_linear (schema in _schemas.py; its autograd is csrc/autograd.cpp's)
# ---------------------------------------------------------------------------------------------
@impl("gated_linear")
def _(x, w_gate, w_up, b_gate, b_up, act, save_preact, backend):
    backend = _backend.choose(backend, x.device, "gated_linear", dtype=x.dtype)
    x2 = _rows(x)
    if backend == "reference":
        h, pre = gated_linear_reference(x2, w_gate, w_up, b_gate, b_up, act)
    elif backend == "triton":
        from ember.kernels import linear as tk

        h, pre = tk.gated_linear(x2, w_gate, w_up, b_gate, b_up, act, save_preact)
    else:
        h, pre = torch.ops.ember_C.gated_linear(x2, w_gate, w_up, b_gate, b_up, act, save_preact)
    return _shaped(h, (*x.shape[:-1], w_gate.shape[0])), (pre if save_preact else _empty(x))


@impl("gated_linear_backward")
def _(grad_out, x, w_gate, w_up, b_gate, b_up, preact, act, need_dx, need_dw, need_db, backend):
    backend = _backend.choose(backend, x.device, "gated_linear", dtype=x.dtype)
    x2, g2 = _rows(x), _rows(grad_out)
    if preact.numel() == 0 and g2.numel():
        preact = torch.cat([F.linear(x2, w_gate, b_gate), F.linear(x2, w_up, b_up)], dim=1)
    if backend == "reference":
        res = gated_linear_backward_reference(g2, x2, w_gate, w_up, preact, act)
    elif backend == "triton":
        from ember.kernels import linear as tk

        res = tk.gated_linear_backward(g2, x2, w_gate, w_up, preact, act, need_dx, need_dw, need_db)
    else:
        res = torch.ops.ember_C.gated_linear_backward(g2, x2, w_gate, w_up, preact, act, need_dx, need_dw, need_db)
    dx, dwg, dwu, dbg, dbu = res
    e = _empty(x)
    return (
        _shaped(dx, x.shape) if need_dx else e,
        dwg if need_dw else e.clone(),
        dwu if need_dw else e.clone(),
        dbg if need_db else e.clone(),
        dbu if need_db else e.clone(),
    )


# ---------------------------------------------------------------------------------------------
# Public functions: argument checks, then the op.
# ---------------------------------------------------------------------------------------------
def _check_weight(op: str, x: torch.Tensor, name: str, w: torch.Tensor, b: Optional[torch.Tensor], bname: str):
    check_float(op, name, w)
    if w.dim() != 2:
        raise ValueError(f"ember.ops.{op}: {name} must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"ember.ops.{op}: x has {x.shape[-1]} features (shape {tuple(x.shape)}) but {name} expects "
            f"in_features={w.shape[1]} (shape {tuple(w.shape)})"
        )
    for t, n, shape in ((w, name, None), (b, bname, (w.shape[0],))):
        if t is None:
            continue
        check_float(op, n, t)
        if t.dtype != x.dtype:
            raise TypeError(f"ember.ops.{op}: {n} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"ember.ops.{op}: {n} must be on x's device {x.device}, got {t.device}")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"ember.ops.{op}: {n} must have shape {shape}, got {tuple(t.shape)}")


def _check_x(op: str, x: torch.Tensor) -> None:
    check_float(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"ember.ops.{op}: x must have at least 1 dimension (..., in_features), got a scalar")


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``act(x @ weight^T + bias) + residual`` as one op, ``weight`` laid out as ``nn.Linear.weight``.

    activation: None / "none", "relu", "silu", "gelu" (erf), "gelu_tanh" or "relu2"; residual (optional) has
    the output's shape and is added after the activation. fp32 GEMMs follow
    ``torch.backends.cuda.matmul.allow_tf32`` on GPU.
    """
    act = activations.check("ember.ops.linear", activation, LINEAR_ACTS)
    _check_x("linear", x)
    _check_weight("linear", x, "weight", weight, bias, "bias")
    if residual is not None:
        check_float("linear", "residual", residual)
        want = (*x.shape[:-1], weight.shape[0])
        if tuple(residual.shape) != want or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(
                f"ember.ops.linear: residual must have the output's shape {want}, dtype {x.dtype} and device "
                f"{x.device}, got {tuple(residual.shape)}, {residual.dtype}, {residual.device}"
            )
    name = _backend.for_call(backend, x.device, "linear", dtype=x.dtype)
    if plain_reference(name):
        return linear_reference(x, weight, bias, residual, act)[0]
    return linear_act(x, weight, bias, residual, act, False, name)[0]


def gated_linear(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    b_gate: Optional[torch.Tensor] = None,
    b_up: Optional[torch.Tensor] = None,
    *,
    activation: str = "silu",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``act(x @ w_gate^T + b_gate) * (x @ w_up^T + b_up)``: both projections in one GEMM pass with the
    gating in its epilogue (SwiGLU for "silu", GeGLU for "gelu" / "gelu_tanh")."""
    act = activations.check("ember.ops.gated_linear", activation, GATED_ACTS)
    _check_x("gated_linear", x)
    _check_weight("gated_linear", x, "w_gate", w_gate, b_gate, "b_gate")
    _check_weight("gated_linear", x, "w_up", w_up, b_up, "b_up")
    if w_gate.shape != w_up.shape:
        raise ValueError(
            f"ember.ops.gated_linear: w_gate and w_up must have the same shape, got {tuple(w_gate.shape)} and "
            f"{tuple(w_up.shape)}"
        )
    if (b_gate is None) != (b_up is None):
        raise ValueError("ember.ops.gated_linear: give both b_gate and b_up or neither")
    name = _backend.for_call(backend, x.device, "gated_linear", dtype=x.dtype)
    if plain_reference(name):
        return gated_linear_reference(x, w_gate, w_up, b_gate, b_up, act)[0]
    return gated_linear_op(x, w_gate, w_up, b_gate, b_up, act, False, name)[0]
