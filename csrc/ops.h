// Torch-side helpers shared by the CPU registrations and the CUDA glue: argument checks and the
// mapping from the schema's `str act` to ember::Act.
#pragma once
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include "activation.h"
#include "optim.h"
#include "optim8bit.h"

namespace ember {

Act parse_act(const std::string& name);  // a name of EMBER_FOR_EACH_ACT, else a ValueError
std::string act_names();                 // "relu, silu, ...", for messages
// An int epilogue code (the int8 ops): Act::kNone (-1) or a member of EMBER_FOR_EACH_ACT, else a ValueError.
Act check_act_code(int64_t code, const char* op);
DType to_dtype(c10::ScalarType t, const char* op, const char* arg);

// The gated kernels take 2-D (rows, cols) operands whose rows may be strided (e.g. the two halves of
// one [.., 2N] tensor) but whose last dimension is contiguous.
void check_rows(const at::Tensor& t, const char* op, const char* arg);

// Argument contracts of the activation ops, shared by the CPU and CUDA registrations.
void check_unary_backward(const at::Tensor& grad_out, const at::Tensor& x);
void check_gated(const at::Tensor& gate, const at::Tensor& up, const char* op);
void check_gated_grad(const at::Tensor& grad_out, const at::Tensor& gate);

// ember_C::optim_step: what the checks established about a parameter group.
struct OptGroup {
  Opt kind;
  DType param_dtype;  // float32, float16 or bfloat16
  bool state_fp32;    // state (and master) tensors are float32
};

// Checks every list of one optimizer_step call (lengths, devices, dtypes, shapes, layouts) and
// returns the group's kind and element types. `device` is the device type the caller implements.
OptGroup check_optim_group(c10::string_view kind, at::TensorList params, at::TensorList grads, at::TensorList s1,
                           at::TensorList s2, at::TensorList s3, at::TensorList masters, at::TensorList steps,
                           at::ArrayRef<double> hyper, c10::DeviceType device);

// ember_C::adamw8bit_step: checks every list (lengths, devices, dtypes, sizes, contiguity) and
// returns the parameters' dtype.
DType check_adamw8bit_group(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                            at::TensorList exp_avg_sq, at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_absmax,
                            at::TensorList steps, at::ArrayRef<double> hyper, int64_t flags, c10::DeviceType device);

// The value of a one-element tensor (lr, grad_scale, found_inf, a step count), read on the host.
double one_value(const at::Tensor& t, const char* arg);

}  // namespace ember
