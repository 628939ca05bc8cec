// AdamW8bit step on CUDA: one launch for up to kMaxTensors tensors of a group.
//
// The tensor table travels in the kernel's parameter space (csrc/cuda/multi_tensor.cuh), so the
// launch needs no upload and is graph-capturable. A thread block owns kBlocksPerCta consecutive
// 256-element blocks of one tensor; each warp takes one block at a time, every lane holding 8 of its elements (lane +
// 32 k: coalesced loads of any width, no alignment needed). The block's new absmax is a warp
// shuffle reduction, so no shared memory or atomics. The math is csrc/optim8bit.h + opt_update on
// floats with IEEE division and sqrt, so the codes match the CPU kernels and the reference bit for
// bit. found_inf and device step counts are read here, on the device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/common.cuh"
#include "cuda/multi_tensor.cuh"
#include "cuda/optim_launchers.h"
#include "optim8bit.h"

namespace ember::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPerLane = kQBlock / 32;
constexpr int64_t kBlocksPerCta = kWarps * 4;  // 8192 elements per thread block

using Table = TensorTable<Opt8CudaTensor>;

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
  const int owner = owner_of(table, cta);
  const Opt8CudaTensor& t = table.t[owner];
  const OptCoef c = device_coef(Opt::kAdam, h, t, lr_ptr);
  const float inv_scale = scale_ptr != nullptr ? 1.f / *scale_ptr : 1.f;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t nblocks = (t.n + kQBlock - 1) / kQBlock;
  const int64_t b0 = (cta - table.first_cta[owner]) * kBlocksPerCta;
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

template <typename P>
cudaError_t launch_typed(const OptHyper& h, const Opt8CudaTensor* tensors, int64_t count, const float* lr,
                         const float* scale, const float* inf, cudaStream_t stream) {
  const auto ctas_of = [](const Opt8CudaTensor& t) {
    const int64_t nblocks = (t.n + kQBlock - 1) / kQBlock;
    return (nblocks + kBlocksPerCta - 1) / kBlocksPerCta;
  };
  return for_each_table(tensors, count, inf, stream, ctas_of, [&](const Table& table, int64_t ctas) {
    adamw8bit_kernel<P><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(table, h, lr, scale, inf);
  });
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
