// CPU implementation of ember_C::optim_step: checks the tensor lists, applies AMP's found_inf skip,
// advances the per-parameter step counts and hands the whole group to the ISA-dispatched kernel.
#include <torch/library.h>
#include <ATen/ATen.h>

#include "cpu/kernels.h"
#include "ops.h"

namespace ember::cpu {
namespace {

// In-place writes through data pointers skip the version counters that autograd checks saved tensors
// against; an ATen in-place op would bump them, so the step does too (once per tensor, not per
// write). Inference tensors have no counter.
void bump_versions(at::TensorList list) {
  for (const at::Tensor& t : list)
    if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

// Adds one to a per-parameter step count and returns the new count. torch keeps the counts as 0-dim
// float32 (float64 under a float64 default dtype) CPU tensors; those are read and written in place,
// which for ~200 parameters saves the ~2 us dispatcher round trip of item() and fill_() each.
double advance_step(const at::Tensor& s) {
  if (s.device().is_cpu() && s.numel() == 1 && !s.is_inference()) {
    if (s.scalar_type() == at::kFloat) {
      float* v = s.data_ptr<float>();
      *v = static_cast<float>(static_cast<double>(*v) + 1.0);
      s.unsafeGetTensorImpl()->bump_version();
      return *v;
    }
    if (s.scalar_type() == at::kDouble) {
      double* v = s.data_ptr<double>();
      *v += 1.0;
      s.unsafeGetTensorImpl()->bump_version();
      return *v;
    }
  }
  const double step = one_value(s, "steps[i]") + 1.0;
  s.fill_(step);
  return step;
}

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
  L.hyper64 = make_hyper<double>(lr_value, hyper[1], hyper[2], hyper[3], hyper[4], static_cast<int32_t>(flags));
  L.inv_scale64 = grad_scale.has_value() ? 1.0 / one_value(*grad_scale, "grad_scale") : 1.0;
  L.inv_scale = static_cast<float>(L.inv_scale64);

  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<OptTensor> ts(n);
  for (int64_t i = 0; i < n; ++i) {
    double step = 1.0;
    if (!steps.empty()) step = advance_step(steps[i]);  // torch keeps one count per parameter
    ts[i] = OptTensor{params[i].data_ptr(),
                      grads[i].const_data_ptr(),
                      s1.empty() ? nullptr : s1[i].data_ptr(),
                      s2.empty() ? nullptr : s2[i].data_ptr(),
                      s3.empty() ? nullptr : s3[i].data_ptr(),
                      masters.empty() ? nullptr : masters[i].data_ptr<float>(),
                      params[i].numel(),
                      // in double, as torch computes bias corrections in Python floats
                      opt_coef(g.kind, lr_value, hyper[1], hyper[2], step),
                      opt_coef<double>(g.kind, lr_value, hyper[1], hyper[2], step)};
  }
  L.tensors = ts.data();
  L.count = n;
  optim_kernels().step(L);
  for (const at::TensorList list : {params, s1, s2, s3, masters}) bump_versions(list);
}

}  // namespace

TORCH_LIBRARY_IMPL(ember_C, CPU, m) { m.impl("optim_step", &optim_step); }

}  // namespace ember::cpu
