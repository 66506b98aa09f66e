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
// block runs as 16-lane vectors, the code search in registers (see SearchTables).
// Bytes an fp32 parameter moves: AdamW 4 + 4 (param in, out) + 4 (grad) + 16 (m, v in and out)
// = 28; 8-bit AdamW 12 + 4 (two codes in and out) = 16, plus 16 bytes of absmax a block.
#include <cmath>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

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

#if defined(__GNUC__) && defined(__x86_64__)
#define FTK_AVX512 __attribute__((target("avx512f")))

bool use_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok && cpu_isa_limit() >= CpuIsa::AVX512;
}

// quant.h's binary search in registers: after L decisions (a path of L bits, the first decision
// highest) the pivot is one of 2^L entries, so code[pivot] is a permute of a 2^L-entry table
// (level_lookup) rather than a gather. Measured on a 2-core Zen 4, 84M parameters a step: the
// scalar search 3.7 s; vectorised with seven gathers a search 560 ms; with the update loop
// vectorised too 250 ms; with permutes instead of gathers 195 ms (torch's foreach AdamW in fp32:
// 220-600 ms).
struct SearchTables {
  alignas(64) float level[7][128];  // level[L-1][path] = code[pivot after L decisions]
};

inline SearchTables search_tables(const float* code) {
  SearchTables t{};
  for (int L = 1; L <= 7; ++L) {
    for (int path = 0; path < (1 << L); ++path) {
      int pivot = 127;
      for (int k = 0; k < L; ++k) pivot += ((path >> (L - 1 - k)) & 1) ? (64 >> k) : -(64 >> k);
      t.level[L - 1][path] = code[pivot];
    }
  }
  return t;
}

// table[path] for the 2^bits-entry table of a level: one permute up to 16 entries, a
// two-register permute up to 32, then one a 32-entry quarter, picked by path's bits 5 and 6.
FTK_AVX512 inline __m512 level_lookup(const float* table, int bits, __m512i path) {
  if (bits <= 4) return _mm512_permutexvar_ps(path, _mm512_load_ps(table));
  __m512 val = _mm512_permutex2var_ps(_mm512_load_ps(table), path, _mm512_load_ps(table + 16));
  for (int q = 1; q < (1 << (bits - 5)); ++q) {
    const __mmask16 in_q = _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(path, 5), _mm512_set1_epi32(q));
    val = _mm512_mask_mov_ps(val, in_q, _mm512_permutex2var_ps(_mm512_load_ps(table + 32 * q), path,
                                                                 _mm512_load_ps(table + 32 * q + 16)));
  }
  return val;
}

// quant.h's quantize_8bit on 16 lanes: the same comparisons in the same order, so the same
// codes. Two searches an element are most of the 8-bit step's work.
FTK_AVX512 inline __m512i quantize_8bit_x16(const float* code, const SearchTables& t, __m512 x) {
  __m512i pivot = _mm512_set1_epi32(127), upper_pivot = _mm512_set1_epi32(255);
  __m512i lower_pivot = _mm512_setzero_si512(), path = _mm512_setzero_si512();
  __m512 lower = _mm512_set1_ps(-1.0f), upper = _mm512_set1_ps(1.0f), val = _mm512_set1_ps(code[127]);
  const __m512i one = _mm512_set1_epi32(1);
  for (int k = 0; k < 7; ++k) {
    const int i = 64 >> k;
    const __mmask16 right = _mm512_cmp_ps_mask(x, val, _CMP_GT_OQ);
    const __m512i step = _mm512_set1_epi32(i);
    lower_pivot = _mm512_mask_mov_epi32(lower_pivot, right, pivot);
    lower = _mm512_mask_mov_ps(lower, right, val);
    upper_pivot = _mm512_mask_mov_epi32(pivot, right, upper_pivot);
    upper = _mm512_mask_mov_ps(val, right, upper);
    pivot = _mm512_mask_add_epi32(_mm512_sub_epi32(pivot, step), right, pivot, step);
    path = _mm512_mask_add_epi32(_mm512_slli_epi32(path, 1), right, _mm512_slli_epi32(path, 1), one);
    val = level_lookup(t.level[k], k + 1, path);
  }
  upper = _mm512_mask_mov_ps(upper, _mm512_cmpeq_epi32_mask(upper_pivot, _mm512_set1_epi32(255)),
                             _mm512_set1_ps(code[255]));
  lower = _mm512_mask_mov_ps(lower, _mm512_cmpeq_epi32_mask(lower_pivot, _mm512_setzero_si512()),
                             _mm512_set1_ps(code[0]));
  const __m512 half = _mm512_set1_ps(0.5f);
  const __mmask16 right = _mm512_cmp_ps_mask(x, val, _CMP_GT_OQ);
  const __mmask16 up = _mm512_cmp_ps_mask(x, _mm512_mul_ps(_mm512_add_ps(upper, val), half), _CMP_GT_OQ);
  const __mmask16 down = _mm512_cmp_ps_mask(x, _mm512_mul_ps(_mm512_add_ps(lower, val), half), _CMP_LT_OQ);
  __m512i res = _mm512_mask_mov_epi32(pivot, right & up, upper_pivot);
  return _mm512_mask_mov_epi32(res, static_cast<__mmask16>(~right) & down, lower_pivot);
}

// requantize() for a whole block of 256 (a partial last block takes the scalar path).
FTK_AVX512 float requantize_block_avx512(const float* x, const float* code, const SearchTables& t, uint8_t* q) {
  __m512 acc = _mm512_setzero_ps();
  for (int j = 0; j < kOptimBlock; j += 16)  // max(|x|, acc) keeps acc where x is NaN, as fmax
    acc = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + j)), acc);
  const float amax = _mm512_reduce_max_ps(acc);
  const __m512 a = _mm512_set1_ps(amax);
  for (int j = 0; j < kOptimBlock; j += 16) {
    const __m512 scaled = amax > 0.0f ? _mm512_div_ps(_mm512_loadu_ps(x + j), a) : _mm512_setzero_ps();
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j), _mm512_cvtepi32_epi8(quantize_8bit_x16(code, t, scaled)));
  }
  return amax;
}
// adamw8bit_update for a whole block on fp32 arrays (g in, x the param in and out), with the
// same operations in the same order; the table lookups are gathers.
FTK_AVX512 void adamw8bit_update_avx512(const Optim8bitParams& p, int64_t start, const float* g, float* x,
                                        float* m, float* v) {
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
#else
struct SearchTables {};
inline SearchTables search_tables(const float*) { return {}; }
bool use_avx512() { return false; }
float requantize_block_avx512(const float*, const float*, const SearchTables&, uint8_t*) { return 0.0f; }
void adamw8bit_update_avx512(const Optim8bitParams&, int64_t, const float*, float*, float*, float*) {}
#endif

// The update of one block: m and v (fp32, dequantized and stepped) into m[], v[]; param written.
// The scalar path (partial blocks, CPUs without AVX-512); adamw8bit_update_avx512 is the
// vector one. The pointers are restrict locals so GCC may vectorise it where it can.
template <typename P, typename G>
FTK_CLONES void adamw8bit_update(const Optim8bitParams& p, int64_t start, int64_t len, float* __restrict m,
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

template <typename T>
FTK_CLONES void widen_block(const T* in, float* out) {
  for (int j = 0; j < kOptimBlock; ++j) out[j] = load_f32<T>(in, j);
}

template <typename T>
FTK_CLONES void narrow_block(const float* in, T* out) {
  for (int j = 0; j < kOptimBlock; ++j) out[j] = from_f32<T>(in[j]);
}

template <typename P, typename G>
void adamw8bit_blocks(const Optim8bitParams& p, int64_t b0, int64_t b1) {
  alignas(64) float m[kOptimBlock], v[kOptimBlock], x[kOptimBlock], g[kOptimBlock];
  const bool simd = use_avx512();
  const SearchTables t1 = search_tables(p.code1), t2 = search_tables(p.code2);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * kOptimBlock;
    const int64_t len = std::min<int64_t>(kOptimBlock, p.n - start);
    if (simd && len == kOptimBlock) {
      P* param = static_cast<P*>(p.param) + start;
      const G* grad = static_cast<const G*>(p.grad) + start;
      // fp32 param and grad are used in place; 16-bit ones go through x and g (L1 either way)
      float* xp = x;
      const float* gp = g;
      if constexpr (std::is_same_v<P, float>) xp = param; else widen_block<P>(param, x);
      if constexpr (std::is_same_v<G, float>) gp = grad; else widen_block<G>(grad, g);
      adamw8bit_update_avx512(p, start, gp, xp, m, v);
      if constexpr (!std::is_same_v<P, float>) narrow_block<P>(x, param);
      p.absmax1[b] = requantize_block_avx512(m, p.code1, t1, p.state1 + start);
      p.absmax2[b] = requantize_block_avx512(v, p.code2, t2, p.state2 + start);
    } else {
      adamw8bit_update<P, G>(p, start, len, m, v);
      p.absmax1[b] = requantize(m, len, p.code1, p.state1 + start);
      p.absmax2[b] = requantize(v, len, p.code2, p.state2 + start);
    }
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
