"""Activation family: every op in ``OPS`` (gelu (erf), gelu (tanh), silu, relu, swiglu, geglu); fwd, bwd
and fwd+bwd. A new activation is its eager function and one ``OPS`` entry: shapes, providers, byte
counts, checks and targets follow from the entry.

Bytes each direction must move at least (N elements per tensor, e bytes per element):
    unary  fwd      read x, write y                            2 N e
           bwd      read grad and x, write dx                  3 N e
    gated  fwd      read gate and up, write out                3 N e
           bwd      read grad, gate, up; write dgate and dup   5 N e
    fwd+bwd         the sum of the two
Whatever a provider moves beyond that (eager's act(gate) intermediate, a saved output) shows up as
lower GB/s, which is the point of fusing.

Directions: "fwd" runs on inputs that do not require grad (inference: no tensors saved); "bwd" times
``torch.autograd.grad`` on one stored output (retain_graph=True), so only the backward kernels run;
"fwd+bwd" is a training step's share: forward, then ``torch.autograd.grad`` with a fixed random grad.

Providers: "torch" (eager), "torch.compile" (of the same eager function), "ember-<backend>" for each
ember backend live on the device (Triton only on GPUs), "liger" (Liger-Kernel's SwiGLU / GeGLU
functions, when installed and on CUDA).

Targets: on a GPU every ember fwd and bwd row reaches 85% of the measured copy bandwidth, and ember's
swiglu / geglu fwd+bwd beat both torch eager and torch.compile; on CPU every ember row is at least as
fast as torch eager.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import ember

from .harness import Case, Config, Target, WrongResult

SUITE = "activations"


# The eager definitions. One named function per op: torch.compile caches compiled code per code
# object, so sharing one function (or a lambda with a closure) between ops would pile every op's
# graphs onto one cache entry.
def _gelu(x):
    return F.gelu(x)


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def _silu(x):
    return F.silu(x)


def _relu(x):
    return F.relu(x)


def _relu2(x):
    return F.relu(x) ** 2  # transformers' ReLUSquaredActivation: relu, then square


def _swiglu(gate, up):
    return F.silu(gate) * up


def _geglu(gate, up):
    return F.gelu(gate) * up


def _geglu_tanh(gate, up):
    return F.gelu(gate, approximate="tanh") * up


@dataclass(frozen=True)
class Op:
    arity: int  # 1 for unary, 2 (gate, up) for gated
    eager: Callable
    ember: Callable  # (*inputs, backend) -> output


# The one table of benchmarked activations (a new one: its eager function above, one entry here).
OPS: dict[str, Op] = {
    "gelu": Op(1, _gelu, lambda x, backend: ember.ops.gelu(x, backend=backend)),
    "gelu_tanh": Op(1, _gelu_tanh, lambda x, backend: ember.ops.gelu(x, "tanh", backend=backend)),
    "silu": Op(1, _silu, lambda x, backend: ember.ops.silu(x, backend=backend)),
    "relu": Op(1, _relu, lambda x, backend: ember.ops.relu(x, backend=backend)),
    "relu2": Op(1, _relu2, lambda x, backend: ember.ops.relu2(x, backend=backend)),
    "swiglu": Op(2, _swiglu, lambda g, u, backend: ember.ops.swiglu(g, u, backend=backend)),
    "geglu": Op(2, _geglu, lambda g, u, backend: ember.ops.geglu(g, u, backend=backend)),
}

# Bytes moved per element of one tensor, in units of the element size (see the module docstring).
_TRAFFIC = {1: {"fwd": 2, "bwd": 3, "fwd+bwd": 5}, 2: {"fwd": 3, "bwd": 5, "fwd+bwd": 8}}

# (device kind, --sizes) -> shapes as (tokens, hidden). GPU large: 256 MiB per bf16 tensor, the
# Llama-3-8B MLP (14336) at 8k tokens, the Llama-2-7B MLP (11008) at 4k tokens. CPU: 4M elements,
# small enough that the default CPU run (torch.compile included) takes well under two minutes.
SHAPES = {
    ("cuda", "large"): [(16384, 8192), (8192, 14336), (4096, 11008)],
    ("cuda", "small"): [(4096, 4096), (1024, 11008)],
    ("cpu", "small"): [(4096, 1024), (1024, 4096)],
    ("cpu", "large"): [(8192, 4096), (2048, 11008)],
}

# Tolerances for the sanity check against eager run in fp32: a few ulps of the dtype, since the
# eager low-precision chain rounds intermediates that fused kernels keep in fp32.
_TOLS = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def shapes(cfg: Config) -> list[tuple[int, int]]:
    found = SHAPES.get((cfg.kind, cfg.sizes))
    if found is None:
        raise ValueError(f"ember bench: no {cfg.sizes!r} activation shapes for device {cfg.device!r}")
    return found[:1] if cfg.quick else found


# ---------------------------------------------------------------------------------------------
# Providers: which live on this device, and what each one calls for an op.
# ---------------------------------------------------------------------------------------------
_compiled: dict[str, Callable] = {}


def _compiled_eager(op: str) -> Callable:
    """torch.compile of the eager function, one per op, compiled statically per shape / dtype / grad
    mode on first call (inside ``make``, never at import or case-listing time)."""
    if op not in _compiled:
        import torch._dynamo

        # Each (shape, dtype, grad mode) is a recompile; the default limit of 8 would silently drop
        # the later ones back to eager.
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
        # "bwd" replays one backward (retain_graph=True), which a backward compiled with donated
        # buffers refuses. Donation only lets the backward reuse saved tensors' memory for its
        # outputs; the caching allocator makes that a wash for time.
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
        _compiled[op] = torch.compile(OPS[op].eager, dynamic=False, fullgraph=True)
    return _compiled[op]


_LIGER_GEGLU_NOTE = "liger: tanh-approximated GELU (Liger-Kernel has no exact GeGLU)"


def _liger_fn(op: str) -> Callable:
    """Liger-Kernel's fused function for ``op``, imported on first use. Its backward writes dgate /
    dup into the saved inputs, so repeated "bwd" calls run on overwritten values; memory-bound
    timing does not depend on them."""
    if op == "swiglu":
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply
    from liger_kernel.ops.geglu import LigerGELUMulFunction

    return LigerGELUMulFunction.apply


def providers(cfg: Config) -> list[str]:
    names = ["torch"]
    if cfg.compile:
        names.append("torch.compile")
    live = ember.available_backends(cfg.device)
    for backend in ("cpu", "cuda", "triton"):
        if backend == "triton" and cfg.kind != "cuda":
            continue  # under TRITON_INTERPRET=1 Triton "runs" on CPU, far too slowly to time
        if live.get(backend) is None:
            names.append(f"ember-{backend}")
    if cfg.kind == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        names.append("liger")
    return names


def _resolve(op: str, provider: str) -> tuple[Callable[[], Callable], Callable | None, str] | None:
    """(factory of the function to time, the eager function it must agree with, note), or None
    when the provider does not offer ``op``. Factories run inside ``make``: imports and
    torch.compile wrappers cost nothing until a case is actually run."""
    spec = OPS[op]
    # torch and torch.compile are the baselines: checking them against themselves costs a CPU run
    # most of its time, so only ember's and peers' results are checked.
    if provider == "torch":
        return (lambda: spec.eager), None, ""
    if provider == "torch.compile":
        return (lambda: _compiled_eager(op)), None, ""
    if provider.startswith("ember-"):
        backend = provider.removeprefix("ember-")
        return (lambda: lambda *xs: spec.ember(*xs, backend=backend)), spec.eager, ""
    if provider == "liger":
        if op == "swiglu":
            return (lambda: _liger_fn(op)), _swiglu, ""
        if op == "geglu":
            return (lambda: _liger_fn(op)), _geglu_tanh, _LIGER_GEGLU_NOTE
        return None
    raise ValueError(f"ember bench: unknown activation provider {provider!r}")


# ---------------------------------------------------------------------------------------------
# Cases.
# ---------------------------------------------------------------------------------------------
def _assert_close(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    tol = _TOLS[got.dtype]
    try:
        torch.testing.assert_close(got.float(), want.to(got.dtype).float(), atol=tol, rtol=tol)
    except AssertionError as err:
        detail = next((ln.strip() for ln in str(err).splitlines() if "Greatest absolute" in ln), "")
        raise WrongResult(f"{what} differs from torch eager (fp32): {detail}") from None


def _check(fn: Callable, ref: Callable, inputs: list[torch.Tensor], grad: torch.Tensor, direction: str) -> None:
    """Compare ``fn`` with the eager function run in fp32 on the same data; clones keep the timed
    inputs intact (Liger's backward writes into its inputs)."""
    need_grad = direction != "fwd"
    wide = [x.detach().float().requires_grad_(need_grad) for x in inputs]
    want = ref(*wide)
    mine = [x.detach().clone().requires_grad_(need_grad) for x in inputs]
    got = fn(*mine)
    _assert_close("output", got, want)
    if need_grad:
        want_grads = torch.autograd.grad(want, wide, grad.float())
        got_grads = torch.autograd.grad(got, mine, grad)
        for i, (g, w) in enumerate(zip(got_grads, want_grads)):
            _assert_close(f"grad of input {i}", g, w)


def _maker(factory: Callable[[], Callable], ref: Callable | None, arity: int, direction: str, dtype, shape, device):
    def make(check: bool, warmup: bool = True):
        fn = factory()
        inputs = [torch.randn(shape, device=device, dtype=dtype) for _ in range(arity)]
        grad = torch.randn(shape, device=device, dtype=dtype)
        if check and ref is not None:
            _check(fn, ref, inputs, grad, direction)
        if direction == "fwd":
            run = lambda: fn(*inputs)  # noqa: E731
        else:
            for x in inputs:
                x.requires_grad_(True)
            if direction == "fwd+bwd":
                run = lambda: torch.autograd.grad(fn(*inputs), inputs, grad)  # noqa: E731
            else:
                out = fn(*inputs)
                run = lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)  # noqa: E731
        if warmup:
            run()  # compile, autotune and first-touch outside the timing
        return run

    return make


def _target(cfg: Config, op: str, direction: str, provider: str) -> Target | None:
    if not provider.startswith("ember-"):
        return None
    if cfg.kind == "cpu":
        return Target("speedup", 1.0, ("torch",))
    if direction in ("fwd", "bwd"):
        return Target("copy_bw", 0.85)
    if OPS[op].arity == 2:
        return Target("speedup", 1.0, ("torch", "torch.compile"))
    return None


def cases(cfg: Config) -> list[Case]:
    out, names = [], providers(cfg)
    for shape in shapes(cfg):
        for dtype in cfg.dtypes:
            for op, spec in OPS.items():
                for direction in ("fwd", "bwd", "fwd+bwd"):
                    for provider in names:
                        resolved = _resolve(op, provider)
                        if resolved is None:
                            continue
                        factory, ref, note = resolved
                        numel = shape[0] * shape[1]
                        nbytes = _TRAFFIC[spec.arity][direction] * numel * torch.empty((), dtype=dtype).element_size()
                        out.append(
                            Case(
                                suite=SUITE,
                                op=op,
                                direction=direction,
                                provider=provider,
                                dtype=dtype,
                                shape=tuple(shape),
                                bytes=nbytes,
                                make=_maker(factory, ref, spec.arity, direction, dtype, shape, cfg.device),
                                target=_target(cfg, op, direction, provider),
                                note=note,
                            )
                        )
    return out


def describe_targets(cfg: Config) -> list[str]:
    """Lines for the report's header."""
    if cfg.kind == "cpu":
        return ["activations: every ember row at least as fast as torch eager (same op, shape, dtype, direction)."]
    return [
        "activations: every ember fwd and bwd row >= 85% of the measured copy bandwidth;",
        "activations: ember swiglu / geglu fwd+bwd faster than torch eager and torch.compile.",
    ]


__all__ = ["OPS", "SHAPES", "SUITE", "cases", "providers", "shapes", "describe_targets"]
