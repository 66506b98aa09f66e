// The CUDA runtime calls csrc/ makes, for one emulated device (ordinal 0) whose memory is the
// host's. Managed allocations are tracked, so advice and prefetches are checked as the driver
// checks them: the range must lie inside one managed allocation.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

#include "ftk_emu_types.h"

#define CUDART_VERSION 13000
#define cudaCpuDeviceId (-1)
#define cudaMemAttachGlobal 0x01u

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
enum cudaMemoryAdvise { cudaMemAdviseSetPreferredLocation = 3, cudaMemAdviseSetAccessedBy = 5 };
enum cudaMemLocationType { cudaMemLocationTypeInvalid = 0, cudaMemLocationTypeDevice = 1, cudaMemLocationTypeHost = 2 };
struct cudaMemLocation {
  cudaMemLocationType type;
  int id;
};

namespace ftk_emu {

struct RuntimeState {
  std::mutex mu;
  cudaError_t last_error = cudaSuccess;
  std::map<uintptr_t, size_t> managed;  // start -> bytes
  size_t managed_bytes = 0;
};
inline RuntimeState& runtime() {
  static RuntimeState s;
  return s;
}
inline thread_local int current_device = 0;

// The emulated device's memory: 4 GiB, less what managed allocations hold.
constexpr size_t kDeviceBytes = size_t{4} << 30;

// SMs the emulated device reports (FTK_EMU_SMS, default 3): few, so that launchers that size
// their grid to one wave leave work for the grid-stride loops.
inline int sm_count() {
  static const int n = [] {
    const char* env = std::getenv("FTK_EMU_SMS");
    return env ? std::max(1, static_cast<int>(std::strtol(env, nullptr, 10))) : 3;
  }();
  return n;
}

inline void set_last_error(cudaError_t e) {
  auto& rt = runtime();
  std::lock_guard<std::mutex> lk(rt.mu);
  rt.last_error = e;
}

inline bool in_one_managed_range(const void* p, size_t bytes) {
  auto& rt = runtime();
  std::lock_guard<std::mutex> lk(rt.mu);
  const auto u = reinterpret_cast<uintptr_t>(p);
  auto it = rt.managed.upper_bound(u);
  if (it == rt.managed.begin()) return false;
  --it;
  return u >= it->first && u + bytes <= it->first + it->second;
}

inline bool valid_location(cudaMemLocation loc) {
  return (loc.type == cudaMemLocationTypeDevice && loc.id == 0) || loc.type == cudaMemLocationTypeHost;
}

}  // namespace ftk_emu

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorCudartUnloading: return "driver shutting down";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
  }
  return "unknown error";
}

// Launch errors are sticky until read, as in CUDA.
inline cudaError_t cudaGetLastError() {
  auto& rt = ftk_emu::runtime();
  std::lock_guard<std::mutex> lk(rt.mu);
  const cudaError_t e = rt.last_error;
  rt.last_error = cudaSuccess;
  return e;
}
// The runtime and driver versions the emulation stands for (CUDART_VERSION's encoding).
inline cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = ftk_emu::current_device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  if (d != 0) return cudaErrorInvalidDevice;
  ftk_emu::current_device = d;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int dev) {
  if (dev != 0) return cudaErrorInvalidDevice;
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *v = ftk_emu::sm_count();
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, Kernel, int threads, size_t) {
  if (threads <= 0 || threads > 1024) return cudaErrorInvalidValue;
  *n = 1;
  return cudaSuccess;
}

inline cudaError_t cudaMallocManaged(void** p, size_t bytes, unsigned flags = cudaMemAttachGlobal) {
  if (bytes == 0 || flags != cudaMemAttachGlobal) return cudaErrorInvalidValue;
  auto& rt = ftk_emu::runtime();
  void* q = std::malloc(bytes);  // an exact size: AddressSanitizer reports the first byte past it
  if (q == nullptr) return cudaErrorMemoryAllocation;
  std::memset(q, 0xA5, bytes);  // never zeros: a state read before it is written shows
  std::lock_guard<std::mutex> lk(rt.mu);
  rt.managed[reinterpret_cast<uintptr_t>(q)] = bytes;
  rt.managed_bytes += bytes;
  *p = q;
  return cudaSuccess;
}
inline cudaError_t cudaFree(void* p) {
  if (p == nullptr) return cudaSuccess;
  auto& rt = ftk_emu::runtime();
  std::lock_guard<std::mutex> lk(rt.mu);
  auto it = rt.managed.find(reinterpret_cast<uintptr_t>(p));
  if (it == rt.managed.end()) return cudaErrorInvalidValue;
  rt.managed_bytes -= it->second;
  rt.managed.erase(it);
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemAdvise(const void* p, size_t bytes, cudaMemoryAdvise advice, cudaMemLocation loc) {
  if (advice != cudaMemAdviseSetPreferredLocation && advice != cudaMemAdviseSetAccessedBy) return cudaErrorInvalidValue;
  if (!ftk_emu::valid_location(loc) || !ftk_emu::in_one_managed_range(p, bytes)) return cudaErrorInvalidValue;
  return cudaSuccess;
}
inline cudaError_t cudaMemPrefetchAsync(const void* p, size_t bytes, cudaMemLocation loc, unsigned flags,
                                        cudaStream_t) {
  if (flags != 0 || !ftk_emu::valid_location(loc) || !ftk_emu::in_one_managed_range(p, bytes))
    return cudaErrorInvalidValue;
  return cudaSuccess;
}
inline cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  auto& rt = ftk_emu::runtime();
  std::lock_guard<std::mutex> lk(rt.mu);
  *total_bytes = ftk_emu::kDeviceBytes;
  *free_bytes = ftk_emu::kDeviceBytes - std::min(rt.managed_bytes, ftk_emu::kDeviceBytes);
  return cudaSuccess;
}
