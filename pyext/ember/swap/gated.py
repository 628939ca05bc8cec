"""The gated-MLP rule: transformers' gated MLP classes whose forward is exactly
``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` -> ember.nn.GatedMLP holding the same Linears."""
from __future__ import annotations

from torch import nn

from ..nn.gated_mlp import ACTIVATIONS, GatedMLP, PackedGatedMLP
from .activations import activation_kind
from .apply import blocker, is_plain_linear, is_transformers_class
from .forward import forward_matches
from .registry import SwapRule

# Class names (in transformers.*) that ember.swap may replace. Every one of these computes
# down_proj(act_fn(gate_proj(x)) * up_proj(x)) in transformers 5.23, and swap re-checks that from the
# class's current source, so a future change to any of them makes swap skip it instead of changing
# the model's math. Extend this set to opt in more classes of the same shape.
GATED_MLP_CLASSES = {
    "LlamaMLP", "MllamaTextMLP", "DiffLlamaMLP",
    "MistralMLP", "MinistralMLP", "Ministral3MLP", "PixtralMLP",
    "Qwen2MLP", "Qwen2MoeMLP", "Qwen2_5_VLMLP", "Qwen3MLP", "Qwen3MoeMLP", "Qwen3NextMLP", "Qwen3VLTextMLP",
    "GemmaMLP", "Gemma2MLP", "Gemma3MLP", "VaultGemmaMLP",
    "CohereMLP", "Cohere2MLP", "GraniteMLP", "HeliumMLP", "SmolLM3MLP", "StableLmMLP",
    "OlmoMLP", "Olmo2MLP", "Olmo3MLP", "OlmoeMLP", "DeepseekV2MLP", "DeepseekV3MLP", "Exaone4MLP",
}  # not e.g. T5GemmaMLP/GteMLP (dropout), BitNetMLP (a norm), FalconH1MLP (multipliers): other math

_PROJS = ("gate_proj", "up_proj", "down_proj")
_GATED = (
    "return self.down_proj(self.act_fn(self.gate_proj({x})) * self.up_proj({x}))",
    "return self.down_proj(self.up_proj({x}) * self.act_fn(self.gate_proj({x})))",
)


def _problem(m: nn.Module) -> str | None:
    """Why a module of a listed class cannot become a GatedMLP, or None when it can."""
    if set(m._modules) != {*_PROJS, "act_fn"} or any(v is None for v in m._modules.values()):
        return f"children {sorted(m._modules)} are not exactly gate_proj, up_proj, down_proj, act_fn"
    if m._parameters or m._buffers:
        return "it has parameters or buffers of its own"
    if activation_kind(m.act_fn) not in ACTIVATIONS:
        return f"act_fn {type(m.act_fn).__name__} is not one of {', '.join(ACTIVATIONS)}"
    if blocker(m.act_fn) is not None:
        return "act_fn has hooks or a patched forward, which GatedMLP would not run"
    if not forward_matches(type(m), *_GATED):
        return "its forward is not exactly down_proj(act_fn(gate_proj(x)) * up_proj(x))"
    return None


def _listed(m: nn.Module) -> bool:
    return is_transformers_class(m, GATED_MLP_CLASSES)


def _replace(m: nn.Module) -> GatedMLP:
    return GatedMLP.from_module(m, activation=activation_kind(m.act_fn))


GATED_MLP_RULE = SwapRule(
    "gated-mlp",
    match=lambda m: _listed(m) and _problem(m) is None,
    replace=_replace,
    why_not=lambda m: _problem(m) if _listed(m) else None,
)


# ---------------------------------------------------------------------------------------------
# Phi-3's packed gate_up_proj, and T5's gated feed-forward (wi_0 / wi_1).
# ---------------------------------------------------------------------------------------------
PACKED_GATED_CLASSES = {"Phi3MLP", "Phi4MultimodalMLP"}
_PACKED = """
up_states = self.gate_up_proj({x})
gate, up_states = up_states.chunk(2, dim=-1)
up_states = up_states * self.activation_fn(gate)
return self.down_proj(up_states)
"""
T5_GATED_CLASSES = {"T5DenseGatedActDense", "MT5DenseGatedActDense", "UMT5DenseGatedActDense"}
_T5_GATED = """
hidden_gelu = self.act(self.wi_0({x}))
hidden_linear = self.wi_1({x})
{x} = hidden_gelu * hidden_linear
{x} = self.dropout({x})
if isinstance(self.wo.weight, torch.Tensor) and {x}.dtype != self.wo.weight.dtype and self.wo.weight.dtype != torch.int8:
    {x} = {x}.to(self.wo.weight.dtype)
{x} = self.wo({x})
return {x}
"""


class T5GatedDense(nn.Module):
    """T5's gated feed-forward, ``wo(dropout(act(wi_0(x)) * wi_1(x)))`` with T5's cast to wo's dtype,
    with wi_0 and wi_1 as one gated GEMM. Holds the original wi_0, wi_1, wo and dropout objects."""

    def __init__(self, block: nn.Module, activation: str) -> None:
        super().__init__()
        self.activation = activation
        for name in ("wi_0", "wi_1", "wo", "dropout", "act"):
            setattr(self, name, getattr(block, name))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    def forward(self, x):
        import torch

        from .. import ops

        h = ops.gated_linear(x, self.wi_0.weight, self.wi_1.weight, self.wi_0.bias, self.wi_1.bias,
                             activation=self.activation)
        h = self.dropout(h)
        if isinstance(self.wo.weight, torch.Tensor) and h.dtype != self.wo.weight.dtype and self.wo.weight.dtype != torch.int8:
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)


def _packed_problem(m: nn.Module) -> str | None:
    if set(m._modules) != {"gate_up_proj", "down_proj", "activation_fn"} or m._parameters or m._buffers:
        return "children are not exactly gate_up_proj, down_proj, activation_fn"
    if not is_plain_linear(m.gate_up_proj) or m.gate_up_proj.out_features % 2:
        return "gate_up_proj is not a plain nn.Linear with an even out_features"
    if activation_kind(m.activation_fn) not in ACTIVATIONS or blocker(m.activation_fn) is not None:
        return f"activation_fn {type(m.activation_fn).__name__} is not one of {', '.join(ACTIVATIONS)}"
    if not forward_matches(type(m), _PACKED):
        return "its forward is not exactly down_proj(up * act(gate)) over gate_up_proj(x).chunk(2)"
    return None


def _t5_problem(m: nn.Module) -> str | None:
    if set(m._modules) != {"wi_0", "wi_1", "wo", "dropout", "act"} or m._parameters or m._buffers:
        return "children are not exactly wi_0, wi_1, wo, dropout, act"
    if not (is_plain_linear(m.wi_0) and is_plain_linear(m.wi_1)) or (m.wi_0.bias is None) != (m.wi_1.bias is None):
        return "wi_0 and wi_1 are not plain nn.Linear layers alike in bias"
    if activation_kind(m.act) not in ACTIVATIONS or blocker(m.act) is not None:
        return f"act {type(m.act).__name__} is not one of {', '.join(ACTIVATIONS)}"
    if not forward_matches(type(m), _T5_GATED):
        return "its forward is not exactly wo(dropout(act(wi_0(x)) * wi_1(x)))"
    return None


def _packed_or_t5_problem(m: nn.Module) -> str | None:
    return _packed_problem(m) if is_transformers_class(m, PACKED_GATED_CLASSES) else _t5_problem(m)


def _packed_or_t5_replace(m: nn.Module) -> nn.Module:
    if is_transformers_class(m, PACKED_GATED_CLASSES):
        return PackedGatedMLP(m.gate_up_proj, m.down_proj, activation_kind(m.activation_fn))
    return T5GatedDense(m, activation_kind(m.act))


def _packed_or_t5(m: nn.Module) -> bool:
    return is_transformers_class(m, PACKED_GATED_CLASSES | T5_GATED_CLASSES)


PACKED_GATED_RULE = SwapRule(
    "hf-packed-gated",
    match=lambda m: _packed_or_t5(m) and _packed_or_t5_problem(m) is None,
    replace=_packed_or_t5_replace,
    why_not=lambda m: _packed_or_t5_problem(m) if _packed_or_t5(m) else None,
)


# ---------------------------------------------------------------------------------------------
# Mixture-of-experts: recognised and declined, with the reason in the report.
# ---------------------------------------------------------------------------------------------
MOE_EXPERTS_CLASSES = {"MixtralExperts", "Qwen2MoeExperts", "Qwen3MoeExperts", "OlmoeExperts", "DeepseekV3NaiveMoe"}


def _experts_why_not(m: nn.Module) -> str | None:
    if not is_transformers_class(m, MOE_EXPERTS_CLASSES):
        return None
    impl = getattr(getattr(m, "config", None), "_experts_implementation", None)
    return (f"experts run through transformers' experts interface ({impl!r}: all experts' GEMMs in one "
            "grouped call); ember has no grouped gated GEMM, and one fused call per expert would trade that "
            "single call for num_experts, so the experts stay with torch")


MOE_EXPERTS_RULE = SwapRule("moe-experts", match=lambda m: False, replace=lambda m: m, why_not=_experts_why_not)
