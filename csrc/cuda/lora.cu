// CUDA kernels for the fused LoRA matmul over a 4-bit (NF4/FP4) weight, then their launchers.
//
// Math and contracts: csrc/include/ftk/lora.h (the two modes, the dropout hash), quant.h (the
// 4-bit format). W is N x K row-major; element (n, k) is flat element e = n*K + k: the high
// nibble of packed[e/2] when e is even, the low one when odd; its block is e / blocksize (blocks
// run across rows when K is not a multiple of the blocksize, and a byte spans two rows when K
// is odd). value = code[idx] * absmax[block] in fp32; a double-quantized absmax is
// code8[q] * nested_absmax[block / nested_blocksize] + offset, product and sum rounded apart.
// Both modes are one GEMM shape, out (M x C) = X (M x R) · B (R x C) + epilogue:
//   Forward    C = N, R = K, B(k, n) = W[n, k]  (tile of W read along its rows)
//   GradInput  C = K, R = N, B(n, k) = W[n, k]
// All accumulation is fp32 and out (X's dtype) is rounded once, at the end.
//
// lora_dropout: element-wise; a thread takes 4 elements (one 16-byte fp32 store; the loads are
// 16 or 8 bytes) when both pointers allow it, the row/column of the first from one int64
// division and the rest by stepping, so the per-row hash key is recomputed only at row ends.
//
// Large M, fp16/bf16 (tensor cores, nvcuda::wmma 16x16x16, fp32 accumulators): a CTA of 256
// threads computes a 128 (M) x 64 (C) tile, 32 of R per step; 8 warps as 4 x 2, each 32 x 32
// (2 x 2 fragments). Two shared-memory stages with register prefetch: the global loads of step
// k+1 (X: 2 x 16 bytes a thread; W: 4 packed bytes + one absmax a thread) are issued before
// the MMAs of step k and written to the other stage after them; the 4-bit -> X's dtype
// dequantization happens at that write (8 elements a thread a step, code table in shared
// memory: 16 words in 16 banks, never a conflict), so no dequantized W exists in global memory.
// NOTE: W is rounded to X's dtype before the MMA, exactly what torch does when it dequantizes
// to bf16/fp16 and multiplies (the baseline the tests hold us to); the fp32 and decode paths
// keep W in fp32.
//   Why 128 x 64 and not 64 x 128: dequantization costs ~4 instructions an element and every
//   W element is dequantized once per M tile (M / BM times in all), while an X element is a
//   plain 16-byte copy (~0.25 instructions). 128 x 64 dequantizes one 8-element group per
//   thread a step (~35 instructions) against 16 HMMA.16816 per warp; 64 x 128 would double it.
//   Shared memory (static): a stage is 128 x 40 (X) + 64 x 40 (Forward) or 32 x 72 (GradInput)
//   16-bit elements = 15,360 / 14,848 B, two stages 30,720 B; after the loop the fp32 C tile
//   (128 x 68 x 4 = 34,816 B) overlays them and the epilogue's L/R chunks (rank chunk 16:
//   16 x 132 + 16 x 68 floats = 12,800 B) follow it, so C stays in shared memory through the
//   rank-r loop (holding it in registers as well spilled at the 128-register cap of 2 CTAs/SM).
//   With the code tables (1,088 B) a CTA takes 48,704 B of the 49,152 B static limit (4 CTAs
//   an H100 SM by shared memory; registers allow 2). Rows of 40 / 72 elements (80 / 144 B):
//   the 8 16-byte rows an ldmatrix phase reads fall in 8 distinct 4-bank groups (no conflict),
//   and the lead dimension stays a multiple of 8 elements with 32-byte aligned fragment starts,
//   as wmma needs.
//
// Large M, fp32 (SIMT FMA, fp32 accuracy, no TF32): 64 x 64 tile, R step 32, 256 threads, each
// a 4 x 4 micro-tile; X and W tiles stored R-major ([32][68] floats, two stages, 34,816 B), so a
// step of the inner loop is 2 LDS.128 + 16 FFMA.
//
// Epilogue (both): the rank-r term L·Rᵀ (Forward, R = B: N x r) or L·R (GradInput, R = A: r x K)
// in fp32 FMAs, r in chunks (16 tensor path, 32 fp32 path) staged in shared memory as
// L [chunk][BM+4] and R [chunk][BN+4] (the same micro-tile loop as the fp32 main loop: TM x TN
// outputs a thread, 8 x 4 on the tensor path, whose C values are read back from the C tile), then
//   Forward    out = (acc + bias) + s·lr
//   GradInput  out = acc + drop(s·lr),  drop with the (row m, column k) hash of the M x K output.
// Cost: r fp32 FMAs an output against R MACs on tensor cores, ~6% at r = 16, K = 4096.
//
// Small M (decode), any dtype, W read exactly once, W values in fp32, X staged in fp32:
//   Forward: a CTA owns 16 rows of W; each warp NW of them (4 when M <= 4, else 2) and walks K
//     in chunks of 512: a lane loads 8 packed bytes (16 elements) of each of its rows, a warp
//     256 contiguous bytes a row, with the next chunk's W bytes and X values already in flight
//     (register prefetch). The X chunk (M x 512, fp32) lives in shared memory, swizzled so that
//     a lane's 16 elements are four conflict-free float4 reads; each X value is reused for NW
//     rows and each W value for all M rows (M x NW fp32 accumulators a lane). Warp shuffles
//     reduce over lanes; the rank-r dot products are split over lanes the same way.
//   GradInput: a CTA of 512 threads owns 32 columns of K (8 lanes x 4 columns, 2 packed bytes a
//     lane a row) and 64 row groups walk N, U rows each a step (8, or 4 at M = 8: registers),
//     prefetched a step ahead; X^T chunks in shared memory; shuffles and shared memory reduce
//     the 64 partial sums of each output.
//   Threshold (to be re-measured on a GPU; these are estimates for an H100 SXM: 3.35 TB/s,
//   ~990 TFLOP/s dense bf16, 132 SMs x 128 fp32 lanes x 1.755 GHz = 29.6 T lane-ops/s):
//     N = K = 4096 is 16.8 M weights, 8.4 MB packed: 2.5 us at full bandwidth.
//     Decode costs ~(4 + M) lane-ops a weight (dequantize, then M FMAs): 16.8 M x (4 + M) /
//     29.6 T = 2.3 us + 0.57 us x M, so 3 us at M = 1 (bandwidth-bound), 6.8 us at M = 8,
//     11.4 us at M = 16; its arithmetic intensity is 4·M FLOP a packed byte, and fp32 FMA
//     (67 TFLOP/s) caps it at ~16.7/M TB/s, i.e. below the 3.35 TB/s line from M = 5 on.
//     The tensor path at M <= 128 runs one M tile: ceil(4096 / 64) = 64 CTAs on 132 SMs, each
//     issuing ~180 cycles a step per scheduler (16 HMMA + ~90 instructions of loads and
//     dequantization per warp, 2 warps a scheduler) for 128 steps: ~13 us whatever M is (the
//     128-row tile is mostly padding; 1 KB of W a step per CTA keeps it far below bandwidth).
//     So decode wins up to M ~ 18 in Forward: the threshold is 16 (the decode range, and
//     M x NW = 32 accumulators a lane). GradInput decode has only ceil(K / 32) = 128 CTAs and
//     ~1 MB of W loads in flight (~1.5 TB/s by Little's law at ~0.7 us latency), and at M = 16
//     its 64 accumulators + 2 x U prefetched rows would not fit 128 registers at 512 threads:
//     the threshold is 8 (~7 us against ~13 us).
//
// Launch: a 1-D grid over tiles (grid-stride, int64 tile indices, so any M, N, K fit); every
// launch goes on the caller's stream, allocates nothing, never synchronises, and is checked.
// All element indices are int64.
//
// Alignment: tensors are contiguous and 16-byte aligned at their start only (_ops.dense). A row
// of X starts at m x R elements, aligned only when R is a multiple of the vector width, so X
// uses 16-byte loads only when the launcher saw the base aligned and R % (16 / sizeof) == 0
// (a vector then never crosses R: it is wholly inside the row or wholly past it); otherwise
// element loads. W uses a G-element vector (G/2 bytes: 4 on tensor/fp32 tiles, 8 in Forward
// decode, 2 in GradInput decode) only when K % G == 0 and packed is aligned to G/2 bytes: then
// e = n*K + k is a multiple of G, the G elements are G/2 whole bytes at an aligned address and,
// as blocks (>= 32) start at multiples of 32, lie in one block, so blocks that run across rows
// (K = 96, blocksize 64) need nothing special. Other shapes (K % G != 0, odd K) take the
// per-element path, which reads each nibble and its block's absmax on its own. Output stores
// are vectors only where the address is checked aligned and all lanes are in bounds.
// Every load is guarded: rows >= M, columns >= C and reduction indices >= R read nothing and
// contribute zeros; nothing past (N*K + 1) / 2 packed bytes or the absmax arrays is touched.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "ftk/cuda_util.cuh"
#include "ftk/lora.h"
#include "ftk/lora_cuda.h"

namespace ftk {
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

// ---- matmul arguments ----------------------------------------------------------------------

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

// ---- large M, fp16/bf16: tensor cores ------------------------------------------------------

constexpr int kTcThreads = 256;
constexpr int kTcBM = 128, kTcBN = 64, kTcBK = 32;
constexpr int kTcALd = kTcBK + 8;  // 40 elements, 80 bytes a row
constexpr int kTcCLd = kTcBN + 4;  // 68 floats
constexpr int kTcRc = 16;          // rank chunk: the C tile and the L/R chunks fit 48 KB together

template <LoraMatmulMode Mode> struct TcCfg {
  static constexpr bool kFwd = Mode == LoraMatmulMode::Forward;
  // The W tile as stored (W's own rows x cols): Forward 64 n x 32 k, GradInput 32 n x 64 k.
  static constexpr int kWR = kFwd ? kTcBN : kTcBK;
  static constexpr int kWC = kFwd ? kTcBK : kTcBN;
  static constexpr int kWLd = kWC + 8;  // 40 / 72 elements
  static constexpr int kGPR = kWC / 8;  // 8-element groups a row
  static constexpr int kAStage = kTcBM * kTcALd;  // elements
  static constexpr int kBStage = kWR * kWLd;
  static constexpr int kPipeBytes = 2 * (kAStage + kBStage) * 2;
  // After the loop: the C tile at 0 (over the stages), the L and R chunks after it.
  static constexpr int kCBytes = kTcBM * kTcCLd * 4;
  static constexpr int kLBytes = kTcRc * (kTcBM + 4) * 4;
  static constexpr int kRBytes = kTcRc * (kTcBN + 4) * 4;
  static constexpr int kEpiBytes = kCBytes + kLBytes + kRBytes;
  static constexpr int kSmemBytes = kPipeBytes > kEpiBytes ? kPipeBytes : kEpiBytes;
  static_assert(kWR * kGPR == kTcThreads, "one W group a thread a step");
  static_assert(kTcBM * kTcBK / 8 == 2 * kTcThreads, "two X vectors a thread a step");
  static_assert((kAStage * 2) % 128 == 0 && (kBStage * 2) % 32 == 0, "stage starts stay 32-byte aligned");
};

template <typename T, LoraMatmulMode Mode, bool kVecW>
__global__ void __launch_bounds__(kTcThreads, 2) lora_matmul_tc_kernel(const MmArgs a) {
  namespace wmma = nvcuda::wmma;
  using Cfg = TcCfg<Mode>;
  using BLayout = typename std::conditional<Cfg::kFwd, wmma::col_major, wmma::row_major>::type;

  __shared__ __align__(128) unsigned char smem[Cfg::kSmemBytes];
  __shared__ float s_code[16];
  __shared__ float s_code8[256];
  init_tables(a.w, s_code, s_code8);
  __syncthreads();
  const WTab tab = make_tab(a.w, s_code, s_code8);

  T* const As = reinterpret_cast<T*>(smem);                                            // [2][128][40]
  T* const Bs = reinterpret_cast<T*>(smem + 2 * Cfg::kAStage * 2);                     // [2][kWR][kWLd]
  float* const Cs = reinterpret_cast<float*>(smem);                                    // [128][68]
  float* const Ls = reinterpret_cast<float*>(smem + Cfg::kCBytes);                     // [16][132]
  float* const Rs = reinterpret_cast<float*>(smem + Cfg::kCBytes + Cfg::kLBytes);      // [16][68]

  const int tid = threadIdx.x, warp = tid / kWarp;
  const int wm = warp >> 1, wn = warp & 1;  // warp tile: rows wm*32, cols wn*32
  const T* X = static_cast<const T*>(a.X);
  const int64_t mtiles = cdiv(a.M, kTcBM), ctiles = cdiv(a.C, kTcBN), nk = cdiv(a.R, kTcBK);
  // This thread's pieces of a step: X vectors (rows xr0 and xr0 + 64, column 8*xkc) and
  // one W group (stored row wrow, columns 8*wcg .. +7).
  const int xrow = tid >> 2, xkc = tid & 3;
  const int wrow = tid / Cfg::kGPR, wcg = tid % Cfg::kGPR;

  for (int64_t tile = blockIdx.x; tile < mtiles * ctiles; tile += gridDim.x) {
    const int64_t m0 = (tile % mtiles) * kTcBM, c0 = (tile / mtiles) * kTcBN;
    __syncthreads();  // the previous tile's epilogue has read its C values

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    Raw8<T> xr[2];
    WRaw<8> wr;
    // W coordinates of this thread's group at step kt.
    auto w_n = [&](int64_t kt) -> int64_t { return Cfg::kFwd ? c0 + wrow : kt * kTcBK + wrow; };
    auto w_k = [&](int64_t kt) -> int64_t { return Cfg::kFwd ? kt * kTcBK + wcg * 8 : c0 + wcg * 8; };

    auto load_step = [&](int64_t kt) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int64_t m = m0 + xrow + 64 * i;
        if (m < a.M) load_raw8(xr[i], X + m * a.R, kt * kTcBK + xkc * 8, a.R, a.xvec);
        else zero_raw8(xr[i]);
      }
      if constexpr (kVecW) w_prefetch<8>(wr, a.w, w_n(kt), w_k(kt));
    };
    auto store_step = [&](int s, int64_t kt) {
      T* A_ = As + s * Cfg::kAStage;
#pragma unroll
      for (int i = 0; i < 2; ++i)
        *reinterpret_cast<uint4*>(A_ + (xrow + 64 * i) * kTcALd + xkc * 8) = xr[i].v[0];
      float v[8];
      if constexpr (kVecW) w_dequant<8>(wr, a.w, tab, v);
      else w_direct<8>(a.w, w_n(kt), w_k(kt), tab, v);
      *reinterpret_cast<uint4*>(Bs + s * Cfg::kBStage + wrow * Cfg::kWLd + wcg * 8) = pack8<T>(v);
    };

    if (nk > 0) {
      load_step(0);
      store_step(0, 0);
    }
    __syncthreads();
    for (int64_t kt = 0; kt < nk; ++kt) {
      const int s = static_cast<int>(kt & 1);
      if (kt + 1 < nk) load_step(kt + 1);  // in flight during the MMAs
      const T* A_ = As + s * Cfg::kAStage;
      const T* B_ = Bs + s * Cfg::kBStage;
#pragma unroll
      for (int kk = 0; kk < kTcBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], A_ + (wm * 32 + i * 16) * kTcALd + kk, kTcALd);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          if constexpr (Cfg::kFwd)  // B(k, n) = Bs[n][k]: column-major
            wmma::load_matrix_sync(fb[j], B_ + (wn * 32 + j * 16) * Cfg::kWLd + kk, Cfg::kWLd);
          else  // B(n, k) = Bs[n][k]: row-major
            wmma::load_matrix_sync(fb[j], B_ + kk * Cfg::kWLd + wn * 32 + j * 16, Cfg::kWLd);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      // Stage s^1 was last read in step kt - 1, before the barrier that ended it.
      if (kt + 1 < nk) store_step(s ^ 1, kt + 1);
      __syncthreads();
    }

    // The C tile overwrites the pipeline stages: every warp passed the loop's last barrier.
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * kTcCLd + wn * 32 + j * 16, acc[i][j], kTcCLd,
                                wmma::mem_row_major);
    __syncthreads();
    constexpr int TM = 8, TN = 4;
    const float* crow = Cs + (tid / (kTcBN / TN)) * TM * kTcCLd + (tid % (kTcBN / TN)) * TN;
    tile_epilogue<T, Mode, kTcBM, kTcBN, TM, TN, kTcRc>(
        a,
        [&](int i, float* v) {
          const float4 t = *reinterpret_cast<const float4*>(crow + i * kTcCLd);
          v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
        },
        m0, c0, Ls, Rs);
  }
}

// ---- large M, fp32: SIMT FMA ---------------------------------------------------------------

constexpr int kSThreads = 256;
constexpr int kSBM = 64, kSBN = 64, kSBK = 32;
constexpr int kSLd = 68;  // floats; [32][68] stages, reused as the epilogue's L and R chunks
constexpr int kSRc = kSBK;  // rank chunk: a stage of As / Bs holds an L / R chunk
static_assert(kSLd == kSBM + 4 && kSLd == kSBN + 4, "the stages double as L/R chunks");

template <LoraMatmulMode Mode, bool kVecW>
__global__ void __launch_bounds__(kSThreads, 2) lora_matmul_simt_kernel(const MmArgs a) {
  constexpr bool kFwd = Mode == LoraMatmulMode::Forward;
  __shared__ __align__(16) float As[2][kSBK][kSLd];  // As[s][k][m]
  __shared__ __align__(16) float Bs[2][kSBK][kSLd];  // Bs[s][k][c]
  __shared__ float s_code[16];
  __shared__ float s_code8[256];
  init_tables(a.w, s_code, s_code8);
  __syncthreads();
  const WTab tab = make_tab(a.w, s_code, s_code8);

  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;  // 4 x 4 outputs: rows ty*4, cols tx*4
  const float* X = static_cast<const float*>(a.X);
  const int64_t mtiles = cdiv(a.M, kSBM), ctiles = cdiv(a.C, kSBN), nk = cdiv(a.R, kSBK);
  const int xrow = tid >> 2, xkc = tid & 3;  // X: row xrow, k 8*xkc .. +7
  // W group: Forward rows n (64) x k (32): row tid>>2, group tid&3; GradInput n (32) x k (64).
  const int wrow = kFwd ? tid >> 2 : tid >> 3, wcg = kFwd ? tid & 3 : tid & 7;

  for (int64_t tile = blockIdx.x; tile < mtiles * ctiles; tile += gridDim.x) {
    const int64_t m0 = (tile % mtiles) * kSBM, c0 = (tile / mtiles) * kSBN;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    Raw8<float> xr;
    WRaw<8> wr;
    auto w_n = [&](int64_t kt) -> int64_t { return kFwd ? c0 + wrow : kt * kSBK + wrow; };
    auto w_k = [&](int64_t kt) -> int64_t { return kFwd ? kt * kSBK + wcg * 8 : c0 + wcg * 8; };
    auto load_step = [&](int64_t kt) {
      const int64_t m = m0 + xrow;
      if (m < a.M) load_raw8(xr, X + m * a.R, kt * kSBK + xkc * 8, a.R, a.xvec);
      else zero_raw8(xr);
      if constexpr (kVecW) w_prefetch<8>(wr, a.w, w_n(kt), w_k(kt));
    };
    auto store_step = [&](int s, int64_t kt) {
      float f[8];
      raw8_to_float(xr, f);
#pragma unroll
      for (int j = 0; j < 8; ++j) As[s][xkc * 8 + j][xrow] = f[j];
      float v[8];
      if constexpr (kVecW) w_dequant<8>(wr, a.w, tab, v);
      else w_direct<8>(a.w, w_n(kt), w_k(kt), tab, v);
      if constexpr (kFwd) {
#pragma unroll
        for (int j = 0; j < 8; ++j) Bs[s][wcg * 8 + j][wrow] = v[j];
      } else {
        *reinterpret_cast<float4*>(&Bs[s][wrow][wcg * 8]) = make_float4(v[0], v[1], v[2], v[3]);
        *reinterpret_cast<float4*>(&Bs[s][wrow][wcg * 8 + 4]) = make_float4(v[4], v[5], v[6], v[7]);
      }
    };

    if (nk > 0) {
      load_step(0);
      store_step(0, 0);
    }
    __syncthreads();
    for (int64_t kt = 0; kt < nk; ++kt) {
      const int s = static_cast<int>(kt & 1);
      if (kt + 1 < nk) load_step(kt + 1);
#pragma unroll 8
      for (int k = 0; k < kSBK; ++k) outer_fma<4, 4>(&As[s][k][ty * 4], &Bs[s][k][tx * 4], acc);
      if (kt + 1 < nk) store_step(s ^ 1, kt + 1);
      __syncthreads();
    }
    tile_epilogue<float, Mode, kSBM, kSBN, 4, 4, kSRc>(
        a,
        [&](int i, float* v) {
#pragma unroll
          for (int j = 0; j < 4; ++j) v[j] = acc[i][j];
        },
        m0, c0, &As[0][0][0], &Bs[0][0][0]);
  }
}

// ---- small M, Forward: a warp per few rows of W, K streamed once ----------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

template <int MT> struct DecFwdCfg {
  static constexpr int kNW = MT <= 4 ? 4 : 2;  // W rows a warp
  static constexpr int kRows = 16;             // W rows a CTA
  static constexpr int kWarps = kRows / kNW;
  static constexpr int kThreads = kWarps * kWarp;
  static constexpr int kKC = 512;              // k a chunk: 32 lanes x 16
  static constexpr int kUnits = MT * kKC / 8;  // X units of 8 elements a chunk
  static constexpr int kUPT = (kUnits + kThreads - 1) / kThreads;
};

// Xs layout of a chunk row: element kl (0..511) sits at (kl%16)/4 * 128 + (kl/16) * 4 + kl%4,
// so lane l's elements 16l .. 16l+15 are the float4s at q*128 + 4l, q = 0..3: a warp's float4
// read is 512 contiguous bytes (no bank conflict).
__device__ __forceinline__ int xs_swizzle(int kl) { return ((kl & 15) >> 2) * 128 + (kl >> 4) * 4 + (kl & 3); }

template <typename T, int MT, bool kVecW>
__global__ void __launch_bounds__(DecFwdCfg<MT>::kThreads) lora_decode_fwd_kernel(const MmArgs a) {
  using Cfg = DecFwdCfg<MT>;
  constexpr int NW = Cfg::kNW, KC = Cfg::kKC;
  __shared__ __align__(16) float Xs[MT * KC];
  __shared__ float s_code[16];
  __shared__ float s_code8[256];
  init_tables(a.w, s_code, s_code8);
  __syncthreads();
  const WTab tab = make_tab(a.w, s_code, s_code8);

  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;
  const T* X = static_cast<const T*>(a.X);
  const int64_t N = a.C, K = a.R;  // Forward: out columns are W's rows
  T* out = static_cast<T*>(a.out);

  for (int64_t rt = blockIdx.x; rt * Cfg::kRows < N; rt += gridDim.x) {
    const int64_t nb = rt * Cfg::kRows + warp * NW;  // this warp's first row
    float acc[MT][NW];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int i = 0; i < NW; ++i) acc[m][i] = 0.0f;

    WRaw<16> pre[NW];
    Raw8<T> xpre[Cfg::kUPT];
    auto prefetch = [&](int64_t k0) {
      if constexpr (kVecW) {
#pragma unroll
        for (int i = 0; i < NW; ++i) w_prefetch<16>(pre[i], a.w, nb + i, k0 + lane * 16);
      }
#pragma unroll
      for (int u = 0; u < Cfg::kUPT; ++u) {
        const int idx = tid + u * Cfg::kThreads;
        const int m = idx / (KC / 8), kl = (idx % (KC / 8)) * 8;
        if (idx < Cfg::kUnits && m < a.M) load_raw8(xpre[u], X + m * K, k0 + kl, K, a.xvec);
        else zero_raw8(xpre[u]);
      }
    };

    if (K > 0) prefetch(0);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      __syncthreads();  // the previous chunk's Xs reads are done
#pragma unroll
      for (int u = 0; u < Cfg::kUPT; ++u) {
        const int idx = tid + u * Cfg::kThreads;
        if (idx < Cfg::kUnits) {
          const int m = idx / (KC / 8), kl = (idx % (KC / 8)) * 8;
          float f[8];
          raw8_to_float(xpre[u], f);
          float* dst = Xs + m * KC;  // kl % 16 is 0 or 8: two whole float4 slots
          *reinterpret_cast<float4*>(dst + xs_swizzle(kl)) = make_float4(f[0], f[1], f[2], f[3]);
          *reinterpret_cast<float4*>(dst + xs_swizzle(kl + 4)) = make_float4(f[4], f[5], f[6], f[7]);
        }
      }
      WRaw<16> cur[NW];
      if constexpr (kVecW) {
#pragma unroll
        for (int i = 0; i < NW; ++i) cur[i] = pre[i];
      }
      if (k0 + KC < K) prefetch(k0 + KC);
      __syncthreads();

      float w[NW][16];
#pragma unroll
      for (int i = 0; i < NW; ++i) {
        if constexpr (kVecW) w_dequant<16>(cur[i], a.w, tab, w[i]);
        else w_direct<16>(a.w, nb + i, k0 + lane * 16, tab, w[i]);
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        float x[16];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float4 t = *reinterpret_cast<const float4*>(Xs + m * KC + q * 128 + lane * 4);
          x[4 * q] = t.x; x[4 * q + 1] = t.y; x[4 * q + 2] = t.z; x[4 * q + 3] = t.w;
        }
#pragma unroll
        for (int i = 0; i < NW; ++i)
#pragma unroll
          for (int j = 0; j < 16; ++j) acc[m][i] = fmaf(x[j], w[i][j], acc[m][i]);
      }
    }

    // Lane sums, then the epilogue a warp at a time (the bounds are uniform across the warp).
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int i = 0; i < NW; ++i) acc[m][i] = warp_sum(acc[m][i]);
#pragma unroll
    for (int i = 0; i < NW; ++i) {
      const int64_t n = nb + i;
      if (n < N) {
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < a.M) {
            float part = 0.0f;
            for (int64_t j = lane; j < a.r; j += kWarp)
              part = fmaf(__ldg(a.L + m * a.r + j), load_any(a.Rf, n * a.r + j, a.R_dtype), part);
            const float lr = warp_sum(part);
            if (lane == 0) Elem<T>::store1(out + m * N + n, combine<LoraMatmulMode::Forward>(a, acc[m][i], lr, 0u, n));
          }
        }
      }
    }
  }
}

// ---- small M, GradInput: a CTA per 32 columns of K, N streamed once -------------------------

template <int MT> struct DecBwdCfg {
  static constexpr int kThreads = 512;
  static constexpr int kCC = 32;                   // columns a CTA: 8 lanes x 4
  static constexpr int kGroups = kThreads / 8;     // 64 row groups
  static constexpr int kU = MT >= 8 ? 4 : 8;       // rows a group a step
  static constexpr int kNS = kGroups * kU;         // rows a step: 512 or 256
  static constexpr int kXPT = kNS * MT / kThreads; // X values a thread stages a step
  static_assert(kNS * MT % kThreads == 0, "whole X staging rounds");
};

template <typename T, int MT, bool kVecW>
__global__ void __launch_bounds__(DecBwdCfg<MT>::kThreads) lora_decode_bwd_kernel(const MmArgs a) {
  using Cfg = DecBwdCfg<MT>;
  constexpr int U = Cfg::kU, NS = Cfg::kNS, CC = Cfg::kCC;
  constexpr int kWarps = Cfg::kThreads / kWarp;
  __shared__ __align__(16) float Xs[NS * MT];  // Xs[i*MT + m] = X[m, n0 + i]
  __shared__ __align__(16) float red[kWarps * MT * CC];
  __shared__ float s_code[16];
  __shared__ float s_code8[256];
  init_tables(a.w, s_code, s_code8);
  __syncthreads();
  const WTab tab = make_tab(a.w, s_code, s_code8);

  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;
  const int cl = tid & 7, g = tid >> 3;  // 4 columns 4*cl.., row group g (4 groups a warp)
  const T* X = static_cast<const T*>(a.X);
  const int64_t K = a.C, N = a.R;  // GradInput: out columns are W's columns
  T* out = static_cast<T*>(a.out);

  for (int64_t ct = blockIdx.x; ct * CC < K; ct += gridDim.x) {
    const int64_t kc = ct * CC + cl * 4;
    float acc[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[m][c] = 0.0f;

    WRaw<4> pre[U];
    float xpre[Cfg::kXPT];
    auto prefetch = [&](int64_t n0) {
      if constexpr (kVecW) {
#pragma unroll
        for (int u = 0; u < U; ++u) w_prefetch<4>(pre[u], a.w, n0 + g + Cfg::kGroups * u, kc);
      }
#pragma unroll
      for (int v = 0; v < Cfg::kXPT; ++v) {
        const int idx = tid + v * Cfg::kThreads;
        const int i = idx % NS, m = idx / NS;  // along n: coalesced
        const int64_t n = n0 + i;
        xpre[v] = (m < a.M && n < N) ? Elem<T>::load1(X + m * N + n) : 0.0f;
      }
    };

    if (N > 0) prefetch(0);
    for (int64_t n0 = 0; n0 < N; n0 += NS) {
      __syncthreads();  // the previous step's Xs reads are done
#pragma unroll
      for (int v = 0; v < Cfg::kXPT; ++v) {
        const int idx = tid + v * Cfg::kThreads;
        Xs[(idx % NS) * MT + idx / NS] = xpre[v];
      }
      WRaw<4> cur[U];
      if constexpr (kVecW) {
#pragma unroll
        for (int u = 0; u < U; ++u) cur[u] = pre[u];
      }
      if (n0 + NS < N) prefetch(n0 + NS);
      __syncthreads();
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int nl = g + Cfg::kGroups * u;
        float w[4];
        if constexpr (kVecW) w_dequant<4>(cur[u], a.w, tab, w);
        else w_direct<4>(a.w, n0 + nl, kc, tab, w);
        float x[MT];
        if constexpr (MT % 4 == 0) {
#pragma unroll
          for (int q = 0; q < MT / 4; ++q) {
            const float4 t = *reinterpret_cast<const float4*>(Xs + nl * MT + 4 * q);
            x[4 * q] = t.x; x[4 * q + 1] = t.y; x[4 * q + 2] = t.z; x[4 * q + 3] = t.w;
          }
        } else {
#pragma unroll
          for (int m = 0; m < MT; ++m) x[m] = Xs[nl * MT + m];
        }
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[m][c] = fmaf(x[m], w[c], acc[m][c]);
      }
    }

    // The 4 row groups of a warp (lanes cl, cl+8, cl+16, cl+24), then the 16 warps.
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        acc[m][c] += __shfl_xor_sync(kFullMask, acc[m][c], 8);
        acc[m][c] += __shfl_xor_sync(kFullMask, acc[m][c], 16);
      }
    __syncthreads();  // red may still be read for the previous column tile (N == 0: no barrier since)
    if (lane < 8) {
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int c = 0; c < 4; ++c) red[(warp * MT + m) * CC + cl * 4 + c] = acc[m][c];
    }
    __syncthreads();
    if (tid < MT * CC) {
      const int m = tid / CC, col = tid % CC;
      const int64_t k = ct * CC + col;
      if (m < a.M && k < K) {
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += red[(w * MT + m) * CC + col];
        float lr = 0.0f;
        for (int64_t j = 0; j < a.r; ++j)
          lr = fmaf(__ldg(a.L + m * a.r + j), load_any(a.Rf, j * K + k, a.R_dtype), lr);
        const uint32_t rk = a.drop ? dropout_row_key(a.drop_key, m) : 0u;
        Elem<T>::store1(out + m * K + k, combine<LoraMatmulMode::GradInput>(a, s, lr, rk, k));
      }
    }
  }
}

// ---- dropout -------------------------------------------------------------------------------

struct DropArgs {
  bool enabled;
  uint32_t key, threshold;
  float scale;
};

__device__ __forceinline__ float drop1(const DropArgs& d, uint32_t row_key, int64_t col, float x) {
  if (!d.enabled) return x;
  return dropout_keep(row_key, col, d.threshold) ? __fmul_rn(x, d.scale) : 0.0f;
}

constexpr int kDropThreads = 256;

// `in` may equal `out` (fp32 in place): each element is read and then written by one thread,
// so neither pointer is __restrict__ and the loads are plain (coherent) ones, not __ldg.
__device__ __forceinline__ float plain_load(const float* p) { return *p; }
__device__ __forceinline__ float plain_load(const __half* p) {
  return Elem<__half>::from_bits(*reinterpret_cast<const unsigned short*>(p));
}
__device__ __forceinline__ float plain_load(const __nv_bfloat16* p) {
  return Elem<__nv_bfloat16>::from_bits(*reinterpret_cast<const unsigned short*>(p));
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kDropThreads) lora_dropout_kernel(const T* in, int64_t rows, int64_t cols,
                                                                    DropArgs d, float* out) {
  const int64_t n = rows * cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kDropThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kDropThreads + threadIdx.x;
  const int64_t units = kVec ? n / 4 : 0;  // 4 elements: 16 / 8 input bytes, 16 output bytes
  for (int64_t u = first; u < units; u += stride) {
    const int64_t e = u * 4;
    int64_t row = e / cols, col = e - row * cols;
    float x[4];
    if constexpr (sizeof(T) == 4) {
      const float4 t = *reinterpret_cast<const float4*>(in + e);
      x[0] = t.x; x[1] = t.y; x[2] = t.z; x[3] = t.w;
    } else {
      const uint2 t = *reinterpret_cast<const uint2*>(in + e);
      x[0] = Elem<T>::from_bits(t.x & 0xFFFFu); x[1] = Elem<T>::from_bits(t.x >> 16);
      x[2] = Elem<T>::from_bits(t.y & 0xFFFFu); x[3] = Elem<T>::from_bits(t.y >> 16);
    }
    uint32_t rk = d.enabled ? dropout_row_key(d.key, row) : 0u;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      x[j] = drop1(d, rk, col, x[j]);
      if (++col == cols && j < 3) {  // the 4 may cross row ends (cols < 4 or not a multiple)
        col = 0;
        ++row;
        if (d.enabled) rk = dropout_row_key(d.key, row);
      }
    }
    *reinterpret_cast<float4*>(out + e) = make_float4(x[0], x[1], x[2], x[3]);
  }
  for (int64_t e = units * 4 + first; e < n; e += stride) {  // the tail (or all, unaligned)
    const int64_t row = e / cols, col = e - row * cols;
    out[e] = drop1(d, d.enabled ? dropout_row_key(d.key, row) : 0u, col, plain_load(in + e));
  }
}

// ---- launch helpers ------------------------------------------------------------------------

int grid_for(int64_t work) { return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(work, INT_MAX))); }

int log2_exact(int64_t v) {
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

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

// Decode-path thresholds (rows of X); the reasoning is in the comment at the top of the file.
constexpr int64_t kDecodeMaxMForward = 16;
constexpr int64_t kDecodeMaxMGradInput = 8;

template <typename T, LoraMatmulMode Mode>
void launch_matmul(const MmArgs& a, bool vecw_large, bool vecw_decode, cudaStream_t stream) {
  constexpr bool kFwd = Mode == LoraMatmulMode::Forward;
  if (kFwd && a.M <= kDecodeMaxMForward) {
    with_mt<16>(a.M, [&](auto mt) {
      constexpr int MT = decltype(mt)::value;
      const int grid = grid_for(ceil_div(a.C, DecFwdCfg<MT>::kRows));
      if (vecw_decode) lora_decode_fwd_kernel<T, MT, true><<<grid, DecFwdCfg<MT>::kThreads, 0, stream>>>(a);
      else lora_decode_fwd_kernel<T, MT, false><<<grid, DecFwdCfg<MT>::kThreads, 0, stream>>>(a);
      FTK_CHECK_LAUNCH("lora_decode_fwd_kernel");
    });
  } else if (!kFwd && a.M <= kDecodeMaxMGradInput) {
    with_mt<8>(a.M, [&](auto mt) {
      constexpr int MT = decltype(mt)::value;
      const int grid = grid_for(ceil_div(a.C, DecBwdCfg<MT>::kCC));
      if (vecw_decode) lora_decode_bwd_kernel<T, MT, true><<<grid, DecBwdCfg<MT>::kThreads, 0, stream>>>(a);
      else lora_decode_bwd_kernel<T, MT, false><<<grid, DecBwdCfg<MT>::kThreads, 0, stream>>>(a);
      FTK_CHECK_LAUNCH("lora_decode_bwd_kernel");
    });
  } else if constexpr (sizeof(T) == 4) {
    const int grid = grid_for(ceil_div(a.M, kSBM) * ceil_div(a.C, kSBN));
    if (vecw_large) lora_matmul_simt_kernel<Mode, true><<<grid, kSThreads, 0, stream>>>(a);
    else lora_matmul_simt_kernel<Mode, false><<<grid, kSThreads, 0, stream>>>(a);
    FTK_CHECK_LAUNCH("lora_matmul_simt_kernel");
  } else {
    const int grid = grid_for(ceil_div(a.M, kTcBM) * ceil_div(a.C, kTcBN));
    if (vecw_large) lora_matmul_tc_kernel<T, Mode, true><<<grid, kTcThreads, 0, stream>>>(a);
    else lora_matmul_tc_kernel<T, Mode, false><<<grid, kTcThreads, 0, stream>>>(a);
    FTK_CHECK_LAUNCH("lora_matmul_tc_kernel");
  }
}

}  // namespace

// ---- launchers -----------------------------------------------------------------------------

void lora_dropout_cuda(const LoraDropoutParams& p, cudaStream_t stream) {
  check(p);
  const int64_t n = p.rows * p.cols;
  if (n == 0) return;
  if (!p.dropout.enabled && p.in == p.out) return;  // fp32 in place and drop(v) = v: nothing to do
  const DropArgs d{p.dropout.enabled, p.dropout.enabled ? dropout_key(p.dropout.seed) : 0u, p.dropout.threshold,
                   p.dropout.scale};
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    // 4 elements a vector: 16 (fp32) or 8 input bytes, 16 output bytes.
    const bool vec = aligned(p.in, 4 * sizeof(T)) && aligned(p.out, 16);
    const int64_t work = ceil_div(vec ? std::max<int64_t>(n / 4, 1) : n, kDropThreads);
    const int grid = static_cast<int>(std::min<int64_t>(work, static_cast<int64_t>(sm_count(current_device())) * 8));
    const T* in = static_cast<const T*>(p.in);
    if (vec) lora_dropout_kernel<T, true><<<grid, kDropThreads, 0, stream>>>(in, p.rows, p.cols, d, p.out);
    else lora_dropout_kernel<T, false><<<grid, kDropThreads, 0, stream>>>(in, p.rows, p.cols, d, p.out);
    FTK_CHECK_LAUNCH("lora_dropout_kernel");
  });
}

void lora_matmul_cuda(const LoraMatmulParams& p, cudaStream_t stream) {
  check(p);
  const bool fwd = p.mode == LoraMatmulMode::Forward;
  const int64_t C = fwd ? p.W.rows : p.W.cols;  // out columns
  const int64_t R = fwd ? p.W.cols : p.W.rows;  // reduction length
  if (p.M == 0 || C == 0) return;

  MmArgs a{};
  a.X = p.X;
  a.M = p.M; a.C = C; a.R = R;
  const bool w_empty = p.W.rows * p.W.cols == 0;  // then R == 0 and W is never read
  a.w.packed = p.W.packed;
  a.w.N = p.W.rows; a.w.K = p.W.cols;
  a.w.bs_shift = log2_exact(p.W.blocksize);
  a.w.nested = p.W.absmax == nullptr && !w_empty;
  a.w.absmax = p.W.absmax; a.w.absmax_q = p.W.absmax_q;
  a.w.nested_absmax = p.W.nested_absmax; a.w.nested_code = p.W.nested_code; a.w.offset = p.W.offset;
  a.w.nested_shift = a.w.nested ? log2_exact(p.W.nested_blocksize) : 0;
  a.w.quant_type = static_cast<int>(p.W.quant_type);
  a.bias = fwd ? p.bias : nullptr;
  a.bias_dtype = p.bias_dtype;
  a.L = p.L; a.Rf = p.R; a.R_dtype = p.R_dtype; a.r = p.r;
  a.scaling = p.scaling;
  a.drop = !fwd && p.dropout.enabled;
  a.drop_key = a.drop ? dropout_key(p.dropout.seed) : 0u;
  a.threshold = p.dropout.threshold;
  a.drop_scale = p.dropout.scale;
  a.out = p.out;

  // W vectors: G elements (G/2 bytes) need K % G == 0 and packed aligned to G/2 (see the top).
  const auto vecw = [&](int64_t G) { return !w_empty && p.W.cols % G == 0 && aligned(p.W.packed, G / 2); };
  const bool vecw_large = vecw(8);
  const bool vecw_decode = fwd ? vecw(16) : vecw(4);

  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    a.xvec = aligned(p.X, 16) && R % (16 / static_cast<int64_t>(sizeof(T))) == 0;
    if (fwd) launch_matmul<T, LoraMatmulMode::Forward>(a, vecw_large, vecw_decode, stream);
    else launch_matmul<T, LoraMatmulMode::GradInput>(a, vecw_large, vecw_decode, stream);
  });
}

}  // namespace ftk
