#!/usr/bin/env python3
"""Every ember kernel called once, on odd and misaligned shapes, checked against the float64 reference.

    python3 scripts/gpu_smoke.py --device cuda --backend cuda            # the CUDA C++ kernels (torch.ops.ember_C)
    python3 scripts/gpu_smoke.py --device cuda --backend triton          # the Triton launchers (ember.kernels)
    python3 scripts/gpu_smoke.py --device cpu --backend cpu --tiny       # the C++ CPU kernels, seconds
    python3 scripts/gpu_smoke.py --device cpu --backend triton --tiny    # Triton under the interpreter
    python3 scripts/gpu_smoke.py ... --only quantize,adamw8bit,linear_bwd   # just these groups

It is the program scripts/gpu_check.sh runs under compute-sanitizer (memcheck on every CUDA kernel,
racecheck on the reductions), so it calls the kernels directly: no autograd, no backend choice, no
fallback that could hide a kernel. Sizes are odd (vector tails), some inputs start one element into
their storage (the misaligned scalar paths) or have strided rows; inputs are fresh random numbers
(the seed is printed; --seed repeats a run). Each check prints one line:

    ok  linear.bwd gelu 37x72x40 bf16   max|err| 3.1e-03  rel 1.2e-03

and the last line is ``SMOKE <device>/<backend>: all <n> ok`` or ``SMOKE ...: FAILED <k> of <n>: ...``;
the exit status is 1 on any mismatch or error. A check passes when every element is within
``atol * max(1, rms(ref)) + rtol * |ref|`` of the reference (tests/tolerances.py's per-dtype numbers)
and NaN appears only where the reference has NaN. ``--perturb NAME`` (or EMBER_SMOKE_PERTURB) adds 1 to
the first element of every output whose check name contains NAME, to prove a wrong result is caught.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import random
import sys
import time
import traceback

GROUPS = ("unary", "gated", "linear", "linear_bwd", "gated_linear", "gated_linear_bwd", "quantize", "int8_gemm",
          "optim", "adamw8bit", "cross_entropy", "moe")


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--backend", choices=("cuda", "triton", "cpu"), default=None,
                   help="default: cuda on --device cuda, cpu on --device cpu")
    p.add_argument("--tiny", action="store_true", help="fewer dtypes and smaller shapes (CPU rehearsal, interpreter)")
    p.add_argument("--only", default="", help=f"comma-separated groups: {', '.join(GROUPS)}")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--perturb", default=os.environ.get("EMBER_SMOKE_PERTURB", ""),
                   help="add 1 to the outputs of checks whose name contains this (proves failures are caught)")
    a = p.parse_args(argv)
    a.backend = a.backend or ("cuda" if a.device == "cuda" else "cpu")
    if (a.backend, a.device) in (("cuda", "cpu"), ("cpu", "cuda")):
        p.error(f"--backend {a.backend} does not run on --device {a.device}")
    a.only = [g for g in a.only.split(",") if g]
    unknown = [g for g in a.only if g not in GROUPS]
    if unknown:
        p.error(f"--only: unknown groups {unknown}; expected some of {GROUPS}")
    return a


ARGS = _args()
if ARGS.backend == "triton" and ARGS.device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit is defined (ember.kernels import)

import torch  # noqa: E402

import ember  # noqa: E402
# The op modules (their references); by module path, since ember.ops re-exports a function `linear`.
A, G, I, L, O, O8, LCE, MOE = (importlib.import_module(f"ember.ops.{m}")
                               for m in ("activation", "gated", "int8", "linear", "optim", "optim8bit",
                                         "linear_cross_entropy", "moe"))

DEV, BACKEND, TINY = ARGS.device, ARGS.backend, ARGS.tiny
FP32, FP16, BF16, FP64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
SHORT = {FP32: "fp32", FP16: "fp16", BF16: "bf16", FP64: "fp64"}
# (atol, rtol) against the float64 reference, as tests/tolerances.py; atol scales with rms(ref).
TOLS = {FP32: (1e-5, 1.3e-6), FP16: (1e-3, 1e-3), BF16: (8e-3, 1.6e-2), FP64: (1e-12, 1e-12)}
ACTS = ("relu", "silu", "gelu", "gelu_tanh")
GATED_ACTS = ("silu", "gelu", "gelu_tanh")
INT8_ACT_IDS = {"none": -1, "relu": 0, "silu": 1, "gelu": 2, "gelu_tanh": 3}
# Triton compiles every (dtype, constexpr) combination on first use (~1-3 s each for a GEMM; with
# EMBER_TRITON_AUTOTUNE=0, as gpu_check.sh sets, one heuristic tile per problem instead of a dozen), so its
# run covers each launcher with fewer combinations; the compiled kernels cost nothing to enumerate.
FULL = BACKEND != "triton" and not TINY


# ---------------------------------------------------------------------------------------------
# The kernels under test, per backend: the same signatures for ember_C (CPU and CUDA) and Triton.
# ---------------------------------------------------------------------------------------------
def _kernels(backend: str) -> dict:
    if backend == "triton":
        why = ember.available_backends(DEV)["triton"]
        if why:
            sys.exit(f"SMOKE {DEV}/triton: unavailable: {why}")
        from ember.kernels import activation as ta
        from ember.kernels import gated as tg
        from ember.kernels import int8_gemm as ti
        from ember.kernels import linear as tl_
        from ember.kernels import moe as tm
        from ember.kernels import optim as to
        from ember.kernels import optim8bit as to8


        return dict(unary=ta.unary_act, unary_bwd=ta.unary_act_backward, gated=tg.gated_act,
                    gated_bwd=tg.gated_act_backward, linear=tl_.linear_act, linear_bwd=tl_.linear_act_backward,
                    gated_linear=tl_.gated_linear, gated_linear_bwd=tl_.gated_linear_backward,
                    quantize=ti.quantize_per_token,
                    w8a8=lambda x, w, s, b, sm, act: ti.int8_linear(x, w, s, b, sm, act, "w8a8"),
                    w8a16=lambda x, w, s, b, act: ti.int8_linear(x, w, s, b, None, act, "w8a16"),
                    optim=to.optim_step, adamw8bit=to8.adamw8bit_step,
                    # the fused linear + cross-entropy's Triton part is its row epilogue inside the chunk loop
                    # (the GEMMs are torch's): the op with backend="triton" runs exactly that
                    lce=lambda *a: LCE.lce_op(*a, "triton"),
                    lce_bwd=lambda *a: torch.ops.ember.linear_cross_entropy_backward(*a, "triton"),
                    moe=tm.grouped_gated_mlp, moe_bwd=tm.grouped_gated_mlp_backward)
    why = ember.available_backends(DEV)[backend]
    if why:
        sys.exit(f"SMOKE {DEV}/{backend}: unavailable: {why}")
    importlib.import_module("ember._C")  # registers the torch.ops.ember_C kernels

    C = torch.ops.ember_C
    k = dict(unary=C.unary_act, unary_bwd=C.unary_act_backward, gated=C.gated_act, gated_bwd=C.gated_act_backward,
             linear=C.linear_act, linear_bwd=C.linear_act_backward, gated_linear=C.gated_linear,
             gated_linear_bwd=C.gated_linear_backward, quantize=C.quantize_per_token, w8a8=C.int8_linear_w8a8,
             optim=C.optim_step, adamw8bit=C.adamw8bit_step, lce=C.linear_cross_entropy,
             lce_bwd=C.linear_cross_entropy_backward)
    if backend == "cpu":  # W8A16 and the grouped gated MLP on CUDA are Triton's
        k["w8a16"] = C.int8_linear_w8a16
        k["moe"], k["moe_bwd"] = C.grouped_gated_mlp, C.grouped_gated_mlp_backward
    return k


KERN = _kernels(BACKEND)


# ---------------------------------------------------------------------------------------------
# Checking.
# ---------------------------------------------------------------------------------------------
class Mismatch(AssertionError):
    pass


RESULTS: list[tuple[str, bool]] = []


def _flat(ts) -> torch.Tensor:
    if isinstance(ts, torch.Tensor):
        ts = [ts]
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in ts]) if ts else torch.zeros(0)


def close(name: str, got, want, dtype=None, atol=None, rtol=None) -> str:
    """Compare ``got`` (tensor or list) with ``want``; raise Mismatch or return the error summary."""
    g, w = _flat(got), _flat(want)
    if ARGS.perturb and ARGS.perturb in name and g.numel():
        g[0] += 1.0
    if g.shape != w.shape:
        raise Mismatch(f"{g.numel()} elements, reference has {w.numel()}")
    da, dr = TOLS[dtype or FP32]
    atol, rtol = (da if atol is None else atol), (dr if rtol is None else rtol)
    if not g.numel():
        return "empty"
    diff = (g - w).abs()
    scale = max(1.0, w.pow(2).mean().sqrt().item()) if torch.isfinite(w).all() else 1.0
    ok = (diff <= atol * scale + rtol * w.abs()) | (torch.isnan(g) & torch.isnan(w))
    err = torch.nan_to_num(diff, nan=math.inf).max().item()
    rel = ((g - w).norm() / w.norm().clamp_min(1e-300)).item()
    text = f"max|err| {err:.2e}  rel {rel:.1e}"
    if not bool(ok.all()):
        bad = (~ok).nonzero().reshape(-1)
        i = bad[0].item()
        raise Mismatch(f"{text}; {bad.numel()} of {g.numel()} elements off, first at [{i}]: {g[i].item():.6g} vs "
                       f"{w[i].item():.6g} (atol {atol:g} x {scale:.3g}, rtol {rtol:g})")
    return text


def check(group: str, name: str, fn) -> None:
    """Run one check (``fn`` returns its summary); print one line; never raise."""
    if ARGS.only and group not in ARGS.only:
        return
    try:
        text = fn()
        if DEV == "cuda":
            torch.cuda.synchronize()  # an asynchronous fault belongs to this check
        RESULTS.append((name, True))
        print(f"ok  {name:<50s} {text}", flush=True)
    except Mismatch as err:
        RESULTS.append((name, False))
        print(f"BAD {name:<50s} {err}", flush=True)
    except Exception as err:  # noqa: BLE001  (a kernel error is a failed check; the others still run)
        RESULTS.append((name, False))
        where = traceback.extract_tb(err.__traceback__)[-1]
        print(f"ERR {name:<50s} {type(err).__name__}: {str(err).splitlines()[0][:200]} "
              f"({os.path.basename(where.filename)}:{where.lineno})", flush=True)


def skip(group: str, name: str, reason: str) -> None:
    if not ARGS.only or group in ARGS.only:
        print(f"--  {name:<50s} skipped: {reason}", flush=True)


def rand(*shape, dtype=FP32, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEV, dtype=FP32) * scale).to(dtype)


def wide(t):
    return None if t is None else t.double()


def offset_view(n: int, dtype, scale=3.0) -> torch.Tensor:
    """n elements starting one element into their storage: no vector-aligned base."""
    return rand(n + 1, dtype=dtype, scale=scale)[1:]


def strided_rows(rows: int, cols: int, dtype, pad: int = 8, scale=1.0) -> torch.Tensor:
    """(rows, cols) with contiguous rows but a row stride of cols + pad."""
    return rand(rows, cols + pad, dtype=dtype, scale=scale)[:, :cols]


def cycle(seq, i):
    return seq[i % len(seq)]


# ---------------------------------------------------------------------------------------------
# The checks, group by group.
# ---------------------------------------------------------------------------------------------
def elementwise_dtypes():
    if TINY:
        return (FP32, BF16)
    return (FP32, BF16, FP16, FP64) if FULL else (FP32, BF16, FP64)


def unary_checks():
    n = 37 if TINY else 4100  # odd: a vector body and a scalar tail
    for di, dt in enumerate(elementwise_dtypes()):
        for view in ("contig", "offset"):
            acts = ACTS if FULL else (cycle(ACTS, di + (view == "offset") * 2), cycle(ACTS, di + 1 + (view == "offset") * 2))
            for act in acts:
                x = rand(n, dtype=dt, scale=3.0) if view == "contig" else offset_view(n, dt)
                g = rand(n, dtype=dt)
                tag = f"{act} {SHORT[dt]} n={n} {view}"
                check("unary", f"unary.fwd {tag}", lambda: close("unary.fwd " + tag, KERN["unary"](x, act),
                                                               A.act_reference(x.double(), act), dt))
                check("unary", f"unary.bwd {tag}", lambda: close("unary.bwd " + tag, KERN["unary_bwd"](g, x, act),
                                                               A.act_backward_reference(g.double(), x.double(), act), dt))


def gated_checks():
    rows, cols = (5, 24) if TINY else (33, 72)
    for di, dt in enumerate(elementwise_dtypes()):
        buf = rand(rows, 2 * cols + 2, dtype=dt, scale=3.0)
        layouts = {"halves": (buf[:, :cols], buf[:, cols:2 * cols]),  # x.chunk(2, -1) of a wider row
                   "offset": (buf[:, 1:cols + 1], buf[:, cols + 1:2 * cols + 1]),  # misaligned rows
                   "contig": (rand(rows, cols, dtype=dt, scale=3.0), rand(rows, cols, dtype=dt))}
        for li, (layout, (gate, up)) in enumerate(layouts.items()):
            acts = GATED_ACTS if FULL else (cycle(GATED_ACTS, di + li),)
            for act in acts:
                grad = rand(rows, cols, dtype=dt)
                tag = f"{act} {SHORT[dt]} {rows}x{cols} {layout}"
                check("gated", f"gated.fwd {tag}", lambda: close("gated.fwd " + tag, KERN["gated"](gate, up, act),
                                                               G.gated_reference(gate.double(), up.double(), act), dt))

                def bwd():
                    got = KERN["gated_bwd"](grad, gate, up, act)
                    want = G.gated_backward_reference(grad.double(), gate.double(), up.double(), act)
                    return close("gated.bwd " + tag, list(got), list(want), dt)

                check("gated", f"gated.bwd {tag}", bwd)


def gemm_tol(dt) -> dict:
    """GEMM outputs in fp16 / bf16: twice the elementwise tolerance. Each output sums K products of
    operands the kernel rounded once more than the float64 reference did (dpre before the backward
    GEMMs, a dequantized weight), the flash-attention rule's 2x of plain PyTorch's own error."""
    atol, rtol = TOLS[dt]
    return dict(dtype=dt) if dt in (FP32, FP64) else dict(dtype=dt, atol=2 * atol, rtol=2 * rtol)


def flash_rule_atol(dt, torch_lp, ref) -> float:
    """The atol (in close()'s units: times max(1, rms(ref))) that allows twice what plain PyTorch in
    dtype dt gets wrong against the float64 reference ``ref`` (the tests' flash-attention rule), and
    never less than the dtype's own atol. For 16-bit gradients: sums of rounded terms whose error a fixed
    atol misjudged in ~1 seeded run in 10."""
    ref = _flat(ref)
    torch_err = (_flat(torch_lp) - ref).abs().max().item()
    return max(TOLS[dt][0], 2 * torch_err / max(1.0, ref.pow(2).mean().sqrt().item()))


def gemm_dtypes():
    if TINY:
        return (FP32,) if BACKEND == "triton" and DEV == "cpu" else (FP32, BF16)  # interpreter bf16 dots are slow
    return (BF16, FP16, FP32) if FULL else (BF16, FP32)


def gemm_shapes():
    """(M, K, N, x layout). K % 8 == 0 and aligned: the CUDA mma kernel; K = 17 or an offset x: the
    cuBLAS fallback / Triton's pointer kernel; M = 1: decode."""
    if TINY:
        return [(1, 16, 8, "contig"), (9, 24, 10, "strided"), (5, 17, 7, "offset")]
    shapes = [(1, 72, 40, "contig"), (37, 72, 40, "strided"), (130, 136, 257, "contig"), (33, 17, 9, "contig"),
              (20, 64, 24, "offset")]
    return shapes if FULL else [shapes[1], shapes[3], shapes[4]]


def gemm_x(M, K, dt, layout):
    if layout == "strided":
        return strided_rows(M, K, dt)
    if layout == "offset":
        return rand(M * K + 1, dtype=dt)[1:].view(M, K)
    return rand(M, K, dtype=dt)


def linear_checks():
    lin_acts = ("none",) + ACTS
    for di, dt in enumerate(gemm_dtypes()):
        for si, (M, K, N, layout) in enumerate(gemm_shapes()):
            act = cycle(lin_acts, di + si)
            x = gemm_x(M, K, dt, layout)
            w = rand(N, K, dtype=dt, scale=K ** -0.5)
            b = rand(N, dtype=dt) if si % 2 == 0 else None
            r = rand(M, N, dtype=dt) if act != "relu" else None
            tag = f"{act}{'+bias' if b is not None else ''}{'+res' if r is not None else ''} {M}x{K}x{N} {SHORT[dt]} {layout}"
            keep = act != "none"

            def fwd():
                out, pre = KERN["linear"](x, w, b, r, act, True)
                want, want_pre = L.linear_reference(x.double(), w.double(), wide(b), wide(r), act)
                got, ref = [out], [want]
                if keep:
                    got, ref = got + [pre], ref + [want_pre]
                return close("linear.fwd " + tag, got, ref, **gemm_tol(dt))

            check("linear", f"linear.fwd {tag}", fwd)
            pre = L.linear_reference(x, w, b, None, act)[1] if keep else x.new_empty((0,))
            grad = rand(M, N, dtype=dt)

            def bwd():
                dx, dw, db = KERN["linear_bwd"](grad, x, w, pre, act, True, True, b is not None)
                want = L.linear_backward_reference(grad.double(), x.double(), w.double(), pre.double(), act)
                got, ref = [dx, dw], list(want[:2])
                if b is not None:  # the bias gradient: a column sum (a reduction kernel on Triton)
                    got, ref = got + [db], ref + [want[2]]
                return close("linear.bwd " + tag, got, ref, **gemm_tol(dt))

            check("linear_bwd", f"linear.bwd {tag}", bwd)


def gated_linear_checks():
    for di, dt in enumerate(gemm_dtypes()):
        for si, (M, K, N, layout) in enumerate(gemm_shapes()):
            act = cycle(GATED_ACTS, di + si)
            x = gemm_x(M, K, dt, layout)
            wg, wu = rand(N, K, dtype=dt, scale=K ** -0.5), rand(N, K, dtype=dt, scale=K ** -0.5)
            bg, bu = (rand(N, dtype=dt), rand(N, dtype=dt)) if si % 2 else (None, None)
            tag = f"{act}{'+bias' if bg is not None else ''} {M}x{K}x{N} {SHORT[dt]} {layout}"

            def fwd():
                h, pre = KERN["gated_linear"](x, wg, wu, bg, bu, act, True)
                want, want_pre = L.gated_linear_reference(x.double(), wg.double(), wu.double(), wide(bg), wide(bu), act)
                return close("gated_linear.fwd " + tag, [h, pre], [want, want_pre], **gemm_tol(dt))

            check("gated_linear", f"gated_linear.fwd {tag}", fwd)
            pre = L.gated_linear_reference(x, wg, wu, bg, bu, act)[1]
            grad = rand(M, N, dtype=dt)

            def bwd():
                got = KERN["gated_linear_bwd"](grad, x, wg, wu, pre, act, True, True, bg is not None)
                want = L.gated_linear_backward_reference(grad.double(), x.double(), wg.double(), wu.double(),
                                                         pre.double(), act)
                n = 5 if bg is not None else 3
                return close("gated_linear.bwd " + tag, list(got[:n]), list(want[:n]), **gemm_tol(dt))

            check("gated_linear_bwd", f"gated_linear.bwd {tag}", bwd)


def int8_shapes():
    """(M, K, N): K % 16 == 0 for the CUDA kernel; M = 1 decode, odd M and N for the tile edges."""
    if TINY:
        return [(1, 32, 16), (5, 64, 24)]
    return [(1, 64, 40), (33, 128, 80), (130, 256, 129)]


def int8_checks():
    dts = (FP32, BF16) if TINY else (FP32, BF16, FP16)
    for di, dt in enumerate(dts):
        for si, (M, K, N) in enumerate(int8_shapes()):
            x = strided_rows(M, K, dt, pad=16, scale=2.0)
            smooth = (torch.rand(K, device=DEV) + 0.5) if si % 2 else None
            tag = f"{M}x{K} {SHORT[dt]}{' smooth' if smooth is not None else ''}"

            def quant():
                q, s = KERN["quantize"](x, smooth)
                qr, sr = I.quantize_per_token_reference(x, smooth)
                # a rounding tie may land one code away; the scales are the same fp32 arithmetic
                return close("quantize " + tag, q, qr, atol=1.0, rtol=0) + "; scale " + close(
                    "quantize.scale " + tag, s, sr, FP32)

            check("quantize", f"quantize {tag}", quant)
            w, sw = I.quantize_weight(rand(N, K))
            bias = rand(N, dtype=dt) if si != 1 else None
            act = cycle(tuple(INT8_ACT_IDS), di + si)
            gtag = f"{act} {M}x{K}x{N} {SHORT[dt]}"
            # int32-exact products; what differs is a tie's code and the fp32 epilogue: 2e-3 of rms
            tol = gemm_tol(dt)
            tol = dict(tol, atol=max(tol.get("atol", TOLS[dt][0]), 2e-3), rtol=max(tol.get("rtol", TOLS[dt][1]), 2e-3))
            check("int8_gemm", f"w8a8 {gtag}", lambda: close(
                "w8a8 " + gtag, KERN["w8a8"](x, w, sw, bias, smooth, INT8_ACT_IDS[act]),
                I.int8_linear_reference(x, w, sw, bias, act, "w8a8", smooth), **tol))
            if BACKEND == "cuda":
                continue  # CUDA C++ covers per-channel W8A8 only; the rest is Triton's on a GPU
            wgp, sgp = I.quantize_weight(rand(N, K), group_size=32)
            check("int8_gemm", f"w8a8 grouped32 {gtag}", lambda: close(
                "w8a8 grouped32 " + gtag, KERN["w8a8"](x, wgp, sgp, bias, smooth, INT8_ACT_IDS[act]),
                I.int8_linear_reference(x, wgp, sgp, bias, act, "w8a8", smooth), **tol))
            # w8a16 reads x in its own precision: fp32 dots may run as tf32 on a GPU
            tol16 = dict(tol, atol=max(tol["atol"], 5e-3), rtol=max(tol["rtol"], 5e-3)) if DEV == "cuda" else tol
            for wq, sq, kind in ((w, sw, "w8a16"), (wgp, sgp, "w8a16 grouped32")):
                if BACKEND == "triton" and DEV == "cpu" and dt == BF16:
                    skip("int8_gemm", f"{kind} {gtag}", "the interpreter's bf16 tl.dot returns garbage (GPU only)")
                    continue
                check("int8_gemm", f"{kind} {gtag}", lambda: close(
                    f"{kind} {gtag}", KERN["w8a16"](x, wq, sq, bias, INT8_ACT_IDS[act]),
                    I.int8_linear_reference(x, wq, sq, bias, act, "w8a16"), **tol16))
            if BACKEND == "cpu" and N % 16 == 0:  # the packed VNNI layout
                packed = torch.ops.ember_C.int8_prepack(w, sw)
                check("int8_gemm", f"w8a8 packed {gtag}", lambda: close(
                    "w8a8 packed " + gtag, KERN["w8a8"](x, w, sw, bias, smooth, INT8_ACT_IDS[act], packed),
                    I.int8_linear_reference(x, w, sw, bias, act, "w8a8", smooth), **tol))


def _optim_sizes():
    # several tensors in one launch; 40000 spans several chunks with a tail
    return [(7,), (3, 5)] if TINY else [(7,), (33, 129), (40000,)]


# (kind, flags, hyper = [lr, h1, h2, eps, weight_decay]) covering each optimizer's main branches
OPTIM_CASES = [
    ("sgd", O.MOMENTUM | O.FIRST_STEP, [1e-2, 0.9, 0.0, 0.0, 1e-2]),
    ("sgd", O.MOMENTUM | O.NESTEROV, [1e-2, 0.9, 0.0, 0.0, 0.0]),
    ("adam", O.DECOUPLED, [1e-3, 0.9, 0.999, 1e-8, 1e-2]),
    ("adam", O.AMSGRAD | O.MAXIMIZE, [1e-3, 0.9, 0.999, 1e-8, 1e-2]),
    ("adagrad", 0, [1e-2, 1e-3, 0.0, 1e-10, 0.0]),
    ("rmsprop", O.CENTERED | O.MOMENTUM, [1e-2, 0.99, 0.9, 1e-8, 1e-2]),
    ("lion", 0, [1e-4, 0.9, 0.99, 0.0, 1e-2]),
]


def optim_checks():
    cases = [(k, f, h, FP32, False) for k, f, h in OPTIM_CASES]
    cases.append(("adam", O.DECOUPLED, OPTIM_CASES[2][2], BF16, True))  # bf16 params, fp32 master weights
    if not TINY:
        cases.append(("sgd", O.MOMENTUM, OPTIM_CASES[0][2], BF16, False))
    for ci, (kind, flags, hyper, dt, master) in enumerate(cases):
        # fp32 state; step counts on the device for half of the cases (capturable), on the host otherwise
        step_dev = DEV if ci % 2 else "cpu"
        tag = f"{kind} flags={flags} {SHORT[dt]}{' master' if master else ''} steps@{step_dev}"

        def run():
            ps = [rand(*s, dtype=dt) for s in _optim_sizes()]
            gs = [rand(*s, dtype=dt, scale=0.1) for s in _optim_sizes()]
            # state as after a few steps (positive: second moments, Adagrad sums); SGD's first step starts at 0
            s0 = [[torch.zeros(p.shape, device=DEV) if flags & O.FIRST_STEP else torch.rand(p.shape, device=DEV) * 0.01
                   for p in ps] for _ in range(3)]
            sets = [dict(p=[p.clone() for p in ps], s=[[t.clone() for t in slot] for slot in s0],
                         m=[p.float() for p in ps] if master else [],
                         st=[torch.full((), 3.0, device=step_dev) for _ in ps])
                    for _ in range(2)]  # the kernel's copy, the reference's copy
            lists = lambda d: (d["p"], gs, *d["s"], d["m"], d["st"])  # noqa: E731
            KERN["optim"](kind, *lists(sets[0]), hyper, flags, None, None, None)
            O.step(kind, *lists(sets[1]), hyper, flags, None, None, None, "reference")
            got, want = sets[0], sets[1]
            tol = dict(dtype=dt, atol=1e-6, rtol=1e-5) if dt == FP32 else dict(dtype=dt)
            return close("optim " + tag, got["p"] + got["m"] + sum(got["s"], []) + got["st"],
                         want["p"] + want["m"] + sum(want["s"], []) + want["st"], **tol)

        check("optim", f"optim {tag}", run)


def adamw8bit_checks():
    sizes = [(300,), (2, 256)] if TINY else [(300,), (4097,), (3, 256)]  # whole blocks and a tail block
    for dt in (FP32, BF16):
        for steps_n in (1, 2):
            tag = f"{SHORT[dt]} {steps_n} step{'s' if steps_n > 1 else ''} sizes={[s for s in sizes]}"

            def run():
                ps = [rand(*s, dtype=dt) for s in sizes]
                state = []
                for _ in range(2):
                    nb = [-(-p.numel() // O8.BLOCK) for p in ps]
                    state.append(dict(p=[p.clone() for p in ps],
                                      m=[torch.zeros(p.shape, dtype=torch.int8, device=DEV) for p in ps],
                                      v=[torch.zeros(p.shape, dtype=torch.uint8, device=DEV) for p in ps],
                                      am=[torch.zeros(n, device=DEV) for n in nb],
                                      av=[torch.zeros(n, device=DEV) for n in nb],
                                      st=[torch.zeros((), device=DEV) for _ in ps]))
                hyper = [1e-3, 0.9, 0.999, 1e-8, 1e-2]
                for _ in range(steps_n):
                    gs = [rand(*s, dtype=dt, scale=0.1) for s in sizes]
                    for si, d in enumerate(state):
                        args = (d["p"], gs, d["m"], d["v"], d["am"], d["av"], d["st"], hyper, O.DECOUPLED, None,
                                None, None)
                        if si == 0:
                            KERN["adamw8bit"](*args)
                        else:
                            O8.adamw8bit_step(*args, "reference")
                got, want = state
                text = close("adamw8bit " + tag, got["p"] + got["am"] + got["av"], want["p"] + want["am"] + want["av"],
                             dtype=dt, atol=1e-6 if dt == FP32 else None, rtol=1e-5 if dt == FP32 else None)
                # the codes: bit for bit is the tests' contract; here a tie may move one code by one
                return text + "; codes " + close("adamw8bit.codes " + tag, got["m"] + got["v"], want["m"] + want["v"],
                                                 atol=1.0, rtol=0)

            check("adamw8bit", f"adamw8bit {tag}", run)


def lce_checks():
    shapes = [(7, 16, 37), (33, 8, 129)] if TINY else [(1, 7, 5), (37, 19, 257), (130, 64, 4097)]
    dtypes = [FP32] if BACKEND == "triton" and DEV == "cpu" else [FP32, BF16] + ([FP16] if FULL else [])
    for i, (n, h, v) in enumerate(shapes):
        for dt in dtypes:
            for reduction in ("mean", "none"):
                smoothing = 0.1 if i % 2 else 0.0
                tag = f"{n}x{h}x{v} {SHORT[dt]} {reduction} ls={smoothing} chunk=16"

                def run():
                    x = rand(n, h, dtype=dt)
                    w = rand(v, h, dtype=dt, scale=h ** -0.5)
                    b = rand(v, dtype=dt)
                    t = torch.randint(0, v, (n,), device=DEV)
                    t[1::4] = -100  # ignored rows (never row 0)
                    leaves = [a.double().requires_grad_(True) for a in (x, w, b)]
                    want = LCE.reference(leaves[0], leaves[1], t, leaves[2], reduction=reduction,
                                         label_smoothing=smoothing)
                    if reduction == "mean":
                        loss, dx, dw, db = KERN["lce"](x, w, b, t, -100, "mean", smoothing, True, True, True, 16)
                        want.backward()
                    else:
                        loss, *_ = KERN["lce"](x, w, b, t, -100, "none", smoothing, False, False, False, 16)
                        g = rand(n)
                        dx, dw, db = KERN["lce_bwd"](g, x, w, b, t, -100, smoothing, True, True, True, 16)
                        want.backward(g.double())
                    # the loss is fp32, but low-precision inputs run their GEMM in their dtype (as torch's
                    # F.linear does), so its error is that dtype's
                    text = close("cross_entropy.loss " + tag, loss, want.detach(), dtype=dt)
                    atol = None
                    if dt != FP32:
                        # bf16/fp16 gradients are sums (over the vocabulary for dx, over the rows for dW)
                        # of rounded terms: allow twice what torch's own F.linear + cross_entropy in that
                        # dtype gets wrong against float64 (the tests' flash-attention rule), and never
                        # less than the dtype's atol. A fixed atol failed 1 seeded run in ~10 on dW.
                        tl = [a.detach().requires_grad_(True) for a in (x, w, b)]
                        ce = torch.nn.functional.cross_entropy(
                            torch.nn.functional.linear(tl[0], tl[1], tl[2]).float(), t, ignore_index=-100,
                            reduction=reduction, label_smoothing=smoothing)
                        ce.backward() if reduction == "mean" else ce.backward(g.float())
                        atol = flash_rule_atol(dt, [a.grad for a in tl], [a.grad for a in leaves])
                    return text + "; grads " + close("cross_entropy.grads " + tag, [dx, dw, db],
                                                     [a.grad for a in leaves], dtype=dt, atol=atol)

                check("cross_entropy", f"cross_entropy {tag}", run)


def moe_checks():
    """The grouped gated MLP (mixture-of-experts experts): forward (out, [gate | up]) and backward (dx,
    dW_gate_up, dW_down) against the float64 reference, with an empty expert, rows past the last
    offset and CUDA offsets (int32) as well as CPU ones."""
    if "moe" not in KERN:
        return skip("moe", "grouped_gated_mlp", f"no {BACKEND} kernel (the Triton one runs it on GPU)")
    # (experts, hidden, intermediate, rows per expert, rows past the last offset)
    cases = [(3, 16, 8, [3, 0, 5], 2)]
    if not TINY:
        cases = [(3, 40, 24, [1, 0, 7], 2), (8, 136, 96, [40, 0, 13, 77, 1, 9, 0, 60], 0),
                 (4, 64, 256, [300, 5, 2, 200], 3)]
    for ci, (experts, hidden, inter, counts, tail) in enumerate(cases):
        for dt in gemm_dtypes():
            act = cycle(GATED_ACTS, ci)
            rows = sum(counts) + tail
            x = rand(rows, hidden, dtype=dt)
            wgu = rand(experts, 2 * inter, hidden, dtype=dt, scale=hidden ** -0.5)
            wd = rand(experts, hidden, inter, dtype=dt, scale=inter ** -0.5)
            offsets = torch.tensor(counts).cumsum(0)
            if ci % 2 and DEV == "cuda":
                offsets = offsets.to(DEV, torch.int32)
            grad = rand(rows, hidden, dtype=dt)
            tag = f"{act} E={experts} {hidden}x{inter} rows={rows} {SHORT[dt]}"

            def fwd():
                out, pre = KERN["moe"](x, wgu, wd, offsets, act, True)
                want, want_pre = MOE.grouped_gated_mlp_reference(x.double(), wgu.double(), wd.double(), offsets, act)
                return close("moe.fwd " + tag, [out, pre], [want, want_pre], **gemm_tol(dt))

            check("moe", f"moe.fwd {tag}", fwd)
            pre = MOE.grouped_gated_mlp_reference(x, wgu, wd, offsets, act)[1]

            def bwd():
                got = KERN["moe_bwd"](grad, x, wgu, wd, offsets, pre, act, True, True)
                want = MOE.grouped_gated_mlp_backward_reference(grad.double(), x.double(), wgu.double(), wd.double(),
                                                                offsets, pre.double(), act)
                if dt in (FP32, FP64):
                    return close("moe.bwd " + tag, list(got), list(want), dtype=dt)
                # 16-bit: dh is rounded before the gating and dgate / dup before their GEMMs, as in eager
                # torch; the reference in dt does the same, and its error sets the bar
                lp = MOE.grouped_gated_mlp_backward_reference(grad, x, wgu, wd, offsets, pre, act)
                return close("moe.bwd " + tag, list(got), list(want), dtype=dt, atol=flash_rule_atol(dt, lp, want),
                             rtol=2 * TOLS[dt][1])

            check("moe", f"moe.bwd {tag}", bwd)


def main() -> int:
    seed = ARGS.seed if ARGS.seed is not None else random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    where = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    print(f"# gpu_smoke: device {DEV} ({where}), backend {BACKEND}, {'tiny' if TINY else 'full'} shapes, seed {seed}, "
          f"torch {torch.__version__}" + (f", TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
                                          f"EMBER_TRITON_AUTOTUNE={os.environ.get('EMBER_TRITON_AUTOTUNE', '1')}"
                                          if BACKEND == "triton" else ""), flush=True)
    for fn in (unary_checks, gated_checks, linear_checks, gated_linear_checks, int8_checks, optim_checks,
               adamw8bit_checks, lce_checks, moe_checks):
        fn()
    if DEV == "cuda":
        torch.cuda.synchronize()
    bad = [name for name, ok in RESULTS if not ok]
    head = f"SMOKE {DEV}/{BACKEND}:"
    took = f"({time.perf_counter() - t0:.1f} s, seed {seed})"
    if not RESULTS:
        print(f"{head} FAILED: no check ran (--only {ARGS.only}?) {took}")
        return 1
    if bad:
        shown = ", ".join(bad[:8]) + (f", ... {len(bad) - 8} more" if len(bad) > 8 else "")
        print(f"{head} FAILED {len(bad)} of {len(RESULTS)}: {shown} {took}")
        return 1
    print(f"{head} all {len(RESULTS)} ok {took}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
