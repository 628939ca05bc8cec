// Activation kinds shared by every backend's kernels. Plain C++ (no torch, no CUDA headers) so the
// CUDA sources, the CPU kernels and the torch glue all agree on one numbering.
#pragma once
#include <cstdint>

namespace ember {

// The activations, mirrored from pyext/ember/activations.py (same ids and names; ember._C.activations()
// exports this list and a test checks the two agree). kNone is the linear / int8 epilogue without one.
// EMBER_FOR_EACH_ACT lists every member but kNone, so that each switch over activations (parse_act and
// the kernels' dispatchers) is written once and a new activation is one line here plus its math.
enum class Act : int32_t {
  kNone = -1,
  kRelu = 0,
  kSilu = 1,
  kGelu = 2,      // exact: 0.5 x (1 + erf(x / sqrt 2))
  kGeluTanh = 3,  // tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
  kRelu2 = 4,     // squared ReLU: max(x, 0)^2
};

#define EMBER_FOR_EACH_ACT(X) \
  X(kRelu, "relu")            \
  X(kSilu, "silu")            \
  X(kGelu, "gelu")            \
  X(kGeluTanh, "gelu_tanh")   \
  X(kRelu2, "relu2")

// Element types the kernels are instantiated for. Low-precision inputs compute in fp32.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Constants written once so every backend rounds the same way.
constexpr double kSqrt1_2 = 0.70710678118654752440;        // 1/sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;     // 1/sqrt(2 pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;    // sqrt(2/pi)
constexpr double kGeluTanhCoeff = 0.044715;

}  // namespace ember
