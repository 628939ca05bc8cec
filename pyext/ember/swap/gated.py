"""The gated-MLP rule: transformers' gated MLP classes whose forward is exactly
``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` -> ember.nn.GatedMLP holding the same Linears."""
from __future__ import annotations

from torch import nn

from ..nn.gated_mlp import ACTIVATIONS, GatedMLP
from .activations import activation_kind
from .apply import blocker
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
    cls = type(m)
    return cls.__name__ in GATED_MLP_CLASSES and cls.__module__.startswith("transformers.")


def _replace(m: nn.Module) -> GatedMLP:
    return GatedMLP.from_module(m, activation=activation_kind(m.act_fn))


GATED_MLP_RULE = SwapRule(
    "gated-mlp",
    match=lambda m: _listed(m) and _problem(m) is None,
    replace=_replace,
    why_not=lambda m: _problem(m) if _listed(m) else None,
)
