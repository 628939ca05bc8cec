// CPU implementation of ember_C::gated_act / gated_act_backward: act(gate) * up in one pass
// (SwiGLU with silu, GeGLU with gelu / gelu_tanh), backward recomputing act(gate).
#include <torch/library.h>
#include <ATen/ATen.h>

#include "cpu/kernels.h"
#include "ops.h"

namespace ember::cpu {
namespace {

at::Tensor gated_act(const at::Tensor& gate, const at::Tensor& up, c10::string_view act) {
  check_gated(gate, up, "gated_act");
  const DType dtype = to_dtype(gate.scalar_type(), "gated_act", "gate");
  const Act a = parse_act(std::string(act));
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  if (out.numel() > 0)
    activation_kernels().gated(gate.const_data_ptr(), up.const_data_ptr(), out.mutable_data_ptr(), gate.size(0),
                               gate.size(1), gate.stride(0), up.stride(0), dtype, a);
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_act_backward(const at::Tensor& grad_out, const at::Tensor& gate,
                                                      const at::Tensor& up, c10::string_view act) {
  check_gated(gate, up, "gated_act_backward");
  check_gated_grad(grad_out, gate);
  const DType dtype = to_dtype(gate.scalar_type(), "gated_act_backward", "gate");
  const Act a = parse_act(std::string(act));
  const at::Tensor gc = grad_out.contiguous();
  at::Tensor dgate = at::empty(gate.sizes(), gate.options());
  at::Tensor dup = at::empty(gate.sizes(), gate.options());
  if (gate.numel() > 0)
    activation_kernels().gated_backward(gc.const_data_ptr(), gate.const_data_ptr(), up.const_data_ptr(),
                                        dgate.mutable_data_ptr(), dup.mutable_data_ptr(), gate.size(0), gate.size(1),
                                        gate.stride(0), up.stride(0), gate.size(1), dtype, a);
  return {dgate, dup};
}

}  // namespace

TORCH_LIBRARY_IMPL(ember_C, CPU, m) {
  m.impl("gated_act", &gated_act);
  m.impl("gated_act_backward", &gated_act_backward);
}

}  // namespace ember::cpu
