// The CUDA types the kernels and launchers name, as host types of the same size and alignment
// (vector_types.h and driver_types.h of the CUDA toolkit): the built-in vectors keep their
// 8- and 16-byte alignment, so UBSan reports a vector access through a misaligned pointer.
#pragma once

#include <cstdint>

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define FTK_EMU_VEC2(name, T, align) \
  struct alignas(align) name {       \
    T x, y;                          \
  };                                 \
  inline name make_##name(T x, T y) { return name{x, y}; }
#define FTK_EMU_VEC4(name, T, align)             \
  struct alignas(align) name {                   \
    T x, y, z, w;                                \
  };                                             \
  inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }
FTK_EMU_VEC2(float2, float, 8)
FTK_EMU_VEC4(float4, float, 16)
FTK_EMU_VEC2(int2, int, 8)
FTK_EMU_VEC4(int4, int, 16)
FTK_EMU_VEC2(uint2, unsigned, 8)
FTK_EMU_VEC4(uint4, unsigned, 16)
FTK_EMU_VEC2(ushort2, unsigned short, 4)
FTK_EMU_VEC4(ushort4, unsigned short, 8)
FTK_EMU_VEC4(uchar4, unsigned char, 4)
#undef FTK_EMU_VEC2
#undef FTK_EMU_VEC4
static_assert(sizeof(uint4) == 16 && alignof(uint4) == 16, "uint4 as CUDA lays it out");

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorCudartUnloading = 4,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
};
typedef enum cudaError cudaError_t;

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;
