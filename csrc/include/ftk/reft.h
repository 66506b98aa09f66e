// Fused ReFT edits (LoReFT, DiReFT): the math and the kernels' parameter structs.
//
// Both edit selected rows h (d values) of a hidden-state matrix through a rank-r bottleneck:
//   z   = Q·h + b                 (r values, fp32; kept per slot for backward)
//   out = h + drop(Pᵀ·z)          (d values; dropout on the edit only, never on h)
// LoReFT, h + Rᵀ(W·h + b − R·h): P = R, Q = W − R.   DiReFT, h + W2ᵀ(W1·h + b): P = W2, Q = W1.
// P, Q (r x d) and b (r) are fp32, made by the caller; h, out, grad and dh share one dtype.
//
// Backward, with g the gradient of out and g' = drop(g) (the forward's mask):
//   s   = P·g'                    (r values)
//   dh  = g + Qᵀ·s
//   dP  = Σ_slots z ⊗ g',  dQ = Σ_slots s ⊗ h,  db = Σ_slots s     (r x d, r x d, r; fp32)
// The caller maps these back: LoReFT dR = dP − dQ, dW = dQ; DiReFT dW2 = dP, dW1 = dQ.
//
// Rows: slot i edits row rows[i] of h (a flat row index, batch·seq + position), or nothing when
// rows[i] is -1; rows == null means slot i edits row i (n_slots == n_rows). The Python layer
// refuses duplicates and entries outside [-1, n_rows); a kernel skips such an entry (never
// reads or writes out of bounds) but its result is then undefined. Rows no slot selects are
// the caller's: it fills out with h (and dh with g) first, so the kernels write selected rows only.
//
// Dropout: the hash of dropout.h over (seed, row of h, column), so a row's mask does not depend
// on which slot selected it, and backward regenerates it.
#pragma once

#include <cstdint>

#include "ftk/common.h"
#include "ftk/dropout.h"

namespace ftk {

// The largest rank: kernels keep the r values of z and s of the rows in flight on chip
// (shared memory or registers: 2 KB for 8 rows at 64). The ReFT papers use ranks 1 to 32.
constexpr int64_t kReftMaxRank = 64;

struct ReftForwardParams {
  const void* h = nullptr;  // n_rows x d, row-major, dtype
  DType dtype = DType::Float32;
  int64_t n_rows = 0, d = 0, r = 0;
  const int64_t* rows = nullptr;  // n_slots entries, or null (every row)
  int64_t n_slots = 0;
  const float* P = nullptr;  // r x d
  const float* Q = nullptr;  // r x d
  const float* b = nullptr;  // r
  Dropout dropout;
  void* out = nullptr;  // n_rows x d, dtype: selected rows written, the others left alone
  float* z = nullptr;   // n_slots x r: Q·h + b of each slot's row, 0 for a slot with row -1
};

struct ReftBackwardParams {
  const void* grad = nullptr;  // n_rows x d, dtype (the gradient of out)
  const void* h = nullptr;     // n_rows x d, dtype (the forward's input)
  DType dtype = DType::Float32;
  int64_t n_rows = 0, d = 0, r = 0;
  const int64_t* rows = nullptr;
  int64_t n_slots = 0;
  const float* P = nullptr;  // r x d
  const float* Q = nullptr;  // r x d
  const float* z = nullptr;  // n_slots x r, from the forward
  Dropout dropout;
  void* dh = nullptr;  // n_rows x d, dtype, or null (not wanted): selected rows written
  float* dP = nullptr;  // r x d; dP, dQ, db all set or all null (not wanted)
  float* dQ = nullptr;  // r x d
  float* db = nullptr;  // r
  // CUDA only: per-block partial sums of dP, dQ, db, reduced by a second kernel; at least
  // reft_backward_workspace_cuda(n_slots, d, r) floats when they are wanted. The CPU kernel
  // keeps per-thread sums of its own.
  float* workspace = nullptr;
  int64_t workspace_floats = 0;
};

inline void check_reft_common(const void* h, DType dtype, int64_t n_rows, int64_t d, int64_t r,
                              const int64_t* rows, int64_t n_slots, const float* P, const float* Q) {
  FTK_CHECK_ARG(valid_dtype(static_cast<int>(dtype)), "h: dtype must be float32, float16 or bfloat16");
  FTK_CHECK_ARG(n_rows >= 0 && d >= 1, "h must be n_rows x d with d >= 1");
  FTK_CHECK_ARG(r >= 1 && r <= kReftMaxRank && r <= d, "r must be in 1..min(d, 64)");
  FTK_CHECK_ARG(n_slots >= 0, "n_slots must be >= 0");
  FTK_CHECK_ARG(rows != nullptr || n_slots == n_rows, "without rows, n_slots must equal n_rows");
  FTK_CHECK_ARG(P && Q, "P and Q must not be null");
  if (n_slots > 0) FTK_CHECK_ARG(h != nullptr || n_rows == 0, "h must not be null");
}

inline void check(const ReftForwardParams& p) {
  check_reft_common(p.h, p.dtype, p.n_rows, p.d, p.r, p.rows, p.n_slots, p.P, p.Q);
  FTK_CHECK_ARG(p.b != nullptr, "b must not be null");
  if (p.n_slots > 0) FTK_CHECK_ARG(p.out && p.z, "out and z must not be null");
}

inline void check(const ReftBackwardParams& p) {
  check_reft_common(p.h, p.dtype, p.n_rows, p.d, p.r, p.rows, p.n_slots, p.P, p.Q);
  const bool any_param = p.dP || p.dQ || p.db;
  FTK_CHECK_ARG(!any_param || (p.dP && p.dQ && p.db), "dP, dQ and db come together");
  if (p.n_slots > 0) FTK_CHECK_ARG(p.grad && p.z, "grad and z must not be null");
  FTK_CHECK_ARG(p.workspace_floats >= 0, "workspace_floats must be >= 0");
}

// CPU (csrc/cpu/reft.cpp): slots split across threads.
void reft_forward_cpu(const ReftForwardParams& p, int num_threads);
void reft_backward_cpu(const ReftBackwardParams& p, int num_threads);

}  // namespace ftk
