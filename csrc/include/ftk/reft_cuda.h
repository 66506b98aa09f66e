// CUDA launchers for the fused ReFT edits (csrc/cuda/reft.cu). The math, the row selection
// and the parameter structs are reft.h's; these only add the stream.
//
// As lora_cuda.h: each launcher checks its params and throws std::invalid_argument before
// anything reaches the device, enqueues on `stream` without synchronising or allocating (so
// the calls are capturable in CUDA graphs), and reports a CUDA error as std::runtime_error. They
// run on the device current for the calling thread. Empty sizes enqueue nothing.
#pragma once

#include <cuda_runtime_api.h>

#include "ftk/cuda_check.h"
#include "ftk/reft.h"

namespace ftk {

void reft_forward_cuda(const ReftForwardParams& p, cudaStream_t stream);

// The floats of workspace reft_backward_cuda needs for these sizes (the per-block partial
// sums of dP, dQ, db); depends on the current device's SM count.
int64_t reft_backward_workspace_cuda(int64_t n_slots, int64_t d, int64_t r);

// dh for the selected rows (when p.dh is set), and dP, dQ, db overwritten with their sums over
// the slots (when set): a first kernel writes per-block partial sums to p.workspace, a second
// one reduces them. Deterministic: the same inputs give the same bits.
void reft_backward_cuda(const ReftBackwardParams& p, cudaStream_t stream);

}  // namespace ftk
