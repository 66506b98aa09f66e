// CUDA launchers for blockwise quantization (csrc/cuda/nf4.cu) and the checks every CUDA call
// and launch goes through. The format is quant.h's; these only add the stream.
//
// Each launcher checks its params (check(p) from quant.h, then the 16-byte alignment the
// vector loads assume) and throws std::invalid_argument before anything reaches the device;
// it then enqueues its kernels on `stream` and returns without synchronising. A CUDA error
// (no driver, no device, a failed launch) is a std::runtime_error that names the call.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>

#include "ftk/quant.h"

// A CUDA runtime call that must succeed: throws std::runtime_error naming the call.
#define FTK_CUDA_CHECK(call)                                                                 \
  do {                                                                                       \
    const cudaError_t ftk_err_ = (call);                                                     \
    if (ftk_err_ != cudaSuccess)                                                             \
      throw std::runtime_error(std::string("ftkernels: ") + #call + " failed: " +            \
                               cudaGetErrorString(ftk_err_));                                \
  } while (0)

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

// All four run on the device that is current for the calling thread (the Python layer enters
// torch.cuda.device(A.device)); `stream` must belong to it. n == 0 enqueues nothing.
void quantize_4bit_cuda(const Quantize4bitParams& p, cudaStream_t stream);
void dequantize_4bit_cuda(const Dequantize4bitParams& p, cudaStream_t stream);
void quantize_blockwise_cuda(const QuantizeBlockwiseParams& p, cudaStream_t stream);
void dequantize_blockwise_cuda(const DequantizeBlockwiseParams& p, cudaStream_t stream);

}  // namespace ftk
