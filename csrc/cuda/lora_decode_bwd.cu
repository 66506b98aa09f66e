// Fused LoRA matmul, small M (decode), GradInput: out (M x K) = X·deq(W) + drop(s·L·R) with W
// read exactly once, W values in fp32, any dtype. lora.cu sends M <= 8 here (the threshold and
// its numbers are there).
//
// A CTA of 512 threads owns 32 columns of K (8 lanes x 4 columns, 2 packed bytes a lane a row)
// and 64 row groups walk N, U rows each a step (8, or 4 at M = 8: registers), prefetched a step
// ahead; X^T chunks (512 or 256 rows x M, fp32) in shared memory; shuffles and shared memory
// reduce the 64 partial sums of each output (the 4 groups of a warp by shuffles, then the 16
// warps through red[16][M][32]).
//
// Why 8 and not 16: there are only ceil(K / 32) = 128 CTAs at K = 4096, with ~1 MB of W loads
// in flight (~1.5 TB/s by Little's law at ~0.7 us latency), and at M = 16 the 64 accumulators
// + 2 x U prefetched rows would not fit 128 registers at 512 threads.
//
// Invariants: W is read as 4-element words (2 bytes) only when vecw (K % 4 == 0, packed 2-byte
// aligned), element by element otherwise; the dropout mask is the (row m, column k) hash of the
// M x K output, as the tiled path's.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lora_tiles.cuh"

namespace ftk {
namespace lora {
namespace {

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

}  // namespace

template <typename T>
void launch_decode_bwd(const MmArgs& a, bool vecw, cudaStream_t stream) {
  with_mt<8>(a.M, [&](auto mt) {
    constexpr int MT = decltype(mt)::value;
    const int grid = grid_for(ceil_div(a.C, DecBwdCfg<MT>::kCC));
    if (vecw) lora_decode_bwd_kernel<T, MT, true><<<grid, DecBwdCfg<MT>::kThreads, 0, stream>>>(a);
    else lora_decode_bwd_kernel<T, MT, false><<<grid, DecBwdCfg<MT>::kThreads, 0, stream>>>(a);
    FTK_CHECK_LAUNCH("lora_decode_bwd_kernel");
  });
}

template void launch_decode_bwd<float>(const MmArgs&, bool, cudaStream_t);
template void launch_decode_bwd<__half>(const MmArgs&, bool, cudaStream_t);
template void launch_decode_bwd<__nv_bfloat16>(const MmArgs&, bool, cudaStream_t);

}  // namespace lora
}  // namespace ftk
