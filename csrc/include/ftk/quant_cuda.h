// CUDA launchers for blockwise quantization (csrc/cuda/nf4.cu). The format is quant.h's; these
// only add the stream.
//
// Each launcher checks its params (check(p) from quant.h, then the 16-byte alignment the
// vector loads assume) and throws std::invalid_argument before anything reaches the device;
// it then enqueues its kernels on `stream` and returns without synchronising. A CUDA error
// (no driver, no device, a failed launch) is a std::runtime_error that names the call.
#pragma once

#include <cuda_runtime_api.h>

#include "ftk/cuda_check.h"
#include "ftk/quant.h"

namespace ftk {

// All four run on the device that is current for the calling thread (the Python layer enters
// torch.cuda.device(A.device)); `stream` must belong to it. n == 0 enqueues nothing.
void quantize_4bit_cuda(const Quantize4bitParams& p, cudaStream_t stream);
void dequantize_4bit_cuda(const Dequantize4bitParams& p, cudaStream_t stream);
void quantize_blockwise_cuda(const QuantizeBlockwiseParams& p, cudaStream_t stream);
void dequantize_blockwise_cuda(const DequantizeBlockwiseParams& p, cudaStream_t stream);

}  // namespace ftk
