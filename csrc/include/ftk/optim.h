// Fused optimizer steps: one pass reads param, grad and the states and writes them back.
//
// Every step works in fp32 whatever the param dtype (fp32, fp16, bf16): the param is widened,
// updated and rounded once; states are fp32 (32-bit) or 8-bit blockwise codes (below).
// With lr, wd, β1, β2, eps and t (the 1-based step) as given:
//   AdamW (torch.optim.AdamW's order of operations):
//     p ← p·(1 − lr·wd);  m ← m + (1 − β1)·(g − m);  v ← β2·v + (1 − β2)·g²
//     p ← p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + eps)
//   Lion (Chen et al. 2023; bitsandbytes' and lucidrains' order):
//     p ← p·(1 − lr·wd);  p ← p − lr·sign(β1·m + (1 − β1)·g);  m ← β2·m + (1 − β2)·g
//   AdamW 8-bit (bitsandbytes' blockwise 8-bit Adam, blocks of 256 elements):
//     m = code1[q1]·absmax1[blk], v = code2[q2]·absmax2[blk]   (dequantized)
//     m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²;  p updated from these fp32 m, v as AdamW
//     absmax1[blk] ← max |m| over the block; q1 ← quantize_8bit(code1, m / absmax1[blk])
//     (likewise v with code2); a block whose absmax is 0 stores the code of 0.
//   code1 is the signed dynamic map (m can be negative), code2 the unsigned one (v >= 0): the
//   unsigned map spends its 8 bits on magnitudes, 2x finer at every exponent.
// The bias corrections are computed in double on the host and passed as floats.
#pragma once

#include <cstdint>

#include "ftk/common.h"

namespace ftk {

constexpr int64_t kOptimBlock = 256;  // the 8-bit state blocksize (bitsandbytes')

enum class OptimKind : int { AdamW = 0, Lion = 1 };

// Every derived scalar is computed in double on the host and rounded once, as torch rounds a
// Python float scalar: fp32(1 − 0.9) = 0.1f, where 1.0f − 0.9f would be 0.100000024f.
struct OptimHyper {
  float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
  float decay = 1.0f;               // 1 − lr·wd
  float one_minus_beta1 = 0.1f;     // 1 − β1
  float one_minus_beta2 = 0.001f;   // 1 − β2
  // AdamW only: lr / (1 − β1^t) and √(1 − β2^t), from the step count.
  float step_size = 1e-3f, bias_correction2_sqrt = 1.0f;
};

struct Optim32bitParams {
  OptimKind kind = OptimKind::AdamW;
  void* param = nullptr;  // n elements of param_dtype
  DType param_dtype = DType::Float32;
  const void* grad = nullptr;  // n elements of grad_dtype
  DType grad_dtype = DType::Float32;
  int64_t n = 0;
  float* state1 = nullptr;  // m (n fp32)
  float* state2 = nullptr;  // v (n fp32), AdamW only
  OptimHyper hyper;
};

struct Optim8bitParams {
  void* param = nullptr;
  DType param_dtype = DType::Float32;
  const void* grad = nullptr;
  DType grad_dtype = DType::Float32;
  int64_t n = 0;
  uint8_t* state1 = nullptr;  // n codes of m
  uint8_t* state2 = nullptr;  // n codes of v
  float* absmax1 = nullptr;   // ceil(n / 256)
  float* absmax2 = nullptr;
  const float* code1 = nullptr;  // 256, signed dynamic map
  const float* code2 = nullptr;  // 256, unsigned dynamic map
  OptimHyper hyper;
};

inline void check(const Optim32bitParams& p) {
  FTK_CHECK_ARG(p.kind == OptimKind::AdamW || p.kind == OptimKind::Lion, "unknown optimizer kind");
  FTK_CHECK_ARG(valid_dtype(static_cast<int>(p.param_dtype)), "param: dtype must be float32, float16 or bfloat16");
  FTK_CHECK_ARG(valid_dtype(static_cast<int>(p.grad_dtype)), "grad: dtype must be float32, float16 or bfloat16");
  FTK_CHECK_ARG(p.n >= 0, "n must be >= 0");
  if (p.n > 0) {
    FTK_CHECK_ARG(p.param && p.grad && p.state1, "param, grad and state1 must not be null");
    FTK_CHECK_ARG(p.kind == OptimKind::Lion || p.state2, "AdamW needs state2");
  }
}

inline void check(const Optim8bitParams& p) {
  FTK_CHECK_ARG(valid_dtype(static_cast<int>(p.param_dtype)), "param: dtype must be float32, float16 or bfloat16");
  FTK_CHECK_ARG(valid_dtype(static_cast<int>(p.grad_dtype)), "grad: dtype must be float32, float16 or bfloat16");
  FTK_CHECK_ARG(p.n >= 0, "n must be >= 0");
  if (p.n > 0)
    FTK_CHECK_ARG(p.param && p.grad && p.state1 && p.state2 && p.absmax1 && p.absmax2 && p.code1 && p.code2,
                  "param, grad, the states, their absmax and the codes must not be null");
}

// CPU (csrc/cpu/optim.cpp): elements (8-bit: whole blocks) split across threads.
void optim_32bit_step_cpu(const Optim32bitParams& p, int num_threads);
void optim_8bit_step_cpu(const Optim8bitParams& p, int num_threads);

}  // namespace ftk
