// The bodies of ember's CPU kernels, compiled once per instruction set: isa_default.cpp and
// isa_avx512.cpp each define EMBER_ISA (and the matching CPU_CAPABILITY) and include this file.
#pragma once
#include "cpu/kernels.h"
#include "cpu/vec_activation.h"
#include "cpu/int8_impl.h"

namespace ember::cpu::EMBER_ISA {

// Calls f.template operator()<scalar_t, A>() for the runtime (dtype, act) pair.
template <typename F>
void dispatch(DType dtype, Act act, F&& f) {
  auto with_act = [&](auto tag) {
    using scalar_t = decltype(tag);
    switch (act) {
      case Act::kRelu: return f.template operator()<scalar_t, Act::kRelu>();
      case Act::kSilu: return f.template operator()<scalar_t, Act::kSilu>();
      case Act::kGelu: return f.template operator()<scalar_t, Act::kGelu>();
      case Act::kGeluTanh: return f.template operator()<scalar_t, Act::kGeluTanh>();
    }
  };
  switch (dtype) {
    case DType::kFloat32: return with_act(float{});
    case DType::kFloat64: return with_act(double{});
    case DType::kFloat16: return with_act(c10::Half{});
    case DType::kBFloat16: return with_act(c10::BFloat16{});
  }
}

inline void unary_act(const void* x, void* y, int64_t n, DType dtype, Act act) {
  dispatch(dtype, act, [&]<typename T, Act A>() {
    map_rows<T, 1, 1>({static_cast<const T*>(x)}, {n}, {static_cast<T*>(y)}, 1, n,
                      [](const auto& in) { return std::array{act_forward<A>(in[0])}; });
  });
}

inline void unary_act_backward(const void* grad, const void* x, void* dx, int64_t n, DType dtype, Act act) {
  dispatch(dtype, act, [&]<typename T, Act A>() {
    map_rows<T, 2, 1>({static_cast<const T*>(grad), static_cast<const T*>(x)}, {n, n}, {static_cast<T*>(dx)}, 1, n,
                      [](const auto& in) { return std::array{act_backward<A>(in[0], in[1])}; });
  });
}

inline void gated_act(const void* gate, const void* up, void* out, int64_t rows, int64_t cols,
                      int64_t gate_row_stride, int64_t up_row_stride, DType dtype, Act act) {
  dispatch(dtype, act, [&]<typename T, Act A>() {
    map_rows<T, 2, 1>({static_cast<const T*>(gate), static_cast<const T*>(up)}, {gate_row_stride, up_row_stride},
                      {static_cast<T*>(out)}, rows, cols,
                      [](const auto& in) { return std::array{act_forward<A>(in[0]) * in[1]}; });
  });
}

inline void gated_act_backward(const void* grad, const void* gate, const void* up, void* dgate, void* dup,
                               int64_t rows, int64_t cols, int64_t gate_row_stride, int64_t up_row_stride,
                               DType dtype, Act act) {
  dispatch(dtype, act, [&]<typename T, Act A>() {
    map_rows<T, 3, 2>(
        {static_cast<const T*>(grad), static_cast<const T*>(gate), static_cast<const T*>(up)},
        {cols, gate_row_stride, up_row_stride}, {static_cast<T*>(dgate), static_cast<T*>(dup)}, rows, cols,
        // act(gate) is recomputed here instead of being saved by the forward: one extra exp/erf per
        // element is cheaper than storing and re-reading a full activation tensor.
        [](const auto& in) {
          return std::array{act_backward<A>(in[0] * in[2], in[1]), in[0] * act_forward<A>(in[1])};
        });
  });
}

inline const Kernels& table() {
  static const Kernels k{&unary_act, &unary_act_backward, &gated_act, &gated_act_backward,
                         &quantize_rows, &dequant_epilogue, &w8a16_gemv, &w8a8_gemv, &w8a8_gemv_packed};
  return k;
}

}  // namespace ember::cpu::EMBER_ISA
