// CPU kernels of the fused optimizer steps (optim.h): one pass over param, grad and states.
//
// 32-bit: elements split across threads; each element is read once and written once, in the
// order of operations of torch.optim.AdamW's single-tensor path (and of the reference Lion).
// torch's own vector kernels fuse some of those products into FMAs (add_ with alpha, lerp_),
// which this file (built with -ffp-contract=off) does not, so results differ from torch's by
// a few ulps after many steps, not more.
// 8-bit: whole 256-element blocks split across threads; a block is dequantized and stepped into
// two 1 KB fp32 arrays, its new absmax taken and requantized (quant.h's quantize_8bit of
// m / absmax, divided as bitsandbytes divides), all while it sits in L1. With AVX-512 a whole
// block runs as 16-lane vectors, with AVX2 as 8-lane ones, the code search in registers
// (code_search.h); the other loops are compiled for each instruction-set level (cpu_isa.h).
// Bytes an fp32 parameter moves: AdamW 4 + 4 (param in, out) + 4 (grad) + 16 (m, v in and out)
// = 28; 8-bit AdamW 12 + 4 (two codes in and out) = 16, plus 16 bytes of absmax a block.
#include <cmath>
#include <type_traits>

#include "ftk/cpu_isa.h"
#include "ftk/cpu_util.h"
#include "ftk/optim.h"
#include "ftk/quant.h"
#include "code_search.h"

namespace ftk {
namespace {

using cpu::from_f32;
using cpu::load_f32;

template <typename P, typename G>
FTK_CPU_INLINE void adamw_range(const Optim32bitParams& p, int64_t i0, int64_t i1) {
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
FTK_CPU_INLINE void lion_range(const Optim32bitParams& p, int64_t i0, int64_t i1) {
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

#if FTK_X86
using cpu::SearchTables;

// requantize() for a whole block of 256 (a partial last block takes the scalar path).
FTK_TARGET_AVX512 float requantize_block_avx512(const float* x, const SearchTables& t,
                                                        uint8_t* q) {
  __m512 acc = _mm512_setzero_ps();
  for (int j = 0; j < kOptimBlock; j += 16)  // max(|x|, acc) keeps acc where x is NaN, as fmax
    acc = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + j)), acc);
  const float amax = _mm512_reduce_max_ps(acc);
  const __m512 a = _mm512_set1_ps(amax);
  for (int j = 0; j < kOptimBlock; j += 16) {
    const __m512 scaled = amax > 0.0f ? _mm512_div_ps(_mm512_loadu_ps(x + j), a) : _mm512_setzero_ps();
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j), _mm512_cvtepi32_epi8(cpu::search16(t, scaled)));
  }
  return amax;
}

// adamw8bit_update for a whole block on fp32 arrays (g in, x the param in and out), with the
// same operations in the same order; the table lookups are gathers.
FTK_TARGET_AVX512 void adamw8bit_update_avx512(const Optim8bitParams& p, int64_t start, const float* g,
                                                       float* x, float* m, float* v) {
  const OptimHyper& h = p.hyper;
  const __m512 a1 = _mm512_set1_ps(p.absmax1[start / kOptimBlock]), a2 = _mm512_set1_ps(p.absmax2[start / kOptimBlock]);
  const __m512 beta1 = _mm512_set1_ps(h.beta1), beta2 = _mm512_set1_ps(h.beta2);
  const __m512 omb1 = _mm512_set1_ps(h.one_minus_beta1), omb2 = _mm512_set1_ps(h.one_minus_beta2);
  const __m512 decay = _mm512_set1_ps(h.decay), step_size = _mm512_set1_ps(h.step_size);
  const __m512 bc2 = _mm512_set1_ps(h.bias_correction2_sqrt), eps = _mm512_set1_ps(h.eps);
  for (int j = 0; j < kOptimBlock; j += 16) {
    const __m512 gj = _mm512_loadu_ps(g + j);
    const __m512i i1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.state1 + start + j)));
    const __m512i i2 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.state2 + start + j)));
    const __m512 mj = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_i32gather_ps(i1, p.code1, 4), a1), beta1),
                                    _mm512_mul_ps(gj, omb1));
    const __m512 vj = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_i32gather_ps(i2, p.code2, 4), a2), beta2),
                                    _mm512_mul_ps(_mm512_mul_ps(gj, gj), omb2));
    _mm512_store_ps(m + j, mj);
    _mm512_store_ps(v + j, vj);
    const __m512 den = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vj), bc2), eps);
    const __m512 upd = _mm512_mul_ps(step_size, _mm512_div_ps(mj, den));
    _mm512_storeu_ps(x + j, _mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(x + j), decay), upd));
  }
}

// ---- AVX2: 8 lanes ------------------------------------------------------------------------

FTK_TARGET_AVX2 float requantize_block_avx2(const float* x, const SearchTables& t,
                                                    uint8_t* q) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 acc = _mm256_setzero_ps();
  for (int j = 0; j < kOptimBlock; j += 8)  // max(|x|, acc) keeps acc where x is NaN, as fmax
    acc = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + j), abs_mask), acc);
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
  const __m256 a = _mm256_set1_ps(amax);
  // 32 codes a round: four vectors of 8 int32 packed to bytes (packs work within 128-bit
  // lanes; the permute puts the dwords back in order)
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int j = 0; j < kOptimBlock; j += 32) {
    __m256 scaled[4];
    __m256i c[4];
    for (int u = 0; u < 4; ++u)
      scaled[u] = amax > 0.0f ? _mm256_div_ps(_mm256_loadu_ps(x + j + 8 * u), a) : _mm256_setzero_ps();
    for (int u = 0; u < 4; ++u) c[u] = cpu::search8(t, scaled[u]);
    const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(c[0], c[1]), _mm256_packus_epi32(c[2], c[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j), _mm256_permutevar8x32_epi32(bytes, order));
  }
  return amax;
}

FTK_TARGET_AVX2 void adamw8bit_update_avx2(const Optim8bitParams& p, int64_t start, const float* g, float* x,
                                                   float* m, float* v) {
  const OptimHyper& h = p.hyper;
  const __m256 a1 = _mm256_set1_ps(p.absmax1[start / kOptimBlock]), a2 = _mm256_set1_ps(p.absmax2[start / kOptimBlock]);
  const __m256 beta1 = _mm256_set1_ps(h.beta1), beta2 = _mm256_set1_ps(h.beta2);
  const __m256 omb1 = _mm256_set1_ps(h.one_minus_beta1), omb2 = _mm256_set1_ps(h.one_minus_beta2);
  const __m256 decay = _mm256_set1_ps(h.decay), step_size = _mm256_set1_ps(h.step_size);
  const __m256 bc2 = _mm256_set1_ps(h.bias_correction2_sqrt), eps = _mm256_set1_ps(h.eps);
  for (int j = 0; j < kOptimBlock; j += 8) {
    const __m256 gj = _mm256_loadu_ps(g + j);
    const __m256i i1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.state1 + start + j)));
    const __m256i i2 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.state2 + start + j)));
    const __m256 mj = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_i32gather_ps(p.code1, i1, 4), a1), beta1),
                                    _mm256_mul_ps(gj, omb1));
    const __m256 vj = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_i32gather_ps(p.code2, i2, 4), a2), beta2),
                                    _mm256_mul_ps(_mm256_mul_ps(gj, gj), omb2));
    _mm256_store_ps(m + j, mj);
    _mm256_store_ps(v + j, vj);
    const __m256 den = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vj), bc2), eps);
    const __m256 upd = _mm256_mul_ps(step_size, _mm256_div_ps(mj, den));
    _mm256_storeu_ps(x + j, _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(x + j), decay), upd));
  }
}
#endif  // FTK_X86

// The update of one block: m and v (fp32, dequantized and stepped) into m[], v[]; param written.
// The scalar path (partial blocks, the baseline level); adamw8bit_update_avx512/_avx2 are the
// vector ones. The pointers are restrict locals so GCC may vectorise it where it can.
template <typename P, typename G>
FTK_CPU_INLINE void adamw8bit_update(const Optim8bitParams& p, int64_t start, int64_t len, float* __restrict m,
                                     float* __restrict v) {
  P* __restrict param = static_cast<P*>(p.param) + start;
  const G* __restrict grad = static_cast<const G*>(p.grad) + start;
  const uint8_t* __restrict q1 = p.state1 + start;
  const uint8_t* __restrict q2 = p.state2 + start;
  const float* __restrict code1 = p.code1;
  const float* __restrict code2 = p.code2;
  const float a1 = p.absmax1[start / kOptimBlock], a2 = p.absmax2[start / kOptimBlock];
  const float beta1 = p.hyper.beta1, beta2 = p.hyper.beta2, omb1 = p.hyper.one_minus_beta1;
  const float omb2 = p.hyper.one_minus_beta2, decay = p.hyper.decay, step_size = p.hyper.step_size;
  const float bc2 = p.hyper.bias_correction2_sqrt, eps = p.hyper.eps;
  for (int64_t j = 0; j < len; ++j) {
    const float g = load_f32<G>(grad, j);
    const float mj = (code1[q1[j]] * a1) * beta1 + g * omb1;
    const float vj = (code2[q2[j]] * a2) * beta2 + (g * g) * omb2;
    m[j] = mj;
    v[j] = vj;
    param[j] = from_f32<P>(load_f32<P>(param, j) * decay - step_size * (mj / (std::sqrt(vj) / bc2 + eps)));
  }
}

// A block's fp32 scratch: m and v stepped, and 16-bit param and grad widened (L1 either way).
struct BlockScratch {
  alignas(64) float m[kOptimBlock], v[kOptimBlock], x[kOptimBlock], g[kOptimBlock];
};

// The fp32 param (in and out) and grad of a whole block: in place when fp32, else widened.
template <typename P, typename G>
FTK_CPU_INLINE void widen_block(const Optim8bitParams& p, int64_t start, BlockScratch& s, float*& x, const float*& g) {
  P* param = static_cast<P*>(p.param) + start;
  const G* grad = static_cast<const G*>(p.grad) + start;
  x = s.x;
  g = s.g;
  if constexpr (std::is_same_v<P, float>) x = param; else for (int j = 0; j < kOptimBlock; ++j) s.x[j] = load_f32<P>(param, j);
  if constexpr (std::is_same_v<G, float>) g = grad; else for (int j = 0; j < kOptimBlock; ++j) s.g[j] = load_f32<G>(grad, j);
}

template <typename P>
FTK_CPU_INLINE void narrow_block(const Optim8bitParams& p, int64_t start, const BlockScratch& s) {
  if constexpr (!std::is_same_v<P, float>) {
    P* param = static_cast<P*>(p.param) + start;
    for (int j = 0; j < kOptimBlock; ++j) param[j] = from_f32<P>(s.x[j]);
  }
}

#if FTK_X86
// A whole block at the AVX2 or AVX-512 level: widened, stepped and requantized in L1.
template <typename P, typename G>
void block_vector(const Optim8bitParams& p, int64_t b, const SearchTables& t1, const SearchTables& t2, BlockScratch& s,
                  CpuIsa level) {
  const int64_t start = b * kOptimBlock;
  const bool avx512 = level == CpuIsa::AVX512;
  float* x;
  const float* g;
  cpu::with_isa([&]() FTK_ISA_BODY { widen_block<P, G>(p, start, s, x, g); });
  if (avx512) adamw8bit_update_avx512(p, start, g, x, s.m, s.v);
  else adamw8bit_update_avx2(p, start, g, x, s.m, s.v);
  cpu::with_isa([&]() FTK_ISA_BODY { narrow_block<P>(p, start, s); });
  p.absmax1[b] = avx512 ? requantize_block_avx512(s.m, t1, p.state1 + start) : requantize_block_avx2(s.m, t1, p.state1 + start);
  p.absmax2[b] = avx512 ? requantize_block_avx512(s.v, t2, p.state2 + start) : requantize_block_avx2(s.v, t2, p.state2 + start);
}
#endif

template <typename P, typename G>
void adamw8bit_blocks(const Optim8bitParams& p, int64_t b0, int64_t b1) {
  BlockScratch s;
  const CpuIsa level = cpu_isa_level();
#if FTK_X86
  const SearchTables t1 = cpu::search_tables(p.code1), t2 = cpu::search_tables(p.code2);
  // whole blocks on vectors from AVX2 up, for codes the vector search is exact for
  const bool vector = level != CpuIsa::Base && t1.exact && t2.exact;
#endif
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * kOptimBlock;
    const int64_t len = std::min<int64_t>(kOptimBlock, p.n - start);
#if FTK_X86
    if (vector && len == kOptimBlock) {
      block_vector<P, G>(p, b, t1, t2, s, level);
      continue;
    }
#endif
    cpu::with_isa([&]() FTK_ISA_BODY { adamw8bit_update<P, G>(p, start, len, s.m, s.v); });
    p.absmax1[b] = requantize(s.m, len, p.code1, p.state1 + start);
    p.absmax2[b] = requantize(s.v, len, p.code2, p.state2 + start);
  }
  (void)level;
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
      cpu::with_isa([&]() FTK_ISA_BODY {
        if (p.kind == OptimKind::AdamW) adamw_range<P, G>(p, i0, i1);
        else lion_range<P, G>(p, i0, i1);
      });
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
