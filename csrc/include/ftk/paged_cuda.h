// CUDA unified (managed) memory for paged optimizer states (csrc/cuda/paged.cu).
//
// The states live in cudaMallocManaged memory: one virtual range that the driver pages
// between the GPU and the host, so a state that does not fit on the GPU spills instead of
// failing. Python (ftkernels/optim/paged.py) wraps each allocation in a torch CUDA tensor,
// keeps the budget that stops over-subscription, and frees the range when the tensor dies.
//
// Every function takes the device explicitly and restores the calling thread's current device
// before returning. A bad argument is std::invalid_argument; a failing CUDA call is
// std::runtime_error naming the call (FTK_CUDA_CHECK). Zero bytes are handled as null: a
// zero-byte allocation returns nullptr, and freeing nullptr or prefetching nullptr or zero
// bytes does nothing (alloc and prefetch still check the device first).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <utility>

#include "ftk/cuda_check.h"

namespace ftk {

// cudaMallocManaged(bytes, cudaMemAttachGlobal) with `device` current (so the pointer's
// attributes name `device`, which is how torch labels the tensor's device), then advises
// PreferredLocation = device and AccessedBy = device: pages stay on the GPU until memory
// pressure evicts them, and the GPU keeps a mapping to pages that did move to the host.
void* managed_alloc_cuda(size_t bytes, int device);

// cudaFree. Implicitly synchronises the device, so kernels still queued on the range finish
// first. A null pointer does nothing; so does a free after the CUDA runtime was unloaded
// (process exit), since the memory went with the context.
void managed_free_cuda(void* ptr);

// cudaMemPrefetchAsync of [ptr, ptr + bytes) to `device`, or to the host when device is
// cudaCpuDeviceId (-1), enqueued on `stream` without synchronising. The range must lie in one
// managed allocation (else the driver reports cudaErrorInvalidValue).
void managed_prefetch_cuda(const void* ptr, size_t bytes, int device, cudaStream_t stream);

// cudaMemGetInfo on `device`: (free, total) bytes.
std::pair<size_t, size_t> mem_get_info_cuda(int device);

}  // namespace ftk
