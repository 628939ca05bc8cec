// AMX build of the int8 kernels: the AVX-512 table (cpu/isa_avx512.cpp) with its W8A8 and W8A16 GEMMs
// run on the AMX tile unit (TMUL: one 16 x 16 x 64 int8 or 16 x 16 x 32 bf16 tile product per
// instruction, 8x the int8 MACs per cycle of AVX512-VNNI). dispatch.cpp picks this table only after
// the CPU reported AMX and Linux granted the tile state (arch_prctl), so nothing here runs elsewhere.
//
// The target pragma is the AVX-512 unit's plus the three AMX features and nothing else: the compiler
// never emits tile instructions on its own, so ATen's inline vector code compiled here is the same as
// in isa_avx512.cpp. It also lives in its own inline namespace (CPU_CAPABILITY=AMX below), so the
// linker cannot swap one unit's copy of an ATen inline function for the other's.
//
// Both GEMMs use one tile shape for everything (16 rows x 64 bytes: the palette's largest) and a
// 32 x 32 output block in four accumulator tiles (tmm0-3: rows 0-15 / 16-31 x columns 0-15 / 16-31),
// with two A tiles (tmm4-5, the block's two 16-row halves) and two B tiles (tmm6-7, its two 16-column
// halves): every A and B tile loaded is used twice, the most the 8 tile registers allow.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,amx-tile,amx-int8,amx-bf16")
// As in isa_avx512.cpp: GCC's C++ front end does not define the ISA macros for a target pragma.
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AMX
#define CPU_CAPABILITY_AVX512
#define EMBER_ISA amx
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/vec_activation.h"
#include "cpu/int8_impl.h"

namespace ember::cpu {
namespace amx {
namespace {

// LDTILECFG's 64-byte operand (palette 1): bytes per row and rows of each of the 16 tile slots.
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every tile this unit uses is 16 x 64 bytes: int8 A (16 rows x 64 k), int8 B (16 k-quads x 16
// columns x 4), int32 / fp32 C (16 x 16), bf16 A (16 x 32 k) and bf16 B (16 k-pairs x 16 x 2). The
// configuration is per thread: each parallel task loads it and releases the tiles when done.
struct TileScope {
  TileScope() {
    TileConfig cfg{};
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = 64;
      cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
  }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

constexpr int64_t kBlockM = 32, kBlockN = 32;
// W8A16 on AMX from 3 rows up for an x taken as one bf16 part, 5 for two or three parts (that many
// tile products); fewer rows stay on the AVX-512 GEMV, which streams the int8 weight at memory speed
// with FMAs to spare. Measured at 4096 x 11008 (Intel Xeon, 2 cores): GEMV 5.3 / 6.1 / 11.2 ms at M =
// 1 / 2 / 4, the tile kernel 8.5 / 9.5 / 7.4 ms (bf16 x) and 11.7 ms (fp32 x, M = 4); the GEMV's cost
// grows with M, the tile kernel's hardly does up to 16.
constexpr int64_t kNarrowMinRows = 3, kNarrowMinRowsSplit = 5;

// ---------------------------------------------------------------------------------------------
// W8A8: u8 activations (q + 128, the operand the VNNI kernel takes too) x s8 weights by TDPBUSD.
// The packed weight is int8_prepack's (cpu/int8.cpp): each 16-channel block is K / 4 lines of 64
// bytes, line k4 = [16 channels][4 k]. That is exactly the B-tile row format of TDPBUSD (row r: for
// each of 16 columns the 4 bytes k = 4r..4r+3), so one 64-k step of a block is 16 consecutive lines,
// a 1 KiB B tile at stride 64: AMX reads the VNNI pack as it is, and the pack needs no second layout.
// corr (128 * the weight sums per group) removes the +128 of the u8 activations as in the VNNI kernel.
// ---------------------------------------------------------------------------------------------

// The accumulator tiles 0-3 (a 32 x 16 * NB block of 4-byte int32 or fp32 sums) into the row-major
// kBlockM x kBlockN buffer c: rows 0-15 in tiles 0 / 2, rows 16-31 in tiles 1 / 3.
template <int NB, typename Acc>
inline void store_c_tiles(Acc* c) {
  static_assert(sizeof(Acc) == 4, "tile accumulators are 4-byte int32 or fp32");
  constexpr int64_t ldc = kBlockN * 4;
  _tile_stored(0, c, ldc);
  _tile_stored(1, c + 16 * kBlockN, ldc);
  if constexpr (NB == 2) {
    _tile_stored(2, c + 16, ldc);
    _tile_stored(3, c + 16 * kBlockN + 16, ldc);
  }
}

// c[32][32] int32 (row stride 128 bytes) = the dots of the 32 packed A rows at a (pack_a's layout: per
// 64-k step one 2 KiB piece, rows 0-15 then 16-31, 64 bytes a row) with the NB 16-column blocks at wb
// (block stride bstride bytes) over the 64-k steps [s0, s1).
template <int NB>
inline void dots_u8s8(const uint8_t* a, const int8_t* wb, int64_t bstride, int64_t s0, int64_t s1, int32_t* c) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (NB == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = s0; s < s1; ++s) {
    _tile_loadd(4, a + 2048 * s, 64);
    _tile_loadd(5, a + 2048 * s + 1024, 64);
    _tile_loadd(6, wb + s * 1024, 64);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 5, 6);
    if constexpr (NB == 2) {
      _tile_loadd(7, wb + bstride + s * 1024, 64);
      _tile_dpbusd(2, 4, 7);
      _tile_dpbusd(3, 5, 7);
    }
  }
  store_c_tiles<NB>(c);
}

// Activations (M rows of `bytes` bytes, row stride ld) repacked as A tiles: 32-row block mb, 64-byte
// step s at dst + mb * 32 * bytes + s * 2048 + r * 64 (r = row in the block), rows past M filled with
// `fill` bytes. A tile load of a row-major x reads 16 rows `bytes` apart, and at K = 2^n * 64 bytes
// those rows all fall in a few L1 sets (K = 4096: one set), so every step re-fetched them from L2;
// packed, a tile is 1 KiB of consecutive lines, which the prefetchers stream. Pure data movement: it
// does not change any product or the order of any sum.
inline void pack_a(const uint8_t* src, int64_t ld, int64_t M, int64_t bytes, uint8_t fill, uint8_t* dst) {
  const int64_t mblocks = (M + kBlockM - 1) / kBlockM, steps = bytes / 64;
  at::parallel_for(0, mblocks, std::max<int64_t>(1, 65536 / (kBlockM * bytes)), [&](int64_t b0, int64_t b1) {
    const __m512i f = _mm512_set1_epi8(static_cast<char>(fill));
    for (int64_t mb = b0; mb < b1; ++mb)
      for (int64_t r = 0; r < kBlockM; ++r) {
        const int64_t m = mb * kBlockM + r;
        uint8_t* d = dst + mb * kBlockM * bytes + r * 64;
        if (m < M) {
          const uint8_t* s = src + m * ld;
          for (int64_t st = 0; st < steps; ++st) _mm512_store_si512(d + st * 2048, _mm512_loadu_si512(s + 64 * st));
        } else {
          for (int64_t st = 0; st < steps; ++st) _mm512_store_si512(d + st * 2048, f);
        }
      }
  });
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// Where the AMX W8A8 kernel takes a call: 64-k steps (whole B tiles; K % 64 and the group size % 64),
// and M > 16 (decode rows are bound by weight bytes, where the VNNI GEMM does as well and keeps its
// register tiles exactly sized). Everything else goes to the VNNI kernel on the same pack.
bool amx_w8a8_takes(int64_t M, int64_t N, int64_t K, int64_t groups) {
  return M > kMaxGemvRows && w8a8_packable(N, K, groups) && K % 64 == 0 && (K / groups) % 64 == 0;
}

bool w8a8_gemm_packed_amx(const uint8_t* qu, const float* sx, const int8_t* wp, const float* sw, const float* bias,
                          void* out, int64_t M, int64_t N, int64_t K, int64_t groups, DType dtype, int32_t act) {
  if (!amx_w8a8_takes(M, N, K, groups)) return w8a8_gemm_packed(qu, sx, wp, sw, bias, out, M, N, K, groups, dtype, act);
  const int32_t* corr = reinterpret_cast<const int32_t*>(wp + N * K);
  const int64_t K4 = K / 4, steps = K / 64, group_steps = steps / groups;
  const int64_t blocks = N / 16, panels = (blocks + 1) / 2, mblocks = (M + kBlockM - 1) / kBlockM;
  // Rows in chunks of whole 32-row blocks whose activations (chunk x K bytes) fit in ~half of L2 next
  // to the weight panel; one task = one (chunk, 32-column panel), chunk-major, so a thread walks the
  // panels of its chunk with the chunk's activations staying in L2 and each panel's weights (32 x K
  // bytes) reused by every 32-row block of the chunk.
  const int64_t chunk_blocks = std::max<int64_t>(1, (int64_t(768) * 1024 / K) / kBlockM);
  const int64_t chunks = (mblocks + chunk_blocks - 1) / chunk_blocks;
  const int64_t Mp = mblocks * kBlockM;
  std::unique_ptr<uint8_t, FreeDeleter> packed(static_cast<uint8_t*>(std::aligned_alloc(64, Mp * K)));
  pack_a(qu, K, M, K, 128, packed.get());  // u8 128 = q 0 in the padding rows
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_act(act, [&]<Act A, bool HAS_ACT>() {
      at::parallel_for(0, chunks * panels, 1, [&](int64_t t0, int64_t t1) {
        TileScope tiles;
        alignas(64) int32_t c[kBlockM * kBlockN];
        alignas(64) float y[kBlockM * kBlockN];
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t ch = t / panels, p = t % panels;
          const int64_t nb = std::min<int64_t>(2, blocks - 2 * p), n0 = 32 * p, ncols = 16 * nb;
          const int8_t* wb = wp + 2 * p * K4 * 64;
          const int64_t mb_end = std::min(mblocks, (ch + 1) * chunk_blocks);
          for (int64_t mb = ch * chunk_blocks; mb < mb_end; ++mb) {
            const int64_t m0 = mb * kBlockM, rows = std::min(kBlockM, M - m0);
            const uint8_t* a = packed.get() + m0 * K;
            auto run = [&]<int NB>() {
              if (groups == 1) {
                dots_u8s8<NB>(a, wb, K4 * 64, 0, steps, c);
                for (int64_t i = 0; i < rows; ++i) {
                  const __m512 sxi = _mm512_set1_ps(sx[m0 + i]);
                  for (int j = 0; j < NB; ++j) {
                    const int64_t n = n0 + 16 * j;
                    const __m512i d =
                        _mm512_sub_epi32(_mm512_load_si512(c + i * kBlockN + 16 * j), _mm512_loadu_si512(corr + n));
                    __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(sw + n)), sxi);
                    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + n));
                    _mm512_store_ps(y + i * kBlockN + 16 * j, v);
                  }
                }
              } else {
                // One int32 tile product per group, scaled by the group's weight scales into fp32:
                // the same per-group sum as the VNNI kernel and the reference.
                for (int64_t i = 0; i < rows * kBlockN; i += 16) _mm512_store_ps(y + i, _mm512_setzero_ps());
                for (int64_t g = 0; g < groups; ++g) {
                  dots_u8s8<NB>(a, wb, K4 * 64, g * group_steps, (g + 1) * group_steps, c);
                  for (int j = 0; j < NB; ++j) {
                    const int64_t n = n0 + 16 * j;
                    const __m512i cg = _mm512_loadu_si512(corr + g * N + n);
                    const __m512 sg = _mm512_loadu_ps(sw + g * N + n);
                    for (int64_t i = 0; i < rows; ++i) {
                      float* yr = y + i * kBlockN + 16 * j;
                      const __m512 d = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(c + i * kBlockN + 16 * j), cg));
                      _mm512_store_ps(yr, _mm512_fmadd_ps(d, sg, _mm512_load_ps(yr)));
                    }
                  }
                }
                for (int64_t i = 0; i < rows; ++i) {
                  const __m512 sxi = _mm512_set1_ps(sx[m0 + i]);
                  for (int j = 0; j < NB; ++j) {
                    float* yr = y + i * kBlockN + 16 * j;
                    __m512 v = _mm512_mul_ps(_mm512_load_ps(yr), sxi);
                    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + n0 + 16 * j));
                    _mm512_store_ps(yr, v);
                  }
                }
              }
            };
            if (nb == 2)
              run.template operator()<2>();
            else
              run.template operator()<1>();
            for (int64_t i = 0; i < rows; ++i) {
              float* yr = y + i * kBlockN;
              finish_row<A, HAS_ACT>(yr, ncols, nullptr);
              at::vec::convert<float, T>(yr, static_cast<T*>(out) + (m0 + i) * N + n0, ncols);
            }
          }
        }
      });
    });
  });
  return true;
}

// ---------------------------------------------------------------------------------------------
// W8A16: x in bf16 (used as it is when bf16; fp32 / fp16 split once per call into three / two bf16
// parts, see below) times the int8 weight widened to bf16 by TDPBF16PS. An int8 value is exact in bf16 (8 significant bits),
// so the widened weight carries no rounding: the weight scales are applied in fp32 in the epilogue,
// per channel or per group (one fp32 tile product per group, scaled and summed). The weight is read
// from the plain (N, K) int8 tensor and widened a few 32-column panels (~1 MiB) at a time into a
// per-thread buffer in the B-tile layout (K / 2 rows of [16 columns][2 k] bf16 per 16-column block:
// 64 KiB per 1024 k), which every 32-row block of x then reuses; no whole dequantized weight is made.
// ---------------------------------------------------------------------------------------------

// Word p of widen_row returns weight k = widened_k(p) of its 32: packus_epi32 interleaves its two
// sources per 128-bit lane. The dot product only needs A's and B's k in the same order, so x is packed
// in this order rather than the weight reordered.
constexpr int widened_k(int p) { return p % 8 < 4 ? 4 * (p / 8) + p % 8 : 16 + 4 * (p / 8) + p % 8 - 4; }

// 32 int8 weights -> 32 bf16 (exact: int8 -> fp32 is exact, and fp32 -> bf16 by truncation too, the
// low 16 bits being zero), in widened_k order.
inline __m512i widen_row(const int8_t* w) {
  const __m512i lo = _mm512_srli_epi32(
      _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))))), 16);
  const __m512i hi = _mm512_srli_epi32(
      _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16))))), 16);
  return _mm512_packus_epi32(lo, hi);
}

// Widens w[0..15][k0 .. k0 + 31] (rows every K bytes) into one bf16 B tile (16 rows of 64 bytes):
// tile row r = [column n: bf16(w[n][k0 + 2r]), bf16(w[n][k0 + 2r + 1])].
inline void widen_b_tile(const int8_t* w, int64_t K, uint16_t* tile) {
  // dword d of v[n] (lane l = d / 4, m = d % 4) holds the k pair 2l + m (m < 2) or 8 + 2l + m - 2
  // (m >= 2): widen_row's packus order, undone below by storing each transposed row at its pair's tile row.
  __m512i v[16];
  for (int n = 0; n < 16; ++n) v[n] = widen_row(w + n * K);
  // 16 x 16 dword transpose: 32-bit and 64-bit interleaves within lanes, then a 4 x 4 lane transpose.
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  for (int q = 0; q < 4; ++q) {  // u[4q + c] lane l = rows 4q..4q+3 of dword column 4l + c
    u[4 * q + 0] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
    u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
  }
  constexpr int kPair[16] = {0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15};  // dword column -> k pair
  for (int c = 0; c < 4; ++c) {
    const __m512i x0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), x1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i y0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44),
                  y1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    const __m512i col[4] = {_mm512_shuffle_i32x4(x0, y0, 0x88), _mm512_shuffle_i32x4(x0, y0, 0xDD),
                            _mm512_shuffle_i32x4(x1, y1, 0x88), _mm512_shuffle_i32x4(x1, y1, 0xDD)};
    for (int l = 0; l < 4; ++l) _mm512_store_si512(tile + kPair[4 * l + c] * 32, col[l]);
  }
}

// c[32][32] fp32 = bf16 rows a[0..31] (stride lda bytes) x the NB widened 16-column blocks at wb
// (block stride bstride bytes, 1 KiB per 32-k step) over the 32-k steps [s0, s1).
// a[0..parts-1]: x as a sum of bf16 parts (one for a bf16 x, see w8a16_gemm_amx), each a 32-row block
// in pack_a's tile order (2 KiB per 32-k step); each B tile loaded is used by every part, so the parts cost tile products, not weight traffic.
template <int NB>
inline void dots_bf16(const uint16_t* const* a, int parts, const uint16_t* wb, int64_t bstride,
                      int64_t s0, int64_t s1, float* c) {
  const char* bb = reinterpret_cast<const char*>(wb);
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (NB == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = s0; s < s1; ++s) {
    _tile_loadd(6, bb + s * 1024, 64);
    if constexpr (NB == 2) _tile_loadd(7, bb + bstride + s * 1024, 64);
    for (int p = 0; p < parts; ++p) {
      const char* ab = reinterpret_cast<const char*>(a[p]);
      _tile_loadd(4, ab + 2048 * s, 64);
      _tile_loadd(5, ab + 2048 * s + 1024, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 5, 6);
      if constexpr (NB == 2) {
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  store_c_tiles<NB>(c);
}

// x (M rows of K, row stride ldx) as `parts` bf16 rows each, x = p0 (+ p1 (+ p2)), every part the bf16
// rounding (to nearest even) of what the earlier ones left: [parts][M][K]. Two parts hold an fp16 x
// exactly (11 significant bits), three an fp32 x to within ~2^-24 (bf16x3).
template <typename T>
std::vector<c10::BFloat16> split_bf16(const T* x, int64_t ldx, int64_t M, int64_t K, int parts) {
  std::vector<c10::BFloat16> xb(parts * M * K);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1) {
    std::vector<float> rest(K), part(K);
    for (int64_t m = m0; m < m1; ++m) {
      row_to_float(x + m * ldx, K, nullptr, rest.data());
      for (int p = 0; p < parts; ++p) {
        c10::BFloat16* dst = xb.data() + (p * M + m) * K;
        at::vec::convert<float, c10::BFloat16>(rest.data(), dst, K);
        if (p + 1 == parts) break;
        at::vec::convert<c10::BFloat16, float>(dst, part.data(), K);
        int64_t i = 0;  // rest -= part: exact, the bits of rest below part's 8
        for (; i + kVF <= K; i += kVF) (VF::loadu(rest.data() + i) - VF::loadu(part.data() + i)).store(rest.data() + i);
        for (; i < K; ++i) rest[i] -= part[i];
      }
    }
  });
  return xb;
}

// ---------------------------------------------------------------------------------------------
// W8A16 for decode rows (M <= 16), transposed: y^T = W x^T. With x as the A operand, a 16-row x tile
// of 1-16 tokens wastes the rest of its 32-row block, and every weight tile must first be transposed
// into the B layout (widen_b_tile), which costs more than the tile products it feeds. Here the weight
// is the A operand: a tile is 16 channels x 32 k, each row a plain (N, K) row segment widened to bf16
// in place, no transpose; x^T is the B operand (16 k pairs x 16 tokens x 2), packed once per call.
// Each weight byte is read once and widened once, and each tile product serves all the tokens, so
// the kernel streams the int8 weight at about one byte per weight, as the GEMV does for M = 1.
// ---------------------------------------------------------------------------------------------

// One 32-k step of the transposed product for PARTS bf16 parts of x: C0 (tmm0) += A0 x B, and C1
// (tmm1) += A1 x B when NB == 2; A tiles (tmm4-5) from the widened weight at a (1 KiB per 16-channel
// block), the parts' B tiles (tmm6, tmm7, tmm3) at b (part stride bstride bytes).
template <int NB, int PARTS>
inline void narrow_step(const uint16_t* a, const char* b, int64_t bstride) {
  _tile_loadd(4, a, 64);
  if constexpr (NB == 2) _tile_loadd(5, a + 512, 64);
  _tile_loadd(6, b, 64);
  _tile_dpbf16ps(0, 4, 6);
  if constexpr (NB == 2) _tile_dpbf16ps(1, 5, 6);
  if constexpr (PARTS >= 2) {
    _tile_loadd(7, b + bstride, 64);
    _tile_dpbf16ps(0, 4, 7);
    if constexpr (NB == 2) _tile_dpbf16ps(1, 5, 7);
  }
  if constexpr (PARTS == 3) {
    _tile_loadd(3, b + 2 * bstride, 64);
    _tile_dpbf16ps(0, 4, 3);
    if constexpr (NB == 2) _tile_dpbf16ps(1, 5, 3);
  }
}

template <typename T, int PARTS>
void w8a16_narrow(const T* x, int64_t ldx, const int8_t* w, const float* sw, const float* bias, T* out, int64_t M,
                  int64_t N, int64_t K, int64_t group, int32_t act) {
  const int64_t G = K / group, steps = K / 32, group_steps = group / 32;
  const int64_t blocks = N / 16, pairs = (blocks + 1) / 2;
  // x^T as B tiles: part p, step s at xt + (p * steps + s) * 1 KiB; row r = k pair (widened_k(2r),
  // widened_k(2r + 1)) of the step, 16 token columns of 2 bf16 (4 bytes), tokens past M zero.
  const int64_t bstride = steps * 1024;
  std::unique_ptr<uint8_t, FreeDeleter> xt_mem(static_cast<uint8_t*>(std::aligned_alloc(64, PARTS * bstride)));
  uint32_t* xt = reinterpret_cast<uint32_t*>(xt_mem.get());
  std::memset(xt, 0, PARTS * bstride);
  std::vector<c10::BFloat16> parts_buf;
  const uint16_t* xrows;  // [PARTS][M][K] bf16, row stride xld
  int64_t xld;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    xrows = reinterpret_cast<const uint16_t*>(x);
    xld = ldx;
  } else {
    parts_buf = split_bf16<T>(x, ldx, M, K, PARTS);
    xrows = reinterpret_cast<const uint16_t*>(parts_buf.data());
    xld = K;
  }
  alignas(64) uint16_t order_k[32];  // word p of a B row holds x's k = widened_k(p), as widen_row's A rows
  for (int p = 0; p < 32; ++p) order_k[p] = static_cast<uint16_t>(widened_k(p));
  const __m512i order = _mm512_load_si512(order_k);
  for (int p = 0; p < PARTS; ++p)
    for (int64_t m = 0; m < M; ++m) {
      const uint16_t* xr = xrows + (p * M + m) * xld;
      for (int64_t s = 0; s < steps; ++s) {
        alignas(64) uint32_t pairs_of_step[16];
        _mm512_store_si512(pairs_of_step, _mm512_permutexvar_epi16(order, _mm512_loadu_si512(xr + 32 * s)));
        uint32_t* dst = xt + (p * steps + s) * 256 + m;
        for (int r = 0; r < 16; ++r) dst[16 * r] = pairs_of_step[r];
      }
    }
  const char* xtb = reinterpret_cast<const char*>(xt);
  dispatch_act(act, [&]<Act A, bool HAS_ACT>() {
    at::parallel_for(0, pairs, 1, [&](int64_t q0, int64_t q1) {
      TileScope tiles;
      // The pair's 32 weight rows are widened kChunk steps at a time, row by row (each row a sequential
      // run of 256 bytes, which the prefetchers follow), into one half of a double buffer (2 x 16 KiB,
      // in L1), while the tile products of the previous chunk run from the other half: one tile step
      // after every few rows widened, so that the vector and the tile work overlap. Widened first and
      // multiplied afterwards, the two ran one after the other (measured at 4096 x 11008: widening
      // alone 4.5 ms, tiles alone 4 ms, both 8.7 ms). c / y: the pair's sums as [32 channels][16 tokens].
      constexpr int64_t kChunk = 8;
      alignas(64) uint16_t a[2 * kChunk * 1024];
      alignas(64) float c[32 * 16];
      alignas(64) float y[32 * 16];
      alignas(64) float yt[16 * 32];
      const int64_t chunks = (steps + kChunk - 1) / kChunk;
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t nb = std::min<int64_t>(2, blocks - 2 * q), n0 = 32 * q, ncols = 16 * nb;
        std::fill(y, y + 32 * 16, 0.0f);
        auto run = [&]<int NB>() {
          constexpr int64_t rows = 16 * NB;
          // Widens rows [r0, r1) of chunk ch into its half of the buffer (step s of the chunk: the
          // tile pair at + s * 1024, block j at + 512 j) and prefetches those rows' next chunk into L2.
          auto widen_rows = [&](int64_t ch, int64_t r0, int64_t r1) {
            uint16_t* buf = a + (ch % 2) * kChunk * 1024;
            const int64_t s0 = ch * kChunk, s1 = std::min(steps, s0 + kChunk);
            for (int64_t n = r0; n < r1; ++n) {
              const int8_t* wr = w + (n0 + n) * K;
              if (s1 < steps)
                for (int64_t l = 0; l < kChunk * 32; l += 64) _mm_prefetch(reinterpret_cast<const char*>(wr + 32 * s1 + l), _MM_HINT_T1);
              for (int64_t s = s0; s < s1; ++s)
                _mm512_store_si512(buf + (s - s0) * 1024 + (n / 16) * 512 + (n % 16) * 32, widen_row(wr + 32 * s));
            }
          };
          // Tile step s (of the chunk widened before): the group's accumulators zeroed at its first
          // step, and at its last stored and added into y with the group's weight scales.
          auto tile_step = [&](int64_t s) {
            if (s % group_steps == 0) {
              _tile_zero(0);
              if constexpr (NB == 2) _tile_zero(1);
            }
            narrow_step<NB, PARTS>(a + ((s / kChunk) % 2) * kChunk * 1024 + (s % kChunk) * 1024, xtb + s * 1024, bstride);
            if ((s + 1) % group_steps == 0) {
              const int64_t g = s / group_steps;
              _tile_stored(0, c, 64);
              if constexpr (NB == 2) _tile_stored(1, c + 256, 64);
              for (int64_t n = 0; n < rows; ++n) {
                const __m512 sg = _mm512_set1_ps(sw[(n0 + n) * G + g]);
                _mm512_store_ps(y + 16 * n, _mm512_fmadd_ps(_mm512_load_ps(c + 16 * n), sg, _mm512_load_ps(y + 16 * n)));
              }
            }
          };
          widen_rows(0, 0, rows);
          for (int64_t ch = 1; ch <= chunks; ++ch) {
            const int64_t t0 = (ch - 1) * kChunk, t1 = std::min(steps, t0 + kChunk);  // the previous chunk's steps
            int64_t t = t0;
            if (ch < chunks) {
              const int64_t per = (rows + (t1 - t0) - 1) / (t1 - t0);  // rows widened per tile step
              for (int64_t r = 0; r < rows; r += per) {
                widen_rows(ch, r, std::min(rows, r + per));
                if (t < t1) tile_step(t++);
              }
            }
            while (t < t1) tile_step(t++);
          }
        };
        if (nb == 2)
          run.template operator()<2>();
        else
          run.template operator()<1>();
        for (int64_t m = 0; m < M; ++m) {
          float* yr = yt + 32 * m;
          for (int64_t n = 0; n < ncols; ++n) yr[n] = y[16 * n + m];
          finish_row<A, HAS_ACT>(yr, ncols, bias ? bias + n0 : nullptr);
          at::vec::convert<float, T>(yr, out + m * N + n0, ncols);
        }
      }
    });
  });
}

// How many bf16 parts x is taken as: bf16 as it is, fp16 in two (exact), fp32 in fp32_parts (int8.cpp
// reads it from torch's fp32 matmul precision: three keep fp32's ~24 bits, two ~16, one is bf16).
int x_parts(DType dtype, int32_t fp32_parts) {
  return dtype == DType::kBFloat16 ? 1 : dtype == DType::kFloat16 ? 2 : std::clamp<int32_t>(fp32_parts, 1, 3);
}

bool w8a16_gemm_amx(const void* x, int64_t ldx, const int8_t* w, const float* sw, const float* bias, void* out,
                    int64_t M, int64_t N, int64_t K, int64_t group, DType dtype, int32_t act, int32_t fp32_parts) {
  // Whole 32-k steps and groups, whole 16-column blocks; other shapes go to the AVX-512 table's GEMM,
  // which takes 12-160 rows or returns false for int8.cpp's GEMV / dequantised paths. fp64 x keeps its
  // float64 GEMM (the bf16 parts would stop at fp32 precision).
  const auto avx512 = [&] {
    return kernels_avx512().int8.w8a16_gemm(x, ldx, w, sw, bias, out, M, N, K, group, dtype, act, fp32_parts);
  };
  if (K % 32 != 0 || group % 32 != 0 || N % 16 != 0 || dtype == DType::kFloat64) return avx512();
  const int parts = x_parts(dtype, fp32_parts);
  if (M < (parts == 1 ? kNarrowMinRows : kNarrowMinRowsSplit)) return false;
  if (M <= 16) {
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      auto narrow = [&]<int PARTS>() {
        w8a16_narrow<T, PARTS>(static_cast<const T*>(x), ldx, w, sw, bias, static_cast<T*>(out), M, N, K, group, act);
      };
      switch (parts) {
        case 1: narrow.template operator()<1>(); break;
        case 2: narrow.template operator()<2>(); break;
        default: narrow.template operator()<3>(); break;
      }
    });
    return true;
  }
  const int64_t G = K / group, steps = K / 32, group_steps = group / 32;
  const int64_t mblocks = (M + kBlockM - 1) / kBlockM, Mp = mblocks * kBlockM;
  const int64_t blocks = N / 16, panels = (blocks + 1) / 2;
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    // x as bf16 rows, padded with zero rows to whole 32-row blocks (tile loads read 16 rows). A bf16 x
    // is used as it is. A wider x is split into bf16 parts, x = p0 + p1 (+ p2), each part the bf16
    // rounding of what the earlier ones left: two parts hold an fp16 x exactly (11 significant bits),
    // three an fp32 x to within ~2^-24 (bf16x3), so by default W8A16 keeps x's precision as on every
    // other path (the op's contract; the tests hold fp32 to 1e-4) instead of silently computing an fp32
    // model in bf16; fewer parts only where torch's fp32 matmul precision allows them. Each extra part
    // costs one more tile product per B tile; the weight traffic stays the same.
    // Each part is then repacked in tile order (pack_a, as W8A8's activations): row-major tiles of x
    // read rows 2K bytes apart, all in one or two L1 sets at K = 3072 / 4096.
    std::unique_ptr<uint8_t, FreeDeleter> packed(static_cast<uint8_t*>(std::aligned_alloc(64, parts * Mp * K * 2)));
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      pack_a(static_cast<const uint8_t*>(x), 2 * ldx, M, 2 * K, 0, packed.get());
    } else {
      const std::vector<c10::BFloat16> xb = split_bf16<T>(static_cast<const T*>(x), ldx, M, K, parts);
      for (int p = 0; p < parts; ++p)
        pack_a(reinterpret_cast<const uint8_t*>(xb.data() + p * M * K), 2 * K, M, 2 * K, 0, packed.get() + p * Mp * K * 2);
    }
    const uint16_t* xa = reinterpret_cast<const uint16_t*>(packed.get());
    dispatch_act(act, [&]<Act A, bool HAS_ACT>() {
      at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
        TileScope tiles;
        alignas(64) float c[kBlockM * kBlockN];
        // A thread widens `span` of its 32-column pairs at a time, over one chunk of K (2048 k), into
        // one buffer of ~1 MiB (in L2; [pair][2 blocks][chunk / 2 k pairs][16 columns][2] bf16) and
        // runs every 32-row block of x against all of them: each x block is read from L3 or memory once
        // per span rather than once per pair. Chunking K keeps the span at 8 pairs for any K (without
        // it a K = 11008 panel holds one pair, and x, 3 x 11 MB at M = 512 for an fp32 x, is streamed
        // once per 32 columns: 0.6x torch fp32 at Llama's mlp_down). The fp32 sums of a span's blocks
        // live in yacc across chunks. Which pairs share a span does not change any output's arithmetic,
        // nor do the chunks (fixed by K), so results do not depend on the thread count.
        const int64_t chunk_steps = std::min<int64_t>(steps, 64), chunks = (steps + chunk_steps - 1) / chunk_steps;
        const int64_t bstride = chunk_steps * 1024;  // bytes per widened 16-column block of one chunk
        const int64_t span = std::clamp<int64_t>((int64_t(1) << 20) / (2 * bstride), 1, 8);
        uint16_t* panel = static_cast<uint16_t*>(std::aligned_alloc(64, span * 2 * bstride));
        // x's 32-row blocks go through in runs of up to 64 (2048 rows), so yacc stays 2 MiB at most for
        // any M; each run widens the span's chunks again, a pass over N x K per 2048 rows of products.
        constexpr int64_t kRunBlocks = 64;
        const int64_t run_blocks = std::min(mblocks, kRunBlocks);
        float* yacc = static_cast<float*>(std::aligned_alloc(64, run_blocks * span * kBlockM * kBlockN * sizeof(float)));
        std::vector<float> swp(span * G * kBlockN);  // each pair's scales as (G, 32)
        for (int64_t q0 = p0; q0 < p1; q0 += span) {
          const int64_t q1 = std::min(p1, q0 + span);
          for (int64_t p = q0; p < q1; ++p) {
            const int64_t nb = std::min<int64_t>(2, blocks - 2 * p), n0 = 32 * p, ncols = 16 * nb;
            float* sp = swp.data() + (p - q0) * G * kBlockN;
            for (int64_t g = 0; g < G; ++g)
              for (int64_t n = 0; n < ncols; ++n) sp[g * kBlockN + n] = sw[(n0 + n) * G + g];
          }
          for (int64_t mb0 = 0; mb0 < mblocks; mb0 += kRunBlocks) {
            for (int64_t ch = 0; ch < chunks; ++ch) {
              const int64_t s_begin = ch * chunk_steps, s_end = std::min(steps, s_begin + chunk_steps);
              for (int64_t p = q0; p < q1; ++p) {
                const int64_t nb = std::min<int64_t>(2, blocks - 2 * p), n0 = 32 * p;
                uint16_t* pp = panel + (p - q0) * bstride;  // 2 blocks of bstride bytes = bstride uint16
                for (int64_t j = 0; j < nb; ++j)
                  for (int64_t st = s_begin; st < s_end; ++st)
                    widen_b_tile(w + (n0 + 16 * j) * K + 32 * st, K, pp + (j * bstride + (st - s_begin) * 1024) / 2);
              }
              for (int64_t mb = mb0; mb < std::min(mblocks, mb0 + kRunBlocks); ++mb) {
                const int64_t m0 = mb * kBlockM, rows = std::min(kBlockM, M - m0);
                // each part's 32-row block from this chunk on (2 KiB = 1024 bf16 per 32-k step)
                const uint16_t* a[3] = {xa + m0 * K + 1024 * s_begin, xa + (Mp + m0) * K + 1024 * s_begin,
                                        xa + (2 * Mp + m0) * K + 1024 * s_begin};
                for (int64_t p = q0; p < q1; ++p) {
                  const int64_t nb = std::min<int64_t>(2, blocks - 2 * p), n0 = 32 * p, ncols = 16 * nb;
                  const uint16_t* pp = panel + (p - q0) * bstride;
                  const float* sp = swp.data() + (p - q0) * G * kBlockN;
                  float* y = yacc + ((mb - mb0) * span + (p - q0)) * kBlockM * kBlockN;
                  if (ch == 0)
                    for (int64_t i = 0; i < rows * kBlockN; i += 16) _mm512_store_ps(y + i, _mm512_setzero_ps());
                  auto run = [&]<int NB>() {
                    // one fp32 tile product per group (or per chunk for a per-channel scale), scaled and summed
                    for (int64_t s = s_begin; s < s_end;) {
                      const int64_t g = s / group_steps, e = std::min(s_end, (g + 1) * group_steps);
                      dots_bf16<NB>(a, parts, pp, bstride, s - s_begin, e - s_begin, c);
                      for (int j = 0; j < NB; ++j) {
                        const __m512 sg = _mm512_loadu_ps(sp + g * kBlockN + 16 * j);
                        for (int64_t i = 0; i < rows; ++i) {
                          float* yr = y + i * kBlockN + 16 * j;
                          _mm512_store_ps(yr, _mm512_fmadd_ps(_mm512_load_ps(c + i * kBlockN + 16 * j), sg, _mm512_load_ps(yr)));
                        }
                      }
                      s = e;
                    }
                  };
                  if (nb == 2)
                    run.template operator()<2>();
                  else
                    run.template operator()<1>();
                  if (ch + 1 == chunks)
                    for (int64_t i = 0; i < rows; ++i) {
                      float* yr = y + i * kBlockN;
                      finish_row<A, HAS_ACT>(yr, ncols, bias ? bias + n0 : nullptr);
                      at::vec::convert<float, T>(yr, static_cast<T*>(out) + (m0 + i) * N + n0, ncols);
                    }
                }
              }
            }
          }
        }
        std::free(yacc);
        std::free(panel);
      });
    });
  });
  return true;
}

// ---------------------------------------------------------------------------------------------
// Peak rate: TDPBUSD / TDPBF16PS back to back on the four accumulators from tiles loaded once,
// on every torch thread; the AMX counterpart of int8_peak.cpp's VNNI loop for the int8 benchmark.
// ---------------------------------------------------------------------------------------------
__attribute__((noinline)) int32_t tile_loop(int64_t iters, bool bf16, int32_t seed) {
  TileScope tiles;
  alignas(64) int8_t src[1024];
  for (int i = 0; i < 1024; ++i) src[i] = static_cast<int8_t>((i + seed) % 7);
  _tile_loadd(4, src, 64);
  _tile_loadd(5, src, 64);
  _tile_loadd(6, src, 64);
  _tile_loadd(7, src, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  if (bf16) {
    for (int64_t i = 0; i < iters; ++i) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 5, 6);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  } else {
    for (int64_t i = 0; i < iters; ++i) {
      _tile_dpbusd(0, 4, 6);
      _tile_dpbusd(1, 5, 6);
      _tile_dpbusd(2, 4, 7);
      _tile_dpbusd(3, 5, 7);
    }
  }
  alignas(64) int32_t out[256];
  _tile_stored(0, out, 64);
  return out[0] + out[255];  // returned so the loop cannot be optimised away
}

}  // namespace

double peak_macs(bool bf16) {
  const int64_t threads = at::get_num_threads();
  constexpr int64_t kIters = 1 << 16;  // 4 x 65k tile products a thread: a few ms
  const double macs_per_iter = 4.0 * 16 * 16 * (bf16 ? 32 : 64);
  std::atomic<int64_t> sink{0};
  double best = 0.0;
  for (int run = 0; run < 6; ++run) {  // run 0 warms the tile unit and the clocks up
    const auto t0 = std::chrono::steady_clock::now();
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) sink += tile_loop(kIters, bf16, static_cast<int32_t>(t + run));
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (run > 0) best = std::max(best, double(threads) * kIters * macs_per_iter / s);
  }
  return sink.load() == 42 ? best + 0.0 : best;  // reads the sink: the loops stay live
}

}  // namespace amx

bool kernels_amx_built() { return true; }

const IsaKernels& kernels_amx() {
  // The AVX-512 table with the two GEMMs replaced; each falls back to the AVX-512 kernel (or returns
  // false, for the caller's fallback) for the shapes it does not take.
  static const IsaKernels k = [] {
    IsaKernels t = kernels_avx512();
    t.int8.w8a8_gemm_packed = &amx::w8a8_gemm_packed_amx;
    t.int8.w8a16_gemm = &amx::w8a16_gemm_amx;
    return t;
  }();
  return k;
}

double amx_peak_macs(bool bf16) { return amx_in_use() ? amx::peak_macs(bf16) : 0.0; }

}  // namespace ember::cpu
#else
#include "cpu/kernels.h"
namespace ember::cpu {
bool kernels_amx_built() { return false; }
const IsaKernels& kernels_amx() { return kernels_avx512(); }
double amx_peak_macs(bool) { return 0.0; }
}  // namespace ember::cpu
#endif
