// CPU implementation of ember_C::optim_step: checks the tensor lists, applies AMP's found_inf skip,
// advances the per-parameter step counts and hands the whole group to the ISA-dispatched kernel.
#include <torch/library.h>
#include <ATen/ATen.h>

#include "cpu/kernels.h"
#include "ops.h"

namespace ember::cpu {
namespace {

void optim_step(c10::string_view kind_name, at::TensorList params, at::TensorList grads, at::TensorList s1,
                at::TensorList s2, at::TensorList s3, at::TensorList masters, at::TensorList steps,
                at::ArrayRef<double> hyper, int64_t flags, const std::optional<at::Tensor>& lr,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const OptGroup g = check_optim_group(kind_name, params, grads, s1, s2, s3, masters, steps, hyper, at::kCPU);
  if (params.empty()) return;
  if (found_inf.has_value() && one_value(*found_inf, "found_inf") != 0.0) return;  // AMP: skip the whole step

  const double lr_value = lr.has_value() ? one_value(*lr, "lr") : hyper[0];
  OptLaunch L{};
  L.kind = g.kind;
  L.param_dtype = g.param_dtype;
  L.state_fp32 = g.state_fp32;
  L.hyper = make_hyper(lr_value, hyper[1], hyper[2], hyper[3], hyper[4], static_cast<int32_t>(flags));
  L.inv_scale = grad_scale.has_value() ? static_cast<float>(1.0 / one_value(*grad_scale, "grad_scale")) : 1.0f;

  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<OptTensor> ts(n);
  for (int64_t i = 0; i < n; ++i) {
    double step = 1.0;
    if (!steps.empty()) {  // torch keeps one step count per parameter; this step is count + 1
      step = one_value(steps[i], "steps[i]") + 1.0;
      steps[i].fill_(step);
    }
    ts[i] = OptTensor{params[i].data_ptr(),
                      grads[i].const_data_ptr(),
                      s1.empty() ? nullptr : s1[i].data_ptr(),
                      s2.empty() ? nullptr : s2[i].data_ptr(),
                      s3.empty() ? nullptr : s3[i].data_ptr(),
                      masters.empty() ? nullptr : masters[i].data_ptr<float>(),
                      params[i].numel(),
                      // in double, as torch computes bias corrections in Python floats
                      opt_coef(g.kind, lr_value, hyper[1], hyper[2], step)};
  }
  L.tensors = ts.data();
  L.count = n;
  kernels().optim_step(L);
}

}  // namespace

TORCH_LIBRARY_IMPL(ember_C, CPU, m) { m.impl("optim_step", &optim_step); }

}  // namespace ember::cpu
