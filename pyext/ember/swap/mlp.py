"""The up-projection -> activation rule for transformers' MLPs: wherever a listed class applies its
activation straight to its up-projection's output, the two become one ember.nn.Linear with the
activation in the GEMM's epilogue.

  hf-up-act   GPT-NeoX, Falcon, GPT-J, Bloom, OPT, CLIP / SigLIP, ViT / DeiT / BEiT, DistilBERT, Whisper,
              T5 (DenseReluDense): a copy of the block whose up-projection is an ember.nn.Linear
              (activation=...) sharing its Parameters and whose activation is an nn.Identity. The
              block's class and forward stay what they were.

Why a copy with two children swapped, and not a new block class per architecture: the blocks differ
in everything around the pair (dropouts, dtype casts, residuals, chunked feed-forward, whole decoder
layers for OPT and Whisper), and re-implementing each forward would be one more thing to get wrong.
The rewrite is exact whenever ``act`` is applied to ``up``'s output and to nothing else, and that
output is seen by nothing else. That is checked on the class's source, as a syntax tree:

  - ``self.<up>`` and ``self.<act>`` appear exactly once each in the class's methods (``__init__``
    aside), both in the listed method;
  - they appear as ``self.<act>(self.<up>(e))``, or as two consecutive statements
    ``v = self.<up>(e)`` then ``v = self.<act>(v)`` (the pre-activation value is overwritten at once,
    so no later statement can read it);
  - each call takes one positional argument and no keywords.

Decorators on the method do not matter: they wrap the body, and the body's composition is unchanged.
``up`` must be a plain nn.Linear (or Falcon's FalconLinear, whose forward is checked to be the same
math), ``act`` one of the activations ember.nn.Linear fuses, and neither may carry hooks.
"""
from __future__ import annotations

import ast
import copy
import functools
import inspect
import textwrap

from torch import nn

from ..nn.linear import Linear
from .apply import blocker, is_plain_linear, mark_replaced
from .forward import forward_matches
from .linear import _fusable_kind
from .registry import SwapRule

# transformers class name -> (the method holding the pair, up-projection attribute, activation attribute)
UP_ACT_SITES: dict[str, tuple[str, str, str]] = {
    "GPTNeoXMLP": ("forward", "dense_h_to_4h", "act"),
    "FalconMLP": ("forward", "dense_h_to_4h", "act"),
    "GPTJMLP": ("forward", "fc_in", "act"),
    "CodeGenMLP": ("forward", "fc_in", "act"),
    "BloomMLP": ("forward", "dense_h_to_4h", "gelu_impl"),
    "OPTDecoderLayer": ("forward", "fc1", "activation_fn"),
    "CLIPMLP": ("forward", "fc1", "activation_fn"),
    "SiglipMLP": ("forward", "fc1", "activation_fn"),
    "ViTMLP": ("forward", "fc1", "activation_fn"),
    "DeiTMLP": ("forward", "fc1", "activation_fn"),
    "BeitMLP": ("forward", "fc1", "activation_fn"),
    "FFN": ("ff_chunk", "lin1", "activation"),  # DistilBERT
    "WhisperEncoderLayer": ("forward", "fc1", "activation_fn"),
    "WhisperDecoderLayer": ("forward", "fc1", "activation_fn"),
    "T5DenseActDense": ("forward", "wi", "act"),
    "MT5DenseActDense": ("forward", "wi", "act"),
}

# FalconLinear computes input @ weight.T (+ bias): F.linear's math, so ember's Linear may stand in.
_FALCON_LINEAR = """
hidden_states = {x} @ self.weight.T
if self.bias is None:
    return hidden_states
return hidden_states + self.bias
"""


def _is_linear(m: nn.Module) -> bool:
    if is_plain_linear(m):
        return True
    cls = type(m)
    return (cls.__name__ == "FalconLinear" and cls.__module__.startswith("transformers.models.falcon")
            and isinstance(m, nn.Linear) and blocker(m) is None and forward_matches(cls, _FALCON_LINEAR))


def _self_attr(node: ast.AST, name: str) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == name and isinstance(node.value, ast.Name)
            and node.value.id == "self")


def _one_arg_call(node: ast.AST, attr: str) -> ast.AST | None:
    """The argument of ``self.<attr>(arg)``, or None if ``node`` is not exactly that call."""
    if (isinstance(node, ast.Call) and _self_attr(node.func, attr) and len(node.args) == 1 and not node.keywords
            and not isinstance(node.args[0], ast.Starred)):
        return node.args[0]
    return None


def _pair_in(fn: ast.FunctionDef, up: str, act: str) -> bool:
    """``fn`` applies ``self.<act>`` straight to ``self.<up>``'s output, one of the two forms above."""
    for node in ast.walk(fn):
        arg = _one_arg_call(node, act)
        if arg is not None and _one_arg_call(arg, up) is not None:
            return True  # self.act(self.up(e))
        body = getattr(node, "body", None)
        for block in (body, getattr(node, "orelse", None), getattr(node, "finalbody", None)):
            if not isinstance(block, list):
                continue
            for first, second in zip(block, block[1:]):
                if not (isinstance(first, ast.Assign) and isinstance(second, ast.Assign)):
                    continue
                if len(first.targets) != 1 or len(second.targets) != 1:
                    continue
                v, w = first.targets[0], second.targets[0]
                if not (isinstance(v, ast.Name) and isinstance(w, ast.Name) and v.id == w.id):
                    continue
                inner = _one_arg_call(second.value, act)
                if _one_arg_call(first.value, up) is not None and isinstance(inner, ast.Name) and inner.id == v.id:
                    return True  # v = self.up(e); v = self.act(v)
    return False


@functools.lru_cache(maxsize=None)
def _site_problem(cls: type, method: str, up: str, act: str) -> str | None:
    """Why the class's source does not show the pair as the rule needs it, or None when it does."""
    if method not in cls.__dict__ or not inspect.isfunction(inspect.unwrap(cls.__dict__[method])):
        return f"{cls.__name__} does not define {method} itself"
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return "its source cannot be read"
    klass = tree.body[0] if tree.body and isinstance(tree.body[0], ast.ClassDef) else None
    if klass is None:
        return "its source cannot be read"
    uses = {up: [], act: []}
    target = None
    for fn in klass.body:
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name == "__init__":
            continue
        if fn.name == method:
            target = fn
        for node in ast.walk(fn):
            for name in uses:
                if _self_attr(node, name):
                    uses[name].append(fn.name)
    if target is None:
        return f"{method} is not in the class body"
    for name, where in uses.items():
        if where != [method]:
            return f"self.{name} is used {len(where)} times (in {sorted(set(where)) or 'no method'}), not once in {method}"
    if not _pair_in(target, up, act):
        return f"{method} does not apply self.{act} directly and only to self.{up}'s output"
    return None


def _site(m: nn.Module) -> tuple[str, str, str] | None:
    cls = type(m)
    if not cls.__module__.startswith("transformers."):
        return None
    return UP_ACT_SITES.get(cls.__name__)


def _problem(m: nn.Module) -> str | None:
    method, up, act = _site(m)
    up_mod, act_mod = m._modules.get(up), m._modules.get(act)
    if up_mod is None or act_mod is None:
        return f"it has no {up} and {act} children"
    if not _is_linear(up_mod):
        return f"{up} is not a plain nn.Linear ({type(up_mod).__name__})"
    if _fusable_kind(act_mod) is None:
        return f"no fused kernel for activation {type(act_mod).__name__}"
    if blocker(m) is not None:
        return blocker(m)
    return _site_problem(type(m), method, up, act)


def _replace(m: nn.Module) -> nn.Module:
    _, up, act = _site(m)
    new = type(m).__new__(type(m))
    new.__dict__.update(m.__dict__)
    # fresh containers: the copy must not share the original's registries (unswap gives it back intact)
    for key, value in m.__dict__.items():
        if key.startswith("_") and isinstance(value, (dict, set)):
            new.__dict__[key] = copy.copy(value)
    kind = _fusable_kind(m._modules[act])
    new._modules[up] = mark_replaced(Linear.from_linear(m._modules[up], kind), m._modules[up])
    new._modules[act] = mark_replaced(nn.Identity(), m._modules[act])
    return new


HF_UP_ACT_RULE = SwapRule(
    "hf-up-act",
    match=lambda m: _site(m) is not None and _problem(m) is None,
    replace=_replace,
    why_not=lambda m: _problem(m) if _site(m) is not None else None,
)
