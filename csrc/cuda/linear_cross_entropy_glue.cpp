// CUDA registration of ember_C::linear_cross_entropy / linear_cross_entropy_backward: the chunk loop of
// csrc/linear_cross_entropy.h (GEMMs through ATen, i.e. cuBLAS, on the current stream) with the row
// kernel of csrc/cuda/linear_cross_entropy.cu. Compiled only in CUDA builds (EMBER_WITH_CUDA).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "linear_cross_entropy.h"
#include "ops.h"

namespace ember::cuda::glue {
namespace {

using OptTensor = std::optional<at::Tensor>;

void check_operands(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& target,
                    int64_t ignore_index, const char* op) {
  check_same_device(x, x.device(), op, "x", "x");
  check_same_device(weight, x.device(), op, "weight", "x");
  check_same_device(target, x.device(), op, "target", "x");
  if (bias.has_value()) check_same_device(*bias, x.device(), op, "bias", "x");
  TORCH_CHECK(x.dim() == 2 && (x.size(1) <= 1 || x.stride(1) == 1), "ember_C.", op,
              ": x must be 2-D (tokens, hidden) with contiguous rows, got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1) && weight.size(0) > 0, "ember_C.", op,
              ": weight must be (vocab >= 1, ", x.size(1), "), got ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "ember_C.", op, ": x and weight must have the same dtype");
  to_dtype(x.scalar_type(), op, "x");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == x.scalar_type(),
                "ember_C.", op, ": bias must be (", weight.size(0), ") of dtype ", x.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == x.size(0) && target.scalar_type() == at::kLong &&
                  target.is_contiguous(),
              "ember_C.", op, ": target must be contiguous int64 of shape (", x.size(0), ")");
  // torch's IndexError for an out-of-range target, instead of an out-of-bounds read in the kernel. One
  // device -> host copy of a bool per call (torch's own kernel asserts on the device instead).
  if (target.numel() > 0) {
    const at::Tensor bad = (target.lt(0) | target.ge(weight.size(0))) & target.ne(ignore_index);
    if (bad.any().item<bool>()) {
      const int64_t first = target.masked_select(bad)[0].item<int64_t>();
      TORCH_CHECK_INDEX(false, "Target ", first, " is out of bounds.");
    }
  }
}

CrossEntropyEpilogue cuda_epilogue(int64_t ignore_index, double eps) {
  return [ignore_index, eps](at::Tensor& logits, const at::Tensor& target, at::Tensor& loss, bool write_grad,
                             double scale, const at::Tensor& row_scale) {
    const DType dt = logits.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
    check_launch(ember::cuda::cross_entropy_rows(logits.mutable_data_ptr(), logits.size(0), logits.size(1),
                                                 target.const_data_ptr<int64_t>(), ignore_index, eps, write_grad,
                                                 scale, row_scale.defined() ? row_scale.const_data_ptr() : nullptr,
                                                 loss.mutable_data_ptr(), dt, c10::cuda::getCurrentCUDAStream().stream()),
                 "linear_cross_entropy");
  };
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& target,
    int64_t ignore_index, c10::string_view reduction, double label_smoothing, bool need_dx, bool need_dw,
    bool need_db, int64_t chunk_rows) {
  check_operands(x, weight, bias, target, ignore_index, "linear_cross_entropy");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t red = lce_reduction(reduction);
  TORCH_CHECK(red != 0 || !(need_dx || need_dw || need_db),
              "ember_C.linear_cross_entropy: reduction 'none' takes its gradients from linear_cross_entropy_backward");
  need_db = need_db && bias.has_value();
  auto [scale, kept] = lce_scale(target, ignore_index, red);
  LceGrads r = lce_chunked(x, weight, bias, target, need_dx, need_dw, need_db, scale, at::Tensor(), chunk_rows,
                           cuda_epilogue(ignore_index, label_smoothing));
  at::Tensor loss = red == 0 ? r.loss_rows
                    : red == 2 ? r.loss_rows.sum()
                               : r.loss_rows.sum().div_(static_cast<double>(kept));
  const at::Tensor e = at::empty({0}, x.options());
  return {loss, need_dx ? r.dx : e, need_dw ? r.dw : e, need_db ? r.db : e};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
    const at::Tensor& target, int64_t ignore_index, double label_smoothing, bool need_dx, bool need_dw, bool need_db,
    int64_t chunk_rows) {
  check_operands(x, weight, bias, target, ignore_index, "linear_cross_entropy_backward");
  check_same_device(grad_loss, x.device(), "linear_cross_entropy_backward", "grad_loss", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == x.size(0),
              "ember_C.linear_cross_entropy_backward: grad_loss must be (", x.size(0), "), got ", grad_loss.sizes());
  const auto wide = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  need_db = need_db && bias.has_value();
  LceGrads r = lce_chunked(x, weight, bias, target, need_dx, need_dw, need_db, 1.0, grad_loss.to(wide).contiguous(),
                           chunk_rows, cuda_epilogue(ignore_index, label_smoothing));
  const at::Tensor e = at::empty({0}, x.options());
  return {need_dx ? r.dx : e, need_dw ? r.dw : e, need_db ? r.db : e};
}

}  // namespace

TORCH_LIBRARY_IMPL(ember_C, CUDA, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward);
}

}  // namespace ember::cuda::glue
