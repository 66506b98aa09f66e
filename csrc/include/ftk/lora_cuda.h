// CUDA launchers for the fused LoRA kernels (csrc/cuda/lora.cu). The math, the dropout-hash
// contract and the parameter structs are lora.h's; these only add the stream.
//
// Each launcher checks its params (check(p) from lora.h) and throws std::invalid_argument
// before anything reaches the device; it then enqueues its kernels on `stream` and returns
// without synchronising or allocating, so the calls are capturable in CUDA graphs. A CUDA error
// (no driver, no device, a failed launch) is a std::runtime_error that names the call. Both run
// on the device that is current for the calling thread (the Python layer enters
// torch.cuda.device(x.device)); `stream` must belong to it. Empty sizes enqueue nothing.
#pragma once

#include <cuda_runtime_api.h>

#include "ftk/cuda_check.h"
#include "ftk/lora.h"

namespace ftk {

// out (rows x cols, fp32) = drop(in); in may be out when in is fp32.
void lora_dropout_cuda(const LoraDropoutParams& p, cudaStream_t stream);

// Forward: out (M x N) = X·deq(W)ᵀ + bias + s·L·Rᵀ; GradInput: out (M x K) = X·deq(W) + drop(s·L·R).
void lora_matmul_cuda(const LoraMatmulParams& p, cudaStream_t stream);

}  // namespace ftk
