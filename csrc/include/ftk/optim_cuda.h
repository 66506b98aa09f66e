// CUDA launchers for the fused optimizer steps (csrc/cuda/optim.cu). The math, its order of
// operations and the parameter structs are optim.h's; these only add the stream.
//
// As quant_cuda.h: each launcher checks its params and throws std::invalid_argument before
// anything reaches the device, enqueues on `stream` without synchronising or allocating (so a
// step is capturable in a CUDA graph), and reports a CUDA error as std::runtime_error. They run
// on the device current for the calling thread; `stream` must belong to it. n == 0 enqueues
// nothing. Pointers need no alignment beyond their element type's: misaligned tensors take the
// scalar path of the same kernel.
#pragma once

#include <cuda_runtime_api.h>

#include "ftk/cuda_check.h"
#include "ftk/optim.h"

namespace ftk {

// AdamW (p.kind == AdamW) or Lion over n elements, fp32 states, in place.
void optim_32bit_step_cuda(const Optim32bitParams& p, cudaStream_t stream);

// AdamW with blockwise 8-bit states (blocks of kOptimBlock = 256), in place: param, the two
// code arrays and their absmax.
void optim_8bit_step_cuda(const Optim8bitParams& p, cudaStream_t stream);

}  // namespace ftk
