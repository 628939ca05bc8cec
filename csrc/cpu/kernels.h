// Entry points of ember's CPU kernels, one table per instruction set. Raw pointers and sizes only:
// the ISA-specific translation units (isa_*.cpp) see no torch tensor types.
#pragma once
#include <cstdint>

#include "activation.h"

namespace ember::cpu {

struct Kernels {
  // y = act(x); n elements, contiguous.
  void (*unary_act)(const void* x, void* y, int64_t n, DType dtype, Act act);
  // dx = grad * act'(x); n elements, contiguous.
  void (*unary_act_backward)(const void* grad, const void* x, void* dx, int64_t n, DType dtype, Act act);
  // out = act(gate) * up over (rows, cols); gate/up rows start every *_row_stride elements,
  // out is contiguous.
  void (*gated_act)(const void* gate, const void* up, void* out, int64_t rows, int64_t cols,
                    int64_t gate_row_stride, int64_t up_row_stride, DType dtype, Act act);
  // dgate = grad * up * act'(gate), dup = grad * act(gate); grad, dgate and dup contiguous.
  void (*gated_act_backward)(const void* grad, const void* gate, const void* up, void* dgate, void* dup,
                             int64_t rows, int64_t cols, int64_t gate_row_stride, int64_t up_row_stride,
                             DType dtype, Act act);
};

const Kernels& kernels_default();
const Kernels& kernels_avx512();
// The table for this machine's CPU (AVX-512 when the CPU has it).
const Kernels& kernels();
const char* isa();

}  // namespace ember::cpu
