"""The gated-MLP rule: transformers' gated MLP classes whose forward is exactly
``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` -> ember.nn.GatedMLP holding the same Linears."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..nn._kept_call import KeptCall
from ..nn.gated_mlp import ACTIVATIONS, GatedExperts, GatedMLP, PackedGatedMLP
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
        w0, w1 = self._modules["wi_0"]._parameters, self._modules["wi_1"]._parameters
        params = (w0["weight"], w1["weight"], w0.get("bias"), w1.get("bias"))
        kept = KeptCall.of(self)  # eager CPU inference: the call kept from the last forward
        if kept is not None and kept.takes(x, params, self.activation):
            h = kept.run(torch.ops.ember_C.gated_linear.default, x)
        else:
            h = ops.gated_linear(x, *params, activation=self.activation)
            KeptCall.keep(self, "gated_linear", x, params, (*params, self.activation, False),
                          self.activation, params[0].shape[1], params[0].shape[0])
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
# Mixture-of-experts: transformers' experts (3-D gate_up_proj / down_proj) -> ember.nn.GatedExperts.
# ---------------------------------------------------------------------------------------------
# Every experts class of transformers 5.24 whose forward is the template below (checked by a script
# over transformers/models; the rule re-checks the source, the members and the layout flags on each
# module, so a class listed here that changes is declined, not mis-swapped).
MOE_EXPERTS_CLASSES = {
    "MixtralExperts", "PhimoeExperts", "MiniMaxExperts", "MiniMaxM2Experts", "JambaExperts",
    "Qwen2MoeExperts", "Qwen3MoeExperts", "Qwen3NextExperts", "Qwen3_5MoeExperts", "Qwen3VLMoeTextExperts",
    "Qwen3OmniMoeThinkerTextExperts", "Qwen3OmniMoeTalkerTextExperts",
    "OlmoeExperts", "FlexOlmoExperts", "DeepseekV2Experts", "DeepseekV3Experts", "DeepseekV32Experts",
    "Glm4MoeExperts", "Glm4MoeLiteExperts", "Glm4vMoeTextExperts", "GlmMoeDsaExperts", "Dots1Experts",
    "Ernie4_5_MoeExperts", "Ernie4_5_VLMoeMoeExperts", "HunYuanMoEV1Experts", "ExaoneMoeExperts",
    "GraniteMoeExperts", "GraniteMoeHybridExperts", "GraniteMoeSharedExperts", "Lfm2MoeExperts",
    "KimiLinearExperts", "Mistral4Experts", "MistralLarge4TextExperts", "Gemma4TextExperts", "Cohere2MoeExperts",
    "AfmoeExperts", "BailingHybridExperts", "MiMoV2FlashExperts", "SolarOpenExperts",
}
# The experts' own forward (transformers 5.x), which every experts implementation of transformers
# (eager, grouped_mm, batched_mm) computes in its own order: GatedExperts computes the same.
_EXPERTS = """
final_hidden_states = torch.zeros_like(hidden_states)
with torch.no_grad():
    expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
    expert_mask = expert_mask.permute(2, 1, 0)
    expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
for expert_idx in expert_hit:
    expert_idx = expert_idx[0]
    if expert_idx == self.num_experts:
        continue
    top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
    current_state = hidden_states[token_idx]
    gate, up = nn.functional.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
    current_hidden_states = self.act_fn(gate) * up
    current_hidden_states = nn.functional.linear(current_hidden_states, self.down_proj[expert_idx])
    current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
    final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
return final_hidden_states
"""
_EXPERTS_SIGNATURE = ["self", "hidden_states", "top_k_index", "top_k_weights"]
# What transformers' use_experts_implementation decorator may have set, and the values it must have.
_EXPERTS_FLAGS = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
                  "has_post_expert_norm": False, "_is_expert_parallel": False}
_EXPERTS_IMPLEMENTATIONS = (None, "eager", "grouped_mm", "batched_mm")


def _experts_forward_problem(cls: type) -> str | None:
    import inspect

    from .forward import body_matches

    fn = cls.__dict__.get("forward")
    wrapped = inspect.unwrap(fn) if fn is not None else None
    if fn is not wrapped and not fn.__code__.co_filename.endswith("integrations/moe.py"):
        return "its forward is wrapped by something other than transformers' experts interface"
    if wrapped is None or list(inspect.signature(wrapped).parameters) != _EXPERTS_SIGNATURE:
        return f"its forward does not take ({', '.join(_EXPERTS_SIGNATURE[1:])})"
    if not body_matches(wrapped, _EXPERTS):
        return "its forward is not exactly the per-expert down_proj(act_fn(gate) * up) over gate_up_proj"
    gate_fn = getattr(cls, "_apply_gate", None)
    if gate_fn is not None and not (gate_fn.__name__ == "_default_apply_gate"
                                    and gate_fn.__code__.co_filename.endswith("integrations/moe.py")):
        return "its _apply_gate is not transformers' default act_fn(gate) * up"
    return None


def _experts_problem(m: nn.Module) -> str | None:
    """Why an experts module of a listed class cannot become GatedExperts, or None when it can."""
    if set(m._modules) != {"act_fn"} or set(m._parameters) != {"gate_up_proj", "down_proj"} or m._buffers:
        return "its members are not exactly gate_up_proj, down_proj and act_fn"
    gu, down = m.gate_up_proj, m.down_proj
    if gu.dim() != 3 or down.dim() != 3 or gu.shape[1] % 2 or gu.shape[0] != down.shape[0] \
            or (down.shape[1], 2 * down.shape[2]) != (gu.shape[2], gu.shape[1]):
        return f"gate_up_proj {tuple(gu.shape)} and down_proj {tuple(down.shape)} are not (E, 2I, H) and (E, H, I)"
    if getattr(m, "num_experts", gu.shape[0]) != gu.shape[0]:
        return "num_experts does not match the weights"
    for flag, want in _EXPERTS_FLAGS.items():
        if getattr(m, flag, want) != want:
            return f"{flag}={getattr(m, flag)!r} (expert parallelism, biases, transposed or interleaved weights, " \
                   "post-expert norms are other math)"
    impl = getattr(getattr(m, "config", None), "_experts_implementation", None)
    if impl not in _EXPERTS_IMPLEMENTATIONS:
        return f"it runs transformers' {impl!r} experts kernel, which the user chose; it stays"
    if gu.device.type != "cpu":
        # Never slower: the Triton kernel (kernels/moe.py) is tested against float64 but its speed against
        # torch's grouped GEMM has not been measured on a GPU yet.
        return (f"ember's Triton grouped gated MLP kernel is not yet measured against torch on a GPU; on "
                f"{gu.device} the experts stay with torch's grouped GEMM")
    if activation_kind(m.act_fn) not in ACTIVATIONS or blocker(m.act_fn) is not None:
        return f"act_fn {type(m.act_fn).__name__} is not one of {', '.join(ACTIVATIONS)}"
    return _experts_forward_problem(type(m))


def _experts_listed(m: nn.Module) -> bool:
    return is_transformers_class(m, MOE_EXPERTS_CLASSES)


def _experts_why_not(m: nn.Module) -> str | None:
    if _experts_listed(m):
        return _experts_problem(m)
    cls = type(m)
    if cls.__module__.startswith("transformers.") and cls.__name__.endswith("Experts"):
        return ("its experts compute other math than the per-expert down_proj(act_fn(gate) * up) ember fuses "
                "(biases, a clamped or custom gate, another weight layout), so they stay with torch")
    return None


MOE_EXPERTS_RULE = SwapRule(
    "moe-experts",
    match=lambda m: _experts_listed(m) and _experts_problem(m) is None,
    replace=lambda m: GatedExperts.from_module(m, activation_kind(m.act_fn)),
    why_not=_experts_why_not,
)
