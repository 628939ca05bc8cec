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
