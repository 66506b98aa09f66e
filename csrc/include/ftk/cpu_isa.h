// Instruction-set levels of the CPU kernels, and the dispatch of a loop to them. No torch.
//
// Every CPU kernel runs at one level: the widest this CPU has, capped by a process-wide limit
// (set_cpu_isa_limit: the FTK_CPU_ISA environment variable, read by ftkernels/_native.py, and
// tests that run every level on one machine). The levels and what each needs:
//   Base    baseline x86-64 (SSE2), or the compiler's target elsewhere (aarch64: NEON);
//   AVX2    avx2 + fma + f16c (Haswell, Zen 1 and later);
//   AVX512  avx512f + avx512bw + avx512vl on top (Skylake-SP, Ice Lake, Zen 4 and later).
// The module itself is compiled for the baseline; the wider code lives in functions with a
// target attribute, so no instruction of a level runs unless the CPU has it.
//
// Loops written in plain C++ are compiled once per level by with_isa: the loop is an
// always-inline lambda, inlined into a function per level (run_at), where GCC vectorises it for
// that level's registers. Kernels with hand-written intrinsics check cpu_isa_level() themselves.
// NOTE: FMA is in the AVX2 target, but the module is built with -ffp-contract=off, so only an
// explicit fma intrinsic fuses; every loop rounds each product as the reference does.
#pragma once

#include <cstdint>

namespace ftk {

enum class CpuIsa : int { Base = 0, AVX2 = 1, AVX512 = 2 };

CpuIsa set_cpu_isa_limit(CpuIsa limit);  // returns the previous limit
CpuIsa cpu_isa_limit();
CpuIsa cpu_isa_max();    // the widest level this CPU has (Base off x86)
CpuIsa cpu_isa_level();  // min(limit, max): the level every kernel runs at

// One feature of this CPU (as /proc/cpuinfo names it, "avx512_bf16"), whatever the limit;
// false for a name this build does not probe, and off x86.
bool cpu_has(const char* feature);

// FTK_GENERIC_CPU compiles the non-x86 code on x86 too (tests/test_native_abi.py checks that
// the other architectures' path compiles).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(FTK_GENERIC_CPU)
#define FTK_X86 1
#define FTK_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FTK_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#else
#define FTK_X86 0
#define FTK_TARGET_AVX2
#define FTK_TARGET_AVX512
#endif

// The attribute of the lambdas with_isa takes: they must inline into each level's copy.
#if defined(__GNUC__)
#define FTK_ISA_BODY __attribute__((always_inline))
#else
#define FTK_ISA_BODY
#endif

namespace cpu {

template <typename F>
FTK_TARGET_AVX512 void run_avx512(const F& f) { f(); }
template <typename F>
FTK_TARGET_AVX2 void run_avx2(const F& f) { f(); }
template <typename F>
void run_base(const F& f) { f(); }

// Runs body() compiled for the current level: with_isa([&]() FTK_ISA_BODY { loop... }).
template <typename F>
void with_isa(const F& body) {
#if FTK_X86
  switch (cpu_isa_level()) {
    case CpuIsa::AVX512: run_avx512(body); return;
    case CpuIsa::AVX2: run_avx2(body); return;
    case CpuIsa::Base: break;
  }
#endif
  run_base(body);
}

}  // namespace cpu
}  // namespace ftk
