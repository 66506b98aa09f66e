// The optimizer param structs built from what crosses the binding (the mirror of
// ftkernels/_native.py's optim_*_args). The CPU and CUDA functions take the same arguments but
// the last (threads or a stream).
#pragma once

#include <cstdint>
#include <string>

#include "ftk/optim.h"
#include "ftk/quant_args.h"

namespace ftk {
namespace args {

// The order of _native.optim_hyper: lr, beta1, beta2, eps, decay, 1 − β1, 1 − β2, step_size,
// √(1 − β2^t).
inline OptimHyper optim_hyper(float lr, float beta1, float beta2, float eps, float decay, float one_minus_beta1,
                              float one_minus_beta2, float step_size, float bias_correction2_sqrt) {
  OptimHyper h;
  h.lr = lr; h.beta1 = beta1; h.beta2 = beta2; h.eps = eps; h.decay = decay;
  h.one_minus_beta1 = one_minus_beta1; h.one_minus_beta2 = one_minus_beta2;
  h.step_size = step_size; h.bias_correction2_sqrt = bias_correction2_sqrt;
  return h;
}

inline Optim32bitParams optim_32bit(int kind, uintptr_t param, int param_dtype, uintptr_t grad, int grad_dtype,
                                    int64_t n, uintptr_t state1, uintptr_t state2, const OptimHyper& hyper) {
  FTK_CHECK_ARG(kind == 0 || kind == 1, "kind: unknown optimizer code " + std::to_string(kind));
  Optim32bitParams p;
  p.kind = static_cast<OptimKind>(kind);
  p.param = ptr<void>(param); p.param_dtype = dtype(param_dtype, "param");
  p.grad = ptr<const void>(grad); p.grad_dtype = dtype(grad_dtype, "grad"); p.n = n;
  p.state1 = ptr<float>(state1); p.state2 = ptr<float>(state2);
  p.hyper = hyper;
  return p;
}

inline Optim8bitParams optim_8bit(uintptr_t param, int param_dtype, uintptr_t grad, int grad_dtype, int64_t n,
                                  uintptr_t state1, uintptr_t state2, uintptr_t absmax1, uintptr_t absmax2,
                                  uintptr_t code1, uintptr_t code2, const OptimHyper& hyper) {
  Optim8bitParams p;
  p.param = ptr<void>(param); p.param_dtype = dtype(param_dtype, "param");
  p.grad = ptr<const void>(grad); p.grad_dtype = dtype(grad_dtype, "grad"); p.n = n;
  p.state1 = ptr<uint8_t>(state1); p.state2 = ptr<uint8_t>(state2);
  p.absmax1 = ptr<float>(absmax1); p.absmax2 = ptr<float>(absmax2);
  p.code1 = ptr<const float>(code1); p.code2 = ptr<const float>(code2);
  p.hyper = hyper;
  return p;
}

}  // namespace args
}  // namespace ftk
