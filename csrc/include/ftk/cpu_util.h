// CPU helpers: dtype conversion and a fork-join parallel_for. Header-only, no torch.
#pragma once

#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#include <exception>

#include "ftk/common.h"

namespace ftk {
namespace cpu {

using bf16_t = uint16_t;
using f16_t = _Float16;  // GCC >= 12 and Clang >= 15 on x86-64; conversions round to nearest even

inline float to_float(float x) { return x; }
inline float to_float(f16_t x) { return static_cast<float>(x); }
inline float bf16_to_float(bf16_t x) {
  const uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// fp32 -> bf16, round to nearest even as torch does; NaN stays a (quiet) NaN.
inline bf16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<bf16_t>(nan ? ((u >> 16) | 0x40u) : rounded);
}

#if defined(__GNUC__)
#define FTK_CPU_INLINE __attribute__((always_inline)) inline
#else
#define FTK_CPU_INLINE inline
#endif

// Element loads and stores by storage type (bf16 travels as its raw 16 bits). Always inlined,
// so each instruction-set copy of a kernel (cpu_isa.h) vectorises them its own way.
template <typename T> FTK_CPU_INLINE float load_f32(const T* p, int64_t i);
template <> FTK_CPU_INLINE float load_f32<float>(const float* p, int64_t i) { return p[i]; }
template <> FTK_CPU_INLINE float load_f32<f16_t>(const f16_t* p, int64_t i) { return static_cast<float>(p[i]); }
template <> FTK_CPU_INLINE float load_f32<bf16_t>(const bf16_t* p, int64_t i) { return bf16_to_float(p[i]); }

template <typename T> FTK_CPU_INLINE T from_f32(float x);
template <> FTK_CPU_INLINE float from_f32<float>(float x) { return x; }
template <> FTK_CPU_INLINE f16_t from_f32<f16_t>(float x) { return static_cast<f16_t>(x); }
template <> FTK_CPU_INLINE bf16_t from_f32<bf16_t>(float x) { return float_to_bf16(x); }

// Calls fn(T{}) with T the storage type of dtype.
template <typename Fn>
void with_dtype(DType d, Fn&& fn) {
  switch (d) {
    case DType::Float32: fn(float{}); break;
    case DType::Float16: fn(f16_t{}); break;
    case DType::BFloat16: fn(bf16_t{}); break;
  }
}

// Runs fn(begin, end) over [0, n) split into `threads` contiguous ranges; exceptions from
// workers are rethrown here.
// NOTE: with OpenMP (FTK_OPENMP, the default build) the ranges run on the OpenMP pool, which
// is torch's own: torch ships libgomp.so.1 and is loaded first, so the dynamic linker binds
// this module to the same runtime. Threads of our own would compete with torch's workers,
// which spin for a while after every parallel torch op: on 2 cores that made the second
// thread worthless (4096x4096 bf16 dequantize: 2.2 ms on two std::threads, 2.1 ms on one,
// 1.6 ms on the shared pool; a fresh output 14 ms against 7.8 ms).
template <typename Fn>
void parallel_for(int64_t n, int threads, Fn&& fn) {
  if (threads > n) threads = static_cast<int>(n);
  if (threads <= 1) {
    if (n > 0) fn(int64_t{0}, n);
    return;
  }
  const int64_t chunk = ceil_div(n, threads);
  std::vector<std::exception_ptr> errors(threads);
  auto run = [&](int t) {
    const int64_t b = t * chunk, e = b + chunk < n ? b + chunk : n;
    if (b >= e) return;
    try {
      fn(b, e);
    } catch (...) {
      errors[t] = std::current_exception();
    }
  };
#if defined(FTK_OPENMP)
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int t = 0; t < threads; ++t) run(t);
#else
  std::vector<std::thread> pool;  // spawning costs ~20 us a thread
  for (int t = 1; t < threads; ++t) pool.emplace_back(run, t);
  run(0);
  for (auto& th : pool) th.join();
#endif
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// Threads worth using for `work` elements: one per 2^18 (about 0.1 ms of work each).
inline int threads_for(int64_t work, int max_threads) {
  const int64_t t = work >> 18;
  if (t < 1) return 1;
  return t < max_threads ? static_cast<int>(t) : max_threads;
}

}  // namespace cpu
}  // namespace ftk
