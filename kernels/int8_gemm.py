"""Int8 inference in Triton: per-token quantization, the W8A8 int8 GEMM and the W8A16 weight-only GEMM.

  _quantize_rows_kernel  one program per row: absmax pass, then scale / round / store int8 (the row is
                         read twice, from L2 on GPU; 1 byte written per element); the quantize_per_token op
  _w8a8_gemm_kernel      per-token quantization fused into the prologue (a first pass over K finds the
                         absmax of the program's rows; the main loop quantizes each x tile in registers
                         as it loads it), then int8 x int8 tl.dot on int8 tensor cores (mma s8, int32
                         accumulators); the epilogue applies row scale x column scale, bias and the
                         activation, and writes the output dtype. Grouped weights rescale once per K
                         block of one group (groups of 16: once per 16-column half of a 32 block, since
                         an int8 MMA needs K >= 32). No int8 copy of x is written: x is read twice per program
                         (the second time from L2), against one quantize kernel launch + an M x K int8
                         round trip for the unfused pair.
  _w8a16_gemm_kernel     x in its own dtype, int8 weight tiles widened to x's dtype in registers inside
                         the main loop (never dequantized into memory). SPLIT_K > 1 for decode (M <= 16):
                         K is cut across programs so a skinny GEMV fills the GPU, fp32 partials are
                         summed by _finish_kernel, which applies bias and activation.

Byte counts (why the int8 paths win): at decode a Linear is bound by its weight bytes; int8 reads N*K
bytes against 2*N*K for bf16. At prefill, int8 tensor cores run twice as many ops per cycle as bf16.
"""
import torch
import triton
import triton.language as tl

from . import _target
from .activation import act_forward, to_output


@triton.jit
def _rint(v):
    # Round half to even (torch.round) with plain fp32 adds, so the interpreter (no libdevice) and GPUs
    # agree: around 1.5 * 2^23 the fp32 ulp is 1, so adding and subtracting it rounds |v| < 2^22 to the
    # nearest integer, ties to even. |v| <= 127 here.
    big = 12582912.0
    return (v + big) - big


@triton.jit
def _scaled_tile(x_rows, mul_ptr, rm, kk, M, K, HAS_MUL: tl.constexpr):
    # x[rm, kk] in fp32 (0 outside the matrix), times the smoothing multiplier when there is one.
    v = tl.load(x_rows + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0).to(tl.float32)
    if HAS_MUL:
        v = v * tl.load(mul_ptr + kk, mask=kk < K, other=1.0)[None, :]
    return v


@triton.jit
def _row_scales(x_rows, mul_ptr, rm, rk, M, K, HAS_MUL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # Per-token quantization of rows rm, one pass over K: ok (row finite), amax and inv = 127 / amax.
    # NaN / Inf anywhere in a row make its scale NaN and its quantized values 0 (inv = 0).
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    finite = tl.full([BLOCK_M], 1, dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        v = _scaled_tile(x_rows, mul_ptr, rm, k0 + rk, M, K, HAS_MUL)
        finite = tl.minimum(finite, tl.min((tl.abs(v) < float("inf")).to(tl.int32), axis=1))
        amax = tl.maximum(amax, tl.max(tl.where(v == v, tl.abs(v), 0.0), axis=1))
    ok = finite > 0
    # div_rn: a correctly rounded 127 / amax, as torch's tensor / tensor; the GPU's plain `/` is an
    # approximate division and would move x * inv across a .5 tie now and then.
    return ok, amax, tl.where(ok & (amax > 0.0), tl.div_rn(tl.full([BLOCK_M], 127.0, tl.float32), amax), 0.0)


@triton.jit
def _token_scale(ok, amax):
    # absmax / 127, correctly rounded (div_rn, see _row_scales); NaN for rows with NaN / Inf.
    return tl.where(ok, tl.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32)), float("nan"))


@triton.jit
def _quantize_tile(v, ok, inv):
    # inv is 0 for rows with NaN / Inf, but NaN * 0 is NaN: select explicitly.
    return tl.clamp(_rint(tl.where(ok[:, None], v * inv[:, None], 0.0)), -127.0, 127.0).to(tl.int8)


@triton.jit
def _quantize_rows_kernel(
    x_ptr,  # (M, K) float, row stride stride_xm, unit column stride
    mul_ptr,  # (K,) fp32 smoothing multiplier (ignored unless HAS_MUL)
    q_ptr,  # (M, K) int8 out, contiguous
    s_ptr,  # (M,) fp32 out: absmax / 127 (NaN for rows with NaN / Inf)
    M,
    K,
    stride_xm,
    HAS_MUL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    ok, amax, inv = _row_scales(x_rows, mul_ptr, rm, rk, M, K, HAS_MUL, BLOCK_M, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        q = _quantize_tile(_scaled_tile(x_rows, mul_ptr, rm, kk, M, K, HAS_MUL), ok, inv)
        tl.store(q_ptr + rm[:, None].to(tl.int64) * K + kk[None, :], q, mask=(rm[:, None] < M) & (kk[None, :] < K))
    tl.store(s_ptr + rm, _token_scale(ok, amax), mask=rm < M)


@triton.jit
def _w8a8_gemm_kernel(
    x_ptr,  # (M, K) float activations, row stride stride_xm, unit column stride
    mul_ptr,  # (K,) fp32 smoothing multiplier (ignored unless HAS_MUL)
    b_ptr,  # (N, K) int8 weight, contiguous (the nn.Linear layout)
    sb_ptr,  # (N, GROUPS) fp32 weight scales
    bias_ptr,  # (N,) bias (ignored unless HAS_BIAS)
    c_ptr,  # (M, N) out, contiguous
    M,
    N,
    K,
    stride_xm,
    GROUP: tl.constexpr,  # input channels per weight scale (K for per-channel)
    GROUPED: tl.constexpr,  # GROUP < K
    CHUNK: tl.constexpr,  # GROUPED: columns of a K block that share one weight scale (BLOCK_K, or 16)
    HAS_MUL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,  # -1 none, else ACT_IDS
    INTERPRET_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    groups = K // GROUP
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    # Prologue: the per-token scales of this program's BLOCK_M rows, one pass over K (the rows come
    # back from L2 in the main loop), the same code as the standalone quantize kernel.
    ok, amax, inv = _row_scales(x_rows, mul_ptr, rm, rk, M, K, HAS_MUL, BLOCK_M, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    facc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = _quantize_tile(_scaled_tile(x_rows, mul_ptr, rm, kk, M, K, HAS_MUL), ok, inv)
        b = tl.load(b_ptr + rn[None, :].to(tl.int64) * K + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
        if GROUPED:
            # CHUNK divides GROUP, so each CHUNK of the block lies in one group. An int8 tl.dot needs
            # K >= 32 on NVIDIA: for groups of 16 (CHUNK 16, BLOCK_K 32) each chunk is a full-width dot
            # with the other chunk's columns zeroed (twice the MMA work, exact int32 sums per group).
            for c in tl.static_range(BLOCK_K // CHUNK):
                if CHUNK == BLOCK_K:
                    ac = a
                else:
                    ac = tl.where(((rk >= c * CHUNK) & (rk < (c + 1) * CHUNK))[None, :], a, tl.zeros_like(a))
                part = tl.dot(ac, b, out_dtype=tl.int32)
                # A chunk past K (K = 48 in 32 blocks) has zero x, so any in-bounds scale will do.
                g_idx = tl.minimum((k0 + c * CHUNK) // GROUP, groups - 1)
                sb = tl.load(sb_ptr + rn * groups + g_idx, mask=rn < N, other=0.0)
                facc += part.to(tl.float32) * sb[None, :]
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    sa = _token_scale(ok, amax)
    if GROUPED:
        y = facc * sa[:, None]
    else:
        sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)
        y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if ACT >= 0:
        y = act_forward(y, ACT)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], to_output(y, c_ptr, INTERPRET_BF16), mask=mask)


@triton.jit
def _w8a16_gemm_kernel(
    x_ptr,  # (M, K) float activations, row stride stride_xm
    w_ptr,  # (N, K) int8 weight, contiguous
    sw_ptr,  # (N, GROUPS) fp32 weight scales
    p_ptr,  # (SPLIT_K, M, N) fp32 partial sums, contiguous
    M,
    N,
    K,
    stride_xm,
    GROUP: tl.constexpr,
    GROUPED: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 x: torch's setting, as in linear.py
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    groups = K // GROUP
    # This program's K range: whole BLOCK_K blocks, split as evenly as possible.
    nblocks = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(nblocks, SPLIT_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(pid_k * per, tl.minimum(nblocks, (pid_k + 1) * per)):
        kk = kb * BLOCK_K + rk
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :].to(tl.int64) * K + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
        if GROUPED:
            sw = tl.load(sw_ptr + rn * groups + (kb * BLOCK_K) // GROUP, mask=rn < N, other=0.0)
            acc += tl.dot(x, w.to(x.dtype), out_dtype=tl.float32, input_precision=PRECISION) * sw[None, :]
        else:
            acc = tl.dot(x, w.to(x.dtype), acc, out_dtype=tl.float32, input_precision=PRECISION)
    if not GROUPED:
        acc = acc * tl.load(sw_ptr + rn, mask=rn < N, other=0.0)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(p_ptr + pid_k * M * N + rm[:, None].to(tl.int64) * N + rn[None, :], acc, mask=mask)


@triton.jit
def _finish_kernel(
    p_ptr,  # (SPLIT_K, M * N) fp32 partials
    bias_ptr,  # (N,) (ignored unless HAS_BIAS)
    c_ptr,  # (M, N) out, contiguous
    MN,
    N,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < MN
    y = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT_K):
        y += tl.load(p_ptr + s * MN + offs, mask=m, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs % N, mask=m, other=0.0).to(tl.float32)
    if ACT >= 0:
        y = act_forward(y, ACT)
    tl.store(c_ptr + offs, to_output(y, c_ptr, INTERPRET_BF16), mask=m)


# ---------------------------------------------------------------------------------------------
# Launchers.
# ---------------------------------------------------------------------------------------------
def quantize_per_token(x2: torch.Tensor, smooth: torch.Tensor | None):
    M, K = x2.shape
    q = torch.empty(M, K, dtype=torch.int8, device=x2.device)
    s = torch.empty(M, dtype=torch.float32, device=x2.device)
    if M and K:
        block = min(triton.next_power_of_2(K), 4096)
        with _target.device_guard(x2):
            _quantize_rows_kernel[(M,)](x2, smooth if smooth is not None else s, q, s, M, K, x2.stride(0),
                                        HAS_MUL=smooth is not None, BLOCK_M=1, BLOCK_K=block)
    elif M:
        s.zero_()
    return q, s


def _group(w_scale: torch.Tensor, K: int) -> int:
    return K if w_scale.dim() == 1 or w_scale.shape[1] == 1 else K // w_scale.shape[1]


def _chunk(group: int) -> int:
    """The largest power of two (at most 64) dividing the group: K columns that share one scale and
    can be one tl.dot operand. tl.arange needs a power of two, tl.dot K >= 16 (>= 32 for int8)."""
    chunk = min(group & -group, 64)
    if chunk < 16:
        raise ValueError(f"ember triton int8_linear: group_size must be a multiple of 16, got group_size={group}")
    return chunk


def block_k(mode: str, group: int, grouped: bool) -> tuple[int, int]:
    """(BLOCK_K, CHUNK) for a weight with ``group`` input channels per scale."""
    if not grouped:
        return 64, 64
    chunk = _chunk(group)
    if mode == "w8a8":
        return max(32, chunk), chunk  # int8 MMA: K >= 32; a 16 chunk is split inside the block
    return chunk, chunk


def int8_linear(x2, w, w_scale, bias, smooth, act_id: int, mode: str) -> torch.Tensor:
    M, K = x2.shape
    N = w.shape[0]
    out = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    if M == 0 or N == 0:
        return out
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()  # the epilogues read bias[n] at unit stride
    group = _group(w_scale, K)
    grouped = group < K
    bk, chunk = block_k(mode, group, grouped)
    with _target.device_guard(x2):
        if mode == "w8a8":
            _w8a8(x2, w, w_scale, bias, smooth, act_id, out, group, grouped, bk, chunk)
        else:
            _w8a16(x2, w, w_scale, bias, smooth, act_id, out, group, grouped, bk)
    return out


def _w8a8(x2, w, w_scale, bias, smooth, act_id, out, group, grouped, bk, chunk):
    M, K = x2.shape
    N = w.shape[0]
    interp = _target.interpreting()
    bm = 16 if M <= 16 else (64 if M <= 64 else 128)
    # Grouped weights keep two accumulators (the group's int32 dot and the scaled fp32 sum): on a
    # 128 x 128 tile they spilled 200-620 B per thread on sm_90 even with 8 warps (compile-check).
    bn = 64 if (interp or grouped) else 128
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _w8a8_gemm_kernel[grid](x2, smooth if smooth is not None else w_scale, w, w_scale,
                            bias if bias is not None else w_scale, out, M, N, K, x2.stride(0),
                            GROUP=group, GROUPED=grouped, CHUNK=chunk, HAS_MUL=smooth is not None,
                            HAS_BIAS=bias is not None, ACT=act_id,
                            INTERPRET_BF16=interp and x2.dtype == torch.bfloat16,
                            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4 if bm <= 64 else 8)


def _w8a16(x2, w, w_scale, bias, smooth, act_id, out, group, grouped, bk):
    from .linear import _precision

    M, K = x2.shape
    N = w.shape[0]
    interp = _target.interpreting()
    ib16 = interp and x2.dtype == torch.bfloat16
    if smooth is not None:
        x2 = x2 * smooth.to(x2.dtype)
    # fp64: tl.dot has no fp64 on tensor cores, so fp32 operands, always exact fp32 (never tf32).
    precision = "ieee" if x2.dtype == torch.float64 else _precision(x2.dtype, x2.device)
    if x2.dtype == torch.float64:
        x2 = x2.float()
    bm = 16 if M <= 16 else (64 if M <= 64 else 128)
    # Grouped weights add the scaled group sum to a second accumulator: 128 x 128 spilled 84 B on sm_90.
    bn = 64 if (interp or M <= 16 or grouped) else 128
    if x2.dtype == torch.float32 and precision == "ieee":
        # exact fp32 runs on FMA units with the operand tiles and the product in registers: 128 x 128
        # spilled ~96 KB per thread to local memory on sm_80 and sm_90 (compile-check), 64 x 64 x 64 ~19
        # KB and 64 x 64 x 32 1.0-1.3 KB; 64 x 64 x 16 none (as for the linear kernel's fp32 configs)
        bm, bn, bk = min(bm, 64), 64, min(bk, 16)
    nblocks = triton.cdiv(K, bk)
    # Decode: enough programs to cover the GPU (~132 SMs on H100) even when N / BLOCK_N is small.
    split = 1 if (M > 16 or interp) else max(1, min(nblocks, 256 // max(1, triton.cdiv(N, bn))))
    if interp and M <= 16:
        split = min(2, nblocks)  # exercise the split-K reduction under the interpreter too
    part = torch.empty(split, M, N, dtype=torch.float32, device=x2.device)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), split)
    _w8a16_gemm_kernel[grid](x2, w, w_scale, part, M, N, K, x2.stride(0), GROUP=group, GROUPED=grouped,
                             SPLIT_K=split, PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                             num_warps=8 if bm * bn >= 128 * 64 else 4)  # 4 warps on 128 x 128 / 64 spilled
    blk = 1024
    _finish_kernel[(triton.cdiv(M * N, blk),)](part, bias if bias is not None else part, out, M * N, N,
                                               SPLIT_K=split, HAS_BIAS=bias is not None, ACT=act_id,
                                               INTERPRET_BF16=ib16, BLOCK=blk)
