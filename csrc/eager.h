// The eager entry points of ember's fused ops (csrc/eager.cpp), bound in ember._C for the Python fast
// path: argument checks, reshapes, the ember_C kernels, and C++ autograd when a gradient is wanted.
#pragma once
#include <optional>
#include <string>

#include <ATen/core/Tensor.h>

namespace ember::eager {

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& residual, const std::string& act);
at::Tensor gated_linear(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                        const std::optional<at::Tensor>& b_gate, const std::optional<at::Tensor>& b_up,
                        const std::string& act);
at::Tensor unary_act(const at::Tensor& x, const std::string& act);
at::Tensor gated_act(const at::Tensor& gate, const at::Tensor& up, const std::string& act);

}  // namespace ember::eager
