// Fused LoRA matmul, small M (decode), Forward: out (M x N) = X·deq(W)ᵀ + bias + s·L·Rᵀ with
// W read exactly once, W values in fp32, X staged in fp32, any dtype. lora.cu sends M <= 16
// here (the threshold and its numbers are there).
//
// A CTA owns 16 rows of W; each warp NW of them (4 when M <= 4, else 2) and walks K in chunks
// of 512: a lane loads 8 packed bytes (16 elements) of each of its rows, a warp 256 contiguous
// bytes a row, with the next chunk's W bytes and X values already in flight (register
// prefetch). The X chunk (M x 512, fp32) lives in shared memory, swizzled so that a lane's 16
// elements are four conflict-free float4 reads; each X value is reused for NW rows and each W
// value for all M rows (M x NW fp32 accumulators a lane: at most 32, at M = 16). Warp shuffles
// reduce over lanes; the rank-r dot products are split over lanes the same way.
//
// Cost (H100 SXM estimates, to be re-measured on a GPU): ~(4 + M) lane-ops a weight (dequantize,
// then M FMAs); N = K = 4096 is 2.3 us + 0.57 us x M of issue against 2.5 us of bandwidth for
// the 8.4 MB of packed W: 3 us at M = 1 (bandwidth-bound), 6.8 us at M = 8, 11.4 us at M = 16.
//
// Invariants: W is read as 16-element words (8 bytes) only when vecw (K % 16 == 0, packed
// 8-byte aligned), element by element otherwise; the bounds of the epilogue are uniform across
// a warp, so every lane reaches each shuffle.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lora_tiles.cuh"

namespace ftk {
namespace lora {
namespace {

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

}  // namespace

template <typename T>
void launch_decode_fwd(const MmArgs& a, bool vecw, cudaStream_t stream) {
  with_mt<16>(a.M, [&](auto mt) {
    constexpr int MT = decltype(mt)::value;
    const int grid = grid_for(ceil_div(a.C, DecFwdCfg<MT>::kRows));
    if (vecw) lora_decode_fwd_kernel<T, MT, true><<<grid, DecFwdCfg<MT>::kThreads, 0, stream>>>(a);
    else lora_decode_fwd_kernel<T, MT, false><<<grid, DecFwdCfg<MT>::kThreads, 0, stream>>>(a);
    FTK_CHECK_LAUNCH("lora_decode_fwd_kernel");
  });
}

template void launch_decode_fwd<float>(const MmArgs&, bool, cudaStream_t);
template void launch_decode_fwd<__half>(const MmArgs&, bool, cudaStream_t);
template void launch_decode_fwd<__nv_bfloat16>(const MmArgs&, bool, cudaStream_t);

}  // namespace lora
}  // namespace ftk
