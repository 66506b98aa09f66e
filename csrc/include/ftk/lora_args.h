// The LoRA param structs built from what crosses the binding (the mirror of quant_args.h and
// of ftkernels/_native.py's lora_*_args). The CPU and CUDA functions take the same arguments
// but the last (threads or a stream).
#pragma once

#include <cstdint>

#include "ftk/lora.h"
#include "ftk/quant_args.h"

namespace ftk {
namespace args {

inline Dropout dropout(bool enabled, uint64_t seed, uint32_t threshold, float scale) {
  Dropout d;
  d.enabled = enabled; d.seed = seed; d.threshold = threshold; d.scale = scale;
  return d;
}

inline LoraDropoutParams lora_dropout(uintptr_t in, int dtype_code, int64_t rows, int64_t cols, bool enabled,
                                      uint64_t seed, uint32_t threshold, float scale, uintptr_t out) {
  LoraDropoutParams p;
  p.in = ptr<const void>(in); p.dtype = dtype(dtype_code, "in"); p.rows = rows; p.cols = cols;
  p.dropout = dropout(enabled, seed, threshold, scale); p.out = ptr<float>(out);
  return p;
}

inline Weight4bit weight_4bit(uintptr_t packed, int64_t rows, int64_t cols, int64_t blocksize, int quant_type_code,
                              uintptr_t absmax, uintptr_t absmax_q, uintptr_t nested_absmax, uintptr_t nested_code,
                              uintptr_t offset, int64_t nested_blocksize) {
  Weight4bit w;
  w.packed = ptr<const uint8_t>(packed); w.rows = rows; w.cols = cols; w.blocksize = blocksize;
  w.quant_type = quant_type(quant_type_code);
  w.absmax = ptr<const float>(absmax); w.absmax_q = ptr<const uint8_t>(absmax_q);
  w.nested_absmax = ptr<const float>(nested_absmax); w.nested_code = ptr<const float>(nested_code);
  w.offset = ptr<const float>(offset); w.nested_blocksize = nested_blocksize;
  return w;
}

inline LoraMatmulMode lora_mode(int m) {
  FTK_CHECK_ARG(m == 0 || m == 1, "mode: unknown code " + std::to_string(m));
  return static_cast<LoraMatmulMode>(m);
}

// The argument order of _native.lora_matmul_args: mode, X, its dtype, M, the weight (as
// weight_4bit), bias and its dtype, L, R and its dtype, r, scaling, the dropout, out.
inline LoraMatmulParams lora_matmul(int mode, uintptr_t X, int dtype_code, int64_t M, uintptr_t packed, int64_t rows,
                                    int64_t cols, int64_t blocksize, int quant_type_code, uintptr_t absmax,
                                    uintptr_t absmax_q, uintptr_t nested_absmax, uintptr_t nested_code,
                                    uintptr_t offset, int64_t nested_blocksize, uintptr_t bias, int bias_dtype_code,
                                    uintptr_t L, uintptr_t R, int R_dtype_code, int64_t r, float scaling,
                                    bool enabled, uint64_t seed, uint32_t threshold, float scale, uintptr_t out) {
  LoraMatmulParams p;
  p.mode = lora_mode(mode);
  p.X = ptr<const void>(X); p.dtype = dtype(dtype_code, "X"); p.M = M;
  p.W = weight_4bit(packed, rows, cols, blocksize, quant_type_code, absmax, absmax_q, nested_absmax, nested_code,
                    offset, nested_blocksize);
  p.bias = ptr<const void>(bias); p.bias_dtype = dtype(bias_dtype_code, "bias");
  p.L = ptr<const float>(L); p.R = ptr<const void>(R); p.R_dtype = dtype(R_dtype_code, "R"); p.r = r;
  p.scaling = scaling;
  p.dropout = dropout(enabled, seed, threshold, scale);
  p.out = ptr<void>(out);
  return p;
}

}  // namespace args
}  // namespace ftk
