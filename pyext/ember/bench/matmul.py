"""The matmul suite: fused Linear + bias + activation and the gated MLP against torch eager,
torch.compile and the plain BLAS / cuBLAS GEMM, in TFLOP/s.

    python -m ember.bench.matmul                      # this machine's defaults: table, CSV, PNG
    python -m ember.bench.matmul --quick              # first shapes only, short timing
    python -m ember bench --suites matmul             # the same cases through the common harness

Ops (FLOPs worked out per call; forward = 2 M N K per GEMM, backward = twice forward):
  linear       out = x @ W^T, no epilogue: ember vs the vendor GEMM (torch.mm -> cuBLAS / CPU BLAS)
  linear_gelu  out = gelu(x @ W^T + b): eager is addmm + gelu (two kernels, the pre-activation is
               written and read back); torch.compile is the same function, mode="max-autotune" on GPU
  linear_gelu_wide  the same on pre-activations of std 8 (W scaled by 8 / sqrt(K), not 1 / sqrt(K)): a
               trained layer's wide channels, where exp underflows in GELU's backward (past |x| = 13.2).
               Subnormal results there had made ember's CPU forward + backward 0.45x / 0.39x torch's at 32 /
               256 rows (Xeon, 2 cores); CPU only
  gated_mlp    down(silu(x @ Wg^T) * (x @ Wu^T)), the Llama MLP: 3 GEMMs of (M, H, I)
  moe_mlp      the same MLP in each of 8 experts over M routed rows sorted by expert (an uneven seeded
               split), weights as transformers holds them: eager is transformers' grouped_mm path
               (grouped GEMM, chunk, silu * up, grouped GEMM); ember is one grouped_gated_mlp op (C++ on
               CPU, Triton on GPU; no torch.compile row: it has no fp32 grouped GEMM)
Rows: op, provider, shape (M, K, N), dtype, direction, median ms, TFLOP/s, fraction of the measured
peak (torch.mm at a large square size on this device), and speedup over torch eager.

Targets (issue #4), judged in the markdown: GPU bf16 plain GEMM >= 95% of cuBLAS at 4096^3 and up,
linear_gelu >= 1.15x eager and >= torch.compile, gated_mlp fwd+bwd >= 1.2x eager; CPU >= eager;
moe_mlp >= eager on both (issue #14).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import ember
from ember.bench import report as _report  # not `report`: the CLI takes a module's report() for a report suite
from ember.bench.harness import (Case, Config, Target, WrongResult, dtype_name, group_cases, run_group,
                                 steady_cpu_allocator, time_fn)
from ember.metrics import max_rel_error

SUITE = "matmul"
DIRECTIONS = ("fwd", "fwd+bwd")

# A layer so small that at M = 1 the per-call overhead (argument checks, dispatch, autograd recording) is
# most of the time: ember's eager path must stay within 5% of torch's F.gelu(F.linear(...)) there.
_OVERHEAD_KN = (64, 64)

# (M list, {op: [(K, N)] or [(H, I)] for the gated MLP}). GPU: Llama-3-8B layer shapes; the plain GEMM
# also at 8192^2 for the ">= 95% of cuBLAS at 4096^3 and up" target. Each (op, shape, direction) is
# one torch.compile(max-autotune) compile on GPU, so the list is kept to what the targets need.
_SIZES = {
    ("cuda", "large"): ((1, 16, 128, 1024, 4096, 16384),
                        {"linear": [(4096, 4096), (8192, 8192)], "linear_gelu": [(4096, 14336)],
                         "gated_mlp": [(4096, 14336)], "moe_mlp": [(2048, 1408)]}),
    ("cuda", "small"): ((1, 128, 4096),
                        {"linear": [(4096, 4096)], "linear_gelu": [(4096, 14336), _OVERHEAD_KN],
                         "gated_mlp": [(4096, 14336)], "moe_mlp": [(2048, 1408)]}),
    ("cpu", "small"): ((1, 32, 256),
                       {"linear": [(1024, 1024), (1024, 4096)],
                        "linear_gelu": [(1024, 1024), (1024, 4096), _OVERHEAD_KN],
                        "linear_gelu_wide": [(1024, 4096)],
                        "gated_mlp": [(1024, 2816)], "moe_mlp": [(1024, 1408)]}),
    ("cpu", "large"): ((1, 128, 1024, 4096),
                       {"linear": [(4096, 4096)], "linear_gelu": [(4096, 4096)], "linear_gelu_wide": [(4096, 4096)],
                        "gated_mlp": [(4096, 11008)],
                        "moe_mlp": [(2048, 1408)]}),
}


def sizes(cfg: Config):
    ms, per_op = _SIZES[(cfg.kind, cfg.sizes)]
    if cfg.quick:
        return ms[:2], {op: kn[:1] for op, kn in per_op.items()}
    return ms, per_op


def flops(op: str, shape: tuple[int, int, int], direction: str) -> float:
    m, k, n = shape
    fwd = 2.0 * m * k * n * (3 if op in ("gated_mlp", "moe_mlp") else 1)
    return fwd if direction == "fwd" else 3 * fwd


# ---------------------------------------------------------------------------------------------
# The functions each provider runs. Inputs: x, then parameters; all take and return tensors.
# ---------------------------------------------------------------------------------------------
def _eager_linear(x, w):
    return F.linear(x, w)


def _eager_linear_gelu(x, w, b):
    return F.gelu(F.linear(x, w, b))


def _eager_gated(x, wg, wu, wd):
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


MOE_EXPERTS = 8
_moe_offsets_cache: dict[tuple[int, str], torch.Tensor] = {}


def moe_offsets(rows: int, device) -> torch.Tensor:
    """End rows of the 8 experts' groups: a seeded uneven split of ``rows`` (int32, as grouped_mm takes)."""
    key = (rows, str(device))
    if key not in _moe_offsets_cache:
        g = torch.Generator().manual_seed(rows)
        ids = torch.multinomial(torch.linspace(1.0, 2.0, MOE_EXPERTS), rows, replacement=True, generator=g)
        counts = torch.bincount(ids, minlength=MOE_EXPERTS)
        _moe_offsets_cache[key] = counts.cumsum(0).to(device=device, dtype=torch.int32)
    return _moe_offsets_cache[key]


def _grouped_mm(x, w, offs):
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm(x, w, offs=offs)
    return torch._grouped_mm(x, w, offs=offs)


def _eager_moe(x, w_gate_up, w_down):
    offs = moe_offsets(x.shape[0], x.device)
    gate, up = _grouped_mm(x, w_gate_up.transpose(1, 2), offs).chunk(2, dim=-1)
    return _grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs)


def _ember(op: str, backend: str) -> Callable:
    if op == "linear":
        return lambda x, w: ember.ops.linear(x, w, backend=backend)
    if op in ("linear_gelu", "linear_gelu_wide"):
        return lambda x, w, b: ember.ops.linear(x, w, b, activation="gelu", backend=backend)
    if op == "moe_mlp":
        return lambda x, wgu, wd: ember.ops.grouped_gated_mlp(x, wgu, wd, moe_offsets(x.shape[0], x.device),
                                                              activation="silu", backend=backend)
    return lambda x, wg, wu, wd: ember.ops.linear(
        ember.ops.gated_linear(x, wg, wu, activation="silu", backend=backend), wd, backend=backend
    )


EAGER = {"linear": _eager_linear, "linear_gelu": _eager_linear_gelu, "linear_gelu_wide": _eager_linear_gelu,
         "gated_mlp": _eager_gated,
         "moe_mlp": _eager_moe}
_compiled: dict[tuple[str, str], Callable] = {}


def _compile(op: str, device_kind: str) -> Callable:
    key = (op, device_kind)
    if key not in _compiled:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        mode = "max-autotune" if device_kind == "cuda" else None
        _compiled[key] = torch.compile(EAGER[op], dynamic=False, fullgraph=True, mode=mode)
    return _compiled[key]


def providers(cfg: Config, op: str) -> list[str]:
    names = ["torch"]
    if cfg.compile and op not in ("linear", "moe_mlp"):
        names.append("torch.compile")
    live = ember.available_backends(cfg.device)
    for backend in ("cpu", "triton") if op == "moe_mlp" else ("cpu", "cuda", "triton"):
        if backend == "triton" and cfg.kind != "cuda":
            continue  # the Triton interpreter is far too slow to time
        if live.get(backend) is None:
            names.append(f"ember-{backend}")
    return names


def _function(op: str, provider: str, kind: str) -> Callable:
    if provider == "torch":
        return EAGER[op]
    if provider == "torch.compile":
        return _compile(op, kind)
    return _ember(op, provider.removeprefix("ember-"))


def _inputs(op: str, shape, dtype, device):
    m, k, n = shape
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)

    x = rnd(m, k)
    if op == "linear":
        return [x, rnd(n, k, scale=k**-0.5)]
    if op == "linear_gelu":
        return [x, rnd(n, k, scale=k**-0.5), rnd(n)]
    if op == "linear_gelu_wide":
        return [x, rnd(n, k, scale=8 * k**-0.5), rnd(n)]
    if op == "moe_mlp":
        return [x, rnd(MOE_EXPERTS, 2 * n, k, scale=k**-0.5), rnd(MOE_EXPERTS, k, n, scale=n**-0.5)]
    return [x, rnd(n, k, scale=k**-0.5), rnd(n, k, scale=k**-0.5), rnd(k, n, scale=n**-0.5)]


def _check(fn, op, inputs, direction):
    """Against eager in fp32 on the same data, with a tolerance that grows like sqrt(K)."""
    wide = [t.detach().float().requires_grad_(direction != "fwd") for t in inputs]
    mine = [t.detach().clone().requires_grad_(direction != "fwd") for t in inputs]
    want, got = EAGER[op](*wide), fn(*mine)
    tol = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}.get(got.dtype, 1e-6)
    err = max_rel_error(want, got.float())  # relative to max(1, max |want|)
    if err > tol:
        raise WrongResult(f"{op}: output differs from eager fp32 by {err:.3g} of its scale (tolerance {tol:.3g})")


def _maker(op, provider, direction, dtype, shape, device):
    kind = torch.device(device).type

    def make(check: bool, warmup: bool = True):
        fn = _function(op, provider, kind)
        inputs = _inputs(op, shape, dtype, device)
        if check and provider != "torch":
            _check(fn, op, inputs, direction)
        if direction == "fwd":
            def run():
                with torch.no_grad():
                    return fn(*inputs)
        else:
            for t in inputs:
                t.requires_grad_(True)
            grad = torch.randn(shape[0], shape[1] if op in ("gated_mlp", "moe_mlp") else shape[2], device=device,
                               dtype=dtype)

            def run():
                return torch.autograd.grad(fn(*inputs), inputs, grad)
        if warmup:
            run()  # compile / tune outside the timing
        return run

    return make


def _target(cfg: Config, op: str, direction: str, provider: str, shape) -> Target | None:
    if not provider.startswith("ember-"):
        return None
    if op == "linear_gelu" and shape == (1, *_OVERHEAD_KN):
        return Target("speedup", 0.95, ("torch",))  # per-call overhead within 5% of torch's
    if cfg.kind == "cpu" or op == "moe_mlp":  # the experts: never slower than torch's grouped GEMM
        return Target("speedup", 1.0, ("torch",))
    if op == "linear" and min(shape) >= 4096:
        return Target("speedup", 0.95, ("torch",))
    if op == "linear_gelu":
        return Target("speedup", 1.15, ("torch",))  # and >= torch.compile: checked in the table
    if op == "gated_mlp" and direction == "fwd+bwd":
        return Target("speedup", 1.2, ("torch",))
    return None


def cases(cfg: Config) -> list[Case]:
    out = []
    ms, per_op = sizes(cfg)
    for dtype in cfg.dtypes:
        for op in ("linear", "linear_gelu", "linear_gelu_wide", "gated_mlp", "moe_mlp"):
            for (k, n) in per_op.get(op, ()):
                for m in ms:
                    shape = (m, k, n)
                    esize = torch.empty((), dtype=dtype).element_size()
                    weights = n * k * {"gated_mlp": 3, "moe_mlp": 3 * MOE_EXPERTS}.get(op, 1)
                    nbytes = esize * (m * k + weights + m * (k if op in ("gated_mlp", "moe_mlp") else n))
                    for direction in DIRECTIONS:
                        for provider in providers(cfg, op):
                            out.append(Case(SUITE, op, direction, provider, dtype, shape, nbytes,
                                            _maker(op, provider, direction, dtype, shape, cfg.device),
                                            _target(cfg, op, direction, provider, shape)))
    return out


def describe_targets(cfg: Config) -> list[str]:
    if cfg.kind == "cpu":
        return ["matmul: every ember row at least as fast as torch eager, except the per-call overhead row "
                "(linear_gelu 1x64x64): within 5% of torch eager."]
    return ["matmul: plain GEMM >= 95% of cuBLAS at 4096^3+; linear_gelu >= 1.15x eager (and >= torch.compile); "
            "gated_mlp fwd+bwd >= 1.2x eager; per-call overhead (linear_gelu 1x64x64) within 5% of eager."]


# ---------------------------------------------------------------------------------------------
# The TFLOP/s runner: table, CSV and plot.
# ---------------------------------------------------------------------------------------------
@dataclass
class Result:
    op: str
    provider: str
    shape: tuple
    dtype: str
    direction: str
    median_ms: float | None
    tflops: float | None
    frac_peak: float | None
    speedup: float | None
    error: str = ""


def measured_peak(device: str, dtype: torch.dtype, quick: bool) -> float:
    """TFLOP/s of torch.mm on a large square problem: the device's practical GEMM limit."""
    n = 8192 if torch.device(device).type == "cuda" else (1024 if quick else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = min(time_fn(lambda: torch.mm(a, b), device, True).median_s for _ in range(2 if quick else 4))
    return 2.0 * n**3 / best / 1e12


def run(cfg: Config, rounds: int | None = None) -> tuple[list[Result], dict]:
    """Time every case: the providers of one comparison (op, shape, dtype, direction) in the
    harness's interleaved rounds (``run_group``), each keeping its best round's median."""
    rounds = rounds or (2 if cfg.quick else 8)
    peaks = {dtype_name(d): measured_peak(cfg.device, d, cfg.quick) for d in cfg.dtypes}
    results: list[Result] = []
    for group in group_cases(cases(cfg)):
        rows = run_group(group, cfg.device, True, copy_bw=float("inf"), energy=None, rounds=rounds)
        base = next((r.median_s for r in rows if r.case.provider == "torch"), None)
        for row in rows:
            case = row.case
            r = Result(case.op, case.provider, case.shape, dtype_name(case.dtype), case.direction, None, None, None,
                       None, row.error)
            if row.median_s is not None:
                t = row.median_s
                r.median_ms = t * 1e3
                r.tflops = flops(case.op, case.shape, case.direction) / t / 1e12
                r.frac_peak = r.tflops / peaks[r.dtype]
                r.speedup = base / t if base else None
            print(f"  {r.op:12s} {r.direction:8s} {r.provider:14s} {r.dtype} {r.shape} "
                  f"{'%.3f ms' % r.median_ms if r.median_ms else r.error}", file=sys.stderr)
            results.append(r)
    # The peak is the best plain-GEMM rate seen: the square torch.mm above, or any torch "linear" row
    # (on a shared CPU the square run can land in a busy moment).
    for d in list(peaks):
        seen = [r.tflops for r in results if r.op == "linear" and r.provider == "torch" and r.dtype == d and r.tflops]
        peaks[d] = max([peaks[d], *seen])
    for r in results:
        if r.tflops:
            r.frac_peak = r.tflops / peaks[r.dtype]
    return results, peaks


CSV_COLUMNS = ["op", "provider", "M", "K", "N", "dtype", "direction", "median_ms", "tflops", "frac_peak",
               "speedup_vs_eager", "error", "device"]


def csv_records(results: list[Result], device_name: str) -> list[dict]:
    return [dict(zip(CSV_COLUMNS, (r.op, r.provider, *r.shape, r.dtype, r.direction, r.median_ms, r.tflops,
                                   r.frac_peak, r.speedup, r.error, device_name))) for r in results]


def markdown(results: list[Result], peaks: dict, device_name: str) -> str:
    lines = [f"# ember matmul benchmark — {device_name}", "",
             "Measured peak (best plain torch GEMM rate seen in this run): "
             + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in peaks.items()), ""]
    cells = []
    for r in results:
        if r.median_ms is None:
            cells.append([r.op, r.direction, r.shape, r.dtype, r.provider, r.error, "", "", ""])
            continue
        vs = "" if r.speedup is None else f"{r.speedup:.2f}x"
        cells.append([r.op, r.direction, r.shape, r.dtype, r.provider, f"{r.median_ms:.3f}", f"{r.tflops:.3f}",
                      f"{r.frac_peak:.0%}", vs])
    lines += _report.markdown_table(
        ["op", "direction", "shape (M, K, N)", "dtype", "provider", "median ms", "TFLOP/s", "of peak", "vs eager"],
        cells, ["---"] * 5 + ["---:"] * 4)
    return "\n".join(lines) + "\n"


def draw_tflops(results: list[Result]):
    """The PNG: TFLOP/s against M (tokens), one panel per (op, direction, K/N, dtype), a line per provider."""
    def draw(plt):
        panels = sorted({(r.op, r.direction, r.shape[1:], r.dtype) for r in results})
        cols = 2
        rows = max(1, (len(panels) + cols - 1) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
        for ax, (op, direction, kn, dt) in zip(axes.flat, panels):
            sel = [r for r in results if (r.op, r.direction, r.shape[1:], r.dtype) == (op, direction, kn, dt) and r.tflops]
            for prov in sorted({r.provider for r in sel}):
                pts = sorted((r.shape[0], r.tflops) for r in sel if r.provider == prov)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op} {direction} K,N={kn} {dt}", fontsize=9)
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel("TFLOP/s")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout()
        return fig

    return draw


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ember.bench.matmul", description=__doc__.split("\n\n")[0])
    default = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=default)
    p.add_argument("--dtype", nargs="+", default=None, help="fp32 bf16 fp16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--sizes", choices=("small", "large"), default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's). On a machine shared with other jobs, 1 avoids "
                        "OpenMP barrier stalls that swamp the kernels being compared")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ember.bench.harness import parse_dtype

    kind = torch.device(args.device).type
    dtypes = tuple(parse_dtype(d) for d in (args.dtype or (["bf16"] if kind == "cuda" else ["fp32"])))
    cfg = Config(args.device, dtypes, args.sizes or ("large" if kind == "cuda" else "small"), args.quick,
                 not args.no_compile)
    torch.manual_seed(0)
    allocator = steady_cpu_allocator() if kind == "cpu" else None
    results, peaks = run(cfg)
    if kind == "cuda":
        device_name = torch.cuda.get_device_name(torch.device(args.device))
    else:
        device_name = f"{_report.cpu_name()}, {torch.get_num_threads()} threads" + (f"; {allocator}" if allocator else "")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    base = os.path.join(args.out, f"ember-matmul_{kind}_{stamp}")
    text = markdown(results, peaks, device_name)
    written = _report.write_results(base + ".md", text, csv_path=base + ".csv", columns=CSV_COLUMNS,
                                   records=csv_records(results, device_name), draw=draw_tflops(results))
    print(text)
    print(f"wrote {written}" + ("" if written.png else " (no matplotlib: no plot)"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
