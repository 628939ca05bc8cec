// Helpers shared by the CUDA torch glue (*_glue.cpp, CUDA builds only); defined in activation_glue.cpp.
#pragma once
#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

namespace ember::cuda::glue {

// `t` (argument `arg` of `op`) must be a CUDA tensor on `device`, the device of argument `first`.
void check_same_device(const at::Tensor& t, const c10::Device& device, const char* op, const char* arg,
                       const char* first);
// Turns a launcher's cudaError_t into a Python exception naming the op.
void check_launch(cudaError_t err, const char* op);

}  // namespace ember::cuda::glue
