"""``swap`` and ``unswap``: walk a model, apply the registered rules, and put the originals back.

How a swap walks the model: top down, trying the rules in registration order on each child module;
the first rule that matches replaces it and the walk does not descend into the replacement (so a
gated MLP is replaced whole, not its activation first). A rule that recognises a module but declines
it says why (``why_not``); if no later rule matches, the report lists the module as skipped with that
reason, and the walk goes on into its children (a gated MLP declined for its activation still has
Linears and an activation that other rules may take).
"""
from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

from . import activations as activations_rules
from . import causal_lm
from .registry import SwapRule, select
from .report import Replaced, Skipped, SwapReport

_ORIGINAL = "_ember_original"  # replacement.__dict__[_ORIGINAL] is the module it replaced
_RULE = "_ember_rule"


def mark_replaced(new: nn.Module, original: nn.Module) -> nn.Module:
    """Record ``original`` on a child a rule replaced inside the block it builds, so that ``unswap``
    restores the block's own child instead of copying the replacement into it."""
    object.__setattr__(new, _ORIGINAL, original)  # remembered, not registered as a submodule
    return new


def blocker(module: nn.Module) -> str | None:
    """Why a matching module still cannot be swapped without changing behaviour, or None."""
    if "forward" in module.__dict__:
        return "its forward is patched on the instance (e.g. by accelerate); swapping would drop that"
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    if any(getattr(module, h, None) for h in hooks):
        return "it has forward/backward hooks, which the replacement would not run"
    return None


def is_transformers_class(module: nn.Module, names) -> bool:
    """``module``'s exact class is one of ``names`` and comes from transformers."""
    cls = type(module)
    return cls.__name__ in names and cls.__module__.startswith("transformers.")


def is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear itself (not a subclass, quantized or LoRA layer) that nothing hooks into."""
    return type(module) is nn.Linear and blocker(module) is None


def swap(
    model: nn.Module,
    *,
    rules: Iterable[SwapRule | str] | None = None,
    filter: Callable[[str, nn.Module], bool] | None = None,  # noqa: A002  (the public name)
    fused_loss: bool = True,
    activations: bool | str = "auto",
) -> SwapReport:
    """Replace ``model``'s submodules in place with ember's; return a ``SwapReport``.

    rules   which rules to apply (SwapRule objects or registered names); default: all registered
    filter  ``(qualified_name, module) -> bool``; a matching module is swapped only when it returns
            True (others are reported as skipped), e.g. ``lambda name, m: ".layers.0." not in name``
    fused_loss  also give transformers' causal LMs (``*ForCausalLM``, GPT-2) the fused linear +
            cross-entropy training loss (``swap/causal_lm.py``: the logits are never stored); the
            model itself may be one, as it usually is
    activations  lone activation modules (not part of a fused block): "auto" replaces one only where
            ember's kernel measured faster than torch's on the model's device (a swap never makes a
            model slower; swap/activations.py has the table), True always, False never

    Modules swapped earlier are skipped, so swapping twice changes nothing. ``model`` itself is never
    replaced (there is no parent to put the replacement in); swap its parent instead.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ember.swap: model must be a torch.nn.Module, got {type(model).__name__}")
    active = select(rules)
    first = next(iter(model.parameters()), None)
    policy = activations_rules.lone_policy(activations, first.device.type if first is not None else "cpu")
    with activations_rules.use_lone_policy(policy):
        return _swap(model, active, filter, fused_loss)


def _swap(model: nn.Module, active: list[SwapRule], filter, fused_loss: bool) -> SwapReport:  # noqa: A002
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
            reason = blocker(module)
            if reason is None and filter is not None and not filter(name, module):
                reason = "excluded by filter"
            if reason is not None:
                report.skipped.append(Skipped(name, type(module), reason))
                return None, None
            new = rule.replace(module)
            new.train(module.training)
            mark_replaced(new, module)
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
    if fused_loss:
        causal_lm.patch(model, report, filter)
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
    causal_lm.unpatch(model, report)
    return report


def original_of(module: nn.Module) -> nn.Module | None:
    """The module a swap replaced with ``module``, or None if ``module`` is not a replacement."""
    return module.__dict__.get(_ORIGINAL)
