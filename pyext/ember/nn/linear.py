"""ember.nn.Linear: ``nn.Linear`` with a fused activation, and the fused transformers blocks built on it.

``Linear(in_features, out_features, bias=True, activation=None)`` is an ``nn.Linear`` subclass (same
parameters, same state_dict keys, ``isinstance(m, nn.Linear)`` holds) whose forward is one
``ember.ops.linear`` call: GEMM + bias + activation in one op, forward and backward.

``FusedIntermediate`` (a BertIntermediate) and ``FusedConv1DMLP`` (a GPT2MLP) are what ``ember.swap``
puts in place of those blocks; the rules that recognise them live in ``ember/swap/linear.py``.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import activations, ops
from ._kept_call import KeptCall

ACTIVATIONS = (None,) + activations.UNARY


class Linear(nn.Linear):
    """``activation(x @ weight^T + bias)`` with the activation fused into the matmul's epilogue.

    activation: None, "relu", "silu", "gelu" (erf) or "gelu_tanh". Parameters and state_dict are
    exactly ``nn.Linear``'s.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = _check_activation(activation)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: str | None = None) -> "Linear":
        """An ember Linear sharing ``linear``'s weight and bias Parameters (no copies)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"ember.nn.Linear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.register_parameter("bias", linear.bias)  # a Parameter or None; registered either way, as nn.Linear does
        new.activation = _check_activation(activation)
        new.train(linear.training)
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Eager CPU inference takes the call kept from the last forward where nothing it depends on
        # changed (nn/_kept_call.py): the C++ kernel without the 15-20 us of Python and dispatch in front.
        p = self._parameters
        w, b = p["weight"], p.get("bias")
        kept = KeptCall.of(self)
        if kept is not None and kept.takes(x, (w, b), self.activation):
            return kept.run(torch.ops.ember_C.linear_act.default, x)
        out = ops.linear(x, w, b, activation=self.activation)
        KeptCall.keep(self, "linear", x, (w, b), (w, b, None, self.activation or "none", False),
                      self.activation, w.shape[1], w.shape[0])
        return out


def _check_activation(activation):
    if activation == "none":
        activation = None
    if activation not in ACTIVATIONS:
        raise ValueError(f"ember.nn.Linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


# ---------------------------------------------------------------------------------------------
# transformers blocks with the first Linear and the activation fused (built by ember.swap).
# ---------------------------------------------------------------------------------------------
class FusedIntermediate(nn.Module):
    """A BertIntermediate with ``dense`` and the activation fused (state_dict: dense.weight/bias)."""

    def __init__(self, dense: Linear) -> None:
        super().__init__()
        self.dense = dense

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense(hidden_states)


class FusedConv1DMLP(nn.Module):
    """GPT2MLP: ``dropout(c_proj(act(c_fc(x))))`` with c_fc and act fused; same children and state_dict
    (Conv1D keeps its weight as (in, out): the op reads ``c_fc.weight.t()``, a view, no copy)."""

    def __init__(self, mlp: nn.Module, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.c_fc, self.c_proj, self.dropout = mlp.c_fc, mlp.c_proj, mlp.dropout

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        p = self.c_fc._parameters  # a transformers Conv1D: weight (in, out), bias (out,)
        w, b = p["weight"], p.get("bias")
        kept = KeptCall.of(self)
        if kept is not None and kept.takes(hidden_states, (w, b), self.activation):
            h = kept.run(torch.ops.ember_C.linear_act.default, hidden_states)
        else:
            wt = w.t()
            h = ops.linear(hidden_states, wt, b, activation=self.activation)
            KeptCall.keep(self, "linear", hidden_states, (w, b),
                          (wt, b, None, self.activation or "none", False), self.activation,
                          wt.shape[1], wt.shape[0])
        return self.dropout(self.c_proj(h))
