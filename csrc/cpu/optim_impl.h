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
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/kernels.h"
#include "optim.h"

namespace ember::cpu::EMBER_ISA {

// The math policy for opt_update on AVX-512 / AVX2 / portable float vectors.
struct VecMath {
  using V = at::vec::Vectorized<float>;
  static V splat(float x) { return V(x); }
  static V sqrt(const V& x) { return x.sqrt(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V sign(const V& x) {
    const V zero(0.0f), one(1.0f);
    return V::blendv(zero, one, x > zero) - V::blendv(zero, one, x < zero);
  }
};

// Loads / stores kStep elements of T as two float vectors (one Vectorized<T> of half floats widens to
// two float vectors, so the pair is the natural unit for every T).
template <typename T>
struct Pair {
  using V = at::vec::Vectorized<float>;
  static constexpr int64_t kW = V::size();
  static constexpr int64_t kStep = 2 * kW;

  static std::array<V, 2> load(const T* p, int64_t count) {
    if constexpr (std::is_same_v<T, float>) {
      if (count >= kStep) return {V::loadu(p), V::loadu(p + kW)};
      return {V::loadu(p, std::min(count, kW)), count > kW ? V::loadu(p + kW, count - kW) : V(0.0f)};
    } else {
      using SV = at::vec::Vectorized<T>;
      auto [a, b] = at::vec::convert_to_float<T>(count >= kStep ? SV::loadu(p) : SV::loadu(p, count));
      return {a, b};
    }
  }

  static void store(T* p, const std::array<V, 2>& v, int64_t count) {
    if constexpr (std::is_same_v<T, float>) {
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

// Elements [begin, end) of one tensor. P: parameter / gradient type; S: state type.
template <Opt K, typename P, typename S>
void optim_range(const OptLaunch& L, const OptTensor& t, int64_t begin, int64_t end) {
  using V = at::vec::Vectorized<float>;
  constexpr int64_t kStep = Pair<float>::kStep;
  const V inv_scale(L.inv_scale);
  // Local copies: the stores below go through float pointers, which the compiler must assume may
  // alias the float fields of L and t, reloading every scalar after every store otherwise.
  const OptHyper hyper = L.hyper;
  const OptCoef coef = t.coef;
  const bool scaled = L.inv_scale != 1.0f;
  float* const master = t.master;
  const bool use_s2 = t.s2 != nullptr, use_s3 = t.s3 != nullptr, use_s1 = t.s1 != nullptr;
  P* param = static_cast<P*>(t.param);
  const P* grad = static_cast<const P*>(t.grad);
  S* s1 = static_cast<S*>(t.s1);
  S* s2 = static_cast<S*>(t.s2);
  S* s3 = static_cast<S*>(t.s3);
  const std::array<V, 2> zeros{V(0.0f), V(0.0f)};
  for (int64_t i = begin; i < end; i += kStep) {
    const int64_t count = std::min(kStep, end - i);
    auto p = master ? Pair<float>::load(master + i, count) : Pair<P>::load(param + i, count);
    auto g = Pair<P>::load(grad + i, count);
    auto a = use_s1 ? Pair<S>::load(s1 + i, count) : zeros;
    auto b = use_s2 ? Pair<S>::load(s2 + i, count) : zeros;
    auto c = use_s3 ? Pair<S>::load(s3 + i, count) : zeros;
    for (int k = 0; k < 2; ++k) {
      if (scaled) g[k] = g[k] * inv_scale;
      opt_update<K, VecMath>(hyper, coef, p[k], g[k], a[k], b[k], c[k]);
    }
    if (master) Pair<float>::store(master + i, p, count);
    Pair<P>::store(param + i, p, count);
    if (use_s1) Pair<S>::store(s1 + i, a, count);
    if (use_s2) Pair<S>::store(s2 + i, b, count);
    if (use_s3) Pair<S>::store(s3 + i, c, count);
  }
}

// Work is cut into (tensor, chunk) items of at most kChunk elements, handed out one at a time from an
// atomic counter: every thread takes the next item when it finishes one, so the threads finish
// together even when the items are unequal (a tensor's last chunk, a 1024-element norm) or when
// another process takes a core for a while. A static split by item count left one thread ~4% more
// elements on the LLM-like bench list. Small launches (under kSerial elements in all) run on the
// calling thread: a fork/join costs more than they do, and much more on a busy machine.
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

  auto run = [&]<typename P, typename S>() {
    dispatch_opt(L.kind, [&]<Opt K>() {
      auto work = [&](std::atomic<int64_t>& next) {
        for (int64_t w; (w = next.fetch_add(1, std::memory_order_relaxed)) < n_items;)
          optim_range<K, P, S>(L, L.tensors[items[w].tensor], items[w].begin, items[w].end);
      };
      std::atomic<int64_t> next{0};
      if (n_threads <= 1) return work(next);
      at::parallel_for(0, n_threads, 1, [&](int64_t, int64_t) { work(next); });
    });
  };
  switch (L.param_dtype) {
    case DType::kFloat16:
      return L.state_fp32 ? run.template operator()<c10::Half, float>() : run.template operator()<c10::Half, c10::Half>();
    case DType::kBFloat16:
      return L.state_fp32 ? run.template operator()<c10::BFloat16, float>()
                          : run.template operator()<c10::BFloat16, c10::BFloat16>();
    default:
      return run.template operator()<float, float>();
  }
}

}  // namespace ember::cpu::EMBER_ISA
