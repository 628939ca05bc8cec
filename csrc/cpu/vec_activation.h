// Activation math on at::vec::Vectorized<float|double>, and an elementwise row mapper.
//
// Included by each ISA translation unit (isa_default.cpp, isa_avx512.cpp) after that unit has chosen
// its CPU_CAPABILITY, so the same source becomes AVX-512 code (Sleef erf/exp/tanh, 16 floats a
// vector) or portable code. Low-precision elements are widened to fp32 for the math, as torch does.
#pragma once
#include <algorithm>
#include <array>
#include <type_traits>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "activation.h"

namespace ember::cpu::EMBER_ISA {

using at::vec::Vectorized;

template <Act A, typename V>
inline V act_forward(const V& x) {
  using T = typename V::value_type;
  if constexpr (A == Act::kRelu) {
    return V::blendv(x, V(T(0)), x < V(T(0)));  // keeps NaN, as torch.relu does
  } else if constexpr (A == Act::kSilu) {
    return x / (V(T(1)) + x.neg().exp());
  } else if constexpr (A == Act::kGelu) {
    return V(T(0.5)) * x * (V(T(1)) + (x * V(T(kSqrt1_2))).erf());
  } else {
    const V inner = V(T(kSqrt2OverPi)) * (x + V(T(kGeluTanhCoeff)) * x * x * x);
    return V(T(0.5)) * x * (V(T(1)) + inner.tanh());
  }
}

// grad * act'(x). ReLU selects rather than multiplies, exactly like torch's threshold_backward: grad
// passes where x is not <= 0 (NaN included), and an infinite grad where x <= 0 still gives 0.
template <Act A, typename V>
inline V act_backward(const V& grad, const V& x) {
  using T = typename V::value_type;
  const V one(T(1));
  if constexpr (A == Act::kRelu) {
    return V::blendv(grad, V(T(0)), x <= V(T(0)));
  } else if constexpr (A == Act::kSilu) {
    const V s = one / (one + x.neg().exp());
    return grad * s * (one + x * (one - s));
  } else if constexpr (A == Act::kGelu) {
    const V cdf = V(T(0.5)) * (one + (x * V(T(kSqrt1_2))).erf());
    const V pdf = V(T(kInvSqrt2Pi)) * (V(T(-0.5)) * x * x).exp();
    return grad * (cdf + x * pdf);
  } else {
    const V x2 = x * x;
    const V t = (V(T(kSqrt2OverPi)) * (x + V(T(kGeluTanhCoeff)) * x2 * x)).tanh();
    const V dinner = V(T(kSqrt2OverPi)) * (one + V(T(3.0 * kGeluTanhCoeff)) * x2);
    return grad * (V(T(0.5)) * (one + t) + V(T(0.5)) * x * (one - t * t) * dinner);
  }
}

template <typename scalar_t>
constexpr bool is_reduced_v = std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>;

template <typename scalar_t>
using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Applies `op(std::array<V, NIN> in) -> std::array<V, NOUT>` elementwise over a (rows, cols) grid.
// Input k's row r starts at in[k] + r * in_row_stride[k]; outputs are contiguous (row stride cols).
// Work is split over all rows*cols elements so one long row still uses every thread.
template <typename scalar_t, size_t NIN, size_t NOUT, typename Op>
void map_rows(const std::array<const scalar_t*, NIN>& in, const std::array<int64_t, NIN>& in_row_stride,
              const std::array<scalar_t*, NOUT>& out, int64_t rows, int64_t cols, const Op& op) {
  using V = Vectorized<opmath_t<scalar_t>>;
  using SV = Vectorized<scalar_t>;
  constexpr int64_t kWidth = SV::size();  // elements per step (two float vectors for bf16/fp16)
  const int64_t total = rows * cols;
  constexpr int64_t kGrain = 16384;

  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    int64_t idx = begin;
    while (idx < end) {
      const int64_t row = idx / cols, col = idx % cols;
      const int64_t len = std::min(cols - col, end - idx);  // the rest of this row inside [begin, end)
      std::array<const scalar_t*, NIN> src;
      std::array<scalar_t*, NOUT> dst;
      for (size_t k = 0; k < NIN; ++k) src[k] = in[k] + row * in_row_stride[k] + col;
      for (size_t k = 0; k < NOUT; ++k) dst[k] = out[k] + idx;
      for (int64_t i = 0; i < len; i += kWidth) {
        const int count = static_cast<int>(std::min(kWidth, len - i));
        if constexpr (is_reduced_v<scalar_t>) {
          std::array<V, NIN> lo, hi;
          for (size_t k = 0; k < NIN; ++k) {
            auto [a, b] = at::vec::convert_to_float<scalar_t>(SV::loadu(src[k] + i, count));
            lo[k] = a;
            hi[k] = b;
          }
          const std::array<V, NOUT> rlo = op(lo), rhi = op(hi);
          for (size_t k = 0; k < NOUT; ++k)
            at::vec::convert_from_float<scalar_t>(rlo[k], rhi[k]).store(dst[k] + i, count);
        } else {
          std::array<V, NIN> v;
          for (size_t k = 0; k < NIN; ++k) v[k] = V::loadu(src[k] + i, count);
          const std::array<V, NOUT> r = op(v);
          for (size_t k = 0; k < NOUT; ++k) r[k].store(dst[k] + i, count);
        }
      }
      idx += len;
    }
  });
}

}  // namespace ember::cpu::EMBER_ISA
