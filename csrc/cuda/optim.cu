// Multi-tensor optimizer step on CUDA: one launch for up to kMaxTensors tensors of a group.
//
// The tensor table travels in the kernel's parameter space, so the launch needs no upload and is
// graph-capturable (csrc/cuda/multi_tensor.cuh). Each block owns one chunk of kChunk elements of one
// tensor and finds it by binary search over the tensors' first-block indices. Every element is read
// once and written once; the math is ember::opt_update (csrc/optim.h) on floats, the same source the
// CPU kernels instantiate.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/common.cuh"
#include "cuda/multi_tensor.cuh"
#include "cuda/optim_launchers.h"

namespace ember::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kUnroll = 4;
constexpr int64_t kChunk = int64_t{kThreads} * kUnroll * 16;  // 32768 elements per block

using Table = TensorTable<OptCudaTensor>;

struct ScalarMath {
  static __device__ __forceinline__ float splat(float x) { return x; }
  static __device__ __forceinline__ float sqrt(float x) { return sqrtf(x); }
  static __device__ __forceinline__ float max(float a, float b) { return a != a ? a : fmaxf(a, b); }
  static __device__ __forceinline__ float sign(float x) { return x > 0.f ? 1.f : (x < 0.f ? -1.f : 0.f); }
};

template <Opt K, typename P, typename S>
__global__ void __launch_bounds__(kThreads) optim_kernel(const __grid_constant__ Table table, OptHyper h,
                                                         const float* lr_ptr, const float* scale_ptr,
                                                         const float* inf_ptr) {
  if (inf_ptr != nullptr && *inf_ptr != 0.f) return;  // AMP: skip the whole step
  const int64_t block = blockIdx.x;
  const int owner = owner_of(table, block);
  const OptCudaTensor& t = table.t[owner];
  const OptCoef c = device_coef(K, h, t, lr_ptr);
  const float inv_scale = scale_ptr != nullptr ? 1.f / *scale_ptr : 1.f;
  const int64_t begin = (block - table.first_cta[owner]) * kChunk;
  const int64_t end = min(begin + kChunk, t.n);
  P* param = static_cast<P*>(t.param);
  const P* grad = static_cast<const P*>(t.grad);
  S* s1 = static_cast<S*>(t.s1);
  S* s2 = static_cast<S*>(t.s2);
  S* s3 = static_cast<S*>(t.s3);
  for (int64_t base = begin + threadIdx.x; base < end; base += int64_t{kThreads} * kUnroll) {
    float p[kUnroll], g[kUnroll], a[kUnroll], b[kUnroll], d[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all loads first: kUnroll independent requests in flight
      const int64_t i = base + int64_t{u} * kThreads;
      if (i < end) {
        p[u] = t.master ? t.master[i] : load(param, i);
        g[u] = load(grad, i) * inv_scale;
        a[u] = s1 ? load(s1, i) : 0.f;
        b[u] = s2 ? load(s2, i) : 0.f;
        d[u] = s3 ? load(s3, i) : 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + int64_t{u} * kThreads;
      if (i < end) {
        opt_update<K, ScalarMath>(h, c, p[u], g[u], a[u], b[u], d[u]);
        if (t.master) t.master[i] = p[u];
        store(param, i, p[u]);
        if (s1) store(s1, i, a[u]);
        if (s2) store(s2, i, b[u]);
        if (s3) store(s3, i, d[u]);
      }
    }
  }
}

template <typename P, typename S>
cudaError_t launch_typed(Opt kind, const OptHyper& h, const OptCudaTensor* tensors, int64_t count, const float* lr,
                         const float* scale, const float* inf, cudaStream_t stream) {
  const auto ctas_of = [](const OptCudaTensor& t) { return (t.n + kChunk - 1) / kChunk; };
  return for_each_table(tensors, count, inf, stream, ctas_of, [&](const Table& table, int64_t blocks) {
    const dim3 grid(static_cast<unsigned>(blocks));
    switch (kind) {  // C++17 here (nvcc), so a switch rather than dispatch_opt's template lambda
      case Opt::kSGD: optim_kernel<Opt::kSGD, P, S><<<grid, kThreads, 0, stream>>>(table, h, lr, scale, inf); break;
      case Opt::kAdam: optim_kernel<Opt::kAdam, P, S><<<grid, kThreads, 0, stream>>>(table, h, lr, scale, inf); break;
      case Opt::kAdagrad:
        optim_kernel<Opt::kAdagrad, P, S><<<grid, kThreads, 0, stream>>>(table, h, lr, scale, inf);
        break;
      case Opt::kRMSprop:
        optim_kernel<Opt::kRMSprop, P, S><<<grid, kThreads, 0, stream>>>(table, h, lr, scale, inf);
        break;
      case Opt::kLion: optim_kernel<Opt::kLion, P, S><<<grid, kThreads, 0, stream>>>(table, h, lr, scale, inf); break;
    }
  });
}

}  // namespace

cudaError_t optim_step(Opt kind, DType param_dtype, bool state_fp32, const OptHyper& hyper, const OptCudaTensor* tensors,
                       int64_t count, const float* lr, const float* grad_scale, const float* found_inf,
                       cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  switch (param_dtype) {
    case DType::kFloat16:
      return state_fp32 ? launch_typed<__half, float>(kind, hyper, tensors, count, lr, grad_scale, found_inf, stream)
                        : launch_typed<__half, __half>(kind, hyper, tensors, count, lr, grad_scale, found_inf, stream);
    case DType::kBFloat16:
      return state_fp32
                 ? launch_typed<__nv_bfloat16, float>(kind, hyper, tensors, count, lr, grad_scale, found_inf, stream)
                 : launch_typed<__nv_bfloat16, __nv_bfloat16>(kind, hyper, tensors, count, lr, grad_scale, found_inf,
                                                              stream);
    case DType::kFloat32:
      return launch_typed<float, float>(kind, hyper, tensors, count, lr, grad_scale, found_inf, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace ember::cuda
