"""GatedMLP: ``down_proj(act(gate_proj(x)) * up_proj(x))`` with the activation and product fused.

The Llama / Mistral / Qwen / Gemma feed-forward block. Eager transformers runs it as three matmuls
plus two elementwise kernels (act, then multiply) with an intermediate tensor between them; here
gate_proj and up_proj run as one ``ember.ops.gated_linear`` op (one GEMM pass over x with two weight
pointers, the gating in its epilogue; no concatenated weight is built or cached, so optimizer updates
to either projection are seen at once), then down_proj. Projections that are not plain nn.Linear
(quantized, LoRA-wrapped, hooked) fall back to two calls and the fused ``swiglu`` / ``geglu``.

Attribute names match transformers' (gate_proj, up_proj, down_proj), so a GatedMLP made by
``from_module`` (or by ``ember.swap``) holds the original Linear objects and the model's state_dict is
unchanged. The swap rule for these blocks is registered at the bottom of this file.
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap

import torch
from torch import nn

from .. import ops
from ..swapping import SwapRule, activation_kind, register_rule

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_PROJS = ("gate_proj", "up_proj", "down_proj")


class GatedMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``, act one of "silu" (SwiGLU), "gelu", "gelu_tanh"."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        bias: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.activation = _check_activation(activation)
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    @classmethod
    def from_module(cls, mlp: nn.Module, activation: str | None = None) -> "GatedMLP":
        """A GatedMLP sharing ``mlp``'s gate_proj, up_proj and down_proj objects (no copies).

        The activation is read from ``mlp.act_fn`` (torch or transformers GELU/SiLU classes) unless
        given. The caller vouches that ``mlp`` computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``;
        ``ember.swap`` checks that from the class's source before it calls this.
        """
        for attr in _PROJS:
            if not isinstance(getattr(mlp, attr, None), nn.Module):
                raise ValueError(
                    f"ember.nn.GatedMLP.from_module: mlp must have a module attribute {attr!r}, "
                    f"{type(mlp).__name__} has none"
                )
        if activation is None:
            kind = activation_kind(getattr(mlp, "act_fn", None))
            if kind not in ACTIVATIONS:
                raise ValueError(
                    f"ember.nn.GatedMLP.from_module: mlp.act_fn must compute one of {ACTIVATIONS}, got "
                    f"{type(getattr(mlp, 'act_fn', None)).__name__}; pass activation= to override"
                )
            activation = kind
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.activation = _check_activation(activation)
        for attr in _PROJS:
            setattr(new, attr, getattr(mlp, attr))
        new.train(mlp.training)
        return new

    @property
    def hidden_size(self) -> int | None:
        return getattr(self.gate_proj, "in_features", None)

    @property
    def intermediate_size(self) -> int | None:
        return getattr(self.gate_proj, "out_features", None)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    def _fusable(self) -> bool:
        # The single-pass op reads the two projections' parameters directly, so it stands in for
        # them only when they are plain nn.Linear modules (not quantized or LoRA-wrapped
        # replacements) that nothing hooks into.
        return all(
            type(p) is nn.Linear
            and "forward" not in p.__dict__
            and not (p._forward_hooks or p._forward_pre_hooks or p._backward_hooks or p._backward_pre_hooks)
            for p in (self.gate_proj, self.up_proj)
        ) and ((self.gate_proj.bias is None) == (self.up_proj.bias is None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fusable():
            # gate and up projections in one GEMM pass, act(gate) * up in its epilogue.
            g, u = self.gate_proj, self.up_proj
            h = ops.gated_linear(x, g.weight, u.weight, g.bias, u.bias, activation=self.activation)
            return self.down_proj(h)
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.activation == "silu":
            h = ops.swiglu(gate, up)
        else:
            h = ops.geglu(gate, up, approximate="none" if self.activation == "gelu" else "tanh")
        return self.down_proj(h)


def _check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"ember.nn.GatedMLP: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


# ---------------------------------------------------------------------------------------------
# The swap rule: transformers' gated MLP classes whose forward is exactly the formula above.
# ---------------------------------------------------------------------------------------------
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

_EXPECTED = "self.down_proj(self.act_fn(self.gate_proj({x})) * self.up_proj({x}))"
_EXPECTED_SWAPPED = "self.down_proj(self.up_proj({x}) * self.act_fn(self.gate_proj({x})))"


@functools.lru_cache(maxsize=None)
def _forward_is_gated(cls: type) -> bool:
    """True when ``cls.forward`` is, statement for statement, ``return <the formula>`` (optionally
    through one local variable), with a single input argument."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return False  # no source to check: do not guess
    fn = tree.body[0] if tree.body else None
    if not isinstance(fn, ast.FunctionDef) or fn.decorator_list:
        return False
    a = fn.args
    if a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs or a.defaults or len(a.args) != 2:
        return False
    x = a.args[1].arg
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if len(body) == 1 and isinstance(body[0], ast.Return):
        expr = body[0].value
    elif (
        len(body) == 2
        and isinstance(body[0], ast.Assign)
        and len(body[0].targets) == 1
        and isinstance(body[0].targets[0], ast.Name)
        and isinstance(body[1], ast.Return)
        and isinstance(body[1].value, ast.Name)
        and body[1].value.id == body[0].targets[0].id
    ):
        expr = body[0].value
    else:
        return False
    got = ast.dump(expr)
    return any(got == ast.dump(ast.parse(e.format(x=x), mode="eval").body) for e in (_EXPECTED, _EXPECTED_SWAPPED))


def _problem(m: nn.Module) -> str | None:
    """Why a module of a listed class cannot become a GatedMLP, or None when it can."""
    if set(m._modules) != {*_PROJS, "act_fn"} or any(v is None for v in m._modules.values()):
        return f"children {sorted(m._modules)} are not exactly gate_proj, up_proj, down_proj, act_fn"
    if m._parameters or m._buffers:
        return "it has parameters or buffers of its own"
    kind = activation_kind(m.act_fn)
    if kind not in ACTIVATIONS:
        return f"act_fn {type(m.act_fn).__name__} is not silu, gelu or gelu_tanh"
    act = m.act_fn
    if "forward" in act.__dict__ or act._forward_hooks or act._forward_pre_hooks:
        return "act_fn has hooks or a patched forward, which GatedMLP would not run"
    if not _forward_is_gated(type(m)):
        return "its forward is not exactly down_proj(act_fn(gate_proj(x)) * up_proj(x))"
    return None


def _listed(m: nn.Module) -> bool:
    cls = type(m)
    return cls.__name__ in GATED_MLP_CLASSES and cls.__module__.startswith("transformers.")


GATED_MLP_RULE = register_rule(
    SwapRule(
        "gated-mlp",
        match=lambda m: _listed(m) and _problem(m) is None,
        replace=GatedMLP.from_module,
        why_not=lambda m: _problem(m) if _listed(m) else None,
    ),
    before="torch-activations",  # whole blocks before the activations inside them
)
