// Multi-tensor apply for the CUDA optimizer steps (optim.cu, optim8bit.cu): the tensor table, the
// search for the tensor a thread block works on, the device-side hyper-parameters and step counts,
// and the host loop that launches one kernel per table of up to kMaxTensors tensors.
//
// The table travels in the kernel's parameter space (CUDA 12.1+ allows 32 KB: 320 tensors of 72
// bytes), so no host-to-device copy precedes a launch and the launch is graph-capturable. Each tensor
// owns a run of consecutive thread blocks; first_cta[i] is the first block of tensor i.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "optim.h"

namespace ember::cuda {

constexpr int kMaxTensors = 320;

template <typename Tensor>
struct TensorTable {
  Tensor t[kMaxTensors];
  int64_t first_cta[kMaxTensors + 1];
  int count;
};

// The tensor whose run of thread blocks contains `cta`: the last i with first_cta[i] <= cta.
template <typename Tensor>
__device__ __forceinline__ int owner_of(const TensorTable<Tensor>& table, int64_t cta) {
  int lo = 0, hi = table.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.first_cta[mid] <= cta) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// lr on the device (a tensor lr) replaces hyper.lr, and with it AdamW's decay factor; a device step
// count (capturable) replaces the host-computed coefficients. t.step is the count before this step.
template <typename Tensor>
__device__ __forceinline__ OptCoef device_coef(Opt kind, OptHyper& h, const Tensor& t, const float* lr_ptr) {
  if (lr_ptr != nullptr) {
    h.lr = *lr_ptr;
    h.decay = 1.f - h.lr * h.wd;
  }
  return t.step != nullptr ? opt_coef(kind, h.lr, h.h1, h.h2, static_cast<double>(*t.step) + 1.0) : t.coef;
}

// Advances device step counts after the update (a separate launch: every thread block of a tensor
// must have read the old count first); AMP's found_inf skips it with the step.
template <typename Tensor>
__global__ void advance_steps(const __grid_constant__ TensorTable<Tensor> table, const float* inf_ptr) {
  if (inf_ptr != nullptr && *inf_ptr != 0.f) return;
  for (int i = threadIdx.x; i < table.count; i += blockDim.x)
    if (table.t[i].step != nullptr) *table.t[i].step += 1.f;
}

// Host side: cuts `tensors` into tables, gives tensor i ctas_of(tensors[i]) thread blocks, calls
// launch(table, total_ctas) for each table with work, then advances the device step counts.
template <typename Tensor, typename CtasOf, typename Launch>
cudaError_t for_each_table(const Tensor* tensors, int64_t count, const float* inf, cudaStream_t stream, CtasOf ctas_of,
                           Launch launch) {
  for (int64_t start = 0; start < count; start += kMaxTensors) {
    TensorTable<Tensor> table;
    table.count = static_cast<int>(count - start < kMaxTensors ? count - start : kMaxTensors);
    int64_t ctas = 0;
    bool any_step = false;
    for (int i = 0; i < table.count; ++i) {
      table.t[i] = tensors[start + i];
      table.first_cta[i] = ctas;
      ctas += ctas_of(table.t[i]);
      any_step |= table.t[i].step != nullptr;
    }
    table.first_cta[table.count] = ctas;
    if (ctas > 0) {
      launch(table, ctas);
      if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    }
    if (any_step) {
      advance_steps<Tensor><<<1, 256, 0, stream>>>(table, inf);
      if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    }
  }
  return cudaSuccess;
}

}  // namespace ember::cuda
