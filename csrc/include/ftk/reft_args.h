// The ReFT param structs built from what crosses the binding (the mirror of
// ftkernels/_native.py's reft_*_args). The CPU and CUDA functions take the same arguments but
// the last (threads or a stream).
#pragma once

#include <cstdint>

#include "ftk/lora_args.h"
#include "ftk/reft.h"

namespace ftk {
namespace args {

// The argument order of _native.reft_forward_args: h, its dtype, n_rows, d, r, rows, n_slots,
// P, Q, b, the dropout, out, z.
inline ReftForwardParams reft_forward(uintptr_t h, int dtype_code, int64_t n_rows, int64_t d, int64_t r,
                                      uintptr_t rows, int64_t n_slots, uintptr_t P, uintptr_t Q, uintptr_t b,
                                      bool enabled, uint64_t seed, uint32_t threshold, float scale, uintptr_t out,
                                      uintptr_t z) {
  ReftForwardParams p;
  p.h = ptr<const void>(h); p.dtype = dtype(dtype_code, "h"); p.n_rows = n_rows; p.d = d; p.r = r;
  p.rows = ptr<const int64_t>(rows); p.n_slots = n_slots;
  p.P = ptr<const float>(P); p.Q = ptr<const float>(Q); p.b = ptr<const float>(b);
  p.dropout = dropout(enabled, seed, threshold, scale);
  p.out = ptr<void>(out); p.z = ptr<float>(z);
  return p;
}

// The argument order of _native.reft_backward_args: grad, h, their dtype, n_rows, d, r, rows,
// n_slots, P, Q, z, the dropout, dh, dP, dQ, db, workspace, workspace_floats.
inline ReftBackwardParams reft_backward(uintptr_t grad, uintptr_t h, int dtype_code, int64_t n_rows, int64_t d,
                                        int64_t r, uintptr_t rows, int64_t n_slots, uintptr_t P, uintptr_t Q,
                                        uintptr_t z, bool enabled, uint64_t seed, uint32_t threshold, float scale,
                                        uintptr_t dh, uintptr_t dP, uintptr_t dQ, uintptr_t db, uintptr_t workspace,
                                        int64_t workspace_floats) {
  ReftBackwardParams p;
  p.grad = ptr<const void>(grad); p.h = ptr<const void>(h); p.dtype = dtype(dtype_code, "grad");
  p.n_rows = n_rows; p.d = d; p.r = r; p.rows = ptr<const int64_t>(rows); p.n_slots = n_slots;
  p.P = ptr<const float>(P); p.Q = ptr<const float>(Q); p.z = ptr<const float>(z);
  p.dropout = dropout(enabled, seed, threshold, scale);
  p.dh = ptr<void>(dh); p.dP = ptr<float>(dP); p.dQ = ptr<float>(dQ); p.db = ptr<float>(db);
  p.workspace = ptr<float>(workspace); p.workspace_floats = workspace_floats;
  return p;
}

}  // namespace args
}  // namespace ftk
