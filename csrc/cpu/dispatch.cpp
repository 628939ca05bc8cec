// Picks the CPU kernel tables for this machine once, at first use.
//
// Three tables: portable, AVX-512 (with the VNNI int8 kernels where the CPU has VNNI) and AVX-512 + AMX
// (the AVX-512 table whose int8 GEMMs run on the AMX tile unit, cpu/isa_amx.cpp).
//
// EMBER_CPU_ISA overrides the choice, so the tests can run every table this CPU can run:
//   portable   the portable table on any CPU
//   avx512     AVX-512 (and VNNI) without AMX, on an AMX machine too
//   (unset, native, amx or anything else)   the best this CPU and OS allow
// AMX needs more than the CPUID bits: Linux (5.16+) hands out the 8 KiB tile-data state only to a
// process that asks for it (arch_prctl ARCH_REQ_XCOMP_PERM); a tile instruction without that permission
// faults. So AMX is used only once that request succeeded, and otherwise the reason is kept for
// `python -m ember info` (cpu_isa_report).
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "cpu/kernels.h"

namespace ember::cpu {
namespace {

bool has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool has_vnni() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// Whether AMX (tile + int8 + bf16) can run in this process; *why_not says why not when it cannot.
bool enable_amx(std::string* why_not) {
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
  if (!kernels_amx_built()) {
    *why_not = "this build of ember._C has no AMX kernels (compiler without amx-tile/amx-int8/amx-bf16)";
    return false;
  }
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_max(0, nullptr) < 7) {
    *why_not = "CPU has no AMX (no CPUID leaf 7)";
    return false;
  }
  __cpuid_count(7, 0, a, b, c, d);
  // CPUID.(7,0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE, bit 25 AMX-INT8.
  const bool bf16 = d & (1u << 22), tile = d & (1u << 24), int8 = d & (1u << 25);
  if (!(tile && int8 && bf16)) {
    *why_not = std::string("CPU has no AMX (CPUID: amx_tile ") + (tile ? "yes" : "no") + ", amx_int8 " +
               (int8 ? "yes" : "no") + ", amx_bf16 " + (bf16 ? "yes" : "no") + ")";
    return false;
  }
  // The tile state must also be enabled by the OS in XCR0 (bits 17 XTILECFG and 18 XTILEDATA).
  __cpuid(1, a, b, c, d);
  if (!(c & (1u << 27))) {
    *why_not = "OS has not enabled XSAVE (CPUID.1:ECX.OSXSAVE = 0)";
    return false;
  }
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) {
    *why_not = "OS does not enable the AMX tile state (XCR0 bits 17/18 clear)";
    return false;
  }
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    const int err = errno;
    *why_not = std::string("Linux refused the AMX tile state (arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA): ") +
               std::strerror(err) + "; needs Linux 5.16+)";
    return false;
  }
  return true;
#else
  *why_not = "AMX is x86-64 Linux only";
  return false;
#endif
}

enum class Table { kPortable, kAvx512, kAmx };

struct Choice {
  Table table;
  std::string amx_off;  // why the AMX table is not used (empty when it is)
};

const Choice& choice() {
  static const Choice chosen = [] {
    const char* forced = std::getenv("EMBER_CPU_ISA");
    const std::string want = forced ? forced : "";
    if (want == "portable") return Choice{Table::kPortable, "EMBER_CPU_ISA=portable"};
    if (!has_avx512()) return Choice{Table::kPortable, "CPU has no AVX-512"};
    if (want == "avx512") return Choice{Table::kAvx512, "EMBER_CPU_ISA=avx512 forces AMX off"};
    std::string why;
    if (!enable_amx(&why)) return Choice{Table::kAvx512, why};
    return Choice{Table::kAmx, ""};
  }();
  return chosen;
}

const IsaKernels& for_this_cpu() {
  switch (choice().table) {
    case Table::kAmx: return kernels_amx();
    case Table::kAvx512: return kernels_avx512();
    case Table::kPortable: break;
  }
  return kernels_default();
}

}  // namespace

const ActivationKernels& activation_kernels() { return for_this_cpu().activation; }
const LinearKernels& linear_kernels() { return for_this_cpu().linear; }
const OptimKernels& optim_kernels() { return for_this_cpu().optim; }
const Int8Kernels& int8_kernels() { return for_this_cpu().int8; }

const char* isa() {
  switch (choice().table) {
    case Table::kAmx: return "avx512+amx";
    case Table::kAvx512: return "avx512";
    case Table::kPortable: break;
  }
  return "portable";
}

bool amx_in_use() { return choice().table == Table::kAmx; }

bool native_16bit_gemm(DType dtype) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const std::pair<bool, bool> native = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_max(0, nullptr) < 7) return std::pair<bool, bool>{false, false};
    __cpuid_count(7, 0, a, b, c, d);
    const bool amx_bf16 = d & (1u << 22), avx512_fp16 = d & (1u << 23);
    const unsigned leaf0_max = a;
    unsigned a1 = 0;
    if (leaf0_max >= 1) __cpuid_count(7, 1, a1, b, c, d);
    // CPUID.(7,1):EAX bit 5 AVX512-BF16, bit 21 AMX-FP16.
    const bool avx512_bf16 = a1 & (1u << 5), amx_fp16 = a1 & (1u << 21);
    return std::pair<bool, bool>{avx512_bf16 || amx_bf16, avx512_fp16 || amx_fp16};
  }();
  if (dtype == DType::kBFloat16) return native.first;
  if (dtype == DType::kFloat16) return native.second;
#else
  (void)dtype;
#endif
  return false;
}

std::string isa_report() {
  const Choice& c = choice();
  std::string int8;
  switch (c.table) {
    case Table::kAmx: int8 = "amx (tile int8 / bf16 GEMMs, W8A16 decode from 3 rows; VNNI or AVX-512 for W8A8 decode and shapes AMX does not take)"; break;
    case Table::kAvx512: int8 = has_vnni() ? "avx512-vnni" : "avx512 (no VNNI: ATen's int8 GEMM)"; break;
    case Table::kPortable: int8 = "portable (ATen's int8 GEMM)"; break;
  }
  std::string s = std::string("table: ") + isa() + "\nint8: " + int8;
  if (!c.amx_off.empty()) s += "\namx off: " + c.amx_off;
  s += std::string("\n16-bit GEMMs: bf16 ") + (native_16bit_gemm(DType::kBFloat16) ? "native" : "not native") +
       ", fp16 " + (native_16bit_gemm(DType::kFloat16) ? "native" : "not native") +
       (native_16bit_gemm(DType::kBFloat16) && native_16bit_gemm(DType::kFloat16)
            ? ""
            : " (ember computes those GEMMs in fp32)");
  return s;
}

}  // namespace ember::cpu
