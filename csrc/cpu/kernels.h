// Entry points of ember's CPU kernels: one table per kernel family, filled once per instruction set.
// Raw pointers and sizes only: the ISA-specific translation units (isa_*.cpp) see no torch tensor
// types.
#pragma once
#include <cstdint>
#include <string>

#include "activation.h"
#include "optim.h"
#include "optim8bit.h"

namespace ember::cpu {

// One tensor of a multi-tensor optimizer step: parameter, gradient (same dtype), up to three state
// tensors and an optional fp32 master copy of the parameter, all dense with n elements.
struct OptTensor {
  void* param;
  const void* grad;
  void* s1;
  void* s2;
  void* s3;
  float* master;  // when set, the update reads and writes it and param receives its rounding
  int64_t n;
  OptCoef coef;
  OptCoefT<double> coef64;  // float64 parameters: the same coefficients, unrounded
};

// One tensor of an AdamW8bit step (csrc/optim8bit.h): parameter and gradient (same dtype,
// contiguous), int8 / uint8 moment codes (n each) and their fp32 absmax (one per kQBlock elements).
struct Opt8Tensor {
  void* param;
  const void* grad;
  int8_t* exp_avg;
  uint8_t* exp_avg_sq;
  float* exp_avg_absmax;
  float* exp_avg_sq_absmax;
  int64_t n;
  OptCoef coef;
};

struct Opt8Launch {
  DType param_dtype;  // float32, float16 or bfloat16
  OptHyper hyper;     // Adam's; flags without kAmsgrad
  float inv_scale;    // 1 / grad_scale (1 without AMP)
  const Opt8Tensor* tensors;
  int64_t count;
};

// A whole (dtype, master) group, updated by one call.
struct OptLaunch {
  Opt kind;
  DType param_dtype;  // float32, float16, bfloat16 or float64 (float64 state, float64 math)
  bool state_fp32;    // state tensors are float32 (else they have the parameter's dtype)
  OptHyper hyper;
  OptHyperT<double> hyper64;  // for float64 parameters
  float inv_scale;     // 1 / grad_scale (1 without AMP)
  double inv_scale64;  // the same for float64 parameters
  const OptTensor* tensors;
  int64_t count;
};

// The kernels come in one table per family. Each isa_*.cpp fills every family's table for its
// instruction set, by field name (kernels_impl.h); callers reach a family through its accessor
// below, which returns the table for this machine's CPU.

struct ActivationKernels {
  // y = act(x); n elements, contiguous.
  void (*unary)(const void* x, void* y, int64_t n, DType dtype, Act act);
  // dx = grad * act'(x); n elements, contiguous.
  void (*unary_backward)(const void* grad, const void* x, void* dx, int64_t n, DType dtype, Act act);
  // out = act(gate) * up over (rows, cols); gate/up rows start every *_row_stride elements,
  // out is contiguous.
  void (*gated)(const void* gate, const void* up, void* out, int64_t rows, int64_t cols, int64_t gate_row_stride,
                int64_t up_row_stride, DType dtype, Act act);
  // dgate = grad * up * act'(gate), dup = grad * act(gate); grad contiguous, dgate and dup rows every
  // out_row_stride elements (cols: contiguous; 2 * cols: the two halves of one [dgate | dup] buffer).
  void (*gated_backward)(const void* grad, const void* gate, const void* up, void* dgate, void* dup, int64_t rows,
                         int64_t cols, int64_t gate_row_stride, int64_t up_row_stride, int64_t out_row_stride,
                         DType dtype, Act act);
};

struct LinearKernels {
  // Linear epilogue: out = act(pre + bias) (+ residual), and pre_out = pre + bias when pre_out is not
  // null (the kept pre-activation; it may be pre itself). pre, out and pre_out contiguous (rows, cols);
  // pre and out may be the same buffer (in place when no pre-activation is kept); bias (cols) or
  // nullptr; residual rows every res_row_stride elements, or nullptr.
  void (*epilogue)(const void* pre, const void* bias, const void* residual, void* out, void* pre_out, int64_t rows,
                   int64_t cols, int64_t res_row_stride, DType dtype, Act act);
  // Linear backward prologue: dpre = grad * act'(pre) (grad rows every grad_row_stride elements, pre
  // and dpre contiguous) and, when col_partials is not null, per-row-chunk column sums of dpre in the
  // compute precision (float, or double for fp64): col_partials[c * cols + j] sums rows
  // [c * rows_per_chunk, (c + 1) * rows_per_chunk). The bias gradient is their sum over c; it is
  // accumulated in the same pass that writes dpre, so dpre is not read again for it.
  void (*act_backward)(const void* grad, const void* pre, void* dpre, void* col_partials, int64_t rows,
                       int64_t cols, int64_t grad_row_stride, int64_t rows_per_chunk, DType dtype, Act act);
  // Cross-entropy epilogue of the fused linear + cross-entropy (cpu/linear_cross_entropy.cpp), over
  // `rows` contiguous rows of `cols` logits, fp32 or fp64 (dtype) only. Per row r with target t:
  //   loss[r] = lse - (1 - eps) * l[t] - eps / cols * sum(l)     (0 for t == ignore_index)
  // With write_grad, the row is then overwritten by the loss's gradient times the row's scale
  // (row_scale[r], or `scale` when row_scale is null): (softmax - eps / cols - (1 - eps) onehot(t)),
  // zeros for an ignored row. Targets must already be checked to be in [0, cols) or ignore_index.
  void (*cross_entropy_rows)(void* logits, int64_t rows, int64_t cols, const int64_t* target, int64_t ignore_index,
                             double eps, bool write_grad, double scale, const void* row_scale, void* loss,
                             DType dtype);
};

struct OptimKernels {
  // One optimizer step over every tensor of the launch (all tensors and chunks in one parallel loop).
  void (*step)(const OptLaunch& launch);
  // One AdamW8bit step over every tensor of the launch: one parallel loop over all their blocks.
  void (*adamw8bit_step)(const Opt8Launch& launch);
};

// Int8 inference (cpu/int8_impl.h). `act` is an ember::Act value or -1 for none.
struct Int8Kernels {
  // q[r, :] = round(x[r, :] * mul * 127 / absmax_r), scale[r] = absmax_r / 127 (NaN for a row with
  // NaN/Inf); x rows start every ld elements, mul (cols floats) may be null; q is contiguous.
  // shift128: q holds q + 128 as uint8 instead (the u8 operand of w8a8_gemm_packed).
  void (*quantize_rows)(const void* x, int64_t rows, int64_t cols, int64_t ld, DType dtype, const float* mul,
                        int8_t* q, float* scale, bool shift128);
  // out[m, n] = act(acc[m, n] * sx[m] * sw[n] + bias[n]) in dtype; acc, out contiguous; bias may be null.
  void (*dequant_epilogue)(const int32_t* acc, const float* sx, const float* sw, const float* bias, void* out,
                           int64_t M, int64_t N, DType dtype, int32_t act);
  // Weight-only int8 GEMM for M <= 16: out = act(x @ dequant(w).T + bias), w (N, K) int8 with fp32
  // scales (N, K / group); x rows every ldx elements; out contiguous (M, N).
  void (*w8a16_gemv)(const void* x, int64_t ldx, const int8_t* w, const float* sw, const float* bias, void* out,
                     int64_t M, int64_t N, int64_t K, int64_t group, DType dtype, int32_t act);
  // W8A8 for M <= 16 from quantized rows: out = act(sx[m] sw[n] (q @ w.T)[m, n] + bias[n]).
  void (*w8a8_gemv)(const int8_t* q, const float* sx, const int8_t* w, const float* sw, const float* bias,
                    void* out, int64_t M, int64_t N, int64_t K, DType dtype, int32_t act);
  // The same for any M from the packed weight wp (ember_C::int8_prepack in cpu/int8.cpp describes the
  // layout) and qu = q + 128 as uint8 (quantize_rows with shift128); sw is (N,) per channel or, with
  // groups > 1, the (groups, N) transpose of the per-group scales. Returns false (nothing done) when this
  // CPU / build has no VNNI kernel or !w8a8_packable(N, K, groups).
  bool (*w8a8_gemm_packed)(const uint8_t* qu, const float* sx, const int8_t* wp, const float* sw, const float* bias,
                           void* out, int64_t M, int64_t N, int64_t K, int64_t groups, DType dtype, int32_t act);
  // Weight-only int8 GEMM, the same contract as w8a16_gemv without its M <= 16 limit. Returns false
  // (nothing done) where the table has no such kernel (the portable one) or the shape is not one it takes
  // (AVX-512: 12-160 rows, cpu/int8_impl.h; AMX: cpu/isa_amx.cpp); the caller then runs its fallback.
  // fp32_parts: how many bf16 parts an fp32 x is split into for bf16 tile products (3: fp32's
  // precision, 2: ~16 bits, 1: bf16), from torch's fp32 matmul precision (cpu/int8.cpp).
  bool (*w8a16_gemm)(const void* x, int64_t ldx, const int8_t* w, const float* sw, const float* bias, void* out,
                     int64_t M, int64_t N, int64_t K, int64_t group, DType dtype, int32_t act, int32_t fp32_parts);
};

// The shapes the packed W8A8 weight exists for: whole 16-channel blocks (N % 16), whole 4-k steps
// (K % 4) and groups of whole 4-k steps (group_size % 4). One rule for int8_prepack, which makes the
// packed weight (an empty tensor elsewhere), and for w8a8_gemm_packed, which reads it.
inline bool w8a8_packable(int64_t N, int64_t K, int64_t groups) {
  return N > 0 && K > 0 && N % 16 == 0 && K % 4 == 0 && groups >= 1 && K % groups == 0 && (K / groups) % 4 == 0;
}

// int8 elements of the packed weight: N x K tiles then (groups, N) int32 corrections; 0 where none.
inline int64_t w8a8_packed_numel(int64_t N, int64_t K, int64_t groups) {
  return w8a8_packable(N, K, groups) ? N * K + 4 * N * groups : 0;
}

// Every family's table for one instruction set: what an isa_*.cpp unit exports.
struct IsaKernels {
  ActivationKernels activation;
  LinearKernels linear;
  OptimKernels optim;
  Int8Kernels int8;
};

const IsaKernels& kernels_default();
const IsaKernels& kernels_avx512();
// The AVX-512 table with the int8 GEMMs on AMX tiles (cpu/isa_amx.cpp; the AVX-512 table itself in a
// build whose compiler has no AMX support, where kernels_amx_built() is false).
const IsaKernels& kernels_amx();
bool kernels_amx_built();

// The tables for this machine's CPU (AVX-512 when the CPU has it; see dispatch.cpp).
const ActivationKernels& activation_kernels();
const LinearKernels& linear_kernels();
const OptimKernels& optim_kernels();
const Int8Kernels& int8_kernels();
const char* isa();
// Whether the int8 GEMMs run on AMX (the CPU has it, Linux granted the tile state, EMBER_CPU_ISA did
// not turn it off), and a few lines naming the table, the int8 kernels and why AMX is off if it is.
bool amx_in_use();
std::string isa_report();
// Whether the CPU has a native dot product for this 16-bit type (bf16: AVX512-BF16 or AMX-BF16; fp16:
// AVX512-FP16 or AMX-FP16), which oneDNN's GEMMs behind ATen use. Without one, ATen's bf16/fp16 GEMM
// is several times slower than its fp32 GEMM (4.8x on an AVX-512 Xeon whose hypervisor hides BF16
// and AMX), so ember's CPU GEMMs compute such products in fp32 where they are big enough to pay for the
// conversion (cpu/linear.cpp in_fp32; the W8A16 fallback always). False for fp32/fp64.
bool native_16bit_gemm(DType dtype);
// Measured AMX multiply-accumulates per second (TDPBUSD int8, or TDPBF16PS with bf16), all torch
// threads; 0 when AMX is not in use.
double amx_peak_macs(bool bf16);

}  // namespace ember::cpu
