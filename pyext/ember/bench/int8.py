"""Int8 Linear benchmark rows: ember's W8A8 / W8A16 against float Linear and torch.ao quantize_dynamic.

Every provider computes y = x @ W.T + b for x (M, K), W (N, K). Rows carry the median time, TOPS
(2 M N K ops / time; int8 rows count the same ops as the float layer they replace) and speedups
against fp32 Linear, bf16 Linear and torch.ao's quantize_dynamic (CPU, per-tensor qint8, fbgemm/onednn).

Providers
  CPU   torch-fp32, torch-bf16, torch.ao-dynamic, ember-cpu-w8a8, ember-cpu-w8a16 (+ bf16 x)
  GPU   torch-bf16, ember-triton-w8a8, ember-triton-w8a16
Timing: the harness's (``harness.run_group``: each shape's providers in interleaved rounds, each row its
best round's median, by ``harness.time_fn``); every output is first checked against the fp32 Linear.

    python -m ember bench --suites int8            # the 'int8' suite of the bench CLI (cases() below)
    python -m ember.bench.int8 [--device cpu] [--quick] [--csv out.csv] [--decoder]   # + decoder tokens/s
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import ember
from ember.metrics import min_cosine

from . import report as _report  # not `report`: the CLI takes a module's report() for a report suite
from .harness import Case, Target, WrongResult, run_group, time_fn

# (name, M, K, N). BERT-base / MiniLM projections at batch x sequence tokens; Llama-style decode.
CPU_SHAPES = [
    ("minilm.ffn_up", 1024, 384, 1536),
    ("minilm.ffn_down", 1024, 1536, 384),
    ("bert.qkv", 1024, 768, 2304),
    ("bert.ffn_up", 1024, 768, 3072),
    ("bert.ffn_down", 1024, 3072, 768),
    ("bert.ffn_up.b1s128", 128, 768, 3072),
    ("llama-1b.decode.mlp_up", 1, 2048, 8192),
    ("llama-1b.decode.mlp_up", 16, 2048, 8192),
    ("llama-1b.decode.o_proj", 1, 2048, 2048),
]
GPU_SHAPES = [(f"llama8b.{n}", M, K, N) for M in (1, 4, 16, 512, 2048, 4096, 8192)
              for n, K, N in (("qkv", 4096, 6144), ("mlp_up", 4096, 28672), ("mlp_down", 14336, 4096))]
SUITE = "int8"


# ---------------------------------------------------------------------------------------------
# Providers: builders (fp32 nn.Linear) -> (callable of x, input dtype), shared by the table and the suite.
# ---------------------------------------------------------------------------------------------
def _torch_fp32(lin):
    return lin, torch.float32


def _torch_bf16(lin):
    lb = nn.Linear(lin.in_features, lin.out_features, device=lin.weight.device).requires_grad_(False)
    lb.load_state_dict(lin.state_dict())
    return lb.to(torch.bfloat16), torch.bfloat16


def _ao_dynamic(lin):
    return _ao_dynamic_model(nn.Sequential(lin)), torch.float32


def _ember(mode: str, dtype: torch.dtype, backend: str | None = None):
    """ember's Int8Linear from ``lin`` in ``dtype``; with ``backend``, every call runs under
    ``ember.backend(backend)`` (the module itself has no backend argument)."""
    def build(lin):
        q = ember.nn.Int8Linear.from_linear(lin.to(dtype), mode)
        if backend is None:
            return q, dtype

        def forced(x):
            with ember.backend(backend):
                return q(x)

        return forced, dtype

    return build


def _table_providers(device_kind: str):
    """The standalone table's providers, named as in its committed results (bench/results/int8_cpu_*)."""
    if device_kind == "cpu":
        return [("torch-fp32", _torch_fp32), ("torch-bf16", _torch_bf16), ("torch.ao-dynamic", _ao_dynamic),
                ("ember-cpu-w8a8", _ember("w8a8", torch.float32)), ("ember-cpu-w8a16", _ember("w8a16", torch.float32)),
                ("ember-cpu-w8a16-bf16x", _ember("w8a16", torch.bfloat16))]
    return [("torch-bf16", _torch_bf16), ("ember-triton-w8a8", _ember("w8a8", torch.bfloat16, "triton")),
            ("ember-triton-w8a16", _ember("w8a16", torch.bfloat16, "triton"))]


def _suite_providers(device_kind: str):
    """The suite's providers; "torch" is the baseline of 'vs torch': fp32 Linear on CPU, bf16 Linear on a GPU."""
    if device_kind == "cpu":
        return [("torch", _torch_fp32), ("torch-bf16", _torch_bf16), ("torch.ao-dynamic", _ao_dynamic),
                ("ember-w8a8", _ember("w8a8", torch.float32)), ("ember-w8a16", _ember("w8a16", torch.float32))]
    return [("torch", _torch_bf16), ("ember-triton-w8a8", _ember("w8a8", torch.bfloat16)),
            ("ember-triton-w8a16", _ember("w8a16", torch.bfloat16))]


def _maker(build, M, K, N, device):
    def make(check: bool, warmup: bool = True):
        torch.manual_seed(0)
        lin = nn.Linear(K, N, device=device).requires_grad_(False)
        x32 = torch.randn(M, K, device=device)
        ref = lin(x32)
        mod, dtype = build(lin)
        x = x32.to(dtype)
        fn = torch.inference_mode()(lambda: mod(x))
        if check:  # quantization error, not a broken kernel: the output must still point the same way
            cos = min_cosine(ref, fn().float())
            if not cos >= 0.99:
                raise WrongResult(f"min row cosine {cos:.4f} against the fp32 Linear (< 0.99)")
        elif warmup:
            fn()
        return fn

    return make


# ---------------------------------------------------------------------------------------------
# The standalone table (python -m ember.bench.int8).
# ---------------------------------------------------------------------------------------------
TABLE_COLUMNS = ["op", "shape", "provider", "M", "K", "N", "device", "median_ms", "TOPS",
                 "x_vs_torch-fp32", "x_vs_torch-bf16", "x_vs_torch.ao-dynamic"]
BASELINES = ("torch-fp32", "torch-bf16", "torch.ao-dynamic")
# docs/int8.md's table: 7 interleaved rounds of all providers, 0.1 s of timed calls each.
TABLE_ROUNDS, TABLE_BUDGET_S = 7, 0.7


def rows(device: str = "cpu", quick: bool = False, shapes=None):
    """Yield one dict per (shape, provider) with TABLE_COLUMNS, a shape's providers at a time; a
    provider that broke (wrong output, error) yields {"provider", "shape", "error"} instead."""
    kind = torch.device(device).type
    shapes = shapes or (CPU_SHAPES if kind == "cpu" else GPU_SHAPES)
    if quick:
        shapes = shapes[::3]
    dtype = torch.float32 if kind == "cpu" else torch.bfloat16
    for name, M, K, N in shapes:
        # bytes=0: the table reports TOPS, not bandwidth
        group = [Case(SUITE, "linear", "fwd", prov, dtype, (M, K, N), 0, _maker(build, M, K, N, device))
                 for prov, build in _table_providers(kind)]
        timed = run_group(group, device, quick, copy_bw=float("inf"), energy=None,
                          rounds=2 if quick else TABLE_ROUNDS, budget_s=None if quick else TABLE_BUDGET_S)
        ms = {r.case.provider: r.median_s * 1e3 for r in timed if r.median_s is not None}
        for r in timed:
            prov = r.case.provider
            if prov not in ms:
                yield {"shape": name, "provider": prov, "error": f"{r.status}: {r.error}"}
                continue
            yield {
                "op": "linear", "shape": name, "provider": prov, "M": M, "K": K, "N": N, "device": device,
                "median_ms": round(ms[prov], 4), "TOPS": round(2 * M * N * K / ms[prov] / 1e9, 3),
                **{f"x_vs_{b}": (round(ms[b] / ms[prov], 2) if b in ms else None) for b in BASELINES},
            }


def decoder_tokens_per_s(device="cpu", hidden=1024, layers=8, inter=2816, vocab=32000, prompt=32, new=32,
                         providers=("torch-fp32", "torch-bf16", "torch.ao-dynamic", "ember-w8a8", "ember-w8a16")):
    """Greedy-decode tokens/s of a Llama-style decoder (random weights; transformers' LlamaForCausalLM)
    with each provider's Linear layers. Default ~0.2B parameters on CPU; pass hidden=2048, layers=16,
    inter=5632 for the ~1B model on GPU. Yields {provider, params, tokens_per_s, ms_per_token}."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                         max_position_embeddings=prompt + new + 8)
    torch.manual_seed(0)
    base = tf.LlamaForCausalLM(cfg).eval()
    sd = base.state_dict()
    n_params = sum(p.numel() for p in base.parameters())
    ids = torch.randint(0, vocab, (1, prompt), device=device)
    for prov in providers:
        m = tf.LlamaForCausalLM(cfg).eval()
        m.load_state_dict(sd)
        if prov == "torch-bf16":
            m = m.to(torch.bfloat16)
        elif prov == "torch.ao-dynamic":
            m = _ao_dynamic_model(m)
        elif prov.startswith("ember-"):
            ember.quantize(m, mode=prov.split("-")[1])
        m = m.to(device)
        gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            m.generate(ids, **dict(gen, max_new_tokens=4, min_new_tokens=4))  # warm-up
            # quick: a generate takes seconds, so the shortest budget still times it once or twice
            dt = time_fn(lambda: m.generate(ids, **gen), device, quick=True).median_s
        yield {"provider": prov, "params": n_params, "tokens_per_s": round(new / dt, 2),
               "ms_per_token": round(dt / new * 1e3, 1)}


def _ao_dynamic_model(m):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in favour of torchao, still the CPU baseline
        return torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)


# ---------------------------------------------------------------------------------------------
# The 'int8' suite of ``python -m ember bench``.
# ---------------------------------------------------------------------------------------------
# CPU suite shapes: BERT-base at 8 x 128 tokens and its decode rows (the issue's CPU target), plus
# larger Llama-style layers with --sizes large.
SUITE_CPU = {"small": [("bert.qkv", 1024, 768, 2304), ("bert.ffn_up", 1024, 768, 3072),
                       ("bert.ffn_down", 1024, 3072, 768), ("bert.ffn_up", 1, 768, 3072),
                       ("bert.ffn_up", 16, 768, 3072), ("bert.ffn_up", 128, 768, 3072)],
             "large": CPU_SHAPES}
SUITE_GPU = {"small": [s for s in GPU_SHAPES if s[1] in (1, 16, 2048)], "large": GPU_SHAPES}


def _amx_in_use() -> bool:
    """Whether ember's CPU int8 GEMMs run on AMX tiles in this process (cpu_isa_report, csrc/cpu/dispatch.cpp)."""
    from ember import _backend

    ext = _backend.extension()
    report = getattr(ext, "cpu_isa_report", None) if ext is not None else None
    return report is not None and "\nint8: amx" in report()


# Issue #12's targets on an AMX CPU (2 cores): W8A8 >= 1.5x bf16 nn.Linear at M >= 128; W8A16 >= 1.0x
# bf16 at every M and >= 1.7x at decode (M 1 and 16).
AMX_W8A8_VS_BF16, AMX_W8A16_VS_BF16, AMX_W8A16_DECODE_VS_BF16 = 1.5, 1.0, 1.7


def _suite_target(kind: str, provider: str, M: int):
    if kind == "cpu" and _amx_in_use():
        if provider == "ember-w8a8" and M >= 128:
            return Target("speedup", AMX_W8A8_VS_BF16, ("torch-bf16",))
        if provider == "ember-w8a16":
            return Target("speedup", AMX_W8A16_DECODE_VS_BF16 if M <= 16 else AMX_W8A16_VS_BF16, ("torch-bf16",))
    if kind == "cpu" and provider == "ember-w8a8":
        return Target("speedup", 1.5, ("torch.ao-dynamic",))
    if kind == "cpu" and provider == "ember-w8a16":
        # Issue #12's "W8A16 >= 1.0x at every M" off AMX: against the faster float nn.Linear, fp32 where
        # bf16 has no native dot product (bf16 runs ~5x slower than fp32 there), bf16 where it has one.
        return Target("speedup", 1.0, ("torch", "torch-bf16"))
    if kind == "cuda" and provider == "ember-triton-w8a16" and M <= 16:
        return Target("speedup", 1.6, ("torch",))
    if kind == "cuda" and provider == "ember-triton-w8a8" and M >= 2048:
        return Target("speedup", 1.5, ("torch",))
    return None


def cases(cfg) -> list:
    kind = cfg.kind
    shapes = (SUITE_CPU if kind == "cpu" else SUITE_GPU)[cfg.sizes]
    shapes = shapes[:1] if cfg.quick else shapes
    out = []
    for name, M, K, N in shapes:
        for provider, build in _suite_providers(kind):
            wbytes = 1 if provider.startswith(("ember", "torch.ao")) else (4 if provider == "torch" and kind == "cpu" else 2)
            xbytes = 4 if kind == "cpu" else 2
            out.append(Case(suite=SUITE, op=f"linear.{name}", direction="fwd", provider=provider,
                            dtype=torch.float32 if kind == "cpu" else torch.bfloat16, shape=(M, K, N),
                            bytes=M * K * xbytes + N * K * wbytes + M * N * xbytes,
                            make=_maker(build, M, K, N, cfg.device), target=_suite_target(kind, provider, M),
                            note="y = x @ W.T + b, shape (M, K, N); 'vs torch' is against "
                                 + ("fp32 nn.Linear; ember-w8a8 is dynamic per-token W8A8, torch.ao-dynamic "
                                    "is quantize_dynamic (qint8, per tensor)" if kind == "cpu" else "bf16 nn.Linear")))
    return out


def int8_compute_floor(cfg) -> list[str]:
    """The CPU's measured int8 MAC rate and, per benchmarked shape, the time a GEMM would take at it:
    no int8 kernel (ember's or fbgemm's) can run faster, so a target below that floor is out of reach."""
    from ember import _backend

    ext = _backend.extension()
    if ext is None:
        return []
    shapes = SUITE_CPU[cfg.sizes][:1] if cfg.quick else SUITE_CPU[cfg.sizes]
    if _amx_in_use():
        # The floor of the ISA the kernels actually run on: AMX tiles (TDPBUSD), and TDPBF16PS for W8A16.
        macs_per_s, bf16_per_s = ext.amx_peak_macs(False), ext.amx_peak_macs(True)
        floors = ", ".join(f"{M}x{K}x{N} >= {M * K * N / macs_per_s * 1e6:.0f} us (w8a8), "
                           f"{M * K * N / bf16_per_s * 1e6:.0f} us (w8a16)" for _, M, K, N in shapes)
        return [f"int8 compute limit measured here: {macs_per_s / 1e9:.0f} G int8 MAC/s and {bf16_per_s / 1e9:.0f} "
                f"G bf16 MAC/s (AMX TDPBUSD / TDPBF16PS on resident tiles, {torch.get_num_threads()} threads; "
                f"ember's int8 GEMMs run on AMX, VNNI for W8A8 decode rows). A GEMM cannot beat M*K*N / that rate: "
                f"{floors}."]
    macs_per_s = ext.int8_peak_macs()
    if not macs_per_s:
        return ["int8 compute limit: this CPU has no AVX512-VNNI (ember's W8A8 falls back to ATen's int8 GEMM)."]
    report = getattr(ext, "cpu_isa_report", None)
    off = dict(line.split(": ", 1) for line in report().splitlines()).get("amx off") if report else None
    amx = f"ember's AMX kernels off: {off}" if off else "AMX unknown"
    floors = ", ".join(f"{M}x{K}x{N} >= {M * K * N / macs_per_s * 1e6:.0f} us" for _, M, K, N in shapes)
    return [f"int8 compute limit measured here: {macs_per_s / 1e9:.0f} G int8 MAC/s (AVX512-VNNI vpdpbusd in a "
            f"register-only loop on {torch.get_num_threads()} threads; {amx}). An int8 GEMM cannot beat "
            f"M*K*N / that rate: {floors}."]


def describe_targets(cfg) -> list[str]:
    if cfg.kind == "cpu":
        if _amx_in_use():
            issue12 = [f"int8 on AMX (issue #12): ember w8a8 >= {AMX_W8A8_VS_BF16}x bf16 nn.Linear at M >= 128; w8a16 >= "
                       f"{AMX_W8A16_VS_BF16}x bf16 at every M and >= {AMX_W8A16_DECODE_VS_BF16}x at M 1 and 16 (2 cores)."]
        else:
            issue12 = ["int8 off AMX (issue #12): ember w8a16 not slower than torch's fp32 or bf16 nn.Linear, whichever "
                       "is faster, at every M."]
        return ["int8: ember w8a8 Linear >= 1.5x torch.ao quantize_dynamic on BERT-like shapes (issue #5)."] + issue12 + \
            int8_compute_floor(cfg)
    return ["int8: ember w8a16 >= 1.6x bf16 cuBLAS at decode (M <= 16); w8a8 incl. activation quantization "
            ">= 1.5x bf16 at M >= 2048 (issue #5)."]


# ---------------------------------------------------------------------------------------------
# Issue #12's table (python -m ember.bench.int8 --amx): BERT-base and Llama-7B layers at decode and
# prefill rows against bf16 / fp32 nn.Linear and torch._int_mm, with the AMX targets. Run it once as
# is and once with EMBER_CPU_ISA=avx512 for the VNNI numbers of the same build.
# ---------------------------------------------------------------------------------------------
AMX_LAYERS = [("bert.qkv", 768, 2304), ("bert.ffn_up", 768, 3072), ("bert.ffn_down", 3072, 768),
              ("llama7b.qkv_o", 4096, 4096), ("llama7b.mlp_up", 4096, 11008), ("llama7b.mlp_down", 11008, 4096)]
AMX_ROWS = (1, 16, 128, 512)
AMX_COLUMNS = ["shape", "M", "K", "N", "torch-bf16", "torch-fp32", "w8a8-fp32x", "w8a8-bf16x", "w8a16-fp32x",
               "w8a16-bf16x", "torch._int_mm", "torch-fp32@bf16mm", "w8a16-fp32x@bf16mm", "x_w8a8_vs_bf16",
               "x_w8a16_vs_bf16", "target_met"]
_TIMED_COLUMNS = AMX_COLUMNS[4:13]


def _at_bf16_matmul_precision(fn):
    """fn run with torch's fp32 matmuls allowed bf16 (torch.backends.mkldnn.matmul.fp32_precision), as a
    user who set it would: torch's fp32 Linear then runs in bf16, and ember's W8A16 takes an fp32 x as one
    bf16 part (cpu/int8.cpp)."""
    def run():
        before = torch.backends.mkldnn.matmul.fp32_precision
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        try:
            return fn()
        finally:
            torch.backends.mkldnn.matmul.fp32_precision = before
    return run


def amx_rows(layers=AMX_LAYERS, ms=AMX_ROWS, budget_s: float = 0.3):
    """One dict per (layer, M): median us of every provider (each interleaved over 3 rounds, best round
    kept) and the speedups the issue #12 targets are stated in (vs bf16 nn.Linear)."""
    for name, K, N in layers:
        torch.manual_seed(0)
        lin = nn.Linear(K, N).requires_grad_(False)
        lb = _torch_bf16(lin)[0]
        q8 = ember.nn.Int8Linear.from_linear(lin, "w8a8")
        q16 = ember.nn.Int8Linear.from_linear(lin, "w8a16")
        wt = q8.weight.t()
        for M in ms:
            x = torch.randn(M, K)
            xb = x.bfloat16()
            qx = torch.randint(-127, 128, (M, K), dtype=torch.int8)
            provs = {"torch-bf16": lambda: lb(xb), "torch-fp32": lambda: lin(x), "w8a8-fp32x": lambda: q8(x),
                     "w8a8-bf16x": lambda: q8(xb), "w8a16-fp32x": lambda: q16(x), "w8a16-bf16x": lambda: q16(xb),
                     "torch-fp32@bf16mm": _at_bf16_matmul_precision(lambda: lin(x)),
                     "w8a16-fp32x@bf16mm": _at_bf16_matmul_precision(lambda: q16(x))}
            if M >= 17:  # torch._int_mm takes M > 16 only
                provs["torch._int_mm"] = lambda: torch._int_mm(qx, wt)
            ref = lin(x)
            for p in ("w8a8-fp32x", "w8a16-fp32x", "w8a16-bf16x", "w8a16-fp32x@bf16mm"):
                with torch.inference_mode():
                    cos = min_cosine(ref, provs[p]().float())
                if not cos >= 0.99:
                    raise WrongResult(f"{name} M={M} {p}: min row cosine {cos:.4f}")
            best = {}
            with torch.inference_mode():
                for _ in range(3):
                    for p, fn in provs.items():
                        fn()
                        t = time_fn(fn, "cpu", budget_s=budget_s / 3).median_s * 1e6
                        best[p] = min(best.get(p, t), t)
            bf = best["torch-bf16"]
            w8a8 = bf / min(best["w8a8-fp32x"], best["w8a8-bf16x"])
            w8a16 = bf / min(best["w8a16-fp32x"], best["w8a16-bf16x"])
            met = (w8a8 >= AMX_W8A8_VS_BF16 if M >= 128 else True) and \
                w8a16 >= (AMX_W8A16_DECODE_VS_BF16 if M <= 16 else AMX_W8A16_VS_BF16)
            yield {"shape": name, "M": M, "K": K, "N": N, **{p: round(best.get(p, float("nan")), 1) for p in _TIMED_COLUMNS},
                   "x_w8a8_vs_bf16": round(w8a8, 2), "x_w8a16_vs_bf16": round(w8a16, 2), "target_met": met}


def _table_markdown_head(device: str) -> list[str]:
    return [f"# {_report.cpu_name() if torch.device(device).type == 'cpu' else torch.cuda.get_device_name(device)}, "
            f"torch {torch.__version__}, threads {torch.get_num_threads()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            *_report.markdown_table(["shape", "M,K,N", "provider", "ms", "TOPS", "vs fp32", "vs bf16", "vs ao-dynamic"], [])]


def _table_cells(r: dict) -> list:
    return [r["shape"], f"{r['M']},{r['K']},{r['N']}", r["provider"], r["median_ms"], r["TOPS"],
            *(r[f"x_vs_{b}"] for b in BASELINES)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--csv", default=None, help="write the rows to this CSV, and the markdown next to it (.md)")
    p.add_argument("--decoder", action="store_true", help="also time greedy decoding of a Llama-style model")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU); default: torch's")
    p.add_argument("--amx", action="store_true", help="issue #12's AMX table (BERT-base / Llama-7B layers, M 1..512)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.amx:
        report = getattr(ember._backend.extension(), "cpu_isa_report", lambda: "unknown")()
        lines = [f"# {_report.cpu_name()}, {torch.get_num_threads()} threads; {report.replace(chr(10), '; ')}",
                 "# median us (best of 3 interleaved rounds); x_*_vs_bf16 = bf16 nn.Linear / the faster of fp32-x, bf16-x "
                 "(default precision); @bf16mm: run with torch.backends.mkldnn.matmul.fp32_precision = 'bf16'"]
        lines += _report.markdown_table(AMX_COLUMNS, [])
        print("\n".join(lines), flush=True)
        recs = []
        for r in amx_rows():
            recs.append(r)
            lines.append(_report.markdown_row([r[c] for c in AMX_COLUMNS]))
            print(lines[-1], flush=True)
        if a.csv:
            written = _report.write_results(Path(a.csv).with_suffix(".md"), "\n".join(lines) + "\n", csv_path=a.csv,
                                           columns=AMX_COLUMNS, records=recs)
            print(f"wrote {written}", file=sys.stderr)
        return 0
    lines = _table_markdown_head(a.device)
    print("\n".join(lines), flush=True)
    timed, broken = [], []
    for r in rows(a.device, a.quick):
        if "error" in r:
            broken.append(r)
            print(f"int8: {r['shape']} {r['provider']}: {r['error']}", file=sys.stderr, flush=True)
            continue
        timed.append(r)
        lines.append(_report.markdown_row(_table_cells(r)))
        print(lines[-1], flush=True)
    if a.decoder:
        decoder = [""] + _report.markdown_table(["decoder provider", "params", "tokens/s", "ms/token"], [])
        print("\n".join(decoder), flush=True)
        for r in decoder_tokens_per_s(a.device):
            decoder.append(_report.markdown_row([r["provider"], f"{r['params'] / 1e6:.0f}M", r["tokens_per_s"],
                                                r["ms_per_token"]]))
            print(decoder[-1], flush=True)
        lines += decoder
    if a.csv:
        written = _report.write_results(Path(a.csv).with_suffix(".md"), "\n".join(lines) + "\n", csv_path=a.csv,
                                       columns=TABLE_COLUMNS, records=timed)
        print(f"wrote {written}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
