"""``ember.quantize(model)``: int8 inference for every ``nn.Linear`` of a model, in place.

    report = ember.quantize(model, mode="w8a8")          # dynamic W8A8 (per-token x per-channel)
    report = ember.quantize(model, mode="w8a16", group_size=128)   # weight-only, grouped scales
    with ember.quant.calibrate(model):                   # optional, for SmoothQuant smoothing:
        model(**representative_batch)                    # records per-input-channel max|x|
    ember.quantize(model, mode="w8a8")                   # ...then used here

Smoothing (SmoothQuant, Xiao et al. 2022): outlier activation channels make per-token scales coarse for
every other channel. With s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), x @ W.T == (x / s) @ (W * s).T:
the weight absorbs the outliers (W * s is quantized) and the activations are divided by s at run time.
Here the division is a per-channel multiply fused into the quantization pass of each Int8Linear, which
works for any model. Where the Linears' input is provably the output of a norm that feeds them alone
(q/k/v after ``input_layernorm``, gate/up after ``post_attention_layernorm`` of known pre-norm decoder
layers: Llama, Mistral, Qwen2/3, Gemma; see ``ember/smooth_fold.py``), the group shares one s, 1/s is
folded into the norm's weight and those Int8Linears do no run-time multiply (``fold_smoothing=True``,
the default; the folded norms are listed in ``QuantReport.folded``).

Quantization is a swap (see ``ember.swap``): one SwapRule made per call from the arguments, applied with
``swap(model, rules=[rule], filter=filter)``. The rule is not in the global registry on purpose: a plain
``ember.swap(model)`` must never change a model's numerics. The float weights are released (the
replacement does not remember its original), so ``ember.unswap`` cannot undo a quantization.

A quantized model reloads without its float weights: build the model (on the meta device if its buffers
allow), ``ember.quantize`` it with the same arguments, then ``load_state_dict(quantized_sd, assign=True)``.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .nn.int8_linear import Int8Linear
from .smooth_fold import find_groups, fold
from .swap import SwapReport, SwapRule, swap

_STATS: "weakref.WeakKeyDictionary[nn.Linear, torch.Tensor]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def calibrate(model: nn.Module):
    """Record per-input-channel max|x| of every ``nn.Linear`` in ``model`` while the block runs.

    The statistics live beside the layers (a weak map) until ``ember.quantize`` uses them; calibrating
    again accumulates (running max)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"ember.quant.calibrate: model must be an nn.Module, got {type(model).__name__}")

    def hook(mod, args):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.shape[-1] != mod.in_features:
            return
        with torch.no_grad():
            xf = x.detach().reshape(-1, x.shape[-1]).float().abs()
            xf = torch.nan_to_num(xf, nan=0.0, posinf=0.0)
            amax = xf.amax(0) if xf.shape[0] else xf.new_zeros(x.shape[-1])
            prev = _STATS.get(mod)
            _STATS[mod] = amax if prev is None else torch.maximum(prev, amax.to(prev.device))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if type(m) is nn.Linear]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def activation_stats(linear: nn.Linear) -> torch.Tensor | None:
    """The per-input-channel max|x| recorded for ``linear`` by ``calibrate``, or None."""
    return _STATS.get(linear)


def smoothing_factors(act_amax: torch.Tensor, weight, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^alpha / max|W_j|^(1-alpha), clamped away from 0 and inf; channels
    never seen active (max|X_j| = 0) keep s_j = 1. ``weight`` may be a list of weights reading the same
    input (a folded group): max|W_j| is then taken over all of them."""
    weights = [weight] if isinstance(weight, torch.Tensor) else list(weight)
    w_amax = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    a = act_amax.float().to(w_amax.device)
    s = a.clamp(min=1e-5).pow(alpha) / w_amax.pow(1.0 - alpha)
    s = torch.where(a > 0, s, torch.ones_like(s))
    return s.clamp(min=1e-4, max=1e4)


@dataclass
class QuantReport:
    mode: str
    group_size: int | None
    converted: list[str] = field(default_factory=list)
    smoothed: list[str] = field(default_factory=list)
    folded: dict[str, list[str]] = field(default_factory=dict)  # norm -> the Linears whose 1/s it took
    skipped: list[tuple[str, str]] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0  # every byte the quantized layers hold, the CPU kernel's packed copies included
    bytes_packed: int = 0  # of which: the packed weight copies the CPU W8A8 kernel reads (Int8Linear.weight_packed)

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def __len__(self) -> int:
        return len(self.converted)

    def __str__(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        lines = [
            f"ember.quantize(mode={self.mode!r}{g}): {len(self.converted)} Linear layers -> Int8Linear"
            f" ({len(self.smoothed)} smoothed, {sum(map(len, self.folded.values()))} of them folded into"
            f" {len(self.folded)} norms); {self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB"
            f" ({self.bytes_saved / 2**20:.2f} MiB saved)"
            + (f"; the after includes {self.bytes_packed / 2**20:.2f} MiB of packed weight copies the CPU kernel"
               " reads (not saved in the state_dict)" if self.bytes_packed else "")
        ]
        for name, why in self.skipped:
            lines.append(f"  skipped {name or '<root>'}: {why}")
        return "\n".join(lines)


def _why_not(m: nn.Module, group_size: int | None) -> str | None:
    if type(m) is not nn.Linear:
        return None
    if m.in_features == 0 or m.out_features == 0:
        return "empty layer"
    if m.weight.is_meta:
        return None
    if not m.weight.is_floating_point():
        return f"weight dtype {m.weight.dtype} is not floating point"
    if group_size is not None and m.in_features % group_size:
        return f"in_features={m.in_features} is not a multiple of group_size={group_size}"
    if not torch.isfinite(m.weight).all():
        return "weight holds NaN or Inf"
    return None


def quantize(
    model: nn.Module,
    mode: str = "w8a8",
    *,
    group_size: int | None = None,
    filter=None,  # noqa: A002  (same name as ember.swap's)
    smooth_alpha: float = 0.5,
    use_calibration: bool = True,
    fold_smoothing: bool = True,
) -> QuantReport:
    """Replace every ``nn.Linear`` in ``model`` (not the root) with an ``ember.nn.Int8Linear``, in place.

    mode         "w8a8" (dynamic per-token activations) or "w8a16" (weight-only)
    group_size   None: one scale per output channel; an int: per group of input channels
    filter       ``(qualified_name, module) -> bool``: only layers it accepts are converted
                 (e.g. ``lambda n, m: "lm_head" not in n``)
    smooth_alpha SmoothQuant migration strength, used for w8a8 layers that ``calibrate`` saw
    fold_smoothing  fold 1/s into the preceding norm where that is provably exact (see module doc);
                 False: every smoothed layer multiplies its input by 1/s at run time
    """
    from .ops.int8 import MODES

    if not isinstance(model, nn.Module):
        raise TypeError(f"ember.quantize: model must be an nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"ember.quantize: mode must be one of {MODES}, got {mode!r}")
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0):
        raise ValueError(f"ember.quantize: group_size must be None or a positive int, got {group_size!r}")
    if not 0.0 <= smooth_alpha <= 1.0:
        raise ValueError(f"ember.quantize: smooth_alpha must be in [0, 1], got {smooth_alpha}")
    report = QuantReport(mode, group_size)
    names = {id(m): n for n, m in model.named_modules()}
    smoothing = use_calibration and mode == "w8a8"
    folded: set[int] = set()
    if smoothing and fold_smoothing:
        with torch.no_grad():
            folded = _fold_groups(model, report, group_size, filter, smooth_alpha)

    def replace(m: nn.Linear) -> Int8Linear:
        # A folded Linear's weight already holds s and its input is already divided by s.
        stats = _STATS.get(m) if (smoothing and id(m) not in folded) else None
        s = smoothing_factors(stats, m.weight, smooth_alpha) if stats is not None else None
        new = Int8Linear.from_linear(m, mode, group_size=group_size, smooth=s)
        report.bytes_before += sum(t.numel() * t.element_size() for t in (m.weight, m.bias) if t is not None)
        report.bytes_after += new.nbytes() + new.cpu_packed_nbytes()
        report.bytes_packed += new.cpu_packed_nbytes()
        if s is not None or id(m) in folded:
            report.smoothed.append(names.get(id(m), "?"))
        return new

    rule = SwapRule(
        f"int8-{mode}",
        match=lambda m: _why_not(m, group_size) is None and type(m) is nn.Linear,
        replace=replace,
        why_not=lambda m: _why_not(m, group_size),
    )
    with torch.no_grad():
        swapped: SwapReport = swap(model, rules=[rule], filter=filter)
    for r in swapped.replaced:
        report.converted.append(r.name)
    for sk in swapped.skipped:
        report.skipped.append((sk.name, sk.reason))
    # Release the float layers: the swap remembers originals for unswap, which would keep every float
    # weight alive and save no memory.
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.__dict__.pop("_ember_original", None)
    return report


def _fold_groups(model: nn.Module, report: QuantReport, group_size, filter, alpha: float) -> set[int]:  # noqa: A002
    """Fold smoothing into every recognised norm whose Linears were all calibrated and will all be
    converted; returns the ids of those Linears. The float model stays exactly equivalent (up to
    rounding), so a Linear the swap then does not convert still computes the right thing."""
    out: set[int] = set()
    for g in find_groups(model):
        stats = [_STATS.get(lin) for lin in g.linears]
        if any(st is None for st in stats) or g.norm.weight.is_meta or not g.norm.weight.is_floating_point():
            continue
        if any(_why_not(lin, group_size) is not None or (filter is not None and not filter(n, lin))
               for n, lin in zip(g.names, g.linears)):
            continue
        # All members read the same tensor; the max only guards against partial calibration runs.
        amax = torch.stack([st.to(stats[0].device) for st in stats]).amax(0)
        s = smoothing_factors(amax, [lin.weight for lin in g.linears], alpha)
        fold(g, s)
        report.folded[g.norm_name] = list(g.names)
        out.update(id(lin) for lin in g.linears)
    return out
