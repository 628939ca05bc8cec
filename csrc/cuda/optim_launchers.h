// Entry point of the CUDA multi-tensor optimizer step: raw device pointers, no torch (the .cu compiles
// with nvcc alone; csrc/cuda/optim_glue.cpp checks tensors and calls this).
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "activation.h"
#include "optim.h"

namespace ember::cuda {

// One tensor of the group. coef is used when step is null (step counts on the host); otherwise the
// kernel reads *step (the count before this step), computes opt_coef for *step + 1 itself and
// the trailing kernel advances *step (unless found_inf), so capturable steps never leave the device.
struct OptCudaTensor {
  void* param;
  const void* grad;
  void* s1;
  void* s2;
  void* s3;
  float* master;
  float* step;
  int64_t n;
  OptCoef coef;
};

// Updates every tensor in `tensors` (host array, `count` entries) with as few launches as the kernel
// parameter space allows (kMaxTensorsPerLaunch per launch). lr / grad_scale / found_inf are optional
// device scalars (nullptr: use hyper.lr / no scaling / never skip). Asynchronous on `stream`.
cudaError_t optim_step(Opt kind, DType param_dtype, bool state_fp32, const OptHyper& hyper, const OptCudaTensor* tensors,
                       int64_t count, const float* lr, const float* grad_scale, const float* found_inf,
                       cudaStream_t stream);

}  // namespace ember::cuda

namespace ember::cuda {

// One tensor of an AdamW8bit step (csrc/optim8bit.h); step / coef as in OptCudaTensor.
struct Opt8CudaTensor {
  void* param;
  const void* grad;
  int8_t* exp_avg;
  uint8_t* exp_avg_sq;
  float* exp_avg_absmax;
  float* exp_avg_sq_absmax;
  float* step;
  int64_t n;
  OptCoef coef;
};

// AdamW8bit over every tensor in `tensors` (host array) in as few launches as the kernel parameter
// space allows; lr / grad_scale / found_inf as in optim_step. Asynchronous on `stream`.
cudaError_t adamw8bit_step(DType param_dtype, const OptHyper& hyper, const Opt8CudaTensor* tensors, int64_t count,
                           const float* lr, const float* grad_scale, const float* found_inf, cudaStream_t stream);

}  // namespace ember::cuda
