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
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

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

// Calls f.template operator()<A, HAS_ACT>() for an ember::Act code (Act::kNone = -1: no activation).
template <typename F>
void dispatch_act(int32_t act, F&& f) {
  switch (static_cast<Act>(act)) {
#define EMBER_CASE(member, text) \
  case Act::member: return f.template operator()<Act::member, true>();
    EMBER_FOR_EACH_ACT(EMBER_CASE)
#undef EMBER_CASE
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
                          int8_t* q, float* scale, bool shift128) {
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
        // shift128: store q + 128 as u8 (the VNNI GEMM's u8 x s8 operand); same bits as q ^ 0x80.
        const int8_t flip = shift128 ? int8_t(-128) : int8_t(0);
        if (!std::isfinite(amax)) {
          // NaN/Inf in the row: the row's outputs become NaN (scale NaN), other rows are untouched.
          std::fill(qr, qr + cols, flip);
          scale[r] = std::numeric_limits<float>::quiet_NaN();
          continue;
        }
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        scale[r] = amax / 127.f;
        i = 0;
#if defined(CPU_CAPABILITY_AVX512)
        // cvtps_epi32 rounds half to even (the default MXCSR mode), as torch.round does.
        const __m512 vinv = _mm512_set1_ps(inv);
        const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
        const __m128i vflip = _mm_set1_epi8(flip);
        for (; i + 16 <= cols; i += 16) {
          __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(buf.data() + i), vinv));
          v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + i), _mm_xor_si128(_mm512_cvtepi32_epi8(v), vflip));
        }
#endif
        for (; i < cols; ++i)
          qr[i] = static_cast<int8_t>(static_cast<int8_t>(std::clamp(std::nearbyint(buf[i] * inv), -127.f, 127.f)) ^ flip);
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
          const int32_t* ar = acc + m * N;
          const VF s(sx[m]);
          int64_t i = 0;
          for (; i + kVF <= N; i += kVF) {
            const VF a = at::vec::convert_to_fp_of_same_size<float>(Vectorized<int32_t>::loadu(ar + i));
            (a * s * VF::loadu(sw + i)).store(row.data() + i);
          }
          for (; i < N; ++i) row[i] = static_cast<float>(ar[i]) * sx[m] * sw[i];
          finish_row<A, HAS_ACT>(row.data(), N, bias);
          at::vec::convert<float, T>(row.data(), static_cast<T*>(out) + m * N, N);
        }
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Small-M (decode) GEMMs. Bound by weight bytes at a few rows: each weight row is read once per row
// tile of x (4 rows for W8A8, 8 for W8A16), and the tile's output channels share every x load. On
// AVX-512 the int8 weights are widened in registers (vpmovsxbd + vcvtdq2ps for W8A16; vpmovsxbw + vpmaddwd, int32
// accumulate, for W8A8); elsewhere plain loops the compiler vectorises.
// The loops over a register tile's rows or columns (MB, NB) carry `#pragma GCC unroll 16`: without it
// GCC keeps `acc[MB][NB]` in memory and stores each accumulator to the stack after every FMA. That
// alone made the W8A16 tile 1.2-1.3x slower at 8-16 rows (AVX-512 Xeon, 2 cores). The packed W8A8
// tile's float epilogue is the exception (see w8a8_packed_tile): unrolled, it made the tile slower.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kMaxGemvRows = 16;

#if defined(CPU_CAPABILITY_AVX512)
inline __m512 load_i8_as_f32(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}
#endif

// y[m0 + i, n0 + j] = sum_g sw[n, g] * sum_{k in g} x[m, k] w[n, k] for i < MB, j < NB.
// Per-channel weights (GROUPED false: one group of K) are scaled once, after the horizontal sums. With
// groups the accumulators run across groups and are summed horizontally once, not once per group (the
// per-group sums had made groups of 128 cost 1.6x and of 64 2.1x the per-channel GEMV at 16 rows, 4096 x
// 4096, AVX-512 Xeon, 2 cores). Small tiles (FOLD: the few rows of decode) keep a second set of
// accumulators for the group and fold it in with one FMA by the group's scale at the group's end; larger
// tiles, which have no registers for that, multiply each widened weight vector by its scale instead (NB
// multiplies a k step against MB * NB FMAs). Both leave grouped within 1.0-1.2x per-channel there.
template <int MB, int NB, bool GROUPED>
inline void w8a16_block(const float* x, int64_t K, const int8_t* w, const float* sw, int64_t group, float* y,
                        int64_t N, int64_t m0, int64_t n0) {
  const int64_t groups = K / group;
#if defined(CPU_CAPABILITY_AVX512)
  __m512 acc[MB][NB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  constexpr bool FOLD = GROUPED && MB * NB <= 10;  // 2 * MB * NB accumulators + NB weights fit in 32 zmm
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k0 = g * group, k1 = k0 + group;
    __m512 scale[NB], part[FOLD ? MB : 1][FOLD ? NB : 1];
    // what the k loop adds into: the group's own accumulators when folding, else the running ones
    auto& sum = [&]() -> auto& { if constexpr (FOLD) return part; else return acc; }();
    if constexpr (GROUPED) {
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) scale[j] = _mm512_set1_ps(sw[(n0 + j) * groups + g]);
    }
    if constexpr (FOLD) {
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
        for (int j = 0; j < NB; ++j) part[i][j] = _mm512_setzero_ps();
    }
    for (int64_t k = k0; k < k1; k += 16) {
      const __mmask16 mk = k + 16 <= k1 ? __mmask16(0xFFFF) : __mmask16((1u << (k1 - k)) - 1);
      __m512 wv[NB];
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) {
        wv[j] = load_i8_as_f32(w + (n0 + j) * K + k, mk);
        if constexpr (GROUPED && !FOLD) wv[j] = _mm512_mul_ps(wv[j], scale[j]);
      }
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) {
        const __m512 xv = _mm512_maskz_loadu_ps(mk, x + (m0 + i) * K + k);
#pragma GCC unroll 16
        for (int j = 0; j < NB; ++j) sum[i][j] = _mm512_fmadd_ps(xv, wv[j], sum[i][j]);
      }
    }
    if constexpr (FOLD) {
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
        for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(part[i][j], scale[j], acc[i][j]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) {
      const float dot = _mm512_reduce_add_ps(acc[i][j]);
      y[(m0 + i) * N + n0 + j] = GROUPED ? dot : sw[n0 + j] * dot;
    }
#else
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      const float* xr = x + (m0 + i) * K;
      const int8_t* wr = w + (n0 + j) * K;
      float total = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        float a = 0.f;
        for (int64_t k = g * group; k < (g + 1) * group; ++k) a += xr[k] * static_cast<float>(wr[k]);
        total += sw[(n0 + j) * groups + g] * a;
      }
      y[(m0 + i) * N + n0 + j] = total;
    }
#endif
}

// y[m, n] = sx[m] * sw[n] * sum_k q[m, k] w[n, k] (int32 exact), per-channel weights.
template <int MB, int NB>
inline void w8a8_block(const int8_t* q, int64_t K, const int8_t* w, const float* sx, const float* sw, float* y,
                       int64_t N, int64_t m0, int64_t n0) {
  int32_t dot[MB][NB] = {};
#if defined(CPU_CAPABILITY_AVX512)
  __m512i acc[MB][NB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 mk = k + 32 <= K ? __mmask32(0xFFFFFFFFu) : __mmask32((1ull << (K - k)) - 1);
    __m512i wv[NB];
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mk, w + (n0 + j) * K + k));
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) {
      const __m512i xv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mk, q + (m0 + i) * K + k));
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_add_epi32(acc[i][j], _mm512_madd_epi16(xv, wv[j]));
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) dot[i][j] = _mm512_reduce_add_epi32(acc[i][j]);
#else
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      const int8_t* xr = q + (m0 + i) * K;
      const int8_t* wr = w + (n0 + j) * K;
      int32_t a = 0;
      for (int64_t k = 0; k < K; ++k) a += int32_t(xr[k]) * int32_t(wr[k]);
      dot[i][j] = a;
    }
#endif
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j)
      y[(m0 + i) * N + n0 + j] = static_cast<float>(dot[i][j]) * sx[m0 + i] * sw[n0 + j];
}

#if defined(CPU_CAPABILITY_AVX512)
// The same with AVX512-VNNI's vpdpbusd (u8 x s8, 64 MACs per instruction). qu holds q + 128 as u8, so
// sum qu*w = sum q*w + 128 * sum w; the weight row sums come from a second vpdpbusd against ones,
// shared by the MB rows. Compiled for VNNI by attribute; called only when the CPU has it.
template <int MB, int NB>
__attribute__((target("avx512vnni"), noinline)) void w8a8_block_vnni(const uint8_t* qu, int64_t K, const int8_t* w,
                                                                      const float* sx, const float* sw, float* y,
                                                                      int64_t N, int64_t m0, int64_t n0) {
  __m512i acc[MB][NB], wsum[NB];
#pragma GCC unroll 16
  for (int j = 0; j < NB; ++j) wsum[j] = _mm512_setzero_si512();
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_si512();
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mk = k + 64 <= K ? ~__mmask64(0) : ((__mmask64(1) << (K - k)) - 1);
    __m512i wv[NB];
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) {
      wv[j] = _mm512_maskz_loadu_epi8(mk, w + (n0 + j) * K + k);
      wsum[j] = _mm512_dpbusd_epi32(wsum[j], ones, wv[j]);
    }
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) {
      const __m512i xv = _mm512_maskz_loadu_epi8(mk, qu + (m0 + i) * K + k);
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xv, wv[j]);
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < NB; ++j) {
    const int32_t corr = 128 * _mm512_reduce_add_epi32(wsum[j]);
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i)
      y[(m0 + i) * N + n0 + j] =
          static_cast<float>(_mm512_reduce_add_epi32(acc[i][j]) - corr) * sx[m0 + i] * sw[n0 + j];
  }
}

// W8A8 GEMM on the packed weight (int8_linear's `w_packed`, made by ember_C::int8_prepack, whose
// comment in cpu/int8.cpp is the layout's description): wp[N / 16][K / 4][16][4] int8 tiles, then
// corr[G][N] int32. vpdpbusd takes each 64-byte line against 4 activation bytes broadcast to all
// lanes, so the 16 lanes of an accumulator are 16 finished dot products (no horizontal sums, no int32
// product in memory). Activations are u8 (q + 128, written so by the quantize pass); corr removes the
// 128 * sum_k w that shift adds. An MB x NB tile keeps MB * NB
// accumulators in registers (6 x 4 = 24 of the 32 zmm) and writes fp32 y = (acc - corr) sx sw + bias
// (rows every ldy floats; bias may be null).

// acc[i][j] += the dot products of k4 steps [k4_begin, k4_end) for the tile's rows and 16-channel blocks.
template <int MB, int NB>
__attribute__((target("avx512vnni"), always_inline)) inline void packed_dots(__m512i (&acc)[MB][NB], const uint8_t* xr,
                                                                              int64_t K, const int8_t* wb, int64_t K4,
                                                                              int64_t k4_begin, int64_t k4_end) {
  for (int64_t k4 = k4_begin; k4 < k4_end; ++k4) {
    __m512i wv[NB];
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_loadu_si512(wb + (j * K4 + k4) * 64);
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) {
      int32_t xq;
      std::memcpy(&xq, xr + i * K + 4 * k4, 4);
      const __m512i xb = _mm512_set1_epi32(xq);
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xb, wv[j]);
    }
  }
}

template <int MB, int NB>
__attribute__((target("avx512vnni"), noinline)) void w8a8_packed_tile(const uint8_t* qu, int64_t K, const int8_t* wp,
                                                                       const int32_t* corr, const float* sx,
                                                                       const float* sw, const float* bias, float* y,
                                                                       int64_t ldy, int64_t m0, int64_t b0) {
  const int64_t K4 = K / 4;
  __m512i acc[MB][NB];
  // Fully unrolled so that every acc[i][j] lives in its own register.
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_si512();
  packed_dots<MB, NB>(acc, qu + m0 * K, K, wp + b0 * K4 * 64, K4, 0, K4);
  // The products leave the registers through a small int32 buffer: reading acc[][] in the float
  // epilogue directly made GCC keep the whole array on the stack and store it every step (half speed).
  alignas(64) int32_t dots[MB][NB * 16];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) _mm512_store_si512(dots[i] + j * 16, acc[i][j]);
  for (int i = 0; i < MB; ++i) {
    const __m512 sxi = _mm512_set1_ps(sx[m0 + i]);
    for (int j = 0; j < NB; ++j) {
      const __m512i d = _mm512_sub_epi32(_mm512_load_si512(dots[i] + j * 16), _mm512_loadu_si512(corr + (b0 + j) * 16));
      const __m512 s = _mm512_loadu_ps(sw + (b0 + j) * 16);
      __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), s), sxi);
      if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + (b0 + j) * 16));
      _mm512_storeu_ps(y + i * ldy + j * 16, v);
    }
  }
}

inline bool has_vnni() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni");
  }();
  return yes;
}
#endif

// Runs `block.template operator()<MB, NB>(m0, n0)` over the (M, N) grid in ROWS x COLS tiles where they
// fit (then 4-, 2- and 1-row tiles, and 1-channel ones), parallel over output channels.
template <int ROWS = 4, int COLS = 4, typename B>
inline void gemv_grid(int64_t M, int64_t N, const B& block) {
  auto rows = [&]<int NB>(int64_t n0) {
    int64_t m0 = 0;
    for (; m0 + ROWS <= M; m0 += ROWS) block.template operator()<ROWS, NB>(m0, n0);
    if constexpr (ROWS > 4) {
      if (m0 + 4 <= M) {
        block.template operator()<4, NB>(m0, n0);
        m0 += 4;
      }
    }
    switch (M - m0) {
      case 3: block.template operator()<3, NB>(m0, n0); break;
      case 2: block.template operator()<2, NB>(m0, n0); break;
      case 1: block.template operator()<1, NB>(m0, n0); break;
      default: break;
    }
  };
  at::parallel_for(0, (N + COLS - 1) / COLS, std::max(1, 32 / COLS), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * COLS;
      if (n0 + COLS <= N) {
        rows.template operator()<COLS>(n0);
      } else {
        for (int64_t n = n0; n < N; ++n) rows.template operator()<1>(n);
      }
    }
  });
}

// out[m] = act(yf[m] + bias) in T, row by row (16-row chunks in parallel: decode's few rows stay on the
// calling thread). yf may be out itself for an fp32 out: the rows are then finished in place.
template <typename T>
inline void store_rows(float* yf, void* out, int64_t M, int64_t N, const float* bias, DType, int32_t act) {
  dispatch_act(act, [&]<Act A, bool HAS_ACT>() {
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        finish_row<A, HAS_ACT>(yf + m * N, N, bias);
        if (static_cast<void*>(yf) != out) at::vec::convert<float, T>(yf + m * N, static_cast<T*>(out) + m * N, N);
      }
    });
  });
}

// Weight-only GEMM for M <= 16. x: (M, K) rows every ldx elements; w: (N, K) int8; sw: (N, K / group)
// fp32; group divides K and is a multiple of 16 unless it equals K.
inline void w8a16_gemv(const void* x, int64_t ldx, const int8_t* w, const float* sw, const float* bias, void* out,
                       int64_t M, int64_t N, int64_t K, int64_t group, DType dtype, int32_t act) {
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    std::vector<float> xf(M * K), yf(M * N);
    for (int64_t m = 0; m < M; ++m) row_to_float(static_cast<const T*>(x) + m * ldx, K, nullptr, xf.data() + m * K);
    // The tile follows M: each widened weight vector (two uops on the FMA ports) feeds MB FMAs, and
    // NB channels give NB independent weight streams and accumulator chains where rows are few.
    // Against one 8 x 3 grid for every M, median of interleaved calls (AVX-512 Xeon, 2 cores):
    // 2 x 8 tiles 1.08-1.12x at M = 1-2, 4 x 5 tiles 1.10-1.14x at M = 3-7; 8 x 3 stays best from 8.
    const auto run = [&]<bool GROUPED>() {
      const auto block = [&]<int MB, int NB>(int64_t m0, int64_t n0) {
        w8a16_block<MB, NB, GROUPED>(xf.data(), K, w, sw, group, yf.data(), N, m0, n0);
      };
      if (M <= 2)
        gemv_grid<2, 8>(M, N, block);
      else if (M < 8)
        gemv_grid<4, 5>(M, N, block);
      else
        gemv_grid<8, 3>(M, N, block);
    };
    if (group == K)
      run.template operator()<false>();
    else
      run.template operator()<true>();
    store_rows<T>(yf.data(), out, M, N, bias, dtype, act);
  });
}

// Dynamic W8A8 for M <= 16: the quantized rows q (M, K) with scales sx, per-channel int8 weights.
inline void w8a8_gemv(const int8_t* q, const float* sx, const int8_t* w, const float* sw, const float* bias, void* out,
                      int64_t M, int64_t N, int64_t K, DType dtype, int32_t act) {
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    std::vector<float> yf(M * N);
#if defined(CPU_CAPABILITY_AVX512)
    if (has_vnni()) {
      std::vector<uint8_t> qu(M * K);
      for (int64_t i = 0; i < M * K; ++i) qu[i] = static_cast<uint8_t>(q[i] + 128);
      gemv_grid(M, N, [&]<int MB, int NB>(int64_t m0, int64_t n0) {
        w8a8_block_vnni<MB, NB>(qu.data(), K, w, sx, sw, yf.data(), N, m0, n0);
      });
      store_rows<T>(yf.data(), out, M, N, bias, dtype, act);
      return;
    }
#endif
    gemv_grid(M, N, [&]<int MB, int NB>(int64_t m0, int64_t n0) {
      w8a8_block<MB, NB>(q, K, w, sx, sw, yf.data(), N, m0, n0);
    });
    store_rows<T>(yf.data(), out, M, N, bias, dtype, act);
  });
}

// Calls f.template operator()<C>() for the run-time count c in [1, MAX].
template <int MAX, typename F>
inline void with_count(int64_t c, F&& f) {
  if (c == MAX) return f.template operator()<MAX>();
  if constexpr (MAX > 1) with_count<MAX - 1>(c, f);
}

// The same with one weight scale per (channel, group of K / G inputs): each group's int32 dots are
// finished in registers, converted, scaled by sw_t[g][n] and summed into fp32 accumulators that stay in
// registers too; the per-row activation scale, bias and output come last. sw_t is the (G, N) transpose of
// the (N, G) scales. Int32 and fp32 accumulators together need twice the registers, so a tile runs
// at most 3 rows at a time (3 x 4 x 2 = 24 of the 32 zmm).
template <int MB, int NB>
__attribute__((target("avx512vnni"), noinline)) void w8a8_packed_rows_grouped(
    const uint8_t* qu, int64_t K, int64_t N, int64_t G, const int8_t* wp, const int32_t* corr, const float* sx,
    const float* sw_t, const float* bias, float* y, int64_t ldy, int64_t m0, int64_t b0) {
  const int64_t K4 = K / 4, g4 = K4 / G;
  const uint8_t* xr = qu + m0 * K;
  const int8_t* wb = wp + b0 * K4 * 64;
  __m512 sum[MB][NB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) sum[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc[MB][NB];
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_si512();
    packed_dots<MB, NB>(acc, xr, K, wb, K4, g * g4, (g + 1) * g4);
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) {
      const __m512i cg = _mm512_loadu_si512(corr + g * N + (b0 + j) * 16);
      const __m512 sg = _mm512_loadu_ps(sw_t + g * N + (b0 + j) * 16);
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i)
        sum[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j], cg)), sg, sum[i][j]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i) {
    const __m512 sxi = _mm512_set1_ps(sx[m0 + i]);
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) {
      __m512 v = _mm512_mul_ps(sum[i][j], sxi);
      if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + (b0 + j) * 16));
      _mm512_storeu_ps(y + i * ldy + j * 16, v);
    }
  }
}

template <int MB, int NB>
inline void w8a8_packed_tile_grouped(const uint8_t* qu, int64_t K, int64_t N, int64_t G, const int8_t* wp,
                                     const int32_t* corr, const float* sx, const float* sw_t, const float* bias,
                                     float* y, int64_t ldy, int64_t m0, int64_t b0) {
  if constexpr (MB > 3) {
    w8a8_packed_rows_grouped<3, NB>(qu, K, N, G, wp, corr, sx, sw_t, bias, y, ldy, m0, b0);
    w8a8_packed_rows_grouped<MB - 3, NB>(qu, K, N, G, wp, corr, sx, sw_t, bias, y + 3 * ldy, ldy, m0 + 3, b0);
  } else {
    w8a8_packed_rows_grouped<MB, NB>(qu, K, N, G, wp, corr, sx, sw_t, bias, y, ldy, m0, b0);
  }
}

// W8A8 for any M on the packed weight (see w8a8_packed_tile); qu is the quantized x as u8 (q + 128),
// (M, K) contiguous. Returns false (nothing done) when this build or CPU has no VNNI kernel, or the
// shape has no packed form (!w8a8_packable; the caller falls back to ATen's int8 GEMM).
// Work split: rows in chunks whose u8 activations fit in half of L2 (<= 128 KiB), output channels in
// panels of 64; one task = one (chunk, panel), run chunk-major so a thread walks every panel of its
// chunk while the chunk stays in cache, and each panel (64 x K bytes) is reused by the chunk's
// 6-row tiles (6 x 4 measured ahead of 8 x 3 and 12 x 2 here; 1 thread reaches ~75% of the 3.6 G
// vpdpbusd/s this core sustains in a register-only loop). The epilogue (bias, activation, output
// dtype) runs on each finished tile while it is in L1, so nothing of size M x N but the output is written.
// groups > 1: sw is the (groups, N) transposed per-group scale and wp carries one corr row per group.
inline bool w8a8_gemm_packed(const uint8_t* qu, const float* sx, const int8_t* wp, const float* sw, const float* bias,
                             void* out, int64_t M, int64_t N, int64_t K, int64_t groups, DType dtype, int32_t act) {
#if defined(CPU_CAPABILITY_AVX512)
  if (!has_vnni() || !w8a8_packable(N, K, groups)) return false;
  const int32_t* corr = reinterpret_cast<const int32_t*>(wp + N * K);
  constexpr int MR = 6, NBMAX = 4, PANEL = NBMAX * 16;
  const int64_t blocks = N / 16, panels = (blocks + NBMAX - 1) / NBMAX;
  // Chunks of about equal size, each up to 1.25x the cache budget: cutting at the budget itself left
  // a sliver (M = 128, K = 1024: 126 rows + 2) that streamed every panel again for two rows.
  const int64_t budget_rows = std::max<int64_t>(MR, int64_t(128) * 1024 / K);
  const int64_t chunks = std::max<int64_t>(1, (4 * M + 5 * budget_rows - 1) / (5 * budget_rows));
  const int64_t chunk = ((M + chunks - 1) / chunks + MR - 1) / MR * MR;
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_act(act, [&]<Act A, bool HAS_ACT>() {
      at::parallel_for(0, chunks * panels, 1, [&](int64_t t0, int64_t t1) {
        alignas(64) float tile[MR * PANEL];
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t c = t / panels, p = t % panels;
          const int64_t b0 = p * NBMAX, nb = std::min<int64_t>(NBMAX, blocks - b0), n0 = b0 * 16;
          const int64_t m_end = std::min(M, (c + 1) * chunk);
          for (int64_t m0 = c * chunk; m0 < m_end; m0 += MR) {
            const int64_t mb = std::min<int64_t>(MR, m_end - m0);
            // fp32 output without activation: the tile writes the output rows itself; otherwise a
            // 6 x 64 fp32 tile in L1 gets the activation and the conversion to T.
            constexpr bool direct = std::is_same_v<T, float> && !HAS_ACT;
            float* y = direct ? reinterpret_cast<float*>(out) + m0 * N + n0 : tile;
            const int64_t ldy = direct ? N : PANEL;
            auto run = [&]<int MB>() {
              with_count<NBMAX>(nb, [&]<int NB>() {
                if (groups == 1)
                  w8a8_packed_tile<MB, NB>(qu, K, wp, corr, sx, sw, bias, y, ldy, m0, b0);
                else
                  w8a8_packed_tile_grouped<MB, NB>(qu, K, N, groups, wp, corr, sx, sw, bias, y, ldy, m0, b0);
              });
            };
            with_count<MR>(mb, run);
            if constexpr (!direct) {
              for (int64_t i = 0; i < mb; ++i) {
                float* yr = tile + i * PANEL;
                finish_row<A, HAS_ACT>(yr, nb * 16, nullptr);
                at::vec::convert<float, T>(yr, static_cast<T*>(out) + (m0 + i) * N + n0, nb * 16);
              }
            }
          }
        }
      });
    });
  });
  return true;
#else
  (void)qu, (void)sx, (void)wp, (void)sw, (void)bias, (void)out, (void)M, (void)N, (void)K, (void)groups, (void)dtype,
      (void)act;
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------
// Weight-only GEMM for 12 to 160 rows (short prefills, batched decode) on AVX-512 without AMX.
// The fallback it replaces dequantised the whole weight to an fp32 copy (4 bytes a weight, written to
// and read back from memory) for ATen's GEMM; from 17 rows up to a few hundred that copy cost more than
// the GEMM (0.57-0.89x fp32 nn.Linear at M = 17-128, Xeon, 2 cores). Here each weight is widened once a
// call, 24 channels x 128 k at a time, into a 12 KB panel that stays in L1, and the int8 weight is the
// only copy read from memory.
// The vector lanes run over 16 rows of x, not over k as in the GEMV: x is packed transposed once a call
// (xt, 16-row blocks of [k][16]), each panel weight is broadcast from L1 as the FMA's memory operand, and
// the accumulators hold finished dot products, with no horizontal sums. Register tiles: 24 channels x 16
// rows, or 12 channels x 32 rows (24 accumulators either way). The k loop has no vector tail (one k a
// step), so any K works; the panel's K tail is masked and its missing channels are zeros, never stored.
// Rows are padded with zeros to whole 16-row blocks (a tail of up to 4 rows goes to the GEMV instead): a
// NaN or Inf in x stays in its row's lane.
// ---------------------------------------------------------------------------------------------
constexpr int kW8A16PanelChannels = 24;
constexpr int64_t kW8A16PanelK = 128;
// The rows it takes, from interleaved runs against the GEMV below it and against the dequantised copy +
// ATen's GEMM above it (Xeon, 2 cores; 4096 x 4096, 1024 x 2816, 768 x 3072, 2816 x 1024):
// - at 12 rows level with the GEMV, at 16 rows 1.2-1.5x faster (one 16-row block costs the same from
//   1 to 16 rows, so below 12 the GEMV, which costs by the row, is faster);
// - 1.44-2.2x the old path at 17-32 rows, 1.17-1.64x at 64, 1.13-1.33x at 128; at 192 one shape
//   (K 2816 -> 1024) is 0.9x, and at 512 all are 0.8-0.9x: ATen's fp32 GEMM runs at 85-90% of the FMA
//   peak there, against 60-80% here, and the dequantised copy is a small part of its time.
constexpr int64_t kW8A16GemmMinRows = 12;
constexpr int64_t kW8A16GemmMaxRows = 160;
constexpr int64_t kW8A16GemmGemvTailRows = 4;

#if defined(CPU_CAPABILITY_AVX512)
// acc[j * 16 + v * acc_block] for channel j, 16-row block v: the partial sums of the finished k chunks.
template <int MV, int NR>
inline void w8a16_rows_tile(const float* xt, int64_t xt_block, int64_t kc, const float* wp, float* acc,
                            int64_t acc_block, bool first) {
  __m512 c[NR][MV];
#pragma GCC unroll 32
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 2
    for (int v = 0; v < MV; ++v) c[j][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + j * 16 + v * acc_block);
  for (int64_t k = 0; k < kc; ++k) {
    __m512 xv[MV];
#pragma GCC unroll 2
    for (int v = 0; v < MV; ++v) xv[v] = _mm512_loadu_ps(xt + v * xt_block + k * 16);
#pragma GCC unroll 32
    for (int j = 0; j < NR; ++j) {
      const __m512 b = _mm512_set1_ps(wp[j * kW8A16PanelK + k]);
#pragma GCC unroll 2
      for (int v = 0; v < MV; ++v) c[j][v] = _mm512_fmadd_ps(xv[v], b, c[j][v]);
    }
  }
#pragma GCC unroll 32
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 2
    for (int v = 0; v < MV; ++v) _mm512_storeu_ps(acc + j * 16 + v * acc_block, c[j][v]);
}

// wp[j][k] = w[n0 + j, k0 + k] * its scale for j < channels (zeros beyond), k < kc.
inline void w8a16_widen_panel(const int8_t* w, const float* sw, int64_t K, int64_t group, int64_t n0,
                              int64_t channels, int64_t k0, int64_t kc, float* wp) {
  const int64_t groups = K / group;
  for (int64_t j = 0; j < kW8A16PanelChannels; ++j) {
    float* dst = wp + j * kW8A16PanelK;
    if (j >= channels) {
      std::memset(dst, 0, sizeof(float) * kc);
      continue;
    }
    const int8_t* src = w + (n0 + j) * K + k0;
    const float* scale = sw + (n0 + j) * groups;
    for (int64_t k = 0; k < kc; k += 16) {
      const __mmask16 mk = k + 16 <= kc ? __mmask16(0xFFFF) : __mmask16((1u << (kc - k)) - 1);
      // a 16-k run lies in one group: group is K or a multiple of 16, and k0 one of kW8A16PanelK
      const __m512 s = _mm512_set1_ps(scale[groups == 1 ? 0 : (k0 + k) / group]);
      _mm512_mask_storeu_ps(dst + k, mk, _mm512_mul_ps(load_i8_as_f32(src + k, mk), s));
    }
  }
}
#endif

// Same contract as w8a16_gemv, for kW8A16GemmMinRows <= M <= kW8A16GemmMaxRows; group is K or a multiple
// of 16. Returns false (nothing done) outside those, without AVX-512, or for an fp64 x (which keeps its
// float64 GEMM).
inline bool w8a16_gemm(const void* x, int64_t ldx, const int8_t* w, const float* sw, const float* bias, void* out,
                       int64_t M, int64_t N, int64_t K, int64_t group, DType dtype, int32_t act, int32_t) {
#if defined(CPU_CAPABILITY_AVX512)
  if (dtype == DType::kFloat64 || M <= 0 || N <= 0 || K <= 0 || !(group == K || group % 16 == 0)) return false;
  if (M < kW8A16GemmMinRows || M > kW8A16GemmMaxRows) return false;
  // A CPU with a native bf16 / fp16 dot product (Zen 4's AVX512-BF16, say) keeps ATen's 16-bit GEMM for
  // such an x past the GEMV's rows, as before: this fp32 kernel has not been measured against it.
  if (M > kMaxGemvRows && dtype != DType::kFloat32 && native_16bit_gemm(dtype)) return false;
  // A few rows past whole 16-row blocks go to the GEMV, which costs by the row, rather than into a
  // zero-padded block that costs as much as 16: interleaved, 1.2-1.45x at 17-20 and 33-36 rows (tails
  // 1-4), level at 22 and 24 (Xeon, 2 cores, the four layer shapes above).
  const int64_t tail = M % 16;
  if (M > 16 && tail > 0 && tail <= kW8A16GemmGemvTailRows) {
    const int64_t rows = M - tail, elem = dtype == DType::kFloat32 ? 4 : 2;
    w8a16_gemm(x, ldx, w, sw, bias, out, rows, N, K, group, dtype, act, 0);
    w8a16_gemv(static_cast<const char*>(x) + rows * ldx * elem, ldx, w, sw, bias, static_cast<char*>(out) + rows * N * elem,
               tail, N, K, group, dtype, act);
    return true;
  }
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t blocks = (M + 15) / 16, xt_block = K * 16;
    // Neither buffer is zero-filled first (a pass over each): every element is written below. An fp32
    // out takes the dot products directly, and store_rows finishes them in place.
    std::unique_ptr<float[]> xt(new float[blocks * xt_block]), yf_buffer;
    float* yf = static_cast<float*>(out);
    if constexpr (!std::is_same_v<T, float>) {
      yf_buffer.reset(new float[M * N]);
      yf = yf_buffer.get();
    }
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> row(K);
      for (int64_t b = b0; b < b1; ++b) {
        float* dst = xt.get() + b * xt_block;
        for (int64_t i = 0; i < 16; ++i) {
          const int64_t m = b * 16 + i;
          if (m < M)
            row_to_float(static_cast<const T*>(x) + m * ldx, K, nullptr, row.data());
          else
            std::fill(row.begin(), row.end(), 0.f);
          for (int64_t k = 0; k < K; ++k) dst[k * 16 + i] = row[k];
        }
      }
    });
    constexpr int64_t P = kW8A16PanelChannels, acc_block = P * 16;
    const int64_t panels = (N + P - 1) / P;
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> wp(P * kW8A16PanelK), acc(blocks * acc_block);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * P, channels = std::min(P, N - n0);
        for (int64_t k0 = 0; k0 < K; k0 += kW8A16PanelK) {
          const int64_t kc = std::min(kW8A16PanelK, K - k0);
          w8a16_widen_panel(w, sw, K, group, n0, channels, k0, kc, wp.data());
          const float* xk = xt.get() + k0 * 16;
          int64_t b = 0;
          for (; b + 2 <= blocks; b += 2)
            for (int64_t j0 = 0; j0 < P; j0 += 12)
              w8a16_rows_tile<2, 12>(xk + b * xt_block, xt_block, kc, wp.data() + j0 * kW8A16PanelK,
                                     acc.data() + b * acc_block + j0 * 16, acc_block, k0 == 0);
          if (b < blocks)
            w8a16_rows_tile<1, 24>(xk + b * xt_block, xt_block, kc, wp.data(), acc.data() + b * acc_block, acc_block,
                                   k0 == 0);
        }
        for (int64_t b = 0; b < blocks; ++b)
          for (int64_t i = 0; i < 16 && b * 16 + i < M; ++i)
            for (int64_t j = 0; j < channels; ++j) yf[(b * 16 + i) * N + n0 + j] = acc[b * acc_block + j * 16 + i];
      }
    });
    store_rows<T>(yf, out, M, N, bias, dtype, act);
  });
  return true;
#else
  (void)x, (void)ldx, (void)w, (void)sw, (void)bias, (void)out, (void)M, (void)N, (void)K, (void)group, (void)dtype,
      (void)act;
  return false;
#endif
}

}  // namespace ember::cpu::EMBER_ISA
