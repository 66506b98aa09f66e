// The instruction-set level of the CPU kernels (cpu_isa.h): what this CPU has, and the limit.
#include <atomic>
#include <cstring>

#include "ftk/cpu_isa.h"

#if FTK_X86
#include <cpuid.h>
#endif

namespace ftk {
namespace {

std::atomic<CpuIsa> isa_limit{CpuIsa::AVX512};

CpuIsa detect() {
#if FTK_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  return avx512 ? CpuIsa::AVX512 : avx2 ? CpuIsa::AVX2 : CpuIsa::Base;
#else
  return CpuIsa::Base;
#endif
}

#if FTK_X86
// AMX: CPUID leaf 7 (amx-bf16 EDX bit 22, amx-tile bit 24; amx-fp16 sub-leaf 1 EAX bit 21), and
// the OS saving tile state (XCR0 bits 17 and 18), as oneDNN checks before it uses AMX.
bool amx(bool fp16) {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
  unsigned xcr0_lo, xcr0_hi;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & (3u << 17)) != (3u << 17)) return false;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24))) return false;
  if (!fp16) return (d & (1u << 22)) != 0;
  return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 21));
}
#endif

}  // namespace

CpuIsa set_cpu_isa_limit(CpuIsa limit) { return isa_limit.exchange(limit); }
CpuIsa cpu_isa_limit() { return isa_limit.load(std::memory_order_relaxed); }

CpuIsa cpu_isa_max() {
  static const CpuIsa max = detect();
  return max;
}

CpuIsa cpu_isa_level() {
  const CpuIsa limit = cpu_isa_limit(), max = cpu_isa_max();
  return static_cast<int>(limit) < static_cast<int>(max) ? limit : max;
}

bool cpu_has(const char* feature) {
#if FTK_X86
  __builtin_cpu_init();
  // __builtin_cpu_supports takes a literal: the names probed, as /proc/cpuinfo spells them.
#define FTK_PROBE(cpuinfo_name, gcc_name) \
  if (std::strcmp(feature, cpuinfo_name) == 0) return __builtin_cpu_supports(gcc_name);
  FTK_PROBE("avx2", "avx2")
  FTK_PROBE("fma", "fma")
  FTK_PROBE("f16c", "f16c")
  FTK_PROBE("avx512f", "avx512f")
  FTK_PROBE("avx512bw", "avx512bw")
  FTK_PROBE("avx512vl", "avx512vl")
  FTK_PROBE("avx512_bf16", "avx512bf16")
  FTK_PROBE("avx512_fp16", "avx512fp16")
#undef FTK_PROBE
  if (std::strcmp(feature, "amx_bf16") == 0) return amx(false);
  if (std::strcmp(feature, "amx_fp16") == 0) return amx(true);
#else
  (void)feature;
#endif
  return false;
}

}  // namespace ftk
