"""Folding SmoothQuant's 1/s into the norm in front of a group of Linears (used by ``ember.quantize``).

x @ W.T == (x / s) @ (W * s).T. When x is the output of an affine norm, y = n(x) * w (+ b), the
division can live in the norm's weight (w / s, b / s) instead of a run-time multiply in every
Int8Linear -- but only if that norm output goes to the group's Linears and NOWHERE else. In a
post-LN encoder (BERT, MiniLM) the LayerNorm output is also the residual stream, so folding there
would change the model; in a pre-norm decoder the normed tensor feeds only q/k/v (input_layernorm) or
gate/up (post_attention_layernorm), while the residual adds the un-normed input.

That property is not detectable from module hooks, so groups are taken only from decoder-layer classes
whose forward is known (read from transformers' source, 5.x): the exact classes below, not subclasses,
with no hooks or patched forwards on the layer, its norm, attention or MLP (any of those could read
the normed tensor). Everything else keeps the per-layer run-time smoothing.

Gemma's RMSNorm computes n(x) * (1 + w), so its fold is 1 + w' = (1 + w) / s; a LayerNorm with bias
(OPT, Phi) takes w / s and b / s. Gemma2/3 decoder layers (a post-attention norm applied to the attention
output, a separate pre-feedforward norm) and post-LN OPT (350m) are not folded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .swap.apply import blocker as _blocker

@dataclass(frozen=True)
class _NormSpec:
    """One norm of a decoder layer and the Linears that read its output (and nothing else reads it).
    readers: (attribute of the layer holding the Linears, that module's class name, Linear attribute
    names); an empty attribute means the Linears belong to the layer itself."""

    norm: str
    norm_cls: str
    readers: tuple[tuple[str, str, tuple[str, ...]], ...]


_QKV = ("q_proj", "k_proj", "v_proj")


def _llama_like(prefix: str) -> tuple[_NormSpec, ...]:
    # h = input_layernorm(x); h = self_attn(h) [q_proj/k_proj/v_proj read h, nothing else]; x = x + h;
    # h = post_attention_layernorm(x); h = mlp(h) [gate_proj/up_proj read h]; x = x + h.
    return (_NormSpec("input_layernorm", f"{prefix}RMSNorm", (("self_attn", f"{prefix}Attention", _QKV),)),
            _NormSpec("post_attention_layernorm", f"{prefix}RMSNorm", (("mlp", f"{prefix}MLP", ("gate_proj", "up_proj")),)))


# decoder layer class -> (its norms, norm weight offset, layer attribute that must be true for the
# layer to be pre-norm, or None).
_DECODERS = {
    "transformers.models.llama.modeling_llama.LlamaDecoderLayer": (_llama_like("Llama"), 0.0, None),
    "transformers.models.mistral.modeling_mistral.MistralDecoderLayer": (_llama_like("Mistral"), 0.0, None),
    "transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer": (_llama_like("Qwen2"), 0.0, None),
    "transformers.models.qwen3.modeling_qwen3.Qwen3DecoderLayer": (_llama_like("Qwen3"), 0.0, None),
    "transformers.models.gemma.modeling_gemma.GemmaDecoderLayer": (_llama_like("Gemma"), 1.0, None),
    # OPT with do_layer_norm_before (125m, 1.3b and up; 350m is post-LN): h = self_attn_layer_norm(x)
    # feeds self_attn's q/k/v only, x = x + attn(h); h = final_layer_norm(x) feeds fc1 only, x = x + fc2(..).
    "transformers.models.opt.modeling_opt.OPTDecoderLayer": (
        (_NormSpec("self_attn_layer_norm", "LayerNorm", (("self_attn", "OPTAttention", _QKV),)),
         _NormSpec("final_layer_norm", "LayerNorm", (("", "", ("fc1",)),))),
        0.0, "do_layer_norm_before"),
    # Phi: parallel attention and MLP on one normed tensor: h = input_layernorm(x) feeds q/k/v and fc1,
    # x = x + attn(h) + mlp(h). One s for all four.
    "transformers.models.phi.modeling_phi.PhiDecoderLayer": (
        (_NormSpec("input_layernorm", "LayerNorm", (("self_attn", "PhiAttention", _QKV), ("mlp", "PhiMLP", ("fc1",)))),),
        0.0, None),
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
        norms, offset, pre_norm_flag = spec
        if pre_norm_flag is not None and getattr(layer, pre_norm_flag, None) is not True:
            continue
        pre = f"{name}." if name else ""
        for ns in norms:
            group = _group(layer, pre, ns, offset, seen)
            if group is not None:
                groups.append(group)
    return groups


def _group(layer: nn.Module, pre: str, ns: _NormSpec, offset: float, seen: dict[int, int]) -> FoldGroup | None:
    norm = getattr(layer, ns.norm, None)
    if norm is None or type(norm).__name__ != ns.norm_cls or _blocker(norm):
        return None
    w, b = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if not isinstance(w, nn.Parameter) or w.dim() != 1 or not (b is None or (isinstance(b, nn.Parameter) and
                                                                            b.shape == w.shape)):
        return None
    names, lins = [], []
    for attr, cls, keys in ns.readers:
        block = getattr(layer, attr, None) if attr else layer
        if block is None or (attr and (type(block).__name__ != cls or _blocker(block))):
            return None
        if attr and seen[id(block)] > 1:
            return None
        for k in keys:
            names.append(f"{pre}{attr}.{k}" if attr else f"{pre}{k}")
            lins.append(getattr(block, k, None))
    if not all(type(lin) is nn.Linear and lin.in_features == w.numel() and not _blocker(lin) for lin in lins):
        return None
    if any(seen[id(m)] > 1 for m in (norm, *lins)):
        return None
    return FoldGroup(pre + ns.norm, norm, offset, names, lins)


@torch.no_grad()
def fold(group: FoldGroup, s: torch.Tensor) -> None:
    """Rewrite the float model in place so that it computes the same function with the norm's output
    divided by ``s`` and every Linear of the group reading it with W * s."""
    w, b = group.norm.weight, getattr(group.norm, "bias", None)
    s = s.to(device=w.device, dtype=torch.float32)
    w.copy_(((w.float() + group.offset) / s - group.offset).to(w.dtype))
    if b is not None:  # LayerNorm: (n(x) * w + b) / s = n(x) * (w / s) + b / s
        b.copy_((b.float() / s).to(b.dtype))
    for lin in group.linears:
        lin.weight.copy_((lin.weight.float() * s).to(lin.weight.dtype))
