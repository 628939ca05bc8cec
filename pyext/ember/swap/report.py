"""``SwapReport``: what ``swap`` or ``unswap`` replaced and what it skipped, and why."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


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
