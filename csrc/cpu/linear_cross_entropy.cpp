// CPU implementation of ember_C::linear_cross_entropy / linear_cross_entropy_backward: the chunk loop
// of csrc/linear_cross_entropy.h (GEMMs through ATen's BLAS) with ember's vectorised row epilogue
// (LinearKernels::cross_entropy_rows, cpu/kernels_impl.h).
//
//   forward   the loss; with need_* and reduction mean / sum, also dx, dW, db of that loss (the
//             upstream gradient of a scalar loss is one number, so autograd only scales them: 3 GEMMs
//             per chunk in all, as torch's forward + backward, and nothing of size tokens x vocab kept)
//   backward  reduction "none" only: the upstream gradient is per row, so the logits are recomputed
//             chunk by chunk with it as the rows' scale
#include <torch/library.h>
#include <ATen/ATen.h>

#include "cpu/kernels.h"
#include "linear_cross_entropy.h"
#include "ops.h"

namespace ember::cpu {
namespace {

using OptTensor = std::optional<at::Tensor>;

void check_operands(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& target,
                    int64_t ignore_index, const char* op) {
  TORCH_CHECK(x.dim() == 2 && (x.size(1) <= 1 || x.stride(1) == 1), "ember_C.", op,
              ": x must be 2-D (tokens, hidden) with contiguous rows, got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1) && weight.size(0) > 0, "ember_C.", op,
              ": weight must be (vocab >= 1, ", x.size(1), "), got ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "ember_C.", op, ": x and weight must have the same dtype, got ",
              x.scalar_type(), " and ", weight.scalar_type());
  to_dtype(x.scalar_type(), op, "x");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == x.scalar_type(),
                "ember_C.", op, ": bias must be (", weight.size(0), ") of dtype ", x.scalar_type(), ", got ",
                bias->sizes(), " ", bias->scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == x.size(0) && target.scalar_type() == at::kLong &&
                  target.is_contiguous(),
              "ember_C.", op, ": target must be contiguous int64 of shape (", x.size(0), "), got ", target.sizes(),
              " ", target.scalar_type());
  // Out-of-range targets raise what torch's cross_entropy raises (IndexError), before any work.
  const int64_t vocab = weight.size(0);
  const int64_t* t = target.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < target.numel(); ++i)
    TORCH_CHECK_INDEX(t[i] == ignore_index || (t[i] >= 0 && t[i] < vocab), "Target ", t[i], " is out of bounds.");
}

CrossEntropyEpilogue cpu_epilogue(int64_t ignore_index, double eps) {
  return [ignore_index, eps](at::Tensor& logits, const at::Tensor& target, at::Tensor& loss, bool write_grad,
                             double scale, const at::Tensor& row_scale) {
    const DType dt = logits.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
    linear_kernels().cross_entropy_rows(logits.mutable_data_ptr(), logits.size(0), logits.size(1),
                                        target.const_data_ptr<int64_t>(), ignore_index, eps, write_grad, scale,
                                        row_scale.defined() ? row_scale.const_data_ptr() : nullptr,
                                        loss.mutable_data_ptr(), dt);
  };
}

at::Tensor empty_of(const at::Tensor& x) { return at::empty({0}, x.options()); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& target,
    int64_t ignore_index, c10::string_view reduction, double label_smoothing, bool need_dx, bool need_dw,
    bool need_db, int64_t chunk_rows) {
  check_operands(x, weight, bias, target, ignore_index, "linear_cross_entropy");
  const int64_t red = lce_reduction(reduction);
  TORCH_CHECK(red != 0 || !(need_dx || need_dw || need_db),
              "ember_C.linear_cross_entropy: reduction 'none' takes its gradients from linear_cross_entropy_backward");
  need_db = need_db && bias.has_value();
  auto [scale, kept] = lce_scale(target, ignore_index, red);
  LceGrads r = lce_chunked(x, weight, bias, target, need_dx, need_dw, need_db, scale, at::Tensor(), chunk_rows,
                           cpu_epilogue(ignore_index, label_smoothing));
  at::Tensor loss;
  if (red == 0)
    loss = r.loss_rows;
  else if (red == 2)
    loss = r.loss_rows.sum();
  else
    loss = r.loss_rows.sum().div_(static_cast<double>(kept));  // 0 kept: 0 / 0 = NaN, as torch
  const at::Tensor e = empty_of(x);
  return {loss, need_dx ? r.dx : e, need_dw ? r.dw : e, need_db ? r.db : e};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
    const at::Tensor& target, int64_t ignore_index, double label_smoothing, bool need_dx, bool need_dw, bool need_db,
    int64_t chunk_rows) {
  check_operands(x, weight, bias, target, ignore_index, "linear_cross_entropy_backward");
  const auto wide = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == x.size(0),
              "ember_C.linear_cross_entropy_backward: grad_loss must be (", x.size(0), "), got ", grad_loss.sizes());
  need_db = need_db && bias.has_value();
  const at::Tensor g = grad_loss.to(wide).contiguous();
  LceGrads r = lce_chunked(x, weight, bias, target, need_dx, need_dw, need_db, 1.0, g, chunk_rows,
                           cpu_epilogue(ignore_index, label_smoothing));
  const at::Tensor e = empty_of(x);
  return {need_dx ? r.dx : e, need_dw ? r.dw : e, need_db ? r.db : e};
}

}  // namespace

TORCH_LIBRARY_IMPL(ember_C, CPU, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward);
}

}  // namespace ember::cpu
