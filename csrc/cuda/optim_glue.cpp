// CUDA implementation of ember_C::optim_step (compiled only in CUDA builds): checks, then one
// ember::cuda::optim_step call for the whole group on the current stream. Nothing here reads device
// memory from the host: lr, grad_scale, found_inf and (capturable) step counts are passed to the
// kernels as device pointers, so the step can be captured in a CUDA graph.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/optim_launchers.h"
#include "cuda/optim_glue.h"
#include "ops.h"

namespace ember::cuda_glue {
namespace {

constexpr const char* kOp = "ember_C.optim_step";

void optim_step(c10::string_view kind_name, at::TensorList params, at::TensorList grads, at::TensorList s1,
                at::TensorList s2, at::TensorList s3, at::TensorList masters, at::TensorList steps,
                at::ArrayRef<double> hyper, int64_t flags, const std::optional<at::Tensor>& lr,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const OptGroup g = check_optim_group(kind_name, params, grads, s1, s2, s3, masters, steps, hyper, at::kCUDA);
  if (params.empty()) return;
  TORCH_CHECK_TYPE(g.param_dtype != DType::kFloat64, "ember_C.optim_step: CUDA params must be float32, float16 ",
                   "or bfloat16 (float64 groups run on the reference backend), got float64");
  const at::Tensor& p0 = params[0];
  const c10::cuda::CUDAGuard guard(p0.device());
  const StepScalars sc = step_scalars(lr, grad_scale, found_inf, steps, p0, kOp);
  if (sc.skip) return;

  const OptHyper h = make_hyper(hyper[0], hyper[1], hyper[2], hyper[3], hyper[4], static_cast<int32_t>(flags));
  std::vector<cuda::OptCudaTensor> ts(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    float* step_ptr;
    const double step = advance_step(steps, i, sc.steps_on_device, kOp, &step_ptr);
    ts[i] = cuda::OptCudaTensor{params[i].data_ptr(),
                                grads[i].const_data_ptr(),
                                s1.empty() ? nullptr : s1[i].data_ptr(),
                                s2.empty() ? nullptr : s2[i].data_ptr(),
                                s3.empty() ? nullptr : s3[i].data_ptr(),
                                masters.empty() ? nullptr : masters[i].mutable_data_ptr<float>(),
                                step_ptr,
                                params[i].numel(),
                                opt_coef(g.kind, hyper[0], hyper[1], hyper[2], step)};
  }
  const cudaError_t err = cuda::optim_step(g.kind, g.param_dtype, g.state_fp32, h, ts.data(),
                                           static_cast<int64_t>(ts.size()), sc.lr, sc.grad_scale, sc.found_inf,
                                           c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "ember_C.optim_step: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(ember_C, CUDA, m) { m.impl("optim_step", &optim_step); }

}  // namespace ember::cuda_glue
