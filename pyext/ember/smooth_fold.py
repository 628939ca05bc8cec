"""Folding SmoothQuant's 1/s into the norm in front of a group of Linears (used by ``ember.quantize``).

x @ W.T == (x / s) @ (W * s).T. When x is the output of an affine norm, y = n(x) * w (+ b), the
division can live in the norm's weight (w / s, b / s) instead of a run-time multiply in every
Int8Linear -- but only if that norm output goes to the group's Linears and NOWHERE else. In a
post-LN encoder (BERT, MiniLM) the LayerNorm output is also the residual stream, so folding there
would change the model; in a pre-norm decoder the normed tensor feeds only q/k/v (input_layernorm) or
gate/up (post_attention_layernorm), while the residual adds the un-normed input.

That property is not detectable from module hooks, so groups are taken only from decoder-layer classes
whose forward is known (read from transformers' source): the exact classes below, not subclasses,
with no hooks or patched forwards on the layer, its norm, attention or MLP (any of those could read
the normed tensor). Everything else keeps the per-layer run-time smoothing.

Gemma's RMSNorm computes n(x) * (1 + w), so its fold is 1 + w' = (1 + w) / s. Gemma2/3 decoder layers
(a post-attention norm applied to the attention output, a separate pre-feedforward norm) are not in the
table and are not folded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .swapping import _blocker

# decoder layer class -> (attention class, MLP class, norm class, norm weight offset). The layer's
# forward is: h = input_layernorm(x); h = self_attn(h) [q_proj/k_proj/v_proj read h, nothing else];
# x = x + h; h = post_attention_layernorm(x); h = mlp(h) [gate_proj/up_proj read h]; x = x + h.
_DECODERS = {
    "transformers.models.llama.modeling_llama.LlamaDecoderLayer": ("LlamaAttention", "LlamaMLP", "LlamaRMSNorm", 0.0),
    "transformers.models.mistral.modeling_mistral.MistralDecoderLayer": ("MistralAttention", "MistralMLP", "MistralRMSNorm", 0.0),
    "transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer": ("Qwen2Attention", "Qwen2MLP", "Qwen2RMSNorm", 0.0),
    "transformers.models.qwen3.modeling_qwen3.Qwen3DecoderLayer": ("Qwen3Attention", "Qwen3MLP", "Qwen3RMSNorm", 0.0),
    "transformers.models.gemma.modeling_gemma.GemmaDecoderLayer": ("GemmaAttention", "GemmaMLP", "GemmaRMSNorm", 1.0),
}


@dataclass
class FoldGroup:
    norm_name: str
    norm: nn.Module
    offset: float                 # the norm multiplies by (offset + weight)
    names: list[str]              # qualified names of the Linears reading the norm's output
    linears: list[nn.Linear]


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def find_groups(model: nn.Module) -> list[FoldGroup]:
    """The (norm -> Linears) groups of ``model`` where folding is valid by the decoder-layer table."""
    # A module reachable under two names (shared) might be used elsewhere too: never fold those.
    seen: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        seen[id(m)] = seen.get(id(m), 0) + 1
    groups = []
    for name, layer in model.named_modules():
        spec = _DECODERS.get(_qualname(layer))
        if spec is None or _blocker(layer) is not None:
            continue
        attn_cls, mlp_cls, norm_cls, offset = spec
        pre = f"{name}." if name else ""
        for norm_key, block_key, block_cls, lin_keys in (
            ("input_layernorm", "self_attn", attn_cls, ("q_proj", "k_proj", "v_proj")),
            ("post_attention_layernorm", "mlp", mlp_cls, ("gate_proj", "up_proj")),
        ):
            norm, block = getattr(layer, norm_key, None), getattr(layer, block_key, None)
            if (norm is None or block is None or type(norm).__name__ != norm_cls
                    or type(block).__name__ != block_cls or _blocker(norm) or _blocker(block)):
                continue
            w = getattr(norm, "weight", None)
            if not isinstance(w, nn.Parameter) or w.dim() != 1 or getattr(norm, "bias", None) is not None:
                continue
            lins = [getattr(block, k, None) for k in lin_keys]
            if not all(type(lin) is nn.Linear and lin.in_features == w.numel() and not _blocker(lin) for lin in lins):
                continue
            if any(seen[id(m)] > 1 for m in (norm, block, *lins)):
                continue
            groups.append(FoldGroup(pre + norm_key, norm, offset,
                                    [f"{pre}{block_key}.{k}" for k in lin_keys], lins))
    return groups


@torch.no_grad()
def fold(group: FoldGroup, s: torch.Tensor) -> None:
    """Rewrite the float model in place so that it computes the same function with the norm's output
    divided by ``s`` and every Linear of the group reading it with W * s."""
    w = group.norm.weight
    s = s.to(device=w.device, dtype=torch.float32)
    w.copy_(((w.float() + group.offset) / s - group.offset).to(w.dtype))
    for lin in group.linears:
        lin.weight.copy_((lin.weight.float() * s).to(lin.weight.dtype))
