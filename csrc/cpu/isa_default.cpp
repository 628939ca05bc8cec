// Portable build of the CPU kernels (any x86-64 or Arm CPU).
#define EMBER_ISA portable
#include "cpu/kernels_impl.h"

namespace ember::cpu {
const IsaKernels& kernels_default() { return portable::table(); }
}  // namespace ember::cpu
