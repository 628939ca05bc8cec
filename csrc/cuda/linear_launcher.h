// Entry point of the tensor-core GEMM with fused epilogue (csrc/cuda/linear.cu). Plain C++, raw
// device pointers; see launchers.h for the conventions.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "activation.h"

namespace ember::cuda {

struct LinearMmaArgs {
  const void* x;         // (M, K), row stride ldx, K contiguous
  const void* w;         // (N, K), row stride ldw, K contiguous (nn.Linear layout)
  const void* w2;        // second (N, K) weight, same strides, for the gated form; else nullptr
  const void* bias;      // (N,) or nullptr
  const void* bias2;     // (N,) for w2, or nullptr
  const void* residual;  // (M, N), row stride ld_res, or nullptr (not with w2)
  void* out;             // (M, N), row stride ld_out
  void* pre;             // nullptr, or (M, N) [gated: (M, 2N), gate | up] pre-activations, row stride ld_pre
  int64_t M, N, K, ldx, ldw, ld_res, ld_out, ld_pre;
  DType dtype;           // kFloat16 or kBFloat16
  int act;               // -1 none, else static_cast<int>(Act)
};

// Whether linear_mma can run these arguments (fp16/bf16, K and leading dims multiples of 8,
// 16-byte aligned operands); the caller falls back to cuBLAS + the epilogue kernels otherwise.
bool linear_mma_supported(const LinearMmaArgs& args);

cudaError_t linear_mma(const LinearMmaArgs& args, cudaStream_t stream);

}  // namespace ember::cuda
