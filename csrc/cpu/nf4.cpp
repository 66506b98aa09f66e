// CPU kernels for blockwise 4-bit (NF4/FP4) and 8-bit quantization.
//
// Algorithm: one quantization block at a time, whole blocks per thread (a block of bs >= 32
// elements starts on an even element, so it owns whole packed bytes and threads never share
// a byte). Quantize: convert the block to fp32 in a stack buffer, absmax with a NaN flag,
// s = 1/absmax, index = count of midpoints below x*s (branch-free, see quant.h), pack pairs.
// Dequantize: per block, a 16-entry table code[k] * absmax already rounded to the output
// dtype, then each byte writes two table entries: one load and two stores per byte.
//
// Speed (4096x4096 bf16, 2 threads, see benchmarks/bench_nf4.py): the loops are written to
// auto-vectorise and are compiled for each instruction-set level (cpu_isa.h); the 4-bit
// dequantize has hand-written AVX2 (pshufb) and AVX-512BW (vpermw) kernels (quantize 22 ms,
// dequantize 1.7 ms from DRAM, 1.3x the time of a copy of the same bytes). Threads come from
// torch's OpenMP pool (cpu_util.h). -ffp-contract=off (CMakeLists.txt) keeps every product
// rounded before any sum, so the bytes equal the reference's and bitsandbytes' CUDA kernels'.
#include <cmath>
#include <cstring>

#include "ftk/cpu_isa.h"
#include "ftk/cpu_util.h"
#include "ftk/quant.h"
#include "code_search.h"

#if FTK_X86
#include <immintrin.h>
#endif

namespace ftk {
namespace {

using cpu::bf16_t;
using cpu::f16_t;

constexpr int64_t kMaxBlock = 4096;

// The 16-entry code of each 4-bit type, aligned for whole-register loads.
alignas(64) constexpr float kCode4bit[2][16] = {FTK_NF4_CODE, FTK_FP4_CODE};
constexpr const float* code_4bit(QuantType q) { return kCode4bit[static_cast<int>(q)]; }

using cpu::from_f32;
using cpu::load_f32;
using cpu::with_dtype;

// Loads block [start, start+len) into x as fp32 and returns its absmax; NaN anywhere makes
// the absmax NaN (a max alone would skip it and hide the NaN as a finite block).
template <typename T>
FTK_CPU_INLINE float load_block(const T* A, int64_t start, int64_t len, float* x) {
  float m = 0.0f;
  uint32_t nan = 0;
  for (int64_t i = 0; i < len; ++i) {
    const float v = load_f32<T>(A, start + i);
    x[i] = v;
    const float a = std::fabs(v);
    m = a > m ? a : m;
    nan |= static_cast<uint32_t>(a != a);
  }
  return nan ? NAN : m;
}

// ---- 4-bit -------------------------------------------------------------------------------

template <typename T, QuantType Q>
FTK_CPU_INLINE void quantize_4bit_range(const Quantize4bitParams& p, int64_t b0, int64_t b1) {
  const T* A = static_cast<const T*>(p.A);
  alignas(64) float x[kMaxBlock];
  alignas(64) uint8_t q[kMaxBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * p.blocksize;
    const int64_t len = p.n - start < p.blocksize ? p.n - start : p.blocksize;
    const float absmax = load_block<T>(A, start, len, x);
    p.absmax[b] = absmax;
    const float s = 1.0f / absmax;
    const int64_t len2 = (len + 1) & ~int64_t{1};
    if (len2 != len) x[len] = 0.0f;  // the pad nibble quantizes a zero of this block
    for (int64_t i = 0; i < len2; ++i) {
      const float xn = x[i] * s;
      q[i] = static_cast<uint8_t>(Q == QuantType::NF4 ? quantize_nf4(xn) : quantize_fp4(xn));
    }
    uint8_t* out = p.packed + start / 2;
    for (int64_t j = 0; j < len2 / 2; ++j) out[j] = static_cast<uint8_t>((q[2 * j] << 4) | q[2 * j + 1]);
  }
}

// The fp32 absmax of block b: stored, or decoded from its 8-bit code (double quantization).
FTK_CPU_INLINE float block_absmax(const Weight4bit& w, int64_t b) {
  if (w.absmax) return w.absmax[b];
  // NOTE: two roundings, product then sum, as bitsandbytes computes them (no FMA here).
  const float scaled = w.nested_code[w.absmax_q[b]] * w.nested_absmax[b / w.nested_blocksize];
  return scaled + *w.offset;
}

// A dequantize of elements [begin, end) of the n-element tensor of p into p.out (which holds
// element begin at index 0): the whole tensor, or a row tile of a weight for the fused LoRA
// matmul (lora.cpp), whose tiles start and end anywhere inside a quantization block.
struct DequantJob {
  Weight4bit w;
  void* out;
  int64_t n;  // w.numel()
  int64_t begin, end;
};

// Where block b of a dequantize lies: its packed bytes, its outputs, its element count (the
// last block may be partial and odd). The kernels see only blocks inside the job's range;
// dequantize_4bit_range_cpu does the (at most two) blocks the range cuts with
// dequantize_clipped.
template <typename OutT>
struct DequantBlock {
  const uint8_t* src;
  OutT* dst;
  int64_t len;
};

template <typename OutT>
FTK_CPU_INLINE DequantBlock<OutT> dequant_block(const DequantJob& j, int64_t b) {
  const int64_t start = b * j.w.blocksize;
  const int64_t len = j.n - start < j.w.blocksize ? j.n - start : j.w.blocksize;
  return {j.w.packed + start / 2, static_cast<OutT*>(j.out) + (start - j.begin), len};
}

FTK_CPU_INLINE bool block_is_clipped(const DequantJob& j, int64_t b) {
  const int64_t start = b * j.w.blocksize;
  const int64_t block_end = start + j.w.blocksize < j.n ? start + j.w.blocksize : j.n;
  return start < j.begin || block_end > j.end;
}

// The elements of block b inside [begin, end), one nibble at a time.
template <typename OutT>
void dequantize_clipped(const DequantJob& j, int64_t b, const float* code) {
  const float absmax = block_absmax(j.w, b);
  OutT lut[16];
  for (int k = 0; k < 16; ++k) lut[k] = from_f32<OutT>(code[k] * absmax);
  const int64_t start = b * j.w.blocksize;
  const int64_t s = start > j.begin ? start : j.begin;
  const int64_t block_end = start + j.w.blocksize < j.n ? start + j.w.blocksize : j.n;
  const int64_t e = block_end < j.end ? block_end : j.end;
  OutT* out = static_cast<OutT*>(j.out);
  for (int64_t i = s; i < e; ++i) {
    const uint8_t byte = j.w.packed[i / 2];
    out[i - j.begin] = lut[(i & 1) ? (byte & 0xF) : (byte >> 4)];
  }
}

// Outputs of the block from packed byte j on, through the 16-entry table: the whole block in
// the scalar kernel, the tail past the last full vector in the SIMD ones.
template <typename OutT>
FTK_CPU_INLINE void dequantize_from_lut(const OutT* lut, const DequantBlock<OutT>& blk, int64_t j) {
  for (; j < blk.len / 2; ++j) {
    const uint8_t byte = blk.src[j];
    blk.dst[2 * j] = lut[byte >> 4];
    blk.dst[2 * j + 1] = lut[byte & 0xF];
  }
  if (blk.len & 1) blk.dst[blk.len - 1] = lut[blk.src[blk.len / 2] >> 4];
}

template <typename OutT, QuantType Q>
FTK_CPU_INLINE void dequantize_4bit_range(const DequantJob& job, int64_t b0, int64_t b1) {
  const float* code = code_4bit(Q);
  for (int64_t b = b0; b < b1; ++b) {
    const float absmax = block_absmax(job.w, b);
    const DequantBlock<OutT> blk = dequant_block<OutT>(job, b);
    OutT lut[16];
    for (int k = 0; k < 16; ++k) lut[k] = from_f32<OutT>(code[k] * absmax);
    dequantize_from_lut(lut, blk, 0);
  }
}


#if FTK_X86
// ---- AVX2 dequantize: pshufb table lookups ------------------------------------------------
// The 16 outputs of a block, already in the output dtype, are split into byte planes
// (2 for 16-bit outputs, 4 for fp32); pshufb looks a plane up for 16 nibbles at once. One
// 16-byte load gives 32 outputs for ~13 instructions (bf16), against two scalar stores
// per byte, which bound the scalar loop at ~2 cycles a byte.

// Byte planes of 16 values: planes[k] holds byte k of each value.
template <typename OutT>
FTK_TARGET_AVX2 FTK_CPU_INLINE void block_planes(const float* code, float absmax, __m128i* planes, OutT* lut);

template <>
FTK_TARGET_AVX2 FTK_CPU_INLINE void block_planes<bf16_t>(const float* code, float absmax, __m128i* planes, bf16_t* lut) {
  const __m256 am = _mm256_set1_ps(absmax);
  __m256i r[2];
  for (int h = 0; h < 2; ++h) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(code + 8 * h), am);
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rne = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    r[h] = _mm256_blendv_epi8(rne, qnan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  }
  // packus interleaves 128-bit lanes; the permute restores element order 0..15.
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(r[0], r[1]), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lut), w);
  const __m256i split = _mm256_shuffle_epi8(
      w, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                          0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
  const __m256i planes2 = _mm256_permute4x64_epi64(split, 0xD8);
  planes[0] = _mm256_castsi256_si128(planes2);
  planes[1] = _mm256_extracti128_si256(planes2, 1);
}

template <>
FTK_TARGET_AVX2 FTK_CPU_INLINE void block_planes<f16_t>(const float* code, float absmax, __m128i* planes, f16_t* lut) {
  const __m256 am = _mm256_set1_ps(absmax);
  const __m128i h0 = _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(code), am), _MM_FROUND_TO_NEAREST_INT);
  const __m128i h1 = _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(code + 8), am), _MM_FROUND_TO_NEAREST_INT);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lut), h0);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lut + 8), h1);
  const __m128i even_odd = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m128i s0 = _mm_shuffle_epi8(h0, even_odd), s1 = _mm_shuffle_epi8(h1, even_odd);
  planes[0] = _mm_unpacklo_epi64(s0, s1);
  planes[1] = _mm_unpackhi_epi64(s0, s1);
}

template <>
FTK_TARGET_AVX2 FTK_CPU_INLINE void block_planes<float>(const float* code, float absmax, __m128i* planes, float* lut) {
  const __m256 am = _mm256_set1_ps(absmax);
  const __m256 v0 = _mm256_mul_ps(_mm256_loadu_ps(code), am), v1 = _mm256_mul_ps(_mm256_loadu_ps(code + 8), am);
  _mm256_storeu_ps(lut, v0);
  _mm256_storeu_ps(lut + 8, v1);
  // In each lane: 4 floats -> [byte0 x4, byte1 x4, byte2 x4, byte3 x4]; then gather dwords.
  const __m256i by_byte = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                           0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i a = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(_mm256_castps_si256(v0), by_byte), order);
  const __m256i b = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(_mm256_castps_si256(v1), by_byte), order);
  const __m256i lo = _mm256_unpacklo_epi64(a, b), hi = _mm256_unpackhi_epi64(a, b);
  planes[0] = _mm256_castsi256_si128(lo);
  planes[1] = _mm256_castsi256_si128(hi);
  planes[2] = _mm256_extracti128_si256(lo, 1);
  planes[3] = _mm256_extracti128_si256(hi, 1);
}

// 16 indices -> 16 outputs at dst.
template <typename OutT>
FTK_TARGET_AVX2 FTK_CPU_INLINE void lookup16(const __m128i* planes, __m128i idx, OutT* dst) {
  __m128i* d = reinterpret_cast<__m128i*>(dst);
  if constexpr (sizeof(OutT) == 2) {
    const __m128i lo = _mm_shuffle_epi8(planes[0], idx), hi = _mm_shuffle_epi8(planes[1], idx);
    _mm_storeu_si128(d, _mm_unpacklo_epi8(lo, hi));
    _mm_storeu_si128(d + 1, _mm_unpackhi_epi8(lo, hi));
  } else {
    const __m128i b0 = _mm_shuffle_epi8(planes[0], idx), b1 = _mm_shuffle_epi8(planes[1], idx);
    const __m128i b2 = _mm_shuffle_epi8(planes[2], idx), b3 = _mm_shuffle_epi8(planes[3], idx);
    const __m128i p01l = _mm_unpacklo_epi8(b0, b1), p23l = _mm_unpacklo_epi8(b2, b3);
    const __m128i p01h = _mm_unpackhi_epi8(b0, b1), p23h = _mm_unpackhi_epi8(b2, b3);
    _mm_storeu_si128(d, _mm_unpacklo_epi16(p01l, p23l));
    _mm_storeu_si128(d + 1, _mm_unpackhi_epi16(p01l, p23l));
    _mm_storeu_si128(d + 2, _mm_unpacklo_epi16(p01h, p23h));
    _mm_storeu_si128(d + 3, _mm_unpackhi_epi16(p01h, p23h));
  }
}

template <typename OutT, QuantType Q>
FTK_TARGET_AVX2 void dequantize_4bit_blocks_simd(const DequantJob& job, int64_t b0, int64_t b1) {
  const float* code = code_4bit(Q);
  const __m128i nibble = _mm_set1_epi8(0x0F);
  for (int64_t b = b0; b < b1; ++b) {
    const float absmax = block_absmax(job.w, b);
    const DequantBlock<OutT> blk = dequant_block<OutT>(job, b);
    __m128i planes[4];
    alignas(32) OutT lut[16];
    block_planes<OutT>(code, absmax, planes, lut);
    int64_t j = 0;  // bytes done
    for (; j + 16 <= blk.len / 2; j += 16) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.src + j));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), nibble), lo = _mm_and_si128(v, nibble);
      lookup16<OutT>(planes, _mm_unpacklo_epi8(hi, lo), blk.dst + 2 * j);  // even element first
      lookup16<OutT>(planes, _mm_unpackhi_epi8(hi, lo), blk.dst + 2 * j + 16);
    }
    dequantize_from_lut(lut, blk, j);  // the tail of a partial last block
  }
}

// ---- AVX-512 dequantize: vpermw / vpermps table lookups -------------------------------------
// With AVX-512BW the 16 outputs of a block, in the output dtype, fit one register and one
// permute looks up 32 (16-bit) or 16 (fp32) of them: per 16 packed bytes, ~9 instructions
// for 32 outputs and ~20 for the block's table, about half the AVX2 path's work at
// blocksize 64 (4096x4096 bf16 into a warm buffer: 0.91 ms against 1.37 ms). Streaming
// stores were tried for large outputs and dropped: no faster into an existing buffer
// (1.56 ms against 1.53 ms from DRAM) and slower into a fresh one (8.3 ms against 7.4 ms).

// The block's 16 outputs code[k] * absmax, rounded once to the output dtype, in the low
// lanes of a register (16-bit: 16 words; fp32: 16 floats).
template <typename OutT>
FTK_TARGET_AVX512 FTK_CPU_INLINE __m512i block_table(const float* code, float absmax);

template <>
FTK_TARGET_AVX512 FTK_CPU_INLINE __m512i block_table<bf16_t>(const float* code, float absmax) {
  const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(absmax));
  const __m512i u = _mm512_castps_si512(v);
  // round to nearest even as cpu::float_to_bf16, a NaN to its quiet pattern
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_zextsi256_si512(_mm512_cvtepi32_epi16(r));
}

template <>
FTK_TARGET_AVX512 FTK_CPU_INLINE __m512i block_table<f16_t>(const float* code, float absmax) {
  const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(absmax));
  return _mm512_zextsi256_si512(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <>
FTK_TARGET_AVX512 FTK_CPU_INLINE __m512i block_table<float>(const float* code, float absmax) {
  return _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(absmax)));
}

// 16 packed bytes -> their 32 nibbles as bytes in element order (high nibble first).
FTK_TARGET_AVX512 FTK_CPU_INLINE __m256i nibbles32(const uint8_t* src) {
  const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  const __m256i lo = _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x0F)), 8);
  return _mm256_or_si256(_mm256_srli_epi16(w, 4), lo);
}

template <typename OutT, QuantType Q>
FTK_TARGET_AVX512 void dequantize_4bit_blocks_avx512(const DequantJob& job, int64_t b0, int64_t b1) {
  const float* code = code_4bit(Q);
  for (int64_t b = b0; b < b1; ++b) {
    const float absmax = block_absmax(job.w, b);
    const DequantBlock<OutT> blk = dequant_block<OutT>(job, b);
    const __m512i table = block_table<OutT>(code, absmax);
    OutT* dst = blk.dst;
    int64_t j = 0;  // bytes done; 16 bytes give 32 outputs
    for (; j + 16 <= blk.len / 2; j += 16) {
      const __m256i idx = nibbles32(blk.src + j);
      if constexpr (sizeof(OutT) == 2) {
        _mm512_storeu_si512(dst + 2 * j, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(idx), table));
      } else {
        const __m512 t = _mm512_castsi512_ps(table);
        _mm512_storeu_si512(dst + 2 * j, _mm512_castps_si512(
            _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(idx)), t)));
        _mm512_storeu_si512(dst + 2 * j + 16, _mm512_castps_si512(
            _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(idx, 1)), t)));
      }
    }
    if (j < (blk.len + 1) / 2) {  // the tail of a partial last block: the scalar table
      alignas(64) OutT lut[64 / sizeof(OutT)];
      _mm512_store_si512(lut, table);
      dequantize_from_lut(lut, blk, j);
    }
  }
}
#endif  // FTK_X86

// ---- 8-bit -------------------------------------------------------------------------------

#if FTK_X86
// The codes of the whole vectors of a block's x[0, len) scaled by s, by the vector code search
// (code_search.h, t.exact); returns how many elements that was.
FTK_TARGET_AVX512 int64_t codes_avx512(const cpu::SearchTables& t, const float* x, float s, int64_t len, uint8_t* out) {
  const __m512 sv = _mm512_set1_ps(s);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm512_cvtepi32_epi8(cpu::search16(t, _mm512_mul_ps(_mm512_load_ps(x + i), sv))));
  return i;
}

FTK_TARGET_AVX2 int64_t codes_avx2(const cpu::SearchTables& t, const float* x, float s, int64_t len, uint8_t* out) {
  const __m256 sv = _mm256_set1_ps(s);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256i c = cpu::search8(t, _mm256_mul_ps(_mm256_load_ps(x + i), sv));
    // 8 int32 (0..255) to 8 bytes: pack to 16 then 8 bits within each 128-bit lane
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packus_epi16(w, w));
  }
  return i;
}
#endif  // FTK_X86

// Blocks [b0, b1): absmax, then each element's code: the vector search of `level` (AVX2 or
// AVX-512) for whole vectors when t (the code's search tables, exact) is given, quantize_8bit
// for the rest.
template <typename T>
void quantize_blockwise_range(const QuantizeBlockwiseParams& p, const cpu::SearchTables* t, CpuIsa level, int64_t b0,
                              int64_t b1) {
  const T* A = static_cast<const T*>(p.A);
  alignas(64) float x[kMaxBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * p.blocksize;
    const int64_t len = p.n - start < p.blocksize ? p.n - start : p.blocksize;
    const float absmax = load_block<T>(A, start, len, x);
    p.absmax[b] = absmax;
    const float s = 1.0f / absmax;
    int64_t i = 0;
#if FTK_X86
    if (t) i = level == CpuIsa::AVX512 ? codes_avx512(*t, x, s, len, p.out + start) : codes_avx2(*t, x, s, len, p.out + start);
#else
    (void)t, (void)level;
#endif
    for (; i < len; ++i) p.out[start + i] = static_cast<uint8_t>(quantize_8bit(p.code, x[i] * s));
  }
}

template <typename OutT>
FTK_CPU_INLINE void dequantize_blockwise_range(const DequantizeBlockwiseParams& p, int64_t b0, int64_t b1) {
  OutT* out = static_cast<OutT*>(p.out);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * p.blocksize;
    const int64_t len = p.n - start < p.blocksize ? p.n - start : p.blocksize;
    const float absmax = p.absmax[b];
    for (int64_t i = 0; i < len; ++i) out[start + i] = from_f32<OutT>(p.code[p.A[start + i]] * absmax);
  }
}

// ---- dispatch: dtype x quant type x ISA --------------------------------------------------
// The loops above are compiled once per level (cpu::with_isa); dequantize_4bit has hand-written
// AVX2 and AVX-512 kernels besides.

template <typename OutT, QuantType Q>
void dequantize_4bit_blocks(const DequantJob& job, int64_t b0, int64_t b1) {
#if FTK_X86
  switch (cpu_isa_level()) {
    case CpuIsa::AVX512: dequantize_4bit_blocks_avx512<OutT, Q>(job, b0, b1); return;
    case CpuIsa::AVX2: dequantize_4bit_blocks_simd<OutT, Q>(job, b0, b1); return;
    case CpuIsa::Base: break;
  }
#endif
  dequantize_4bit_range<OutT, Q>(job, b0, b1);
}

}  // namespace

void quantize_4bit_cpu(const Quantize4bitParams& p, int num_threads) {
  check(p);
  const int64_t nblocks = ceil_div(p.n, p.blocksize);
  const int threads = cpu::threads_for(p.n, num_threads);
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::parallel_for(nblocks, threads, [&](int64_t b0, int64_t b1) {
      cpu::with_isa([&]() FTK_ISA_BODY {
        if (p.quant_type == QuantType::NF4) quantize_4bit_range<T, QuantType::NF4>(p, b0, b1);
        else quantize_4bit_range<T, QuantType::FP4>(p, b0, b1);
      });
    });
  });
}

void dequantize_4bit_cpu(const Dequantize4bitParams& p, int num_threads) {
  dequantize_4bit_range_cpu(p, 0, p.w.numel(), num_threads);
}

namespace {

// Blocks [first, last) of job whose range cuts at most the first and the last: those go element
// by element (dequantize_clipped), the whole blocks between to the kernels in parallel.
template <typename T>
void dequantize_job(const DequantJob& job, int threads) {
  const Weight4bit& w = job.w;
  int64_t first = job.begin / w.blocksize, last = ceil_div(job.end, w.blocksize);
  const float* code = code_4bit(w.quant_type);
  if (first < last && block_is_clipped(job, first)) dequantize_clipped<T>(job, first++, code);
  if (first < last && block_is_clipped(job, last - 1)) dequantize_clipped<T>(job, --last, code);
  cpu::parallel_for(last - first, threads, [&](int64_t b0, int64_t b1) {
    if (w.quant_type == QuantType::NF4) dequantize_4bit_blocks<T, QuantType::NF4>(job, first + b0, first + b1);
    else dequantize_4bit_blocks<T, QuantType::FP4>(job, first + b0, first + b1);
  });
}

}  // namespace

void dequantize_4bit_range_cpu(const Dequantize4bitParams& p, int64_t begin, int64_t end, int num_threads) {
  check(p);
  const Weight4bit& w = p.w;
  FTK_CHECK_ARG(0 <= begin && begin <= end && end <= w.numel(), "the element range must lie within [0, n]");
  if (begin == end) return;
  const int threads = cpu::threads_for(end - begin, num_threads);
  with_dtype(p.dtype, [&](auto tag) { dequantize_job<decltype(tag)>(DequantJob{w, p.out, w.numel(), begin, end}, threads); });
}

void dequantize_4bit_cols_cpu(const Dequantize4bitParams& p, int64_t col0, int64_t col1, int num_threads) {
  check(p);
  const Weight4bit& w = p.w;
  const int64_t rows = w.rows, cols = w.cols;
  FTK_CHECK_ARG(0 <= col0 && col0 <= col1 && col1 <= cols, "the column range must lie within [0, cols]");
  const int64_t width = col1 - col0;
  if (width == 0 || rows == 0) return;
  const int threads = cpu::threads_for(rows * width, num_threads);
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    // One row's segment a job, rows split across threads (a segment is a few blocks).
    cpu::parallel_for(rows, threads, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const DequantJob job{w, static_cast<T*>(p.out) + r * width, w.numel(), r * cols + col0, r * cols + col1};
        dequantize_job<T>(job, 1);
      }
    });
  });
}

void quantize_blockwise_cpu(const QuantizeBlockwiseParams& p, int num_threads) {
  check(p);
  const int64_t nblocks = ceil_div(p.n, p.blocksize);
  const int threads = cpu::threads_for(p.n * 8, num_threads);  // the search costs ~8 steps an element
  // The vector search from AVX2 up, for a code it is exact for (code_search.h).
  const CpuIsa level = cpu_isa_level();
  const bool vector = FTK_X86 && level != CpuIsa::Base;
  const cpu::SearchTables t = vector ? cpu::search_tables(p.code) : cpu::SearchTables{};
  const cpu::SearchTables* tables = vector && t.exact ? &t : nullptr;
  with_dtype(p.dtype, [&](auto tag) {
    cpu::parallel_for(nblocks, threads, [&](int64_t b0, int64_t b1) {
      quantize_blockwise_range<decltype(tag)>(p, tables, level, b0, b1);
    });
  });
}

void dequantize_blockwise_cpu(const DequantizeBlockwiseParams& p, int num_threads) {
  check(p);
  const int64_t nblocks = ceil_div(p.n, p.blocksize);
  const int threads = cpu::threads_for(p.n, num_threads);
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::parallel_for(nblocks, threads, [&](int64_t b0, int64_t b1) {
      cpu::with_isa([&]() FTK_ISA_BODY { dequantize_blockwise_range<T>(p, b0, b1); });
    });
  });
}

}  // namespace ftk
