// CPU kernels of the fused optimizer steps (optim.h): one pass over param, grad and states.
//
// 32-bit: elements split across threads; each element is read once and written once, in the
// order of operations of torch.optim.AdamW's single-tensor path (and of the reference Lion),
// so with -ffp-contract=off (CMakeLists.txt) the result is torch's bit for bit in fp32.
// 8-bit: whole 256-element blocks split across threads; a block is dequantized into two
// 1 KB fp32 arrays, updated, its new absmax taken and requantized (quant.h's quantize_8bit,
// the m / absmax quotient as bitsandbytes divides), all while it sits in L1.
// The step is memory-bound: AdamW moves 4 + 4 + 8 + 8 = 24 bytes an fp32 parameter (16 of them
// states), 8-bit AdamW 4 + 4 + 2 + 2 = 12 (+ 2 absmax floats a block).
#include <cmath>

#include "ftk/cpu_util.h"
#include "ftk/optim.h"
#include "ftk/quant.h"

namespace ftk {
namespace {

using cpu::from_f32;
using cpu::load_f32;

template <typename P, typename G>
FTK_CLONES void adamw_range(const Optim32bitParams& p, int64_t i0, int64_t i1) {
  P* param = static_cast<P*>(p.param);
  const G* grad = static_cast<const G*>(p.grad);
  const OptimHyper& h = p.hyper;
  const float w = h.one_minus_beta1;
  for (int64_t i = i0; i < i1; ++i) {
    const float g = load_f32<G>(grad, i);
    float x = load_f32<P>(param, i) * h.decay;
    float m = p.state1[i];
    m = w < 0.5f ? m + w * (g - m) : g - (g - m) * (1.0f - w);  // torch's lerp
    const float v = p.state2[i] * h.beta2 + h.one_minus_beta2 * g * g;  // addcmul: (value·g)·g
    const float denom = std::sqrt(v) / h.bias_correction2_sqrt + h.eps;
    x = x + (-h.step_size) * m / denom;  // addcdiv: (value·m) / denom
    p.state1[i] = m;
    p.state2[i] = v;
    param[i] = from_f32<P>(x);
  }
}

template <typename P, typename G>
FTK_CLONES void lion_range(const Optim32bitParams& p, int64_t i0, int64_t i1) {
  P* param = static_cast<P*>(p.param);
  const G* grad = static_cast<const G*>(p.grad);
  const OptimHyper& h = p.hyper;
  for (int64_t i = i0; i < i1; ++i) {
    const float g = load_f32<G>(grad, i), m = p.state1[i];
    const float c = m * h.beta1 + g * h.one_minus_beta1;
    const float sign = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
    param[i] = from_f32<P>(load_f32<P>(param, i) * h.decay + (-h.lr) * sign);
    p.state1[i] = m * h.beta2 + h.one_minus_beta2 * g;
  }
}

// Quantizes x[0..len) into q with the block's absmax (0 for an all-zero block: the code of 0).
inline float requantize(const float* x, int64_t len, const float* code, uint8_t* q) {
  float amax = 0.0f;
  for (int64_t j = 0; j < len; ++j) amax = std::fmax(amax, std::fabs(x[j]));
  for (int64_t j = 0; j < len; ++j) q[j] = static_cast<uint8_t>(quantize_8bit(code, amax > 0.0f ? x[j] / amax : 0.0f));
  return amax;
}

template <typename P, typename G>
void adamw8bit_blocks(const Optim8bitParams& p, int64_t b0, int64_t b1) {
  P* param = static_cast<P*>(p.param);
  const G* grad = static_cast<const G*>(p.grad);
  const OptimHyper& h = p.hyper;
  float m[kOptimBlock], v[kOptimBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * kOptimBlock;
    const int64_t len = std::min<int64_t>(kOptimBlock, p.n - start);
    const float a1 = p.absmax1[b], a2 = p.absmax2[b];
    for (int64_t j = 0; j < len; ++j) {
      const int64_t i = start + j;
      const float g = load_f32<G>(grad, i);
      m[j] = (p.code1[p.state1[i]] * a1) * h.beta1 + g * h.one_minus_beta1;
      v[j] = (p.code2[p.state2[i]] * a2) * h.beta2 + (g * g) * h.one_minus_beta2;
      const float x = load_f32<P>(param, i) * h.decay;
      param[i] = from_f32<P>(x - h.step_size * (m[j] / (std::sqrt(v[j]) / h.bias_correction2_sqrt + h.eps)));
    }
    p.absmax1[b] = requantize(m, len, p.code1, p.state1 + start);
    p.absmax2[b] = requantize(v, len, p.code2, p.state2 + start);
  }
}

template <typename Fn>
void with_dtypes(DType param, DType grad, Fn&& fn) {
  cpu::with_dtype(param, [&](auto pt) { cpu::with_dtype(grad, [&](auto gt) { fn(pt, gt); }); });
}

}  // namespace

void optim_32bit_step_cpu(const Optim32bitParams& p, int num_threads) {
  check(p);
  if (p.n == 0) return;
  const int threads = cpu::threads_for(p.n * 4, num_threads);
  with_dtypes(p.param_dtype, p.grad_dtype, [&](auto pt, auto gt) {
    using P = decltype(pt);
    using G = decltype(gt);
    cpu::parallel_for(p.n, threads, [&](int64_t i0, int64_t i1) {
      if (p.kind == OptimKind::AdamW) adamw_range<P, G>(p, i0, i1);
      else lion_range<P, G>(p, i0, i1);
    });
  });
}

void optim_8bit_step_cpu(const Optim8bitParams& p, int num_threads) {
  check(p);
  if (p.n == 0) return;
  const int64_t blocks = ceil_div(p.n, kOptimBlock);
  const int threads = cpu::threads_for(p.n * 16, num_threads);  // the 8-step code search is the work
  with_dtypes(p.param_dtype, p.grad_dtype, [&](auto pt, auto gt) {
    using P = decltype(pt);
    using G = decltype(gt);
    cpu::parallel_for(blocks, threads, [&](int64_t b0, int64_t b1) { adamw8bit_blocks<P, G>(p, b0, b1); });
  });
}

}  // namespace ftk
