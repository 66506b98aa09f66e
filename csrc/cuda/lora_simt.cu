// Fused LoRA matmul, large M, fp32: SIMT FMA, fp32 accuracy, no TF32. The GEMM shape and the
// mode table are lora.cu's; W addressing, X loads and the epilogue are lora_tiles.cuh's.
//
// Tiles: 64 x 64 outputs a CTA, R step 32, 256 threads, each a 4 x 4 micro-tile; X and W tiles
// stored R-major ([32][68] floats, two stages, 34,816 B), so a step of the inner loop is
// 2 LDS.128 + 16 FFMA. W is dequantized to fp32 as it is written to shared memory (8 elements
// a thread a step), with the next step's X and W loads in flight during the FMAs (register
// prefetch, as on the tensor path).
//
// Epilogue: tile_epilogue with 4 x 4 outputs a thread straight from the accumulators, r in
// chunks of 32 staged in the (then free) As / Bs stages: [32][68] floats hold a [32][64 + 4]
// L or R chunk exactly (lora_tiles.cuh).
//
// Invariants: the grid is 1-D over tiles (grid-stride, int64 tile indices); a barrier ends
// every step, and the epilogue's first writes to the stages follow the loop's last barrier.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lora_tiles.cuh"

namespace ftk {
namespace lora {
namespace {

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

}  // namespace

template <LoraMatmulMode Mode>
void launch_simt(const MmArgs& a, bool vecw, cudaStream_t stream) {
  const int grid = grid_for(ceil_div(a.M, kSBM) * ceil_div(a.C, kSBN));
  if (vecw) lora_matmul_simt_kernel<Mode, true><<<grid, kSThreads, 0, stream>>>(a);
  else lora_matmul_simt_kernel<Mode, false><<<grid, kSThreads, 0, stream>>>(a);
  FTK_CHECK_LAUNCH("lora_matmul_simt_kernel");
}

template void launch_simt<LoraMatmulMode::Forward>(const MmArgs&, bool, cudaStream_t);
template void launch_simt<LoraMatmulMode::GradInput>(const MmArgs&, bool, cudaStream_t);

}  // namespace lora
}  // namespace ftk
