"""``python -m ember compile-check``: compile every kernel for real GPUs, on a machine without one.

Triton: a stand-in driver reports an sm_90a (H200-like) or sm_80 (A100-like) target and
``kernels/_target.py`` tells the launchers to pick exactly what they would pick on that GPU. The
launchers are then called with small CPU tensors (the same calls ember's dispatch makes), and every
kernel launch they make is compiled (``JITFunction.run(..., warmup=True)``: the real frontend, LLVM and
the bundled ptxas) instead of run. So what is compiled is what would be launched: the constexprs, the
launch options, the tile configs the GEMM tuner may try. Errors the interpreter never sees (globals that
are not constexpr, int8 dots with K < 32, shared memory over the per-block limit) show up here.

CUDA C++: each ``csrc/cuda/*.cu`` through nvcc with ``-Xptxas -v`` for each arch (skipped if nvcc is
absent). A kernel that spills to local memory fails the check; a stack frame alone is only reported.

Per specialisation: pass/fail, registers, spill bytes and shared memory (registers and spills from
ptxas' own report, shared memory from the compiled kernel's metadata). Results are cached under
``$EMBER_CACHE_DIR/compile_check`` (default ``~/.cache/ember/compile_check``), keyed by the kernel
source hash (Triton's, which covers the jitted functions it calls), the specialisation, the arch and
the triton (or nvcc) version, so a rerun with unchanged kernels only replays the launchers.

    python -m ember compile-check                 # sm_90a and sm_80, every specialisation
    python -m ember compile-check --quick         # a representative subset (CI)
    python -m ember compile-check --arch 80 -j 4 --json report.json

Exit status 1 when anything failed.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ARCHS = {  # arch -> (device name, capability, SM count) of the GPU the launchers are told they run on
    90: ("NVIDIA H200 (compile-only)", (9, 0), 132),
    80: ("NVIDIA A100-SXM4-80GB (compile-only)", (8, 0), 108),
}
SMEM_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory one block may opt into
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------------------------
# Result cache: one small JSON file per key, written atomically (parallel workers share it).
# ---------------------------------------------------------------------------------------------
def cache_dir() -> str:
    root = os.environ.get("EMBER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ember")
    return os.path.join(root, "compile_check")


def _cache_get(key: str):
    try:
        with open(os.path.join(cache_dir(), key[:2], key + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _cache_put(key: str, rec: dict) -> None:
    d = os.path.join(cache_dir(), key[:2])
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(rec, f)
        os.replace(tmp, os.path.join(d, key + ".json"))
    except OSError:
        pass


def _digest(*parts) -> str:
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:40]


# ---------------------------------------------------------------------------------------------
# ptxas -v reports (Triton's, nvcc's): per entry function registers, stack, spills, smem.
# ---------------------------------------------------------------------------------------------
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> dict:
    """{entry function: {regs, stack, spill_stores, spill_loads, smem}} from ``ptxas -v`` output."""
    out, cur = {}, None
    for line in text.splitlines():
        m = _ENTRY.search(line) or _PROPS.search(line)
        if m:
            cur = m.group(1)
            out.setdefault(cur, {"regs": None, "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0})
            continue
        if cur is None:
            continue
        m = _FRAME.search(line)
        if m:
            out[cur].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _USED.search(line)
        if m:
            out[cur]["regs"] = int(m.group(1))
            s = _SMEM.search(line)
            out[cur]["smem"] = int(s.group(1)) if s else 0
    return {k: v for k, v in out.items() if v["regs"] is not None}  # entries, not device functions


def _short_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Triton's CompilationError puts the source excerpt first and the reason last; keep the reason.
    keep = [ln for ln in lines if "Error" in ln or "error" in ln] or lines
    return " | ".join(keep[-3:])[:600]


# ---------------------------------------------------------------------------------------------
# Triton: the stand-in driver and the compile-instead-of-launch hook.
# ---------------------------------------------------------------------------------------------
class _StandInDriver:
    """What JITFunction.run asks of a driver, for a GPU that is not there. The device id is the arch,
    so each arch gets its own per-device kernel cache inside one process."""

    def __init__(self):
        self.arch = 90

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


class _State:
    driver: _StandInDriver | None = None
    orig_run = None
    arch = 90
    use_cache = True
    records: list = []
    seen: set = set()


def _arg_sig(a) -> str:
    import torch

    if isinstance(a, torch.Tensor):
        return str(a.dtype).replace("torch.", "") + ("" if a.data_ptr() % 16 == 0 else "@u")
    if hasattr(a, "block_shape") and hasattr(a, "base"):  # a TensorDescriptor
        return f"desc{list(a.block_shape)}:{str(a.base.dtype).replace('torch.', '')}"
    if isinstance(a, bool):
        return str(a)
    if isinstance(a, int):  # triton specialises ints equal to 1 and multiples of 16
        return "1" if a == 1 else ("i16" if a % 16 == 0 else "i")
    if isinstance(a, float):
        return "f"
    return type(a).__name__


def _fmt(v) -> str:
    return str(v).replace("torch.", "").replace(" ", "")


def _ptxas_fallback(kernel, arch: int) -> dict:
    """Registers and spills by running triton's ptxas -v on the kernel's PTX (when ptxas did not run
    in this process: the kernel came from Triton's own cache)."""
    from triton import knobs
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    ptx = kernel.asm.get("ptx")
    if not ptx:
        return {}
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([knobs.nvidia.ptxas.path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o",
                            os.path.join(d, "k.o")], capture_output=True, text=True)
    return next(iter(parse_ptxas(r.stderr + r.stdout).values()), {})


def _compile_only_run(self, *args, grid, warmup, **kwargs):
    """JITFunction.run, compiling instead of launching, recording one result per specialisation."""
    import triton

    st = _State
    name = self.fn.__name__
    label = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(kwargs.items()))
    sig = ",".join(_arg_sig(a) for a in args)
    key = _digest(self.cache_key, name, sig, label, st.arch, triton.__version__)
    if key in st.seen:
        return None
    st.seen.add(key)
    rec = _cache_get(key) if st.use_cache else None
    if rec is not None:
        rec["cached"] = True
        st.records.append(rec)
        return None
    rec = {"kind": "triton", "kernel": name, "arch": st.arch, "spec": label, "sig": sig, "status": "ok", "error": "",
           "regs": None, "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem": None, "cached": False}
    from triton import knobs

    t0 = time.perf_counter()
    buf = io.StringIO()
    try:
        with knobs.nvidia.scope(), contextlib.redirect_stdout(buf):
            knobs.nvidia.dump_ptxas_log = True
            kernel = st.orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        info = next(iter(parse_ptxas(buf.getvalue()).values()), None) or _ptxas_fallback(kernel, st.arch)
        rec.update({k: info.get(k, rec[k]) for k in ("regs", "spill_stores", "spill_loads", "stack")})
        rec["smem"] = int(kernel.metadata.shared)
        if rec["smem"] > SMEM_LIMIT[st.arch]:
            rec["status"] = "fail"
            rec["error"] = f"shared memory {rec['smem']} B > {SMEM_LIMIT[st.arch]} B per block on sm_{st.arch}"
    except Exception as err:  # noqa: BLE001  (a compile error is the result being collected)
        rec["status"], rec["error"] = "fail", _short_error(err)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    _cache_put(key, rec)
    st.records.append(dict(rec))
    return None


class _CompileAllTuner:
    """Stands in for kernels.linear.TUNER: compiles every candidate tile config the real tuner would
    time (``full``), or only the heuristic choice (--quick: what EMBER_TRITON_AUTOTUNE=0 launches)."""

    def __init__(self, full: bool):
        self.full = full

    def config(self, key, launch, candidates=None, default=None, tune=True):
        chosen = tuple(default) if default is not None else tuple(candidates[0])
        for cfg in (candidates if self.full else [chosen]):
            launch(tuple(cfg))
        return chosen


def _install(arch: int, full: bool, use_cache: bool) -> None:
    """Once per process: the stand-in driver, the run hook, compile target and tuner for ``arch``."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from ember.kernels import _target, linear

    if _State.driver is None:
        _State.driver = _StandInDriver()
        driver.set_active(_State.driver)
        _State.orig_run = JITFunction.run
        JITFunction.run = _compile_only_run
    _State.driver.arch = _State.arch = arch
    _State.use_cache = use_cache
    name, cap, sms = ARCHS[arch]
    _target.set_compile_target(_target.CompileTarget(name, cap, sms))
    linear.TUNER = _CompileAllTuner(full)


# ---------------------------------------------------------------------------------------------
# The launcher calls: what ember's dispatch makes, with small CPU tensors.
# ---------------------------------------------------------------------------------------------
def _acts():
    from . import activations  # imports torch, which only the launcher calls need

    return activations.UNARY, activations.GATED


def _dtypes(names):
    import torch

    return [getattr(torch, n) for n in names]


def _c_unary(dt, act):
    import torch

    from ember.kernels import activation as ka

    x = torch.randn(4097).to(dt)
    ka.unary_act(x, act)
    ka.unary_act_backward(x, x, act)


def _c_gated(dt, act):
    import torch

    from ember.kernels import gated as kg

    both = torch.randn(8, 66).to(dt)
    gate, up = both[:, :33], both[:, 33:]  # halves of one projection: row strides, FLAT=False
    kg.gated_act(gate.contiguous(), up.contiguous(), act)  # FLAT=True
    kg.gated_act(gate, up, act)
    kg.gated_act_backward(gate.contiguous(), gate, up, act)
    kg.gated_act_backward(gate.contiguous(), gate.contiguous(), up.contiguous(), act)


@contextlib.contextmanager
def _fp32_precision(precision):
    import torch

    from ember.kernels import linear as kl

    if precision is None or kl.fp32_matmul_precision() == precision:
        yield
        return
    m = torch.backends.cuda.matmul
    saved = m.fp32_precision
    m.fp32_precision = precision
    try:
        yield
    finally:
        m.fp32_precision = saved


def _c_linear_fwd(dt, variant, M, precision, epilogues):
    """Forward GEMMs as ops.linear / ops.gated_linear launch them (variant "pointer" or "tma")."""
    import torch

    from ember.kernels import linear as kl

    N, K = 160, 96
    x, w, w2 = torch.randn(M, K).to(dt), torch.randn(N, K).to(dt), torch.randn(N, K).to(dt)
    b, b2, r = torch.randn(N).to(dt), torch.randn(N).to(dt), torch.randn(M, N).to(dt)
    with _fp32_precision(precision):
        for act, bias, res, gated, save in epilogues:
            kl.gemm(x, w, b if bias else None, r if res else None, act, w2=w2 if gated else None,
                    b2=b2 if (gated and bias) else None, save_pre=save, variant=variant)


def _c_linear_bwd(dt, M, precision):
    """The backward's GEMMs (transposed views: pointer kernel) and the activation-grad / bias pass."""
    import torch

    from ember.kernels import linear as kl

    N, K = 160, 96
    g, x, w = torch.randn(M, N).to(dt), torch.randn(M, K).to(dt), torch.randn(N, K).to(dt)
    with _fp32_precision(precision):
        kl.gemm(g, w.t())  # dx = dpre @ W
        kl.gemm(g.t(), x.t())  # dW = dpre^T @ x
        kl.gemm(g, w.t(), residual=kl.gemm(g, w.t())[0])  # gated dx: dgate @ Wg + dup @ Wu
    for act in ("none",) + _acts()[0]:
        for need_db in (True, False):
            kl.act_grad_and_bias(g, g, act, need_db)


def _c_moe(dt, rows_per_expert, precision):
    """The grouped gated MLP's forward and backward (kernels/moe.py) as ops.grouped_gated_mlp launches
    them: 4 experts, one of them empty, at a decode-like and a prefill-like row count."""
    import torch

    from ember.kernels import moe as km

    E, H, I = 4, 96, 80
    counts = [rows_per_expert, 0, rows_per_expert + 3, 1]
    rows = sum(counts)
    x, g = torch.randn(rows, H).to(dt), torch.randn(rows, H).to(dt)
    wgu, wd = torch.randn(E, 2 * I, H).to(dt), torch.randn(E, H, I).to(dt)
    offsets = torch.tensor(counts).cumsum(0)
    with _fp32_precision(precision):
        for act in _acts()[1]:
            km.grouped_gated_mlp(x, wgu, wd, offsets, act, True)
        km.grouped_gated_mlp_backward(g, x, wgu, wd, offsets, torch.randn(rows, 2 * I).to(dt), "silu", True, True)


def _c_quantize(dt, K):
    import torch

    from ember.kernels import int8_gemm as ki

    x = torch.randn(33, K).to(dt)
    ki.quantize_per_token(x, None)
    ki.quantize_per_token(x, torch.rand(K) + 0.5)


def _c_int8(mode, dt, M, group, acts):
    import torch

    from ember.kernels import int8_gemm as ki

    N, K = 160, 384  # K a multiple of 128, 48, 32 and 16
    x = torch.randn(M, K).to(dt)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    sw = torch.rand(N) if group is None else torch.rand(N, K // group)
    for act in acts:
        for bias in (torch.randn(N).to(dt), None):
            ki.int8_linear(x, w, sw, bias, None, act, mode)
    ki.int8_linear(x, w, sw, None, torch.rand(K) + 0.5, -1, mode)  # SmoothQuant multiplier


def _c_optim(dt, sdt, kinds):
    import torch

    from ember.kernels import optim as ko

    ps = [torch.randn(7).to(dt), torch.randn(33, 129).to(dt)]
    gs = [p.clone() for p in ps]
    st = [torch.zeros(p.shape, dtype=sdt) for p in ps]
    steps = [torch.tensor(0.0) for _ in ps]
    hyper = [1e-3, 0.9, 0.999, 1e-8, 0.01]
    for kind, flag_list in kinds.items():
        for flags in flag_list:
            ko.optim_step(kind, ps, gs, st, st, st, [], steps, hyper, flags, None, None, None)
    if dt != torch.float32:  # fp32 master weights, AMP scale / found_inf, tensor lr
        masters = [p.float() for p in ps]
        ko.optim_step("adam", ps, gs, st, st, [], masters, steps, hyper, 2, torch.tensor(1e-3), torch.tensor(2.0),
                      torch.tensor(0.0))


def _c_optim8bit(dt):
    import torch

    from ember.kernels import optim8bit as k8

    n = 4097
    nb = (n + 255) // 256
    ps = [torch.randn(n).to(dt)]

    def state():
        return ([torch.zeros(n, dtype=torch.int8)], [torch.zeros(n, dtype=torch.uint8)], [torch.zeros(nb)],
                [torch.zeros(nb)])

    hyper = [1e-3, 0.9, 0.999, 1e-8, 0.01]
    k8.adamw8bit_step(ps, [p.clone() for p in ps], *state(), [torch.tensor(0.0)], hyper, 2, None, None, None)
    k8.adamw8bit_step(ps, [p.clone() for p in ps], *state(), [torch.tensor(0.0)], hyper, 3, torch.tensor(1e-3),
                      torch.tensor(2.0), torch.tensor(0.0))


def _c_cross_entropy(V):
    import torch

    from ember.kernels import linear_cross_entropy as kce

    logits, target, loss = torch.randn(7, V), torch.randint(0, V, (7,)), torch.empty(7)
    kce.cross_entropy_rows(logits, target, loss, -100, 0.0, False, 1.0, None)  # no grad (eval)
    kce.cross_entropy_rows(logits, target, loss, -100, 0.1, True, 0.25, None)  # mean / sum: one scale
    kce.cross_entropy_rows(logits, target, loss, -100, 0.0, True, 1.0, torch.rand(7))  # "none": per row


def triton_cases(arch: int, quick: bool) -> list:
    """[(family, label, fn, args)]: the launcher calls for one arch, most expensive first."""
    P = functools.partial
    ACTS, GATED_ACTS = _acts()
    floats = _dtypes(("float32", "bfloat16") if quick else ("float32", "float16", "bfloat16", "float64"))
    gemm_dtypes = _dtypes(("bfloat16", "float32") if quick else ("bfloat16", "float16", "float32"))
    cases = []
    # Linear: per dtype and variant, the tile configs (all candidates, or the heuristic's pick at a decode,
    # a small and a large M) on the two epilogues that matter most for registers (bias + silu + saved
    # pre-activation; the gated pair), then every other epilogue at the large-M config.
    variants = ["pointer"] + (["tma"] if arch >= 90 else [])
    main_epi = [("silu", True, False, False, True), ("gelu", True, False, True, True)]
    other_epi = [(a, True, False, False, a != "none") for a in ("none",) + ACTS]
    other_epi += [("none", True, True, False, False), ("gelu", False, True, False, False)]
    other_epi += [(a, b, False, True, s) for a in GATED_ACTS for b, s in ((True, True), (False, False))]
    for dt in gemm_dtypes:
        precisions = [None]
        if str(dt) == "torch.float32":
            precisions = ["ieee", "tf32"]
        for prec in precisions:
            for variant in variants:
                ms = (1, 256) if quick else (1, 40, 256)
                for M in ms:
                    cases.append(("linear", f"gemm {variant} {dt} M={M} {prec or ''}",
                                  _c_linear_fwd, (dt, variant, M, prec, main_epi)))
                if not quick or str(dt) == "torch.bfloat16":
                    cases.append(("linear", f"gemm epilogues {variant} {dt} {prec or ''}", _c_linear_fwd,
                                  (dt, variant, 256, prec, other_epi)))
            cases.append(("linear", f"backward {dt} {prec or ''}", _c_linear_bwd, (dt, 256, prec)))
    # Mixture-of-experts: per GEMM dtype, the decode (16-row) and the prefill (64-row) tiles.
    for dt in gemm_dtypes:
        for prec in (["ieee"] if str(dt) == "torch.float32" else [None]):
            for rpe in ((4, 200) if quick else (4, 30, 200)):
                cases.append(("moe", f"grouped gated mlp {dt} rows/expert={rpe} {prec or ''}", _c_moe,
                              (dt, rpe, prec)))
    # Int8: both modes, the three M tiles, per-channel and grouped weights (128 / 32: one dot per block;
    # 16 and 48: the split 32-wide int8 dot), every activation in full mode.
    groups = (None, 128, 16) if quick else (None, 128, 48, 32, 16)
    from . import activations

    acts = (-1,) if quick else tuple(activations.ID.values())
    for mode in ("w8a8", "w8a16"):
        for dt in (_dtypes(("bfloat16", "float32")) if quick else floats):
            for M in ((1, 256) if quick else (1, 33, 256)):
                for g in groups:
                    cases.append(("int8", f"{mode} {dt} M={M} group={g}", _c_int8, (mode, dt, M, g, acts)))
    for dt in floats:
        for K in ((4096,) if quick else (768, 4096)):
            cases.append(("int8", f"quantize {dt} K={K}", _c_quantize, (dt, K)))
    # The fused linear + cross-entropy's row kernel (fp32 logits whatever the inputs): a vocabulary
    # below one block and one of many blocks.
    for V in ((32000,) if quick else (1000, 32000, 128256)):
        cases.append(("linear_cross_entropy", f"cross-entropy rows V={V}", _c_cross_entropy, (V,)))
    # Elementwise.
    for dt in floats:
        for act in ACTS:
            cases.append(("activation", f"unary {act} {dt}", _c_unary, (dt, act)))
        for act in GATED_ACTS:
            cases.append(("gated", f"gated {act} {dt}", _c_gated, (dt, act)))
    # Optimizers: the kinds and flag combinations the torch.optim drop-ins produce.
    kinds = {"sgd": [0, 32, 32 | 64, 32 | 8 | 1], "adam": [0, 2, 4, 2 | 4 | 1], "adagrad": [0],
             "rmsprop": [0, 16 | 32], "lion": [0]}
    if quick:
        kinds = {"sgd": [32], "adam": [2], "rmsprop": [16 | 32], "adagrad": [0], "lion": [0]}
    import torch

    pairs = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)]
    if not quick:
        pairs += [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]
    for dt, sdt in pairs:
        cases.append(("optim", f"optim {dt}/{sdt}", _c_optim, (dt, sdt, kinds)))
    for dt in (_dtypes(("float32", "bfloat16")) if quick else _dtypes(("float32", "float16", "bfloat16"))):
        cases.append(("optim8bit", f"adamw8bit {dt}", _c_optim8bit, (dt,)))
    return cases


_CASES: dict = {}


def _triton_task(arch: int, index: int, quick: bool, use_cache: bool) -> dict:
    """Run launcher call ``index`` of ``arch`` in this (worker) process; its records and any error
    the launcher itself raised."""
    _install(arch, full=not quick, use_cache=use_cache)
    if (arch, quick) not in _CASES:
        _CASES[arch, quick] = triton_cases(arch, quick)
    cases = _CASES[arch, quick]
    family, label, fn, args = cases[index]
    _State.records = []
    t0 = time.perf_counter()
    err = ""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001  (a launcher that raised is a failure to report, not to crash on)
        err = _short_error(e)
    for r in _State.records:
        r["family"] = family
    return {"family": family, "label": label, "arch": arch, "error": err, "records": _State.records,
            "seconds": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------------------------------------
# CUDA C++: nvcc -Xptxas -v per file and arch.
# ---------------------------------------------------------------------------------------------
def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    cand = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    return cand if os.path.exists(cand) else None


def _nvcc_flags() -> list:
    path = os.path.join(_ROOT, "csrc", "cuda", "nvcc_flags.txt")
    try:
        with open(path) as f:
            flags = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError:
        flags = ["-std=c++17", "-O3"]
    return flags


def _demangle(names: list) -> dict:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    r = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.splitlines()
    return dict(zip(names, out)) if r.returncode == 0 and len(out) == len(names) else {n: n for n in names}


def _short_kernel(name: str) -> str:
    # ember::cuda::(anonymous namespace)::linear_mma_kernel<__nv_bfloat16, 64, -1, true>(...) -> linear_mma_kernel<...>
    name = name.replace("(anonymous namespace)::", "").split("(")[0]
    name = re.sub(r"^.*::", "", name.split("<")[0]) + ("<" + name.split("<", 1)[1] if "<" in name else "")
    return name


@functools.lru_cache(maxsize=None)
def _nvcc_version(nvcc: str) -> list:
    # Once per process, not once per (file, arch) task.
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:]


def _cuda_task(path: str, arch: int, nvcc: str, use_cache: bool) -> dict:
    """Compile one .cu for one arch; per-kernel ptxas numbers. Cached by source + headers + flags +
    nvcc version."""
    # The build's flags, plus warnings as errors (as CMake's cuda_compile_check), so CI needs one nvcc pass.
    flags = _nvcc_flags() + ["-Xcompiler=-Wall", "--Werror", "all-warnings"]
    gencode = "arch=compute_90a,code=sm_90a" if arch == 90 else f"arch=compute_{arch},code=sm_{arch}"
    # Every header a .cu may include: .h and .cuh ("*.h*" would miss "common.cuh", which once let a
    # changed header replay a stale result).
    headers = sorted(p for ext in ("*.h", "*.cuh", "*.hpp")
                     for p in glob.glob(os.path.join(_ROOT, "csrc", "**", ext), recursive=True))
    blob = []
    for p in [path] + headers:
        with open(p, "rb") as f:
            blob.append(hashlib.sha256(f.read()).hexdigest())
    version = _nvcc_version(nvcc)
    key = _digest("cuda", *blob, *flags, gencode, version)
    file = os.path.relpath(path, _ROOT)
    hit = _cache_get(key) if use_cache else None
    if hit is not None:
        hit["cached"] = True
        return hit
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        cmd = [nvcc, "-c", "-gencode", gencode, *flags, "-I", os.path.join(_ROOT, "csrc"), "-Xptxas", "-v", path,
               "-o", os.path.join(d, "k.o")]
        r = subprocess.run(cmd, capture_output=True, text=True)
    log = r.stderr + r.stdout
    res = {"kind": "cuda", "file": file, "arch": arch, "status": "ok", "error": "", "kernels": [], "cached": False,
           "seconds": round(time.perf_counter() - t0, 1)}
    if r.returncode != 0:
        errs = [ln for ln in log.splitlines() if "error" in ln]
        res["status"], res["error"] = "fail", " | ".join(errs[:4])[:800] or log[-800:]
    info = parse_ptxas(log)
    names = _demangle(list(info))
    for mangled, v in info.items():
        k = dict(v, kernel=_short_kernel(names[mangled]), status="ok", error="")
        if v["spill_stores"] or v["spill_loads"]:
            k["status"] = "fail"
            k["error"] = f"spills to local memory: {v['spill_stores']} B stores, {v['spill_loads']} B loads"
        elif v["stack"]:
            k["note"] = f"{v['stack']} B stack frame (no spills)"
        res["kernels"].append(k)
    if res["status"] == "ok" and any(k["status"] != "ok" for k in res["kernels"]):
        res["status"], res["error"] = "fail", "kernels spill to local memory"
    # An nvcc stopped by a signal (a job killed, the machine out of memory) says nothing about the source:
    # caching it would replay that failure in every later run until the source changes.
    if r.returncode >= 0:
        _cache_put(key, res)
    return res


# ---------------------------------------------------------------------------------------------
# Driver: schedule, collect, report.
# ---------------------------------------------------------------------------------------------
def _run_any(task):
    kind, args = task
    return _cuda_task(*args) if kind == "cuda" else _triton_task(*args)


def _summarise(triton_results: list, cuda_results: list) -> tuple[list, list]:
    """(table rows, failures)."""
    rows, failures = {}, []
    for res in triton_results:
        if res["error"]:
            failures.append((f"{res['family']} launcher [{res['label']}] sm_{res['arch']}", res["error"]))
        for r in res["records"]:
            key = (r["kernel"], r["arch"])
            row = rows.setdefault(key, {"kernel": r["kernel"], "arch": r["arch"], "compiled": 0, "failed": 0,
                                        "max_regs": 0, "max_spill": 0, "max_smem": 0, "spilling": 0})
            if r["status"] == "ok":
                row["compiled"] += 1
            else:
                row["failed"] += 1
                failures.append((f"{r['kernel']} sm_{r['arch']} [{r['spec']}] ({r['sig']})", r["error"]))
            row["max_regs"] = max(row["max_regs"], r.get("regs") or 0)
            spill = (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0)
            row["max_spill"] = max(row["max_spill"], spill)
            row["spilling"] += spill > 0
            row["max_smem"] = max(row["max_smem"], r.get("smem") or 0)
    for res in cuda_results:
        key = (res["file"], res["arch"])
        row = rows.setdefault(key, {"kernel": res["file"], "arch": res["arch"], "compiled": 0, "failed": 0,
                                    "max_regs": 0, "max_spill": 0, "max_smem": 0, "spilling": 0})
        if res["status"] != "ok" and not res["kernels"]:
            row["failed"] += 1
            failures.append((f"{res['file']} sm_{res['arch']}", res["error"]))
        for k in res["kernels"]:
            row["compiled" if k["status"] == "ok" else "failed"] += 1
            if k["status"] != "ok":
                failures.append((f"{res['file']} sm_{res['arch']} {k['kernel']}", k["error"]))
            row["max_regs"] = max(row["max_regs"], k["regs"] or 0)
            spill = k["spill_stores"] + k["spill_loads"]
            row["max_spill"] = max(row["max_spill"], spill)
            row["spilling"] += spill > 0
            row["max_smem"] = max(row["max_smem"], k["smem"])
    return sorted(rows.values(), key=lambda r: (r["kernel"].endswith(".cu"), r["kernel"], -r["arch"])), failures


def format_table(rows: list) -> str:
    head = ("kernel", "arch", "compiled", "failed", "max regs", "max spill B", "spilling", "max smem B")
    lines = [head] + [(r["kernel"], f"sm_{r['arch']}", r["compiled"], r["failed"], r["max_regs"], r["max_spill"],
                       r["spilling"], r["max_smem"]) for r in rows]
    widths = [max(len(str(ln[i])) for ln in lines) for i in range(len(head))]
    out = []
    for n, ln in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(ln, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _reexec_without_interpreter(argv) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    print("compile-check: TRITON_INTERPRET is set; rerunning without it (compiled Triton is what is checked)",
          flush=True)
    return subprocess.run([sys.executable, "-m", "ember", "compile-check", *argv], env=env).returncode


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m ember compile-check", description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(ARCHS), help="targets (default 90 80)")
    p.add_argument("--quick", action="store_true", help="a representative subset (heuristic tiles, fewer dtypes)")
    p.add_argument("--json", metavar="PATH", help="write the full report (every specialisation) as JSON")
    p.add_argument("--out", metavar="DIR", help="write compile_check.json and compile_check.txt into DIR")
    p.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: CPUs)")
    p.add_argument("--only", choices=("triton", "cuda"), help="check one of the two halves")
    p.add_argument("-k", dest="match", metavar="TEXT", help="only launcher calls whose label contains TEXT")
    p.add_argument("--no-cache", action="store_true", help="ignore and overwrite cached results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return _reexec_without_interpreter(argv)
    args = parse_args(argv)
    t0 = time.perf_counter()
    use_cache = not args.no_cache
    tasks, notes = [], []
    nvcc = find_nvcc()
    if args.only != "triton":
        if nvcc is None:
            notes.append("nvcc not found: CUDA C++ kernels not checked")
        else:
            for arch in args.arch:  # first: the longest single tasks
                for path in sorted(glob.glob(os.path.join(_ROOT, "csrc", "cuda", "*.cu"))):
                    tasks.append(("cuda", (path, arch, nvcc, use_cache)))
    if args.only != "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            notes.append("triton not installed: Triton kernels not checked")
        else:
            for arch in args.arch:
                for i, (_, label, _, _) in enumerate(triton_cases(arch, args.quick)):
                    if args.match is None or args.match in label:
                        tasks.append(("triton", (arch, i, args.quick, use_cache)))
    results = []
    if args.jobs <= 1:
        results = [_run_any(t) for t in tasks]
    else:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(args.jobs, maxtasksperchild=None) as pool:
            results = list(pool.imap_unordered(_run_any, tasks, chunksize=1))
    tri = [r for r in results if "records" in r]
    cu = [r for r in results if r.get("kind") == "cuda"]
    rows, failures = _summarise(tri, cu)
    wall = time.perf_counter() - t0
    text = [format_table(rows)]
    n_spec = sum(len(r["records"]) for r in tri)
    cached = sum(rec.get("cached", False) for r in tri for rec in r["records"])
    text.append(f"\n{n_spec} Triton specialisations ({cached} from cache), {len(cu)} nvcc compiles; "
                f"{'quick' if args.quick else 'full'} mode, -j {args.jobs}, wall {wall:.0f} s")
    for n in notes:
        text.append(f"note: {n}")
    stacks = [(c["file"], c["arch"], k) for c in cu for k in c["kernels"] if k.get("note")]
    for file, arch, k in stacks:
        text.append(f"note: {file} sm_{arch} {k['kernel']}: {k['note']}")
    if failures:
        text.append(f"\nFAILED ({len(failures)}):")
        by_msg: dict = {}
        for where, msg in failures:
            by_msg.setdefault(msg, []).append(where)
        for msg, wheres in by_msg.items():
            text.append(f"  [{len(wheres)}x] {msg}\n      e.g. {wheres[0]}")
    else:
        text.append("\nall kernels compiled" + (" without local-memory spills in CUDA C++" if cu else ""))
    report = "\n".join(text)
    print(report)
    data = {"archs": args.arch, "quick": args.quick, "wall_s": round(wall, 1), "notes": notes,
            "triton": [rec for r in tri for rec in r["records"]],
            "launchers": [{k: r[k] for k in ("family", "label", "arch", "error", "seconds")} for r in tri],
            "cuda": cu, "table": rows, "failures": [{"where": w, "error": m} for w, m in failures]}
    try:
        import triton

        data["triton_version"] = triton.__version__
    except ImportError:
        pass
    paths = [args.json] if args.json else []
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        paths.append(os.path.join(args.out, "compile_check.json"))
        with open(os.path.join(args.out, "compile_check.txt"), "w") as f:
            f.write(report + "\n")
    for p in paths:
        with open(p, "w") as f:
            json.dump(data, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
