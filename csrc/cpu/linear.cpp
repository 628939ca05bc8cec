// CPU implementation of ember_C::linear_act / linear_act_backward and ember_C::gated_linear /
// gated_linear_backward: the GEMMs go to the platform BLAS through ATen (addmm / mm, which pick MKL,
// OpenBLAS or oneDNN as torch was built), and everything between the GEMMs is one vectorised pass of
// ember's own (csrc/cpu/kernels_impl.h):
//
//   forward   pre = x @ W^T                          one GEMM (bf16/fp16: + b through addmm's beta term)
//             out = act(pre + b) [+ residual]        one pass, in place when pre is not kept
//   backward  dpre = grad * act'(pre), db = sum_rows(dpre)   one pass (the column sum rides along)
//             dx = dpre @ W, dW = dpre^T @ x         two GEMMs
//
// bf16/fp16 GEMMs big enough run in fp32 on CPUs without a native 16-bit dot product (in_fp32 below).
//
// Torch eager runs addmm, then the activation as a separate kernel, then (with a residual) an add,
// and in backward the activation grad and the bias-grad reduction as two more passes over dpre.
//
// The gated pair computes gate = x @ Wg^T (+bg) and up = x @ Wu^T (+bu) into the two halves of one
// (rows, 2I) buffer (BLAS writes with a leading dimension, so there is no concatenated weight and
// nothing to invalidate when an optimizer updates Wg or Wu), then h = act(gate) * up in one pass.
//
// The grouped gated MLP (mixture-of-experts) runs every expert's whole feed-forward in one call over
// the tokens sorted by expert: for the rows [start_e, end_e) of expert e,
//   pre = x @ Wgu_e^T          one GEMM per expert into one (rows, 2I) [gate | up] buffer
//   h   = act(gate) * up        one pass over all rows (the experts share the activation)
//   out = h @ Wd_e^T            one GEMM per expert
// Backward recomputes h from pre (one elementwise pass) instead of keeping it.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "cpu/kernels.h"
#include "ops.h"

namespace ember::cpu {
namespace {

bool is_none(c10::string_view act) { return act == "none"; }

void check_gemm_operands(const at::Tensor& x, const at::Tensor& w, const char* op, const char* wname) {
  TORCH_CHECK(x.dim() == 2, "ember_C.", op, ": x must be 2-D (rows, in_features), got ", x.dim(), "-D");
  TORCH_CHECK(w.dim() == 2, "ember_C.", op, ": ", wname, " must be 2-D (out_features, in_features), got ", w.dim(),
              "-D");
  TORCH_CHECK(x.size(1) == w.size(1), "ember_C.", op, ": x has ", x.size(1), " features but ", wname,
              " expects in_features=", w.size(1), " (", wname, " shape ", w.sizes(), ")");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "ember_C.", op, ": x and ", wname,
              " must have the same dtype, got ", x.scalar_type(), " and ", w.scalar_type());
  to_dtype(x.scalar_type(), op, "x");
}

void check_vec(const std::optional<at::Tensor>& b, int64_t n, const at::Tensor& x, const char* op, const char* name) {
  if (!b.has_value()) return;
  TORCH_CHECK(b->dim() == 1 && b->size(0) == n, "ember_C.", op, ": ", name, " must have shape (", n, "), got ",
              b->sizes());
  TORCH_CHECK(b->scalar_type() == x.scalar_type(), "ember_C.", op, ": ", name, " must have dtype ", x.scalar_type(),
              ", got ", b->scalar_type());
}

// Every GEMM of these ops goes through the helpers below. A bf16/fp16 product on a CPU without a native
// 16-bit dot product (no AVX512-BF16/FP16, no AMX: native_16bit_gemm) runs in fp32 and is rounded once
// into its 16-bit result, when it is big enough to pay for converting its operands. ATen's 16-bit GEMM
// there is several times slower than its fp32 one (a bf16 Llama-style MLP forward, 512 rows,
// 256 -> 1024: 14.4 ms against 5-6 ms through fp32, on an AVX-512 Xeon whose hypervisor hides BF16 and
// AMX), and the fp32 product is the more accurate one. But the conversion is a pass over every operand:
// measured there, a 1024 -> 4096 bf16 layer went fp32-faster from 16 rows (1.19x; 0.56x at 8), a
// 4096 -> 4096 one only from 64 (1.4x; 0.86x at 32), because its 64 MB fp32 weight copy is a fresh
// mmap that page-faults on every call (glibc reuses freed blocks only up to 32 MB). Hence: fp32 when
// the multiply-adds are at least 16x the converted elements, 64x once those pass 32 MB of fp32.
bool native_for(at::ScalarType s) {
  return (s != at::kBFloat16 && s != at::kHalf) || native_16bit_gemm(to_dtype(s, "linear", "x"));
}

// (m, k) @ (k, n) in dtype s, with `extra` more elements to convert (a second product's operands).
bool in_fp32(at::ScalarType s, int64_t m, int64_t k, int64_t n, int64_t extra = 0) {
  if (native_for(s)) return false;
  const double converted = double(m) * k + double(k) * n + double(m) * n + double(extra);
  const double macs = double(m) * k * n;
  constexpr double kReusedElements = double(8 << 20);  // 32 MB of fp32
  return macs >= (converted <= kReusedElements ? 16.0 : 64.0) * converted;
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat); }

// out = a @ b (+ bias, broadcast over rows), into `out` (which may be a slice of a wider buffer).
void mm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
             const std::optional<at::Tensor>& bias = std::nullopt) {
  if (in_fp32(out.scalar_type(), a.size(0), a.size(1), b.size(1)))
    out.copy_(bias.has_value() ? at::addmm(f32(*bias), f32(a), f32(b)) : at::mm(f32(a), f32(b)));
  else if (bias.has_value())
    at::addmm_out(out, *bias, a, b);
  else
    at::mm_out(out, a, b);
}

// a @ b (+ a2 @ b2), a new tensor of a's dtype, rounded once.
at::Tensor blas_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2 = {}, const at::Tensor& b2 = {}) {
  const int64_t extra = a2.defined() ? a2.numel() + b2.numel() : 0;
  if (!in_fp32(a.scalar_type(), a.size(0), a.size(1), b.size(1), extra)) {
    at::Tensor out = at::mm(a, b);
    if (a2.defined()) out.addmm_(a2, b2);
    return out;
  }
  at::Tensor out = at::mm(f32(a), f32(b));
  if (a2.defined()) out.addmm_(f32(a2), f32(b2));
  return out.to(a.scalar_type());
}

// pre = x @ w^T (+ b), written into `out` (which may be a column slice of a wider buffer).
void gemm_bias(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, at::Tensor& out) {
  mm_into(out, x, w.t(), b);
}

std::tuple<at::Tensor, at::Tensor> linear_act(const at::Tensor& x, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& residual, c10::string_view act,
                                              bool save_preact) {
  check_gemm_operands(x, weight, "linear_act", "weight");
  const int64_t rows = x.size(0), n = weight.size(0);
  check_vec(bias, n, x, "linear_act", "bias");
  if (residual.has_value()) {
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == rows && residual->size(1) == n,
                "ember_C.linear_act: residual must have shape (", rows, ", ", n, "), got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), "ember_C.linear_act: residual must have dtype ",
                x.scalar_type(), ", got ", residual->scalar_type());
  }
  at::Tensor pre = at::empty({rows, n}, x.options());
  if (is_none(act)) {
    gemm_bias(x, weight, bias, pre);
    if (residual.has_value()) pre.add_(*residual);
    return {pre, at::empty({0}, x.options())};
  }
  const Act a = parse_act(std::string(act));
  const DType dtype = to_dtype(x.scalar_type(), "linear_act", "x");
  // fp32/fp64: the bias goes into the activation pass, after a plain GEMM. addmm first writes the
  // bias broadcast over the whole output and then runs the GEMM with beta = 1, which reads it back:
  // two extra passes over (rows, n), measured 4-5% of a 512x256x1024 layer on AVX-512 Xeons, where
  // the activation pass gets the bias for free. bf16/fp16 keep addmm: a rounded GEMM output plus the
  // bias would round twice.
  const bool bias_in_pass = bias.has_value() && (dtype == DType::kFloat32 || dtype == DType::kFloat64);
  if (bias_in_pass)
    mm_into(pre, x, weight.t());
  else
    gemm_bias(x, weight, bias, pre);
  const at::Tensor b = bias_in_pass ? bias->contiguous() : at::Tensor();
  at::Tensor res;
  if (residual.has_value()) res = residual->size(1) <= 1 || residual->stride(1) == 1 ? *residual : residual->contiguous();
  // Without a kept pre-activation (inference) the epilogue overwrites pre in place: no second buffer.
  at::Tensor out = save_preact ? at::empty_like(pre) : pre;
  if (pre.numel() > 0)
    linear_kernels().epilogue(pre.const_data_ptr(), b.defined() ? b.const_data_ptr() : nullptr,
                              res.defined() ? res.const_data_ptr() : nullptr, out.mutable_data_ptr(),
                              save_preact && b.defined() ? pre.mutable_data_ptr() : nullptr, rows, n,
                              res.defined() ? res.stride(0) : 0, dtype, a);
  return {out, save_preact ? pre : at::empty({0}, x.options())};
}

// dpre = grad * act'(pre) and, if wanted, db = dpre.sum(0), in one pass.
std::tuple<at::Tensor, at::Tensor> act_grad_and_bias(const at::Tensor& grad, const at::Tensor& pre, Act a,
                                                     bool need_db) {
  const int64_t rows = pre.size(0), cols = pre.size(1);
  const at::Tensor g = grad.size(1) <= 1 || grad.stride(1) == 1 ? grad : grad.contiguous();
  const at::Tensor p = pre.contiguous();
  at::Tensor dpre = at::empty_like(p);
  // Enough row chunks to give every thread work when there are few column blocks, each chunk at least
  // 16K elements (the elementwise kernels' grain) so that small tensors stay on one thread. A floor of
  // 64 rows instead had kept a 64 x 1024 dpre (a ViT-sized MLP) on one thread: 70 us against torch's
  // 48 us for an exact-GELU backward on a 2-core Xeon.
  const int64_t threads = at::get_num_threads();
  const int64_t min_rows = std::max<int64_t>(1, (16384 + cols - 1) / std::max<int64_t>(cols, 1));
  const int64_t rows_per_chunk = std::max<int64_t>(min_rows, (rows + 4 * threads - 1) / (4 * threads));
  const int64_t chunks = std::max<int64_t>(1, (rows + rows_per_chunk - 1) / rows_per_chunk);
  const auto wide = pre.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partials = need_db ? at::empty({chunks, cols}, pre.options().dtype(wide)) : at::Tensor();
  if (p.numel() > 0)
    linear_kernels().act_backward(g.const_data_ptr(), p.const_data_ptr(), dpre.mutable_data_ptr(),
                                  need_db ? partials.mutable_data_ptr() : nullptr, rows, cols, g.stride(0),
                                  rows_per_chunk, to_dtype(pre.scalar_type(), "linear_act_backward", "preact"), a);
  at::Tensor db;
  if (need_db) db = rows == 0 ? at::zeros({cols}, pre.options()) : partials.sum(0).to(pre.scalar_type());
  return {dpre, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                   const at::Tensor& weight, const at::Tensor& preact,
                                                                   c10::string_view act, bool need_dx, bool need_dw,
                                                                   bool need_db) {
  check_gemm_operands(x, weight, "linear_act_backward", "weight");
  const int64_t rows = x.size(0), n = weight.size(0);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == rows && grad_out.size(1) == n &&
                  grad_out.scalar_type() == x.scalar_type(),
              "ember_C.linear_act_backward: grad_out must be (", rows, ", ", n, ") of dtype ", x.scalar_type(),
              ", got ", grad_out.sizes(), " ", grad_out.scalar_type());
  at::Tensor dpre, db;
  if (is_none(act)) {
    dpre = grad_out;
    if (need_db) db = grad_out.sum(0);
  } else {
    TORCH_CHECK(preact.sizes() == grad_out.sizes(), "ember_C.linear_act_backward: preact must be (", rows, ", ", n,
                "), got ", preact.sizes());
    std::tie(dpre, db) = act_grad_and_bias(grad_out, preact, parse_act(std::string(act)), need_db);
  }
  const at::Tensor empty = at::empty({0}, x.options());
  // dW first: at small M it is the big allocation (N x K), and taking it before dx's lets it reuse the
  // block the previous step's dW freed while that is still in cache (measured at M=1, 1024x1024,
  // interleaved: fwd+bwd 321-336 us against 358-404 us in the other order).
  at::Tensor dw = need_dw ? blas_mm(dpre.t(), x) : empty;
  at::Tensor dx = need_dx ? blas_mm(dpre, weight) : empty;
  return {dx, dw, need_db ? db : empty};
}

std::tuple<at::Tensor, at::Tensor> gated_linear(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                                                const std::optional<at::Tensor>& b_gate,
                                                const std::optional<at::Tensor>& b_up, c10::string_view act,
                                                bool save_preact) {
  check_gemm_operands(x, w_gate, "gated_linear", "w_gate");
  check_gemm_operands(x, w_up, "gated_linear", "w_up");
  TORCH_CHECK(w_gate.sizes() == w_up.sizes(), "ember_C.gated_linear: w_gate and w_up must have the same shape, got ",
              w_gate.sizes(), " and ", w_up.sizes());
  const int64_t rows = x.size(0), inter = w_gate.size(0);
  check_vec(b_gate, inter, x, "gated_linear", "b_gate");
  check_vec(b_up, inter, x, "gated_linear", "b_up");
  const Act a = parse_act(std::string(act));
  at::Tensor pre = at::empty({rows, 2 * inter}, x.options());
  at::Tensor gate = pre.narrow(1, 0, inter), up = pre.narrow(1, inter, inter);
  gemm_bias(x, w_gate, b_gate, gate);
  gemm_bias(x, w_up, b_up, up);
  TORCH_INTERNAL_ASSERT(gate.data_ptr() == pre.data_ptr(), "ember_C.gated_linear: GEMM did not write in place");
  at::Tensor h = at::empty({rows, inter}, x.options());
  if (h.numel() > 0)
    activation_kernels().gated(gate.const_data_ptr(), up.const_data_ptr(), h.mutable_data_ptr(), rows, inter, 2 * inter,
                               2 * inter, to_dtype(x.scalar_type(), "gated_linear", "x"), a);
  return {h, save_preact ? pre : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
    const at::Tensor& preact, c10::string_view act, bool need_dx, bool need_dw, bool need_db) {
  check_gemm_operands(x, w_gate, "gated_linear_backward", "w_gate");
  const int64_t rows = x.size(0), inter = w_gate.size(0);
  TORCH_CHECK(preact.dim() == 2 && preact.size(0) == rows && preact.size(1) == 2 * inter,
              "ember_C.gated_linear_backward: preact must be (", rows, ", ", 2 * inter, "), got ", preact.sizes());
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == rows && grad_out.size(1) == inter,
              "ember_C.gated_linear_backward: grad_out must be (", rows, ", ", inter, "), got ", grad_out.sizes());
  const Act a = parse_act(std::string(act));
  const at::Tensor g = grad_out.contiguous(), p = preact.contiguous();
  at::Tensor dgate = at::empty({rows, inter}, x.options()), dup = at::empty({rows, inter}, x.options());
  if (dgate.numel() > 0)
    activation_kernels().gated_backward(g.const_data_ptr(), p.const_data_ptr(),
                                        p.narrow(1, inter, inter).const_data_ptr(), dgate.mutable_data_ptr(),
                                        dup.mutable_data_ptr(), rows, inter, 2 * inter, 2 * inter, inter,
                                        to_dtype(x.scalar_type(), "gated_linear_backward", "x"), a);
  const at::Tensor empty = at::empty({0}, x.options());
  const at::Tensor dx = need_dx ? blas_mm(dgate, w_gate, dup, w_up) : empty;
  at::Tensor dwg = need_dw ? blas_mm(dgate.t(), x) : empty, dwu = need_dw ? blas_mm(dup.t(), x) : empty;
  at::Tensor dbg = need_db ? dgate.sum(0) : empty, dbu = need_db ? dup.sum(0) : empty;
  return {dx, dwg, dwu, dbg, dbu};
}

// ---- grouped gated MLP (mixture-of-experts) ------------------------------------------------------
// offsets: (E,) int32/int64, the end row of each expert's group (cumulative counts). Checked here:
// non-decreasing, within [0, rows]; rows past offsets[E-1] belong to no expert and come out zero.
std::vector<int64_t> group_ends(const at::Tensor& offsets, int64_t experts, int64_t rows, const char* op) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == experts, "ember_C.", op, ": offsets must have shape (",
              experts, ",) (one end row per expert), got ", offsets.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kInt || offsets.scalar_type() == at::kLong, "ember_C.", op,
              ": offsets must be int32 or int64, got ", offsets.scalar_type());
  TORCH_CHECK(offsets.device().is_cpu(), "ember_C.", op, ": offsets must be a CPU tensor, got ", offsets.device());
  const at::Tensor o = offsets.to(at::kLong).contiguous();
  const int64_t* p = o.const_data_ptr<int64_t>();
  std::vector<int64_t> ends(p, p + experts);
  int64_t prev = 0;
  for (int64_t e = 0; e < experts; ++e) {
    TORCH_CHECK(ends[e] >= prev && ends[e] <= rows, "ember_C.", op,
                ": offsets must be non-decreasing end rows within [0, ", rows, "], got ", c10::IntArrayRef(ends));
    prev = ends[e];
  }
  return ends;
}

void check_experts(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down, const char* op) {
  TORCH_CHECK(x.dim() == 2, "ember_C.", op, ": x must be 2-D (rows sorted by expert, hidden), got ", x.dim(), "-D");
  TORCH_CHECK(w_gate_up.dim() == 3 && w_gate_up.size(1) % 2 == 0 && w_gate_up.size(2) == x.size(1), "ember_C.", op,
              ": w_gate_up must be (experts, 2 * intermediate, ", x.size(1), "), got ", w_gate_up.sizes());
  const int64_t experts = w_gate_up.size(0), inter = w_gate_up.size(1) / 2;
  TORCH_CHECK(w_down.dim() == 3 && w_down.size(0) == experts && w_down.size(1) == x.size(1) &&
                  w_down.size(2) == inter,
              "ember_C.", op, ": w_down must be (", experts, ", ", x.size(1), ", ", inter, "), got ", w_down.sizes());
  TORCH_CHECK(w_gate_up.scalar_type() == x.scalar_type() && w_down.scalar_type() == x.scalar_type(), "ember_C.", op,
              ": x, w_gate_up and w_down must have one dtype, got ", x.scalar_type(), ", ", w_gate_up.scalar_type(),
              ", ", w_down.scalar_type());
  to_dtype(x.scalar_type(), op, "x");
}

// Calls fn(e, start, count) for every expert with rows.
template <typename Fn>
void for_each_group(const std::vector<int64_t>& ends, Fn&& fn) {
  int64_t start = 0;
  for (size_t e = 0; e < ends.size(); ++e) {
    if (ends[e] > start) fn(static_cast<int64_t>(e), start, ends[e] - start);
    start = ends[e];
  }
}

std::tuple<at::Tensor, at::Tensor> grouped_gated_mlp(const at::Tensor& x, const at::Tensor& w_gate_up,
                                                     const at::Tensor& w_down, const at::Tensor& offsets,
                                                     c10::string_view act, bool save_preact) {
  check_experts(x, w_gate_up, w_down, "grouped_gated_mlp");
  const int64_t rows = x.size(0), hidden = x.size(1), inter = w_gate_up.size(1) / 2;
  const auto ends = group_ends(offsets, w_gate_up.size(0), rows, "grouped_gated_mlp");
  const Act a = parse_act(std::string(act));
  const DType dtype = to_dtype(x.scalar_type(), "grouped_gated_mlp", "x");
  const int64_t used = ends.empty() ? 0 : ends.back();
  at::Tensor pre = at::empty({rows, 2 * inter}, x.options());
  for_each_group(ends, [&](int64_t e, int64_t start, int64_t n) {
    at::Tensor dst = pre.narrow(0, start, n);
    mm_into(dst, x.narrow(0, start, n), w_gate_up[e].t());
  });
  if (used < rows) pre.narrow(0, used, rows - used).zero_();
  at::Tensor h = at::empty({rows, inter}, x.options());
  if (h.numel() > 0)
    activation_kernels().gated(pre.const_data_ptr(), pre.narrow(1, inter, inter).const_data_ptr(), h.mutable_data_ptr(),
                               rows, inter, 2 * inter, 2 * inter, dtype, a);
  at::Tensor out = at::empty({rows, hidden}, x.options());
  for_each_group(ends, [&](int64_t e, int64_t start, int64_t n) {
    at::Tensor dst = out.narrow(0, start, n);
    mm_into(dst, h.narrow(0, start, n), w_down[e].t());
  });
  if (used < rows) out.narrow(0, used, rows - used).zero_();
  return {out, save_preact ? pre : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_gated_mlp_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
    const at::Tensor& offsets, const at::Tensor& preact, c10::string_view act, bool need_dx, bool need_dw) {
  check_experts(x, w_gate_up, w_down, "grouped_gated_mlp_backward");
  const int64_t rows = x.size(0), hidden = x.size(1), experts = w_gate_up.size(0), inter = w_gate_up.size(1) / 2;
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == rows && grad_out.size(1) == hidden &&
                  grad_out.scalar_type() == x.scalar_type(),
              "ember_C.grouped_gated_mlp_backward: grad_out must be (", rows, ", ", hidden, ") of dtype ",
              x.scalar_type(), ", got ", grad_out.sizes(), " ", grad_out.scalar_type());
  TORCH_CHECK(preact.dim() == 2 && preact.size(0) == rows && preact.size(1) == 2 * inter,
              "ember_C.grouped_gated_mlp_backward: preact must be (", rows, ", ", 2 * inter, "), got ",
              preact.sizes());
  const auto ends = group_ends(offsets, experts, rows, "grouped_gated_mlp_backward");
  const Act a = parse_act(std::string(act));
  const DType dtype = to_dtype(x.scalar_type(), "grouped_gated_mlp_backward", "x");
  const at::Tensor g = grad_out.contiguous(), p = preact.contiguous();
  const at::Tensor empty = at::empty({0}, x.options());
  const int64_t used = ends.empty() ? 0 : ends.back();

  // h = act(gate) * up again (one pass; cheaper than keeping it), for dW_down.
  at::Tensor h;
  if (need_dw) {
    h = at::empty({rows, inter}, x.options());
    if (h.numel() > 0)
      activation_kernels().gated(p.const_data_ptr(), p.narrow(1, inter, inter).const_data_ptr(), h.mutable_data_ptr(),
                                 rows, inter, 2 * inter, 2 * inter, dtype, a);
  }
  at::Tensor dh = at::empty({rows, inter}, x.options());
  if (used < rows) dh.narrow(0, used, rows - used).zero_();  // rows of no expert: zero, so their dpre is too
  at::Tensor dw_down = need_dw ? at::empty({experts, hidden, inter}, x.options()) : empty;
  for_each_group(ends, [&](int64_t e, int64_t start, int64_t n) {
    const at::Tensor g_e = g.narrow(0, start, n);
    at::Tensor dh_e = dh.narrow(0, start, n);
    mm_into(dh_e, g_e, w_down[e]);
    if (need_dw) {
      at::Tensor dwd_e = dw_down[e];
      mm_into(dwd_e, g_e.t(), h.narrow(0, start, n));
    }
  });
  // [dgate | dup] as one (rows, 2I) buffer, laid out as each expert's [gate; up] weight rows: dx and
  // dW_gate_up of an expert are then one GEMM each (K = 2I), not two plus an accumulation.
  at::Tensor dpre = at::empty({rows, 2 * inter}, x.options());
  if (dpre.numel() > 0)
    activation_kernels().gated_backward(dh.const_data_ptr(), p.const_data_ptr(),
                                        p.narrow(1, inter, inter).const_data_ptr(), dpre.mutable_data_ptr(),
                                        dpre.narrow(1, inter, inter).mutable_data_ptr(), rows, inter, 2 * inter,
                                        2 * inter, 2 * inter, dtype, a);
  at::Tensor dx = need_dx ? at::empty({rows, hidden}, x.options()) : empty;
  at::Tensor dw_gate_up = need_dw ? at::empty({experts, 2 * inter, hidden}, x.options()) : empty;
  for_each_group(ends, [&](int64_t e, int64_t start, int64_t n) {
    const at::Tensor dpre_e = dpre.narrow(0, start, n);
    if (need_dx) {
      at::Tensor dx_e = dx.narrow(0, start, n);
      mm_into(dx_e, dpre_e, w_gate_up[e]);
    }
    if (need_dw) {
      at::Tensor dwgu_e = dw_gate_up[e];
      mm_into(dwgu_e, dpre_e.t(), x.narrow(0, start, n));
    }
  });
  if (need_dx && used < rows) dx.narrow(0, used, rows - used).zero_();
  if (need_dw) {  // an expert no row went to gets zero weight gradients
    for (int64_t e = 0, start = 0; e < experts; start = ends[e++])
      if (ends[e] == start) {
        dw_gate_up[e].zero_();
        dw_down[e].zero_();
      }
  }
  return {dx, dw_gate_up, dw_down};
}

}  // namespace

TORCH_LIBRARY_IMPL(ember_C, CPU, m) {
  m.impl("linear_act", &linear_act);
  m.impl("linear_act_backward", &linear_act_backward);
  m.impl("gated_linear", &gated_linear);
  m.impl("gated_linear_backward", &gated_linear_backward);
  m.impl("grouped_gated_mlp", &grouped_gated_mlp);
  m.impl("grouped_gated_mlp_backward", &grouped_gated_mlp_backward);
}

}  // namespace ember::cpu
