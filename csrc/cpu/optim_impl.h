// Multi-tensor optimizer step on the CPU, compiled once per instruction set (included by
// kernels_impl.h, so isa_default.cpp and isa_avx512.cpp each build their own copy).
//
// The whole parameter group is one parallel loop over (tensor, chunk) work items, so 200 small and
// large tensors keep every thread busy with one fork/join per step instead of one per tensor. Each
// element is loaded once, updated in fp32 registers by ember::opt_update (csrc/optim.h) and stored
// once: fp32 AdamW moves 4 reads + 3 writes = 28 bytes per parameter, the minimum.
#pragma once
#include <array>
#include <atomic>
#include <memory>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/kernels.h"
#include "optim.h"

namespace ember::cpu::EMBER_ISA {

// The math policy for opt_update on AVX-512 / AVX2 / portable vectors of C (float, or double for
// float64 parameters).
template <typename C>
struct VecMath {
  using V = at::vec::Vectorized<C>;
  static V splat(C x) { return V(x); }
  static V sqrt(const V& x) { return x.sqrt(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V sign(const V& x) {
    const V zero(C(0)), one(C(1));
    return V::blendv(zero, one, x > zero) - V::blendv(zero, one, x < zero);
  }
};

// Loads / stores kStep elements of T as two vectors of the compute type C (one Vectorized<T> of half
// floats widens to two float vectors, so the pair is the natural unit for every T). C is float, or
// double with T = double.
template <typename T, typename C = float>
struct Pair {
  using V = at::vec::Vectorized<C>;
  static constexpr int64_t kW = V::size();
  static constexpr int64_t kStep = 2 * kW;

  static std::array<V, 2> load(const T* p, int64_t count) {
    if constexpr (std::is_same_v<T, C>) {
      if (count >= kStep) return {V::loadu(p), V::loadu(p + kW)};
      return {V::loadu(p, std::min(count, kW)), count > kW ? V::loadu(p + kW, count - kW) : V(C(0))};
    } else {
      using SV = at::vec::Vectorized<T>;
      auto [a, b] = at::vec::convert_to_float<T>(count >= kStep ? SV::loadu(p) : SV::loadu(p, count));
      return {a, b};
    }
  }

  static void store(T* p, const std::array<V, 2>& v, int64_t count) {
    if constexpr (std::is_same_v<T, C>) {
      if (count >= kStep) {
        v[0].store(p);
        v[1].store(p + kW);
      } else {
        v[0].store(p, std::min(count, kW));
        if (count > kW) v[1].store(p + kW, count - kW);
      }
    } else {
      const auto r = at::vec::convert_from_float<T>(v[0], v[1]);
      if (count >= kStep) r.store(p);
      else r.store(p, count);
    }
  }
};

// Elements [begin, end) of one tensor. P: parameter / gradient type; S: state type; C: compute type
// (float, or double for float64 parameters and state).
template <Opt K, typename P, typename S, typename C = float>
void optim_range(const OptLaunch& L, const OptTensor& t, int64_t begin, int64_t end) {
  using V = at::vec::Vectorized<C>;
  constexpr int64_t kStep = Pair<C, C>::kStep;
  constexpr bool kF64 = std::is_same_v<C, double>;
  // Local copies: the stores below go through float pointers, which the compiler must assume may
  // alias the float fields of L and t, reloading every scalar after every store otherwise.
  const OptHyperT<C> hyper = [&] {
    if constexpr (kF64) return L.hyper64;
    else return L.hyper;
  }();
  const OptCoefT<C> coef = [&] {
    if constexpr (kF64) return t.coef64;
    else return t.coef;
  }();
  const C inv = kF64 ? static_cast<C>(L.inv_scale64) : static_cast<C>(L.inv_scale);
  const V inv_scale(inv);
  const bool scaled = inv != C(1);
  float* const master = t.master;  // only with C = float (fp16 / bf16 parameters)
  const bool use_s2 = t.s2 != nullptr, use_s3 = t.s3 != nullptr, use_s1 = t.s1 != nullptr;
  P* param = static_cast<P*>(t.param);
  const P* grad = static_cast<const P*>(t.grad);
  S* s1 = static_cast<S*>(t.s1);
  S* s2 = static_cast<S*>(t.s2);
  S* s3 = static_cast<S*>(t.s3);
  const std::array<V, 2> zeros{V(C(0)), V(C(0))};
  for (int64_t i = begin; i < end; i += kStep) {
    const int64_t count = std::min(kStep, end - i);
    std::array<V, 2> p;
    if constexpr (kF64) p = Pair<P, C>::load(param + i, count);
    else p = master ? Pair<float>::load(master + i, count) : Pair<P>::load(param + i, count);
    auto g = Pair<P, C>::load(grad + i, count);
    auto a = use_s1 ? Pair<S, C>::load(s1 + i, count) : zeros;
    auto b = use_s2 ? Pair<S, C>::load(s2 + i, count) : zeros;
    auto c = use_s3 ? Pair<S, C>::load(s3 + i, count) : zeros;
    for (int k = 0; k < 2; ++k) {
      if (scaled) g[k] = g[k] * inv_scale;
      opt_update<K, VecMath<C>>(hyper, coef, p[k], g[k], a[k], b[k], c[k]);
    }
    if constexpr (!kF64)
      if (master) Pair<float>::store(master + i, p, count);
    Pair<P, C>::store(param + i, p, count);
    if (use_s1) Pair<S, C>::store(s1 + i, a, count);
    if (use_s2) Pair<S, C>::store(s2 + i, b, count);
    if (use_s3) Pair<S, C>::store(s3 + i, c, count);
  }
}

// Work is cut into (tensor, chunk) items of at most kChunk elements. Each thread owns a contiguous run
// of items holding ~1/T of the elements and walks it forward, so it streams through long stretches of
// memory (the hardware prefetchers restart at every jump); a thread done with its run then walks the
// remaining items backward, taking what a slower thread (one that shares its core with another
// process) has not reached. Every item is claimed once through an atomic flag. Splitting by item count
// instead left one thread ~4% more elements than the other on the bench's LLM-like list; handing out
// single items from a shared counter interleaved the threads' streams. Small launches (under kSerial
// elements in all) run on the calling thread: a fork/join costs more than they do.
inline void optim_step(const OptLaunch& L) {
  constexpr int64_t kChunk = 1 << 16, kSerial = 1 << 15;
  struct Item {
    int64_t tensor, begin, end;
  };
  std::vector<Item> items;
  int64_t total = 0;
  for (int64_t i = 0; i < L.count; ++i) {
    total += L.tensors[i].n;
    for (int64_t b = 0; b < L.tensors[i].n; b += kChunk)
      items.push_back({i, b, std::min(b + kChunk, L.tensors[i].n)});
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t n_threads = total < kSerial ? 1 : std::min<int64_t>(at::get_num_threads(), n_items);
  // first[t]: thread t's first item; its run ends where thread t + 1's begins.
  std::vector<int64_t> first(n_threads + 1, n_items);
  first[0] = 0;
  for (int64_t w = 0, done = 0, t = 1; w < n_items && t < n_threads; ++w) {
    if (done * n_threads >= t * total) first[t++] = w;
    done += items[w].end - items[w].begin;
  }
  std::unique_ptr<std::atomic<bool>[]> claimed(new std::atomic<bool>[n_items]());

  auto run = [&]<typename P, typename S, typename C = float>() {
    dispatch_opt(L.kind, [&]<Opt K>() {
      auto take = [&](int64_t w) {
        if (!claimed[w].exchange(true, std::memory_order_relaxed))
          optim_range<K, P, S, C>(L, L.tensors[items[w].tensor], items[w].begin, items[w].end);
      };
      auto work = [&](int64_t t0, int64_t t1) {
        for (int64_t w = first[t0]; w < first[t1]; ++w) take(w);
        for (int64_t w = n_items - 1; w >= 0; --w) take(w);
      };
      if (n_threads <= 1) return work(0, 1);
      at::parallel_for(0, n_threads, 1, work);
    });
  };
  switch (L.param_dtype) {
    case DType::kFloat16:
      return L.state_fp32 ? run.template operator()<c10::Half, float>() : run.template operator()<c10::Half, c10::Half>();
    case DType::kBFloat16:
      return L.state_fp32 ? run.template operator()<c10::BFloat16, float>()
                          : run.template operator()<c10::BFloat16, c10::BFloat16>();
    case DType::kFloat64:
      return run.template operator()<double, double, double>();
    default:
      return run.template operator()<float, float>();
  }
}

}  // namespace ember::cpu::EMBER_ISA
