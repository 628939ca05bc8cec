// CUDA registration of ember_C::quantize_per_token and int8_linear_w8a8: the checks of
// csrc/cpu/int8.cpp, a device guard, then the launchers of csrc/cuda/int8_gemm.cu on the current
// stream. W8A16 on CUDA is Triton's (kernels/int8_gemm.py). Compiled only in CUDA builds.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launchers.h"
#include "ops.h"

namespace ember::cuda::glue {

// csrc/cuda/activation_glue.cpp
void check_same_device(const at::Tensor& t, const c10::Device& device, const char* op, const char* arg,
                       const char* first);
void check_launch(cudaError_t err, const char* op);

namespace {

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, const c10::optional<at::Tensor>& smooth) {
  const char* op = "quantize_per_token";
  check_rows(x, op, "x");
  const DType dtype = to_dtype(x.scalar_type(), op, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor mul;
  if (smooth) {
    check_same_device(*smooth, x.device(), op, "smooth", "x");
    mul = smooth->to(at::kFloat).contiguous();
    TORCH_CHECK(mul.dim() == 1 && mul.size(0) == x.size(1), "ember_C.", op, ": smooth must be (K,), got ", mul.sizes());
  }
  at::Tensor q = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kChar));
  at::Tensor s = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  check_launch(ember::cuda::quantize_rows(x.const_data_ptr(), x.size(0), x.size(1), x.stride(0), dtype,
                                          mul.defined() ? mul.const_data_ptr<float>() : nullptr,
                                          q.mutable_data_ptr<int8_t>(), s.mutable_data_ptr<float>(),
                                          c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return {q, s};
}

at::Tensor int8_linear_w8a8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sw,
                            const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& smooth, int64_t act,
                            const c10::optional<at::Tensor>& /*w_packed: CPU layout, unused here*/) {
  const char* op = "int8_linear_w8a8";
  check_rows(x, op, "x");
  const DType dtype = to_dtype(x.scalar_type(), op, "x");
  check_act_code(act, op);
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1), "ember_C.",
              op, ": w must be contiguous int8 (N, K) with K = ", x.size(1), ", got ", w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(sw.scalar_type() == at::kFloat && sw.dim() == 1 && sw.size(0) == w.size(0), "ember_C.", op,
              ": the CUDA kernel takes per-channel fp32 w_scale (N,), got ", sw.scalar_type(), " ", sw.sizes());
  TORCH_CHECK(w.size(1) % 16 == 0, "ember_C.", op, ": the CUDA kernel needs in_features % 16 == 0, got ", w.size(1));
  check_same_device(w, x.device(), op, "w", "x");
  check_same_device(sw, x.device(), op, "w_scale", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  // The GEMM streams weight rows with 16-byte cp.async copies: a view at an odd storage offset
  // (w[1:] of a larger buffer) is copied to a fresh, aligned allocation instead of misread.
  const at::Tensor wa = reinterpret_cast<uintptr_t>(w.const_data_ptr()) % 16 == 0 ? w : w.clone();
  auto [q, sx] = quantize_per_token(x, smooth);
  at::Tensor b;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), "ember_C.", op, ": bias must have shape (", w.size(0),
                "), got ", bias->sizes());
    check_same_device(*bias, x.device(), op, "bias", "x");
    b = bias->to(at::kFloat).contiguous();
  }
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  check_launch(ember::cuda::w8a8_gemm(q.const_data_ptr<int8_t>(), sx.const_data_ptr<float>(), wa.const_data_ptr<int8_t>(),
                                      sw.contiguous().const_data_ptr<float>(),
                                      b.defined() ? b.const_data_ptr<float>() : nullptr, out.mutable_data_ptr(),
                                      x.size(0), w.size(0), w.size(1), dtype, static_cast<int32_t>(act),
                                      c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ember_C, CUDA, m) {
  m.impl("quantize_per_token", &quantize_per_token);
  m.impl("int8_linear_w8a8", &int8_linear_w8a8);
}

}  // namespace ember::cuda::glue
