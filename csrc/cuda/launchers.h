// Entry points of ember's CUDA kernels: raw device pointers, sizes and a stream. Plain C++ (no torch)
// so the .cu files compile with nvcc alone; the torch glue (*_glue.cpp) checks tensors and calls these.
//
// Every launcher is asynchronous on `stream`, returns cudaSuccess without launching when there is
// nothing to do, and otherwise returns cudaGetLastError() after the launch. Outputs must not alias
// inputs. Any alignment is accepted: 16-byte aligned pointers (and row strides) take the vectorised
// path, anything else a scalar one.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "activation.h"

namespace ember::cuda {

// y = act(x); n elements, contiguous.
cudaError_t unary_act(const void* x, void* y, int64_t n, DType dtype, Act act, cudaStream_t stream);

// dx = grad * act'(x); n elements, contiguous.
cudaError_t unary_act_backward(const void* grad, const void* x, void* dx, int64_t n, DType dtype, Act act,
                               cudaStream_t stream);

// out = act(gate) * up over (rows, cols). Row r of gate / up starts at gate + r * gate_row_stride /
// up + r * up_row_stride (in elements) and its cols elements are contiguous; out is contiguous.
cudaError_t gated_act(const void* gate, const void* up, void* out, int64_t rows, int64_t cols,
                      int64_t gate_row_stride, int64_t up_row_stride, DType dtype, Act act, cudaStream_t stream);

// dgate = grad * up * act'(gate), dup = grad * act(gate); gate / up strided as in gated_act, grad,
// dgate and dup contiguous (rows, cols).
cudaError_t gated_act_backward(const void* grad, const void* gate, const void* up, void* dgate, void* dup,
                               int64_t rows, int64_t cols, int64_t gate_row_stride, int64_t up_row_stride,
                               DType dtype, Act act, cudaStream_t stream);

// Cross-entropy rows of the fused linear + cross-entropy (csrc/linear_cross_entropy.h), fp32 or fp64
// logits (rows, cols) contiguous, as the CPU table's cross_entropy_rows (csrc/cpu/kernels.h): per-row
// loss, and with write_grad the gradient in place times row_scale[r] (or scale when null). Targets
// must be in [0, cols) or ignore_index (the glue checks).
cudaError_t cross_entropy_rows(void* logits, int64_t rows, int64_t cols, const int64_t* target, int64_t ignore_index,
                               double eps, bool write_grad, double scale, const void* row_scale, void* loss,
                               DType dtype, cudaStream_t stream);

}  // namespace ember::cuda

namespace ember::cuda {

// Per-row symmetric int8: q[r, :] = rint(x[r, :] * mul * 127 / absmax_r), scale[r] = absmax_r / 127
// (NaN for rows holding NaN/Inf, whose q is 0). x rows every ld elements; mul (cols) may be null.
cudaError_t quantize_rows(const void* x, int64_t rows, int64_t cols, int64_t ld, DType dtype, const float* mul,
                          int8_t* q, float* scale, cudaStream_t stream);

// out (M, N) in dtype = act(sa[m] * sb[n] * (a @ b.T)[m, n] + bias[n]); a (M, K), b (N, K) int8
// contiguous with K % 16 == 0 and 16-byte aligned bases; bias fp32 or null; act -1 (none) or an Act.
cudaError_t w8a8_gemm(const int8_t* a, const float* sa, const int8_t* b, const float* sb, const float* bias,
                      void* out, int64_t M, int64_t N, int64_t K, DType dtype, int32_t act, cudaStream_t stream);

}  // namespace ember::cuda
