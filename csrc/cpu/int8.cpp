// CPU implementation of ember_C's int8 inference ops.
//
//   quantize_per_token(x, mul?)                 -> (q int8 (M, K), scale fp32 (M,))
//   int8_linear_w8a8(x, w, w_scale, bias?, mul?, act)   dynamic W8A8: fused quantize, ATen's int8
//       GEMM (torch._int_mm: oneDNN with VNNI / AMX), fused dequant + bias + activation epilogue
//   int8_linear_w8a16(x, w, w_scale, bias?, act)         weight-only: int8_kernels().w8a16_gemm where it
//       takes the shape (AMX bf16 tiles; on AVX-512 without AMX, an fp32 GEMM over 12-160 rows that
//       widens the int8 weight panel by panel), else a fused GEMV for M <= 16, else one dequantised
//       copy of the weight in x's dtype and ATen's GEMM (compute bound there)
//   int8_prepack(w, w_scale)     the packed weight int8_linear_w8a8's VNNI GEMM reads (`w_packed`), or
//       an empty tensor for shapes it cannot take; also a Meta kernel (the size only), which the
//       fake kernel of ember::int8_prepack (ops/int8.py) calls so the rule lives here alone
// x is 2-D (M, K) with a contiguous last dim; w is (N, K) int8 contiguous; w_scale fp32 (N,) for
// per-channel or (N, K / group) for groups; bias (N,) in any float dtype; act -1 (none) or ember::Act.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cstring>

#include "cpu/kernels.h"
#include "ops.h"

namespace ember::cpu {
namespace {

void check_x(const at::Tensor& x, const char* op) {
  check_rows(x, op, "x");
  to_dtype(x.scalar_type(), op, "x");
  TORCH_CHECK(x.device().is_cpu(), "ember_C.", op, ": x must be a CPU tensor, got ", x.device());
}

void check_weight(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sw, const c10::optional<at::Tensor>& bias,
                  const char* op) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2 && w.is_contiguous(), "ember_C.", op,
              ": w must be a contiguous 2-D int8 tensor (N, K), got ", w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(w.size(1) == x.size(1), "ember_C.", op, ": x has ", x.size(1), " features but w expects ", w.size(1));
  TORCH_CHECK(sw.scalar_type() == at::kFloat && sw.is_contiguous() && sw.size(0) == w.size(0) &&
                  (sw.dim() == 1 || (sw.dim() == 2 && w.size(1) % sw.size(1) == 0)),
              "ember_C.", op, ": w_scale must be contiguous fp32 (N,) or (N, K / group), got ", sw.scalar_type(), " ",
              sw.sizes(), " for w ", w.sizes());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), "ember_C.", op, ": bias must be (N,) = (", w.size(0),
                ",), got ", bias->sizes());
  }
  TORCH_CHECK(w.device().is_cpu() && sw.device().is_cpu(), "ember_C.", op, ": w and w_scale must be CPU tensors");
}

// W8A16's fp32 x on AMX is split into bf16 parts (cpu/isa_amx.cpp): three by default, which keeps
// fp32's precision, fewer where the user allowed torch's own fp32 matmuls less, through
// torch.backends.mkldnn.matmul.fp32_precision or torch.set_float32_matmul_precision: "tf32" ("high")
// two parts (~16 bits, more than tf32's 11), "bf16" ("medium") one. The same setting that lets
// torch's fp32 nn.Linear run in bf16 on this CPU lets ember's W8A16 do so.
int32_t fp32_x_parts() {
  switch (at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL)) {
    case at::Float32Precision::BF16: return 1;
    case at::Float32Precision::TF32: return 2;
    default: return 3;
  }
}

at::Tensor float_or_null(const c10::optional<at::Tensor>& t) {
  return t ? t->to(at::kFloat).contiguous() : at::Tensor();
}

// shift128: q holds q + 128 as uint8 (the operand of the packed VNNI GEMM).
std::tuple<at::Tensor, at::Tensor> quantize_impl(const at::Tensor& x, const c10::optional<at::Tensor>& mul,
                                                 const char* op, bool shift128 = false) {
  check_x(x, op);
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor m = float_or_null(mul);
  TORCH_CHECK(!m.defined() || (m.dim() == 1 && m.size(0) == K), "ember_C.", op, ": smooth must be (K,) = (", K,
              ",), got ", m.sizes());
  at::Tensor q = at::empty({M, K}, x.options().dtype(shift128 ? at::kByte : at::kChar));
  at::Tensor s = at::empty({M}, x.options().dtype(at::kFloat));
  if (M > 0)
    int8_kernels().quantize_rows(x.const_data_ptr(), M, K, x.stride(0), to_dtype(x.scalar_type(), op, "x"),
                                 m.defined() ? m.const_data_ptr<float>() : nullptr,
                                 static_cast<int8_t*>(q.mutable_data_ptr()), s.mutable_data_ptr<float>(), shift128);
  return {q, s};
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, const c10::optional<at::Tensor>& mul) {
  return quantize_impl(x, mul, "quantize_per_token");
}

// Per-group W8A8 without the packed VNNI kernel (no pack given, or a CPU without VNNI): one int32
// product per group through ATen's int8 GEMM, each scaled by its group's weight scales and summed in fp32.
at::Tensor w8a8_grouped_fallback(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sw, const at::Tensor& b,
                                 const c10::optional<at::Tensor>& mul, int64_t act, at::Tensor& out) {
  auto [q, sx] = quantize_impl(x, mul, "int8_linear_w8a8");
  const int64_t N = w.size(0), K = w.size(1), groups = sw.size(1), g = K / groups;
  at::Tensor y = at::zeros({x.size(0), N}, x.options().dtype(at::kFloat));
  for (int64_t i = 0; i < groups; ++i) {
    const at::Tensor acc = at::_int_mm(q.narrow(1, i * g, g), w.narrow(1, i * g, g).t());
    y.add_(acc.to(at::kFloat).mul_(sw.select(1, i)));
  }
  y.mul_(sx.unsqueeze(1));
  if (b.defined()) y.add_(b);
  if (act >= 0)
    activation_kernels().unary(y.const_data_ptr(), y.mutable_data_ptr(), y.numel(), DType::kFloat32,
                               static_cast<Act>(act));
  return out.copy_(y);
}

// The packed weight of the CPU W8A8 GEMM (int8_kernels().w8a8_gemm_packed, cpu/int8_impl.h): one flat int8
// tensor of w8a8_packed_numel(N, K, G) = N * K + 4 * N * G elements,
//   tiles  [N / 16][K / 4][16][4] int8, tiles[b][k4][j][t] = w[16 b + j][4 k4 + t]: each 64-byte line
//          holds 4 k of 16 output channels, what AVX512-VNNI's vpdpbusd multiplies against 4 activation
//          bytes broadcast to all 16 lanes, so each lane accumulates one output channel's dot product;
//          it is also AMX's TDPBUSD B-tile row (16 columns x 4 k), so 16 consecutive lines are one B
//          tile of 64 k and the AMX kernel (isa_amx.cpp) reads this same pack: one layout for both ISAs;
//   corr   [G][N] int32 from byte N * K on (a multiple of 64, so aligned), corr[g][n] = 128 * the sum of
//          w[n, k] over group g's k. The GEMM's activations are u8 = q + 128 (vpdpbusd multiplies u8 by
//          s8), which adds 128 * sum_k w[n, k] to each dot; corr takes it off again, once per group
//          because each group's dot is scaled by its own w_scale before the groups are summed.
// G is 1 for per-channel scales (w_scale (N,)) and K / group_size for w_scale (N, G). Shapes without a
// packed form (!w8a8_packable: N % 16, K % 4, group_size % 4) get an empty tensor: int8_linear_w8a8
// then runs unpacked, on ATen's int8 GEMM.
void check_prepack_args(const at::Tensor& w, const at::Tensor& sw) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2,
              "ember_C.int8_prepack: w must be a 2-D int8 tensor (N, K), got ", w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(sw.scalar_type() == at::kFloat && sw.size(0) == w.size(0) &&
                  (sw.dim() == 1 || (sw.dim() == 2 && sw.size(1) > 0 && w.size(1) % sw.size(1) == 0)),
              "ember_C.int8_prepack: w_scale must be fp32 (N,) or (N, K / group), got ", sw.scalar_type(), " ",
              sw.sizes(), " for w ", w.sizes());
}

int64_t prepacked_numel(const at::Tensor& w, const at::Tensor& sw) {
  return w8a8_packed_numel(w.size(0), w.size(1), sw.dim() == 1 ? 1 : sw.size(1));
}

at::Tensor int8_prepack(const at::Tensor& w_in, const at::Tensor& sw) {
  check_prepack_args(w_in, sw);
  TORCH_CHECK(w_in.device().is_cpu(), "ember_C.int8_prepack: w must be a CPU tensor, got ", w_in.device());
  const at::Tensor w = w_in.contiguous();
  const int64_t N = w.size(0), K = w.size(1), G = sw.dim() == 1 ? 1 : sw.size(1);
  at::Tensor packed = at::empty({prepacked_numel(w, sw)}, w.options());
  if (packed.numel() == 0) return packed;
  const int64_t K4 = K / 4, group = K / G;
  const int8_t* src = w.const_data_ptr<int8_t>();
  int8_t* tiles = packed.mutable_data_ptr<int8_t>();
  int32_t* corr = reinterpret_cast<int32_t*>(tiles + N * K);
  // One task per 16-channel block: its K / 4 lines and its 16 columns of corr are written by it alone.
  at::parallel_for(0, N / 16, 1, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      int8_t* block = tiles + b * K4 * 64;
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t n = 16 * b + j;
        const int8_t* row = src + n * K;
        for (int64_t k4 = 0; k4 < K4; ++k4) std::memcpy(block + k4 * 64 + j * 4, row + 4 * k4, 4);
        for (int64_t g = 0; g < G; ++g) {
          int32_t sum = 0;  // int32 like the GEMM's accumulators: 128 * |sum| <= 128 * 127 * K < 2^31 for K < 132k
          for (int64_t k = g * group; k < (g + 1) * group; ++k) sum += row[k];
          corr[g * N + n] = 128 * sum;
        }
      }
    }
  });
  return packed;
}

// The size alone, for tracing (torch.compile / torch.export fake tensors).
at::Tensor int8_prepack_meta(const at::Tensor& w, const at::Tensor& sw) {
  check_prepack_args(w, sw);
  return at::empty({prepacked_numel(w, sw)}, w.options());
}

at::Tensor int8_linear_w8a8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sw,
                            const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mul, int64_t act,
                            const c10::optional<at::Tensor>& w_packed) {
  check_x(x, "int8_linear_w8a8");
  check_weight(x, w, sw, bias, "int8_linear_w8a8");
  const int64_t groups = sw.dim() == 1 ? 1 : sw.size(1);
  const int64_t M = x.size(0), N = w.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (x.size(1) == 0) return out.zero_().add_(bias ? *bias : at::zeros({N}, x.options()));
  const at::Tensor b = float_or_null(bias);
  const DType dtype = to_dtype(x.scalar_type(), "int8_linear_w8a8", "x");
  check_act_code(act, "int8_linear_w8a8");
  const int64_t K = x.size(1);
  // An empty w_packed is int8_prepack's answer for a shape without a packed form: run unpacked.
  if (w_packed && w_packed->numel() > 0) {
    // ember's own VNNI GEMM with quantize, dequant, bias and activation fused around it (int8_impl.h).
    TORCH_CHECK(w_packed->scalar_type() == at::kChar && w_packed->is_contiguous() &&
                    w_packed->numel() == w8a8_packed_numel(N, K, groups),
                "ember_C.int8_linear_w8a8: w_packed must be ember_C.int8_prepack(w, w_scale) (",
                w8a8_packed_numel(N, K, groups), " int8), got ", w_packed->scalar_type(), " ", w_packed->sizes());
    auto [qu, sxu] = quantize_impl(x, mul, "int8_linear_w8a8", /*shift128=*/true);
    const at::Tensor sw_k = groups == 1 ? sw.contiguous() : sw.t().contiguous();  // (G, N): 16 channels a load
    if (int8_kernels().w8a8_gemm_packed(qu.const_data_ptr<uint8_t>(), sxu.const_data_ptr<float>(),
                                        w_packed->const_data_ptr<int8_t>(), sw_k.const_data_ptr<float>(),
                                        b.defined() ? b.const_data_ptr<float>() : nullptr, out.mutable_data_ptr(), M, N,
                                        K, groups, dtype, static_cast<int32_t>(act)))
      return out;
  }
  if (groups > 1) return w8a8_grouped_fallback(x, w, sw, b, mul, act, out);
  auto [q, sx] = quantize_impl(x, mul, "int8_linear_w8a8");
  if (M <= 16) {  // decode: ATen's int8 GEMM is slower than a register-blocked GEMV here
    int8_kernels().w8a8_gemv(q.const_data_ptr<int8_t>(), sx.const_data_ptr<float>(), w.const_data_ptr<int8_t>(),
                             sw.const_data_ptr<float>(), b.defined() ? b.const_data_ptr<float>() : nullptr,
                             out.mutable_data_ptr(), M, N, x.size(1), dtype, static_cast<int32_t>(act));
    return out;
  }
  // w is stored (N, K) like nn.Linear; its transpose view is the column-major (K, N) operand oneDNN
  // takes without a copy.
  // The int32 product lives in a per-thread workspace reused across calls: a fresh multi-MB tensor
  // per call costs an mmap and a page fault per 4 KiB (~1 ms of the 4 ms of a 1024 x 384 x 1536 layer,
  // measured single-threaded here), more than the epilogue itself.
  // Capped at 16 Mi elements (64 MiB) per thread; larger products allocate as usual.
  // Made and used only under InferenceMode, so the cached tensor is the same kind in every call whether
  // or not the caller is in inference mode (an inference tensor cannot be written outside it).
  constexpr int64_t kMaxWorkspace = int64_t(1) << 24;
  c10::InferenceMode inference_guard;
  thread_local at::Tensor workspace;
  at::Tensor acc;
  if (M * N <= kMaxWorkspace) {
    if (!workspace.defined() || workspace.numel() < M * N) workspace = at::empty({M * N}, x.options().dtype(at::kInt));
    acc = workspace.narrow(0, 0, M * N).view({M, N});
  } else {
    acc = at::empty({M, N}, x.options().dtype(at::kInt));
  }
  at::_int_mm_out(acc, q, w.t());
  int8_kernels().dequant_epilogue(acc.const_data_ptr<int32_t>(), sx.const_data_ptr<float>(), sw.const_data_ptr<float>(),
                                  b.defined() ? b.const_data_ptr<float>() : nullptr, out.mutable_data_ptr(), M, N,
                                  dtype, static_cast<int32_t>(act));
  return out;
}

// fp32 w * scale (per channel, or per group of `group` columns) in one pass, rows split over the threads:
// the same products as (w.float().view(N, G, group) * sw.view(N, G, 1)), without the int8 -> fp32 copy
// and the product's second (N, K) buffer (at 128 x 768 -> 3072, ATen's version took ~0.9 ms of a 3.2 ms layer).
// Into `out` (fp32 (N, K)) when given, else a new tensor.
at::Tensor dequantize_rows(const at::Tensor& w, const at::Tensor& sw, int64_t group, at::Tensor out = {}) {
  const int64_t N = w.size(0), K = w.size(1), groups = K / group;
  if (!out.defined()) out = at::empty({N, K}, w.options().dtype(at::kFloat));
  const int8_t* src = w.const_data_ptr<int8_t>();
  const float* scale = sw.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < groups; ++g) {
        const float s = scale[n * groups + g];
        const int8_t* a = src + n * K + g * group;
        float* o = dst + n * K + g * group;
        for (int64_t k = 0; k < group; ++k) o[k] = static_cast<float>(a[k]) * s;
      }
  });
  return out;
}

at::Tensor int8_linear_w8a16(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sw,
                             const c10::optional<at::Tensor>& bias, int64_t act) {
  check_x(x, "int8_linear_w8a16");
  check_weight(x, w, sw, bias, "int8_linear_w8a16");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  const int64_t group = sw.dim() == 1 ? K : K / sw.size(1);
  const DType dtype = to_dtype(x.scalar_type(), "int8_linear_w8a16", "x");
  check_act_code(act, "int8_linear_w8a16");
  // The AMX tile kernels take what they can where the CPU has them (isa_amx.cpp: from 3 rows up for a
  // bf16 x, or an fp32 x allowed bf16; 5 for fp32 / fp16), widening the int8 weight to bf16 as they go,
  // never a whole copy; on AVX-512 without AMX the panel GEMM takes 12 to 160 rows (cpu/int8_impl.h).
  // The GEMV takes the rest of the decode rows, streaming the int8 weight once.
  if (M > 0 && N > 0) {
    at::Tensor out = at::empty({M, N}, x.options());
    const at::Tensor b = float_or_null(bias);
    if (int8_kernels().w8a16_gemm(x.const_data_ptr(), x.stride(0), w.const_data_ptr<int8_t>(),
                                  sw.const_data_ptr<float>(), b.defined() ? b.const_data_ptr<float>() : nullptr,
                                  out.mutable_data_ptr(), M, N, K, group, dtype, static_cast<int32_t>(act), fp32_x_parts()))
      return out;
  }
  if (M <= 16 && (group == K || group % 16 == 0)) {
    at::Tensor out = at::empty({M, N}, x.options());
    if (M == 0 || N == 0) return out;
    const at::Tensor b = float_or_null(bias);
    int8_kernels().w8a16_gemv(x.const_data_ptr(), x.stride(0), w.const_data_ptr<int8_t>(), sw.const_data_ptr<float>(),
                              b.defined() ? b.const_data_ptr<float>() : nullptr, out.mutable_data_ptr(), M, N, K, group,
                              dtype, static_cast<int32_t>(act));
    return out;
  }
  // Longer prefills, and CPUs without AVX-512: the GEMM costs 2*M*N*K flops against N*K for one
  // dequantised weight copy, so from a few hundred rows the copy is a few percent of the time and
  // ATen's GEMM does the rest. A bf16/fp16 x on a CPU
  // without a native dot product for it runs the GEMM in fp32 (several times faster there, and one
  // rounding fewer), the output rounded to x's dtype once, after the activation.
  const bool in_fp32 = x.scalar_type() != at::kDouble && !native_16bit_gemm(dtype);
  const at::ScalarType compute = in_fp32 ? at::kFloat : x.scalar_type();
  // The fp32 copy goes into a per-thread workspace reused across calls (up to 64 Mi elements, 256 MiB:
  // the largest layer of a 7B model fits). A fresh buffer of that size costs a page fault per 4 KiB on
  // every call: interleaved against it, 1.27-1.40x at Llama-7B's 128 x 4096 x 11008 and 512 x 11008 x
  // 4096, 1.19x at 512 x 2048 x 8192, the same below 4 Mi elements (Xeon, 2 threads). Only the GEMM
  // below reads it, within this call. Made under InferenceMode, as the W8A8 workspace above is.
  at::Tensor wd;
  constexpr int64_t kMaxWeightWorkspace = int64_t(1) << 26;
  if (compute == at::kFloat && N * K <= kMaxWeightWorkspace) {
    c10::InferenceMode inference_guard;
    thread_local at::Tensor workspace;
    if (!workspace.defined() || workspace.numel() < N * K) workspace = at::empty({N * K}, x.options().dtype(at::kFloat));
    wd = dequantize_rows(w, sw, group, workspace.narrow(0, 0, N * K).view({N, K}));
  } else {
    wd = dequantize_rows(w, sw, group).to(compute);
  }
  at::Tensor out = at::linear(x.to(compute), wd, bias ? c10::optional<at::Tensor>(bias->to(compute)) : c10::nullopt);
  if (act >= 0 && out.numel() > 0)
    activation_kernels().unary(out.const_data_ptr(), out.mutable_data_ptr(), out.numel(),
                               in_fp32 ? DType::kFloat32 : dtype, static_cast<Act>(act));
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(ember_C, CPU, m) {
  m.impl("quantize_per_token", &quantize_per_token);
  m.impl("int8_linear_w8a8", &int8_linear_w8a8);
  m.impl("int8_linear_w8a16", &int8_linear_w8a16);
  m.impl("int8_prepack", &int8_prepack);
}

TORCH_LIBRARY_IMPL(ember_C, Meta, m) { m.impl("int8_prepack", &int8_prepack_meta); }

}  // namespace ember::cpu
