"""GEMM with fused epilogues in Triton: ``act(x @ W^T + b) [+ residual]`` and the gated
``act(x @ Wg^T + bg) * (x @ Wu^T + bu)``, plus the launchers the backward pass is built from.

One kernel, specialised by constexprs:
  ACT       an ember.activations id (-1: none); applied to the fp32 accumulator
  HAS_BIAS  bias added to the accumulator before the activation
  HAS_RES   residual (same shape as the output) added after the activation
  GATED     a second weight (and bias) read with the same x tile: two accumulators, out = act(a1) * a2.
            This is the gate and up projections of a gated MLP in one pass over x; the two weights
            are read through their own pointers, so no concatenated [Wg; Wu] has to exist
  SAVE_PRE  also store the pre-activation(s) for backward (rounded to the output dtype, as torch's
            addmm output would be)
Every operand is addressed through its strides, so transposed views (W^T for dx = dpre @ W,
dpre^T and x^T for dW = dpre^T @ x, a Conv1D weight) need no copies.

FLOPs: 2 M N K per GEMM (4 M N K gated). On GPU the tile sizes come from a small per-problem tuner
whose choices persist in a JSON file (see ``_Tuner``); under TRITON_INTERPRET=1 (CPU CI) one fixed
small tile is used so masking at every edge is exercised. The tuner compiles and times every
candidate tile the first time it meets a problem (1-20 s per compile on sm_80/sm_90); set
``EMBER_TRITON_AUTOTUNE=0`` to take one heuristic tile from (M, N, K, dtype, gated) instead, without
timing (``heuristic_config``; choices already in the JSON cache are still used). Timing is also
skipped while the current CUDA stream is capturing a graph, since do_bench would break the capture.
Candidates are filtered per GPU and dtype so every one fits that GPU's shared memory
(``candidate_configs``); the TMA variant is only ever used on sm_90+.

Backward (launchers below): dpre = grad * act'(pre) by the elementwise kernels of activation.py /
gated.py, db = column sums of dpre, then two GEMMs with this same kernel.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading

import torch
import triton
import triton.language as tl

from . import _target
from .activation import ACT_IDS, act_backward, act_forward, to_output
from . import gated as _gated


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped launch order: GROUP_M row-blocks share each column block of W while it is in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_size
    pid_n = (tile % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _epilogue(
    acc, acc2, offs_m, offs_n, M, N,
    b_ptr, b2_ptr, r_ptr, out_ptr, pre_ptr, stride_b, stride_b2, stride_rm, stride_om, stride_pm,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GATED: tl.constexpr,
    SAVE_PRE: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):
    """Bias, pre-activation store, activation, gating / residual and the output store, on the fp32
    accumulator(s) while they are still in registers."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc2 += tl.load(b2_ptr + offs_n * stride_b2, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    rows = offs_m[:, None].to(tl.int64)
    if SAVE_PRE:
        pre_ptrs = pre_ptr + rows * stride_pm + offs_n[None, :]
        tl.store(pre_ptrs, to_output(acc, pre_ptr, INTERPRET_BF16), mask=mask)
        if GATED:
            tl.store(pre_ptrs + N, to_output(acc2, pre_ptr, INTERPRET_BF16), mask=mask)
    if ACT >= 0:
        y = act_forward(acc, ACT)
    else:
        y = acc
    if GATED:
        y = y * acc2
    if HAS_RES:
        y += tl.load(r_ptr + rows * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * stride_om + offs_n[None, :], to_output(y, out_ptr, INTERPRET_BF16), mask=mask)


@triton.jit
def _mainloop(x_ptrs, w_ptrs, w2_ptrs, mask_m, mask_n, offs_k, K, stride_xk, stride_wk, stride_w2k,
              GATED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """The pointer kernels' K loop (this file's and moe.py's grouped one): the fp32 product of x's
    (BLOCK_M, K) rows with the (K, BLOCK_N) tile of W^T, and with W2^T's too when GATED (the same x tile
    read once for both), masked at every edge. Returns (acc, acc2); acc2 stays zero unless GATED."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(x_ptrs, mask=mask_m[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if GATED:
            b2 = tl.load(w2_ptrs, mask=k_ok[:, None] & mask_n[None, :], other=0.0)
            acc2 = tl.dot(a, b2, acc2, input_precision=PRECISION)
            w2_ptrs += BLOCK_K * stride_w2k
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc, acc2


@triton.jit
def _linear_fwd_kernel(
    x_ptr,  # (M, K) left operand, strides (stride_xm, stride_xk)
    w_ptr,  # (N, K) weight as nn.Linear stores it, strides (stride_wn, stride_wk)
    w2_ptr,  # (N, K) second weight (GATED: the up projection), strides (stride_w2n, stride_w2k)
    b_ptr,  # (N,) bias, stride stride_b, or a dummy when not HAS_BIAS
    b2_ptr,  # (N,) second bias (GATED), stride stride_b2
    r_ptr,  # (M, N) residual, row stride stride_rm, contiguous columns
    out_ptr,  # (M, N) output, row stride stride_om, contiguous columns
    pre_ptr,  # SAVE_PRE: (M, N) pre-activation, or (M, 2N) [gate | up] when GATED; row stride stride_pm
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_w2n, stride_w2k, stride_b, stride_b2,
    stride_rm, stride_om, stride_pm,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    GATED: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" or "tf32" for fp32 operands
    INTERPRET_BF16: tl.constexpr,  # see activation.to_output
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One program per output tile; operands addressed through strides (any layout)."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :].to(tl.int64) * stride_wn  # a (K, N) tile of W^T
    w2_ptrs = w2_ptr + offs_k[:, None] * stride_w2k + offs_n[None, :].to(tl.int64) * stride_w2n  # its own strides
    acc, acc2 = _mainloop(x_ptrs, w_ptrs, w2_ptrs, mask_m, mask_n, offs_k, K, stride_xk, stride_wk, stride_w2k,
                          GATED, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    _epilogue(acc, acc2, offs_m, offs_n, M, N, b_ptr, b2_ptr, r_ptr, out_ptr, pre_ptr, stride_b, stride_b2, stride_rm,
              stride_om, stride_pm, ACT, HAS_BIAS, HAS_RES, GATED, SAVE_PRE, INTERPRET_BF16)


@triton.jit
def _linear_fwd_tma_kernel(
    x_desc,  # tensor descriptor of x (M, K), block (BLOCK_M, BLOCK_K); K contiguous
    w_desc,  # tensor descriptor of W (N, K), block (BLOCK_N, BLOCK_K); K contiguous
    w2_desc,  # the same for the second weight (GATED), else w_desc again
    b_ptr, b2_ptr, r_ptr, out_ptr, pre_ptr,  # as in _linear_fwd_kernel
    M, N, K,
    stride_b, stride_b2, stride_rm, stride_om, stride_pm,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    GATED: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,  # programs launched: one per SM, each walks tiles NUM_SMS apart
):
    """Hopper variant: persistent programs (one per SM, so tile scheduling costs no launches and the
    next tile's loads can overlap the last tile's epilogue) reading operands through TMA tensor
    descriptors (bulk async copies; out-of-bounds rows and the K tail come back as zeros, so the
    main loop has no masks). The epilogue is shared with the pointer kernel."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS):
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = x_desc.load([off_m, k0])
            b = w_desc.load([off_n, k0])
            acc = tl.dot(a, b.T, acc, input_precision=PRECISION)
            if GATED:
                b2 = w2_desc.load([off_n, k0])
                acc2 = tl.dot(a, b2.T, acc2, input_precision=PRECISION)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        _epilogue(acc, acc2, offs_m, offs_n, M, N, b_ptr, b2_ptr, r_ptr, out_ptr, pre_ptr, stride_b, stride_b2,
                  stride_rm, stride_om, stride_pm, ACT, HAS_BIAS, HAS_RES, GATED, SAVE_PRE, INTERPRET_BF16)


# ---------------------------------------------------------------------------------------------
# Tile choice: a per-problem tuner with a persistent cache, or one heuristic pick without timing.
# ---------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages): large tiles for big problems, narrow
# M tiles for decode-like M, small K tiles for the gated kernel's two accumulators.
_GPU_CONFIGS = [
    (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4), (128, 128, 32, 8, 4, 4),
    (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4), (64, 64, 64, 8, 4, 4), (64, 256, 32, 8, 4, 4),
    (32, 128, 64, 8, 4, 4), (16, 128, 128, 8, 4, 4), (16, 64, 256, 8, 4, 3), (64, 64, 32, 8, 2, 5),
    # 8 warps over a 128 x 128 (or gated 64 x 128) tile: 64 fp32 accumulators per thread. With 4 warps the
    # 128 per thread plus a gelu / residual epilogue spilled 12-860 B on sm_90 (compile-check, bf16).
    (128, 128, 64, 8, 8, 3), (64, 128, 64, 8, 8, 4), (128, 128, 32, 8, 8, 3), (64, 64, 32, 8, 4, 4),
]
# Exact fp32 (precision "ieee") has no tensor-core path: tl.dot runs on the FMA units and holds the
# operand tiles in registers next to the product, so BLOCK_K sets the register count as much as the
# tile does. These are the configs that compiled without local-memory spills for sm_80 (pointer kernel)
# and sm_90 (pointer and TMA kernels), from a compile-check sweep of 16-128 x 32-128 tiles, BLOCK_K
# 16/32/64, 2-8 warps and 2-4 stages: up to 32 accumulators per thread at BLOCK_K 16, 16 at BLOCK_K 32
# (8 gated). BLOCK_K 64 spilled 0.1-19 KB per thread at 32 accumulators; the old picks were 64 x 64 x
# 64 (4 warps: 0.9 KB on sm_80, 19-28 KB with the TMA kernel on sm_90) and, gated on sm_80, 64 x 64 x 32
# with 2 warps (47 KB). Keyed by gated.
_FP32_FMA_CONFIGS = {
    False: [(16, 64, 32, 8, 4, 3), (16, 128, 32, 8, 4, 3), (32, 64, 32, 8, 4, 3), (64, 64, 16, 8, 8, 3),
            (128, 64, 16, 8, 8, 3), (64, 128, 16, 8, 8, 3)],
    True: [(16, 64, 16, 8, 4, 3), (32, 64, 16, 8, 4, 3), (64, 64, 16, 8, 8, 3), (32, 128, 16, 8, 8, 3)],
}
_INTERPRET_CONFIG = (32, 32, 32, 4, 1, 1)


def smem_bytes(cfg: tuple, elem_size: int, gated: bool, variant: str = "pointer") -> int:
    """An upper bound on the shared memory of a config: num_stages buffers of the x tile and the
    weight tile(s), plus, for the TMA kernel with fp32 operands, an fp32 output tile per accumulator
    for the epilogue's layout change. Measured by ``python -m ember compile-check`` (metadata.shared):
    sm_80 keeps num_stages - 1 buffers, sm_90 num_stages for 16-bit operands (wgmma); the fp32 TMA
    kernel adds BLOCK_M x BLOCK_N x 4 bytes per accumulator (e.g. 254008 B for 32x128x64 gated, 4
    stages: over sm_90's 232448)."""
    bm, bn, bk, _, _, stages = cfg
    n_w = 2 if gated else 1
    total = stages * (bm * bk + bk * bn * n_w) * elem_size
    if variant == "tma" and elem_size == 4:
        total += bm * bn * 4 * n_w
    return total


def candidate_configs(dtype: torch.dtype, gated: bool, precision: str, device: torch.device,
                      variant: str = "pointer") -> list:
    """The tile configs the tuner may time (and the heuristic may pick) for this problem class on the
    target GPU: those whose shared memory fits one block there (sm_80: 163 KB, sm_90: 227 KB), so a
    tile never fails at launch. Exact fp32 (precision "ieee") runs on FMA units, not tensor cores, and
    takes its own configs (``_FP32_FMA_CONFIGS``: small K tiles, none that spills)."""
    es = torch.empty((), dtype=dtype).element_size()
    limit = _target.shared_mem_limit(device)
    pool = _FP32_FMA_CONFIGS[gated] if _fma_dot(dtype, precision) else _GPU_CONFIGS
    return [cfg for cfg in pool if smem_bytes(cfg, es, gated, variant) <= limit]


def _fma_dot(dtype: torch.dtype, precision: str) -> bool:
    return dtype == torch.float32 and precision == "ieee"


def heuristic_config(M: int, N: int, K: int, dtype: torch.dtype, gated: bool, precision: str,
                     device: torch.device, variant: str = "pointer") -> tuple:
    """One config from (M, N, K, dtype, gated) without timing (EMBER_TRITON_AUTOTUNE=0, CUDA-graph
    capture): a narrow M tile for decode (M <= 16), a 64-row tile for small M, 128 x 128 x 64 for big
    problems; smaller K tiles for the gated kernel and tf32, whose operand tiles take twice the
    bytes; exact fp32 from its own spill-free configs. Always one of ``candidate_configs``, so it fits
    shared memory on the target GPU."""
    cands = candidate_configs(dtype, gated, precision, device, variant)
    wide = dtype == torch.float32 or gated
    if _fma_dot(dtype, precision):
        if M <= 16:
            prefs = [(16, 64, 16, 8, 4, 3)] if gated else [(16, 64, 32, 8, 4, 3)]
        elif M <= 64 or N <= 64:
            prefs = [(32, 64, 16, 8, 4, 3)] if gated else [(64, 64, 16, 8, 8, 3)]
        else:
            prefs = [(64, 64, 16, 8, 8, 3)] if gated else [(64, 128, 16, 8, 8, 3)]
    elif M <= 16:
        prefs = [(16, 64, 256, 8, 4, 3), (16, 128, 128, 8, 4, 4)] if wide else [(16, 128, 128, 8, 4, 4)]
    elif M <= 64 or N <= 64:
        prefs = [(64, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4)] if wide else [(64, 128, 64, 8, 4, 4)]
    elif wide:
        # gated: two fp32 accumulators; 128 x 128 x 32 spilled ~4-5 KB (bf16, sm_80 and sm_90)
        # tf32 ungated: 128 x 128 x 32 spilled ~2 KB with 4 warps (sm_80 and sm_90), so 8 warps
        prefs = [(64, 128, 64, 8, 8, 4), (64, 64, 64, 8, 4, 4)] if gated else [(128, 128, 32, 8, 8, 3)]
    else:
        prefs = [(128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4)]
    # Fallbacks where no preference fits shared memory (gated tf32 on sm_80): 64 x 64 x 32 on 4 warps
    # before 2, which spilled ~600 B there (compile-check).
    for cfg in prefs + [(64, 64, 64, 8, 4, 4), (64, 64, 32, 8, 4, 4), (64, 64, 32, 8, 2, 5)]:
        if cfg in cands:
            return cfg
    return cands[-1]


def autotune_enabled(device: torch.device) -> bool:
    """``EMBER_TRITON_AUTOTUNE=0`` turns timing off; so does a CUDA-graph capture on the current
    stream, where do_bench's synchronisations would break the capture."""
    if os.environ.get("EMBER_TRITON_AUTOTUNE", "1") == "0":
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _cache_path() -> str:
    root = os.environ.get("EMBER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ember")
    return os.path.join(root, "linear_configs.json")


class _Tuner:
    """Chooses a tile config per (device, problem) by timing every candidate once, then remembers it:
    in memory, and in ``~/.cache/ember/linear_configs.json`` (``EMBER_CACHE_DIR`` overrides) keyed by
    device name, triton version, dtype, flags, N, K and M rounded up to a power of two, so a new
    process (or a new M of the same bucket) does not tune again. With autotuning off (see
    ``autotune_enabled``) a remembered choice is still used; otherwise ``default`` is, untimed and
    not remembered."""

    def __init__(self):
        self._lock = threading.Lock()
        self._mem: dict[str, list] | None = None

    def _load(self) -> dict:
        if self._mem is None:
            try:
                with open(_cache_path()) as f:
                    self._mem = json.load(f)
            except (OSError, ValueError):
                self._mem = {}
        return self._mem

    def _save(self) -> None:
        path = _cache_path()
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(self._mem, f, indent=0, sort_keys=True)
            os.replace(tmp, path)  # atomic: concurrent processes never read half a file
        except OSError:
            pass  # read-only home: the in-memory choice still holds for this process

    def config(self, key: str, launch, candidates=None, default=None, tune: bool = True) -> tuple:
        candidates = list(_GPU_CONFIGS if candidates is None else candidates)
        with self._lock:
            hit = self._load().get(key)
        if hit is not None and tuple(hit) in candidates:  # a choice no longer allowed is tuned again
            return tuple(hit)
        if not tune:
            return tuple(default) if default is not None else candidates[0]
        best, best_ms = None, float("inf")
        for cfg in candidates:
            try:
                ms = triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=20)
            except Exception:  # noqa: BLE001  (out of shared memory / registers for this tile)
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        if best is None:
            raise RuntimeError(f"ember.kernels.linear: no tile config compiled for {key}")
        with self._lock:
            self._load()[key] = list(best)
            self._save()
        return best


TUNER = _Tuner()


def fp32_matmul_precision() -> str:
    """"tf32" or "ieee": what torch's own CUDA fp32 matmuls use right now. torch >= 2.9 says it in
    ``torch.backends.cuda.matmul.fp32_precision`` ("none" = inherit ``torch.backends.fp32_precision``);
    ``allow_tf32`` is a deprecated shim there, and reading it after the new API was used raises."""
    matmul = torch.backends.cuda.matmul
    try:
        choice = matmul.fp32_precision
    except AttributeError:  # older torch: only the legacy flag exists
        return "tf32" if matmul.allow_tf32 else "ieee"
    if choice == "none":
        choice = getattr(torch.backends, "fp32_precision", "ieee")
    return "tf32" if choice == "tf32" else "ieee"


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    # A CUDA tensor or a compile-only target follows torch's setting; the interpreter stays exact.
    on_gpu = device.type == "cuda" or not _target.interpreting()
    if dtype == torch.float32 and on_gpu and fp32_matmul_precision() == "tf32":
        return "tf32"
    return "ieee"


def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"ember triton linear: float16, bfloat16 or float32 tensors only, got {t.dtype}")


def _tma_ok(x, w, w2=None, require_hopper=True) -> bool:
    """TMA descriptors need a contiguous last dim, 16-byte aligned bases and row strides; the
    persistent TMA kernel is chosen automatically on sm_90+ only."""
    if require_hopper and (_target.interpreting() or _target.capability(x.device)[0] < 9):
        return False
    es = x.element_size()
    for t in (x, w) + ((w2,) if w2 is not None else ()):
        if t.stride(1) != 1 or (t.stride(0) * es) % 16 or t.data_ptr() % 16:
            return False
    return True


def gemm(x, w, bias=None, residual=None, act="none", *, w2=None, b2=None, save_pre=False, variant="auto"):
    """Launch the kernel: returns (out, pre). x (M, K), w / w2 (N, K) with any strides; residual
    (M, N) with contiguous columns. pre is None unless save_pre. variant: "pointer" (any strides),
    "tma" (persistent + TMA descriptors, sm_90), or "auto" (tma on sm_90+ when the operands allow)."""
    _check_dtype(x)
    M, K = x.shape
    N = w.shape[0]
    gated = w2 is not None
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    pre = torch.empty((M, 2 * N if gated else N), device=x.device, dtype=x.dtype) if save_pre else None
    if M == 0 or N == 0:
        return out, pre
    if K == 0:  # no K loop: the epilogue alone on zeros
        z = torch.zeros((M, K + 1), device=x.device, dtype=x.dtype)
        zw = torch.zeros((N, 1), device=x.device, dtype=x.dtype)
        return gemm(z, zw, bias, residual, act, w2=None if w2 is None else zw, b2=b2, save_pre=save_pre,
                    variant="pointer")
    if residual is not None and residual.shape[1] > 1 and residual.stride(1) != 1:
        residual = residual.contiguous()
    dummy = out
    args = dict(
        ACT=ACT_IDS.get(act, -1),
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        GATED=gated,
        SAVE_PRE=save_pre,
        PRECISION=_precision(x.dtype, x.device),
        INTERPRET_BF16=_target.interpreting() and x.dtype == torch.bfloat16,
    )

    if variant == "auto":
        variant = "tma" if _tma_ok(x, w, w2) else "pointer"
    elif variant == "tma":
        if not _target.interpreting() and _target.capability(x.device)[0] < 9:
            raise ValueError(f"ember triton linear: the TMA variant needs sm_90 or newer, got sm_"
                             f"{''.join(map(str, _target.capability(x.device)))}")
        if not _tma_ok(x, w, w2, require_hopper=False):
            raise ValueError("ember triton linear: the TMA variant needs K-contiguous, 16-byte aligned x and weights")

    def launch(cfg):
        bm, bn, bk, gm, warps, stages = cfg
        tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages)
        ptrs = (bias if bias is not None else dummy, b2 if b2 is not None else dummy,
                residual if residual is not None else dummy, out, pre if save_pre else dummy)
        strides = (bias.stride(0) if bias is not None else 0, b2.stride(0) if b2 is not None else 0,
                   residual.stride(0) if residual is not None else 0, out.stride(0), pre.stride(0) if save_pre else 0)
        if variant == "tma":
            from triton.tools.tensor_descriptor import TensorDescriptor

            sms = _target.sm_count(x.device)
            xd = TensorDescriptor.from_tensor(x, [bm, bk])
            wd = TensorDescriptor.from_tensor(w, [bn, bk])
            w2d = TensorDescriptor.from_tensor(w2, [bn, bk]) if gated else wd
            _linear_fwd_tma_kernel[(min(sms, tiles),)](xd, wd, w2d, *ptrs, M, N, K, *strides, **args, **common,
                                                       NUM_SMS=sms)
        else:
            w2_ = w2 if gated else w
            _linear_fwd_kernel[(tiles,)](
                x, w, w2_, *ptrs, M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1), w2_.stride(0),
                w2_.stride(1), *strides, **args, **common,
            )

    with _target.device_guard(x):
        if _target.interpreting():
            cfg = _INTERPRET_CONFIG
        else:
            m_bucket = 1 << max(0, (M - 1).bit_length())
            flags = "".join(str(int(v)) for v in (args["HAS_BIAS"], args["HAS_RES"], gated, save_pre))
            key = (f"{_target.device_name(x.device)}|triton{triton.__version__}|{variant}|{x.dtype}|"
                   f"{args['PRECISION']}|act{args['ACT']}|{flags}|M{m_bucket}|N{N}|K{K}|"
                   f"x{int(x.stride(1) == 1)}w{int(w.stride(1) == 1)}")
            cands = candidate_configs(x.dtype, gated, args["PRECISION"], x.device, variant)
            default = heuristic_config(M, N, K, x.dtype, gated, args["PRECISION"], x.device, variant)
            cfg = TUNER.config(key, launch, cands, default, tune=autotune_enabled(x.device))
        launch(cfg)
    return out, pre


# ---------------------------------------------------------------------------------------------
# Tensor-level entry points used by ember.ops.linear.
# ---------------------------------------------------------------------------------------------
def linear_act(x, weight, bias, residual, act: str, save_preact: bool):
    out, pre = gemm(x, weight, bias, residual, act, save_pre=save_preact and act != "none")
    return out, pre if pre is not None else x.new_empty((0,))


def _bias_grad(dpre: torch.Tensor) -> torch.Tensor:
    return dpre.sum(0, dtype=torch.float32).to(dpre.dtype)


@triton.jit
def _act_grad_colsum_kernel(
    g_ptr,  # (M, N) grad of the output, contiguous
    p_ptr,  # (M, N) saved pre-activation, contiguous (unused when ACT < 0)
    d_ptr,  # (M, N) dpre = g * act'(pre), written when ACT >= 0
    part_ptr,  # (cdiv(M, BLOCK_M), N) fp32 column sums of dpre per row block, when COLSUM
    M, N,
    ACT: tl.constexpr,  # -1: dpre is g itself (only the column sums are computed)
    COLSUM: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The backward prologue in one pass: the activation gradient and, while the tile is in
    registers, its column sums (the bias gradient's partials; one row per row block, summed by the
    caller), so dpre is never read back for the bias."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    off = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    g = tl.load(g_ptr + off, mask=mask, other=0.0)
    if ACT >= 0:
        d = to_output(act_backward(g.to(tl.float32), tl.load(p_ptr + off, mask=mask, other=0.0).to(tl.float32), ACT),
                      d_ptr, INTERPRET_BF16)
        tl.store(d_ptr + off, d, mask=mask)
    else:
        d = g
    if COLSUM:
        # Sums of the stored (rounded) values: the same numbers the GEMMs consume.
        col = tl.sum(tl.where(mask, d.to(tl.float32), 0.0), axis=0)
        tl.store(part_ptr + pid_m * N + offs_n, col, mask=offs_n < N)


def act_grad_and_bias(grad: torch.Tensor, pre, act: str, need_db: bool):
    """(dpre, db or None) for a contiguous (M, N) grad: one pass over grad (and pre)."""
    grad = grad.contiguous()
    M, N = grad.shape
    has_act = act != "none"
    if not has_act and not need_db:
        return grad, None
    dpre = torch.empty_like(grad) if has_act else grad
    bm, bn = (32, 64) if _target.interpreting() else (64, 128)
    part = torch.empty((triton.cdiv(M, bm), N), device=grad.device, dtype=torch.float32) if need_db else grad
    if M and N:
        with _target.device_guard(grad):
            _act_grad_colsum_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
                grad, pre.contiguous() if has_act else grad, dpre, part, M, N,
                ACT=ACT_IDS[act] if has_act else -1, COLSUM=need_db,
                INTERPRET_BF16=_target.interpreting() and grad.dtype == torch.bfloat16, BLOCK_M=bm, BLOCK_N=bn,
            )
    db = None
    if need_db:
        db = part.sum(0).to(grad.dtype) if M else torch.zeros(N, device=grad.device, dtype=grad.dtype)
    return dpre, db


def linear_act_backward(grad, x, weight, pre, act: str, need_dx: bool, need_dw: bool, need_db: bool):
    dpre, db = act_grad_and_bias(grad, pre, act, need_db)
    empty = x.new_empty((0,))
    # dx = dpre @ W: W^T (a view) plays the (N, K) weight operand; dW = dpre^T @ x likewise.
    dx = gemm(dpre, weight.t())[0] if need_dx else empty
    dw = gemm(dpre.t(), x.t())[0] if need_dw else empty
    return dx, dw, db if need_db else empty


def gated_linear(x, w_gate, w_up, b_gate, b_up, act: str, save_preact: bool):
    h, pre = gemm(x, w_gate, b_gate, None, act, w2=w_up, b2=b_up, save_pre=save_preact)
    return h, pre if pre is not None else x.new_empty((0,))


def gated_linear_backward(grad, x, w_gate, w_up, pre, act: str, need_dx: bool, need_dw: bool, need_db: bool):
    inter = w_gate.shape[0]
    dgate, dup = _gated.gated_act_backward(grad, pre[:, :inter], pre[:, inter:], act)
    empty = x.new_empty((0,))
    dx = empty
    if need_dx:  # dgate @ Wg + dup @ Wu: the second GEMM adds the first through its residual epilogue
        dx = gemm(dup, w_up.t(), residual=gemm(dgate, w_gate.t())[0])[0]
    dwg = gemm(dgate.t(), x.t())[0] if need_dw else empty
    dwu = gemm(dup.t(), x.t())[0] if need_dw else empty
    dbg = _bias_grad(dgate) if need_db else empty
    dbu = _bias_grad(dup) if need_db else empty
    return dx, dwg, dwu, dbg, dbu
