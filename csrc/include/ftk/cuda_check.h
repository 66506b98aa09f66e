// The checks every CUDA runtime call and kernel launch goes through, and the per-device facts
// the launchers share (the current device, its SM count). Host code only: the bindings (built
// by the C++ compiler) include it as well as the .cu files. Nothing here knows torch or pybind11.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>

namespace ftk {

// The error of a CUDA runtime call, unless it succeeded: std::runtime_error naming the call.
inline void check_cuda(cudaError_t err, const char* call) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("ftkernels: ") + call + " failed: " + cudaGetErrorString(err));
}

}  // namespace ftk

// A CUDA runtime call that must succeed: throws std::runtime_error naming the call.
#define FTK_CUDA_CHECK(call) ::ftk::check_cuda((call), #call)

// After every <<<...>>>: a bad configuration (or an earlier sticky error) is reported here,
// with the kernel's name, instead of surfacing at some later unrelated call.
#define FTK_CHECK_LAUNCH(kernel_name)                                                        \
  do {                                                                                       \
    const cudaError_t ftk_err_ = cudaGetLastError();                                         \
    if (ftk_err_ != cudaSuccess)                                                             \
      throw std::runtime_error(std::string("ftkernels: launching ") + (kernel_name) +        \
                               " failed: " + cudaGetErrorString(ftk_err_));                  \
  } while (0)

namespace ftk {

// The calling thread's current device, and its SM count, queried once per device and cached
// (devices past kMaxCachedDevices are queried on every call). Shared by every CUDA launcher.
inline int current_device() {
  int dev = 0;
  FTK_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

constexpr int kMaxCachedDevices = 64;

inline int sm_count(int dev) {
  static std::atomic<int> cache[kMaxCachedDevices];  // 0: not yet asked
  if (dev < kMaxCachedDevices) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  FTK_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
  v = std::max(v, 1);
  if (dev < kMaxCachedDevices) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

}  // namespace ftk
