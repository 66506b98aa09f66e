// CUDA kernels of the fused ReFT edits (reft.h: z = Q·h + b, out = h + drop(Pᵀz); backward
// s = P·drop(g), dh = g + Qᵀs, dP = Σ z ⊗ drop(g), dQ = Σ s ⊗ h, db = Σ s).
//
// Forward: a block (256 threads) takes kRows = 8 slots at a time, striding over the slots.
//   phase 1: each thread walks its columns j (j ≡ tid mod 256, so a warp reads 32 consecutive
//     elements of a row) and accumulates kRankChunk = 4 ranks of Q·h for the 8 rows: 32 fp32
//     sums a thread, one per lane of the block-wide reduction that follows (warp butterflies,
//     then the 8 warps added in a fixed order). Ranks above 4 take further passes over the
//     columns, which read the rows again from L1/L2, not from memory.
//   phase 2: the same columns again, out = h + drop(Σ_k P[k, j]·z_k) for the 8 rows.
//   Each selected row is read from memory once and written once (phase 2's read hits L1/L2:
//   8 rows of d = 4096 bf16 are 64 KB); z (r floats a slot) is written for the backward.
// Backward: the same shape. Phase 1 gives s = P·drop(g) for the 8 rows; phase 2 writes
//   dh = g + Qᵀs and adds the 8 rows' terms of dP, dQ (and db) into the block's own slice of
//   the workspace. A thread only ever touches the columns it owns (and thread k the db[k]
//   entry), so the slice needs no atomics and no synchronisation. reft_reduce_kernel then adds
//   the slices in block order: the result is deterministic.
//
// Why these numbers: P and Q are r·d fp32 each (64 KB at r = 4, d = 4096) and are read
// through L1/L2, never staged; kRows = 8 makes one load of P or Q serve 8 rows, so the L2
// traffic for them is 2·r·4 / (8·element size) bytes a byte of h (2 at r = 4 in bf16: L2 runs
// at ~2-3x the bandwidth of HBM on H100-class parts). 32 accumulators a thread is the most
// that keeps the forward near 64 registers; kRows = 16 would halve the L2 traffic for 2x the
// accumulators. Loads are scalar and coalesced (a warp reads 64 contiguous bytes of bf16).
// NOTE: none of this has been timed on a GPU; the first steps when one is at hand are 16-byte
// vector loads and a measured kRows (the target: >= 80% of HBM bandwidth at
// 8x512x4096 bf16, every row edited).
//
// Invariants: a slot whose row is -1 or outside [0, n_rows) reads and writes nothing, gets
// z = 0 and contributes nothing; offsets are int64; math is fp32 with the output rounded once;
// dropout is dropout.h's hash of (row of h, column), the kept value times scale (__fmul_rn).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "ftk/cuda_util.cuh"
#include "ftk/reft_cuda.h"

namespace ftk {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 8;
constexpr int kRankChunk = 4;
constexpr int kSums = kRows * kRankChunk;  // = 32: one per lane in block_sum
static_assert(kSums == 32, "block_sum gives lane x the total of sum x");
constexpr int kForwardBlocksPerSm = 4;
constexpr int kBackwardBlocksPerSm = 2;


__device__ __forceinline__ float drop(float v, const Dropout& dr, uint32_t row_key, int64_t col) {
  if (!dr.enabled) return v;
  return dropout_keep(row_key, col, dr.threshold) ? __fmul_rn(v, dr.scale) : 0.0f;
}

// The block's slots [base, base + kRows) resolved to rows of h (-1: none), in s_row and in
// registers (row), with each row's dropout key.
__device__ __forceinline__ void load_rows(const int64_t* rows, int64_t n_rows, int64_t n_slots, int64_t base,
                                          uint32_t key, int64_t* s_row, int64_t (&row)[kRows],
                                          uint32_t (&row_key)[kRows]) {
  if (threadIdx.x < kRows) {
    const int64_t i = base + threadIdx.x;
    int64_t r = -1;
    if (i < n_slots) {
      r = rows ? rows[i] : i;
      if (r < 0 || r >= n_rows) r = -1;  // reft.h: skipped, never read or written
    }
    s_row[threadIdx.x] = r;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    row[i] = s_row[i];
    row_key[i] = dropout_row_key(key, row[i]);
  }
}

// Sums v[x] over the block for x < 32; thread x < 32 returns the total of v[x] (others 0).
// Warp butterflies, then the warps' partials added in warp order: the same bits every run.
__device__ __forceinline__ float block_sum(float (&v)[kSums], float* s_warp) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int x = 0; x < kSums; ++x) {
    float s = v[x];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == x) s_warp[warp * 32 + x] = s;
  }
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x < 32) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += s_warp[w * 32 + threadIdx.x];
  }
  return total;
}

// s_out[i·kReftMaxRank + k] = Σ_j A[k, j]·x_i[j] (+ bias[k]) for the block's rows i, all k < r,
// with x_i[j] = drop(X[row_i, j]) when `dropped`, else X[row_i, j]; 0 for a row of -1.
template <typename T>
__device__ __forceinline__ void project_rows(const T* X, const float* A, const float* bias, int64_t d, int r,
                                             const int64_t* row, const int64_t* s_row, const uint32_t* row_key,
                                             const Dropout& dr, bool dropped, float* s_warp, float* s_out) {
  for (int k0 = 0; k0 < r; k0 += kRankChunk) {
    float acc[kSums];
#pragma unroll
    for (int x = 0; x < kSums; ++x) acc[x] = 0.0f;
    for (int64_t j = threadIdx.x; j < d; j += kThreads) {
      float a[kRankChunk];
#pragma unroll
      for (int c = 0; c < kRankChunk; ++c) a[c] = k0 + c < r ? __ldg(A + (k0 + c) * d + j) : 0.0f;
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        if (row[i] < 0) continue;
        float x = to_f32<T>(X[row[i] * d + j]);
        if (dropped) x = drop(x, dr, row_key[i], j);
#pragma unroll
        for (int c = 0; c < kRankChunk; ++c) acc[i * kRankChunk + c] = fmaf(a[c], x, acc[i * kRankChunk + c]);
      }
    }
    const float total = block_sum(acc, s_warp);
    if (threadIdx.x < kSums) {
      const int i = threadIdx.x / kRankChunk, k = k0 + threadIdx.x % kRankChunk;
      // s_row, not row: a runtime index into a register array would put it in local memory
      if (k < r) s_out[i * kReftMaxRank + k] = s_row[i] < 0 ? 0.0f : total + (bias ? bias[k] : 0.0f);
    }
    __syncthreads();  // s_out complete, s_warp free for the next chunk
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) reft_forward_kernel(ReftForwardParams p) {
  __shared__ int64_t s_row[kRows];
  __shared__ float s_warp[kWarps * 32];
  __shared__ float s_z[kRows * kReftMaxRank];
  const T* h = static_cast<const T*>(p.h);
  T* out = static_cast<T*>(p.out);
  const int64_t d = p.d;
  const int r = static_cast<int>(p.r);
  const uint32_t key = dropout_key(p.dropout.seed);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kRows; base < p.n_slots;
       base += static_cast<int64_t>(gridDim.x) * kRows) {
    int64_t row[kRows];
    uint32_t row_key[kRows];
    load_rows(p.rows, p.n_rows, p.n_slots, base, key, s_row, row, row_key);
    project_rows<T>(h, p.Q, p.b, d, r, row, s_row, row_key, p.dropout, false, s_warp, s_z);
    for (int x = threadIdx.x; x < kRows * r; x += kThreads) {
      const int i = x / r, k = x % r;
      if (base + i < p.n_slots) p.z[(base + i) * r + k] = s_z[i * kReftMaxRank + k];
    }
    for (int64_t j = threadIdx.x; j < d; j += kThreads) {
      float e[kRows];
#pragma unroll
      for (int i = 0; i < kRows; ++i) e[i] = 0.0f;
      for (int k = 0; k < r; ++k) {
        const float pk = __ldg(p.P + k * d + j);
#pragma unroll
        for (int i = 0; i < kRows; ++i) e[i] = fmaf(pk, s_z[i * kReftMaxRank + k], e[i]);
      }
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        if (row[i] < 0) continue;
        const int64_t at = row[i] * d + j;
        out[at] = from_f32<T>(to_f32<T>(h[at]) + drop(e[i], p.dropout, row_key[i], j));
      }
    }
    __syncthreads();  // s_row and s_z are the next batch's
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) reft_backward_kernel(ReftBackwardParams p, int64_t slice_floats) {
  __shared__ int64_t s_row[kRows];
  __shared__ float s_warp[kWarps * 32];
  __shared__ float s_s[kRows * kReftMaxRank];
  __shared__ float s_z[kRows * kReftMaxRank];
  const T* grad = static_cast<const T*>(p.grad);
  const T* h = static_cast<const T*>(p.h);
  T* dh = static_cast<T*>(p.dh);
  const int64_t d = p.d;
  const int r = static_cast<int>(p.r);
  const int64_t rd = static_cast<int64_t>(r) * d;
  const uint32_t key = dropout_key(p.dropout.seed);
  // The block's slice [dP | dQ | db]: this thread's columns (and db[threadIdx.x]) only.
  float* ws = p.dP ? p.workspace + blockIdx.x * slice_floats : nullptr;
  if (ws) {
    for (int64_t j = threadIdx.x; j < d; j += kThreads)
      for (int k = 0; k < r; ++k) ws[k * d + j] = ws[rd + k * d + j] = 0.0f;
    if (threadIdx.x < r) ws[2 * rd + threadIdx.x] = 0.0f;
  }
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kRows; base < p.n_slots;
       base += static_cast<int64_t>(gridDim.x) * kRows) {
    int64_t row[kRows];
    uint32_t row_key[kRows];
    load_rows(p.rows, p.n_rows, p.n_slots, base, key, s_row, row, row_key);
    project_rows<T>(grad, p.P, nullptr, d, r, row, s_row, row_key, p.dropout, true, s_warp, s_s);
    for (int x = threadIdx.x; x < kRows * r; x += kThreads) {
      const int i = x / r, k = x % r;
      s_z[i * kReftMaxRank + k] = base + i < p.n_slots && s_row[i] >= 0 ? p.z[(base + i) * r + k] : 0.0f;
    }
    __syncthreads();
    for (int64_t j = threadIdx.x; j < d; j += kThreads) {
      float g[kRows], gd[kRows], hv[kRows];
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const bool ok = row[i] >= 0;
        g[i] = ok ? to_f32<T>(grad[row[i] * d + j]) : 0.0f;
        gd[i] = drop(g[i], p.dropout, row_key[i], j);
        hv[i] = ok && ws ? to_f32<T>(h[row[i] * d + j]) : 0.0f;
      }
      if (dh) {
        float e[kRows];
#pragma unroll
        for (int i = 0; i < kRows; ++i) e[i] = g[i];
        for (int k = 0; k < r; ++k) {
          const float qk = __ldg(p.Q + k * d + j);
#pragma unroll
          for (int i = 0; i < kRows; ++i) e[i] = fmaf(qk, s_s[i * kReftMaxRank + k], e[i]);
        }
#pragma unroll
        for (int i = 0; i < kRows; ++i)
          if (row[i] >= 0) dh[row[i] * d + j] = from_f32<T>(e[i]);
      }
      if (ws) {
        for (int k = 0; k < r; ++k) {
          float dp = 0.0f, dq = 0.0f;
#pragma unroll
          for (int i = 0; i < kRows; ++i) {
            dp = fmaf(s_z[i * kReftMaxRank + k], gd[i], dp);
            dq = fmaf(s_s[i * kReftMaxRank + k], hv[i], dq);
          }
          ws[k * d + j] += dp;
          ws[rd + k * d + j] += dq;
        }
      }
    }
    if (ws && threadIdx.x < r) {
      float s = 0.0f;
#pragma unroll
      for (int i = 0; i < kRows; ++i) s += s_s[i * kReftMaxRank + threadIdx.x];
      ws[2 * rd + threadIdx.x] += s;
    }
    __syncthreads();  // s_row, s_s and s_z are the next batch's
  }
}

// dP, dQ, db = the sum of the blocks' slices, added in block order (0 slices: zeros).
__global__ void __launch_bounds__(kThreads) reft_reduce_kernel(const float* ws, int64_t slices, int64_t slice_floats,
                                                               int64_t rd, float* dP, float* dQ, float* db) {
  for (int64_t x = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; x < slice_floats;
       x += static_cast<int64_t>(gridDim.x) * kThreads) {
    float s = 0.0f;
    for (int64_t b = 0; b < slices; ++b) s += ws[b * slice_floats + x];
    if (x < rd) dP[x] = s;
    else if (x < 2 * rd) dQ[x - rd] = s;
    else db[x - 2 * rd] = s;
  }
}

int64_t forward_blocks(int64_t n_slots) {
  const int64_t wave = static_cast<int64_t>(sm_count(current_device())) * kForwardBlocksPerSm;
  return std::min<int64_t>(ceil_div(n_slots, kRows), wave);
}

int64_t backward_blocks(int64_t n_slots) {
  const int64_t wave = static_cast<int64_t>(sm_count(current_device())) * kBackwardBlocksPerSm;
  return std::min<int64_t>(ceil_div(n_slots, kRows), wave);
}

}  // namespace

void reft_forward_cuda(const ReftForwardParams& p, cudaStream_t stream) {
  check(p);
  if (p.n_slots == 0) return;
  const int blocks = static_cast<int>(forward_blocks(p.n_slots));
  with_dtype(p.dtype, [&](auto tag) {
    reft_forward_kernel<decltype(tag)><<<blocks, kThreads, 0, stream>>>(p);
  });
  FTK_CHECK_LAUNCH("reft_forward_kernel");
}

int64_t reft_backward_workspace_cuda(int64_t n_slots, int64_t d, int64_t r) {
  FTK_CHECK_ARG(n_slots >= 0 && d >= 1 && r >= 1, "reft_backward_workspace: sizes must be positive");
  return n_slots == 0 ? 0 : backward_blocks(n_slots) * (2 * r * d + r);
}

void reft_backward_cuda(const ReftBackwardParams& p, cudaStream_t stream) {
  check(p);
  const bool params = p.dP != nullptr;
  if (!params && (p.dh == nullptr || p.n_slots == 0)) return;
  const int64_t slice = 2 * p.r * p.d + p.r;
  const int64_t blocks = p.n_slots == 0 ? 0 : backward_blocks(p.n_slots);
  if (params) {
    FTK_CHECK_ARG(p.workspace_floats >= blocks * slice && (blocks == 0 || p.workspace != nullptr),
                  "workspace: needs reft_backward_workspace(n_slots, d, r) floats");
  }
  if (blocks > 0) {
    with_dtype(p.dtype, [&](auto tag) {
      reft_backward_kernel<decltype(tag)><<<static_cast<int>(blocks), kThreads, 0, stream>>>(p, slice);
    });
    FTK_CHECK_LAUNCH("reft_backward_kernel");
  }
  if (params) {
    const int64_t wave = static_cast<int64_t>(sm_count(current_device())) * 4;
    const int64_t grid = std::min<int64_t>(ceil_div(slice, kThreads), wave);
    reft_reduce_kernel<<<static_cast<int>(grid), kThreads, 0, stream>>>(p.workspace, blocks, slice, p.r * p.d, p.dP,
                                                                         p.dQ, p.db);
    FTK_CHECK_LAUNCH("reft_reduce_kernel");
  }
}

}  // namespace ftk
