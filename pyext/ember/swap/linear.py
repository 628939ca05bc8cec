"""The Linear -> activation fusion rules: the Linear becomes an ember.nn.Linear (or the block an
ember.nn fused block) with the activation in the matmul's epilogue.

  linear-act-sequential  nn.Sequential holding Linear -> activation pairs: the Linear becomes an
                         ember.nn.Linear(activation=...) sharing its parameters, the activation an
                         nn.Identity (no parameters, so the state_dict is unchanged)
  hf-linear-act          transformers' BertIntermediate-shaped blocks (dense -> intermediate_act_fn)
                         -> FusedIntermediate, and GPT2MLP (c_fc -> act -> c_proj -> dropout)
                         -> FusedConv1DMLP
Every rule checks the exact classes, that the activation is one ember's Linear fuses exactly, that no
hooks or patched forwards are in the way, and (for transformers blocks) that the forwards are
statement for statement the expected ones.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..nn.linear import ACTIVATIONS, FusedConv1DMLP, FusedIntermediate, Linear
from .activations import activation_kind
from .apply import blocker, is_plain_linear, is_transformers_class, mark_replaced
from .forward import forward_matches
from .registry import SwapRule


def _fusable_kind(act: nn.Module | None) -> str | None:
    """The activation ember.nn.Linear would fuse in place of ``act`` (a plain module), else None."""
    if act is None or blocker(act) is not None:
        return None
    kind = activation_kind(act)
    return kind if kind is not None and kind in ACTIVATIONS else None


# ---------------------------------------------------------------------------------------------
# nn.Sequential.
# ---------------------------------------------------------------------------------------------
def _fusable_pairs(seq: nn.Sequential) -> list[tuple[str, str, str]]:
    """(linear key, activation key, activation kind) for adjacent Linear -> activation children."""
    items = list(seq._modules.items())
    pairs = []
    i = 0
    while i + 1 < len(items):
        (k1, m1), (k2, m2) = items[i], items[i + 1]
        kind = _fusable_kind(m2)
        if type(m1) is nn.Linear and blocker(m1) is None and kind is not None:
            pairs.append((k1, k2, kind))
            i += 2
        else:
            i += 1
    return pairs


def _fuse_sequential(seq: nn.Sequential) -> nn.Sequential:
    children = OrderedDict(seq._modules)
    for k_lin, k_act, kind in _fusable_pairs(seq):
        children[k_lin] = mark_replaced(Linear.from_linear(seq._modules[k_lin], kind), seq._modules[k_lin])
        children[k_act] = mark_replaced(nn.Identity(), seq._modules[k_act])
    new = nn.Sequential(children)
    new.train(seq.training)
    return new


# ---------------------------------------------------------------------------------------------
# transformers blocks (forwards checked on transformers 5.23/5.24).
# ---------------------------------------------------------------------------------------------
# BERT-family intermediate layers: dense -> intermediate_act_fn.
INTERMEDIATE_CLASSES = {
    "BertIntermediate", "RobertaIntermediate", "XLMRobertaIntermediate", "CamembertIntermediate",
    "ElectraIntermediate", "LayoutLMIntermediate", "DataVec2VecTextIntermediate", "ErnieIntermediate",
}
_INTERMEDIATE = """
{x} = self.dense({x})
{x} = self.intermediate_act_fn({x})
return {x}
"""
_GPT2_MLP = """
{x} = self.c_fc({x})
{x} = self.act({x})
{x} = self.c_proj({x})
{x} = self.dropout({x})
return {x}
"""
# FusedConv1DMLP computes c_fc as x @ weight + bias, which is Conv1D's forward only while it is this.
_CONV1D = """
size_out = {x}.size()[:-1] + (self.nf,)
{x} = torch.addmm(self.bias, {x}.view(-1, {x}.size(-1)), self.weight)
{x} = {x}.view(size_out)
return {x}
"""


def _is_conv1d(m: nn.Module) -> bool:
    cls = type(m)
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__ == "transformers.pytorch_utils"
        and blocker(m) is None
        and forward_matches(cls, _CONV1D)
    )


def _hf_problem(m: nn.Module) -> str | None:
    if is_transformers_class(m, INTERMEDIATE_CLASSES):
        if set(m._modules) != {"dense", "intermediate_act_fn"} or m._parameters or m._buffers:
            return "children are not exactly dense and intermediate_act_fn"
        if not is_plain_linear(m.dense):
            return "dense is not a plain nn.Linear"
        if _fusable_kind(m.intermediate_act_fn) is None:
            return f"no fused kernel for activation {type(m.intermediate_act_fn).__name__}"
        if not forward_matches(type(m), _INTERMEDIATE):
            return "its forward is not exactly intermediate_act_fn(dense(x))"
        return None
    if is_transformers_class(m, {"GPT2MLP"}):
        if set(m._modules) != {"c_fc", "c_proj", "act", "dropout"} or m._parameters or m._buffers:
            return "children are not exactly c_fc, act, c_proj, dropout"
        if not (_is_conv1d(m.c_fc) and isinstance(m.c_proj, nn.Module)):
            return "c_fc is not transformers' Conv1D"
        if _fusable_kind(m.act) is None:
            return f"no fused kernel for activation {type(m.act).__name__}"
        if not forward_matches(type(m), _GPT2_MLP):
            return "its forward is not exactly dropout(c_proj(act(c_fc(x))))"
        return None
    return "not a known transformers block"


def _hf_replace(m: nn.Module) -> nn.Module:
    if is_transformers_class(m, INTERMEDIATE_CLASSES):
        dense = mark_replaced(Linear.from_linear(m.dense, activation_kind(m.intermediate_act_fn)), m.dense)
        return FusedIntermediate(dense)
    return FusedConv1DMLP(m, activation_kind(m.act))


def _is_hf_block(m: nn.Module) -> bool:
    return is_transformers_class(m, INTERMEDIATE_CLASSES | {"GPT2MLP"})


LINEAR_ACT_SEQUENTIAL_RULE = SwapRule(
    "linear-act-sequential",
    match=lambda m: type(m) is nn.Sequential and bool(_fusable_pairs(m)),
    replace=_fuse_sequential,
)
HF_LINEAR_ACT_RULE = SwapRule(
    "hf-linear-act",
    match=lambda m: _is_hf_block(m) and _hf_problem(m) is None,
    replace=_hf_replace,
    why_not=lambda m: _hf_problem(m) if _is_hf_block(m) else None,
)
