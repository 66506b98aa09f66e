// Fused LoRA matmul, large M, fp16/bf16: tensor cores (nvcuda::wmma 16x16x16, fp32
// accumulators). The GEMM shape and the mode table are lora.cu's; W addressing, X loads and the
// epilogue are lora_tiles.cuh's.
//
// Tiles: a CTA of 256 threads computes a 128 (M) x 64 (C) tile, 32 of R per step; 8 warps as
// 4 x 2, each 32 x 32 (2 x 2 fragments). Two shared-memory stages with register prefetch: the
// global loads of step k+1 (X: 2 x 16 bytes a thread; W: 4 packed bytes + one absmax a thread)
// are issued before the MMAs of step k and written to the other stage after them; the 4-bit ->
// X's dtype dequantization happens at that write (8 elements a thread a step, code table in
// shared memory: 16 words in 16 banks, never a conflict), so no dequantized W exists in global
// memory.
// NOTE: W is rounded to X's dtype before the MMA, exactly what torch does when it dequantizes
// to bf16/fp16 and multiplies (the baseline the tests hold us to); the fp32 and decode paths
// keep W in fp32.
//   Why 128 x 64 and not 64 x 128: dequantization costs ~4 instructions an element and every
//   W element is dequantized once per M tile (M / BM times in all), while an X element is a
//   plain 16-byte copy (~0.25 instructions). 128 x 64 dequantizes one 8-element group per
//   thread a step (~35 instructions) against 16 HMMA.16816 per warp; 64 x 128 would double it.
//
// Shared memory (static): a stage is 128 x 40 (X) + 64 x 40 (Forward) or 32 x 72 (GradInput)
// 16-bit elements = 15,360 / 14,848 B, two stages 30,720 B; after the loop the fp32 C tile
// (128 x 68 x 4 = 34,816 B) overlays them and the epilogue's L/R chunks (rank chunk 16:
// 16 x 132 + 16 x 68 floats = 12,800 B) follow it, so C stays in shared memory through the
// rank-r loop (holding it in registers as well spilled at the 128-register cap of 2 CTAs/SM).
// With the code tables (1,088 B) a CTA takes 48,704 B of the 49,152 B static limit (4 CTAs
// an H100 SM by shared memory; registers allow 2). Rows of 40 / 72 elements (80 / 144 B):
// the 8 16-byte rows an ldmatrix phase reads fall in 8 distinct 4-bank groups (no conflict),
// and the lead dimension stays a multiple of 8 elements with 32-byte aligned fragment starts,
// as wmma needs.
//
// Epilogue: tile_epilogue with 8 x 4 outputs a thread, its C values read back from the C tile,
// r in chunks of 16 (lora_tiles.cuh).
//
// Invariants: the grid is 1-D over tiles (grid-stride, int64 tile indices); a barrier ends
// every step, so stage s^1 is written only after every warp has read it, and the C tile
// overwrites the stages only after the loop's last barrier.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <type_traits>

#include "lora_tiles.cuh"

namespace ftk {
namespace lora {
namespace {

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

}  // namespace

template <typename T, LoraMatmulMode Mode>
void launch_tc(const MmArgs& a, bool vecw, cudaStream_t stream) {
  const int grid = grid_for(ceil_div(a.M, kTcBM) * ceil_div(a.C, kTcBN));
  if (vecw) lora_matmul_tc_kernel<T, Mode, true><<<grid, kTcThreads, 0, stream>>>(a);
  else lora_matmul_tc_kernel<T, Mode, false><<<grid, kTcThreads, 0, stream>>>(a);
  FTK_CHECK_LAUNCH("lora_matmul_tc_kernel");
}

template void launch_tc<__half, LoraMatmulMode::Forward>(const MmArgs&, bool, cudaStream_t);
template void launch_tc<__half, LoraMatmulMode::GradInput>(const MmArgs&, bool, cudaStream_t);
template void launch_tc<__nv_bfloat16, LoraMatmulMode::Forward>(const MmArgs&, bool, cudaStream_t);
template void launch_tc<__nv_bfloat16, LoraMatmulMode::GradInput>(const MmArgs&, bool, cudaStream_t);

}  // namespace lora
}  // namespace ftk
