// CUDA registration of ember_C::gated_act / gated_act_backward: the checks and allocation of
// csrc/cpu/gated.cpp, a device guard, then the launchers of csrc/cuda/gated.cu on the current
// stream. Compiled only in CUDA builds (EMBER_WITH_CUDA): it needs torch's c10/cuda.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops.h"

namespace ember::cuda::glue {

namespace {

void check_pair(const at::Tensor& gate, const at::Tensor& up, const char* op) {
  check_gated(gate, up, op);
  check_same_device(gate, gate.device(), op, "gate", "gate");
  check_same_device(up, gate.device(), op, "up", "gate");
}

at::Tensor gated_act(const at::Tensor& gate, const at::Tensor& up, c10::string_view act) {
  check_pair(gate, up, "gated_act");
  const DType dtype = to_dtype(gate.scalar_type(), "gated_act", "gate");
  const Act a = parse_act(std::string(act));
  const c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  if (out.numel() > 0)
    check_launch(ember::cuda::gated_act(gate.const_data_ptr(), up.const_data_ptr(), out.mutable_data_ptr(),
                                        gate.size(0), gate.size(1), gate.stride(0), up.stride(0), dtype, a,
                                        c10::cuda::getCurrentCUDAStream().stream()),
                 "gated_act");
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_act_backward(const at::Tensor& grad_out, const at::Tensor& gate,
                                                      const at::Tensor& up, c10::string_view act) {
  check_pair(gate, up, "gated_act_backward");
  check_gated_grad(grad_out, gate);
  check_same_device(grad_out, gate.device(), "gated_act_backward", "grad_out", "gate");
  const DType dtype = to_dtype(gate.scalar_type(), "gated_act_backward", "gate");
  const Act a = parse_act(std::string(act));
  const c10::cuda::CUDAGuard guard(gate.device());
  const at::Tensor gc = grad_out.contiguous();
  at::Tensor dgate = at::empty(gate.sizes(), gate.options());
  at::Tensor dup = at::empty(gate.sizes(), gate.options());
  if (gate.numel() > 0)
    check_launch(ember::cuda::gated_act_backward(gc.const_data_ptr(), gate.const_data_ptr(), up.const_data_ptr(),
                                                 dgate.mutable_data_ptr(), dup.mutable_data_ptr(), gate.size(0),
                                                 gate.size(1), gate.stride(0), up.stride(0), dtype, a,
                                                 c10::cuda::getCurrentCUDAStream().stream()),
                 "gated_act_backward");
  return {dgate, dup};
}

}  // namespace

TORCH_LIBRARY_IMPL(ember_C, CUDA, m) {
  m.impl("gated_act", &gated_act);
  m.impl("gated_act_backward", &gated_act_backward);
}

}  // namespace ember::cuda::glue
