// Shared by every kernel file: the dtype enum that crosses from Python, and the checks that
// turn a bad argument into std::invalid_argument (pybind11 raises it as ValueError).
// Nothing here knows torch or pybind11.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define FTK_HD __host__ __device__ __forceinline__
#else
#define FTK_HD inline
#endif

namespace ftk {

// Values cross the binding as int; python/ftkernels/_formats.py holds the same table (the
// modules export theirs, and tests/test_native_abi.py compares each pair).
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

inline bool valid_dtype(int d) { return d >= 0 && d <= 2; }

#define FTK_CHECK_ARG(cond, msg)                                                        \
  do {                                                                                  \
    if (!(cond)) throw std::invalid_argument(std::string("ftkernels: ") + (msg));       \
  } while (0)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace ftk
