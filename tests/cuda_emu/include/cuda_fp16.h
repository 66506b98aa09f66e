// __half as a 16-bit pattern with CUDA's conversions: float -> half rounds to nearest even
// (through the compiler's _Float16, IEEE binary16), half -> float is exact.
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits_;
};
struct __half2 {
  __half x, y;
};
static_assert(sizeof(__half) == 2 && sizeof(__half2) == 4, "CUDA's sizes");

inline __half __float2half_rn(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  __half r;
  std::memcpy(&r.bits_, &h, 2);
  return r;
}
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits_, 2);
  return static_cast<float>(v);
}
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits_; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
