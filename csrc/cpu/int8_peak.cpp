// The int8 compute limit of this CPU, measured: vpdpbusd (AVX512-VNNI: 64 u8 x s8 multiply-adds into
// 16 int32 lanes per instruction) issued back to back on independent accumulators, on every torch
// thread. It is to the W8A8 GEMM what the copy bandwidth is to the memory-bound kernels: the int8
// benchmark reports it, and a GEMM's MACs / time / this rate is its fraction of what the core can do.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>

#include <ATen/Parallel.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace ember::cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
constexpr int kChains = 16;  // > latency x issue width of vpdpbusd on current cores, so the loop is throughput-bound

__attribute__((target("avx512f,avx512vnni"), noinline)) int32_t vnni_loop(int64_t iters, int32_t seed) {
  __m512i acc[kChains];
  for (int j = 0; j < kChains; ++j) acc[j] = _mm512_set1_epi32(seed + j);
  const __m512i a = _mm512_set1_epi8(static_cast<char>(seed | 1)), b = _mm512_set1_epi8(3);
  for (int64_t i = 0; i < iters; ++i)
    for (int j = 0; j < kChains; ++j) acc[j] = _mm512_dpbusd_epi32(acc[j], a, b);
  __m512i sum = acc[0];
  for (int j = 1; j < kChains; ++j) sum = _mm512_add_epi32(sum, acc[j]);
  return _mm512_reduce_add_epi32(sum);  // returned so the loop cannot be optimised away
}
#endif

}  // namespace

// Multiply-accumulates per second over all torch threads (best of a few runs); 0 without AVX512-VNNI.
double int8_peak_macs() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (!__builtin_cpu_supports("avx512vnni")) return 0.0;
  const int64_t threads = at::get_num_threads();
  constexpr int64_t kIters = 1 << 19;  // 8.4M instructions a thread: a few ms
  std::atomic<int64_t> sink{0};
  double best = 0.0;
  for (int run = 0; run < 6; ++run) {  // run 0 warms the cores up to their vector clock
    const auto t0 = std::chrono::steady_clock::now();
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) sink += vnni_loop(kIters, static_cast<int32_t>(t + run));
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (run > 0) best = std::max(best, double(threads) * kIters * kChains * 64 / s);
  }
  return sink.load() == 42 ? best + 0.0 : best;  // reads the sink: the loops stay live
#else
  return 0.0;
#endif
}

}  // namespace ember::cpu
