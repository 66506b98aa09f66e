// CPU kernels of the fused LoRA op: the hashed dropout (lora.h). The big products run as
// row tiles of the 4-bit weight dequantized to fp32 (dequantize_4bit_range_cpu, nf4.cpp) fed
// to torch's fp32 GEMM by ftkernels/backends/cpu.py; see there for why.
//
// Dropout: out[m, k] = keep(m, k) ? in[m, k] * scale : 0 in fp32, rows split across threads.
// Two mix32 hashes an element (~12 integer ops); the column loop is branch-free so it
// vectorises (vpmulld), and is compiled for each instruction-set level (cpu_isa.h):
// 512 x 4096 elements take ~1 ms on one core with AVX-512, against ~100 ms for the GEMMs.
#include <cstring>

#include "ftk/cpu_isa.h"
#include "ftk/cpu_util.h"
#include "ftk/lora.h"

namespace ftk {
namespace {

using cpu::load_f32;

template <typename T>
FTK_CPU_INLINE void dropout_row(const T* in, float* out, int64_t cols, uint32_t row_key, uint32_t threshold,
                            float scale) {
  for (int64_t k = 0; k < cols; ++k) {
    const float v = load_f32<T>(in, k) * scale;
    out[k] = dropout_keep(row_key, k, threshold) ? v : 0.0f;
  }
}

template <typename T>
FTK_CPU_INLINE void widen_row(const T* in, float* out, int64_t cols) {
  for (int64_t k = 0; k < cols; ++k) out[k] = load_f32<T>(in, k);
}

template <typename T>
FTK_CPU_INLINE void lora_dropout_rows(const LoraDropoutParams& p, int64_t m0, int64_t m1) {
  const T* in = static_cast<const T*>(p.in);
  const uint32_t key = dropout_key(p.dropout.seed);
  for (int64_t m = m0; m < m1; ++m) {
    const T* src = in + m * p.cols;
    float* dst = p.out + m * p.cols;
    if (p.dropout.enabled) {
      dropout_row<T>(src, dst, p.cols, dropout_row_key(key, m), p.dropout.threshold, p.dropout.scale);
    } else if (static_cast<const void*>(src) != dst) {
      widen_row<T>(src, dst, p.cols);
    }
  }
}

}  // namespace

void lora_dropout_cpu(const LoraDropoutParams& p, int num_threads) {
  check(p);
  if (p.rows * p.cols == 0) return;
  const int threads = cpu::threads_for(p.rows * p.cols * 4, num_threads);  // ~4 copies' work an element
  cpu::parallel_for(p.rows, threads, [&](int64_t m0, int64_t m1) {
    cpu::with_dtype(p.dtype, [&](auto tag) {
      cpu::with_isa([&]() FTK_ISA_BODY { lora_dropout_rows<decltype(tag)>(p, m0, m1); });
    });
  });
}

}  // namespace ftk
