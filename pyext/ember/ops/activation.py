"""relu, silu, gelu (erf / tanh): the ``ember::unary_act`` op and its backward.

One custom op covers the four activations (``act`` names which), so the schema, fake kernel,
autograd and backend dispatch are written once; every backend computes the same formulas:

    relu       max(x, 0)                      (NaN passes through)
    silu       x * sigmoid(x)
    gelu       0.5 x (1 + erf(x / sqrt 2))
    gelu_tanh  0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))

Backward keeps only the input (as torch does) and recomputes what it needs from it.
"""
from __future__ import annotations

import math

import torch

from .. import _backend
from ._common import ARG_ERRORS, check_float, eager, eager_native

ACTS = ("relu", "silu", "gelu", "gelu_tanh")


# ---------------------------------------------------------------------------------------------
# Pure-PyTorch reference: the test oracle (run in float64) and the fallback on any device.
# Low-precision inputs compute in fp32 and round once, like torch's own kernels.
# ---------------------------------------------------------------------------------------------
def _opmath(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def act_reference(x: torch.Tensor, act: str) -> torch.Tensor:
    xf = _opmath(x)
    if act == "relu":
        y = torch.where(xf < 0, torch.zeros_like(xf), xf)
    elif act == "silu":
        y = xf * torch.sigmoid(xf)
    elif act == "gelu":
        y = 0.5 * xf * (1.0 + torch.erf(xf * (1.0 / math.sqrt(2.0))))
    elif act == "gelu_tanh":
        y = 0.5 * xf * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (xf + 0.044715 * xf**3)))
    else:
        raise ValueError(f"ember.ops: unknown activation {act!r}; expected one of {ACTS}")
    return y.to(x.dtype)


def act_backward_reference(grad: torch.Tensor, x: torch.Tensor, act: str) -> torch.Tensor:
    """grad * act'(x)."""
    g, xf = _opmath(grad), _opmath(x)
    if act == "relu":
        dx = torch.where(xf <= 0, torch.zeros_like(g), g)  # NaN passes grad, as torch
    elif act == "silu":
        s = torch.sigmoid(xf)
        dx = g * s * (1.0 + xf * (1.0 - s))
    elif act == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(xf * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * xf * xf) / math.sqrt(2.0 * math.pi)
        dx = g * (cdf + xf * pdf)
    elif act == "gelu_tanh":
        k = math.sqrt(2.0 / math.pi)
        t = torch.tanh(k * (xf + 0.044715 * xf**3))
        dx = g * (0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * xf * xf))
    else:
        raise ValueError(f"ember.ops: unknown activation {act!r}; expected one of {ACTS}")
    return dx.to(x.dtype)


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


@torch.library.custom_op("ember::unary_act", mutates_args=())
def unary_act(x: torch.Tensor, act: str, backend: str) -> torch.Tensor:
    return _forward(x, act, backend)


@unary_act.register_fake
def _(x, act, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("ember::unary_act_backward", mutates_args=())
def unary_act_backward(grad_out: torch.Tensor, x: torch.Tensor, act: str, backend: str) -> torch.Tensor:
    return _backward(grad_out, x, act, backend)


@unary_act_backward.register_fake
def _(grad_out, x, act, backend):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, act, backend = inputs
    ctx.save_for_backward(x)
    ctx.act, ctx.backend = act, backend


def _autograd_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return unary_act_backward(grad, x, ctx.act, ctx.backend), None, None


unary_act.register_autograd(_autograd_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------
def _apply(op: str, x: torch.Tensor, act: str, backend: str | None) -> torch.Tensor:
    if eager_native(backend, op, x):
        try:
            return eager().unary_act(x, act)
        except ARG_ERRORS:
            pass  # the checks below say what is wrong
    check_float(op, "x", x)
    return unary_act(x, act, _backend.request(backend, x.device, op))


def _gelu_act(op: str, approximate: str) -> str:
    if approximate == "none":
        return "gelu"
    if approximate == "tanh":
        return "gelu_tanh"
    raise ValueError(f"ember.ops.{op}: approximate must be 'none' or 'tanh', got {approximate!r}")


def gelu(x: torch.Tensor, approximate: str = "none", *, backend: str | None = None) -> torch.Tensor:
    """GELU, exact (``approximate="none"``) or tanh-approximated, like ``torch.nn.functional.gelu``."""
    return _apply("gelu", x, _gelu_act("gelu", approximate), backend)


def silu(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """SiLU / swish: x * sigmoid(x)."""
    return _apply("silu", x, "silu", backend)


def relu(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """ReLU: max(x, 0), NaN propagating."""
    return _apply("relu", x, "relu", backend)
