"""``ember.swap(model)``: replace modules of an existing model, in place, with ember's.

    report = ember.swap(model)        # activations -> ember.nn.GELU/SiLU/ReLU, gated MLPs -> GatedMLP
    print(report)                     # what was replaced, what was skipped and why
    ember.unswap(model)               # put the very same original module objects back

A swap is driven by a registry of ``SwapRule``s (pattern -> replacement). Each family registers its
rules next to its modules with ``register_rule``; the activation rules live here because the
activation modules predate the registry, the gated-MLP rule lives in ``ember/nn/gated_mlp.py``.

How a swap walks the model: top down, trying the rules in registration order on each child module;
the first rule that matches replaces it and the walk does not descend into the replacement (so a
gated MLP is replaced whole, not its activation first). A rule that recognises a module but declines
it says why (``why_not``); if no later rule matches, the report lists the module as skipped with that
reason, and the walk goes on into its children (a gated MLP declined for its activation still has
Linears and an activation that other rules may take).

What a swap keeps:
  - parameters and buffers: replacements reuse the original's submodules (a GatedMLP holds the same
    Linear objects) or have none (activations), so ``state_dict`` keys and tensors are unchanged;
  - the way back: the replacement remembers its original in its ``__dict__`` (not as a submodule, so
    ``parameters()``, ``state_dict()`` and ``.to()`` do not see it) and ``unswap`` restores it;
  - semantics: a rule matches only modules whose math it knows exactly (the exact class, not a
    subclass; no forward hooks, no patched ``forward``), and everything else is left to torch.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

from torch import nn

_ORIGINAL = "_ember_original"  # replacement.__dict__[_ORIGINAL] is the module it replaced
_RULE = "_ember_rule"


# ---------------------------------------------------------------------------------------------
# Rules and the registry.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SwapRule:
    """One pattern -> replacement.

    name     unique name, used in reports and to select rules (``swap(model, rules=[...])``)
    match    module -> bool: True when ``replace`` may swap this module
    replace  module -> the replacement module (may reuse the module's children, never copies them)
    why_not  optional, module -> str | None: for a module ``match`` rejected, the reason to report if
             this rule recognises it but declines (in-place ReLU, an unsupported activation);
             None for modules the rule has nothing to say about
    """

    name: str
    match: Callable[[nn.Module], bool]
    replace: Callable[[nn.Module], nn.Module]
    why_not: Callable[[nn.Module], str | None] | None = None


_RULES: list[SwapRule] = []


def register_rule(rule: SwapRule, *, before: str | None = None) -> SwapRule:
    """Add ``rule`` to the registry: at the end, or just before the rule named ``before``.

    Order matters only when two rules match the same module: the earlier one wins. Rules that
    replace a whole block (gated MLP) go before rules for the leaves inside such blocks.
    """
    if not isinstance(rule, SwapRule):
        raise TypeError(f"ember.register_rule: rule must be a SwapRule, got {type(rule).__name__}")
    if any(r.name == rule.name for r in _RULES):
        raise ValueError(f"ember.register_rule: a rule named {rule.name!r} is already registered")
    if before is None:
        _RULES.append(rule)
    else:
        _RULES.insert(_index(before, "register_rule"), rule)
    return rule


def unregister_rule(name: str) -> SwapRule:
    """Remove and return the rule called ``name``."""
    return _RULES.pop(_index(name, "unregister_rule"))


def registered_rules() -> tuple[SwapRule, ...]:
    """The registered rules, in the order swap tries them."""
    return tuple(_RULES)


def _index(name: str, fn: str) -> int:
    for i, r in enumerate(_RULES):
        if r.name == name:
            return i
    raise ValueError(f"ember.{fn}: no rule named {name!r}; registered: {[r.name for r in _RULES]}")


def _select(rules) -> list[SwapRule]:
    if rules is None:
        return list(_RULES)
    if isinstance(rules, (str, SwapRule)):
        rules = [rules]
    chosen = []
    for r in rules:
        if isinstance(r, SwapRule):
            chosen.append(r)
        elif isinstance(r, str):
            chosen.append(_RULES[_index(r, "swap")])
        else:
            raise TypeError(f"ember.swap: rules must hold SwapRule objects or rule names, got {type(r).__name__}")
    return chosen


# ---------------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Replaced:
    name: str  # qualified name in the model ("model.layers.0.mlp")
    before: type  # class of the module that was there
    after: type  # class of the module put there
    rule: str


@dataclass(frozen=True)
class Skipped:
    name: str
    cls: type
    reason: str


def class_name(cls: type) -> str:
    """A short public name: ``nn.GELU``, ``ember.nn.GatedMLP``, ``transformers.LlamaMLP``."""
    mod = cls.__module__
    if mod.startswith("torch.nn."):
        return f"nn.{cls.__qualname__}"
    if mod.startswith("ember.nn"):
        return f"ember.nn.{cls.__qualname__}"
    return f"{mod.split('.')[0]}.{cls.__qualname__}"


@dataclass
class SwapReport:
    """What ``swap`` (or ``unswap``) did: ``replaced`` and ``skipped`` entries, in model order."""

    action: str  # "swap" or "unswap"
    replaced: list[Replaced] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def counts(self) -> dict[tuple[str, str], int]:
        """{(before class name, after class name): how many}."""
        out: dict[tuple[str, str], int] = defaultdict(int)
        for r in self.replaced:
            out[(class_name(r.before), class_name(r.after))] += 1
        return dict(out)

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        verb = "replaced" if self.action == "swap" else "restored"
        lines = [f"ember.{self.action}: {verb} {len(self.replaced)} module(s), skipped {len(self.skipped)}"]
        groups: dict[tuple, list[str]] = defaultdict(list)
        for r in self.replaced:
            groups[(class_name(r.before), class_name(r.after), r.rule)].append(r.name)
        for (before, after, rule), names in groups.items():
            tag = f"  [{rule}]" if rule else ""
            lines.append(f"  {len(names)} x {before} -> {after}{tag}: {_names(names)}")
        why: dict[tuple, list[str]] = defaultdict(list)
        for s in self.skipped:
            why[(class_name(s.cls), s.reason)].append(s.name)
        for (cls, reason), names in why.items():
            lines.append(f"  skipped {len(names)} x {cls} ({reason}): {_names(names)}")
        return "\n".join(lines)


def _names(names: list[str], shown: int = 3) -> str:
    text = ", ".join(n or "<root>" for n in names[:shown])
    return text + (f", ... (+{len(names) - shown})" if len(names) > shown else "")


# ---------------------------------------------------------------------------------------------
# swap / unswap.
# ---------------------------------------------------------------------------------------------
def _blocker(module: nn.Module) -> str | None:
    """Why a matching module still cannot be swapped without changing behaviour, or None."""
    if "forward" in module.__dict__:
        return "its forward is patched on the instance (e.g. by accelerate); swapping would drop that"
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    if any(getattr(module, h, None) for h in hooks):
        return "it has forward/backward hooks, which the replacement would not run"
    return None


def swap(
    model: nn.Module,
    *,
    rules: Iterable[SwapRule | str] | None = None,
    filter: Callable[[str, nn.Module], bool] | None = None,  # noqa: A002  (the public name)
) -> SwapReport:
    """Replace ``model``'s submodules in place with ember's; return a ``SwapReport``.

    rules   which rules to apply (SwapRule objects or registered names); default: all registered
    filter  ``(qualified_name, module) -> bool``; a matching module is swapped only when it returns
            True (others are reported as skipped), e.g. ``lambda name, m: ".layers.0." not in name``

    Modules swapped earlier are skipped, so swapping twice changes nothing. ``model`` itself is never
    replaced (there is no parent to put the replacement in); swap its parent instead.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ember.swap: model must be a torch.nn.Module, got {type(model).__name__}")
    active = _select(rules)
    report = SwapReport("swap")
    done: dict[int, nn.Module] = {}  # id(original) -> replacement, so a shared module stays shared
    visited: set[int] = set()

    def decide(name: str, module: nn.Module):
        """The replacement for ``module`` or None; records skips."""
        if _ORIGINAL in module.__dict__:
            report.skipped.append(Skipped(name, type(module), "already swapped"))
            return None, None
        declined = None  # the first reason a rule gave for not matching; reported if none matches
        for rule in active:
            if not rule.match(module):
                if declined is None and rule.why_not is not None:
                    declined = rule.why_not(module)
                continue
            reason = _blocker(module)
            if reason is None and filter is not None and not filter(name, module):
                reason = "excluded by filter"
            if reason is not None:
                report.skipped.append(Skipped(name, type(module), reason))
                return None, None
            new = rule.replace(module)
            new.train(module.training)
            object.__setattr__(new, _ORIGINAL, module)  # remembered, not registered as a submodule
            object.__setattr__(new, _RULE, rule.name)
            return new, rule.name
        if declined:
            report.skipped.append(Skipped(name, type(module), declined))
        return None, None

    def walk(parent: nn.Module, prefix: str) -> None:
        for key, child in list(parent._modules.items()):
            if child is None:
                continue
            name = f"{prefix}.{key}" if prefix else key
            if id(child) in done:
                new = done[id(child)]
                parent._modules[key] = new
                report.replaced.append(Replaced(name, type(child), type(new), new.__dict__[_RULE]))
                continue
            if id(child) in visited:
                continue
            visited.add(id(child))
            new, rule_name = decide(name, child)
            if new is None:
                if _ORIGINAL not in child.__dict__:
                    walk(child, name)
                continue
            done[id(child)] = new
            parent._modules[key] = new
            report.replaced.append(Replaced(name, type(child), type(new), rule_name))

    if _ORIGINAL in model.__dict__:
        report.skipped.append(Skipped("", type(model), "already swapped"))
        return report
    for rule in active:
        if rule.match(model):
            report.skipped.append(Skipped("", type(model), "the root module cannot be replaced in place; swap its parent"))
            return report
    walk(model, "")
    return report


def unswap(model: nn.Module) -> SwapReport:
    """Undo ``swap``: put back the original module objects (the same objects, not copies).

    The original gets the replacement's current training mode and current children (a GatedMLP's
    Linears are the original's own objects anyway; this keeps any later change to them).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ember.unswap: model must be a torch.nn.Module, got {type(model).__name__}")
    report = SwapReport("unswap")
    if _ORIGINAL in model.__dict__:
        report.skipped.append(Skipped("", type(model), "the root module cannot be restored in place; unswap its parent"))
        return report
    visited: set[int] = set()

    def walk(parent: nn.Module, prefix: str) -> None:
        for key, child in list(parent._modules.items()):
            if child is None:
                continue
            name = f"{prefix}.{key}" if prefix else key
            original = child.__dict__.get(_ORIGINAL)
            if original is None:
                if id(child) not in visited:
                    visited.add(id(child))
                    walk(child, name)
                continue
            for sub, mod in child._modules.items():
                # Keep later changes to shared children; a child that is itself the replacement of
                # the original's child (a fused Linear inside a swapped block) is not copied back.
                if sub in original._modules and original._modules[sub] is not mod:
                    if mod is None or mod.__dict__.get(_ORIGINAL) is not original._modules[sub]:
                        original._modules[sub] = mod
            original.train(child.training)
            parent._modules[key] = original
            report.replaced.append(Replaced(name, type(child), type(original), child.__dict__.get(_RULE, "")))

    walk(model, "")
    return report


def original_of(module: nn.Module) -> nn.Module | None:
    """The module a swap replaced with ``module``, or None if ``module`` is not a replacement."""
    return module.__dict__.get(_ORIGINAL)


# ---------------------------------------------------------------------------------------------
# What an activation module computes, by exact class (a subclass may override forward).
# ---------------------------------------------------------------------------------------------
_TORCH_ACTS = {nn.GELU: None, nn.SiLU: "silu", nn.ReLU: "relu"}  # GELU: from .approximate

# Elementwise torch activations ember has no kernel for: reported, not swapped.
_TORCH_UNSUPPORTED = (
    nn.CELU, nn.ELU, nn.GLU, nn.Hardshrink, nn.Hardsigmoid, nn.Hardswish, nn.Hardtanh, nn.LeakyReLU,
    nn.LogSigmoid, nn.Mish, nn.PReLU, nn.ReLU6, nn.RReLU, nn.SELU, nn.Sigmoid, nn.Softplus, nn.Softshrink,
    nn.Softsign, nn.Tanh, nn.Tanhshrink, nn.Threshold,
)

_HF_MODULE = "transformers.activations"

# transformers.activations classes (checked against transformers 5.23 sources) whose forward is
# exactly one of ember's formulas. Values: the ember activation, or a function of the instance for
# classes whose forward goes through an instance attribute.
#   GELUActivation         F.gelu, or x/2 (1 + erf(x/sqrt 2)) when use_gelu_python        -> gelu
#   GELUTanh (PytorchGELUTanh is the same class)  F.gelu(tanh), or its python formula      -> gelu_tanh
#   NewGELUActivation      0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))                  -> gelu_tanh
#   AccurateGELUActivation the same, with sqrt(2/pi) precomputed in an attribute            -> gelu_tanh
#   FastGELUActivation     0.5 x (1 + tanh(0.7978845608 x (1 + 0.044715 x^2))): the same
#                          polynomial, and 0.7978845608 is sqrt(2/pi) to 10 decimals (off by 2.9e-12,
#                          the same float32, bfloat16 and float16 value)                    -> gelu_tanh
#   SiLUActivation         F.silu                                                            -> silu
# Not swapped: QuickGELU (x sigmoid(1.702 x): another function), ClippedGELU (clamps), and the rest.
_HF_UNSUPPORTED = {
    "QuickGELUActivation": "quick_gelu is x*sigmoid(1.702x), not one of ember's gelu formulas",
    "ClippedGELUActivation": "gelu clipped to [min, max]; ember has no clipped gelu",
}


def _is_method(fn, m, name: str) -> bool:
    """``fn`` is ``m.<name>`` as the class defines it (a bound method of the class's function)."""
    own = type(m).__dict__.get(name)
    return own is not None and getattr(fn, "__func__", None) is own


def _hf_gelu(m) -> str | None:
    act = getattr(m, "act", None)
    if act is nn.functional.gelu or _is_method(act, m, "_gelu_python"):
        return "gelu"
    return None


def _hf_gelu_tanh(m) -> str | None:
    act = getattr(m, "act", None)
    if _is_method(act, m, "_gelu_tanh_python"):
        return "gelu_tanh"
    if getattr(act, "func", None) is nn.functional.gelu and not act.args and act.keywords == {"approximate": "tanh"}:
        return "gelu_tanh"
    return None


def _hf_accurate(m) -> str | None:
    return "gelu_tanh" if getattr(m, "precomputed_constant", None) == math.sqrt(2 / math.pi) else None


_HF_ACTS = {
    "GELUActivation": _hf_gelu,
    "GELUTanh": _hf_gelu_tanh,
    "NewGELUActivation": "gelu_tanh",
    "AccurateGELUActivation": _hf_accurate,
    "FastGELUActivation": "gelu_tanh",
    "SiLUActivation": "silu",
}


def _hf_class_intact(cls: type) -> bool:
    """The class's forward is still the one transformers defines (not replaced by a kernel hub)."""
    fwd = cls.__dict__.get("forward")
    return getattr(fwd, "__qualname__", "") == f"{cls.__name__}.forward" and getattr(fwd, "__module__", "") == _HF_MODULE


def activation_kind(module: nn.Module) -> str | None:
    """"relu", "silu", "gelu" or "gelu_tanh" when ``module`` computes exactly that, else None.

    Knows torch's nn.GELU/SiLU/ReLU and transformers' activation classes (by exact class; looked
    up by module name, so transformers is never imported here). In-place variants count: the
    caller decides whether in-place matters.
    """
    cls = type(module)
    if cls in _TORCH_ACTS:
        return _TORCH_ACTS[cls] or ("gelu" if module.approximate == "none" else "gelu_tanh")
    if cls.__module__ == _HF_MODULE and cls.__name__ in _HF_ACTS and _hf_class_intact(cls):
        kind = _HF_ACTS[cls.__name__]
        return kind(module) if callable(kind) else kind
    return None


def _ember_activation(kind: str) -> nn.Module:
    from .nn.activation import GELU, ReLU, SiLU

    if kind == "gelu":
        return GELU()
    if kind == "gelu_tanh":
        return GELU(approximate="tanh")
    if kind == "silu":
        return SiLU()
    return ReLU()


def _torch_match(m: nn.Module) -> bool:
    return type(m) in _TORCH_ACTS and not getattr(m, "inplace", False)


def _torch_why_not(m: nn.Module) -> str | None:
    cls = type(m)
    if cls in _TORCH_ACTS and getattr(m, "inplace", False):
        return "inplace=True: ember's kernels write a new tensor, so in-place activations stay with torch"
    if cls in _TORCH_UNSUPPORTED:
        return "no ember kernel for this activation"
    if cls not in _TORCH_ACTS and not cls.__module__.startswith("ember."):
        for base in _TORCH_ACTS:
            if isinstance(m, base):
                return f"a subclass of nn.{base.__name__}, whose forward may differ"
    return None


def _hf_match(m: nn.Module) -> bool:
    return type(m).__module__ == _HF_MODULE and activation_kind(m) is not None


def _hf_why_not(m: nn.Module) -> str | None:
    cls = type(m)
    if cls.__module__ != _HF_MODULE:
        return None
    if cls.__name__ in _HF_UNSUPPORTED:
        return _HF_UNSUPPORTED[cls.__name__]
    if cls.__name__ in _HF_ACTS:
        return "its forward or activation function was changed from transformers' own"
    return "no ember kernel for this activation"


TORCH_ACTIVATIONS = register_rule(
    SwapRule(
        "torch-activations",
        match=_torch_match,
        replace=lambda m: _ember_activation(activation_kind(m)),
        why_not=_torch_why_not,
    )
)
HF_ACTIVATIONS = register_rule(
    SwapRule(
        "hf-activations",
        match=_hf_match,
        replace=lambda m: _ember_activation(activation_kind(m)),
        why_not=_hf_why_not,
    )
)
