// CPU implementation of ember_C::unary_act / unary_act_backward (relu, silu, gelu, gelu_tanh).
#include <torch/library.h>
#include <ATen/ATen.h>

#include "cpu/kernels.h"
#include "ops.h"

namespace ember::cpu {
namespace {

at::Tensor unary_act(const at::Tensor& x, c10::string_view act) {
  const DType dtype = to_dtype(x.scalar_type(), "unary_act", "x");
  const Act a = parse_act(std::string(act));
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  if (xc.numel() > 0) activation_kernels().unary(xc.const_data_ptr(), y.mutable_data_ptr(), xc.numel(), dtype, a);
  return y;
}

at::Tensor unary_act_backward(const at::Tensor& grad_out, const at::Tensor& x, c10::string_view act) {
  const DType dtype = to_dtype(x.scalar_type(), "unary_act_backward", "x");
  check_unary_backward(grad_out, x);
  const Act a = parse_act(std::string(act));
  const at::Tensor gc = grad_out.contiguous(), xc = x.contiguous();
  at::Tensor dx = at::empty_like(xc);
  if (xc.numel() > 0)
    activation_kernels().unary_backward(gc.const_data_ptr(), xc.const_data_ptr(), dx.mutable_data_ptr(), xc.numel(),
                                        dtype, a);
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(ember_C, CPU, m) {
  m.impl("unary_act", &unary_act);
  m.impl("unary_act_backward", &unary_act_backward);
}

}  // namespace ember::cpu
