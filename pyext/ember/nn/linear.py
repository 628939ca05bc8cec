"""ember.nn.Linear: ``nn.Linear`` with a fused activation, and the swap rules that build it.

``Linear(in_features, out_features, bias=True, activation=None)`` is an ``nn.Linear`` subclass (same
parameters, same state_dict keys, ``isinstance(m, nn.Linear)`` holds) whose forward is one
``ember.ops.linear`` call: GEMM + bias + activation in one op, forward and backward.

Swap rules registered here (ember.swap / unswap):
  linear-act-sequential  nn.Sequential holding Linear -> activation pairs: the Linear becomes an
                         ember.nn.Linear(activation=...) sharing its parameters, the activation an
                         nn.Identity (no parameters, so the state_dict is unchanged)
  hf-linear-act          transformers' BertIntermediate-shaped blocks (dense -> intermediate_act_fn)
                         and GPT2MLP (c_fc -> act -> c_proj -> dropout; Conv1D keeps its weight as
                         (in, out), which the op reads through a transposed view, no copy)
Every rule checks the exact classes, that the activation is one ember computes exactly, that no hooks
or patched forwards are in the way, and (for transformers blocks) that the class's forward is
statement for statement the expected one.
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections import OrderedDict

import torch
from torch import nn

from .. import ops
from ..swapping import _ORIGINAL, SwapRule, activation_kind, register_rule

ACTIVATIONS = (None, "relu", "silu", "gelu", "gelu_tanh")


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
        new.bias = linear.bias  # a Parameter or None; registered either way, as nn.Linear does
        new.activation = _check_activation(activation)
        new.train(linear.training)
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, activation=self.activation)


def _check_activation(activation):
    if activation == "none":
        activation = None
    if activation not in ACTIVATIONS:
        raise ValueError(f"ember.nn.Linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


# ---------------------------------------------------------------------------------------------
# Helpers shared by the rules.
# ---------------------------------------------------------------------------------------------
def _plain(m: nn.Module) -> bool:
    """No hooks and no instance-patched forward: what the replacement would silently drop."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return "forward" not in m.__dict__ and not any(getattr(m, h, None) for h in hooks)


def _mark(new: nn.Module, original: nn.Module) -> nn.Module:
    # A child replaced inside a swapped block remembers its original too, so unswap restores the
    # block's own child instead of copying the replacement into it.
    object.__setattr__(new, _ORIGINAL, original)
    return new


def _fusable_pairs(seq: nn.Sequential) -> list[tuple[str, str, str]]:
    """(linear key, activation key, activation kind) for adjacent Linear -> activation children."""
    items = list(seq._modules.items())
    pairs = []
    i = 0
    while i + 1 < len(items):
        (k1, m1), (k2, m2) = items[i], items[i + 1]
        kind = activation_kind(m2) if m2 is not None else None
        if type(m1) is nn.Linear and kind is not None and _plain(m1) and _plain(m2):
            pairs.append((k1, k2, kind))
            i += 2
        else:
            i += 1
    return pairs


def _fuse_sequential(seq: nn.Sequential) -> nn.Sequential:
    children = OrderedDict(seq._modules)
    for k_lin, k_act, kind in _fusable_pairs(seq):
        children[k_lin] = _mark(Linear.from_linear(seq._modules[k_lin], kind), seq._modules[k_lin])
        children[k_act] = _mark(nn.Identity(), seq._modules[k_act])
    new = nn.Sequential(children)
    new.train(seq.training)
    return new


@functools.lru_cache(maxsize=None)
def _forward_matches(cls: type, template: str) -> bool:
    """``cls.forward`` has one input argument and its body is ``template`` (``{x}`` for the argument)."""
    try:
        fn = ast.parse(textwrap.dedent(inspect.getsource(cls.forward))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return False
    if not isinstance(fn, ast.FunctionDef) or fn.decorator_list:
        return False
    a = fn.args
    if a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs or a.defaults or len(a.args) != 2:
        return False
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    want = ast.parse(textwrap.dedent(template).format(x=a.args[1].arg)).body
    return [ast.dump(s) for s in body] == [ast.dump(s) for s in want]


# ---------------------------------------------------------------------------------------------
# transformers blocks.
# ---------------------------------------------------------------------------------------------
# BERT-family intermediate layers: dense -> intermediate_act_fn (checked on transformers 5.23).
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


def _is_hf(m: nn.Module, names) -> bool:
    cls = type(m)
    return cls.__name__ in names and cls.__module__.startswith("transformers.")


def _is_conv1d(m) -> bool:
    return type(m).__name__ == "Conv1D" and type(m).__module__ == "transformers.pytorch_utils" and _plain(m)


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
        h = ops.linear(hidden_states, self.c_fc.weight.t(), self.c_fc.bias, activation=self.activation)
        return self.dropout(self.c_proj(h))


def _hf_problem(m: nn.Module) -> str | None:
    if _is_hf(m, INTERMEDIATE_CLASSES):
        if set(m._modules) != {"dense", "intermediate_act_fn"} or m._parameters or m._buffers:
            return "children are not exactly dense and intermediate_act_fn"
        if type(m.dense) is not nn.Linear or not _plain(m.dense):
            return "dense is not a plain nn.Linear"
        if activation_kind(m.intermediate_act_fn) is None or not _plain(m.intermediate_act_fn):
            return f"no fused kernel for activation {type(m.intermediate_act_fn).__name__}"
        if not _forward_matches(type(m), _INTERMEDIATE):
            return "its forward is not exactly intermediate_act_fn(dense(x))"
        return None
    if _is_hf(m, {"GPT2MLP"}):
        if set(m._modules) != {"c_fc", "c_proj", "act", "dropout"} or m._parameters or m._buffers:
            return "children are not exactly c_fc, act, c_proj, dropout"
        if not (_is_conv1d(m.c_fc) and isinstance(m.c_proj, nn.Module)):
            return "c_fc is not transformers' Conv1D"
        if activation_kind(m.act) is None or not _plain(m.act):
            return f"no fused kernel for activation {type(m.act).__name__}"
        if not _forward_matches(type(m), _GPT2_MLP):
            return "its forward is not exactly dropout(c_proj(act(c_fc(x))))"
        return None
    return "not a known transformers block"


def _hf_replace(m: nn.Module) -> nn.Module:
    if _is_hf(m, INTERMEDIATE_CLASSES):
        dense = _mark(Linear.from_linear(m.dense, activation_kind(m.intermediate_act_fn)), m.dense)
        return FusedIntermediate(dense)
    return FusedConv1DMLP(m, activation_kind(m.act))


LINEAR_ACT_SEQUENTIAL_RULE = register_rule(
    SwapRule(
        "linear-act-sequential",
        match=lambda m: type(m) is nn.Sequential and bool(_fusable_pairs(m)),
        replace=_fuse_sequential,
    ),
    before="torch-activations",
)
HF_LINEAR_ACT_RULE = register_rule(
    SwapRule(
        "hf-linear-act",
        match=lambda m: _is_hf(m, INTERMEDIATE_CLASSES | {"GPT2MLP"}) and _hf_problem(m) is None,
        replace=_hf_replace,
        why_not=lambda m: _hf_problem(m) if _is_hf(m, INTERMEDIATE_CLASSES | {"GPT2MLP"}) else None,
    ),
    before="torch-activations",
)
