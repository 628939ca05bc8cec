// Int8 inference on NVIDIA tensor cores: per-token quantization and the W8A8 GEMM
//     out[m, n] = act(sa[m] * sb[n] * sum_k a[m, k] b[n, k] + bias[n])
// with a (M, K) int8 activations, b (N, K) int8 weights (nn.Linear layout), int32 accumulation on
// mma.sync.m16n8k32.s8 (sm_80+; sm_90 runs it too, without wgmma), dequantization, bias and
// activation in the epilogue, output in the activations' dtype.
//
// Why int8: at prefill the GEMM is compute bound and int8 mma runs 2x the ops/cycle of bf16 mma; at
// decode it is weight-bandwidth bound and int8 weights are half the bytes of bf16.
//
// Tiling: a 128 x 128 output tile per block, 8 warps as 2 (M) x 4 (N), each warp 64 x 32 = 4 x 4
// mma tiles (16 x 8). K advances 64 at a time through shared memory, double buffered with cp.async
// so the next tile's loads overlap this tile's mma. Shared rows are padded by 16 bytes so the
// fragment loads (4 bytes per lane, 8 rows per warp) hit distinct banks.
//
// Reference: ember.ops.int8.int8_linear_reference; the torch glue is int8_glue.cpp.
// Requirements (checked by the glue): K % 16 == 0 and 16-byte aligned rows (cp.async 16-byte copies).
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/launchers.h"

namespace ember::cuda {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 64;
constexpr int kPad = 16;               // bytes of padding per shared row
constexpr int kLds = kBK + kPad;       // shared row stride in bytes
constexpr int kGemmThreads = 256;          // 8 warps
constexpr int kStageBytes = (kBM + kBN) * kLds;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#if __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0 source bytes: the 16 destination bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// d += a (16 x 32, row) * b (32 x 8, col), s8 inputs, s32 accumulators.
__device__ __forceinline__ void mma_s8(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// One stage: the block's 128 rows of a and 128 rows of b, columns [k0, k0 + 64), 16 bytes per copy.
__device__ __forceinline__ void load_stage(int8_t* smem, const int8_t* a, const int8_t* b, int64_t M, int64_t N,
                                           int64_t K, int64_t m0, int64_t n0, int64_t k0) {
  constexpr int kChunks = kBK / 16;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < (kBM + kBN) * kChunks; i += kGemmThreads) {
    const int row = i / kChunks, chunk = i % kChunks;
    const int64_t k = k0 + chunk * 16;
    const bool is_a = row < kBM;
    const int64_t g = is_a ? m0 + row : n0 + (row - kBM);
    const bool valid = (is_a ? g < M : g < N) && k < K;
    const int8_t* src = (is_a ? a : b) + (valid ? g * K + k : 0);
    cp_async16(smem + row * kLds + chunk * 16, src, valid);
  }
}

template <typename T, Act A, bool HAS_ACT>
__global__ void __launch_bounds__(kGemmThreads) w8a8_gemm_kernel(const int8_t* __restrict__ a, const float* __restrict__ sa,
                                                             const int8_t* __restrict__ b, const float* __restrict__ sb,
                                                             const float* __restrict__ bias, T* __restrict__ out,
                                                             int64_t M, int64_t N, int64_t K) {
  extern __shared__ __align__(16) int8_t smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, tig = lane % 4;  // mma fragment coordinates
  const int wm = (warp / 4) * 64, wn = (warp % 4) * 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;

  int32_t acc[4][4][4] = {};
  const int64_t ktiles = (K + kBK - 1) / kBK;
  load_stage(smem, a, b, M, N, K, m0, n0, 0);
  cp_async_commit();
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    int8_t* cur = smem + (kt % 2) * kStageBytes;
    if (kt + 1 < ktiles) load_stage(smem + ((kt + 1) % 2) * kStageBytes, a, b, M, N, K, m0, n0, (kt + 1) * kBK);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int8_t* As = cur;
    const int8_t* Bs = cur + kBM * kLds;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 32) {
      uint32_t af[4][4], bf[4][2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int8_t* r0 = As + (wm + i * 16 + group) * kLds + kk + tig * 4;
        const int8_t* r1 = r0 + 8 * kLds;
        af[i][0] = *reinterpret_cast<const uint32_t*>(r0);
        af[i][1] = *reinterpret_cast<const uint32_t*>(r1);
        af[i][2] = *reinterpret_cast<const uint32_t*>(r0 + 16);
        af[i][3] = *reinterpret_cast<const uint32_t*>(r1 + 16);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int8_t* c = Bs + (wn + j * 8 + group) * kLds + kk + tig * 4;
        bf[j][0] = *reinterpret_cast<const uint32_t*>(c);
        bf[j][1] = *reinterpret_cast<const uint32_t*>(c + 16);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_s8(acc[i][j], af[i], bf[j]);
    }
    __syncthreads();  // this stage is overwritten by the load two iterations on
  }

  // Epilogue: accumulator (i, j, r) is row wm + i*16 + group (+8 for r >= 2), column wn + j*8 + tig*2 (+1
  // for odd r).
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t m = m0 + wm + i * 16 + group + half * 8;
      if (m >= M) continue;
      const float s_row = sa[m];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int64_t n = n0 + wn + j * 8 + tig * 2 + c;
          if (n >= N) continue;
          float y = static_cast<float>(acc[i][j][half * 2 + c]) * s_row * sb[n];
          if (bias) y += bias[n];
          if constexpr (HAS_ACT) y = act_forward<A>(y);
          if constexpr (std::is_same_v<T, double>) {
            out[m * N + n] = static_cast<double>(y);
          } else {
            out[m * N + n] = from_opmath<T>(y);
          }
        }
      }
    }
  }
}

// One block per row: absmax over the row (block reduction), then scale / round / store.
template <typename T>
__global__ void quantize_rows_kernel(const T* __restrict__ x, int64_t cols, int64_t ld, const float* __restrict__ mul,
                                     int8_t* __restrict__ q, float* __restrict__ scale) {
  __shared__ float red[32];
  __shared__ int bad_any;
  const int64_t row = blockIdx.x;
  const T* xr = x + row * ld;
  float amax = 0.f;
  int bad = 0;
  if (threadIdx.x == 0) bad_any = 0;
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
    float v = static_cast<float>(to_opmath(xr[i]));
    if (mul) v *= mul[i];
    bad |= !isfinite(v);
    amax = fmaxf(amax, fabsf(v));
  }
  for (int o = 16; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = amax;
  __syncthreads();
  if (bad) atomicOr(&bad_any, 1);
  if (threadIdx.x < 32) {
    float v = threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (threadIdx.x == 0) red[0] = v;
  }
  __syncthreads();
  const bool ok = bad_any == 0;
  const float row_max = red[0];
  const float inv = (ok && row_max > 0.f) ? 127.f / row_max : 0.f;
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
    float v = static_cast<float>(to_opmath(xr[i]));
    if (mul) v *= mul[i];
    const float r = ok ? fminf(fmaxf(rintf(v * inv), -127.f), 127.f) : 0.f;  // rint: ties to even
    q[row * cols + i] = static_cast<int8_t>(r);
  }
  if (threadIdx.x == 0) scale[row] = ok ? row_max / 127.f : __int_as_float(0x7fc00000);
}

}  // namespace

cudaError_t quantize_rows(const void* x, int64_t rows, int64_t cols, int64_t ld, DType dtype, const float* mul,
                          int8_t* q, float* scale, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return dispatch(dtype, Act::kRelu, [&](auto type_tag, auto) -> cudaError_t {
    using T = typename decltype(type_tag)::type;
    quantize_rows_kernel<T><<<static_cast<unsigned>(rows), 256, 0, stream>>>(static_cast<const T*>(x), cols, ld, mul,
                                                                               q, scale);
    return cudaGetLastError();
  });
}

cudaError_t w8a8_gemm(const int8_t* a, const float* sa, const int8_t* b, const float* sb, const float* bias,
                      void* out, int64_t M, int64_t N, int64_t K, DType dtype, int32_t act, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const bool has_act = act >= 0;
  return dispatch(dtype, has_act ? static_cast<Act>(act) : Act::kRelu, [&](auto type_tag, auto act_tag) -> cudaError_t {
    using T = typename decltype(type_tag)::type;
    constexpr Act A = decltype(act_tag)::value;
    auto kernel = has_act ? w8a8_gemm_kernel<T, A, true> : w8a8_gemm_kernel<T, A, false>;
    const int smem = 2 * kStageBytes;
    EMBER_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    // grid.y is at most 65535 row tiles (8.4M rows): taller inputs run as several launches, each on
    // its own slice of rows of a, sa and out.
    constexpr int64_t kMaxRows = int64_t{65535} * kBM;
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const int64_t rows = M - m0 < kMaxRows ? M - m0 : kMaxRows;
      const dim3 grid(static_cast<unsigned>((N + kBN - 1) / kBN), static_cast<unsigned>((rows + kBM - 1) / kBM));
      kernel<<<grid, kGemmThreads, smem, stream>>>(a + m0 * K, sa + m0, b, sb, bias, static_cast<T*>(out) + m0 * N,
                                                   rows, N, K);
      EMBER_CUDA_TRY(cudaGetLastError());
    }
    return cudaSuccess;
  });
}

}  // namespace ember::cuda
