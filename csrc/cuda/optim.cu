// CUDA kernels of the fused optimizer steps (optim.h: AdamW and Lion with fp32 states, AdamW with
// blockwise 8-bit states), then their launchers.
//
// Math: optim.h's, in csrc/cpu/optim.cpp's order of operations, every product, sum, quotient and
// root rounded on its own (__fmul_rn, __fadd_rn, __fsub_rn, __fdiv_rn, __fsqrt_rn).
// NOTE: nvcc contracts a*b + c into one FMA by default, which rounds once where the CPU kernel
// (built with -ffp-contract=off) rounds twice and torch's AdamW rounds twice; the last bit of m,
// v or the param would then differ. The _rn intrinsics are never contracted, so no plain float
// arithmetic is left in the update, and the result equals the CPU kernel's bit for bit (NaN
// payloads aside: a bf16 NaN is rounded by __float2bfloat16_rn, not by cpu_util.h's helper).
//
// 32-bit (AdamW, Lion): element-wise, a grid-stride loop over quads of 4 elements, int64
// indices. A thread loads one quad of each stream per iteration: the fp32 states and fp32
// param/grad as 16-byte vectors, fp16/bf16 param/grad as 8 bytes, so a warp-wide access is one
// contiguous 512- or 256-byte span. Bytes moved an element, fp32 param and grad: AdamW
// 8 (param read and written) + 4 (grad) + 16 (m, v) = 28, Lion 20; bf16 param and grad: 20, 12.
// In flight: 64 bytes of loads a thread; AdamW's 40-43 registers leave 5 resident CTAs of 256
// (Lion's 28-32: 8), >= 80 KB an SM, 4x the ~18 KB Little's law asks on H100 (3.35 TB/s x
// ~0.7 us / 132 SMs). The n % 4 elements past the last quad go element by element (the first
// n % 4 threads). When any pointer is not aligned to its quad (param or a state given as a view
// at an odd offset; grad arrives 16-byte aligned from _ops.dense) the whole launch takes the
// scalar loop of the same kernel: a uniform branch, not a second instantiation.
//
// 8-bit (AdamW): one warp per 256-element state block, 8 warps (8 blocks) a CTA, grid-stride
// over blocks. Lane l holds the 8 elements of quads l and 32 + l of its block (elements 4l..4l+3
// and 128+4l..128+4l+3), so every warp-wide load or store is contiguous: 512 B of fp32 param,
// 256 B of fp16/bf16, 128 B of state codes (a 4-byte word a lane). Per block:
//   1. m, v dequantized (code[q] · absmax, the codes staged in shared memory: 2 x 256 floats,
//      2 KB a CTA), updated in fp32, the param updated and stored: one read, one write.
//   2. absmax1 = max |m|, absmax2 = max |v| over the block: 8 values a lane, then 5 xor-shuffle
//      steps. A max is exact whatever the order, so the result is deterministic and equals the
//      CPU's sequential std::fmax. NOTE: fmaxf, like std::fmax, drops a NaN operand (a NaN m
//      does not make the absmax NaN), which is the CPU kernel's behaviour; nf4.cu's absmax keeps
//      NaN instead, as quantize_blockwise's contract asks. Do not "fix" one to match the other.
//   3. each element quantized with quantize_8bit(code_in_smem, x / absmax) (the IEEE quotient,
//      as the CPU kernel and bitsandbytes divide); a block whose absmax is 0 stores
//      quantize_8bit(code, 0) everywhere and absmax 0. Lane 0 writes the two absmax floats.
// The absmax of block b is read by every lane before the shuffles of step 2 and written by lane
// 0 after them, and no other warp touches block b, so the in-place update needs no barrier.
// Why a warp per block: 8 elements a lane is 16 fp32 of m and v live at once (no spills), the
// reduction is shuffles only (no __syncthreads inside the loop), and a partial last block costs
// one warp's branch, not a CTA's. Bytes moved an element: 8 (fp32 param read and written) + 4
// (grad) + 4 (two codes read and written) = 16, 10 in bf16, + 16 absmax bytes a block; the two
// 8-step code searches, four IEEE divisions and a root an element (~100 instructions) put this
// kernel near the instruction-issue limit as well as the memory limit. 60-64 registers: 4 resident CTAs (32 warps) an SM.
// NOTE: the searches read the code at pivots 127 ± 64 ± 32 ..., which share banks (63 and 191,
// 31/95/159/223 ...): up to 4-way conflicts in the middle steps, as in bitsandbytes. A padded
// table (index i at i + i / 32) would remove them but needs its own search, not quant.h's.
// None of this has been timed on a GPU: measure (and try the padded table) when one is at hand.
// The vector path needs param and grad aligned to a quad (16 or 8 bytes) and the state codes to
// 4 bytes; otherwise, and for the partial last block, the same lanes own the same elements and load
// them one at a time (bounds-checked: nothing past n is touched).
//
// Launch: 256 threads a CTA; grid = min(work, SMs x resident CTAs per SM), queried once per device
// and kernel and cached. Every launch goes on the caller's stream, allocates nothing and never
// synchronises, so the steps are capturable in CUDA graphs. Instantiations: param dtype x grad
// dtype (9) for each of AdamW, Lion and AdamW 8-bit: 27 kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "ftk/cuda_util.cuh"
#include "ftk/optim_cuda.h"
#include "ftk/quant.h"

namespace ftk {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
constexpr uint32_t kFullMask = 0xFFFFFFFFu;
constexpr int kCodeSize = 256;
static_assert(kOptimBlock == 8 * kWarp, "a lane holds 8 elements (two quads) of a 256-element block");
static_assert(kThreads == kCodeSize, "staging the codes: one entry of each a thread");

// ---- storage types ---------------------------------------------------------------------------
// Quads (4 consecutive elements) of T to and from fp32 (scalars: cuda_util.cuh's to_f32 and
// from_f32).

// The raw vector type of a quad of T: 16 bytes of fp32, 8 bytes of fp16/bf16.
template <typename T> struct QuadRaw { using type = uint2; };
template <> struct QuadRaw<float> { using type = uint4; };

template <typename T>
__device__ __forceinline__ void load_quad(const T* base, int64_t quad, float (&x)[4]) {
  using R = typename QuadRaw<T>::type;
  const R r = reinterpret_cast<const R*>(base)[quad];
  T e[4];
  memcpy(e, &r, sizeof(R));
#pragma unroll
  for (int j = 0; j < 4; ++j) x[j] = to_f32<T>(e[j]);
}

template <typename T>
__device__ __forceinline__ void store_quad(T* base, int64_t quad, const float (&x)[4]) {
  using R = typename QuadRaw<T>::type;
  T e[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) e[j] = from_f32<T>(x[j]);
  R r;
  memcpy(&r, e, sizeof(R));
  reinterpret_cast<R*>(base)[quad] = r;
}

// ---- per-element math (csrc/cpu/optim.cpp's order, every operation rounded) -------------------

// AdamW, torch's order: x ← x·decay; m ← lerp(m, g, 1 − β1) (torch's two-sided lerp);
// v ← v·β2 + ((1 − β2)·g)·g; x ← x + ((−step_size)·m) / (√v / √(1 − β2^t) + eps).
__device__ __forceinline__ void adamw_element(float& x, float g, float& m, float& v, const OptimHyper& h) {
  x = __fmul_rn(x, h.decay);
  const float w = h.one_minus_beta1;
  m = w < 0.5f ? __fadd_rn(m, __fmul_rn(w, __fsub_rn(g, m)))
               : __fsub_rn(g, __fmul_rn(__fsub_rn(g, m), __fsub_rn(1.0f, w)));
  v = __fadd_rn(__fmul_rn(v, h.beta2), __fmul_rn(__fmul_rn(h.one_minus_beta2, g), g));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), h.bias_correction2_sqrt), h.eps);
  x = __fadd_rn(x, __fdiv_rn(__fmul_rn(-h.step_size, m), denom));
}

// Lion: c = m·β1 + g·(1 − β1); x ← x·decay + (−lr)·sign(c); m ← m·β2 + (1 − β2)·g.
__device__ __forceinline__ void lion_element(float& x, float g, float& m, const OptimHyper& h) {
  const float c = __fadd_rn(__fmul_rn(m, h.beta1), __fmul_rn(g, h.one_minus_beta1));
  const float sign = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);  // NaN: 0, as on the CPU
  x = __fadd_rn(__fmul_rn(x, h.decay), __fmul_rn(-h.lr, sign));
  m = __fadd_rn(__fmul_rn(m, h.beta2), __fmul_rn(h.one_minus_beta2, g));
}

template <OptimKind K>
__device__ __forceinline__ void step_element(float& x, float g, float& m, float& v, const OptimHyper& h) {
  if constexpr (K == OptimKind::AdamW) adamw_element(x, g, m, v, h);
  else lion_element(x, g, m, h);
}

// AdamW 8-bit on one element whose m, v are already dequantized (code[q]·absmax, rounded):
// m ← m·β1 + g·(1 − β1); v ← v·β2 + (g·g)·(1 − β2);
// x ← x·decay − step_size·(m / (√v / √(1 − β2^t) + eps)).
__device__ __forceinline__ void adamw8bit_element(float& x, float g, float& m, float& v, const OptimHyper& h) {
  m = __fadd_rn(__fmul_rn(m, h.beta1), __fmul_rn(g, h.one_minus_beta1));
  v = __fadd_rn(__fmul_rn(v, h.beta2), __fmul_rn(__fmul_rn(g, g), h.one_minus_beta2));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), h.bias_correction2_sqrt), h.eps);
  x = __fsub_rn(__fmul_rn(x, h.decay), __fmul_rn(h.step_size, __fdiv_rn(m, denom)));
}

// ---- 32-bit: AdamW and Lion ------------------------------------------------------------------

template <OptimKind K, typename P, typename G>
__global__ void __launch_bounds__(kThreads) optim_32bit_kernel(const Optim32bitParams p, bool vec) {
  P* __restrict__ param = static_cast<P*>(p.param);
  const G* __restrict__ grad = static_cast<const G*>(p.grad);
  float* __restrict__ s1 = p.state1;
  float* __restrict__ s2 = p.state2;  // AdamW only; Lion never reads it (may be null)
  const OptimHyper h = p.hyper;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  int64_t tail = 0;  // the first element the scalar loop takes
  if (vec) {
    const int64_t quads = p.n >> 2;
    for (int64_t q = tid; q < quads; q += stride) {
      float x[4], g[4], m[4], v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      load_quad<P>(param, q, x);
      load_quad<G>(grad, q, g);
      load_quad<float>(s1, q, m);
      if constexpr (K == OptimKind::AdamW) load_quad<float>(s2, q, v);
#pragma unroll
      for (int j = 0; j < 4; ++j) step_element<K>(x[j], g[j], m[j], v[j], h);
      store_quad<P>(param, q, x);
      store_quad<float>(s1, q, m);
      if constexpr (K == OptimKind::AdamW) store_quad<float>(s2, q, v);
    }
    tail = quads << 2;
  }
  for (int64_t i = tail + tid; i < p.n; i += stride) {
    float x = to_f32<P>(param[i]), m = s1[i], v = 0.0f;
    if constexpr (K == OptimKind::AdamW) v = s2[i];
    step_element<K>(x, to_f32<G>(grad[i]), m, v, h);
    param[i] = from_f32<P>(x);
    s1[i] = m;
    if constexpr (K == OptimKind::AdamW) s2[i] = v;
  }
}

// ---- 8-bit: AdamW with blockwise 8-bit states -------------------------------------------------

// Element k (0..7) of lane `lane` within a block: quad k / 4 of the lane's two (lane, 32 + lane).
__device__ __forceinline__ int elem_of(int lane, int k) { return ((k >> 2) * kWarp + lane) * 4 + (k & 3); }

template <typename P, typename G>
__global__ void __launch_bounds__(kThreads) optim_8bit_kernel(const Optim8bitParams p, bool vec) {
  __shared__ float s_code1[kCodeSize], s_code2[kCodeSize];
  s_code1[threadIdx.x] = p.code1[threadIdx.x];
  s_code2[threadIdx.x] = p.code2[threadIdx.x];
  __syncthreads();

  P* __restrict__ param = static_cast<P*>(p.param);
  const G* __restrict__ grad = static_cast<const G*>(p.grad);
  uint8_t* __restrict__ q1 = p.state1;
  uint8_t* __restrict__ q2 = p.state2;
  const OptimHyper h = p.hyper;
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t nblocks = (p.n + kOptimBlock - 1) / kOptimBlock;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  // The loop bound is uniform across a warp, so every lane reaches the shuffles.
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp; b < nblocks; b += warps) {
    const int64_t start = b * kOptimBlock;
    const int len = static_cast<int>(min(kOptimBlock, p.n - start));
    const bool full = vec && len == kOptimBlock;
    const float a1 = p.absmax1[b], a2 = p.absmax2[b];
    float m[8], v[8];
    float amax1 = 0.0f, amax2 = 0.0f;
    if (full) {
      const int64_t quad0 = (start >> 2) + lane;  // quads quad0 and quad0 + 32
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t quad = quad0 + half * kWarp;
        float x[4], g[4];
        load_quad<P>(param, quad, x);
        load_quad<G>(grad, quad, g);
        const uint32_t c1 = reinterpret_cast<const uint32_t*>(q1)[quad];
        const uint32_t c2 = reinterpret_cast<const uint32_t*>(q2)[quad];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int k = half * 4 + j;
          m[k] = __fmul_rn(s_code1[(c1 >> (8 * j)) & 0xFFu], a1);
          v[k] = __fmul_rn(s_code2[(c2 >> (8 * j)) & 0xFFu], a2);
          adamw8bit_element(x[j], g[j], m[k], v[k], h);
          amax1 = fmaxf(amax1, fabsf(m[k]));
          amax2 = fmaxf(amax2, fabsf(v[k]));
        }
        store_quad<P>(param, quad, x);
      }
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const int e = elem_of(lane, k);
        m[k] = 0.0f;  // past the end: no effect on the absmax, never stored
        v[k] = 0.0f;
        if (e < len) {
          const int64_t i = start + e;
          float x = to_f32<P>(param[i]);
          m[k] = __fmul_rn(s_code1[q1[i]], a1);
          v[k] = __fmul_rn(s_code2[q2[i]], a2);
          adamw8bit_element(x, to_f32<G>(grad[i]), m[k], v[k], h);
          param[i] = from_f32<P>(x);
          amax1 = fmaxf(amax1, fabsf(m[k]));
          amax2 = fmaxf(amax2, fabsf(v[k]));
        }
      }
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) {
      amax1 = fmaxf(amax1, __shfl_xor_sync(kFullMask, amax1, off));
      amax2 = fmaxf(amax2, __shfl_xor_sync(kFullMask, amax2, off));
    }
    uint32_t b1[8], b2[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      b1[k] = quantize_8bit(s_code1, amax1 > 0.0f ? __fdiv_rn(m[k], amax1) : 0.0f);
      b2[k] = quantize_8bit(s_code2, amax2 > 0.0f ? __fdiv_rn(v[k], amax2) : 0.0f);
    }
    if (full) {
      const int64_t quad0 = (start >> 2) + lane;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int k = half * 4;
        reinterpret_cast<uint32_t*>(q1)[quad0 + half * kWarp] =
            b1[k] | (b1[k + 1] << 8) | (b1[k + 2] << 16) | (b1[k + 3] << 24);
        reinterpret_cast<uint32_t*>(q2)[quad0 + half * kWarp] =
            b2[k] | (b2[k + 1] << 8) | (b2[k + 2] << 16) | (b2[k + 3] << 24);
      }
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const int e = elem_of(lane, k);
        if (e < len) {
          q1[start + e] = static_cast<uint8_t>(b1[k]);
          q2[start + e] = static_cast<uint8_t>(b2[k]);
        }
      }
    }
    if (lane == 0) {
      p.absmax1[b] = amax1;
      p.absmax2[b] = amax2;
    }
  }
}

// ---- launch helpers ------------------------------------------------------------------------


bool host_aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename Fn>
void with_dtypes(DType param, DType grad, Fn&& fn) {
  with_dtype(param, [&](auto pt) { with_dtype(grad, [&](auto gt) { fn(pt, gt); }); });
}

}  // namespace

// ---- launchers -----------------------------------------------------------------------------

void optim_32bit_step_cuda(const Optim32bitParams& p, cudaStream_t stream) {
  check(p);
  if (p.n == 0) return;
  with_dtypes(p.param_dtype, p.grad_dtype, [&](auto pt, auto gt) {
    using P = decltype(pt);
    using G = decltype(gt);
    const bool adamw = p.kind == OptimKind::AdamW;
    const bool vec = host_aligned(p.param, 4 * sizeof(P)) && host_aligned(p.grad, 4 * sizeof(G)) &&
                     host_aligned(p.state1, 16) && (!adamw || host_aligned(p.state2, 16));
    const int64_t work = ceil_div(vec ? ceil_div(p.n, 4) : p.n, kThreads);
    if (adamw) launch<optim_32bit_kernel<OptimKind::AdamW, P, G>, kThreads>("adamw_step_kernel", work, stream, p, vec);
    else launch<optim_32bit_kernel<OptimKind::Lion, P, G>, kThreads>("lion_step_kernel", work, stream, p, vec);
  });
}

void optim_8bit_step_cuda(const Optim8bitParams& p, cudaStream_t stream) {
  check(p);
  if (p.n == 0) return;
  with_dtypes(p.param_dtype, p.grad_dtype, [&](auto pt, auto gt) {
    using P = decltype(pt);
    using G = decltype(gt);
    const bool vec = host_aligned(p.param, 4 * sizeof(P)) && host_aligned(p.grad, 4 * sizeof(G)) &&
                     host_aligned(p.state1, 4) && host_aligned(p.state2, 4);
    const int64_t work = ceil_div(ceil_div(p.n, kOptimBlock), kWarps);  // CTA iterations: kWarps blocks each
    launch<optim_8bit_kernel<P, G>, kThreads>("adamw8bit_step_kernel", work, stream, p, vec);
  });
}

}  // namespace ftk
