// AdamW8bit step on the CPU, compiled once per instruction set (included by kernels_impl.h).
//
// Every kQBlock-element block of every tensor is one work item: its int8 / uint8 codes are widened,
// dequantized (csrc/optim8bit.h), updated by ember::opt_update (the same Adam as ember.optim.AdamW),
// requantized against the block's new absmax and written back, all from L1-resident scratch. Since
// a block never straddles two threads, absmax needs no cross-thread reduction. A step moves
// p, g (read) and p (written) plus 4 bytes of codes and 16 bytes of absmax per 256 elements:
// about 16 B per fp32 parameter, against fp32 AdamW's 28.
#pragma once
#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "cpu/kernels.h"
#include "cpu/optim_impl.h"
#include "optim8bit.h"

namespace ember::cpu::EMBER_ISA {

// opt_update's math policy plus what the quantizer needs.
struct Vec8Math : VecMath<float> {
  static V abs(const V& x) { return x.abs(); }
  static V round(const V& x) { return x.round(); }  // half to even, like torch.round
  static V copysign(const V& x, const V& s) { return V::blendv(x, V(0.0f) - x, s < V(0.0f)); }
  // a / b, correctly rounded, from rb = RN(1 / b): y = RN(a rb) is within an ulp, its remainder
  // a - y b is exact in one FMA, and y + remainder * rb rounds to RN(a / b) (Markstein's theorem;
  // checked exhaustively for the 255 + 256 codes and on 2e8 random (m, absmax) pairs). Vector
  // division was this kernel's bottleneck. Without hardware FMA, fmadd rounds twice: divide then.
  static V div(const V& a, const V& b, const V& rb) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    const V y = a * rb;
    return at::vec::fmadd(at::vec::fmadd(V(0.0f) - y, b, a), rb, y);
#else
    (void)rb;
    return a / b;
#endif
  }
};

// Largest lane, NaN-propagating like torch.amax.
inline float lane_max(const at::vec::Vectorized<float>& x) {
  alignas(64) float lanes[at::vec::Vectorized<float>::size()];
  x.store(lanes);
  float r = lanes[0];
  for (int64_t k = 1; k < at::vec::Vectorized<float>::size(); ++k) r = (r > lanes[k] || r != r) ? r : lanes[k];
  return r;
}

template <typename P>
void adamw8bit_block(const Opt8Launch& L, const Opt8Tensor& t, int64_t blk) {
  using V = at::vec::Vectorized<float>;
  constexpr int64_t kW = V::size();
  constexpr int64_t kStep = Pair<float>::kStep;
  static_assert(kQBlock % kStep == 0);
  const int64_t begin = blk * kQBlock, count = std::min<int64_t>(kQBlock, t.n - begin);
  alignas(64) float qm[kQBlock], qv[kQBlock], m[kQBlock], v[kQBlock];
  // Codes widened to float (plain loops: the compiler vectorises them for this ISA). Past the end of
  // the tensor they are 0 and so are p and g, which makes the padded moments exactly 0: the block's
  // absmax is unaffected, as with the reference's zero padding.
  const int8_t* cm = t.exp_avg + begin;
  const uint8_t* cv = t.exp_avg_sq + begin;
  for (int64_t k = 0; k < count; ++k) qm[k] = static_cast<float>(cm[k]);
  for (int64_t k = 0; k < count; ++k) qv[k] = static_cast<float>(cv[k]);
  for (int64_t k = count; k < kQBlock; ++k) qm[k] = qv[k] = 0.0f;

  const V am(t.exp_avg_absmax[blk]), av(t.exp_avg_sq_absmax[blk]), inv_scale(L.inv_scale);
  V mmax(0.0f), vmax(0.0f), unused(0.0f);
  P* param = static_cast<P*>(t.param) + begin;
  const P* grad = static_cast<const P*>(t.grad) + begin;
  for (int64_t i = 0; i < count; i += kStep) {
    const int64_t c = std::min(kStep, count - i);
    auto p = Pair<P>::load(param + i, c);
    auto g = Pair<P>::load(grad + i, c);
    for (int64_t k = 0; k < 2; ++k) {
      const int64_t o = i + k * kW;
      V mk = dequant_signed<Vec8Math>(V::loadu(qm + o), am);
      V vk = dequant_unsigned<Vec8Math>(V::loadu(qv + o), av);
      const V gk = L.inv_scale != 1.0f ? g[k] * inv_scale : g[k];
      opt_update<Opt::kAdam, Vec8Math>(L.hyper, t.coef, p[k], gk, mk, vk, unused);
      mk.store(m + o);
      vk.store(v + o);
      mmax = at::vec::maximum(mmax, mk.abs());
      vmax = at::vec::maximum(vmax, vk);
    }
    Pair<P>::store(param + i, p, c);
  }

  const float absm = lane_max(mmax), absv = lane_max(vmax);
  const float scale_m = std::max(absm, 1e-30f), scale_v = std::max(absv, 1e-30f);
  const V sm(scale_m), sv(scale_v), rm(1.0f / scale_m), rv(1.0f / scale_v);
  for (int64_t i = 0; i < count; i += kW) {
    quant_signed<Vec8Math>(V::loadu(m + i), sm, rm).store(qm + i);
    quant_unsigned<Vec8Math>(V::loadu(v + i), sv, rv).store(qv + i);
  }
  int8_t* om = t.exp_avg + begin;
  uint8_t* ov = t.exp_avg_sq + begin;
  for (int64_t k = 0; k < count; ++k) om[k] = static_cast<int8_t>(static_cast<int32_t>(qm[k]));
  for (int64_t k = 0; k < count; ++k) ov[k] = static_cast<uint8_t>(static_cast<int32_t>(qv[k]));
  t.exp_avg_absmax[blk] = absm;
  t.exp_avg_sq_absmax[blk] = absv;
}

// (tensor, run of blocks) work items of at most kChunkBlocks blocks, all in one parallel loop.
inline void adamw8bit_step(const Opt8Launch& L) {
  constexpr int64_t kChunkBlocks = 256;  // 64K elements: enough work to amortise a hand-out
  struct Item {
    int64_t tensor, begin, end;
  };
  std::vector<Item> items;
  for (int64_t i = 0; i < L.count; ++i) {
    const int64_t nb = (L.tensors[i].n + kQBlock - 1) / kQBlock;
    for (int64_t b = 0; b < nb; b += kChunkBlocks) items.push_back({i, b, std::min(b + kChunkBlocks, nb)});
  }
  auto run = [&]<typename P>() {
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t w = lo; w < hi; ++w)
        for (int64_t b = items[w].begin; b < items[w].end; ++b)
          adamw8bit_block<P>(L, L.tensors[items[w].tensor], b);
    });
  };
  switch (L.param_dtype) {
    case DType::kFloat16: return run.template operator()<c10::Half>();
    case DType::kBFloat16: return run.template operator()<c10::BFloat16>();
    default: return run.template operator()<float>();
  }
}

}  // namespace ember::cpu::EMBER_ISA
