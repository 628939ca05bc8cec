"""Drop-in activation modules. GELU/SiLU/ReLU subclass their torch.nn twins (same constructor, repr,
state and ``isinstance``) and run ember's op; ReLU2 is squared ReLU, which torch.nn lacks (transformers
calls it ``ReLUSquaredActivation``); SwiGLU/GeGLU are the fused gated forms."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops


class GELU(nn.GELU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu(x, self.approximate)


class SiLU(nn.SiLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:  # ember's kernels are out of place; keep torch's in-place semantics exactly
            return super().forward(x)
        return ops.silu(x)


class ReLU(nn.ReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(x)
        return ops.relu(x)


class ReLU2(nn.Module):
    """Squared ReLU, ``relu(x) ** 2`` (Primer, Nemotron-H)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.relu2(x)


def _split(op: str, gate: torch.Tensor, up: torch.Tensor | None):
    if up is not None:
        return gate, up
    if gate.dim() == 0 or gate.shape[-1] % 2:
        raise ValueError(
            f"ember.nn.{op}: a single input must hold gate and up in its last dimension (even size), "
            f"got shape {tuple(gate.shape)}"
        )
    return gate.chunk(2, dim=-1)  # two strided views: the kernels read them in place, no copy


class SwiGLU(nn.Module):
    """``silu(gate) * up``. Call with ``(gate, up)``, or one tensor ``[..., 2N]`` = [gate | up]."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        return ops.swiglu(*_split("SwiGLU", gate, up))


class GeGLU(nn.Module):
    """``gelu(gate, approximate) * up``. Call with ``(gate, up)``, or one tensor ``[..., 2N]``."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"ember.nn.GeGLU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"

    def forward(self, gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        return ops.geglu(*_split("GeGLU", gate, up), approximate=self.approximate)
