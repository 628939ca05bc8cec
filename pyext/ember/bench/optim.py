"""Optimizer suite: one ``optimizer.step()`` over an LLM-like parameter list, ember.optim against
torch.optim's for-loop, foreach and fused paths (and apex / bitsandbytes on a GPU when installed).

Parameters: an embedding, then layers of attention (q, k, v, o) and MLP (gate, up, down) matrices,
two norms and four biases each, until about ``total`` parameters (~200 tensors): 1e9 on a GPU
(--sizes large), 1e8 (small); 5e7 on CPU (small), 2e8 (large); --quick: 5e6 on CPU, 1e8 on a GPU.
Gradients are filled with fresh random values once; the timed call is ``opt.step()`` alone, after one
untimed step (lazy state creation, SGD's first momentum step) so every timed step is a steady one.

Bytes a step must move at least, per parameter, with e bytes per element (state kept in the
parameter's dtype, as torch and ember do without master weights):
    AdamW     read p, g, m, v; write p, m, v           7 e   (28 B/param in fp32)
    SGD       momentum: read p, g, buf; write p, buf   5 e   (20 B)
    Adagrad   read p, g, sum; write p, sum             5 e   (20 B)
    RMSprop   read p, g, sq; write p, sq               5 e   (20 B)
    Lion      read p, g, m; write p, m                 5 e   (20 B)
    AdamW8bit read p, g; write p (3 e); int8 m and uint8 v read and written (4 B); one fp32 absmax
              per 256 elements for each moment, read and written (16 / 256 B); tensors under 4096
              elements keep fp32 moments (3 e + 16 B)                    (~16.06 B in fp32)
Each row also carries the optimizer state it holds, measured (``state MB``: every tensor in
``opt.state``, steps included).

Providers: "torch" is torch.optim's per-parameter for-loop (foreach=False), so 'vs torch' is the
speedup over it; "torch-foreach" (foreach=True); "torch-fused" (fused=True, where this torch has a
fused kernel for the optimizer on this device); "ember-<backend>" for each ember backend live on the
device (Triton only on GPUs); on a GPU "apex" (FusedAdam, when installed) and "bnb"
(bitsandbytes AdamW32bit / AdamW8bit, when installed). Lion and AdamW8bit have no torch baseline; AdamW8bit's
"ember-reference" is its pure-PyTorch oracle (whole-tensor ops per parameter), the other ember
providers its fused kernels.

The suite always times fp32 (what mixed-precision training's optimizer touches: fp32 master weights
and state); other --dtype values add pure low-precision runs. Before timing, ember and peer providers
are checked on a few small tensors: three steps against the torch (or, for Lion, ember reference)
update in fp64 (ember's reference backend in fp16), with at most twice the error of that reference
run in the same dtype.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from typing import Callable

import torch

import ember
from ember.metrics import max_abs_error

from .harness import Case, Config, Target, WrongResult

SUITE = "optim"


@dataclass(frozen=True)
class Optim:
    kwargs: dict
    streams: int  # parameter-sized tensors read or written per step (see the module docstring)
    torch: bool = True  # torch.optim has a class of the same name


OPTIMIZERS: dict[str, Optim] = {
    "AdamW": Optim(dict(lr=1e-3, weight_decay=0.01), 7),
    "SGD": Optim(dict(lr=1e-2, momentum=0.9), 5),
    "Adagrad": Optim(dict(lr=1e-2), 5),
    "RMSprop": Optim(dict(lr=1e-2), 5),
    "Lion": Optim(dict(lr=1e-4, weight_decay=0.01), 5, torch=False),
    "AdamW8bit": Optim(dict(lr=1e-3, weight_decay=0.01), 0, torch=False),  # bytes: _adamw8bit_bytes
}

# (device kind, --sizes) -> parameters per case; --quick uses QUICK_PARAMS.
PARAMS = {("cuda", "large"): 1e9, ("cuda", "small"): 1e8, ("cpu", "small"): 5e7, ("cpu", "large"): 2e8}
QUICK_PARAMS = {"cuda": 1e8, "cpu": 5e6}


# ---------------------------------------------------------------------------------------------
# The parameter list and its byte counts.
# ---------------------------------------------------------------------------------------------
def llm_shapes(total: float, d: int = 1024, vocab: int = 32000) -> list[tuple[int, ...]]:
    """Embedding + n layers of (q, k, v, o, gate, up, down, 2 norms, 4 biases) until ~total params."""
    ff = int(d * 8 / 3) // 64 * 64
    layer = [(d, d)] * 4 + [(ff, d), (ff, d), (d, ff)] + [(d,)] * 2 + [(d,)] * 3 + [(ff,)]
    per_layer = sum(math.prod(s) for s in layer)
    n_layers = max(1, int((total - vocab * d) // per_layer))
    return [(vocab, d)] + layer * n_layers + [(d,)]


def scale_shapes(total: float) -> list[tuple[int, ...]]:
    """Model width grows with the size: 1B parameters is d=2048, 18 layers (like Llama-3.2-1B)."""
    if total >= 5e8:
        return llm_shapes(total, d=2048)
    if total >= 2e8:
        return llm_shapes(total, d=1024)
    return llm_shapes(total, d=512, vocab=8000)


def param_count(cfg: Config) -> float:
    if cfg.quick:
        return QUICK_PARAMS[cfg.kind]
    found = PARAMS.get((cfg.kind, cfg.sizes))
    if found is None:
        raise ValueError(f"ember bench: no {cfg.sizes!r} optimizer size for device {cfg.device!r}")
    return found


_BLOCK, _MIN_8BIT = 256, 4096  # ember.optim.AdamW8bit's block size and min_8bit_size


def _adamw8bit_bytes(shapes, e: int) -> int:
    total = 0
    for s in shapes:
        n = math.prod(s)
        total += 3 * e * n + (4 * n + 16 * math.ceil(n / _BLOCK) if n >= _MIN_8BIT else 16 * n)
    return total


def step_bytes(name: str, shapes, dtype: torch.dtype) -> int:
    e = torch.empty((), dtype=dtype).element_size()
    if name == "AdamW8bit":
        return _adamw8bit_bytes(shapes, e)
    return OPTIMIZERS[name].streams * e * sum(math.prod(s) for s in shapes)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``opt.state`` (shared storages counted once)."""
    seen, total = set(), 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.numel():
                key = (v.device, v.untyped_storage().data_ptr())
                if key not in seen:
                    seen.add(key)
                    total += v.untyped_storage().nbytes()
    return total


# ---------------------------------------------------------------------------------------------
# Providers: (name, builder(params) -> optimizer, reference builder or None, note).
# ---------------------------------------------------------------------------------------------
Builder = Callable[[list], torch.optim.Optimizer]


@functools.lru_cache(maxsize=None)
def _torch_fused_ok(name: str, device: str, dtype: torch.dtype) -> bool:
    """Whether this torch has fused=True for ``name`` on ``device``: one step on a tiny tensor."""
    p = torch.zeros(8, device=device, dtype=dtype, requires_grad=True)
    p.grad = torch.ones_like(p)
    try:
        getattr(torch.optim, name)([p], fused=True, **OPTIMIZERS[name].kwargs).step()
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False
    return True


def _torch(name: str, **opts) -> Builder:
    return lambda ps: getattr(torch.optim, name)(ps, **opts, **OPTIMIZERS[name].kwargs)


def _ember(name: str, **opts) -> Builder:
    return lambda ps: getattr(ember.optim, name)(ps, **opts, **OPTIMIZERS[name].kwargs)


def _apex_adamw(ps):
    from apex.optimizers import FusedAdam

    return FusedAdam(ps, adam_w_mode=True, **OPTIMIZERS["AdamW"].kwargs)


def _bnb(cls: str) -> Builder:
    def build(ps):
        import bitsandbytes as bnb

        return getattr(bnb.optim, cls)(ps, **OPTIMIZERS["AdamW"].kwargs)

    return build


def providers(cfg: Config, name: str, dtype: torch.dtype) -> list[tuple[str, Builder, Builder | None, str]]:
    spec, gpu = OPTIMIZERS[name], cfg.kind == "cuda"
    out = []
    if spec.torch:
        fused = _torch_fused_ok(name, cfg.device, dtype)
        note = "torch: torch.optim with foreach=False; torch-foreach: foreach=True"
        note += "; torch-fused: fused=True" if fused else ""
        out += [("torch", _torch(name, foreach=False), None, note),
                ("torch-foreach", _torch(name, foreach=True), None, "")]
        if fused:
            out.append(("torch-fused", _torch(name, fused=True), None, ""))
    live = ember.available_backends(cfg.device)
    if name == "AdamW8bit":
        # The oracle is ember's own reference (torch has no 8-bit AdamW); the kernels match it bit for bit.
        ref = _ember(name, backend="reference")
        out.append(("ember-reference", ref, None, "ember-reference: ember.optim.AdamW8bit(backend='reference'), "
                    "whole-tensor PyTorch ops per parameter"))
        for backend in ("cpu", "cuda", "triton"):
            if (gpu or backend != "triton") and live.get(backend) is None:
                out.append((f"ember-{backend}", _ember(name, backend=backend), ref, ""))
        if gpu and importlib.util.find_spec("bitsandbytes") is not None:
            out.append(("bnb", _bnb("AdamW8bit"), None, "bnb: bitsandbytes.optim.AdamW8bit"))
        return out
    # The check's oracle: torch, except for Lion (torch has none) and in fp16, where torch's pure-fp16
    # Adam and RMSprop divide by eps = 1e-8, which fp16 rounds to 0 (NaN wherever v underflows).
    if spec.torch and dtype != torch.float16:
        ref = _torch(name, foreach=False)
    else:
        ref = _ember(name, backend="reference")
    for backend in ("cpu", "cuda", "triton"):
        if backend == "triton" and not gpu:
            continue  # under TRITON_INTERPRET=1 Triton "runs" on CPU, far too slowly to time
        if live.get(backend) is None:
            out.append((f"ember-{backend}", _ember(name, backend=backend), ref, ""))
    if gpu and name == "AdamW":
        if importlib.util.find_spec("apex") is not None:
            out.append(("apex", _apex_adamw, ref, "apex: apex.optimizers.FusedAdam(adam_w_mode=True)"))
        if importlib.util.find_spec("bitsandbytes") is not None:
            out.append(("bnb", _bnb("AdamW32bit"), ref, "bnb: bitsandbytes.optim.AdamW32bit"))
    return out


# ---------------------------------------------------------------------------------------------
# Cases.
# ---------------------------------------------------------------------------------------------
_CHECK_SHAPES = [(37, 19), (5000,), (3,), (64, 129)]  # odd sizes; 5000 and 64x129 take 8-bit paths
_CHECK_ATOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def _three_steps(build: Builder, init, grads, dtype) -> list[torch.Tensor]:
    params = [x.to(dtype).clone().requires_grad_(True) for x in init]
    opt = build(params)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.to(dtype)
        opt.step()
    return [p.detach().double() for p in params]


def _check(build: Builder, ref: Builder, dtype: torch.dtype, device: str) -> None:
    # Gradients of 0.1 keep Adam's and Adagrad's squares (1e-2) normal numbers even in fp16.
    gen = torch.Generator(device="cpu").manual_seed(1)
    init = [(torch.randn(s, generator=gen, dtype=torch.float64) * 0.5).to(device) for s in _CHECK_SHAPES]
    grads = [[(torch.randn(s, generator=gen, dtype=torch.float64) * 0.1).to(device) for s in _CHECK_SHAPES]
             for _ in range(3)]
    want = _three_steps(ref, init, grads, torch.float64)
    base = _three_steps(ref, init, grads, dtype)
    got = _three_steps(build, init, grads, dtype)
    for i, (g, b, w) in enumerate(zip(got, base, want)):
        err, allowed = max_abs_error(w, g), 2 * max_abs_error(w, b) + _CHECK_ATOL[dtype]
        if not err <= allowed:
            raise WrongResult(f"parameter {i} {tuple(w.shape)} after 3 steps: max error {err:.3g} vs fp64, "
                              f"allowed {allowed:.3g} (2x the reference's own error in this dtype)")


class _Step:
    """The timed callable: one ``opt.step()``. ``extra`` (read by the harness after timing) is the
    optimizer state the step left behind."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt = opt

    def __call__(self):
        self.opt.step()

    @property
    def extra(self) -> dict:
        return {"state_bytes": state_bytes(self.opt)}


def _maker(build: Builder, ref: Builder | None, shapes, dtype: torch.dtype, device: str):
    def make(check: bool, warmup: bool = True):
        if check and ref is not None:
            _check(build, ref, dtype, device)
        # One parameter set per case, freed with the returned callable (1e9 fp32 parameters with
        # grads and two moments are 16 GB). Gradients of 1e-2: their squares stay normal fp16 numbers.
        params = [torch.randn(s, device=device, dtype=dtype).mul_(0.02).requires_grad_(True) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p).mul_(1e-2)
        step = _Step(build(params))
        if warmup:
            step()  # state creation and SGD's first momentum step stay out of the timing
        return step

    return make


def _target(cfg: Config, name: str, provider: str, dtype: torch.dtype) -> Target | None:
    if not provider.startswith("ember-") or provider == "ember-reference":
        return None
    if name == "AdamW":
        if cfg.kind == "cpu":
            return Target("speedup", 1.0, ("torch-fused",))
        if dtype == torch.float32:
            return Target("copy_bw", 0.85, also=Target("speedup", 1.1, ("torch-fused",)))
        return None
    if name in ("Adagrad", "RMSprop"):
        return Target("speedup", 2.0, ("torch-foreach",))
    return None


def dtypes(cfg: Config) -> list[torch.dtype]:
    return [torch.float32] + [d for d in cfg.dtypes if d != torch.float32]


def cases(cfg: Config, shapes: list[tuple[int, ...]] | None = None) -> list[Case]:
    """Every (dtype, optimizer, provider) case over ``shapes`` (default: the LLM-like list of the
    size ``cfg`` asks for)."""
    out = []
    shapes = shapes or scale_shapes(param_count(cfg))
    numel = sum(math.prod(s) for s in shapes)
    for dtype in dtypes(cfg):
        for name, spec in OPTIMIZERS.items():
            args = ", ".join(f"{k}={v:g}" for k, v in spec.kwargs.items())
            about = (f"{name}({args}) over {len(shapes)} tensors; {step_bytes(name, shapes, dtype) / numel:.4g} "
                     f"B/param moved at minimum")
            provided = providers(cfg, name, dtype)
            # One note for the whole table: the report lists each distinct note once per op.
            note = "; ".join(dict.fromkeys([about] + [n for *_, n in provided if n]))
            for provider, build, ref, _ in provided:
                out.append(
                    Case(
                        suite=SUITE,
                        op=name,
                        direction="step",
                        provider=provider,
                        dtype=dtype,
                        shape=(numel,),
                        bytes=step_bytes(name, shapes, dtype),
                        make=_maker(build, ref, shapes, dtype, cfg.device),
                        target=_target(cfg, name, provider, dtype),
                        note=note,
                    )
                )
    return out


def describe_targets(cfg: Config) -> list[str]:
    lines = []
    if cfg.kind == "cpu":
        lines.append("optim: ember AdamW at least as fast as torch fused AdamW.")
    else:
        lines.append("optim: fp32 ember AdamW >= 85% of the measured copy bandwidth and >= 1.1x torch fused AdamW.")
    lines.append("optim: ember Adagrad and RMSprop >= 2x torch foreach (Lion and AdamW8bit: no torch baseline, "
                 "reported only).")
    return lines


__all__ = ["OPTIMIZERS", "SUITE", "cases", "describe_targets", "llm_shapes", "scale_shapes", "step_bytes",
           "state_bytes", "providers"]
