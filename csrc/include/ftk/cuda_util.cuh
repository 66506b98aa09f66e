// For the .cu files only: device storage types, fp32 conversions and the launch helpers
// every CUDA kernel file shares.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "ftk/common.h"
#include "ftk/cuda_check.h"

namespace ftk {

// Calls fn(T{}) with T the device storage type of dtype (float, __half, __nv_bfloat16).
template <typename Fn>
void with_dtype(DType d, Fn&& fn) {
  switch (d) {
    case DType::Float32: fn(float{}); break;
    case DType::Float16: fn(__half{}); break;
    case DType::BFloat16: fn(__nv_bfloat16{}); break;
  }
}

// Exact widening to fp32, and narrowing with round to nearest even (torch's .to(dtype)).
template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The 32 bits of a pair of 16-bit values (for packing two results into one word of a vector store).
__device__ __forceinline__ uint32_t bits_of(__nv_bfloat162 h) {
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}
__device__ __forceinline__ uint32_t bits_of(__half2 h) {
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}

// Resident CTAs of Threads threads per SM for Kernel (registers and static shared memory
// decide), asked once per device.
template <auto Kernel, int Threads>
int ctas_per_sm(int dev) {
  static std::atomic<int> cache[kMaxCachedDevices];
  if (dev < kMaxCachedDevices) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  FTK_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, Kernel, Threads, 0));
  v = std::max(v, 1);
  if (dev < kMaxCachedDevices) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

// Launches Kernel on `stream` with one CTA per unit of `work` (CTA iterations of its grid-stride
// loop), capped at one full wave: the loop covers the rest.
template <auto Kernel, int Threads, typename... Args>
void launch(const char* name, int64_t work, cudaStream_t stream, Args... args) {
  const int dev = current_device();
  const int64_t wave = static_cast<int64_t>(sm_count(dev)) * ctas_per_sm<Kernel, Threads>(dev);
  const int grid = static_cast<int>(std::max<int64_t>(1, std::min(work, wave)));
  Kernel<<<grid, Threads, 0, stream>>>(args...);
  FTK_CHECK_LAUNCH(name);
}

}  // namespace ftk
