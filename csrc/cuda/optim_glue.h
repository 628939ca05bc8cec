// Pieces shared by the CUDA optimizer glue (optim_glue.cpp, optim8bit_glue.cpp); CUDA builds only.
#pragma once
#include <optional>

#include <ATen/ATen.h>

#include "ops.h"

namespace ember::cuda_glue {

// lr / grad_scale / found_inf reach the kernels as device pointers (nullptr when absent), so a step
// never waits on the host for them and stays graph-capturable.
inline const float* device_scalar(const std::optional<at::Tensor>& t, const at::Tensor& like, const char* op,
                                  const char* arg) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == like.device(), op, ": ", arg,
              " must be a one-element float32 tensor on ", like.device(), ", got ", t->scalar_type(), " with ",
              t->numel(), " elements on ", t->device());
  return t->const_data_ptr<float>();
}

// A step's device scalars and where its step counts live. Host step counts (torch's default,
// capturable=False) are advanced on the host, so AMP's skip must be known there: found_inf is read
// (torch's fused optimizers sync the same way). Device step counts leave the skip to the kernels.
struct StepScalars {
  const float* lr;
  const float* grad_scale;
  const float* found_inf;
  bool steps_on_device;
  bool skip;  // found_inf is set and the step counts are on the host: nothing to launch
};

inline StepScalars step_scalars(const std::optional<at::Tensor>& lr, const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& found_inf, at::TensorList steps,
                                const at::Tensor& like, const char* op) {
  StepScalars s{device_scalar(lr, like, op, "lr"), device_scalar(grad_scale, like, op, "grad_scale"),
                device_scalar(found_inf, like, op, "found_inf"), !steps.empty() && steps[0].is_cuda(), false};
  s.skip = s.found_inf != nullptr && !s.steps_on_device && found_inf->item<float>() != 0.f;
  return s;
}

// Parameter i's step count. On the device (capturable=True) the kernel advances it through
// *device_step; on the host (torch's default) it is advanced here and the new count returned.
inline double advance_step(at::TensorList steps, size_t i, bool on_device, const char* op, float** device_step) {
  *device_step = nullptr;
  if (steps.empty()) return 1.0;
  if (on_device) {
    TORCH_CHECK(steps[i].is_cuda() && steps[i].scalar_type() == at::kFloat && steps[i].numel() == 1, op,
                ": device step counts must be one-element float32 CUDA tensors");
    *device_step = steps[i].mutable_data_ptr<float>();
    return 1.0;
  }
  const double step = one_value(steps[i], "steps[i]") + 1.0;
  steps[i].fill_(step);
  return step;
}

}  // namespace ember::cuda_glue
