// quant.h's quantize_8bit (bitsandbytes' 8-bit code search) on 16 lanes (AVX-512) and 8 lanes
// (AVX2), for the 8-bit optimizer and quantize_blockwise. Internal to csrc/cpu; no torch.
//
// Algorithm. For a strictly increasing code (bitsandbytes' dynamic maps), quantize_8bit gives
// the nearest entry, a tie at a midpoint going to the even index of the two (its 7-step search
// always ends on an even pivot, and a tie keeps the pivot). With the midpoints
// M[j] = (code[j] + code[j + 1]) * 0.5, rounded as quantize_8bit rounds them, the result is
// therefore the number of thresholds x passes, where x passes M[j] if x > M[j] for even j and
// x >= M[j] for odd j: x > T[j] with T[j] = M[j] for even j and the float below M[j] for odd j.
// That count is a binary search over the 255 sorted thresholds T: 8 decisions x > T[node], the
// decision bits (first highest) forming the result, and after L decisions the node is one of 2^L,
// so T[node] is a lookup in a 2^L-entry table (SearchTables::level) rather than a search. A NaN
// fails every comparison and gives 0, as quantize_8bit does.
// A code for which the premises fail (not strictly increasing, T not strictly increasing or
// with a zero, subnormal or non-finite entry: SearchTables::exact false) takes the scalar
// quantize_8bit. tests/test_optim.py and tests/test_nf4.py check every level bit for bit against
// the scalar search, every midpoint and its neighbouring floats included.
// Cost of a search: 8 compares and 8 shift-adds, and the lookups: AVX-512 one permute up to
// 16 entries, 1-4 two-register permutes above; AVX2 see lookup8.
#pragma once

#include <cmath>
#include <cstdint>

#include "ftk/cpu_isa.h"
#include "ftk/cpu_util.h"

#if FTK_X86
#include <immintrin.h>
#endif

namespace ftk {
namespace cpu {

struct SearchTables {
  alignas(64) float level[8][128];  // level[L][path]: T at the node after L decisions (path: L bits)
  bool exact;                       // the premises above hold for this code
};

inline SearchTables search_tables(const float* code) {
  SearchTables t{};
  t.exact = true;
  float T[255];
  for (int j = 0; j < 255; ++j) {
    const float m = (code[j + 1] + code[j]) * 0.5f;
    T[j] = (j & 1) ? std::nextafter(m, -INFINITY) : m;
    t.exact = t.exact && code[j] < code[j + 1] && std::fpclassify(T[j]) == FP_NORMAL && (j == 0 || T[j - 1] < T[j]);
  }
  // The node after L decisions with path p splits slots [p * 2^(8-L), (p + 1) * 2^(8-L)).
  for (int L = 0; L < 8; ++L)
    for (int p = 0; p < (1 << L); ++p) t.level[L][p] = T[(p << (8 - L)) + (1 << (7 - L)) - 1];
  return t;
}

#if FTK_X86

// ---- AVX-512: 16 lanes -----------------------------------------------------------------------

// table[path] for a table of 2^bits entries (bits <= 7): one permute up to 16 entries, a
// two-register permute up to 32, then one per 32-entry quarter, picked by path's bits 5 and 6.
FTK_TARGET_AVX512 FTK_CPU_INLINE __m512 lookup16(const float* table, int bits, __m512i path) {
  if (bits <= 4) return _mm512_permutexvar_ps(path, _mm512_load_ps(table));
  __m512 val = _mm512_permutex2var_ps(_mm512_load_ps(table), path, _mm512_load_ps(table + 16));
  if (bits == 5) return val;
  const __m512i quarter = _mm512_srli_epi32(path, 5);
  for (int q = 1; q < (1 << (bits - 5)); ++q) {
    const __mmask16 in_q = _mm512_cmpeq_epi32_mask(quarter, _mm512_set1_epi32(q));
    val = _mm512_mask_mov_ps(val, in_q, _mm512_permutex2var_ps(_mm512_load_ps(table + 32 * q), path,
                                                                 _mm512_load_ps(table + 32 * q + 16)));
  }
  return val;
}

// The codes of 16 scaled values (int32 lanes, 0..255); t.exact must hold.
FTK_TARGET_AVX512 FTK_CPU_INLINE __m512i search16(const SearchTables& t, __m512 x) {
  const __m512i one = _mm512_set1_epi32(1);
  __m512i path = _mm512_setzero_si512();
  __m512 threshold = _mm512_set1_ps(t.level[0][0]);
  for (int L = 0; L < 8; ++L) {
    const __mmask16 pass = _mm512_cmp_ps_mask(x, threshold, _CMP_GT_OQ);
    path = _mm512_slli_epi32(path, 1);
    path = _mm512_mask_add_epi32(path, pass, path, one);
    if (L < 7) threshold = lookup16(t.level[L + 1], L + 1, path);
  }
  return path;
}

// ---- AVX2: 8 lanes ---------------------------------------------------------------------------
// No 16-lane permute: a table of up to 8 entries is one vpermps, a wider one a tree of vpermps
// (one per 8 entries) and blends on the path bits above bit 2, up to kPermuteBits; wider still,
// a gather. Measured on a 2-core Zen 4 limited to AVX2, the 8-bit AdamW step on one thread,
// 20M parameters: trees up to 32 entries (gathers for 64 and 128) 100 ms; up to 16, 156 ms;
// up to 64, 107 ms; up to 128 (no gather), 130-150 ms. A gather of 8 floats costs ~11 cycles
// there, against ~1 for a vpermps; the 35-instruction tree of 128 entries costs more still.
// With no search at all the step takes 34 ms: the two searches are two thirds of it. Loading
// each lane's 32-byte row of the last three levels' thresholds and transposing the 8 rows
// (instead of the two gathers) measured 96 ms against 92 ms, and was dropped.
constexpr int kPermuteBits = 5;

// table[path] for a table of 2^Bits entries, 3 < Bits: the two halves looked up, then the one
// path bit Bits-1 picks (in the sign bit, as blendv reads it). Depth-first, so only Bits - 2
// partial results are live at once (a flat list of 2^(Bits-3) permutes spilled registers).
template <int Bits>
FTK_TARGET_AVX2 FTK_CPU_INLINE __m256 lookup8_tree(const float* table, __m256i path) {
  if constexpr (Bits <= 3) {
    return _mm256_permutevar8x32_ps(_mm256_load_ps(table), path);
  } else {
    const __m256 lo = lookup8_tree<Bits - 1>(table, path);
    const __m256 hi = lookup8_tree<Bits - 1>(table + (1 << (Bits - 1)), path);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(path, 32 - Bits)));
  }
}

template <int Bits>
FTK_TARGET_AVX2 FTK_CPU_INLINE __m256 lookup8(const float* table, __m256i path) {
  if constexpr (Bits > kPermuteBits) return _mm256_i32gather_ps(table, path, 4);
  else return lookup8_tree<Bits>(table, path);
}

// The codes of U vectors of 8 scaled values, the U searches in lock-step: each level's lookup
// waits on the compare before it (~10 cycles a level), so independent searches side by side
// keep the vector units busy.
// One decision at level L (a threshold of table size 2^L): path gains its bit.
template <int L>
FTK_TARGET_AVX2 FTK_CPU_INLINE void decide8(const SearchTables& t, __m256 x, __m256i& path) {
  const __m256 threshold = L == 0 ? _mm256_set1_ps(t.level[0][0]) : lookup8<L>(t.level[L], path);
  const __m256i pass = _mm256_castps_si256(_mm256_cmp_ps(x, threshold, _CMP_GT_OQ));  // -1 where passed
  path = _mm256_sub_epi32(_mm256_slli_epi32(path, 1), pass);
}

// The codes of 8 scaled values (int32 lanes, 0..255); t.exact must hold.
FTK_TARGET_AVX2 FTK_CPU_INLINE __m256i search8(const SearchTables& t, __m256 x) {
  __m256i path = _mm256_setzero_si256();
  decide8<0>(t, x, path);
  decide8<1>(t, x, path);
  decide8<2>(t, x, path);
  decide8<3>(t, x, path);
  decide8<4>(t, x, path);
  decide8<5>(t, x, path);
  decide8<6>(t, x, path);
  decide8<7>(t, x, path);
  return path;
}

#endif  // FTK_X86

}  // namespace cpu
}  // namespace ftk
