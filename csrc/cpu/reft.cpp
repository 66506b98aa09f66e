// CPU kernels of the fused ReFT edits (reft.h): slots split across threads, one row at a time.
//
// Forward, a slot: widen its row of h to fp32 once (d floats, 16 KB at d = 4096: L1), take the
// r dot products z = Q·h + b over it, then write out = h + drop(Pᵀz) in one pass. Backward, a
// slot: g' = drop(g) and h widened once, s = P·g', dh = g + Qᵀs, and the thread's own sums
// dP += z ⊗ g', dQ += s ⊗ h, db += s; the per-thread sums are added in thread order at the end,
// so a thread count gives one result bit for bit.
// The work is 4·r·d FLOPs a row each way against 2·d elements moved: at r = 4 it is ~8 FLOPs a
// byte of bf16, so it runs from cache at the FMA rate (224 rows of d = 4096: ~0.2 ms a pass on one
// AVX-512 core). P and Q (2·r·d fp32, 128 KB at r = 4, d = 4096) stay in L2 across rows.
// NOTE: dot products use 16 independent partial sums (one zmm) added in a fixed order; the
// build has no -ffast-math, so this is what lets the compiler vectorise them.
#include <vector>

#include "ftk/cpu_isa.h"
#include "ftk/cpu_util.h"
#include "ftk/reft.h"

namespace ftk {
namespace {

using cpu::from_f32;
using cpu::load_f32;

constexpr int kLanes = 16;

FTK_CPU_INLINE float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[j + l] * b[j + l];
  for (int l = 0; j + l < n; ++l) acc[l] += a[j + l] * b[j + l];
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// y += a · x over n elements.
FTK_CPU_INLINE void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

// out[j] = drop(in[j]) over a row of h (row_key from dropout.h); a plain widen without dropout.
template <typename T>
FTK_CPU_INLINE void widen_drop(const T* in, float* out, int64_t n, const Dropout& dr, uint32_t row_key) {
  if (!dr.enabled) {
    for (int64_t j = 0; j < n; ++j) out[j] = load_f32<T>(in, j);
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    const float v = load_f32<T>(in, j) * dr.scale;
    out[j] = dropout_keep(row_key, j, dr.threshold) ? v : 0.0f;
  }
}

template <typename T>
FTK_CPU_INLINE void widen(const T* in, float* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = load_f32<T>(in, j);
}

// dst[j] = base[j] + drop(e[j]) in dst's dtype (base and e fp32).
template <typename T>
FTK_CPU_INLINE void add_store(const float* base, const float* e, T* dst, int64_t n, const Dropout& dr,
                          uint32_t row_key) {
  if (!dr.enabled) {
    for (int64_t j = 0; j < n; ++j) dst[j] = from_f32<T>(base[j] + e[j]);
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    const float v = e[j] * dr.scale;
    dst[j] = from_f32<T>(base[j] + (dropout_keep(row_key, j, dr.threshold) ? v : 0.0f));
  }
}

inline int64_t slot_row(const int64_t* rows, int64_t i, int64_t n_rows) {
  const int64_t row = rows ? rows[i] : i;
  return row >= 0 && row < n_rows ? row : -1;  // reft.h: an entry out of range is skipped
}

template <typename T>
FTK_CPU_INLINE void forward_slots(const ReftForwardParams& p, int64_t i0, int64_t i1) {
  const int64_t d = p.d, r = p.r;
  std::vector<float> hf(d), e(d);
  const T* h = static_cast<const T*>(p.h);
  T* out = static_cast<T*>(p.out);
  const uint32_t key = dropout_key(p.dropout.seed);
  for (int64_t i = i0; i < i1; ++i) {
    float* z = p.z + i * r;
    const int64_t row = slot_row(p.rows, i, p.n_rows);
    if (row < 0) {
      for (int64_t k = 0; k < r; ++k) z[k] = 0.0f;
      continue;
    }
    widen<T>(h + row * d, hf.data(), d);
    for (int64_t k = 0; k < r; ++k) z[k] = dot(p.Q + k * d, hf.data(), d) + p.b[k];
    std::fill(e.begin(), e.end(), 0.0f);
    for (int64_t k = 0; k < r; ++k) axpy(z[k], p.P + k * d, e.data(), d);
    add_store<T>(hf.data(), e.data(), out + row * d, d, p.dropout, dropout_row_key(key, row));
  }
}

// One chunk of slots; sums (2·r·d + r floats: dP, dQ, db) are this chunk's, or null.
template <typename T>
FTK_CPU_INLINE void backward_slots(const ReftBackwardParams& p, int64_t i0, int64_t i1, float* sums) {
  const int64_t d = p.d, r = p.r;
  std::vector<float> gd(d), hf(sums ? d : 0), e(p.dh ? d : 0), s(r);
  const T* grad = static_cast<const T*>(p.grad);
  const uint32_t key = dropout_key(p.dropout.seed);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t row = slot_row(p.rows, i, p.n_rows);
    if (row < 0) continue;
    const T* g = grad + row * d;
    widen_drop<T>(g, gd.data(), d, p.dropout, dropout_row_key(key, row));
    for (int64_t k = 0; k < r; ++k) s[k] = dot(p.P + k * d, gd.data(), d);
    if (p.dh) {
      widen<T>(g, e.data(), d);
      for (int64_t k = 0; k < r; ++k) axpy(s[k], p.Q + k * d, e.data(), d);
      T* dh = static_cast<T*>(p.dh) + row * d;
      for (int64_t j = 0; j < d; ++j) dh[j] = from_f32<T>(e[j]);
    }
    if (sums) {
      widen<T>(static_cast<const T*>(p.h) + row * d, hf.data(), d);
      const float* z = p.z + i * r;
      for (int64_t k = 0; k < r; ++k) {
        axpy(z[k], gd.data(), sums + k * d, d);
        axpy(s[k], hf.data(), sums + (r + k) * d, d);
        sums[2 * r * d + k] += s[k];
      }
    }
  }
}

}  // namespace

void reft_forward_cpu(const ReftForwardParams& p, int num_threads) {
  check(p);
  if (p.n_slots == 0) return;
  const int threads = cpu::threads_for(p.n_slots * p.d * p.r, num_threads);
  cpu::with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::parallel_for(p.n_slots, threads, [&](int64_t i0, int64_t i1) {
      cpu::with_isa([&]() FTK_ISA_BODY { forward_slots<T>(p, i0, i1); });
    });
  });
}

void reft_backward_cpu(const ReftBackwardParams& p, int num_threads) {
  check(p);
  const bool params = p.dP != nullptr;
  const int64_t rd = p.r * p.d, sum_floats = 2 * rd + p.r;
  const int threads = p.n_slots == 0 ? 1 : cpu::threads_for(p.n_slots * p.d * p.r * 2, num_threads);
  // One chunk of slots a thread, each with its own sums; chunk c covers slots [c·len, (c+1)·len).
  const int64_t chunks = threads, len = ceil_div(p.n_slots, chunks);
  std::vector<float> sums(params ? chunks * sum_floats : 0, 0.0f);
  if (p.n_slots > 0) {
    cpu::with_dtype(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      cpu::parallel_for(chunks, threads, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t i0 = c * len, i1 = std::min(p.n_slots, i0 + len);
          float* chunk_sums = params ? sums.data() + c * sum_floats : nullptr;
          if (i0 < i1) cpu::with_isa([&]() FTK_ISA_BODY { backward_slots<T>(p, i0, i1, chunk_sums); });
        }
      });
    });
  }
  if (!params) return;
  // Chunk sums added in chunk order, columns split across threads.
  cpu::parallel_for(sum_floats, cpu::threads_for(sum_floats * chunks, num_threads), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      float acc = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) acc += sums[c * sum_floats + j];
      float* dst = j < rd ? p.dP + j : j < 2 * rd ? p.dQ + (j - rd) : p.db + (j - 2 * rd);
      *dst = acc;
    }
  });
}

}  // namespace ftk
