// The chunk loop of the fused linear + cross-entropy, shared by the CPU kernel
// (cpu/linear_cross_entropy.cpp) and the CUDA glue (cuda/linear_cross_entropy_glue.cpp); each brings
// its own row epilogue. ATen calls only, so one source serves both devices.
//
// For a chunk of token rows [r0, r0 + c):
//   logits = x[r0:r0+c] @ W^T (+ b)               BLAS / cuBLAS, into a reused buffer of the compute
//                                                  dtype (fp32; fp64 for fp64 inputs)
//   epilogue(logits, target)                       per row: log-sum-exp, loss and, when a gradient is
//                                                  wanted, dlogits in place (already times its scale)
//   dx[r0:r0+c] = dlogits @ W                      the gradients, from the chunk while it is hot
//   dW += dlogits^T @ x[r0:r0+c], db += colsum(dlogits)
// so no more than one chunk of logits (kChunkBytes) ever exists. Low-precision inputs run their GEMMs
// in their own dtype (as F.linear does, accumulating in fp32 inside the GEMM); the logits are widened
// to fp32 for the epilogue, dlogits rounded back for the gradient GEMMs (as autograd does through
// transformers' logits.float()), and dW, db accumulate in fp32 over the chunks.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <functional>
#include <optional>
#include <tuple>

namespace ember {

// The row epilogue: logits (rows, V) contiguous in the compute dtype, target (rows) int64, loss
// (rows) to write; with write_grad, the gradient replaces the logits, times row_scale[r] when
// row_scale is defined, else times scale.
using CrossEntropyEpilogue = std::function<void(at::Tensor& logits, const at::Tensor& target, at::Tensor& loss,
                                                bool write_grad, double scale, const at::Tensor& row_scale)>;

// Token rows per chunk. Each chunk streams the weight twice (the logits and dX GEMMs) and dW twice (its
// accumulation), so the GEMMs' work per byte moved grows with the rows: up to 256 of them, measured
// ~10% faster than 128 at hidden 1024 on a 2-core Xeon. The chunk of logits is capped at the larger of
// 16 MB and 0.4x the weight's size (dW, which training needs anyway, is one weight), so the op's extra
// memory stays within ~1.5 weights.
constexpr int64_t kChunkMinBytes = 16 << 20;
constexpr int64_t kChunkMaxRows = 256;

inline int64_t lce_chunk_rows(int64_t rows, int64_t hidden, int64_t vocab, int64_t elem_size, int64_t requested) {
  if (requested > 0) return std::min(requested, std::max<int64_t>(rows, 1));
  const int64_t row_bytes = std::max<int64_t>(1, vocab * elem_size);
  const int64_t cap = std::max<int64_t>(kChunkMinBytes, vocab * hidden * elem_size * 2 / 5);
  int64_t c = std::max<int64_t>(1, std::min<int64_t>(kChunkMaxRows, cap / row_bytes));
  if (c >= 16) c -= c % 16;  // whole GEMM blocks
  return std::min(c, std::max<int64_t>(rows, 1));
}

struct LceGrads {
  at::Tensor loss_rows;  // (rows,) in the compute dtype
  at::Tensor dx, dw, db;  // undefined unless asked for
};

// x (rows, H) with unit column stride, weight (V, H), bias (V,) or none, target (rows,) int64 already
// checked. With any need_*, the gradient of sum_r scale_r * loss_r is returned (scale_r = row_scale[r]
// when defined, else scale).
inline LceGrads lce_chunked(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& target, bool need_dx, bool need_dw, bool need_db, double scale,
                            const at::Tensor& row_scale, int64_t chunk_rows, const CrossEntropyEpilogue& epilogue) {
  const int64_t rows = x.size(0), hidden = x.size(1), vocab = weight.size(0);
  const auto dtype = x.scalar_type();
  const auto wide = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const bool low = dtype != wide;
  const bool grad = need_dx || need_dw || need_db;
  LceGrads out;
  out.loss_rows = at::empty({rows}, x.options().dtype(wide));
  if (need_dx) out.dx = at::empty({rows, hidden}, x.options());
  at::Tensor dw_acc, db_acc;
  if (need_dw) dw_acc = at::zeros({vocab, hidden}, x.options().dtype(wide));
  if (need_db) db_acc = at::zeros({vocab}, x.options().dtype(wide));
  if (rows > 0 && vocab > 0) {
    const int64_t c = lce_chunk_rows(rows, hidden, vocab, at::elementSize(wide), chunk_rows);
    at::Tensor buf = at::empty({c, vocab}, x.options().dtype(wide));
    const at::Tensor wt = weight.t();
    for (int64_t r0 = 0; r0 < rows; r0 += c) {
      const int64_t n = std::min(c, rows - r0);
      const at::Tensor xc = x.narrow(0, r0, n);
      at::Tensor logits = buf.narrow(0, 0, n);
      if (!low) {
        if (bias.has_value())
          at::addmm_out(logits, *bias, xc, wt);
        else
          at::mm_out(logits, xc, wt);
      } else {
        logits.copy_(bias.has_value() ? at::addmm(*bias, xc, wt) : at::mm(xc, wt));
      }
      at::Tensor loss_c = out.loss_rows.narrow(0, r0, n);
      const at::Tensor rs = row_scale.defined() ? row_scale.narrow(0, r0, n) : at::Tensor();
      epilogue(logits, target.narrow(0, r0, n), loss_c, grad, scale, rs);
      if (!grad) continue;
      const at::Tensor g = low ? logits.to(dtype) : logits;
      if (need_dx) {
        at::Tensor dxc = out.dx.narrow(0, r0, n);
        at::mm_out(dxc, g, weight);
      }
      if (need_dw) {
        if (low)
          dw_acc.add_(at::mm(g.t(), xc));
        else
          dw_acc.addmm_(g.t(), xc);
      }
      if (need_db) db_acc.add_(logits.sum(0));
    }
  } else if (need_dx) {
    out.dx.zero_();  // no vocabulary: the loss does not depend on x (torch's gradient is 0 too)
  }
  if (need_dw) out.dw = low ? dw_acc.to(dtype) : dw_acc;
  if (need_db) out.db = low ? db_acc.to(dtype) : db_acc;
  return out;
}

// The reduction's scale and the count of kept targets: mean divides by the number of targets that
// are not ignore_index (0 of them: the loss is 0/0 = NaN, as torch's, and every gradient is 0).
inline std::tuple<double, int64_t> lce_scale(const at::Tensor& target, int64_t ignore_index, int64_t reduction) {
  if (reduction != 1) return {1.0, 0};
  const int64_t kept = target.ne(ignore_index).sum().item<int64_t>();
  return {kept > 0 ? 1.0 / double(kept) : 0.0, kept};
}

// reduction: 0 none, 1 mean, 2 sum (torch's Reduction enum)
inline int64_t lce_reduction(c10::string_view r) {
  if (r == "none") return 0;
  if (r == "mean") return 1;
  TORCH_CHECK(r == "sum", "linear_cross_entropy: reduction must be 'mean', 'sum' or 'none', got '", r, "'");
  return 2;
}

}  // namespace ember
