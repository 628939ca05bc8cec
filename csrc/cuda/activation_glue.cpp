// CUDA registration of ember_C::unary_act / unary_act_backward: the checks and allocation of
// csrc/cpu/activation.cpp, a device guard, then the launchers of csrc/cuda/activation.cu on the
// current stream. Compiled only in CUDA builds (EMBER_WITH_CUDA): it needs torch's c10/cuda.
//
// Also home of the device checks shared with gated_glue.cpp.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops.h"

namespace ember::cuda::glue {

void check_same_device(const at::Tensor& t, const c10::Device& device, const char* op, const char* arg,
                       const char* first) {
  TORCH_CHECK(t.is_cuda(), "ember_C.", op, ": ", arg, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, "ember_C.", op, ": ", arg, " is on ", t.device(), " but ", first, " is on ",
              device, "; all tensors must be on the same CUDA device");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "ember_C.", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

namespace {

at::Tensor unary_act(const at::Tensor& x, c10::string_view act) {
  const DType dtype = to_dtype(x.scalar_type(), "unary_act", "x");
  const Act a = parse_act(std::string(act));
  check_same_device(x, x.device(), "unary_act", "x", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  if (xc.numel() > 0)
    check_launch(ember::cuda::unary_act(xc.const_data_ptr(), y.mutable_data_ptr(), xc.numel(), dtype, a,
                                        c10::cuda::getCurrentCUDAStream().stream()),
                 "unary_act");
  return y;
}

at::Tensor unary_act_backward(const at::Tensor& grad_out, const at::Tensor& x, c10::string_view act) {
  const DType dtype = to_dtype(x.scalar_type(), "unary_act_backward", "x");
  check_unary_backward(grad_out, x);
  const Act a = parse_act(std::string(act));
  check_same_device(x, x.device(), "unary_act_backward", "x", "x");
  check_same_device(grad_out, x.device(), "unary_act_backward", "grad_out", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor gc = grad_out.contiguous(), xc = x.contiguous();
  at::Tensor dx = at::empty_like(xc);
  if (xc.numel() > 0)
    check_launch(ember::cuda::unary_act_backward(gc.const_data_ptr(), xc.const_data_ptr(), dx.mutable_data_ptr(),
                                                 xc.numel(), dtype, a, c10::cuda::getCurrentCUDAStream().stream()),
                 "unary_act_backward");
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(ember_C, CUDA, m) {
  m.impl("unary_act", &unary_act);
  m.impl("unary_act_backward", &unary_act_backward);
}

}  // namespace ember::cuda::glue
