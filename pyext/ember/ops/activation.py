"""The unary activations: the ``ember::unary_act`` op and its backward.

One op covers every activation of the table in ember/activations.py (``act`` names which), so the
schema and fake kernel (_schemas.py), the autograd (csrc/autograd.cpp) and the backend dispatch below are
written once, and every backend computes the table's formulas. Backward keeps only the input (as torch
does) and recomputes what it needs.
"""
from __future__ import annotations

import torch

from .. import _backend, activations
from ._common import check_float, plain_reference
from ._schemas import impl

ACTS = activations.UNARY
_OP = torch.ops.ember.unary_act.default

# The pure-PyTorch reference (the test oracle in float64, and the "reference" backend) is the table's:
# low-precision inputs compute in fp32 and round once, like torch's own kernels.
act_reference = activations.reference
act_backward_reference = activations.reference_backward


# ---------------------------------------------------------------------------------------------
# Backends. "cpu" and "cuda" are the same ember_C op; the dispatcher picks the device's kernel.
# ---------------------------------------------------------------------------------------------
def _forward(x: torch.Tensor, act: str, backend: str) -> torch.Tensor:
    backend = _backend.resolve(backend, x.device, "unary_act")
    if backend == "reference":
        return act_reference(x, act)
    if backend == "triton":
        from ember.kernels import activation as tk

        return tk.unary_act(x, act)
    return torch.ops.ember_C.unary_act(x, act)


def _backward(grad: torch.Tensor, x: torch.Tensor, act: str, backend: str) -> torch.Tensor:
    backend = _backend.resolve(backend, x.device, "unary_act_backward")
    if backend == "reference":
        return act_backward_reference(grad, x, act)
    if backend == "triton":
        from ember.kernels import activation as tk

        return tk.unary_act_backward(grad, x, act)
    return torch.ops.ember_C.unary_act_backward(grad, x, act)


impl("unary_act")(_forward)
impl("unary_act_backward")(_backward)


# ---------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------
def _apply(op: str, x: torch.Tensor, act: str, backend: str | None) -> torch.Tensor:
    check_float(op, "x", x)
    name = _backend.for_call(backend, x.device, "unary_act", label=f"ops.{op}")
    if plain_reference(name):
        return act_reference(x, act)
    return _OP(x, act, name)


def gelu(x: torch.Tensor, approximate: str = "none", *, backend: str | None = None) -> torch.Tensor:
    """GELU, exact (``approximate="none"``) or tanh-approximated, like ``torch.nn.functional.gelu``."""
    return _apply("gelu", x, activations.gelu_name("ember.ops.gelu", approximate), backend)


def silu(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """SiLU / swish: x * sigmoid(x)."""
    return _apply("silu", x, "silu", backend)


def relu(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """ReLU: max(x, 0), NaN propagating."""
    return _apply("relu", x, "relu", backend)


def relu2(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Squared ReLU: max(x, 0)^2 (Primer, Nemotron-H), as ``torch.relu(x) ** 2``, NaN propagating."""
    return _apply("relu2", x, "relu2", backend)

