"""The activation rules: torch's and transformers' activation modules -> ember.nn activations.

``activation_kind(module)`` says which of ember's activations a module computes exactly (by exact
class, and for transformers' classes by the source of their forward); ``EMBER_MODULES`` says which
ember module computes each kind. The Linear and gated-MLP rules use ``activation_kind`` too, to know
what they may fuse.

A new activation ember has a module for is one entry in ``EMBER_MODULES``, plus an entry in
``_TORCH_ACTS`` or ``_HF_ACTS`` for each torch or transformers class that computes it.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..nn.activation import GELU, ReLU, ReLU2, SiLU
from .forward import body_matches, forward_matches, method_matches
from .registry import SwapRule

# activation kind -> a new ember module computing it: the one table the activation rules build from.
EMBER_MODULES: dict[str, Callable[[], nn.Module]] = {
    "relu": ReLU,
    "silu": SiLU,
    "gelu": GELU,
    "gelu_tanh": functools.partial(GELU, approximate="tanh"),
    "relu2": ReLU2,
}

# ---------------------------------------------------------------------------------------------
# torch.nn classes, by exact class (a subclass may override forward).
# ---------------------------------------------------------------------------------------------
_TORCH_ACTS: dict[type, Callable[[nn.Module], str]] = {
    nn.GELU: lambda m: "gelu" if m.approximate == "none" else "gelu_tanh",
    nn.SiLU: lambda m: "silu",
    nn.ReLU: lambda m: "relu",
}

# Elementwise torch activations ember has no kernel for: reported, not swapped.
_TORCH_UNSUPPORTED = (
    nn.CELU, nn.ELU, nn.GLU, nn.Hardshrink, nn.Hardsigmoid, nn.Hardswish, nn.Hardtanh, nn.LeakyReLU,
    nn.LogSigmoid, nn.Mish, nn.PReLU, nn.ReLU6, nn.RReLU, nn.SELU, nn.Sigmoid, nn.Softplus, nn.Softshrink,
    nn.Softsign, nn.Tanh, nn.Tanhshrink, nn.Threshold,
)

# ---------------------------------------------------------------------------------------------
# transformers.activations classes, by class name in that module (so transformers is never imported
# here) and by their forward's source, as transformers 5.23/5.24 write it: a class whose forward a
# kernel hub or a later release changed is left alone.
# ---------------------------------------------------------------------------------------------
_HF_MODULE = "transformers.activations"


@dataclass(frozen=True)
class _HFActivation:
    forward: str  # the body of the class's forward; {x} is its input
    kind: str | Callable[[nn.Module], str | None]  # the kind, or a function of the instance


# GELUActivation and GELUTanh call ``self.act``: F.gelu (with approximate="tanh" for GELUTanh) or a
# bound method holding the python formula, checked here against its source like a forward.
_GELU_PYTHON = "return {x} * 0.5 * (1.0 + torch.erf({x} / math.sqrt(2.0)))"
_GELU_TANH_PYTHON = "return {x} * 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * ({x} + 0.044715 * torch.pow({x}, 3.0))))"


def _python_formula(act, template: str) -> bool:
    return inspect.ismethod(act) and method_matches(act, template)


def _gelu_act(m: nn.Module) -> str | None:
    act = getattr(m, "act", None)
    return "gelu" if act is nn.functional.gelu or _python_formula(act, _GELU_PYTHON) else None


def _gelu_tanh_act(m: nn.Module) -> str | None:
    act = getattr(m, "act", None)
    if _python_formula(act, _GELU_TANH_PYTHON):
        return "gelu_tanh"
    is_partial = isinstance(act, functools.partial) and act.func is nn.functional.gelu
    return "gelu_tanh" if is_partial and not act.args and act.keywords == {"approximate": "tanh"} else None


def _accurate_constant(m: nn.Module) -> str | None:
    return "gelu_tanh" if getattr(m, "precomputed_constant", None) == math.sqrt(2 / math.pi) else None


_HF_ACTS = {
    "GELUActivation": _HFActivation("return self.act({x})", _gelu_act),
    "GELUTanh": _HFActivation("return self.act({x})", _gelu_tanh_act),  # PytorchGELUTanh is this class
    "NewGELUActivation": _HFActivation(
        "return 0.5 * {x} * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * ({x} + 0.044715 * torch.pow({x}, 3.0))))",
        "gelu_tanh",
    ),
    "AccurateGELUActivation": _HFActivation(
        "return 0.5 * {x} * (1 + torch.tanh(self.precomputed_constant * ({x} + 0.044715 * torch.pow({x}, 3))))",
        _accurate_constant,
    ),
    # 0.7978845608 is sqrt(2/pi) to 10 decimals (off by 2.9e-12: the same float32, bfloat16 and
    # float16 value), and the polynomial is NewGELU's, so this is gelu_tanh.
    "FastGELUActivation": _HFActivation(
        "return 0.5 * {x} * (1.0 + torch.tanh({x} * 0.7978845608 * (1.0 + 0.044715 * {x} * {x})))",
        "gelu_tanh",
    ),
    "SiLUActivation": _HFActivation("return nn.functional.silu({x})", "silu"),
    "ReLUSquaredActivation": _HFActivation(
        "relu_applied = nn.functional.relu({x})\nsquared = torch.square(relu_applied)\nreturn squared", "relu2"
    ),
}
# Not swapped: QuickGELU (x sigmoid(1.702 x): another function), ClippedGELU (clamps), and the rest.
_HF_UNSUPPORTED = {
    "QuickGELUActivation": "quick_gelu is x*sigmoid(1.702x), not one of ember's gelu formulas",
    "ClippedGELUActivation": "gelu clipped to [min, max]; ember has no clipped gelu",
}


# Bloom's own GELU (transformers.models.bloom): a custom autograd Function over the tanh formula with
# 0.79788456 for sqrt(2/pi) (the same float32, bfloat16 and float16 value) and the formula's exact
# derivative in backward, so it is gelu_tanh forward and backward. Checked down to both functions.
_BLOOM_MODULE = "transformers.models.bloom.modeling_bloom"
_BLOOM_SOURCES = {
    "bloom_gelu_forward": "return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))",
    "bloom_gelu_back": """
x = x[0]
tanh_out = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
ff = 0.5 * x * ((1 - tanh_out * tanh_out) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + tanh_out)
return ff * g
""",
}
_BLOOM_FUNCTION = {
    "forward": "ctx.save_for_backward(input)\nreturn bloom_gelu_forward(input)",
    "backward": "input = ctx.saved_tensors\ntmp = bloom_gelu_back(grad_output, input)\nreturn tmp",
}


def _bloom_gelu_kind(cls: type) -> str | None:
    import sys

    mod = sys.modules.get(_BLOOM_MODULE)
    fn = getattr(mod, "GeLUFunction", None)
    if mod is None or fn is None or not forward_matches(cls, "return GeLUFunction.apply({x})"):
        return None
    if not all(body_matches(getattr(mod, name, None), src) for name, src in _BLOOM_SOURCES.items()):
        return None
    if not all(body_matches(fn.__dict__.get(name), src) for name, src in _BLOOM_FUNCTION.items()):
        return None
    return "gelu_tanh"


def activation_kind(module: nn.Module) -> str | None:
    """The ember activation kind ("relu", "silu", "gelu", "gelu_tanh", ...) ``module`` computes
    exactly, else None.

    Knows torch's nn.GELU/SiLU/ReLU and transformers' activation classes (by exact class). In-place
    variants count: the caller decides whether in-place matters.
    """
    cls = type(module)
    if cls in _TORCH_ACTS:
        return _TORCH_ACTS[cls](module)
    if cls.__name__ == "BloomGelu" and cls.__module__ == _BLOOM_MODULE:
        return _bloom_gelu_kind(cls)
    known = _HF_ACTS.get(cls.__name__) if cls.__module__ == _HF_MODULE else None
    if known is None or not forward_matches(cls, known.forward):
        return None
    return known.kind(module) if callable(known.kind) else known.kind


# ---------------------------------------------------------------------------------------------
# Lone activations: never slower. Inside a fused block an activation saves a whole pass over memory;
# on its own, ember's kernel does what torch's does (one read, one write) and wins only if it computes
# the function faster, which depends on the device. A lone activation is replaced only where ember's
# kernel measured faster than torch's, both ways and at every size (fp32, 2-core development machines,
# 2.8k-8M elements, forward and forward + backward):
#   Intel Xeon (2026-12-03): gelu_tanh 1.07-3.9x; gelu 1.02-2.0x (with the exp-free erf of
#     csrc/cpu/vec_activation.h; 0.81-0.93x at 1M-8M before it); silu 0.61-0.81x below 64k elements
#     (the ~6 us of a custom op's dispatch); relu 0.53-0.97x (copy speed either way).
#   AMD EPYC (2026-11-22, bench/results/ember-bench_cpu_2026-11-22_112220.md): gelu 1.17-1.52x and
#     gelu_tanh 3.0-4.2x at 4M; silu not measured at small sizes, so held back as on Intel.
#   relu2 everywhere: torch runs relu, then square (two passes), ember one.
#   GPU: unmeasured (no GPU lent yet), so only relu2.
# ``ember.swap(model, activations=True)`` replaces every lone activation regardless; False, none.
# ---------------------------------------------------------------------------------------------
LONE_FASTER: dict[str, frozenset[str]] = {
    "GenuineIntel": frozenset({"gelu", "gelu_tanh", "relu2"}),
    "AuthenticAMD": frozenset({"gelu", "gelu_tanh", "relu2"}),
    "cuda": frozenset({"relu2"}),
    "other": frozenset({"relu2"}),
}
ALL_KINDS = frozenset(EMBER_MODULES)
_lone_policy: contextvars.ContextVar[tuple[frozenset[str], str]] = contextvars.ContextVar(
    "ember_lone_activations", default=(ALL_KINDS, "every kind"))


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """'GenuineIntel', 'AuthenticAMD' or 'other' (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    vendor = line.split(":", 1)[1].strip()
                    return vendor if vendor in LONE_FASTER else "other"
    except OSError:
        pass
    return "other"


def lone_policy(setting, device_type: str) -> tuple[frozenset[str], str]:
    """The kinds a lone activation may be swapped to under ``swap(activations=setting)`` for a model
    on ``device_type``, and the device's name for the report."""
    if setting is True:
        return ALL_KINDS, "every kind"
    if setting is False:
        return frozenset(), "none"
    if setting != "auto":
        raise ValueError(f"ember.swap: activations must be 'auto', True or False, got {setting!r}")
    where = "cuda" if device_type == "cuda" else cpu_vendor() if device_type == "cpu" else "other"
    return LONE_FASTER[where], ("GPU" if where == "cuda" else f"{where} CPU")


@contextlib.contextmanager
def use_lone_policy(policy: tuple[frozenset[str], str]):
    """The lone-activation policy of one swap: ``with use_lone_policy(lone_policy(...)):``."""
    token = _lone_policy.set(policy)
    try:
        yield
    finally:
        _lone_policy.reset(token)


def _lone_allowed(kind: str | None) -> bool:
    return kind in _lone_policy.get()[0]


def _lone_reason(kind: str) -> str:
    where = _lone_policy.get()[1]
    if where == "none":
        return "lone activations not swapped (swap(activations=False))"
    return (f"a lone {kind} is not faster with ember's kernel on this device ({where}; no fusion to gain), so it "
            "stays with torch; swap(activations=True) replaces it anyway")


def _replace(m: nn.Module) -> nn.Module:
    return EMBER_MODULES[activation_kind(m)]()


def _torch_match(m: nn.Module) -> bool:
    return (type(m) in _TORCH_ACTS and not getattr(m, "inplace", False) and activation_kind(m) in EMBER_MODULES
            and _lone_allowed(activation_kind(m)))


def _torch_why_not(m: nn.Module) -> str | None:
    cls = type(m)
    if cls in _TORCH_ACTS and getattr(m, "inplace", False):
        return "inplace=True: ember's kernels write a new tensor, so in-place activations stay with torch"
    if cls in _TORCH_UNSUPPORTED:
        return "no ember kernel for this activation"
    if cls in _TORCH_ACTS and activation_kind(m) in EMBER_MODULES:
        return _lone_reason(activation_kind(m))
    if cls not in _TORCH_ACTS and not cls.__module__.startswith("ember."):
        for base in _TORCH_ACTS:
            if isinstance(m, base):
                return f"a subclass of nn.{base.__name__}, whose forward may differ"
    return None


def _hf_match(m: nn.Module) -> bool:
    return type(m).__module__ == _HF_MODULE and activation_kind(m) in EMBER_MODULES and _lone_allowed(activation_kind(m))


def _hf_why_not(m: nn.Module) -> str | None:
    cls = type(m)
    if cls.__module__ != _HF_MODULE:
        return None
    if cls.__name__ in _HF_UNSUPPORTED:
        return _HF_UNSUPPORTED[cls.__name__]
    if cls.__name__ in _HF_ACTS and activation_kind(m) is None:
        return "its forward or activation function was changed from transformers' own"
    if activation_kind(m) in EMBER_MODULES:
        return _lone_reason(activation_kind(m))
    return "no ember kernel for this activation"


TORCH_ACTIVATIONS = SwapRule("torch-activations", match=_torch_match, replace=_replace, why_not=_torch_why_not)
HF_ACTIVATIONS = SwapRule("hf-activations", match=_hf_match, replace=_replace, why_not=_hf_why_not)
