// Activation math on at::vec::Vectorized<float|double>, and an elementwise row mapper.
//
// Included by each ISA translation unit (isa_default.cpp, isa_avx512.cpp) after that unit has chosen
// its CPU_CAPABILITY, so the same source becomes AVX-512 code (16 floats a vector) or portable code.
// Low-precision elements are widened to fp32 for the math, as torch does.
//
// fp32 on AVX-512 uses ember's own inline exp and erf (vexp / verf below) instead of ATen's, which call
// Sleef's out-of-line expf (1 ulp): erf, SiLU and both GELUs are bound by that call on this project's
// CPU, and torch's GELU (oneDNN's JIT kernel) inlines its exp too. fp64 and the portable build keep
// ATen's functions.
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

template <typename V>
inline V vexp(const V& x) {
  return x.exp();
}

template <typename V>
inline V verf(const V& x) {
  return x.erf();
}

#if defined(CPU_CAPABILITY_AVX512)
// exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n ln2 in two parts (Cody-Waite) so r is exact, and
// exp(r) on |r| <= ln2/2 by Cephes' degree-6 polynomial (within 2 ulp of exp over the float range,
// tested against float64 in tests/test_activation_math.py). scalef applies 2^n with IEEE overflow to
// inf; NaN passes through (max/min return their second operand when either is NaN) and the clamp keeps
// r finite for +-inf inputs.
// Below x = -87 the result is 0, not exp's gradual underflow: results under 1.65e-38 would be
// subnormal (or, from scalef, land there on the way to 0), and on Intel cores every instruction that
// makes a subnormal takes a microcode assist. GELU's backward meets that past |x| = 13.2 (its
// exp(-x^2 / 2)), tanh-GELU's forward past x = 10: on pre-activations of std 16 they ran 2549 and
// 1671 us against 210 and 128 us at std 1 (512 x 1024 fp32, an AVX-512 Xeon, 2 cores). The values
// given up are below 1.65e-38. At -87 itself n = -126 and exp(r) is 1.4, so the result is normal.
template <>
inline Vectorized<float> vexp(const Vectorized<float>& v) {
  constexpr float kLowest = -87.f;
  __m512 x = _mm512_max_ps(_mm512_set1_ps(kLowest), v);
  x = _mm512_min_ps(_mm512_set1_ps(89.f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512 y = _mm512_scalef_ps(p, n);
  // v < -87 (ordered: a NaN v keeps its NaN) -> 0
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_set1_ps(kLowest), _CMP_LT_OQ), y, _mm512_setzero_ps());
}

// erf as an odd rational function of x clamped to [-4, 4] (beyond which erf is +-1 in fp32): a degree-13
// odd numerator over a degree-8 even denominator, the minimax fit Eigen and XLA use (max abs error
// ~2e-7 in fp32, tested against float64 in tests/test_activation_math.py). No exp: about 16 FMAs and
// one reciprocal estimate, where Abramowitz & Stegun 7.1.26 (ATen's formula) costs a division, a polynomial and
// an exp. That made exact GELU 0.81-0.93x torch's oneDNN kernel on an Intel Xeon; this is what makes it
// at least as fast. NaN passes through the clamp (min/max return their second operand when either is
// NaN) and through the arithmetic.
template <>
inline Vectorized<float> verf(const Vectorized<float>& v) {
  __m512 x = _mm512_max_ps(_mm512_set1_ps(-4.f), v);
  x = _mm512_min_ps(_mm512_set1_ps(4.f), x);
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(-2.72614225801306e-10f);
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(2.77068142495902e-08f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-2.10102402082508e-06f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-5.69250639462346e-05f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-7.34990630326855e-04f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-2.95459980854025e-03f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-1.60960333262415e-02f));
  p = _mm512_mul_ps(p, x);
  __m512 q = _mm512_set1_ps(-1.45660718464996e-05f);
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(-2.13374055278905e-04f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(-1.68282697438203e-03f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(-7.37332916720468e-03f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(-1.42647390514189e-02f));
  // p / q as p * (1 / q) by rcp14 and one Newton step (relative error ~2^-23 after it): a zmm division
  // issues at most once per ~16 cycles on these cores, the estimate and its two FMAs in a few.
  // q <= -0.01426 on the clamped range, so the reciprocal never meets 0 or a denormal.
  const __m512 r0 = _mm512_rcp14_ps(q);
  const __m512 r = _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(q, r0, _mm512_set1_ps(1.f)), r0);
  return _mm512_mul_ps(p, r);
}
#endif

// 1 / (1 + exp(-z)).
template <typename V>
inline V vsigmoid(const V& z) {
  using T = typename V::value_type;
  return V(T(1)) / (V(T(1)) + vexp(z.neg()));
}

template <typename V>
inline V gelu_tanh_inner(const V& x) {
  using T = typename V::value_type;
  return V(T(kSqrt2OverPi)) * (x + V(T(kGeluTanhCoeff)) * x * x * x);
}

// GELU-tanh: 0.5 x (1 + tanh(u)) = x * sigmoid(2u), one exp and no cancellation in 1 + tanh(u).
template <Act A, typename V>
inline V act_forward(const V& x) {
  using T = typename V::value_type;
  if constexpr (A == Act::kRelu) {
    return V::blendv(x, V(T(0)), x < V(T(0)));  // keeps NaN, as torch.relu does
  } else if constexpr (A == Act::kSilu) {
    return x / (V(T(1)) + vexp(x.neg()));
  } else if constexpr (A == Act::kGelu) {
    return V(T(0.5)) * x * (V(T(1)) + verf(x * V(T(kSqrt1_2))));
  } else if constexpr (A == Act::kRelu2) {
    const V r = V::blendv(x, V(T(0)), x < V(T(0)));  // NaN stays NaN, as torch.relu(x) ** 2
    return r * r;
  } else if constexpr (std::is_same_v<T, double>) {
    return V(T(0.5)) * x * (V(T(1)) + gelu_tanh_inner(x).tanh());
  } else {
    return x / (V(T(1)) + vexp(V(T(-2)) * gelu_tanh_inner(x)));
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
    const V s = vsigmoid(x);
    return grad * s * (one + x * (one - s));
  } else if constexpr (A == Act::kGelu) {
    const V cdf = V(T(0.5)) * (one + verf(x * V(T(kSqrt1_2))));
    const V pdf = V(T(kInvSqrt2Pi)) * vexp(V(T(-0.5)) * x * x);
    return grad * (cdf + x * pdf);
  } else if constexpr (A == Act::kRelu2) {
    return V::blendv(V(T(2)) * x * grad, V(T(0)), x <= V(T(0)));  // selected like ReLU's: 0 where x <= 0
  } else {
    const V x2 = x * x;
    const V dinner = V(T(kSqrt2OverPi)) * (one + V(T(3.0 * kGeluTanhCoeff)) * x2);
    if constexpr (std::is_same_v<T, double>) {
      const V t = gelu_tanh_inner(x).tanh();
      return grad * (V(T(0.5)) * (one + t) + V(T(0.5)) * x * (one - t * t) * dinner);
    } else {
      // With s = sigmoid(2u): 0.5 (1 + tanh u) = s and 0.5 (1 - tanh^2 u) = 2 s (1 - s).
      const V s = vsigmoid(V(T(2)) * gelu_tanh_inner(x));
      return grad * (s + V(T(2)) * x * s * (one - s) * dinner);
    }
  }
}

template <typename scalar_t>
constexpr bool is_reduced_v = std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>;

template <typename scalar_t>
using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Applies `op(std::array<V, NIN> in) -> std::array<V, NOUT>` elementwise over a (rows, cols) grid.
// Input k's row r starts at in[k] + r * in_row_stride[k]; output rows every out_row_stride elements
// (0: cols, contiguous). Work is split over all rows*cols elements so one long row still uses every
// thread.
template <typename scalar_t, size_t NIN, size_t NOUT, typename Op>
void map_rows(const std::array<const scalar_t*, NIN>& in, const std::array<int64_t, NIN>& in_row_stride,
              const std::array<scalar_t*, NOUT>& out, int64_t rows, int64_t cols, const Op& op,
              int64_t out_row_stride = 0) {
  const int64_t out_stride = out_row_stride > 0 ? out_row_stride : cols;
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
      for (size_t k = 0; k < NOUT; ++k) dst[k] = out[k] + row * out_stride + col;
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
