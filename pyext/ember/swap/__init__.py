"""``ember.swap(model)``: replace modules of an existing model, in place, with ember's.

    report = ember.swap(model)        # activations -> ember.nn.GELU/SiLU/ReLU/ReLU2, gated MLPs -> GatedMLP
    print(report)                     # what was replaced, what was skipped and why
    ember.unswap(model)               # put the very same original module objects back

A swap is driven by a registry of ``SwapRule``s (pattern -> replacement). The package:

    registry.py     SwapRule, register_rule / unregister_rule / registered_rules
    apply.py        swap, unswap, original_of: the walk over the model
    report.py       SwapReport
    forward.py      the one source matcher every rule uses to check a class's forward
    activations.py  activation_kind, the kind -> ember module table, torch / transformers activations
    linear.py       Linear -> activation fusions (nn.Sequential, BERT intermediates, GPT-2 MLP)
    gated.py        gated MLPs (Llama, Mistral, Qwen, Gemma, ...) -> ember.nn.GatedMLP; Phi-3's packed
                    gate_up_proj and T5's gated feed-forward -> one gated GEMM; MoE experts
                    (Mixtral, Qwen2/3-MoE, OLMoE) -> ember.nn.GatedExperts
    mlp.py          up-projection -> activation pairs inside transformers' MLPs and layers (GPT-NeoX,
                    OPT, Falcon, GPT-J, Bloom, CLIP, ViT, DistilBERT, Whisper, T5) -> one fused Linear
    causal_lm.py    transformers' causal LMs: the training loss through the fused linear + cross-entropy

The rules build ember.nn modules; ember.nn never imports this package at import time.

What a swap keeps:
  - parameters and buffers: replacements reuse the original's submodules (a GatedMLP holds the same
    Linear objects) or have none (activations), so ``state_dict`` keys and tensors are unchanged;
  - the way back: the replacement remembers its original in its ``__dict__`` (not as a submodule, so
    ``parameters()``, ``state_dict()`` and ``.to()`` do not see it) and ``unswap`` restores it;
  - semantics: a rule matches only modules whose math it knows exactly (the exact class, not a
    subclass; no forward hooks, no patched ``forward``; for transformers classes, a forward whose
    source is the expected one), and everything else is left to torch.

``ember.swap`` is the function: once ember is imported the name no longer refers to this package, so
reach its modules with ``from ember.swap.<module> import ...``, not ``import ember.swap.<module>``.
"""
from . import activations, causal_lm, gated, linear, mlp
from .activations import activation_kind
from .apply import original_of, swap, unswap
from .registry import SwapRule, register_rule, registered_rules, unregister_rule
from .report import Replaced, Skipped, SwapReport, class_name

# The order rules are tried in: whole blocks before the Linear + activation pairs, and those before
# the activations on their own (the first rule that matches a module wins).
for _rule in (
    gated.GATED_MLP_RULE,
    gated.PACKED_GATED_RULE,
    gated.MOE_EXPERTS_RULE,
    linear.LINEAR_ACT_SEQUENTIAL_RULE,
    linear.HF_LINEAR_ACT_RULE,
    mlp.HF_UP_ACT_RULE,
    activations.TORCH_ACTIVATIONS,
    activations.HF_ACTIVATIONS,
):
    register_rule(_rule)
del _rule

__all__ = [
    "swap", "unswap", "original_of", "SwapRule", "register_rule", "unregister_rule", "registered_rules",
    "SwapReport", "Replaced", "Skipped", "class_name", "activation_kind",
]
