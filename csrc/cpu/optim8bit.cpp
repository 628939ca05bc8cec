// CPU implementation of ember_C::adamw8bit_step: checks, AMP's found_inf skip (read on the host:
// this is the CPU), step counts, then one ISA-dispatched call for the whole group.
#include <torch/library.h>
#include <ATen/ATen.h>

#include "cpu/kernels.h"
#include "ops.h"

namespace ember::cpu {
namespace {

void adamw8bit_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                    at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_absmax, at::TensorList steps,
                    at::ArrayRef<double> hyper, int64_t flags, const std::optional<at::Tensor>& lr,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const DType dtype = check_adamw8bit_group(params, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax,
                                            steps, hyper, flags, at::kCPU);
  if (params.empty()) return;
  if (found_inf.has_value() && one_value(*found_inf, "found_inf") != 0.0) return;  // AMP: skip the whole step
  const double lr_value = lr.has_value() ? one_value(*lr, "lr") : hyper[0];
  Opt8Launch L{};
  L.param_dtype = dtype;
  L.hyper = make_hyper(lr_value, hyper[1], hyper[2], hyper[3], hyper[4], static_cast<int32_t>(flags));
  L.inv_scale = grad_scale.has_value() ? static_cast<float>(1.0 / one_value(*grad_scale, "grad_scale")) : 1.0f;
  std::vector<Opt8Tensor> ts(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    double step = 1.0;
    if (!steps.empty()) {  // one count per parameter, as torch keeps them; this step is count + 1
      step = one_value(steps[i], "steps[i]") + 1.0;
      steps[i].fill_(step);
    }
    ts[i] = Opt8Tensor{params[i].data_ptr(),
                       grads[i].const_data_ptr(),
                       exp_avg[i].data_ptr<int8_t>(),
                       exp_avg_sq[i].data_ptr<uint8_t>(),
                       exp_avg_absmax[i].data_ptr<float>(),
                       exp_avg_sq_absmax[i].data_ptr<float>(),
                       params[i].numel(),
                       opt_coef(Opt::kAdam, lr_value, hyper[1], hyper[2], step)};
  }
  L.tensors = ts.data();
  L.count = static_cast<int64_t>(ts.size());
  optim_kernels().adamw8bit_step(L);
}

}  // namespace

TORCH_LIBRARY_IMPL(ember_C, CPU, m) { m.impl("adamw8bit_step", &adamw8bit_step); }

}  // namespace ember::cpu
