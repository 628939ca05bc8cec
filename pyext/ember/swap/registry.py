"""The rules ``ember.swap`` applies: ``SwapRule`` (pattern -> replacement) and the ordered registry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from torch import nn


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


def select(rules: Iterable[SwapRule | str] | SwapRule | str | None) -> list[SwapRule]:
    """The rules a ``swap(rules=...)`` argument names: all registered ones for None."""
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


def _index(name: str, fn: str) -> int:
    for i, r in enumerate(_RULES):
        if r.name == name:
            return i
    raise ValueError(f"ember.{fn}: no rule named {name!r}; registered: {[r.name for r in _RULES]}")
