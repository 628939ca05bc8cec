"""The experts of a mixture-of-experts layer in Triton (``ember::grouped_gated_mlp``): every expert's
``down(act(gate(x)) * up(x))`` over x's rows sorted by expert, forward and backward.

Two kernels, each one launch for all experts:
  _grouped_gemm_kernel   out[rows of e] = epilogue(x[rows of e] @ W[e]^T) for every expert e. A program
                         owns one (row tile, column tile); row tiles never straddle two experts, so an
                         expert with 1 row costs one tile and an expert with none costs nothing. With
                         GATED it reads the gate and the up rows of W[e] against the same x tile (two
                         accumulators) and stores act(gate) * up, plus [gate | up] for the backward
                         (SAVE_PRE); the epilogue is linear.py's, run on the accumulators in registers.
  _grouped_wgrad_kernel  dW[e] = A[rows of e]^T @ B[rows of e] for every expert: the K loop of each
                         program runs over its expert's rows, so experts with no rows write zeros.

Forward: one gated grouped GEMM (x -> h, pre), one plain grouped GEMM (h -> out). Backward: dh = grad @
W_down[e] (grouped), h recomputed from pre by gated.py's elementwise kernel, dW_down = wgrad(grad, h),
dgate / dup from gated.py, dx = dgate @ W_gate[e] + dup @ W_up[e] (the second grouped GEMM adds the first
through its residual epilogue), dW_gate_up = wgrad of each half into its half of the gradient. Eager
(transformers' expert loop) launches ~6 kernels per expert forward and ~12 backward; this is 2 and 8
for the whole layer.

The tile schedule needs the per-expert row counts on the host (to size the grid exactly and to check
offsets, as the reference does): a CUDA ``offsets`` costs one device-to-host copy per call, a CPU one
nothing. Tiles are fixed per (dtype, rows per expert), not timed: see ``_tiles``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _target
from . import gated as _gated
from .activation import ACT_IDS, to_output
from .linear import _epilogue, _mainloop, _precision


@triton.jit
def _grouped_gemm_kernel(
    x_ptr,  # (rows, K), strides (stride_xm, stride_xk), rows sorted by expert
    w_ptr,  # (E, N, K) weights, strides (stride_we, stride_wn, stride_wk); GATED: the gate rows
    w2_ptr,  # GATED: the up rows, the same strides (a view of the same tensor); else w_ptr again
    r_ptr,  # HAS_RES: (rows, N) added after the product, row stride stride_rm, contiguous columns
    out_ptr,  # (rows, N), row stride stride_om, contiguous columns
    pre_ptr,  # SAVE_PRE: (rows, 2N) [gate | up], row stride stride_pm
    offsets_ptr,  # (E,) int32: expert e's end row
    tile_end_ptr,  # (E,) int32: end of expert e's row tiles in the global tile order
    E, N, K,
    tiles_m,  # row tiles of all experts together
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_rm, stride_om, stride_pm,
    ACT: tl.constexpr,
    HAS_RES: tl.constexpr,
    GATED: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    E_POW2: tl.constexpr,  # E rounded up to a power of two (the expert search's vector width)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Row tiles vary fastest, so consecutive programs read the same column block of one expert's
    # weight while it is in L2.
    tile_m = tl.program_id(0) % tiles_m
    pid_n = tl.program_id(0) // tiles_m
    experts = tl.arange(0, E_POW2)
    ends = tl.load(tile_end_ptr + experts, mask=experts < E, other=2147483647)
    e = tl.sum((ends <= tile_m).to(tl.int32), axis=0)  # the expert whose tiles contain tile_m
    first_tile = tl.load(tile_end_ptr + e - 1, mask=e > 0, other=0)
    row_start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
    row_end = tl.load(offsets_ptr + e)

    offs_m = row_start + (tile_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < row_end
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_off = e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :].to(tl.int64) * stride_wn
    acc, acc2 = _mainloop(x_ptrs, w_ptr + w_off, w2_ptr + w_off, mask_m, mask_n, offs_k, K, stride_xk, stride_wk,
                          stride_wk, GATED, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    # row_end plays the epilogue's M: rows of the next expert are masked off like rows past the end.
    _epilogue(acc, acc2, offs_m, offs_n, row_end, N, out_ptr, out_ptr, r_ptr, out_ptr, pre_ptr, 0, 0, stride_rm,
              stride_om, stride_pm, ACT, False, HAS_RES, GATED, SAVE_PRE, INTERPRET_BF16)


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr,  # (rows, N), strides (stride_am, stride_an)
    b_ptr,  # (rows, K), strides (stride_bm, stride_bk)
    out_ptr,  # (E, N, K) result, strides (stride_oe, stride_on, stride_ok)
    offsets_ptr,  # (E,) int32 end rows
    N, K,
    stride_am, stride_an, stride_bm, stride_bk, stride_oe, stride_on, stride_ok,
    PRECISION: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out[e] = A[rows of e]^T @ B[rows of e]; grid (column tiles of out, experts)."""
    e = tl.program_id(1)
    tiles_k = tl.cdiv(K, BLOCK_K)
    pid_n = tl.program_id(0) // tiles_k
    pid_k = tl.program_id(0) % tiles_k
    row_start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
    row_end = tl.load(offsets_ptr + e)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = (r0 + offs_r).to(tl.int64)
        r_ok = rows < row_end
        at = tl.load(a_ptr + rows[None, :] * stride_am + offs_n[:, None] * stride_an,
                     mask=r_ok[None, :] & mask_n[:, None], other=0.0)
        bt = tl.load(b_ptr + rows[:, None] * stride_bm + offs_k[None, :] * stride_bk,
                     mask=r_ok[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(at, bt, acc, input_precision=PRECISION)
    out = out_ptr + e.to(tl.int64) * stride_oe + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :] * stride_ok
    tl.store(out, to_output(acc, out_ptr, INTERPRET_BF16), mask=mask_n[:, None] & mask_k[None, :])


def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"ember triton grouped_gated_mlp: float16, bfloat16 or float32 tensors only, got {t.dtype}")


class _Schedule:
    """One call's expert layout: offsets as int32 on x's device, the end of each expert's row tiles,
    the tile count, and the row tile they were cut for. Checks offsets as the reference does
    (non-decreasing end rows within [0, rows])."""

    def __init__(self, x: torch.Tensor, offsets: torch.Tensor):
        rows = x.shape[0]
        ends = [int(v) for v in offsets.tolist()]  # one device-to-host copy for CUDA offsets
        start, counts = 0, []
        for end in ends:
            if end < start or end > rows:
                raise ValueError(f"ember.ops.grouped_gated_mlp: offsets must be non-decreasing end rows within "
                                 f"[0, {rows}], got {ends}")
            counts.append(end - start)
            start = end
        active = sum(1 for c in counts if c) or 1
        self.experts, self.used_rows, self.rows_per_expert = len(ends), start, start / active
        self.block_m = _tiles(x.dtype, self.rows_per_expert, True, _precision(x.dtype, x.device))[0]
        tiles = [triton.cdiv(c, self.block_m) for c in counts]
        self.tiles_m = sum(tiles)
        self.offsets = offsets.to(device=x.device, dtype=torch.int32)
        self.tile_end = torch.tensor(tiles, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x.device)


def _tiles(dtype: torch.dtype, rows_per_expert: float, gated: bool, precision: str) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) without timing. The row tile follows the mean
    rows per active expert (decode routes a few rows to each: a 16-row tile wastes least there); exact
    fp32 runs on the FMA units with the operand tiles and the product in registers, so it keeps small
    tiles and BLOCK_K 32 (compile-check: no spills)."""
    if _target.interpreting():
        return 16, 32, 32, 1, 1
    block_m = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 32 else 64
    # Gated: two accumulators and two weight tiles a stage. BLOCK_K 32 keeps 3 stages within sm_80's
    # 163 KB; 8 warps for a 64-row 16-bit tile and 32 x 64 in exact fp32, because 4 warps over 2 x 64 x 128
    # (16-bit) or 2 x 32 x 128 (fp32) spilled 16-816 B (compile-check, sm_80 / sm_90).
    if dtype == torch.float32 and precision == "ieee":
        return (min(block_m, 32), 64, 32, 4, 3) if gated else (block_m, 128, 32, 4, 3)
    if gated:
        return block_m, 128, 32, 8 if block_m == 64 else 4, 3
    return block_m, 128, 64, 4, 4


def _wgrad_tiles(dtype: torch.dtype, precision: str) -> tuple:
    """(BLOCK_N, BLOCK_K, BLOCK_R, num_warps, num_stages) of the weight-gradient kernel."""
    if _target.interpreting():
        return 32, 32, 16, 1, 1
    if dtype == torch.float32 and precision == "ieee":
        return 64, 64, 32, 4, 3
    return 128, 128, 32, 8, 3


def grouped_gemm(x, w, sched: _Schedule, *, w2=None, residual=None, act: str = "none", save_pre: bool = False):
    """out (rows, N) = epilogue(x[rows of e] @ w[e]^T) per expert, and pre (rows, 2N) when save_pre.
    w / w2: (E, N, K) with any strides (w2 with w's strides). Rows past the last offset stay zero."""
    _check_dtype(x)
    rows, K = x.shape
    N = w.shape[1]
    gated = w2 is not None
    # The kernel writes every routed row; only the rows past the last offset are zeroed here.
    out = torch.empty((rows, N), device=x.device, dtype=x.dtype)
    pre = torch.empty((rows, 2 * N), device=x.device, dtype=x.dtype) if save_pre else None
    for t in (out, pre) if save_pre else (out,):
        t[sched.used_rows:].zero_()
    if sched.tiles_m == 0 or N == 0:
        return out, pre
    if gated and w2.stride() != w.stride():
        raise ValueError("ember triton grouped_gemm: w2 must have w's strides")
    if residual is not None:
        residual = residual if residual.stride(1) == 1 else residual.contiguous()
    if K == 0:  # empty sums: the products are zero, and so is the gated act(0) * 0
        out.zero_()
        if pre is not None:
            pre.zero_()
        if residual is not None:
            out[:sched.used_rows] = residual[:sched.used_rows]
        return out, pre
    precision = _precision(x.dtype, x.device)
    _, bn, bk, warps, stages = _tiles(x.dtype, sched.rows_per_expert, gated, precision)
    bm = sched.block_m  # the row tile the schedule was cut for
    with _target.device_guard(x):
        _grouped_gemm_kernel[(sched.tiles_m * triton.cdiv(N, bn),)](
            x, w, w2 if gated else w, residual if residual is not None else out, out,
            pre if save_pre else out, sched.offsets, sched.tile_end,
            sched.experts, N, K, sched.tiles_m, x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
            residual.stride(0) if residual is not None else 0, out.stride(0), pre.stride(0) if save_pre else 0,
            ACT=ACT_IDS.get(act, -1), HAS_RES=residual is not None, GATED=gated, SAVE_PRE=save_pre,
            PRECISION=precision, INTERPRET_BF16=_target.interpreting() and x.dtype == torch.bfloat16,
            E_POW2=triton.next_power_of_2(sched.experts), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            num_warps=warps, num_stages=stages,
        )
    return out, pre


def grouped_wgrad(a, b, sched: _Schedule, out: torch.Tensor) -> torch.Tensor:
    """out[e] = a[rows of e]^T @ b[rows of e], into ``out`` (E, N, K), any strides."""
    E, N, K = out.shape
    if E == 0 or N == 0 or K == 0:
        return out
    precision = _precision(a.dtype, a.device)
    bn, bk, br, warps, stages = _wgrad_tiles(a.dtype, precision)
    with _target.device_guard(a):
        _grouped_wgrad_kernel[(triton.cdiv(N, bn) * triton.cdiv(K, bk), E)](
            a, b, out, sched.offsets, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            PRECISION=precision, INTERPRET_BF16=_target.interpreting() and a.dtype == torch.bfloat16,
            BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, num_warps=warps, num_stages=stages,
        )
    return out


# ---------------------------------------------------------------------------------------------
# Tensor-level entry points used by ember.ops.grouped_gated_mlp.
# ---------------------------------------------------------------------------------------------
def grouped_gated_mlp(x, w_gate_up, w_down, offsets, act: str, save_preact: bool):
    """(out, pre): out (rows, H); pre (rows, 2I) = [gate | up] when save_preact, else empty."""
    _check_dtype(x)
    inter = w_gate_up.shape[1] // 2
    sched = _Schedule(x, offsets)
    h, pre = grouped_gemm(x, w_gate_up[:, :inter], sched, w2=w_gate_up[:, inter:], act=act, save_pre=save_preact)
    out, _ = grouped_gemm(h, w_down, sched)
    return out, pre if pre is not None else x.new_empty((0,))


def grouped_gated_mlp_backward(grad, x, w_gate_up, w_down, offsets, pre, act: str, need_dx: bool, need_dw: bool):
    """(dx, dw_gate_up, dw_down), each empty when not needed."""
    _check_dtype(x)
    inter = w_gate_up.shape[1] // 2
    sched = _Schedule(x, offsets)
    empty = x.new_empty((0,))
    gate, up = pre[:, :inter], pre[:, inter:]
    # dh = grad @ W_down[e]: W_down[e] is (H, I), so its transpose plays the (N = I, K = H) weight.
    dh, _ = grouped_gemm(grad, w_down.transpose(1, 2), sched)
    dgate, dup = _gated.gated_act_backward(dh, gate, up, act)
    dx = empty
    if need_dx:
        wg_t, wu_t = w_gate_up[:, :inter].transpose(1, 2), w_gate_up[:, inter:].transpose(1, 2)
        dx = grouped_gemm(dup, wu_t, sched, residual=grouped_gemm(dgate, wg_t, sched)[0])[0]
    dwgu, dwd = empty, empty
    if need_dw:
        h = _gated.gated_act(gate, up, act)
        dwd = grouped_wgrad(grad, h, sched, torch.empty_like(w_down))
        dwgu = torch.empty_like(w_gate_up)
        grouped_wgrad(dgate, x, sched, dwgu[:, :inter])
        grouped_wgrad(dup, x, sched, dwgu[:, inter:])
    return dx, dwgu, dwd
