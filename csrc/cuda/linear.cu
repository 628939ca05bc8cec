// Tensor-core GEMM with a fused epilogue, for fp16 / bf16 with fp32 accumulation (sm_80+):
//
//   out = act(x @ W^T + b) [+ residual]                      (GATED = false)
//   out = act(x @ Wg^T + bg) * (x @ Wu^T + bu)               (GATED = true: two weights, one pass over x)
//
// x is (M, K) and W (N, K), both with K contiguous (W exactly as nn.Linear stores it), so both
// operands stream K-major into shared memory and feed mma.sync.m16n8k16 in its row.col form with no
// transposes. The pre-activation(s) can be stored for backward.
//
// Structure (one CTA = one BM x BN output tile, 8 warps in a 2 x 4 grid):
//   global -> shared  cp.async 16-byte copies, STAGES-deep ring so loads of tile k+2 overlap the math
//                     on tile k; rows past M / N are zero-filled by the copy itself (src-size 0)
//   shared -> regs    ldmatrix.x4 (A: one m16k16 fragment; B: two n8k16 fragments); rows padded by
//                     8 elements (80-byte pitch) so the 8 addresses of each ldmatrix phase hit 8
//                     distinct 16-byte bank groups
//   math              mma.sync m16n8k16 fp32 accumulate
//   epilogue          bias, activation, gating / residual on the fp32 accumulators, straight from
//                     registers to global (pairs of adjacent columns per store)
//
// FLOPs: 2 M N K (4 M N K gated). Not yet measured on a GPU (no device where this was written): the
// Triton kernel (kernels/linear.py) is the tuned path; this one is compile-checked for sm_80 / sm_90a.
// A Hopper wgmma + TMA variant is future work.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/common.cuh"
#include "cuda/linear_launcher.h"

namespace ember::cuda {
namespace {

constexpr int kBM = 128, kBK = 32, kPad = 8, kPitch = kBK + kPad, kStages = 3, kThreads = 256;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;  // 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Copies a ROWS x kBK tile (rows row0.., columns k0..) of a K-contiguous matrix into shared memory.
template <typename T, int ROWS>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int64_t ld, int64_t row0, int64_t rows, int k0, int K) {
  constexpr int kChunks = ROWS * kBK / 8;  // 16-byte chunks of 8 elements
  for (int c = threadIdx.x; c < kChunks; c += kThreads) {
    const int r = c / (kBK / 8), kc = (c % (kBK / 8)) * 8;
    const bool valid = row0 + r < rows && k0 + kc < K;  // K % 8 == 0: a chunk is all in or all out
    const T* src = valid ? g + (row0 + r) * ld + k0 + kc : g;
    cp_async16(smem + r * kPitch + kc, src, valid);
  }
}

struct Epilogue {
  const void* bias;
  const void* bias2;
  const void* residual;
  void* out;
  void* pre;
  int64_t ld_res, ld_out, ld_pre;
};

template <typename T, int ACT>
__device__ __forceinline__ float apply_act(float v) {
  if constexpr (ACT < 0) {
    return v;
  } else {
    return act_forward<static_cast<Act>(ACT), float>(v);
  }
}

// BN: output tile width (128, or 64 for the gated kernel, whose two accumulators would not fit
// in registers at 128). Each warp owns a 64 x (BN / 4) sub-tile: 4 m16 tiles x NT n8 tiles.
template <typename T, int BN, int ACT, bool GATED>
__global__ void __launch_bounds__(kThreads) linear_mma_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                              const T* __restrict__ w2, Epilogue ep, int64_t M,
                                                              int64_t N, int K, int64_t ldx, int64_t ldw) {
  constexpr int kWN = BN / 4, kNT = kWN / 8, kMT = 4;
  constexpr int kNB = GATED ? 2 : 1;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* As = reinterpret_cast<T*>(smem_raw);
  T* Bs = As + kStages * kBM * kPitch;  // then, if GATED, the second weight's ring

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 4, wn = warp % 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int ktiles = (K + kBK - 1) / kBK;

  float acc[kNB][kMT][kNT][4] = {};

  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * kBK;
    load_tile<T, kBM>(As + stage * kBM * kPitch, x, ldx, m0, M, k0, K);
    load_tile<T, BN>(Bs + stage * BN * kPitch, w, ldw, n0, N, k0, K);
    if constexpr (GATED) load_tile<T, BN>(Bs + (kStages + stage) * BN * kPitch, w2, ldw, n0, N, k0, K);
  };

  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt is in shared memory, and every warp is done with the stage refilled next
    const int next = kt + kStages - 1;
    if (next < ktiles) load_stage(next % kStages, next);
    cp_async_commit();

    const int stage = kt % kStages;
    const T* a_s = As + stage * kBM * kPitch + (wm * 64) * kPitch;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t afrag[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
        ldmatrix_x4(afrag[mt], a_s + (mt * 16 + lane % 16) * kPitch + kk + (lane / 16) * 8);
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
        const T* b_s = Bs + (nb * kStages + stage) * BN * kPitch + (wn * kWN) * kPitch;
#pragma unroll
        for (int np = 0; np < kNT / 2; ++np) {  // two n8 tiles per ldmatrix.x4
          uint32_t bfrag[4];
          ldmatrix_x4(bfrag, b_s + (np * 16 + lane % 8 + (lane / 16) * 8) * kPitch + kk + ((lane / 8) % 2) * 8);
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            mma16816<T>(acc[nb][mt][2 * np], afrag[mt], bfrag[0], bfrag[1]);
            mma16816<T>(acc[nb][mt][2 * np + 1], afrag[mt], bfrag[2], bfrag[3]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue. Accumulator fragment: c[0], c[1] at (row lane/4, cols 2*(lane%4) + {0,1}), c[2], c[3]
  // eight rows further down.
  const T* bias = static_cast<const T*>(ep.bias);
  const T* bias2 = static_cast<const T*>(ep.bias2);
  const T* res = static_cast<const T*>(ep.residual);
  T* out = static_cast<T*>(ep.out);
  T* pre = static_cast<T*>(ep.pre);
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      const int64_t col = n0 + wn * kWN + nt * 8 + 2 * (lane % 4);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t row = m0 + wm * 64 + mt * 16 + lane / 4 + half * 8;
        if (row >= M) continue;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int64_t c = col + j;
          if (c >= N) continue;
          float v = acc[0][mt][nt][2 * half + j];
          if (bias != nullptr) v += to_opmath(bias[c]);
          float y;
          if constexpr (GATED) {
            float u = acc[kNB - 1][mt][nt][2 * half + j];
            if (bias2 != nullptr) u += to_opmath(bias2[c]);
            if (pre != nullptr) {
              pre[row * ep.ld_pre + c] = from_opmath<T>(v);
              pre[row * ep.ld_pre + N + c] = from_opmath<T>(u);
            }
            y = apply_act<T, ACT>(v) * u;
          } else {
            if (pre != nullptr) pre[row * ep.ld_pre + c] = from_opmath<T>(v);
            y = apply_act<T, ACT>(v);
            if (res != nullptr) y += to_opmath(res[row * ep.ld_res + c]);
          }
          out[row * ep.ld_out + c] = from_opmath<T>(y);
        }
      }
    }
  }
}

template <typename T, int BN, int ACT, bool GATED>
cudaError_t launch(const LinearMmaArgs& a, cudaStream_t stream) {
  const int nb = GATED ? 2 : 1;
  const size_t smem = static_cast<size_t>(kStages) * (kBM + nb * BN) * kPitch * sizeof(T);
  auto kernel = linear_mma_kernel<T, BN, ACT, GATED>;
  EMBER_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>((a.N + BN - 1) / BN), static_cast<unsigned>((a.M + kBM - 1) / kBM));
  const Epilogue ep{a.bias, a.bias2, a.residual, a.out, a.pre, a.ld_res, a.ld_out, a.ld_pre};
  kernel<<<grid, kThreads, smem, stream>>>(static_cast<const T*>(a.x), static_cast<const T*>(a.w),
                                           static_cast<const T*>(a.w2), ep, a.M, a.N, static_cast<int>(a.K), a.ldx,
                                           a.ldw);
  return cudaGetLastError();
}

template <typename T, int ACT>
cudaError_t launch_act(const LinearMmaArgs& a, cudaStream_t stream) {
  return a.w2 != nullptr ? launch<T, 64, ACT, true>(a, stream) : launch<T, 128, ACT, false>(a, stream);
}

template <typename T>
cudaError_t launch_dtype(const LinearMmaArgs& a, cudaStream_t stream) {
  switch (a.act) {
    case -1: return launch_act<T, -1>(a, stream);
    case 0: return launch_act<T, 0>(a, stream);
    case 1: return launch_act<T, 1>(a, stream);
    case 2: return launch_act<T, 2>(a, stream);
    case 3: return launch_act<T, 3>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace

bool linear_mma_supported(const LinearMmaArgs& a) {
  const bool dtype_ok = a.dtype == DType::kFloat16 || a.dtype == DType::kBFloat16;
  return dtype_ok && a.K % 8 == 0 && a.ldx % 8 == 0 && a.ldw % 8 == 0 && a.K < (int64_t{1} << 31) &&
         a.N < (int64_t{65535} * 64) && aligned16(a.x) && aligned16(a.w) && aligned16(a.w2) &&
         (a.M + kBM - 1) / kBM <= 65535 && a.act >= -1 && a.act <= 3;
}

cudaError_t linear_mma(const LinearMmaArgs& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  if (!linear_mma_supported(a) || a.K == 0) return cudaErrorInvalidValue;
  return a.dtype == DType::kBFloat16 ? launch_dtype<__nv_bfloat16>(a, stream) : launch_dtype<__half>(a, stream);
}

}  // namespace ember::cuda
