// CUDA registration of ember_C::linear_act / linear_act_backward / gated_linear /
// gated_linear_backward. Compiled only in CUDA builds (EMBER_WITH_CUDA).
//
// Forward: the tensor-core kernel of csrc/cuda/linear.cu (GEMM + bias + activation + residual or
// gating in one launch) when it supports the operands (fp16/bf16, K-contiguous, K % 8 == 0, 16-byte
// aligned); otherwise cuBLAS through ATen for the GEMM and ember's elementwise kernels for the
// epilogue. Backward: dpre = grad * act'(pre) by ember's elementwise kernels, then cuBLAS for
// dx = dpre @ W and dW = dpre^T @ x (the GEMMs' operands are transposed there, which the mma kernel
// does not read), bias grad as a column sum in fp32.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "cuda/linear_launcher.h"
#include "ops.h"

namespace ember::cuda::glue {
namespace {

int act_code(c10::string_view act) { return act == "none" ? -1 : static_cast<int>(parse_act(std::string(act))); }

void check_operands(const at::Tensor& x, const at::Tensor& w, const char* op, const char* wname) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "ember_C.", op, ": x and ", wname, " must be 2-D, got ", x.sizes(),
              " and ", w.sizes());
  TORCH_CHECK(x.size(1) == w.size(1), "ember_C.", op, ": x has ", x.size(1), " features but ", wname,
              " expects in_features=", w.size(1));
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "ember_C.", op, ": x and ", wname, " must have the same dtype, got ",
              x.scalar_type(), " and ", w.scalar_type());
  check_same_device(x, x.device(), op, "x", "x");
  check_same_device(w, x.device(), op, wname, "x");
}

at::Tensor k_contiguous(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

// The mma kernel's epilogue reads a bias as N contiguous elements of x's dtype and a residual as
// (M, N) rows of x's dtype with unit column stride: anything else would be an out-of-bounds or
// misread access, so check here (the CPU path raises the same way) and make the layout what it reads.
at::Tensor checked_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t N, const char* op,
                        const char* arg) {
  if (!bias.has_value()) return at::Tensor();
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.dim() == 1 && b.size(0) == N, "ember_C.", op, ": ", arg, " must have shape (", N, "), got ", b.sizes());
  TORCH_CHECK(b.scalar_type() == x.scalar_type(), "ember_C.", op, ": ", arg, " must have x's dtype ", x.scalar_type(),
              ", got ", b.scalar_type());
  check_same_device(b, x.device(), op, arg, "x");
  return b.contiguous();
}

at::Tensor checked_residual(const std::optional<at::Tensor>& residual, const at::Tensor& x, int64_t N, const char* op) {
  if (!residual.has_value()) return at::Tensor();
  const at::Tensor& r = *residual;
  TORCH_CHECK(r.dim() == 2 && r.size(0) == x.size(0) && r.size(1) == N, "ember_C.", op, ": residual must have shape (",
              x.size(0), ", ", N, "), got ", r.sizes());
  TORCH_CHECK(r.scalar_type() == x.scalar_type(), "ember_C.", op, ": residual must have x's dtype ", x.scalar_type(),
              ", got ", r.scalar_type());
  check_same_device(r, x.device(), op, "residual", "x");
  return k_contiguous(r);
}


std::tuple<at::Tensor, at::Tensor> linear_act(const at::Tensor& x_in, const at::Tensor& w_in,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& residual, c10::string_view act,
                                              bool save_preact) {
  check_operands(x_in, w_in, "linear_act", "weight");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int code = act_code(act);
  const bool keep = save_preact && code >= 0;
  const at::Tensor x = k_contiguous(x_in), w = k_contiguous(w_in);
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  const at::Tensor b = checked_bias(bias, x, N, "linear_act", "bias");
  const at::Tensor res = checked_residual(residual, x, N, "linear_act");
  at::Tensor out = at::empty({M, N}, x.options());
  at::Tensor pre = keep ? at::empty({M, N}, x.options()) : at::empty({0}, x.options());
  LinearMmaArgs a{x.const_data_ptr(), w.const_data_ptr(), nullptr, ptr_or_null(b), nullptr,
                  res.defined() ? res.const_data_ptr() : nullptr, out.mutable_data_ptr(),
                  keep ? pre.mutable_data_ptr() : nullptr, M, N, K, x.stride(0), w.stride(0),
                  res.defined() ? res.stride(0) : 0, out.stride(0), keep ? pre.stride(0) : 0,
                  to_dtype(x.scalar_type(), "linear_act", "x"), code};
  if (K > 0 && linear_mma_supported(a)) {
    check_launch(linear_mma(a, stream), "linear_act");
    return {out, pre};
  }
  // Fallback: cuBLAS GEMM (bias folded in), then the elementwise epilogue.
  at::Tensor p = b.defined() ? at::addmm(b, x_in, w_in.t()) : at::mm(x_in, w_in.t());
  if (code < 0) {
    out = p;
  } else if (p.numel() > 0) {
    check_launch(ember::cuda::unary_act(p.const_data_ptr(), out.mutable_data_ptr(), p.numel(), a.dtype,
                                        static_cast<Act>(code), stream),
                 "linear_act");
  }
  if (res.defined()) out.add_(res);
  return {out, keep ? p : pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                   const at::Tensor& weight, const at::Tensor& preact,
                                                                   c10::string_view act, bool need_dx, bool need_dw,
                                                                   bool need_db) {
  check_operands(x, weight, "linear_act_backward", "weight");
  check_same_device(grad_out, x.device(), "linear_act_backward", "grad_out", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int code = act_code(act);
  at::Tensor dpre = grad_out;
  if (code >= 0) {
    TORCH_CHECK(preact.sizes() == grad_out.sizes(), "ember_C.linear_act_backward: preact must have grad_out's shape ",
                grad_out.sizes(), ", got ", preact.sizes());
    const at::Tensor g = grad_out.contiguous(), p = preact.contiguous();
    dpre = at::empty_like(p);
    if (p.numel() > 0)
      check_launch(ember::cuda::unary_act_backward(g.const_data_ptr(), p.const_data_ptr(), dpre.mutable_data_ptr(),
                                                   p.numel(), to_dtype(x.scalar_type(), "linear_act_backward", "x"),
                                                   static_cast<Act>(code), c10::cuda::getCurrentCUDAStream().stream()),
                   "linear_act_backward");
  }
  const at::Tensor empty = at::empty({0}, x.options());
  return {need_dx ? at::mm(dpre, weight) : empty, need_dw ? at::mm(dpre.t(), x) : empty,
          need_db ? dpre.sum(0, /*keepdim=*/false, at::kFloat).to(x.scalar_type()) : empty};
}

std::tuple<at::Tensor, at::Tensor> gated_linear(const at::Tensor& x_in, const at::Tensor& wg_in,
                                                const at::Tensor& wu_in, const std::optional<at::Tensor>& b_gate,
                                                const std::optional<at::Tensor>& b_up, c10::string_view act,
                                                bool save_preact) {
  check_operands(x_in, wg_in, "gated_linear", "w_gate");
  check_operands(x_in, wu_in, "gated_linear", "w_up");
  TORCH_CHECK(wg_in.sizes() == wu_in.sizes(), "ember_C.gated_linear: w_gate and w_up must have the same shape");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int code = act_code(act);
  TORCH_CHECK(code >= 1, "ember_C.gated_linear: act must be silu, gelu or gelu_tanh, got ", act);
  const at::Tensor x = k_contiguous(x_in), wg = k_contiguous(wg_in), wu = k_contiguous(wu_in);
  const int64_t M = x.size(0), N = wg.size(0), K = x.size(1);
  const at::Tensor bg = checked_bias(b_gate, x, N, "gated_linear", "b_gate");
  const at::Tensor bu = checked_bias(b_up, x, N, "gated_linear", "b_up");
  at::Tensor h = at::empty({M, N}, x.options());
  LinearMmaArgs a{x.const_data_ptr(), wg.const_data_ptr(), wu.const_data_ptr(), ptr_or_null(bg), ptr_or_null(bu),
                  nullptr, h.mutable_data_ptr(), nullptr, M, N, K, x.stride(0), wg.stride(0), 0,
                  h.stride(0), 2 * N, to_dtype(x.scalar_type(), "gated_linear", "x"), code};
  // One stride for both weights in the kernel. The (M, 2N) pre-activation buffer is allocated only
  // when it is kept (or the fallback's GEMMs write into it).
  if (K > 0 && wg.stride(0) == wu.stride(0) && linear_mma_supported(a)) {
    at::Tensor pre = at::empty({save_preact ? M : 0, 2 * N}, x.options());
    if (save_preact) a.pre = pre.mutable_data_ptr();
    check_launch(linear_mma(a, stream), "gated_linear");
    return {h, save_preact ? pre : at::empty({0}, x.options())};
  }
  at::Tensor pre = at::empty({M, 2 * N}, x.options());
  at::Tensor gate = pre.narrow(1, 0, N), up = pre.narrow(1, N, N);
  if (bg.defined()) at::addmm_out(gate, bg, x_in, wg_in.t()); else at::mm_out(gate, x_in, wg_in.t());
  if (bu.defined()) at::addmm_out(up, bu, x_in, wu_in.t()); else at::mm_out(up, x_in, wu_in.t());
  if (h.numel() > 0)
    check_launch(ember::cuda::gated_act(gate.const_data_ptr(), up.const_data_ptr(), h.mutable_data_ptr(), M, N,
                                        pre.stride(0), pre.stride(0), a.dtype, static_cast<Act>(code), stream),
                 "gated_linear");
  return {h, save_preact ? pre : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
    const at::Tensor& preact, c10::string_view act, bool need_dx, bool need_dw, bool need_db) {
  check_operands(x, w_gate, "gated_linear_backward", "w_gate");
  const c10::cuda::CUDAGuard guard(x.device());
  const int code = act_code(act);
  TORCH_CHECK(code >= 1, "ember_C.gated_linear_backward: act must be silu, gelu or gelu_tanh, got ", act);
  const int64_t M = x.size(0), N = w_gate.size(0);
  TORCH_CHECK(preact.dim() == 2 && preact.size(0) == M && preact.size(1) == 2 * N,
              "ember_C.gated_linear_backward: preact must be (", M, ", ", 2 * N, "), got ", preact.sizes());
  const at::Tensor g = grad_out.contiguous(), p = preact.contiguous();
  at::Tensor dgate = at::empty({M, N}, x.options()), dup = at::empty({M, N}, x.options());
  if (dgate.numel() > 0)
    check_launch(ember::cuda::gated_act_backward(g.const_data_ptr(), p.const_data_ptr(),
                                                 p.narrow(1, N, N).const_data_ptr(), dgate.mutable_data_ptr(),
                                                 dup.mutable_data_ptr(), M, N, 2 * N, 2 * N,
                                                 to_dtype(x.scalar_type(), "gated_linear_backward", "x"),
                                                 static_cast<Act>(code), c10::cuda::getCurrentCUDAStream().stream()),
                 "gated_linear_backward");
  const at::Tensor empty = at::empty({0}, x.options());
  at::Tensor dx = empty;
  if (need_dx) dx = at::mm(dgate, w_gate).addmm_(dup, w_up);
  auto colsum = [&](const at::Tensor& t) { return t.sum(0, false, at::kFloat).to(x.scalar_type()); };
  return {dx, need_dw ? at::mm(dgate.t(), x) : empty, need_dw ? at::mm(dup.t(), x) : empty,
          need_db ? colsum(dgate) : empty, need_db ? colsum(dup) : empty};
}

}  // namespace

TORCH_LIBRARY_IMPL(ember_C, CUDA, m) {
  m.impl("linear_act", &linear_act);
  m.impl("linear_act_backward", &linear_act_backward);
  m.impl("gated_linear", &gated_linear);
  m.impl("gated_linear_backward", &gated_linear_backward);
}

}  // namespace ember::cuda::glue
