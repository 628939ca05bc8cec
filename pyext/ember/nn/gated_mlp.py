"""GatedMLP: ``down_proj(act(gate_proj(x)) * up_proj(x))`` with the activation and product fused.

The Llama / Mistral / Qwen / Gemma feed-forward block. Eager transformers runs it as three matmuls
plus two elementwise kernels (act, then multiply) with an intermediate tensor between them; here
gate_proj and up_proj run as one ``ember.ops.gated_linear`` op (one GEMM pass over x with two weight
pointers, the gating in its epilogue; no concatenated weight is built or cached, so optimizer updates
to either projection are seen at once), then down_proj. Projections that are not plain nn.Linear
(quantized, LoRA-wrapped, hooked) fall back to two calls and the fused ``swiglu`` / ``geglu``.

Attribute names match transformers' (gate_proj, up_proj, down_proj), so a GatedMLP made by
``from_module`` (or by ``ember.swap``) holds the original Linear objects and the model's state_dict is
unchanged. The swap rule that recognises these blocks lives in ``ember/swap/gated.py``.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import activations, ops
from ._kept_call import KeptCall

ACTIVATIONS = activations.GATED
_PROJS = ("gate_proj", "up_proj", "down_proj")


class GatedMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``, act one of "silu" (SwiGLU), "gelu", "gelu_tanh"."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        bias: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.activation = _check_activation(activation)
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    @classmethod
    def from_module(cls, mlp: nn.Module, activation: str | None = None) -> "GatedMLP":
        """A GatedMLP sharing ``mlp``'s gate_proj, up_proj and down_proj objects (no copies).

        The activation is read from ``mlp.act_fn`` (torch or transformers GELU/SiLU classes) unless
        given. The caller vouches that ``mlp`` computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``;
        ``ember.swap`` checks that from the class's source before it calls this.
        """
        for attr in _PROJS:
            if not isinstance(getattr(mlp, attr, None), nn.Module):
                raise ValueError(
                    f"ember.nn.GatedMLP.from_module: mlp must have a module attribute {attr!r}, "
                    f"{type(mlp).__name__} has none"
                )
        if activation is None:
            # Knowing which torch / transformers activation classes compute what is the swap
            # package's job; imported on this call only, so importing ember.nn never imports it.
            from ..swap.activations import activation_kind

            kind = activation_kind(getattr(mlp, "act_fn", None))
            if kind not in ACTIVATIONS:
                raise ValueError(
                    f"ember.nn.GatedMLP.from_module: mlp.act_fn must compute one of {ACTIVATIONS}, got "
                    f"{type(getattr(mlp, 'act_fn', None)).__name__}; pass activation= to override"
                )
            activation = kind
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.activation = _check_activation(activation)
        for attr in _PROJS:
            setattr(new, attr, getattr(mlp, attr))
        new.train(mlp.training)
        return new

    @property
    def hidden_size(self) -> int | None:
        return getattr(self.gate_proj, "in_features", None)

    @property
    def intermediate_size(self) -> int | None:
        return getattr(self.gate_proj, "out_features", None)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    def _fusable(self) -> bool:
        # The single-pass op reads the two projections' parameters directly, so it stands in for
        # them only when they are plain nn.Linear modules (not quantized or LoRA-wrapped
        # replacements) that nothing hooks into.
        m = self._modules
        g, u = m["gate_proj"], m["up_proj"]
        return (_plain_linear(g) and _plain_linear(u)
                and (g._parameters.get("bias") is None) == (u._parameters.get("bias") is None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fusable():
            # gate and up projections in one GEMM pass, act(gate) * up in its epilogue; in eager CPU
            # inference through the call kept from the last forward (nn/_kept_call.py)
            m = self._modules
            gp, up = m["gate_proj"]._parameters, m["up_proj"]._parameters
            params = (gp["weight"], up["weight"], gp.get("bias"), up.get("bias"))
            kept = KeptCall.of(self)
            if kept is not None and kept.takes(x, params, self.activation):
                h = kept.run(torch.ops.ember_C.gated_linear.default, x)
            else:
                h = ops.gated_linear(x, *params, activation=self.activation)
                w = params[0]
                KeptCall.keep(self, "gated_linear", x, params, (*params, self.activation, False),
                              self.activation, w.shape[1], w.shape[0])
            return self.down_proj(h)
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.activation == "silu":
            h = ops.swiglu(gate, up)
        else:
            h = ops.geglu(gate, up, approximate="none" if self.activation == "gelu" else "tanh")
        return self.down_proj(h)


def _plain_linear(p: nn.Module) -> bool:
    """A plain nn.Linear that nothing hooks into and whose forward nobody replaced."""
    return (type(p) is nn.Linear and "forward" not in p.__dict__
            and not (p._forward_hooks or p._forward_pre_hooks or p._backward_hooks or p._backward_pre_hooks))


def _check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"ember.nn.GatedMLP: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


class PackedGatedMLP(nn.Module):
    """``down_proj(act(gate) * up)`` with ``[gate | up] = gate_up_proj(x)``: Phi-3's MLP, whose one
    Linear holds the gate projection's rows and then the up projection's. It runs as one
    ``ember.ops.gated_linear`` over the two halves of that weight, read as views (no copy), so the
    (tokens, 2 x intermediate) product and the activation's output are never stored apart."""

    def __init__(self, gate_up_proj: nn.Linear, down_proj: nn.Module, activation: str = "silu") -> None:
        super().__init__()
        if not isinstance(gate_up_proj, nn.Linear) or gate_up_proj.out_features % 2:
            raise ValueError("ember.nn.PackedGatedMLP: gate_up_proj must be an nn.Linear with an even out_features")
        self.activation = _check_activation(activation)
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self._modules["gate_up_proj"]._parameters
        w, b = p["weight"], p.get("bias")
        kept = KeptCall.of(self)
        if kept is not None and kept.takes(x, (w, b), self.activation):
            h = kept.run(torch.ops.ember_C.gated_linear.default, x)
        else:
            i = w.shape[0] // 2
            halves = (w[:i], w[i:], None if b is None else b[:i], None if b is None else b[i:])
            h = ops.gated_linear(x, *halves, activation=self.activation)
            # the kept call holds the halves (views); w and b, checked, say whether they still are w's
            KeptCall.keep(self, "gated_linear", x, (w, b), (*halves, self.activation, False),
                          self.activation, w.shape[1], i)
        return self.down_proj(h)


class GatedExperts(nn.Module):
    """The experts of a mixture-of-experts layer, each a gated MLP ``down(act(gate(x)) * up(x))``, held
    as transformers holds them (MixtralExperts, Qwen2MoeExperts, ...): ``gate_up_proj`` (E, 2I, H), each
    expert's gate rows then its up rows, and ``down_proj`` (E, H, I).

    ``forward(hidden_states, top_k_index, top_k_weights)`` takes what the router chose, as
    transformers' experts do: the (token, choice) rows sorted by expert go through one
    ``ember.ops.grouped_gated_mlp`` (both GEMMs of every expert and the gating between them in one op),
    are scaled by their routing weights and summed back per token. Routing itself stays the model's.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str = "silu",
                 device=None, dtype=None) -> None:
        super().__init__()
        self.activation = _check_activation(activation)
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_size, intermediate_size
        kw = {"device": device, "dtype": dtype}
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **kw))
        for w in (self.gate_up_proj, self.down_proj):  # nn.Linear's default, per expert
            nn.init.kaiming_uniform_(w, a=5 ** 0.5)

    @classmethod
    def from_module(cls, experts: nn.Module, activation: str) -> "GatedExperts":
        """GatedExperts sharing ``experts``' gate_up_proj and down_proj Parameters (no copies). The
        caller vouches for the layout and the math; ``ember.swap`` checks both before it calls this."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.activation = _check_activation(activation)
        new.gate_up_proj, new.down_proj = experts.gate_up_proj, experts.down_proj
        new.num_experts = experts.gate_up_proj.shape[0]
        new.hidden_dim, new.intermediate_dim = experts.down_proj.shape[1], experts.down_proj.shape[2]
        new.train(experts.training)
        return new

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
                f"activation={self.activation!r}")

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        tokens, top_k = hidden_states.shape[0], top_k_index.shape[-1]
        expert_ids, order = torch.sort(top_k_index.reshape(-1))
        rows = hidden_states[order // top_k]
        # End row of each expert's group, the count of rows routed to it or to a lower one: a fixed (E,)
        # shape (torch.compile needs no data-dependent size) from ops ONNX has (searchsorted it has not).
        experts = torch.arange(self.num_experts, device=expert_ids.device)
        offsets = (expert_ids.unsqueeze(0) <= experts.unsqueeze(1)).sum(dim=1)
        out = ops.grouped_gated_mlp(rows.to(self.gate_up_proj.dtype), self.gate_up_proj, self.down_proj, offsets,
                                    activation=self.activation)
        out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1)
        # Back to (token, choice) order and summed per token: a gather and a sum, deterministic.
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        return out[back].view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)
