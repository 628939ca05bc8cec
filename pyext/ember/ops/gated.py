"""swiglu and geglu: the ``ember::gated_act`` op, ``act(gate) * up`` in one pass, and its backward.

Torch eager computes ``F.silu(gate) * up`` as two kernels with an intermediate tensor; the fused op
reads gate and up once and writes the product once. Backward keeps only gate and up (what the
product's backward needs anyway) and recomputes act(gate), so it holds less than eager, which also
keeps act(gate).
"""
from __future__ import annotations

import torch

from .. import _backend, activations
from ._common import as_rows, check_float, check_same, plain_reference
from ._schemas import impl
from .activation import act_backward_reference, act_reference


_OP = torch.ops.ember.gated_act.default


def gated_reference(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    y = act_reference(gate.float() if gate.dtype != torch.float64 else gate, act)
    return (y * (up.float() if up.dtype != torch.float64 else up)).to(gate.dtype)


def gated_backward_reference(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str):
    wide = torch.float64 if gate.dtype == torch.float64 else torch.float32
    g, gt, u = grad.to(wide), gate.to(wide), up.to(wide)
    dgate = act_backward_reference(g * u, gt, act)
    dup = g * act_reference(gt, act)
    return dgate.to(gate.dtype), dup.to(gate.dtype)


def _reshaped(t: torch.Tensor, shape) -> torch.Tensor:
    # The kernels return (rows, cols); a custom op must not return a view (autograd would then
    # refuse in-place ops on the result), and _unsafe_view reshapes without creating one.
    return torch.ops.aten._unsafe_view.default(t, shape)


def _forward(gate, up, act, backend):
    backend = _backend.resolve(backend, gate.device, "gated_act")
    if backend == "reference":
        return gated_reference(gate, up, act)
    g2, u2 = as_rows(gate), as_rows(up)
    if backend == "triton":
        from ember.kernels import gated as tk

        return tk.gated_act(g2, u2, act)
    return torch.ops.ember_C.gated_act(g2, u2, act)


def _backward(grad, gate, up, act, backend):
    backend = _backend.resolve(backend, gate.device, "gated_act_backward")
    if backend == "reference":
        return gated_backward_reference(grad, gate, up, act)
    g2, u2, d2 = as_rows(gate), as_rows(up), grad.reshape(as_rows(gate).shape)
    if backend == "triton":
        from ember.kernels import gated as tk

        return tk.gated_act_backward(d2, g2, u2, act)
    return torch.ops.ember_C.gated_act_backward(d2, g2, u2, act)


@impl("gated_act")
def _(gate, up, act, backend):
    return _reshaped(_forward(gate, up, act, backend), gate.shape)


@impl("gated_act_backward")
def _(grad_out, gate, up, act, backend):
    dgate, dup = _backward(grad_out, gate, up, act, backend)
    return _reshaped(dgate, gate.shape), _reshaped(dup, gate.shape)


def _apply(op: str, gate: torch.Tensor, up: torch.Tensor, act: str, backend: str | None) -> torch.Tensor:
    check_float(op, "gate", gate)
    check_float(op, "up", up)
    check_same(op, ("gate", "up"), gate, up)
    name = _backend.for_call(backend, gate.device, "gated_act", label=f"ops.{op}")
    if plain_reference(name):
        return gated_reference(gate, up, act)
    return _OP(gate, up, act, name)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """SwiGLU: ``silu(gate) * up`` in one fused pass."""
    return _apply("swiglu", gate, up, "silu", backend)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none", *, backend: str | None = None) -> torch.Tensor:
    """GeGLU: ``gelu(gate, approximate) * up`` in one fused pass."""
    return _apply("geglu", gate, up, activations.gelu_name("ember.ops.geglu", approximate), backend)
