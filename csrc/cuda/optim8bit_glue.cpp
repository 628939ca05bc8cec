// CUDA implementation of ember_C::adamw8bit_step (CUDA builds only): checks, then one
// ember::cuda::adamw8bit_step call for the whole group on the current stream. lr, grad_scale,
// found_inf and device step counts reach the kernel as device pointers: no host sync, graph-capturable.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/optim_launchers.h"
#include "cuda/optim_glue.h"
#include "ops.h"

namespace ember::cuda_glue {
namespace {

constexpr const char* kOp = "ember_C.adamw8bit_step";

void adamw8bit_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                    at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_absmax, at::TensorList steps,
                    at::ArrayRef<double> hyper, int64_t flags, const std::optional<at::Tensor>& lr,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const DType dtype = check_adamw8bit_group(params, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax,
                                            steps, hyper, flags, at::kCUDA);
  if (params.empty()) return;
  const at::Tensor& p0 = params[0];
  const c10::cuda::CUDAGuard guard(p0.device());
  const StepScalars sc = step_scalars(lr, grad_scale, found_inf, steps, p0, kOp);
  if (sc.skip) return;

  const OptHyper h = make_hyper(hyper[0], hyper[1], hyper[2], hyper[3], hyper[4], static_cast<int32_t>(flags));
  std::vector<cuda::Opt8CudaTensor> ts(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    float* step_ptr;
    const double step = advance_step(steps, i, sc.steps_on_device, kOp, &step_ptr);
    ts[i] = cuda::Opt8CudaTensor{params[i].data_ptr(),
                                 grads[i].const_data_ptr(),
                                 exp_avg[i].mutable_data_ptr<int8_t>(),
                                 exp_avg_sq[i].mutable_data_ptr<uint8_t>(),
                                 exp_avg_absmax[i].mutable_data_ptr<float>(),
                                 exp_avg_sq_absmax[i].mutable_data_ptr<float>(),
                                 step_ptr,
                                 params[i].numel(),
                                 opt_coef(Opt::kAdam, hyper[0], hyper[1], hyper[2], step)};
  }
  const cudaError_t err = cuda::adamw8bit_step(dtype, h, ts.data(), static_cast<int64_t>(ts.size()), sc.lr,
                                               sc.grad_scale, sc.found_inf, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "ember_C.adamw8bit_step: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(ember_C, CUDA, m) { m.impl("adamw8bit_step", &adamw8bit_step); }

}  // namespace ember::cuda_glue
