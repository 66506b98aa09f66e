// Fused LoRA over a 4-bit weight: the math and the kernels' parameter structs.
//
// The layer (W: N x K in NF4/FP4, quant.h; A: r x K; B: N x r; s = alpha / r):
//   forward      y  = x·deq(W)ᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ                  (M x N)
//   grad input   dx = dy·deq(W) + drop(s·(dy·B)·A)                            (M x K)
//   dA = s·(dy·B)ᵀ·drop(x),  dB = s·dyᵀ·(drop(x)·Aᵀ)   (rank-r GEMMs, done by the caller)
// The two big products share one kernel shape: out = X·op(deq(W)) + epilogue, where the
// epilogue adds a rank-r product L·R (L: M x r fp32, made by the caller: drop(x)·Aᵀ forward,
// dy·B backward) and, forward, the bias; backward the rank-r part is masked by the dropout.
//
// Dropout mask: the hash of dropout.h over (seed, row, column) of the M x K input.
#pragma once

#include <cstdint>

#include "ftk/common.h"
#include "ftk/dropout.h"
#include "ftk/quant.h"

namespace ftk {

// out (M x K, fp32, row-major) = drop(in); in may be out (in place) when dtype is fp32.
struct LoraDropoutParams {
  const void* in = nullptr;
  DType dtype = DType::Float32;
  int64_t rows = 0, cols = 0;
  Dropout dropout;
  float* out = nullptr;
};

// The 4-bit weight W (N x K, row-major, flattened into quantization blocks as quant.h says).
struct Weight4bit {
  const uint8_t* packed = nullptr;  // (N*K + 1) / 2 bytes
  int64_t rows = 0, cols = 0;       // N, K
  int64_t blocksize = 64;
  QuantType quant_type = QuantType::NF4;
  // As in Dequantize4bitParams: fp32 absmax, or the double-quantization tensors.
  const float* absmax = nullptr;
  const uint8_t* absmax_q = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  const float* offset = nullptr;
  int64_t nested_blocksize = 256;
};

enum class LoraMatmulMode : int {
  Forward = 0,    // out (M x N) = X (M x K) · deq(W)ᵀ + bias + s · L (M x r) · Rᵀ, R = B (N x r)
  GradInput = 1,  // out (M x K) = X (M x N) · deq(W) + drop(s · L (M x r) · R), R = A (r x K)
};

struct LoraMatmulParams {
  LoraMatmulMode mode = LoraMatmulMode::Forward;
  const void* X = nullptr;  // M x (K or N), row-major, dtype; out has the same dtype
  DType dtype = DType::Float32;
  int64_t M = 0;
  Weight4bit W;
  const void* bias = nullptr;  // Forward only, optional: N elements of bias_dtype
  DType bias_dtype = DType::Float32;
  const float* L = nullptr;  // M x r, fp32
  const void* R = nullptr;   // Forward: N x r (B); GradInput: r x K (A); row-major, R_dtype
  DType R_dtype = DType::Float32;
  int64_t r = 0;
  float scaling = 1.0f;
  Dropout dropout;  // GradInput only
  void* out = nullptr;
};

inline void check(const LoraDropoutParams& p) {
  FTK_CHECK_ARG(p.rows >= 0 && p.cols >= 0, "rows and cols must be >= 0");
  FTK_CHECK_ARG(valid_dtype(static_cast<int>(p.dtype)), "in: dtype must be float32, float16 or bfloat16");
  if (p.rows * p.cols > 0) FTK_CHECK_ARG(p.in && p.out, "in and out must not be null");
  FTK_CHECK_ARG(p.in != p.out || p.dtype == DType::Float32, "in place needs fp32 input");
}

inline void check(const Weight4bit& w) {
  FTK_CHECK_ARG(w.rows >= 0 && w.cols >= 0, "the weight's shape must be >= 0");
  FTK_CHECK_ARG(valid_blocksize_4bit(w.blocksize), "blocksize must be one of 32, 64, ..., 4096");
  FTK_CHECK_ARG(valid_quant_type(static_cast<int>(w.quant_type)), "quant_type must be nf4 or fp4");
  if (w.rows * w.cols == 0) return;
  FTK_CHECK_ARG(w.packed != nullptr, "packed must not be null");
  if (w.absmax == nullptr) {
    FTK_CHECK_ARG(w.absmax_q && w.nested_absmax && w.nested_code && w.offset,
                  "absmax: either fp32 absmax or all of the double-quantization tensors");
    FTK_CHECK_ARG(valid_blocksize_8bit(w.nested_blocksize), "nested_blocksize must be one of 32, ..., 4096");
  }
}

inline void check(const LoraMatmulParams& p) {
  check(p.W);
  FTK_CHECK_ARG(p.mode == LoraMatmulMode::Forward || p.mode == LoraMatmulMode::GradInput, "unknown mode");
  FTK_CHECK_ARG(p.M >= 0, "M must be >= 0");
  FTK_CHECK_ARG(p.r >= 1 && p.r <= 256, "r must be in 1..256");
  FTK_CHECK_ARG(valid_dtype(static_cast<int>(p.dtype)), "X: dtype must be float32, float16 or bfloat16");
  FTK_CHECK_ARG(valid_dtype(static_cast<int>(p.R_dtype)), "R: dtype must be float32, float16 or bfloat16");
  FTK_CHECK_ARG(valid_dtype(static_cast<int>(p.bias_dtype)), "bias: dtype must be float32, float16 or bfloat16");
  const int64_t out_cols = p.mode == LoraMatmulMode::Forward ? p.W.rows : p.W.cols;
  if (p.M * out_cols > 0) FTK_CHECK_ARG(p.X && p.L && p.R && p.out, "X, L, R and out must not be null");
}

// CPU (csrc/cpu/lora.cpp); the CUDA launchers are in lora_cuda.h.
void lora_dropout_cpu(const LoraDropoutParams& p, int num_threads);

}  // namespace ftk
