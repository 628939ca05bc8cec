// Picks the CPU kernel table for this machine once, at first use.
#include "cpu/kernels.h"

namespace ember::cpu {

static bool has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

const Kernels& kernels() {
  static const Kernels& chosen = has_avx512() ? kernels_avx512() : kernels_default();
  return chosen;
}

const char* isa() { return has_avx512() ? "avx512" : "portable"; }

}  // namespace ember::cpu
