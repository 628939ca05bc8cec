// AVX-512 build of the CPU kernels. The target pragma comes before any include so that ATen's
// 512-bit Vectorized specialisations (selected by CPU_CAPABILITY_AVX512) compile in this unit only;
// dispatch.cpp calls into it only after checking the CPU at run time.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
// GCC's C++ front end does not define the ISA macros for a target pragma; sleef.h and ATen's vec512
// headers test them, so they are set by hand (this unit is compiled for AVX-512 in full).
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define EMBER_ISA avx512
#include "cpu/kernels_impl.h"

namespace ember::cpu {
const IsaKernels& kernels_avx512() { return avx512::table(); }
}  // namespace ember::cpu
#else
#include "cpu/kernels.h"
namespace ember::cpu {
const IsaKernels& kernels_avx512() { return kernels_default(); }
}  // namespace ember::cpu
#endif
