// AdamW8bit step on CUDA: one launch for up to kMaxTensors tensors of a group.
//
// The tensor table travels in the kernel's parameter space (as in optim.cu), so the launch needs no
// upload and is graph-capturable. A thread block owns kBlocksPerCta consecutive 256-element blocks
// of one tensor; each warp takes one block at a time, every lane holding 8 of its elements (lane +
// 32 k: coalesced loads of any width, no alignment needed). The block's new absmax is a warp
// shuffle reduction, so no shared memory or atomics. The math is csrc/optim8bit.h + opt_update on
// floats with IEEE division and sqrt, so the codes match the CPU kernels and the reference bit for
// bit. found_inf and device step counts are read here, on the device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/common.cuh"
#include "cuda/optim_launchers.h"
#include "optim8bit.h"

namespace ember::cuda {
namespace {

constexpr int kMaxTensors = 320;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPerLane = kQBlock / 32;
constexpr int64_t kBlocksPerCta = kWarps * 4;  // 8192 elements per thread block

struct Table {
  Opt8CudaTensor t[kMaxTensors];
  int64_t first_cta[kMaxTensors + 1];
  int count;
};

// NaN-propagating max (torch.amax semantics), for either argument.
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

struct Math8 {
  static __device__ __forceinline__ float splat(float x) { return x; }
  static __device__ __forceinline__ float sqrt(float x) { return sqrtf(x); }
  static __device__ __forceinline__ float max(float a, float b) { return a != a ? a : fmaxf(a, b); }
  static __device__ __forceinline__ float abs(float x) { return fabsf(x); }
  static __device__ __forceinline__ float round(float x) { return rintf(x); }  // half to even
  static __device__ __forceinline__ float copysign(float x, float s) { return s < 0.f ? -x : x; }
  static __device__ __forceinline__ float div(float a, float b, float) { return a / b; }
};

template <typename P>
__global__ void __launch_bounds__(kThreads) adamw8bit_kernel(const __grid_constant__ Table table, OptHyper h,
                                                             const float* lr_ptr, const float* scale_ptr,
                                                             const float* inf_ptr) {
  if (inf_ptr != nullptr && *inf_ptr != 0.f) return;  // AMP: skip the whole step
  const int64_t cta = blockIdx.x;
  int lo = 0, hi = table.count - 1;  // last tensor whose first thread block is <= cta
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.first_cta[mid] <= cta) lo = mid;
    else hi = mid - 1;
  }
  const Opt8CudaTensor& t = table.t[lo];
  if (lr_ptr != nullptr) {
    h.lr = *lr_ptr;
    h.decay = 1.f - h.lr * h.wd;
  }
  OptCoef c = t.coef;
  if (t.step != nullptr) c = opt_coef(Opt::kAdam, h.lr, h.h1, h.h2, static_cast<double>(*t.step) + 1.0);
  const float inv_scale = scale_ptr != nullptr ? 1.f / *scale_ptr : 1.f;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t nblocks = (t.n + kQBlock - 1) / kQBlock;
  const int64_t b0 = (cta - table.first_cta[lo]) * kBlocksPerCta;
  const int64_t b1 = b0 + kBlocksPerCta < nblocks ? b0 + kBlocksPerCta : nblocks;
  P* param = static_cast<P*>(t.param);
  const P* grad = static_cast<const P*>(t.grad);
  for (int64_t blk = b0 + warp; blk < b1; blk += kWarps) {
    const float am = t.exp_avg_absmax[blk], av = t.exp_avg_sq_absmax[blk];
    float m[kPerLane], v[kPerLane];
    float mmax = 0.f, vmax = 0.f;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t i = blk * kQBlock + k * 32 + lane;
      m[k] = v[k] = 0.f;  // past the end: zero moments leave absmax alone
      if (i < t.n) {
        float p = load(param, i), g = load(grad, i) * inv_scale, unused = 0.f;
        m[k] = dequant_signed<Math8>(static_cast<float>(t.exp_avg[i]), am);
        v[k] = dequant_unsigned<Math8>(static_cast<float>(t.exp_avg_sq[i]), av);
        opt_update<Opt::kAdam, Math8>(h, c, p, g, m[k], v[k], unused);
        store(param, i, p);
      }
      mmax = nan_max(mmax, fabsf(m[k]));
      vmax = nan_max(vmax, v[k]);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {  // also orders every lane's absmax read before the write
      mmax = nan_max(mmax, __shfl_xor_sync(0xffffffffu, mmax, off));
      vmax = nan_max(vmax, __shfl_xor_sync(0xffffffffu, vmax, off));
    }
    const float sm = Math8::max(mmax, 1e-30f), sv = Math8::max(vmax, 1e-30f);
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t i = blk * kQBlock + k * 32 + lane;
      if (i < t.n) {
        t.exp_avg[i] = static_cast<int8_t>(quant_signed<Math8>(m[k], sm, 0.f));
        t.exp_avg_sq[i] = static_cast<uint8_t>(quant_unsigned<Math8>(v[k], sv, 0.f));
      }
    }
    if (lane == 0) {
      t.exp_avg_absmax[blk] = mmax;
      t.exp_avg_sq_absmax[blk] = vmax;
    }
  }
}

// Advances device step counts after the update (every thread block must have read the old count).
__global__ void advance_steps(const __grid_constant__ Table table, const float* inf_ptr) {
  if (inf_ptr != nullptr && *inf_ptr != 0.f) return;
  for (int i = threadIdx.x; i < table.count; i += blockDim.x)
    if (table.t[i].step != nullptr) *table.t[i].step += 1.f;
}

template <typename P>
cudaError_t launch_typed(const OptHyper& h, const Opt8CudaTensor* tensors, int64_t count, const float* lr,
                         const float* scale, const float* inf, cudaStream_t stream) {
  for (int64_t start = 0; start < count; start += kMaxTensors) {
    Table table;
    table.count = static_cast<int>(count - start < kMaxTensors ? count - start : kMaxTensors);
    int64_t ctas = 0;
    bool any_step = false;
    for (int i = 0; i < table.count; ++i) {
      table.t[i] = tensors[start + i];
      table.first_cta[i] = ctas;
      const int64_t nblocks = (table.t[i].n + kQBlock - 1) / kQBlock;
      ctas += (nblocks + kBlocksPerCta - 1) / kBlocksPerCta;
      any_step |= table.t[i].step != nullptr;
    }
    table.first_cta[table.count] = ctas;
    if (ctas > 0) {
      adamw8bit_kernel<P><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(table, h, lr, scale, inf);
      if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    }
    if (any_step) {
      advance_steps<<<1, 256, 0, stream>>>(table, inf);
      if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    }
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t adamw8bit_step(DType param_dtype, const OptHyper& hyper, const Opt8CudaTensor* tensors, int64_t count,
                           const float* lr, const float* grad_scale, const float* found_inf, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  switch (param_dtype) {
    case DType::kFloat16: return launch_typed<__half>(hyper, tensors, count, lr, grad_scale, found_inf, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(hyper, tensors, count, lr, grad_scale, found_inf, stream);
    case DType::kFloat32: return launch_typed<float>(hyper, tensors, count, lr, grad_scale, found_inf, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace ember::cuda
