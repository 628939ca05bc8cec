"""The one table of ember's activations: names, ids, reference math and derivatives.

Every family that takes an activation (the unary ops, the linear epilogue, the gated forms, the int8
epilogue) and every backend reads it from here. The ids are those of ``ember::Act`` in
csrc/activation.h (``tests/test_activation_table.py`` checks that ember._C agrees), which the C++, CUDA
and Triton kernels switch on.

The reference math is the test oracle (run in float64) and the "reference" backend. It takes tensors
already in the compute dtype (fp32 for low-precision inputs, as torch's own kernels compute) and
returns the same dtype; callers round once.

    none       x
    relu       max(x, 0)                      NaN passes through, as torch.relu
    silu       x * sigmoid(x)
    gelu       0.5 x (1 + erf(x / sqrt 2))
    gelu_tanh  0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    relu2      max(x, 0)^2                    squared ReLU (Primer, Nemotron-H); NaN passes through

Adding one: a row here, a member of ``ember::Act`` with the same id and name, and its
``act_forward`` / ``act_backward`` branch in the three kernel headers (csrc/cpu/vec_activation.h,
csrc/cuda/common.cuh, kernels/activation.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Tensor = torch.Tensor

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_COEFF = 0.044715


@dataclass(frozen=True)
class Activation:
    name: str
    id: int  # ember::Act
    forward: Callable[[Tensor], Tensor]  # act(x)
    backward: Callable[[Tensor, Tensor], Tensor]  # (grad, x) -> grad * act'(x)
    gated: bool  # offered as the gate of the gated forms (act(gate) * up)
    formula: str


def _relu(x):
    # x <= 0, not x < 0: without ember._C torch's autograd differentiates this formula (ops/_common.py,
    # plain_reference), and at 0 the zero branch gives derivative 0, as torch.relu's and _relu_backward's.
    return torch.where(x <= 0, torch.zeros_like(x), x)


def _relu_backward(g, x):
    # Selects rather than multiplies, like torch's threshold_backward: an inf/NaN grad where x <= 0
    # still gives 0, and NaN x passes its grad.
    return torch.where(x <= 0, torch.zeros_like(g), g)


def _silu(x):
    return x * torch.sigmoid(x)


def _silu_backward(g, x):
    s = torch.sigmoid(x)
    return g * s * (1.0 + x * (1.0 - s))


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x * _SQRT1_2))


def _gelu_backward(g, x):
    cdf = 0.5 * (1.0 + torch.erf(x * _SQRT1_2))
    pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return g * (cdf + x * pdf)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + _TANH_COEFF * x**3)))


def _gelu_tanh_backward(g, x):
    t = torch.tanh(_SQRT_2_OVER_PI * (x + _TANH_COEFF * x**3))
    return g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * _TANH_COEFF * x * x))


def _relu2(x):
    r = _relu(x)
    return r * r


def _relu2_backward(g, x):
    # d/dx relu(x)^2 = 2 relu(x), selected like ReLU's so that x <= 0 gives exactly 0.
    return torch.where(x <= 0, torch.zeros_like(g), 2.0 * x * g)


NONE = Activation("none", -1, lambda x: x, lambda g, x: g, gated=False, formula="x")

TABLE: dict[str, Activation] = {
    a.name: a
    for a in (
        NONE,
        Activation("relu", 0, _relu, _relu_backward, gated=False, formula="max(x, 0)"),
        Activation("silu", 1, _silu, _silu_backward, gated=True, formula="x * sigmoid(x)"),
        Activation("gelu", 2, _gelu, _gelu_backward, gated=True, formula="0.5 x (1 + erf(x / sqrt 2))"),
        Activation("gelu_tanh", 3, _gelu_tanh, _gelu_tanh_backward, gated=True,
                   formula="0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))"),
        Activation("relu2", 4, _relu2, _relu2_backward, gated=False, formula="max(x, 0)^2"),
    )
}

ID: dict[str, int] = {a.name: a.id for a in TABLE.values()}
UNARY: tuple[str, ...] = tuple(n for n in TABLE if n != "none")  # the unary op and the int8/linear epilogues
EPILOGUE: tuple[str, ...] = tuple(TABLE)  # what linear / int8_linear accept ("none" included)
GATED: tuple[str, ...] = tuple(n for n, a in TABLE.items() if a.gated)


def check(op: str, activation, allowed: tuple[str, ...] = EPILOGUE) -> str:
    """``activation`` as a table name (None means "none"), or a ValueError naming ``op`` and the choices."""
    name = "none" if activation is None else activation
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"{op}: activation must be one of {allowed}, got {activation!r}")
    return name


def gelu_name(op: str, approximate: str) -> str:
    """torch's ``approximate=`` spelling ("none" / "tanh") as a table name, where torch's API has it."""
    if approximate == "none":
        return "gelu"
    if approximate == "tanh":
        return "gelu_tanh"
    raise ValueError(f"{op}: approximate must be 'none' or 'tanh', got {approximate!r}")


def _opmath(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def reference(x: Tensor, name: str) -> Tensor:
    """act(x) in x's dtype, computed in fp32 (fp64 for fp64) and rounded once."""
    return TABLE[name].forward(_opmath(x)).to(x.dtype)


def reference_backward(grad: Tensor, x: Tensor, name: str) -> Tensor:
    """grad * act'(x) in x's dtype, computed in fp32 (fp64 for fp64) and rounded once."""
    return TABLE[name].backward(_opmath(grad), _opmath(x)).to(x.dtype)
