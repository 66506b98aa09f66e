// Managed-memory allocation, advice and prefetch for paged optimizer states. The contract is
// paged_cuda.h's; this file only adapts to the CUDA version.
//
// NOTE: CUDA 13 changed cudaMemAdvise and cudaMemPrefetchAsync to take a cudaMemLocation
// ({type, id}) instead of an int device (the int forms are gone; 12.2 to 12.9 had both, the
// location forms as *_v2). The location is built in one place, to_location(), and the int
// forms are used before 13.0, where cudaCpuDeviceId (-1) names the host.
//
// No kernels here: everything is a runtime call. Nothing is synchronous but cudaMallocManaged
// and cudaFree themselves (both are, by CUDA's definition); the prefetch goes on the caller's
// stream.
#include "ftk/paged_cuda.h"

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace ftk {
namespace {

// Makes `device` current for a scope and restores the previous device on the way out, also
// when a check throws.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : prev_(current_device()) {
    if (device != prev_) FTK_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int now = prev_;
    if (cudaGetDevice(&now) == cudaSuccess && now != prev_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_;
};

int device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not left behind for a later launch check
    throw std::runtime_error(std::string("ftkernels: cudaGetDeviceCount(&n) failed: ") + cudaGetErrorString(err));
  }
  return n;
}

void check_device(int device, bool allow_host, const char* what) {
  if (allow_host && device == cudaCpuDeviceId) return;
  const int n = device_count();
  if (device < 0 || device >= n)
    throw std::invalid_argument(std::string("ftkernels: ") + what + ": device " + std::to_string(device) +
                                " is not a CUDA device (there are " + std::to_string(n) + ")" +
                                (allow_host ? "; use -1 for the host" : ""));
}

#if CUDART_VERSION >= 13000
cudaMemLocation to_location(int device) {
  cudaMemLocation loc{};
  if (device == cudaCpuDeviceId) {
    loc.type = cudaMemLocationTypeHost;  // id is ignored for the host
    loc.id = 0;
  } else {
    loc.type = cudaMemLocationTypeDevice;
    loc.id = device;
  }
  return loc;
}
#define FTK_MEM_LOCATION(device) to_location(device)
#else
#define FTK_MEM_LOCATION(device) (device)
#endif

}  // namespace

void* managed_alloc_cuda(size_t bytes, int device) {
  check_device(device, /*allow_host=*/false, "managed_alloc");
  if (bytes == 0) return nullptr;  // cudaMallocManaged rejects 0; null is the empty range
  DeviceGuard guard(device);
  void* ptr = nullptr;
  FTK_CUDA_CHECK(cudaMallocManaged(&ptr, bytes, cudaMemAttachGlobal));
  try {
    FTK_CUDA_CHECK(cudaMemAdvise(ptr, bytes, cudaMemAdviseSetPreferredLocation, FTK_MEM_LOCATION(device)));
    FTK_CUDA_CHECK(cudaMemAdvise(ptr, bytes, cudaMemAdviseSetAccessedBy, FTK_MEM_LOCATION(device)));
  } catch (...) {
    cudaFree(ptr);  // best effort: the advice error is the one worth reporting
    throw;
  }
  return ptr;
}

void managed_free_cuda(void* ptr) {
  if (ptr == nullptr) return;
  const cudaError_t err = cudaFree(ptr);
  if (err == cudaErrorCudartUnloading) {  // process exit: the context, and the range, are gone
    cudaGetLastError();
    return;
  }
  check_cuda(err, "cudaFree(ptr)");  // the call, not the variable, in the message
}

void managed_prefetch_cuda(const void* ptr, size_t bytes, int device, cudaStream_t stream) {
  check_device(device, /*allow_host=*/true, "managed_prefetch");
  if (ptr == nullptr || bytes == 0) return;
#if CUDART_VERSION >= 13000
  FTK_CUDA_CHECK(cudaMemPrefetchAsync(ptr, bytes, to_location(device), /*flags=*/0, stream));
#else
  FTK_CUDA_CHECK(cudaMemPrefetchAsync(ptr, bytes, device, stream));
#endif
}

std::pair<size_t, size_t> mem_get_info_cuda(int device) {
  check_device(device, /*allow_host=*/false, "mem_get_info");
  DeviceGuard guard(device);
  size_t free_bytes = 0, total_bytes = 0;
  FTK_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  return {free_bytes, total_bytes};
}

}  // namespace ftk
