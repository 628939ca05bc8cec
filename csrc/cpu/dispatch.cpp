// Picks the CPU kernel tables for this machine once, at first use.
//
// EMBER_CPU_ISA=portable forces the portable table on any CPU: the tests use it to check the
// portable build on AVX-512 machines, where it would otherwise never run.
#include <cstdlib>
#include <cstring>

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

static bool use_avx512() {
  static const bool chosen = [] {
    const char* forced = std::getenv("EMBER_CPU_ISA");
    if (forced != nullptr && std::strcmp(forced, "portable") == 0) return false;
    return has_avx512();
  }();
  return chosen;
}

static const IsaKernels& for_this_cpu() { return use_avx512() ? kernels_avx512() : kernels_default(); }

const ActivationKernels& activation_kernels() { return for_this_cpu().activation; }
const LinearKernels& linear_kernels() { return for_this_cpu().linear; }
const OptimKernels& optim_kernels() { return for_this_cpu().optim; }
const Int8Kernels& int8_kernels() { return for_this_cpu().int8; }

const char* isa() { return use_avx512() ? "avx512" : "portable"; }

}  // namespace ember::cpu
