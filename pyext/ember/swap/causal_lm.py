"""The fused training loss for transformers' causal LMs: ``*ForCausalLM`` models whose forward is
``logits = lm_head(hidden); loss = loss_function(logits, labels)`` compute that loss with
``ember.ops.linear_cross_entropy`` instead, so the (tokens x vocab) fp32 logits are never stored.

    report = ember.swap(model)       # also: "causal-lm-loss" entries for the patched models
    out = model(input_ids, labels=labels)          # training mode: out.loss fused, out.logits is None
    out = model(input_ids, labels=labels, skip_logits=False)   # the logits too, through lm_head as before

When the fused loss runs: ``labels`` given, and ``skip_logits`` True, or left unset while the model
is in training mode (the rule Liger-Kernel uses; an evaluation loop in eval mode that wants logits
and a loss keeps getting both). Otherwise the forward computes exactly what the original does.

Unlike the other rules this one cannot replace a module: the model is usually the root that a user
holds. It sets ``forward`` on the instance (a function with the class forward's decorators and
signature, plus ``skip_logits``) and ``unswap`` deletes it again. It matches only when it knows the
original's math:
  - the class lives in transformers and its forward's body is, statement for statement, one of the
    known ones (the Llama family's, with the loss called by keyword or positionally; GPT-2's; GPT-J's and CodeGen's),
    under the known decorators;
  - ``loss_function`` is transformers' own ``ForCausalLMLoss`` (not a user's or a config's other loss);
  - ``lm_head`` is a plain ``nn.Linear`` producing ``config.vocab_size`` logits, with no hooks;
  - nothing has patched the instance's forward already.
So Gemma2/3 (logit soft-capping), the MoE models (auxiliary router loss) and anything else are
reported with the reason and left alone.

What the fused loss equals: ``ForCausalLMLoss`` (labels shifted by one, ``ignore_index`` -100,
mean over the kept tokens, or sum / ``num_items_in_batch`` when the trainer passes it; a given
``shift_labels`` used as is) computed in fp32 from the hidden states, as transformers computes it from
``logits.float()``. In fp32 the two agree to rounding; with bf16/fp16 weights ember's is slightly more
accurate (its logits are never rounded to bf16 before the softmax).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from .forward import body_matches, decorator_sources
from .report import Replaced, Skipped, SwapReport

RULE = "causal-lm-loss"
_MARK = "_ember_fused_loss"  # in the instance __dict__ next to the forward this rule put there

_DECORATORS = frozenset({"deprecate_kwarg('past_key_values', '5.40.0', new_name='cache')", "can_return_tuple",
                         "auto_docstring"})

# The Llama family's forward (Llama, Mistral, Qwen2/3, Gemma, Phi-3, OLMo, SmolLM3, ...), transformers 5.24.
_LLAMA_HEAD = """
outputs: BaseModelOutputWithPast = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
hidden_states = outputs.last_hidden_state
hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
logits = self.lm_head(hidden_states)
loss = None
if labels is not None:
    loss = self.loss_function({loss_args}, **kwargs)
return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states, attentions=outputs.attentions)
"""
_GPT2_HEAD = """
transformer_outputs: BaseModelOutputWithPastAndCrossAttentions = self.transformer(input_ids, cache=cache, attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask, use_cache=use_cache, **kwargs)
hidden_states = transformer_outputs.last_hidden_state
hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
logits = self.lm_head(hidden_states)
loss = None
if labels is not None:
    loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
return CausalLMOutputWithCrossAttentions(loss=loss, logits=logits, cache=transformer_outputs.cache, hidden_states=transformer_outputs.hidden_states, attentions=transformer_outputs.attentions, cross_attentions=transformer_outputs.cross_attentions)
"""
# GPT-J's and CodeGen's (the same body): the Llama family's head under a positional input_ids.
_GPTJ_HEAD = """
outputs: BaseModelOutputWithPast = self.transformer(input_ids, cache=cache, attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
logits = self.lm_head(hidden_states)
loss = None
if labels is not None:
    loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states, attentions=outputs.attentions)
"""
_LOSS_ARGS = ("logits=logits, labels=labels, vocab_size=self.config.vocab_size", "logits, labels, self.vocab_size")
LLAMA_TEMPLATES = tuple(_LLAMA_HEAD.replace("{loss_args}", a) for a in _LOSS_ARGS)
GPT2_TEMPLATES = (_GPT2_HEAD,)
GPTJ_TEMPLATES = (_GPTJ_HEAD,)


# ---------------------------------------------------------------------------------------------
# The loss.
# ---------------------------------------------------------------------------------------------
def causal_lm_loss(hidden: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor, num_items_in_batch=None,
                   ignore_index: int = -100, shift_labels: torch.Tensor | None = None, **_) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss(lm_head(hidden), labels, ...)`` without the logits."""
    from ..ops import linear_cross_entropy

    if shift_labels is None:
        # tokens < n predict n; the last position has no next token
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(hidden.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), lm_head.weight, target, lm_head.bias,
                                ignore_index=ignore_index, reduction=reduction)
    if reduction == "sum":
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _fused(self, labels, skip_logits) -> bool:
    return labels is not None and (self.training if skip_logits is None else bool(skip_logits))


def _head_and_loss(self, hidden_states, labels, skip_logits, kwargs: dict):
    """(logits, loss) of every replacement forward: the fused loss and no logits when _fused says so, else
    the original's lm_head and loss_function (ForCausalLMLoss: problem() checked that, so the keyword call
    is the same as GPT-2's positional one)."""
    if _fused(self, labels, skip_logits):
        return None, causal_lm_loss(hidden_states, self.lm_head, labels, **kwargs)
    logits = self.lm_head(hidden_states)
    loss = None
    if labels is not None:
        loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
    return logits, loss


# ---------------------------------------------------------------------------------------------
# The replacement forwards: the originals' bodies with the head and loss fused when _fused says so.
# ---------------------------------------------------------------------------------------------
def _llama_forward(g: dict):
    """The Llama-family forward, built from the names of the original's module ``g``."""
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, skip_logits=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden_states = g["slice_logits_to_keep"](outputs.last_hidden_state, logits_to_keep)
        logits, loss = _head_and_loss(self, hidden_states, labels, skip_logits, kwargs)
        return g["CausalLMOutputWithPast"](loss=loss, logits=logits, cache=outputs.cache,
                                           hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return forward


def _gpt2_forward(g: dict):
    def forward(self, input_ids=None, cache=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None, labels=None,
                use_cache=None, logits_to_keep=0, skip_logits=None, **kwargs):
        out = self.transformer(input_ids, cache=cache, attention_mask=attention_mask, token_type_ids=token_type_ids,
                               position_ids=position_ids, inputs_embeds=inputs_embeds,
                               encoder_hidden_states=encoder_hidden_states,
                               encoder_attention_mask=encoder_attention_mask, use_cache=use_cache, **kwargs)
        hidden_states = g["slice_logits_to_keep"](out.last_hidden_state, logits_to_keep)
        logits, loss = _head_and_loss(self, hidden_states, labels, skip_logits, kwargs)
        return g["CausalLMOutputWithCrossAttentions"](loss=loss, logits=logits, cache=out.cache,
                                                      hidden_states=out.hidden_states, attentions=out.attentions,
                                                      cross_attentions=out.cross_attentions)
    return forward


def _gptj_forward(g: dict):
    """GPT-J's and CodeGen's forward (their signature: cache second, token_type_ids)."""
    def forward(self, input_ids=None, cache=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, skip_logits=None, **kwargs):
        outputs = self.transformer(input_ids, cache=cache, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                   position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                   **kwargs)
        hidden_states = g["slice_logits_to_keep"](outputs.last_hidden_state, logits_to_keep)
        logits, loss = _head_and_loss(self, hidden_states, labels, skip_logits, kwargs)
        return g["CausalLMOutputWithPast"](loss=loss, logits=logits, cache=outputs.cache,
                                           hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return forward


_FAMILIES = ((LLAMA_TEMPLATES, _llama_forward), (GPT2_TEMPLATES, _gpt2_forward), (GPTJ_TEMPLATES, _gptj_forward))


# ---------------------------------------------------------------------------------------------
# Matching.
# ---------------------------------------------------------------------------------------------
def is_causal_lm(m: nn.Module) -> bool:
    cls = type(m)
    return cls.__module__.startswith("transformers.") and (
        cls.__name__.endswith("ForCausalLM") or cls.__name__.endswith("LMHeadModel"))


def _family(m: nn.Module):
    fwd = type(m).forward
    if decorator_sources(fwd) != _DECORATORS:
        return None
    for templates, build in _FAMILIES:
        if body_matches(fwd, *templates):
            return build
    return None


def problem(m: nn.Module) -> str | None:
    """Why the fused loss cannot be put into the causal LM ``m``, or None when it can."""
    if _MARK in m.__dict__:
        return "already swapped"
    if "forward" in m.__dict__:
        return "its forward is patched on the instance (e.g. by accelerate); swapping would drop that"
    if any(getattr(m, h, None) for h in ("_forward_hooks", "_forward_pre_hooks")):
        return "it has forward hooks, which see the logits the fused loss does not make"
    if _family(m) is None:
        return ("its forward is not the known lm_head -> loss_function one (e.g. logit soft-capping or an "
                "auxiliary loss), so a fused loss would change its math")
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return "transformers.loss.loss_utils.ForCausalLMLoss does not import"
    if m.loss_function is not ForCausalLMLoss:
        return f"its loss_function is {getattr(m.loss_function, '__name__', m.loss_function)!r}, not ForCausalLMLoss"
    head = getattr(m, "lm_head", None)
    if type(head) is not nn.Linear or any(getattr(head, h, None) for h in ("_forward_hooks", "_forward_pre_hooks")):
        return "lm_head is not a plain nn.Linear"
    if head.out_features != getattr(m.config, "vocab_size", None):
        return f"lm_head has {head.out_features} outputs, config.vocab_size is {getattr(m.config, 'vocab_size', None)}"
    return None


def _replacement_forward(m: nn.Module):
    g = vars(sys.modules[type(m).__module__])
    inner = _family(m)(g)
    # the original's decorators, from its own module: return_dict=False -> tuple, the past_key_values alias
    return g["deprecate_kwarg"]("past_key_values", "5.40.0", new_name="cache")(g["can_return_tuple"](inner))


def patch(model: nn.Module, report: SwapReport, allow=None) -> None:
    """Put the fused loss into every causal LM in ``model`` (itself included); record it in ``report``.
    ``allow(name, module)`` is swap's ``filter``."""
    for name, m in model.named_modules():
        if not is_causal_lm(m):
            continue
        why = problem(m)
        if why is None and allow is not None and not allow(name, m):
            why = "excluded by filter"
        if why is not None:
            report.skipped.append(Skipped(name, type(m), f"fused loss: {why}"))
            continue
        m.__dict__["forward"] = _replacement_forward(m).__get__(m)
        m.__dict__[_MARK] = True
        report.replaced.append(Replaced(name, type(m), type(m), RULE))


def unpatch(model: nn.Module, report: SwapReport) -> None:
    """Undo ``patch``: the class's own forward again."""
    for name, m in model.named_modules():
        if m.__dict__.pop(_MARK, False):
            m.__dict__.pop("forward", None)
            report.replaced.append(Replaced(name, type(m), type(m), RULE))
