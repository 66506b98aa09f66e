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

// The largest LoRA rank the kernels accept. The CUDA epilogue stages r through shared memory
// in chunks of 16 (tensor-core path) or 32 (fp32 path) and costs r fp32 FMAs an output, so the
// rank-r term stays a small part of the work (~6% at r = 16, K = 4096); QLoRA uses 8 to 64.
constexpr int64_t kLoraMaxRank = 256;

// out (M x K, fp32, row-major) = drop(in); in may be out (in place) when dtype is fp32.
struct LoraDropoutParams {
  const void* in = nullptr;
  DType dtype = DType::Float32;
  int64_t rows = 0, cols = 0;
  Dropout dropout;
  float* out = nullptr;
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
  Weight4bit W;  // N x K (quant.h)
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

inline void check(const LoraMatmulParams& p) {
  check(p.W);
  FTK_CHECK_ARG(p.mode == LoraMatmulMode::Forward || p.mode == LoraMatmulMode::GradInput, "unknown mode");
  FTK_CHECK_ARG(p.M >= 0, "M must be >= 0");
  FTK_CHECK_ARG(p.r >= 1 && p.r <= kLoraMaxRank, "r must be in 1..256");
  FTK_CHECK_ARG(valid_dtype(static_cast<int>(p.dtype)), "X: dtype must be float32, float16 or bfloat16");
  FTK_CHECK_ARG(valid_dtype(static_cast<int>(p.R_dtype)), "R: dtype must be float32, float16 or bfloat16");
  FTK_CHECK_ARG(valid_dtype(static_cast<int>(p.bias_dtype)), "bias: dtype must be float32, float16 or bfloat16");
  const int64_t out_cols = p.mode == LoraMatmulMode::Forward ? p.W.rows : p.W.cols;
  if (p.M * out_cols > 0) FTK_CHECK_ARG(p.X && p.L && p.R && p.out, "X, L, R and out must not be null");
}

// CPU (csrc/cpu/lora.cpp); the CUDA launchers are in lora_cuda.h.
void lora_dropout_cpu(const LoraDropoutParams& p, int num_threads);

}  // namespace ftk
