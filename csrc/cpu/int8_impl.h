// Int8 inference kernels (bodies), compiled once per ISA through kernels_impl.h.
//
//   quantize_rows     symmetric per-row (per-token) int8: one pass for the row's absmax, one pass to
//                     scale, round (half to even, as torch.round) and store; optional per-channel
//                     multiply first (SmoothQuant's 1/s applied to activations).
//   dequant_epilogue  y = act(acc[m,n] * sx[m] * sw[n] + bias[n]) from the int32 GEMM result, written
//                     straight in the output dtype: the int32 tensor is read once, nothing else made.
//   w8a16_gemv        y = act(sum_g sw[n,g] * sum_{k in g} x[m,k] w[n,k] + bias[n]) for small M (decode):
//                     int8 weights are widened in registers, never dequantised into memory, so the
//                     kernel streams 1 byte per weight instead of 2 (bf16) or 4 (fp32).
// The int8 x int8 -> int32 GEMM itself is ATen's (oneDNN, VNNI / AMX where the CPU has them).
#pragma once
#include <cmath>
#include <vector>

namespace ember::cpu::EMBER_ISA {

template <typename F>
void dispatch_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(c10::Half{});
    case DType::kBFloat16: return f(c10::BFloat16{});
  }
}

// Calls f.template operator()<A, HAS_ACT>() for act code (-1 = none, else ember::Act).
template <typename F>
void dispatch_act(int32_t act, F&& f) {
  switch (act) {
    case 0: return f.template operator()<Act::kRelu, true>();
    case 1: return f.template operator()<Act::kSilu, true>();
    case 2: return f.template operator()<Act::kGelu, true>();
    case 3: return f.template operator()<Act::kGeluTanh, true>();
    default: return f.template operator()<Act::kRelu, false>();
  }
}

using VF = Vectorized<float>;
constexpr int64_t kVF = VF::size();

// Row r of `x` (row stride `ld`) into fp32 `dst` (cols floats), times `mul` when given.
template <typename T>
inline void row_to_float(const T* x, int64_t cols, const float* mul, float* dst) {
  at::vec::convert<T, float>(x, dst, cols);
  if (mul) {
    int64_t i = 0;
    for (; i + kVF <= cols; i += kVF) (VF::loadu(dst + i) * VF::loadu(mul + i)).store(dst + i);
    for (; i < cols; ++i) dst[i] *= mul[i];
  }
}

inline void quantize_rows(const void* x, int64_t rows, int64_t cols, int64_t ld, DType dtype, const float* mul,
                          int8_t* q, float* scale) {
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)), [&](int64_t r0, int64_t r1) {
      std::vector<float> buf(cols);
      for (int64_t r = r0; r < r1; ++r) {
        row_to_float(xp + r * ld, cols, mul, buf.data());
        // absmax; NaN anywhere must poison the row (max() would drop it), so track finiteness too.
        VF vmax(0.f);
        int64_t i = 0;
        for (; i + kVF <= cols; i += kVF) vmax = at::vec::maximum(vmax, VF::loadu(buf.data() + i).abs());
        float amax = at::vec::vec_reduce_all<float>([](VF& a, VF& b) { return at::vec::maximum(a, b); }, vmax);
        for (; i < cols; ++i) amax = std::isnan(buf[i]) ? buf[i] : std::max(amax, std::abs(buf[i]));
        int8_t* qr = q + r * cols;
        if (!std::isfinite(amax)) {
          // NaN/Inf in the row: the row's outputs become NaN (scale NaN), other rows are untouched.
          std::fill(qr, qr + cols, int8_t(0));
          scale[r] = std::numeric_limits<float>::quiet_NaN();
          continue;
        }
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        scale[r] = amax / 127.f;
        const VF vinv(inv), lo(-127.f), hi(127.f);
        i = 0;
        alignas(64) int32_t tmp[kVF];
        for (; i + kVF <= cols; i += kVF) {
          const VF v = at::vec::clamp((VF::loadu(buf.data() + i) * vinv).round(), lo, hi);
          alignas(64) float f[kVF];
          v.store(f);
          for (int64_t j = 0; j < kVF; ++j) tmp[j] = static_cast<int32_t>(f[j]);
          for (int64_t j = 0; j < kVF; ++j) qr[i + j] = static_cast<int8_t>(tmp[j]);
        }
        for (; i < cols; ++i)
          qr[i] = static_cast<int8_t>(std::clamp(std::nearbyint(buf[i] * inv), -127.f, 127.f));
      }
    });
  });
}

// Applies bias and the activation to an fp32 row in place.
template <Act A, bool HAS_ACT>
inline void finish_row(float* y, int64_t n, const float* bias) {
  int64_t i = 0;
  for (; i + kVF <= n; i += kVF) {
    VF v = VF::loadu(y + i);
    if (bias) v = v + VF::loadu(bias + i);
    if constexpr (HAS_ACT) v = act_forward<A>(v);
    v.store(y + i);
  }
  if (i < n) {
    const int c = static_cast<int>(n - i);
    VF v = VF::loadu(y + i, c);
    if (bias) v = v + VF::loadu(bias + i, c);
    if constexpr (HAS_ACT) v = act_forward<A>(v);
    v.store(y + i, c);
  }
}

inline void dequant_epilogue(const int32_t* acc, const float* sx, const float* sw, const float* bias, void* out,
                             int64_t M, int64_t N, DType dtype, int32_t act) {
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_act(act, [&]<Act A, bool HAS_ACT>() {
      at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t m0, int64_t m1) {
        std::vector<float> row(N);
        for (int64_t m = m0; m < m1; ++m) {
          at::vec::convert<int32_t, float>(acc + m * N, row.data(), N);
          const VF s(sx[m]);
          int64_t i = 0;
          for (; i + kVF <= N; i += kVF) (VF::loadu(row.data() + i) * s * VF::loadu(sw + i)).store(row.data() + i);
          for (; i < N; ++i) row[i] = row[i] * sx[m] * sw[i];
          finish_row<A, HAS_ACT>(row.data(), N, bias);
          at::vec::convert<float, T>(row.data(), static_cast<T*>(out) + m * N, N);
        }
      });
    });
  });
}

// Small-M weight-only GEMM. x: (M, K) with row stride ldx, w: (N, K) int8, sw: (N, K / group) fp32,
// group divides K and is a multiple of the vector width unless it equals K.
constexpr int64_t kMaxGemvRows = 16;

inline void w8a16_gemv(const void* x, int64_t ldx, const int8_t* w, const float* sw, const float* bias, void* out,
                       int64_t M, int64_t N, int64_t K, int64_t group, DType dtype, int32_t act) {
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_act(act, [&]<Act A, bool HAS_ACT>() {
      std::vector<float> xf(M * K);
      for (int64_t m = 0; m < M; ++m) row_to_float(static_cast<const T*>(x) + m * ldx, K, nullptr, xf.data() + m * K);
      const int64_t groups = K / group;
      std::vector<float> yf(M * N);
      // Work split over output channels; 16 channels per task keeps one task's weight rows in L1/L2.
      at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        alignas(64) float wv[kVF];
        for (int64_t n = n0; n < n1; ++n) {
          const int8_t* wr = w + n * K;
          float total[kMaxGemvRows] = {0.f};
          for (int64_t g = 0; g < groups; ++g) {
            VF acc[kMaxGemvRows];
            for (int64_t m = 0; m < M; ++m) acc[m] = VF(0.f);
            const int64_t k0 = g * group, k1 = k0 + group;
            int64_t k = k0;
            for (; k + kVF <= k1; k += kVF) {
              for (int64_t j = 0; j < kVF; ++j) wv[j] = static_cast<float>(wr[k + j]);  // vpmovsxbd + cvt
              const VF wk = VF::loadu(wv);
              for (int64_t m = 0; m < M; ++m) acc[m] = at::vec::fmadd(VF::loadu(xf.data() + m * K + k), wk, acc[m]);
            }
            float tail[kMaxGemvRows] = {0.f};
            for (; k < k1; ++k)
              for (int64_t m = 0; m < M; ++m) tail[m] += xf[m * K + k] * static_cast<float>(wr[k]);
            const float s = sw[n * groups + g];
            for (int64_t m = 0; m < M; ++m)
              total[m] += s * (at::vec::vec_reduce_all<float>(std::plus<VF>(), acc[m]) + tail[m]);
          }
          for (int64_t m = 0; m < M; ++m) yf[m * N + n] = total[m];
        }
      });
      for (int64_t m = 0; m < M; ++m) {
        finish_row<A, HAS_ACT>(yf.data() + m * N, N, bias);
        at::vec::convert<float, T>(yf.data() + m * N, static_cast<T*>(out) + m * N, N);
      }
    });
  });
}

}  // namespace ember::cpu::EMBER_ISA
