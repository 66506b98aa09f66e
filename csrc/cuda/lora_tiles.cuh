// Device code shared by the fused LoRA kernels (lora_tc.cu, lora_simt.cu, lora_decode_fwd.cu,
// lora_decode_bwd.cu, lora_dropout.cu) and the arguments their launchers take from lora.cu.
//
// The 4-bit weight (quant.h): W is N x K row-major; element (n, k) is flat element e = n*K + k:
// the high nibble of packed[e/2] when e is even, the low one when odd; its block is
// e / blocksize (blocks run across rows when K is not a multiple of the blocksize, and a byte
// spans two rows when K is odd). value = code[idx] * absmax[block] in fp32; a double-quantized
// absmax is code8[q] * nested_absmax[block / nested_blocksize] + offset, product and sum rounded
// apart. w_elem reads any element on its own; WRaw<G> / w_prefetch / w_dequant read G elements
// (G/2 bytes) as one aligned word, valid only when K % G == 0 and packed is aligned to G/2 bytes
// (the launcher checks; lora.cu, "Alignment"): then e is a multiple of G and, as blocks (>= 32)
// start at multiples of 32, the G elements lie in one block.
//
// X rows: Raw8 / load_raw8 read 8 consecutive elements as raw bits, one (16-bit) or two (fp32)
// 16-byte words when the launcher saw X aligned and the row length a multiple of the vector
// width (MmArgs::xvec), element by element otherwise; out-of-range elements read as zero.
//
// Epilogue of the two large-M kernels (tile_epilogue): the rank-r term L·Rᵀ (Forward, R = B:
// N x r) or L·R (GradInput, R = A: r x K) in fp32 FMAs, r in chunks (16 tensor path, 32 fp32
// path) staged in shared memory as L [chunk][BM+4] and R [chunk][BN+4] (the same micro-tile
// loop as the fp32 main loop: TM x TN outputs a thread, 8 x 4 on the tensor path, whose C values
// are read back from the C tile, 4 x 4 on the fp32 path), then
//   Forward    out = (acc + bias) + s·lr
//   GradInput  out = acc + drop(s·lr),  drop with the (row m, column k) hash of the M x K output.
// Cost: r fp32 FMAs an output against R MACs on tensor cores, ~6% at r = 16, K = 4096.
// Every load is guarded: rows >= M, columns >= C and reduction indices >= R read nothing and
// contribute zeros; nothing past (N*K + 1) / 2 packed bytes or the absmax arrays is touched.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "ftk/cuda_util.cuh"
#include "ftk/lora.h"

namespace ftk {
namespace lora {

// ---- what the launchers pass (host and device) ---------------------------------------------

// The 4-bit weight as the kernels take it (by value, in the parameter space).
struct WeightArgs {
  const uint8_t* packed;
  int64_t N, K;          // rows, cols
  int bs_shift;          // log2(blocksize)
  bool nested;           // double-quantized absmax (and W not empty)
  const float* absmax;   // plain: one fp32 per block
  const uint8_t* absmax_q;
  const float* nested_absmax;
  const float* nested_code;
  const float* offset;
  int nested_shift;      // log2(nested_blocksize)
  int quant_type;        // QuantType
};

// One matmul: out (M x C) = X (M x R) · op(deq(W)) + epilogue (lora.cu, top).
struct MmArgs {
  const void* X;     // M x R, dtype T
  int64_t M, C, R;   // out is M x C; R is the reduction length
  WeightArgs w;
  const void* bias;  // Forward only, may be null: C elements
  DType bias_dtype;
  const float* L;    // M x r
  const void* Rf;    // Forward: C x r (B); GradInput: r x C (A)
  DType R_dtype;
  int64_t r;
  float scaling;
  bool drop;         // GradInput only
  uint32_t drop_key, threshold;
  float drop_scale;
  void* out;         // M x C, dtype T
  bool xvec;         // X rows allow 16-byte loads
};

// ---- the family launchers (one per kernel file; lora.cu picks one) --------------------------
// Each enqueues its kernel on `stream` and checks the launch; `vecw` says whether W may be read
// as G-element words (G = 8 tiled, 16 Forward decode, 4 GradInput decode).

template <typename T, LoraMatmulMode Mode>  // T = __half or __nv_bfloat16
void launch_tc(const MmArgs& a, bool vecw, cudaStream_t stream);       // lora_tc.cu
template <LoraMatmulMode Mode>
void launch_simt(const MmArgs& a, bool vecw, cudaStream_t stream);     // lora_simt.cu
template <typename T>  // a.M <= 16
void launch_decode_fwd(const MmArgs& a, bool vecw, cudaStream_t stream);  // lora_decode_fwd.cu
template <typename T>  // a.M <= 8
void launch_decode_bwd(const MmArgs& a, bool vecw, cudaStream_t stream);  // lora_decode_bwd.cu
void launch_dropout(const LoraDropoutParams& p, cudaStream_t stream);      // lora_dropout.cu

// ---- host helpers --------------------------------------------------------------------------

inline int grid_for(int64_t work) { return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(work, INT_MAX))); }

inline bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Calls fn(std::integral_constant<int, MT>) for the smallest MT in {1, 2, 4, 8, 16} >= m.
template <int MaxMT, typename Fn>
void with_mt(int64_t m, Fn&& fn) {
  if (m <= 1) fn(std::integral_constant<int, 1>{});
  else if (m <= 2) fn(std::integral_constant<int, 2>{});
  else if (m <= 4) fn(std::integral_constant<int, 4>{});
  else if constexpr (MaxMT >= 8) {
    if (m <= 8) fn(std::integral_constant<int, 8>{});
    else if constexpr (MaxMT >= 16) fn(std::integral_constant<int, 16>{});
  }
}

// ---- device code (each kernel file has its own copy) ---------------------------------------
namespace {

constexpr int kWarp = 32;
constexpr uint32_t kFullMask = 0xFFFFFFFFu;

__constant__ float kNF4Code[16] = FTK_NF4_CODE;
__constant__ float kFP4Code[16] = FTK_FP4_CODE;

// ---- storage types -------------------------------------------------------------------------
// Elem<T>: scalars of T to and from fp32 (exact widening; narrowing once, round to nearest
// even, as torch's .to(dtype)), 8 fp32 to one 16-byte vector of a 16-bit T.

template <typename T> struct Elem;

template <> struct Elem<float> {
  static __device__ __forceinline__ float load1(const float* p) { return __ldg(p); }
  static __device__ __forceinline__ uint32_t bits1(const float* p) { return __float_as_uint(__ldg(p)); }
  static __device__ __forceinline__ float from_bits(uint32_t b) { return __uint_as_float(b); }
  static __device__ __forceinline__ void store1(float* p, float x) { *p = x; }
  static __device__ __forceinline__ void store4(float* p, const float* x) {
    *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
  }
};

template <> struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t bits1(const __nv_bfloat16* p) {
    return __ldg(reinterpret_cast<const unsigned short*>(p));
  }
  static __device__ __forceinline__ float from_bits(uint32_t b) { return __uint_as_float(b << 16); }
  static __device__ __forceinline__ float load1(const __nv_bfloat16* p) { return from_bits(bits1(p)); }
  static __device__ __forceinline__ uint32_t pack2(float a, float b) { return bits_of(__floats2bfloat162_rn(a, b)); }
  static __device__ __forceinline__ void store1(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
  static __device__ __forceinline__ void store4(__nv_bfloat16* p, const float* x) {
    *reinterpret_cast<uint2*>(p) = make_uint2(pack2(x[0], x[1]), pack2(x[2], x[3]));
  }
};

template <> struct Elem<__half> {
  static __device__ __forceinline__ uint32_t bits1(const __half* p) {
    return __ldg(reinterpret_cast<const unsigned short*>(p));
  }
  static __device__ __forceinline__ float from_bits(uint32_t b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  }
  static __device__ __forceinline__ float load1(const __half* p) { return from_bits(bits1(p)); }
  static __device__ __forceinline__ uint32_t pack2(float a, float b) { return bits_of(__floats2half2_rn(a, b)); }
  static __device__ __forceinline__ void store1(__half* p, float x) { *p = __float2half_rn(x); }
  static __device__ __forceinline__ void store4(__half* p, const float* x) {
    *reinterpret_cast<uint2*>(p) = make_uint2(pack2(x[0], x[1]), pack2(x[2], x[3]));
  }
};

// 8 fp32 -> one 16-byte vector of a 16-bit T (element j in the low half of word j/2 when j is
// even: the lower address is the low half).
template <typename T>
__device__ __forceinline__ uint4 pack8(const float* v) {
  return make_uint4(Elem<T>::pack2(v[0], v[1]), Elem<T>::pack2(v[2], v[3]), Elem<T>::pack2(v[4], v[5]),
                    Elem<T>::pack2(v[6], v[7]));
}

// One value of a runtime dtype (bias and R, read in the epilogues only).
__device__ __forceinline__ float load_any(const void* p, int64_t i, DType d) {
  switch (d) {
    case DType::Float16: return Elem<__half>::load1(static_cast<const __half*>(p) + i);
    case DType::BFloat16: return Elem<__nv_bfloat16>::load1(static_cast<const __nv_bfloat16*>(p) + i);
    default: return __ldg(static_cast<const float*>(p) + i);
  }
}

template <typename T>
__device__ __forceinline__ bool aligned_to(const T* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// Eight consecutive elements of a row of X as raw bits, in one (16-bit) or two (fp32) 16-byte
// words: element j of row `row` at index k + j, zero where k + j >= kmax. `vec` (checked by the
// launcher: X 16-byte aligned and the row length a multiple of 16 / sizeof(T)) and k % 8 == 0
// make each 16-byte piece aligned and wholly inside or wholly past the row.
template <typename T> struct Raw8 {
  static constexpr int kWords = sizeof(T) == 4 ? 2 : 1;
  uint4 v[kWords];
};

template <typename T>
__device__ __forceinline__ void load_raw8(Raw8<T>& r, const T* row, int64_t k, int64_t kmax, bool vec) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));  // elements in a 16-byte piece
#pragma unroll
  for (int s = 0; s < Raw8<T>::kWords; ++s) {
    const int64_t ks = k + s * V;
    if (vec && ks + V <= kmax) {
      r.v[s] = __ldg(reinterpret_cast<const uint4*>(row + ks));
    } else {
      uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (ks + j < kmax) {
          const uint32_t b = Elem<T>::bits1(row + ks + j);
          if constexpr (sizeof(T) == 4) w[j] = b;
          else w[j >> 1] |= b << (16 * (j & 1));
        }
      }
      r.v[s] = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

template <typename T>
__device__ __forceinline__ void zero_raw8(Raw8<T>& r) {
#pragma unroll
  for (int s = 0; s < Raw8<T>::kWords; ++s) r.v[s] = make_uint4(0u, 0u, 0u, 0u);
}

template <typename T>
__device__ __forceinline__ void raw8_to_float(const Raw8<T>& r, float* f) {
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      f[4 * s + 0] = __uint_as_float(r.v[s].x); f[4 * s + 1] = __uint_as_float(r.v[s].y);
      f[4 * s + 2] = __uint_as_float(r.v[s].z); f[4 * s + 3] = __uint_as_float(r.v[s].w);
    }
  } else {
    const uint32_t w[4] = {r.v[0].x, r.v[0].y, r.v[0].z, r.v[0].w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = Elem<T>::from_bits(w[i] & 0xFFFFu);
      f[2 * i + 1] = Elem<T>::from_bits(w[i] >> 16);
    }
  }
}

// ---- the 4-bit weight ----------------------------------------------------------------------

// The code tables in shared memory: 16 words (16 banks: lanes never conflict) and, when
// double-quantized, the 256-entry 8-bit code. Callers sync before use.
__device__ __forceinline__ void init_tables(const WeightArgs& w, float* s_code, float* s_code8) {
  const int t = threadIdx.x;
  if (t < 16) s_code[t] = w.quant_type == static_cast<int>(QuantType::NF4) ? kNF4Code[t] : kFP4Code[t];
  if (w.nested)
    for (int i = t; i < 256; i += blockDim.x) s_code8[i] = __ldg(w.nested_code + i);
}

struct WTab {
  const float* code;
  const float* code8;
  float offset;
};

__device__ __forceinline__ WTab make_tab(const WeightArgs& w, const float* s_code, const float* s_code8) {
  return WTab{s_code, s_code8, w.nested ? __ldg(w.offset) : 0.0f};
}

// A block's absmax as loaded (bits: the fp32 bits, or the 8-bit code when nested; nab: the
// nested absmax), kept raw so prefetched loads stay in flight until the value is needed.
struct AbsRaw {
  uint32_t bits;
  float nab;
};

__device__ __forceinline__ AbsRaw absmax_raw(const WeightArgs& w, int64_t b) {
  if (w.nested) return AbsRaw{__ldg(w.absmax_q + b), __ldg(w.nested_absmax + (b >> w.nested_shift))};
  return AbsRaw{__float_as_uint(__ldg(w.absmax + b)), 0.0f};
}

__device__ __forceinline__ float absmax_value(const WeightArgs& w, const AbsRaw& a, const WTab& tab) {
  // NOTE: two roundings, the product then the sum (quant.h); an FMA would change last bits.
  return w.nested ? __fadd_rn(__fmul_rn(tab.code8[a.bits], a.nab), tab.offset) : __uint_as_float(a.bits);
}

// Element (n, k) of W in fp32, any shape: its own nibble and its own block's absmax.
__device__ __forceinline__ float w_elem(const WeightArgs& w, int64_t n, int64_t k, const WTab& tab) {
  const int64_t e = n * w.K + k;
  const uint32_t byte = __ldg(w.packed + (e >> 1));
  const uint32_t q = (e & 1) ? (byte & 0xFu) : (byte >> 4);
  return __fmul_rn(tab.code[q], absmax_value(w, absmax_raw(w, e >> w.bs_shift), tab));
}

// G elements (n, k .. k+G-1), each guarded (zero outside W).
template <int G>
__device__ __forceinline__ void w_direct(const WeightArgs& w, int64_t n, int64_t k, const WTab& tab, float* v) {
#pragma unroll
  for (int j = 0; j < G; ++j) v[j] = (n < w.N && k + j < w.K) ? w_elem(w, n, k + j, tab) : 0.0f;
}

template <int Bytes> struct UInt;
template <> struct UInt<2> { using type = unsigned short; };
template <> struct UInt<4> { using type = unsigned int; };
template <> struct UInt<8> { using type = unsigned long long; };

// Vector form, valid when K % G == 0 and packed is aligned to G/2 bytes (the launcher checks):
// G elements from k (a multiple of G) are G/2 whole bytes at an aligned address, inside W or
// wholly outside it, and inside one quantization block (blocks are multiples of 32 >= G).
template <int G> struct WRaw {
  typename UInt<G / 2>::type word;
  AbsRaw am;
  bool ok;
};

template <int G>
__device__ __forceinline__ void w_prefetch(WRaw<G>& r, const WeightArgs& w, int64_t n, int64_t k) {
  r.ok = n < w.N && k < w.K;
  if (r.ok) {
    const int64_t e = n * w.K + k;
    r.word = __ldg(reinterpret_cast<const typename UInt<G / 2>::type*>(w.packed + (e >> 1)));
    r.am = absmax_raw(w, e >> w.bs_shift);
  } else {
    r.word = 0;
    r.am = AbsRaw{0u, 0.0f};
  }
}

template <int G>
__device__ __forceinline__ void w_dequant(const WRaw<G>& r, const WeightArgs& w, const WTab& tab, float* v) {
  const float am = r.ok ? absmax_value(w, r.am, tab) : 0.0f;  // outside W: finite zeros
#pragma unroll
  for (int i = 0; i < G / 2; ++i) {
    const uint32_t byte = static_cast<uint32_t>(r.word >> (8 * i)) & 0xFFu;  // byte i: elements 2i, 2i+1
    v[2 * i] = __fmul_rn(tab.code[byte >> 4], am);                           // even element: high nibble
    v[2 * i + 1] = __fmul_rn(tab.code[byte & 0xFu], am);
  }
}

// ---- the epilogue --------------------------------------------------------------------------

__device__ __forceinline__ int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <int TM, int TN>
__device__ __forceinline__ void outer_fma(const float* a, const float* b, float (&c)[TM][TN]) {
  static_assert(TM % 4 == 0 && TN % 4 == 0, "micro-tile of whole float4s");
  float av[TM], bv[TN];
#pragma unroll
  for (int i = 0; i < TM / 4; ++i) {
    const float4 t = reinterpret_cast<const float4*>(a)[i];
    av[4 * i] = t.x; av[4 * i + 1] = t.y; av[4 * i + 2] = t.z; av[4 * i + 3] = t.w;
  }
#pragma unroll
  for (int i = 0; i < TN / 4; ++i) {
    const float4 t = reinterpret_cast<const float4*>(b)[i];
    bv[4 * i] = t.x; bv[4 * i + 1] = t.y; bv[4 * i + 2] = t.z; bv[4 * i + 3] = t.w;
  }
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) c[i][j] = fmaf(av[i], bv[j], c[i][j]);
}

// out = acc + bias + s·lr (Forward) or acc + drop(s·lr) (GradInput) for one output element.
template <LoraMatmulMode Mode>
__device__ __forceinline__ float combine(const MmArgs& a, float acc, float lr, uint32_t row_key, int64_t col) {
  if constexpr (Mode == LoraMatmulMode::Forward) {
    float y = acc;
    if (a.bias != nullptr) y = __fadd_rn(y, load_any(a.bias, col, a.bias_dtype));
    return __fadd_rn(y, __fmul_rn(a.scaling, lr));
  } else {
    float d = __fmul_rn(a.scaling, lr);
    if (a.drop) d = dropout_keep(row_key, col, a.threshold) ? __fmul_rn(d, a.drop_scale) : 0.0f;
    return __fadd_rn(acc, d);
  }
}

// The tile epilogue of both large-M kernels. Thread (ty, tx) = (tid / (BN/TN), tid % (BN/TN))
// owns rows m0 + ty*TM + i and columns c0 + tx*TN + j; acc_row(i, v) gives its TN main-product
// values of row i (from registers, or from the C tile in shared memory: read only at the end,
// so they take no registers during the rank-r loop). Ls / Rs: [RC][BM+4] and [RC][BN+4] floats
// of shared memory nobody else uses now. Called with the block converged; its last barrier
// follows its last Ls/Rs read (acc_row's reads come after it: the caller syncs before reuse).
template <typename T, LoraMatmulMode Mode, int BM, int BN, int TM, int TN, int RC, typename AccRow>
__device__ __forceinline__ void tile_epilogue(const MmArgs& a, AccRow&& acc_row, int64_t m0, int64_t c0,
                                              float* Ls, float* Rs) {
  constexpr int kThreads = (BM / TM) * (BN / TN);
  constexpr int LDL = BM + 4, LDR = BN + 4;
  static_assert(TN == 4, "stores are groups of 4");
  const int tid = threadIdx.x;
  const int tx = tid % (BN / TN), ty = tid / (BN / TN);

  float lr[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) lr[i][j] = 0.0f;

  for (int64_t j0 = 0; j0 < a.r; j0 += RC) {
    // L chunk, transposed: Ls[j][mm] = L[m0 + mm, j0 + j] (global reads run along j).
    for (int idx = tid; idx < BM * RC; idx += kThreads) {
      const int j = idx % RC, mm = idx / RC;
      const int64_t m = m0 + mm, jj = j0 + j;
      Ls[j * LDL + mm] = (m < a.M && jj < a.r) ? __ldg(a.L + m * a.r + jj) : 0.0f;
    }
    // R chunk: Rs[j][cc] = B[c0 + cc, j0 + j] (Forward) or A[j0 + j, c0 + cc] (GradInput).
    for (int idx = tid; idx < BN * RC; idx += kThreads) {
      int j, cc;
      if constexpr (Mode == LoraMatmulMode::Forward) { j = idx % RC; cc = idx / RC; }
      else { cc = idx % BN; j = idx / BN; }
      const int64_t c = c0 + cc, jj = j0 + j;
      float v = 0.0f;
      if (c < a.C && jj < a.r)
        v = load_any(a.Rf, Mode == LoraMatmulMode::Forward ? c * a.r + jj : jj * a.C + c, a.R_dtype);
      Rs[j * LDR + cc] = v;
    }
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < RC; ++j) outer_fma<TM, TN>(Ls + j * LDL + ty * TM, Rs + j * LDR + tx * TN, lr);
    __syncthreads();
  }

  T* out = static_cast<T*>(a.out);
  const int64_t cb = c0 + tx * TN;
  if (cb >= a.C) return;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = m0 + ty * TM + i;
    if (m < a.M) {
      const uint32_t rk = Mode == LoraMatmulMode::GradInput && a.drop ? dropout_row_key(a.drop_key, m) : 0u;
      float v[TN];
      acc_row(i, v);
#pragma unroll
      for (int j = 0; j < TN; ++j) v[j] = cb + j < a.C ? combine<Mode>(a, v[j], lr[i][j], rk, cb + j) : 0.0f;
      T* dst = out + m * a.C + cb;
      if (cb + TN <= a.C && aligned_to(dst, TN * sizeof(T))) {
        Elem<T>::store4(dst, v);
      } else {
#pragma unroll
        for (int j = 0; j < TN; ++j)
          if (cb + j < a.C) Elem<T>::store1(dst + j, v[j]);
      }
    }
  }
}

}  // namespace
}  // namespace lora
}  // namespace ftk
