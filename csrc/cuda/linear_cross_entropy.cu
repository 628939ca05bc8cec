// The row epilogue of the fused linear + cross-entropy on CUDA (the chunk loop and its cuBLAS GEMMs are
// csrc/linear_cross_entropy.h, driven from linear_cross_entropy_glue.cpp). One block per row of fp32
// (or fp64) logits, as the CPU kernel (csrc/cpu/kernels_impl.h, cross_entropy_rows) computes it:
//   max and sum of the logits, then the sum of exp(l - max): block reductions
//   loss    lse - (1 - eps) l[t] - eps / V sum(l)        (0 for t == ignore_index)
//   (write_grad) l[j] <- (exp(l[j] - lse) - eps / V - (1 - eps) [j == t]) * scale_row
// A row of 32000 fp32 logits is 125 KB: the later passes re-read it from L2.
#include <cmath>
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/common.cuh"
#include "cuda/launchers.h"

namespace ember::cuda {
namespace {

constexpr int kRowThreads = 256;

template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* shared) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // shared may still be read from the previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T all = shared[0];
  for (int w = 1; w < kRowThreads / 32; ++w) all = op(all, shared[w]);
  return all;
}

template <typename T>
struct Max {
  // NaN wins, so a row holding NaN gets a NaN max and from it a NaN loss
  __device__ T operator()(T a, T b) const { return (a != a || a > b) ? a : b; }
};
template <typename T>
struct Sum {
  __device__ T operator()(T a, T b) const { return a + b; }
};

template <typename T>
__global__ void __launch_bounds__(kRowThreads) cross_entropy_rows_kernel(T* logits, int64_t cols, const int64_t* target,
                                                                         int64_t ignore_index, T eps, bool write_grad,
                                                                         T scale, const T* row_scale, T* loss) {
  __shared__ T shared[kRowThreads / 32];
  const int64_t row = blockIdx.x;
  T* l = logits + row * cols;
  const int64_t t = target[row];
  if (t == ignore_index) {
    if (threadIdx.x == 0) loss[row] = T(0);
    if (write_grad)
      for (int64_t j = threadIdx.x; j < cols; j += kRowThreads) l[j] = T(0);
    return;
  }
  // Three reads of the row (max and sum; sum of exp; gradient): from L2 after the first, and no exp in
  // the reductions (an online max/sum would rescale at every merge).
  T mx = -INFINITY, sum_l = T(0);
  for (int64_t j = threadIdx.x; j < cols; j += kRowThreads) {
    const T v = l[j];
    mx = Max<T>()(v, mx);
    sum_l += v;
  }
  mx = block_reduce(mx, Max<T>(), shared);
  sum_l = block_reduce(sum_l, Sum<T>(), shared);
  T sum_e = T(0);
  for (int64_t j = threadIdx.x; j < cols; j += kRowThreads) sum_e += exp(l[j] - mx);
  sum_e = block_reduce(sum_e, Sum<T>(), shared);
  const T lse = mx + log(sum_e);
  const T picked = l[t];
  if (threadIdx.x == 0) loss[row] = lse - (T(1) - eps) * picked - eps / T(cols) * sum_l;
  if (!write_grad) return;
  __syncthreads();  // every thread has read l[t] before any overwrites it
  const T s = row_scale ? row_scale[row] : scale;
  const T off = s * eps / T(cols);
  for (int64_t j = threadIdx.x; j < cols; j += kRowThreads) {
    T g = exp(l[j] - lse) * s - off;
    if (j == t) g -= s * (T(1) - eps);
    l[j] = g;
  }
}

}  // namespace

cudaError_t cross_entropy_rows(void* logits, int64_t rows, int64_t cols, const int64_t* target, int64_t ignore_index,
                               double eps, bool write_grad, double scale, const void* row_scale, void* loss,
                               DType dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (dtype == DType::kFloat64)
    cross_entropy_rows_kernel<double><<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(
        static_cast<double*>(logits), cols, target, ignore_index, eps, write_grad, scale,
        static_cast<const double*>(row_scale), static_cast<double*>(loss));
  else
    cross_entropy_rows_kernel<float><<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(
        static_cast<float*>(logits), cols, target, ignore_index, static_cast<float>(eps), write_grad,
        static_cast<float>(scale), static_cast<const float*>(row_scale), static_cast<float*>(loss));
  return cudaGetLastError();
}

}  // namespace ember::cuda
