// The bodies of ember's CPU kernels, compiled once per instruction set: isa_default.cpp and
// isa_avx512.cpp each define EMBER_ISA (and the matching CPU_CAPABILITY) and include this file.
#pragma once
#include <cmath>
#include <limits>

#include "cpu/kernels.h"
#include "cpu/vec_activation.h"
#include "cpu/optim_impl.h"
#include "cpu/optim8bit_impl.h"
#include "cpu/int8_impl.h"

namespace ember::cpu::EMBER_ISA {

// Calls f.template operator()<scalar_t, A>() for the runtime (dtype, act) pair.
template <typename F>
void dispatch(DType dtype, Act act, F&& f) {
  auto with_act = [&](auto tag) {
    using scalar_t = decltype(tag);
    switch (act) {
#define EMBER_CASE(member, text) \
  case Act::member: return f.template operator()<scalar_t, Act::member>();
      EMBER_FOR_EACH_ACT(EMBER_CASE)
#undef EMBER_CASE
      case Act::kNone: break;  // callers handle "no activation" before dispatching
    }
  };
  switch (dtype) {
    case DType::kFloat32: return with_act(float{});
    case DType::kFloat64: return with_act(double{});
    case DType::kFloat16: return with_act(c10::Half{});
    case DType::kBFloat16: return with_act(c10::BFloat16{});
  }
}

inline void unary_act(const void* x, void* y, int64_t n, DType dtype, Act act) {
  dispatch(dtype, act, [&]<typename T, Act A>() {
    map_rows<T, 1, 1>({static_cast<const T*>(x)}, {n}, {static_cast<T*>(y)}, 1, n,
                      [](const auto& in) { return std::array{act_forward<A>(in[0])}; });
  });
}

inline void unary_act_backward(const void* grad, const void* x, void* dx, int64_t n, DType dtype, Act act) {
  dispatch(dtype, act, [&]<typename T, Act A>() {
    map_rows<T, 2, 1>({static_cast<const T*>(grad), static_cast<const T*>(x)}, {n, n}, {static_cast<T*>(dx)}, 1, n,
                      [](const auto& in) { return std::array{act_backward<A>(in[0], in[1])}; });
  });
}

inline void gated_act(const void* gate, const void* up, void* out, int64_t rows, int64_t cols,
                      int64_t gate_row_stride, int64_t up_row_stride, DType dtype, Act act) {
  dispatch(dtype, act, [&]<typename T, Act A>() {
    map_rows<T, 2, 1>({static_cast<const T*>(gate), static_cast<const T*>(up)}, {gate_row_stride, up_row_stride},
                      {static_cast<T*>(out)}, rows, cols,
                      [](const auto& in) { return std::array{act_forward<A>(in[0]) * in[1]}; });
  });
}

inline void gated_act_backward(const void* grad, const void* gate, const void* up, void* dgate, void* dup,
                               int64_t rows, int64_t cols, int64_t gate_row_stride, int64_t up_row_stride,
                               int64_t out_row_stride, DType dtype, Act act) {
  dispatch(dtype, act, [&]<typename T, Act A>() {
    map_rows<T, 3, 2>(
        {static_cast<const T*>(grad), static_cast<const T*>(gate), static_cast<const T*>(up)},
        {cols, gate_row_stride, up_row_stride}, {static_cast<T*>(dgate), static_cast<T*>(dup)}, rows, cols,
        // act(gate) is recomputed here instead of being saved by the forward: one extra exp/erf per
        // element is cheaper than storing and re-reading a full activation tensor.
        [](const auto& in) {
          return std::array{act_backward<A>(in[0] * in[2], in[1]), in[0] * act_forward<A>(in[1])};
        },
        out_row_stride);
  });
}

inline void linear_epilogue(const void* pre, const void* bias, const void* residual, void* out, void* pre_out,
                            int64_t rows, int64_t cols, int64_t res_row_stride, DType dtype, Act act) {
  dispatch(dtype, act, [&]<typename T, Act A>() {
    const T* p = static_cast<const T*>(pre);
    const T* b = static_cast<const T*>(bias);
    const T* r = static_cast<const T*>(residual);
    T* o = static_cast<T*>(out);
    // The bias is read as a (rows, cols) input of row stride 0: every row sees the same vector.
    // Residual added in the compute precision and rounded once, like act(pre) + res in fp32.
    if (b == nullptr && r == nullptr) {
      map_rows<T, 1, 1>({p}, {cols}, {o}, rows, cols, [](const auto& in) { return std::array{act_forward<A>(in[0])}; });
    } else if (b == nullptr) {
      map_rows<T, 2, 1>({p, r}, {cols, res_row_stride}, {o}, rows, cols,
                        [](const auto& in) { return std::array{act_forward<A>(in[0]) + in[1]}; });
    } else if (pre_out == nullptr && r == nullptr) {
      map_rows<T, 2, 1>({p, b}, {cols, 0}, {o}, rows, cols,
                        [](const auto& in) { return std::array{act_forward<A>(in[0] + in[1])}; });
    } else if (pre_out == nullptr) {
      map_rows<T, 3, 1>({p, b, r}, {cols, 0, res_row_stride}, {o}, rows, cols,
                        [](const auto& in) { return std::array{act_forward<A>(in[0] + in[1]) + in[2]}; });
    } else if (r == nullptr) {
      T* q = static_cast<T*>(pre_out);
      map_rows<T, 2, 2>({p, b}, {cols, 0}, {q, o}, rows, cols, [](const auto& in) {
        const auto z = in[0] + in[1];
        return std::array{z, act_forward<A>(z)};
      });
    } else {
      T* q = static_cast<T*>(pre_out);
      map_rows<T, 3, 2>({p, b, r}, {cols, 0, res_row_stride}, {q, o}, rows, cols, [](const auto& in) {
        const auto z = in[0] + in[1];
        return std::array{z, act_forward<A>(z) + in[2]};
      });
    }
  });
}

// Work split of linear_act_backward: column blocks of kColBlock elements (a block of the fp32
// partial-sum row stays in L1 while a task walks down its rows) times row chunks of rows_per_chunk.
// Each (chunk, block) task owns its slice of col_partials, so the sums need no atomics and are
// deterministic for a given thread count and shape.
inline void linear_act_backward(const void* grad, const void* pre, void* dpre, void* col_partials, int64_t rows,
                                int64_t cols, int64_t grad_row_stride, int64_t rows_per_chunk, DType dtype, Act act) {
  dispatch(dtype, act, [&]<typename T, Act A>() {
    using O = opmath_t<T>;
    using V = Vectorized<O>;
    using SV = Vectorized<T>;
    constexpr int64_t kWidth = SV::size();
    constexpr int64_t kColBlock = 64 * kWidth;
    const T* g = static_cast<const T*>(grad);
    const T* p = static_cast<const T*>(pre);
    T* d = static_cast<T*>(dpre);
    O* part = static_cast<O*>(col_partials);
    const int64_t nblocks = (cols + kColBlock - 1) / kColBlock;
    const int64_t nchunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
    at::parallel_for(0, nblocks * nchunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t chunk = task / nblocks, block = task % nblocks;
        const int64_t c0 = block * kColBlock, c1 = std::min(cols, c0 + kColBlock);
        const int64_t r0 = chunk * rows_per_chunk, r1 = std::min(rows, r0 + rows_per_chunk);
        O* acc = part == nullptr ? nullptr : part + chunk * cols;
        if (acc != nullptr) std::fill(acc + c0, acc + c1, O(0));
        for (int64_t r = r0; r < r1; ++r) {
          const T* gr = g + r * grad_row_stride;
          const T* pr = p + r * cols;
          T* dr = d + r * cols;
          for (int64_t j = c0; j < c1; j += kWidth) {
            const int count = static_cast<int>(std::min(kWidth, c1 - j));
            if constexpr (is_reduced_v<T>) {
              auto [g0, g1] = at::vec::convert_to_float<T>(SV::loadu(gr + j, count));
              auto [p0, p1] = at::vec::convert_to_float<T>(SV::loadu(pr + j, count));
              const V d0 = act_backward<A>(g0, p0), d1 = act_backward<A>(g1, p1);
              at::vec::convert_from_float<T>(d0, d1).store(dr + j, count);
              if (acc != nullptr) {
                // Sum what was stored (rounded to T), so the bias grad equals dpre.sum(0) in fp32.
                auto [s0, s1] = at::vec::convert_to_float<T>(SV::loadu(dr + j, count));
                constexpr int kHalf = static_cast<int>(V::size());
                const int n0 = std::min(count, kHalf), n1 = count - n0;
                (V::loadu(acc + j, n0) + s0).store(acc + j, n0);
                if (n1 > 0) (V::loadu(acc + j + kHalf, n1) + s1).store(acc + j + kHalf, n1);
              }
            } else {
              const V dv = act_backward<A>(V::loadu(gr + j, count), V::loadu(pr + j, count));
              dv.store(dr + j, count);
              if (acc != nullptr) (V::loadu(acc + j, count) + dv).store(acc + j, count);
            }
          }
        }
      }
    });
  });
}

// ---- cross-entropy rows (the epilogue of the fused linear + cross-entropy) ----------------------
// Three passes over a row that stays in L1/L2 (32000 fp32 logits are 125 KB): max and sum of the
// logits; exp(l - max), summed (and stored in place when the gradient is wanted, so the third pass
// does not compute exp again); the gradient from those. NaN anywhere in a row makes its loss NaN.
template <typename T>
inline void cross_entropy_rows_t(T* logits, int64_t rows, int64_t cols, const int64_t* target,
                                 int64_t ignore_index, T eps, bool write_grad, T scale, const T* row_scale, T* loss) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* l = logits + r * cols;
      const int64_t t = target[r];
      if (t == ignore_index) {
        loss[r] = T(0);
        if (write_grad) std::fill(l, l + cols, T(0));
        continue;
      }
      const T target_logit = l[t];
      V vmax(-std::numeric_limits<T>::infinity()), vsum(T(0));
      int64_t j = 0;
      for (; j + W <= cols; j += W) {
        const V v = V::loadu(l + j);
        vmax = at::vec::maximum(vmax, v);
        vsum = vsum + v;
      }
      T mx = at::vec::vec_reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, vmax);
      T sum_l = at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, vsum);
      for (; j < cols; ++j) {
        mx = std::isnan(l[j]) ? l[j] : std::max(mx, l[j]);
        sum_l += l[j];
      }
      const V vm(mx);
      V vexps(T(0));
      j = 0;
      for (; j + W <= cols; j += W) {
        const V e = vexp(V::loadu(l + j) - vm);
        if (write_grad) e.store(l + j);
        vexps = vexps + e;
      }
      T sum_e = at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, vexps);
      for (; j < cols; ++j) {
        const T e = std::exp(l[j] - mx);
        if (write_grad) l[j] = e;
        sum_e += e;
      }
      const T lse = mx + std::log(sum_e);
      loss[r] = lse - (T(1) - eps) * target_logit - eps / T(cols) * sum_l;
      if (!write_grad) continue;
      const T s = row_scale ? row_scale[r] : scale;
      const V va(s / sum_e), vb(s * eps / T(cols));
      j = 0;
      for (; j + W <= cols; j += W) (V::loadu(l + j) * va - vb).store(l + j);
      for (; j < cols; ++j) l[j] = l[j] * (s / sum_e) - s * eps / T(cols);
      l[t] -= s * (T(1) - eps);
    }
  });
}

inline void cross_entropy_rows(void* logits, int64_t rows, int64_t cols, const int64_t* target, int64_t ignore_index,
                               double eps, bool write_grad, double scale, const void* row_scale, void* loss,
                               DType dtype) {
  if (dtype == DType::kFloat64)
    cross_entropy_rows_t<double>(static_cast<double*>(logits), rows, cols, target, ignore_index, eps, write_grad,
                                 scale, static_cast<const double*>(row_scale), static_cast<double*>(loss));
  else
    cross_entropy_rows_t<float>(static_cast<float*>(logits), rows, cols, target, ignore_index, float(eps),
                                write_grad, float(scale), static_cast<const float*>(row_scale),
                                static_cast<float*>(loss));
}

// A designated initialiser leaves an entry it does not name null, which would only fail when that
// kernel is first called; the pragma turns a forgotten entry into a compile error instead.
#pragma GCC diagnostic push
#pragma GCC diagnostic error "-Wmissing-field-initializers"
inline const IsaKernels& table() {
  static const IsaKernels k{
      .activation = {.unary = &unary_act,
                     .unary_backward = &unary_act_backward,
                     .gated = &gated_act,
                     .gated_backward = &gated_act_backward},
      .linear = {.epilogue = &linear_epilogue,
                 .act_backward = &linear_act_backward,
                 .cross_entropy_rows = &cross_entropy_rows},
      .optim = {.step = &optim_step, .adamw8bit_step = &adamw8bit_step},
      .int8 = {.quantize_rows = &quantize_rows,
               .dequant_epilogue = &dequant_epilogue,
               .w8a16_gemv = &w8a16_gemv,
               .w8a8_gemv = &w8a8_gemv,
               .w8a8_gemm_packed = &w8a8_gemm_packed,
               .w8a16_gemm = &w8a16_gemm},
  };
  return k;
}
#pragma GCC diagnostic pop

}  // namespace ember::cpu::EMBER_ISA
