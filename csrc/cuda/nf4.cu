// CUDA kernels for blockwise 4-bit (NF4/FP4) and 8-bit quantization, then their launchers.
//
// Format: csrc/include/ftk/quant.h (the bitsandbytes CUDA contract). The bytes equal the
// reference backend's and the CPU kernels' bit for bit; the traps are marked NOTE.
//
// quantize_4bit: a group of G threads owns one quantization block; each thread loads K
// 16-byte vectors of the block (16 elements: K=4 of fp32 or K=2 of fp16/bf16), so
// bs = 16 * G. Vector k of lane j in its group is block vector k*G + j, which makes every
// warp-wide load one contiguous span per group (512 bytes when G >= 32, whole 32-byte
// sectors even at G = 2). Absmax: max over |x| as uint32 bit patterns (for x >= 0 the
// integer order is the float order, and every NaN pattern is above inf, so a NaN is never
// dropped as fmaxf would drop it), reduced with xor-shuffles inside the group (sub-warp groups
// are aligned, the shuffle never leaves them) and, for G > 32, through shared memory.
//   blocksize   32  64  128  256  512  1024  2048  4096
//   G            2   4    8   16   32    64   128   256   (threads per block; CTA = 256)
//   reduction  1 .. 4 shuffle steps  5   5 + smem over 2 / 4 / 8 warps
// Why 16 elements a thread: 32 bytes (16-bit) or 64 bytes (fp32) of loads in flight per
// thread; at 5+ resident CTAs of 256 that is >= 40 KB per SM, twice the ~18 KB Little's law
// asks on H100 (3.35 TB/s x ~0.7 us / 132 SMs). A whole warp per block at bs = 4096 would
// hold 128 fp32 a lane (spills); a CTA per block at bs = 32 would idle 224 of 256 threads.
// Index: NF4 by a 4-step binary search over the 15 midpoints in shared memory (4 compares,
// 3 LDS), not quantize_nf4's 15 compares: the linear count is ~30 instructions an element,
// which at bf16's 2.5 bytes an element would make the kernel issue-bound below copy speed.
// The midpoints are computed from FTK_NF4_CODE as quant.h defines them, fp32 (c[i]+c[i+1])/2,
// and the search returns quantize_nf4's count for every one of the 2^32 fp32 inputs (checked
// exhaustively on the host). FP4 uses quantize_fp4 as is. Packing: byte = hi << 4 | lo.
//
// dequantize_4bit: element-wise. A unit is one 16-byte output store (4 fp32 / 8 fp16|bf16
// elements, from 2 / 4 packed bytes); each thread takes U units a loop iteration (U = 8 / 4,
// 16 packed bytes in flight), unit k of thread t being tile unit k*256 + t, so each warp-wide
// load and store is contiguous. A unit never crosses a quantization block (4 or 8 elements,
// blocks of >= 32 start at multiples of 32), so it needs one absmax. The 16-entry code lives
// in shared memory (16 words, 16 banks: no conflicts); value = code[q] * absmax in fp32, cast
// once to the output dtype (round to nearest even). The < 8 elements after the last whole
// unit are done by one thread.
//
// 8-bit blockwise (double quantization of the absmax: n = numel / 64, small): a warp per block,
// two passes over the block (absmax, then quantize_8bit from a shared copy of the code; the
// second pass hits L1/L2), any blocksize 32..4096. Dequantize: one element a thread.
//
// Launch: 256 threads a CTA; grid = min(work, SMs x resident CTAs per SM), both queried once
// per device and kernel and cached, with grid-stride loops. Every launch goes on the caller's
// stream, allocates nothing and never synchronises, so the kernels are capturable in graphs.
// All indices into the data are int64 (numel may pass 2^31).
//
// Alignment: the Python layer hands over 16-byte aligned, contiguous tensors and the launchers
// check it. Every 16-byte vector then starts at an element offset that is a multiple of its
// width, so it is aligned whatever n is; the one vector that crosses n is read and written
// element by element, and no load or store touches memory past n elements or (n+1)/2 bytes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "ftk/cuda_util.cuh"
#include "ftk/quant.h"
#include "ftk/quant_cuda.h"

namespace ftk {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr uint32_t kFullMask = 0xFFFFFFFFu;
constexpr uint32_t kCanonicalNaN = 0x7FC00000u;  // what the CPU kernels store (std NAN)

__constant__ float kNF4Code[16] = FTK_NF4_CODE;
__constant__ float kFP4Code[16] = FTK_FP4_CODE;

// ---- storage types ----------------------------------------------------------------------
// Elem<T>: 16-byte vectors and scalars of T to and from fp32 (exact widening; narrowing once,
// round to nearest even, as torch's .to(dtype)).

template <typename T> struct Elem;

template <> struct Elem<float> {
  static constexpr int kVec = 4;
  static __device__ __forceinline__ float load1(const float* p) { return __ldg(p); }
  static __device__ __forceinline__ void unpack(const uint4 v, float* x) {
    x[0] = __uint_as_float(v.x); x[1] = __uint_as_float(v.y);
    x[2] = __uint_as_float(v.z); x[3] = __uint_as_float(v.w);
  }
  static __device__ __forceinline__ uint4 pack(const float* x) {
    return make_uint4(__float_as_uint(x[0]), __float_as_uint(x[1]), __float_as_uint(x[2]),
                      __float_as_uint(x[3]));
  }
  static __device__ __forceinline__ void store1(float* p, float x) { *p = x; }
};

template <> struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float load1(const __nv_bfloat16* p) {
    return __uint_as_float(static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned short*>(p))) << 16);
  }
  static __device__ __forceinline__ void unpack2(uint32_t w, float* x) {
    x[0] = __uint_as_float(w << 16);  // the lower address is the low half
    x[1] = __uint_as_float(w & 0xFFFF0000u);
  }
  static __device__ __forceinline__ void unpack(const uint4 v, float* x) {
    unpack2(v.x, x); unpack2(v.y, x + 2); unpack2(v.z, x + 4); unpack2(v.w, x + 6);
  }
  static __device__ __forceinline__ uint4 pack(const float* x) {
    return make_uint4(bits_of(__floats2bfloat162_rn(x[0], x[1])), bits_of(__floats2bfloat162_rn(x[2], x[3])),
                      bits_of(__floats2bfloat162_rn(x[4], x[5])), bits_of(__floats2bfloat162_rn(x[6], x[7])));
  }
  static __device__ __forceinline__ void store1(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
};

template <> struct Elem<__half> {
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float load1(const __half* p) {
    return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
  }
  static __device__ __forceinline__ void unpack2(uint32_t w, float* x) {
    x[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xFFFFu)));
    x[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
  static __device__ __forceinline__ void unpack(const uint4 v, float* x) {
    unpack2(v.x, x); unpack2(v.y, x + 2); unpack2(v.z, x + 4); unpack2(v.w, x + 6);
  }
  static __device__ __forceinline__ uint4 pack(const float* x) {
    return make_uint4(bits_of(__floats2half2_rn(x[0], x[1])), bits_of(__floats2half2_rn(x[2], x[3])),
                      bits_of(__floats2half2_rn(x[4], x[5])), bits_of(__floats2half2_rn(x[6], x[7])));
  }
  static __device__ __forceinline__ void store1(__half* p, float x) { *p = __float2half_rn(x); }
};

// Unsigned integer of N bytes (the packed bytes of one vector or unit).
template <int N> struct UInt;
template <> struct UInt<2> { using type = unsigned short; };
template <> struct UInt<4> { using type = uint32_t; };

// |x| as bits: ordered like |x| for numbers, and every NaN above +inf.
__device__ __forceinline__ uint32_t abs_bits(float x) { return __float_as_uint(x) & 0x7FFFFFFFu; }

// The block absmax from the max of abs_bits: a NaN becomes the one NaN the CPU path stores.
__device__ __forceinline__ float absmax_from_bits(uint32_t m) {
  return __uint_as_float(m > 0x7F800000u ? kCanonicalNaN : m);
}

// NF4 index by binary search. mid[k] (k = 1..15) is the k-th midpoint, mid[0] is unused; the
// result is the number of midpoints strictly below x, as quantize_nf4 counts them (a NaN
// compares false everywhere and gives 0). mid[8] is read from shared memory too, so the table
// is the only place the thresholds come from.
__device__ __forceinline__ uint32_t nf4_index(float x, const float* mid) {
  // The same search as i = 8*(x > mid[8]); i += 4*(x > mid[i+4]); ... over a byte offset
  // o = 4*i, so each step is one compare, one add and one LDS with an immediate offset.
  const char* base = reinterpret_cast<const char*>(mid);
  uint32_t o = x > mid[8] ? 32u : 0u;
  o += x > *reinterpret_cast<const float*>(base + o + 16) ? 16u : 0u;
  o += x > *reinterpret_cast<const float*>(base + o + 8) ? 8u : 0u;
  o += x > *reinterpret_cast<const float*>(base + o + 4) ? 4u : 0u;
  return o >> 2;
}

template <QuantType Q>
__device__ __forceinline__ uint32_t index_4bit(float xn, const float* mid) {
  if constexpr (Q == QuantType::NF4) return nf4_index(xn, mid);
  else return quantize_fp4(xn);
}

// ---- quantize_4bit -------------------------------------------------------------------------

template <typename T, QuantType Q, int G>
__global__ void __launch_bounds__(kThreads)
quantize_4bit_kernel(const T* __restrict__ A, int64_t n, int64_t nblocks,
                     uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  constexpr int V = Elem<T>::kVec;               // elements per 16-byte vector
  constexpr int K = 16 / V;                      // vectors per thread: 16 elements a thread
  constexpr int BS = G * K * V;                  // the quantization blocksize
  constexpr int kGroups = kThreads / G;          // quantization blocks per CTA iteration
  constexpr int kShfl = G < kWarp ? G : kWarp;   // lanes reduced by shuffles
  using Packed = typename UInt<V / 2>::type;
  static_assert(BS >= 32 && BS <= 4096 && kThreads % G == 0, "G out of range");

  __shared__ float s_mid[16];
  __shared__ uint32_t s_red[2][kThreads / kWarp];  // per-warp partials for G > 32, by parity
  if (Q == QuantType::NF4 && threadIdx.x < 16) {
    const int k = threadIdx.x;
    // fp32 (c[k-1] + c[k]) / 2: the sum rounds once, the halving is exact (quant.h).
    s_mid[k] = k == 0 ? -INFINITY : __fmul_rn(__fadd_rn(kNF4Code[k - 1], kNF4Code[k]), 0.5f);
  }
  __syncthreads();

  const int g = threadIdx.x / G;  // group within the CTA
  const int j = threadIdx.x % G;  // lane within the group
  const int64_t nbytes = (n + 1) / 2;
  int parity = 0;
  // The loop bound is uniform across the CTA: every thread runs every iteration, so the
  // full-mask shuffles and __syncthreads below are legal; groups past the end idle through.
  for (int64_t tile = blockIdx.x; tile * kGroups < nblocks; tile += gridDim.x) {
    const int64_t b = tile * kGroups + g;
    const int64_t start = b * BS;
    float x[K * V];
    uint32_t m = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t e = start + static_cast<int64_t>(k * G + j) * V;
      if (e + V <= n) {
        Elem<T>::unpack(__ldg(reinterpret_cast<const uint4*>(A + e)), x + k * V);
      } else {
        // The vector that crosses n (or lies past it): valid elements one by one, zeros
        // after. A zero never raises the absmax, and element n of an odd n is the pad,
        // which must quantize as a zero of this block (quant.h).
#pragma unroll
        for (int t = 0; t < V; ++t) x[k * V + t] = e + t < n ? Elem<T>::load1(A + e + t) : 0.0f;
      }
#pragma unroll
      for (int t = 0; t < V; ++t) m = max(m, abs_bits(x[k * V + t]));
    }
#pragma unroll
    for (int off = kShfl / 2; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(kFullMask, m, off));
    if constexpr (G > kWarp) {
      constexpr int kWarpsPerGroup = G / kWarp;
      if ((threadIdx.x & (kWarp - 1)) == 0) s_red[parity][threadIdx.x / kWarp] = m;
      __syncthreads();
      // Double-buffered by parity: a warp can write s_red[parity] again two iterations on
      // only after every warp has passed the barrier of the iteration in between.
#pragma unroll
      for (int w = 0; w < kWarpsPerGroup; ++w) m = max(m, s_red[parity][g * kWarpsPerGroup + w]);
      parity ^= 1;
    }
    const float amax = absmax_from_bits(m);
    if (j == 0 && b < nblocks) absmax[b] = amax;
    // NOTE: the IEEE quotient then a rounded product, as bitsandbytes and the reference
    // (no fast math: CMakeLists.txt); x / amax would round differently.
    const float s = __fdiv_rn(1.0f, amax);

#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t e = start + static_cast<int64_t>(k * G + j) * V;
      if (e >= n) continue;  // an odd n's pad sits in the vector of element n - 1, e < n
      uint32_t word = 0;
#pragma unroll
      for (int i = 0; i < V / 2; ++i) {
        const uint32_t hi = index_4bit<Q>(__fmul_rn(x[k * V + 2 * i], s), s_mid);
        const uint32_t lo = index_4bit<Q>(__fmul_rn(x[k * V + 2 * i + 1], s), s_mid);
        word |= ((hi << 4) | lo) << (8 * i);
      }
      if (e + V <= n) {
        *reinterpret_cast<Packed*>(packed + e / 2) = static_cast<Packed>(word);
      } else {
#pragma unroll
        for (int i = 0; i < V / 2; ++i)
          if (e / 2 + i < nbytes) packed[e / 2 + i] = static_cast<uint8_t>(word >> (8 * i));
      }
    }
  }
}

// ---- dequantize_4bit -----------------------------------------------------------------------

// Dequantize4bitParams as the kernel takes it (by value, in the parameter space; n = rows * cols).
struct Dequant4Args {
  const uint8_t* packed;
  int64_t n;
  int bs_shift;  // log2(blocksize)
  const float* absmax;  // null: double-quantized, the next four are set
  const uint8_t* absmax_q;
  const float* nested_absmax;
  const float* nested_code;
  const float* offset;
  int nested_shift;  // log2(nested_blocksize)
  void* out;
};

template <bool kNested>
__device__ __forceinline__ float block_absmax(const Dequant4Args& a, int64_t b, const float* s_code8,
                                              float offset) {
  if constexpr (kNested) {
    // NOTE: two roundings, the product then the sum, as bitsandbytes computes them. An FMA
    // would round once and change the last bit of some absmax, hence of the output.
    return __fadd_rn(__fmul_rn(s_code8[__ldg(a.absmax_q + b)], __ldg(a.nested_absmax + (b >> a.nested_shift))),
                     offset);
  } else {
    return __ldg(a.absmax + b);
  }
}

template <typename OutT, QuantType Q, bool kNested>
__global__ void __launch_bounds__(kThreads) dequantize_4bit_kernel(const Dequant4Args a) {
  constexpr int E = Elem<OutT>::kVec;  // elements per unit: one 16-byte store
  constexpr int U = 32 / E;            // units per thread per iteration: 16 packed bytes
  using Packed = typename UInt<E / 2>::type;

  __shared__ float s_code[16];
  __shared__ float s_code8[kNested ? 256 : 1];
  if (threadIdx.x < 16) s_code[threadIdx.x] = Q == QuantType::NF4 ? kNF4Code[threadIdx.x] : kFP4Code[threadIdx.x];
  if constexpr (kNested) {
    for (int i = threadIdx.x; i < 256; i += kThreads) s_code8[i] = __ldg(a.nested_code + i);
  }
  __syncthreads();
  float offset = 0.0f;
  if constexpr (kNested) offset = __ldg(a.offset);

  OutT* __restrict__ out = static_cast<OutT*>(a.out);
  const int64_t units = a.n / E;  // whole units; the rest (< E elements) is the tail
  const int64_t ntiles = (units + kThreads * U - 1) / (kThreads * U);
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t base = tile * (kThreads * U) + threadIdx.x;
    Packed w[U] = {};
    float am[U] = {};
    // All loads first (U packed words and their absmax in flight), then the stores.
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const int64_t u = base + k * kThreads;
      if (u < units) {
        w[k] = __ldg(reinterpret_cast<const Packed*>(a.packed) + u);
        am[k] = block_absmax<kNested>(a, (u * E) >> a.bs_shift, s_code8, offset);
      }
    }
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const int64_t u = base + k * kThreads;
      if (u < units) {
        float v[E];
#pragma unroll
        for (int i = 0; i < E / 2; ++i) {
          const uint32_t byte = (static_cast<uint32_t>(w[k]) >> (8 * i)) & 0xFFu;
          v[2 * i] = __fmul_rn(s_code[byte >> 4], am[k]);  // even element: high nibble
          v[2 * i + 1] = __fmul_rn(s_code[byte & 0xFu], am[k]);
        }
        reinterpret_cast<uint4*>(out)[u] = Elem<OutT>::pack(v);
      }
    }
  }

  if (blockIdx.x == 0 && threadIdx.x == 0) {
    for (int64_t e = units * E; e < a.n; ++e) {
      const uint32_t byte = a.packed[e / 2];
      const uint32_t q = (e & 1) ? (byte & 0xFu) : (byte >> 4);
      Elem<OutT>::store1(out + e, __fmul_rn(s_code[q], block_absmax<kNested>(a, e >> a.bs_shift, s_code8, offset)));
    }
  }
}

// ---- 8-bit blockwise -----------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads)
quantize_blockwise_kernel(const T* __restrict__ A, int64_t n, int64_t nblocks, int bs_shift,
                          const float* __restrict__ code, uint8_t* __restrict__ out,
                          float* __restrict__ absmax) {
  __shared__ float s_code[256];
  for (int i = threadIdx.x; i < 256; i += kThreads) s_code[i] = __ldg(code + i);
  __syncthreads();

  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / kWarp);
  // One warp per block; the bound is uniform across the warp, so the shuffles are legal.
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarp) + threadIdx.x / kWarp; b < nblocks;
       b += warps) {
    const int64_t start = b << bs_shift;
    const int64_t len = min(static_cast<int64_t>(1) << bs_shift, n - start);
    uint32_t m = 0;
    for (int64_t i = lane; i < len; i += kWarp) m = max(m, abs_bits(Elem<T>::load1(A + start + i)));
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(kFullMask, m, off));
    const float amax = absmax_from_bits(m);
    if (lane == 0) absmax[b] = amax;
    const float s = __fdiv_rn(1.0f, amax);
    for (int64_t i = lane; i < len; i += kWarp)
      out[start + i] = static_cast<uint8_t>(quantize_8bit(s_code, __fmul_rn(Elem<T>::load1(A + start + i), s)));
  }
}

template <typename OutT>
__global__ void __launch_bounds__(kThreads)
dequantize_blockwise_kernel(const uint8_t* __restrict__ A, int64_t n, int bs_shift,
                            const float* __restrict__ absmax, const float* __restrict__ code,
                            OutT* __restrict__ out) {
  __shared__ float s_code[256];
  for (int i = threadIdx.x; i < 256; i += kThreads) s_code[i] = __ldg(code + i);
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride)
    Elem<OutT>::store1(out + i, __fmul_rn(s_code[__ldg(A + i)], __ldg(absmax + (i >> bs_shift))));
}

// ---- launch helpers ------------------------------------------------------------------------


int log2_exact(int64_t v) {
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

void check_aligned(const void* p, const char* name) {
  FTK_CHECK_ARG(reinterpret_cast<uintptr_t>(p) % 16 == 0,
                std::string(name) + " must be 16-byte aligned (the Python layer copies a misaligned tensor)");
}

template <typename T, QuantType Q, int G>
void launch_quantize_4bit(const Quantize4bitParams& p, int64_t nblocks, cudaStream_t stream) {
  constexpr int64_t kGroups = kThreads / G;
  launch<quantize_4bit_kernel<T, Q, G>, kThreads>("quantize_4bit_kernel", ceil_div(nblocks, kGroups), stream,
                                         static_cast<const T*>(p.A), p.n, nblocks, p.packed, p.absmax);
}

template <typename T, QuantType Q>
void quantize_4bit_blocksize(const Quantize4bitParams& p, int64_t nblocks, cudaStream_t stream) {
  // 16 elements a thread: G = blocksize / 16 threads per quantization block.
  switch (p.blocksize) {
    case 32: launch_quantize_4bit<T, Q, 2>(p, nblocks, stream); break;
    case 64: launch_quantize_4bit<T, Q, 4>(p, nblocks, stream); break;
    case 128: launch_quantize_4bit<T, Q, 8>(p, nblocks, stream); break;
    case 256: launch_quantize_4bit<T, Q, 16>(p, nblocks, stream); break;
    case 512: launch_quantize_4bit<T, Q, 32>(p, nblocks, stream); break;
    case 1024: launch_quantize_4bit<T, Q, 64>(p, nblocks, stream); break;
    case 2048: launch_quantize_4bit<T, Q, 128>(p, nblocks, stream); break;
    case 4096: launch_quantize_4bit<T, Q, 256>(p, nblocks, stream); break;
    default: FTK_CHECK_ARG(false, "blocksize must be one of 32, 64, ..., 4096");
  }
}

template <typename OutT, QuantType Q, bool kNested>
void launch_dequantize_4bit(const Dequant4Args& a, cudaStream_t stream) {
  constexpr int64_t kUnitsPerTile = kThreads * (32 / Elem<OutT>::kVec);
  const int64_t tiles = std::max<int64_t>(1, ceil_div(a.n / Elem<OutT>::kVec, kUnitsPerTile));
  launch<dequantize_4bit_kernel<OutT, Q, kNested>, kThreads>("dequantize_4bit_kernel", tiles, stream, a);
}

}  // namespace

// ---- launchers -----------------------------------------------------------------------------

void quantize_4bit_cuda(const Quantize4bitParams& p, cudaStream_t stream) {
  check(p);
  if (p.n == 0) return;
  check_aligned(p.A, "A");
  check_aligned(p.packed, "packed");
  const int64_t nblocks = ceil_div(p.n, p.blocksize);
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.quant_type == QuantType::NF4) quantize_4bit_blocksize<T, QuantType::NF4>(p, nblocks, stream);
    else quantize_4bit_blocksize<T, QuantType::FP4>(p, nblocks, stream);
  });
}

void dequantize_4bit_cuda(const Dequantize4bitParams& p, cudaStream_t stream) {
  check(p);
  const Weight4bit& w = p.w;
  if (w.numel() == 0) return;
  check_aligned(w.packed, "A (packed)");
  check_aligned(p.out, "out");
  const bool nested = w.absmax == nullptr;
  Dequant4Args a{w.packed, w.numel(), log2_exact(w.blocksize), w.absmax, w.absmax_q, w.nested_absmax,
                 w.nested_code, w.offset, nested ? log2_exact(w.nested_blocksize) : 0, p.out};
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (w.quant_type == QuantType::NF4) {
      if (nested) launch_dequantize_4bit<T, QuantType::NF4, true>(a, stream);
      else launch_dequantize_4bit<T, QuantType::NF4, false>(a, stream);
    } else {
      if (nested) launch_dequantize_4bit<T, QuantType::FP4, true>(a, stream);
      else launch_dequantize_4bit<T, QuantType::FP4, false>(a, stream);
    }
  });
}

void quantize_blockwise_cuda(const QuantizeBlockwiseParams& p, cudaStream_t stream) {
  check(p);
  if (p.n == 0) return;
  const int64_t nblocks = ceil_div(p.n, p.blocksize);
  const int shift = log2_exact(p.blocksize);
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch<quantize_blockwise_kernel<T>, kThreads>("quantize_blockwise_kernel", ceil_div(nblocks, kThreads / kWarp),
                                                   stream, static_cast<const T*>(p.A), p.n, nblocks, shift, p.code,
                                                   p.out, p.absmax);
  });
}

void dequantize_blockwise_cuda(const DequantizeBlockwiseParams& p, cudaStream_t stream) {
  check(p);
  if (p.n == 0) return;
  const int shift = log2_exact(p.blocksize);
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch<dequantize_blockwise_kernel<T>, kThreads>("dequantize_blockwise_kernel", ceil_div(p.n, kThreads), stream,
                                                     p.A, p.n, shift, p.absmax, p.code, static_cast<T*>(p.out));
  });
}

}  // namespace ftk
