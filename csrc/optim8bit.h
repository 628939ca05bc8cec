// AdamW8bit's block-wise 8-bit moment format, written once for every C++ backend (the CPU kernels
// instantiate these with at::vec::Vectorized<float>, the CUDA kernel with float; M is the same math
// policy as opt_update's, plus abs, round and copysign).
//
// A tensor's moments are cut into blocks of kQBlock elements in their logical (contiguous) order;
// each block keeps one fp32 absmax per moment and one byte per element:
//   exp_avg     int8:  m = absmax * sign(q) (|q| / 127)^2
//   exp_avg_sq  uint8: v = absmax * (q / 255)^4
// The operations and their order are those of pyext/ember/ops/optim8bit.py's reference (true
// divisions, correctly rounded sqrt, round half to even), so every backend reproduces its codes
// bit for bit from the same fp32 moments. Divisions go through M::div(a, b, rb) with rb = RN(1 / b),
// which must return the correctly rounded a / b: the CPU policy uses rb for a multiply and two FMAs
// (vector division is its bottleneck), CUDA just divides. (q * (1 / 127) alone is 1 ulp off for 16
// of the 255 codes.)
#pragma once
#include "optim.h"

namespace ember {

constexpr int kQBlock = 256;
constexpr float kInv127 = 1.0f / 127.0f, kInv255 = 1.0f / 255.0f;

template <class M, class V>
EMBER_HD V dequant_signed(const V& q, const V& absmax) {
  const V u = M::div(q, M::splat(127.0f), M::splat(kInv127));
  return (absmax * M::abs(u)) * u;  // = (absmax * sign(u)) * u * u, rounded identically
}

template <class M, class V>
EMBER_HD V dequant_unsigned(const V& q, const V& absmax) {
  const V u = M::div(q, M::splat(255.0f), M::splat(kInv255));
  const V u2 = u * u;
  return (absmax * u2) * u2;
}

// The code of m as an integral float in [-127, 127]; scale = max(block absmax, 1e-30), rscale = 1 / scale.
template <class M, class V>
EMBER_HD V quant_signed(const V& m, const V& scale, const V& rscale) {
  const V unit = M::div(m, scale, rscale);
  return M::copysign(M::round(M::splat(127.0f) * M::sqrt(M::abs(unit))), unit);
}

// The code of v as an integral float in [0, 255]; scale = max(block absmax, 1e-30), rscale = 1 / scale.
template <class M, class V>
EMBER_HD V quant_unsigned(const V& v, const V& scale, const V& rscale) {
  const V unit = M::max(M::div(v, scale, rscale), M::splat(0.0f));
  return M::round(M::splat(255.0f) * M::sqrt(M::sqrt(unit)));
}

}  // namespace ember
