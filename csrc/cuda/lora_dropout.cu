// The LoRA dropout, out (rows x cols, fp32) = drop(in), with the hash mask of dropout.h over
// (seed, row, column): element-wise, 256 threads a CTA, grid-stride, at most 8 CTAs an SM.
//
// A thread takes 4 elements (one 16-byte fp32 store; the loads are 16 or 8 bytes) when both
// pointers allow it (in aligned to 4 elements, out to 16 bytes), the row/column of the first
// from one int64 division and the rest by stepping, so the per-row hash key is recomputed only
// at row ends (the 4 may cross row ends when cols < 4 or is not a multiple of 4); the tail past
// the last whole vector, or everything when unaligned, goes element by element.
//
// Invariants: `in` may be `out` (fp32 in place): each element is read, then written, by one
// thread, so the loads are plain coherent ones; lora.cu returns before launching when the
// dropout is disabled and the op is in place (drop(v) = v).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lora_tiles.cuh"

namespace ftk {
namespace lora {
namespace {

struct DropArgs {
  bool enabled;
  uint32_t key, threshold;
  float scale;
};

__device__ __forceinline__ float drop1(const DropArgs& d, uint32_t row_key, int64_t col, float x) {
  if (!d.enabled) return x;
  return dropout_keep(row_key, col, d.threshold) ? __fmul_rn(x, d.scale) : 0.0f;
}

constexpr int kDropThreads = 256;

// `in` may equal `out` (fp32 in place): each element is read and then written by one thread,
// so neither pointer is __restrict__ and the loads are plain (coherent) ones, not __ldg.
__device__ __forceinline__ float plain_load(const float* p) { return *p; }
__device__ __forceinline__ float plain_load(const __half* p) {
  return Elem<__half>::from_bits(*reinterpret_cast<const unsigned short*>(p));
}
__device__ __forceinline__ float plain_load(const __nv_bfloat16* p) {
  return Elem<__nv_bfloat16>::from_bits(*reinterpret_cast<const unsigned short*>(p));
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kDropThreads) lora_dropout_kernel(const T* in, int64_t rows, int64_t cols,
                                                                    DropArgs d, float* out) {
  const int64_t n = rows * cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kDropThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kDropThreads + threadIdx.x;
  const int64_t units = kVec ? n / 4 : 0;  // 4 elements: 16 / 8 input bytes, 16 output bytes
  for (int64_t u = first; u < units; u += stride) {
    const int64_t e = u * 4;
    int64_t row = e / cols, col = e - row * cols;
    float x[4];
    if constexpr (sizeof(T) == 4) {
      const float4 t = *reinterpret_cast<const float4*>(in + e);
      x[0] = t.x; x[1] = t.y; x[2] = t.z; x[3] = t.w;
    } else {
      const uint2 t = *reinterpret_cast<const uint2*>(in + e);
      x[0] = Elem<T>::from_bits(t.x & 0xFFFFu); x[1] = Elem<T>::from_bits(t.x >> 16);
      x[2] = Elem<T>::from_bits(t.y & 0xFFFFu); x[3] = Elem<T>::from_bits(t.y >> 16);
    }
    uint32_t rk = d.enabled ? dropout_row_key(d.key, row) : 0u;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      x[j] = drop1(d, rk, col, x[j]);
      if (++col == cols && j < 3) {  // the 4 may cross row ends (cols < 4 or not a multiple)
        col = 0;
        ++row;
        if (d.enabled) rk = dropout_row_key(d.key, row);
      }
    }
    *reinterpret_cast<float4*>(out + e) = make_float4(x[0], x[1], x[2], x[3]);
  }
  for (int64_t e = units * 4 + first; e < n; e += stride) {  // the tail (or all, unaligned)
    const int64_t row = e / cols, col = e - row * cols;
    out[e] = drop1(d, d.enabled ? dropout_row_key(d.key, row) : 0u, col, plain_load(in + e));
  }
}

}  // namespace

void launch_dropout(const LoraDropoutParams& p, cudaStream_t stream) {
  const int64_t n = p.rows * p.cols;
  const DropArgs d{p.dropout.enabled, p.dropout.enabled ? dropout_key(p.dropout.seed) : 0u, p.dropout.threshold,
                   p.dropout.scale};
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    // 4 elements a vector: 16 (fp32) or 8 input bytes, 16 output bytes.
    const bool vec = aligned(p.in, 4 * sizeof(T)) && aligned(p.out, 16);
    const int64_t work = ceil_div(vec ? std::max<int64_t>(n / 4, 1) : n, kDropThreads);
    const int grid = static_cast<int>(std::min<int64_t>(work, static_cast<int64_t>(sm_count(current_device())) * 8));
    const T* in = static_cast<const T*>(p.in);
    if (vec) lora_dropout_kernel<T, true><<<grid, kDropThreads, 0, stream>>>(in, p.rows, p.cols, d, p.out);
    else lora_dropout_kernel<T, false><<<grid, kDropThreads, 0, stream>>>(in, p.rows, p.cols, d, p.out);
    FTK_CHECK_LAUNCH("lora_dropout_kernel");
  });
}

}  // namespace lora
}  // namespace ftk
