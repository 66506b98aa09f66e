// The fused LoRA launchers (lora_cuda.h): the checks, the arguments the kernels take, and the
// choice of kernel family for each call. The kernels are one file a family, each opening with
// its own notes:
//   lora_tc.cu          large M, fp16/bf16: tensor cores (wmma), 128 x 64 tiles
//   lora_simt.cu        large M, fp32: SIMT FMA, 64 x 64 tiles
//   lora_decode_fwd.cu  small M (<= 16), Forward: W streamed once, a warp per 2 or 4 rows of W
//   lora_decode_bwd.cu  small M (<= 8), GradInput: W streamed once, a CTA per 32 columns of K
//   lora_dropout.cu     drop(x) as fp32, element-wise
// and lora_tiles.cuh holds what they share: W addressing, X loads, the arguments, the epilogue.
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
// Which family: small M takes a decode kernel, larger M the tiled kernel of X's dtype.
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

#include <cstdint>

#include "ftk/cuda_util.cuh"
#include "ftk/lora.h"
#include "ftk/lora_cuda.h"
#include "lora_tiles.cuh"

namespace ftk {
namespace {

using lora::MmArgs;

int log2_exact(int64_t v) {
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

// Decode-path thresholds (rows of X); the reasoning is in the comment at the top of the file.
constexpr int64_t kDecodeMaxMForward = 16;
constexpr int64_t kDecodeMaxMGradInput = 8;

template <typename T, LoraMatmulMode Mode>
void launch_matmul(const MmArgs& a, bool vecw_large, bool vecw_decode, cudaStream_t stream) {
  constexpr bool kFwd = Mode == LoraMatmulMode::Forward;
  if (kFwd && a.M <= kDecodeMaxMForward) {
    lora::launch_decode_fwd<T>(a, vecw_decode, stream);
  } else if (!kFwd && a.M <= kDecodeMaxMGradInput) {
    lora::launch_decode_bwd<T>(a, vecw_decode, stream);
  } else if constexpr (sizeof(T) == 4) {
    lora::launch_simt<Mode>(a, vecw_large, stream);
  } else {
    lora::launch_tc<T, Mode>(a, vecw_large, stream);
  }
}

}  // namespace

// ---- launchers -----------------------------------------------------------------------------

void lora_dropout_cuda(const LoraDropoutParams& p, cudaStream_t stream) {
  check(p);
  const int64_t n = p.rows * p.cols;
  if (n == 0) return;
  if (!p.dropout.enabled && p.in == p.out) return;  // fp32 in place and drop(v) = v: nothing to do
  lora::launch_dropout(p, stream);
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
  const bool w_empty = p.W.numel() == 0;  // then R == 0 and W is never read
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
  const auto vecw = [&](int64_t G) { return !w_empty && p.W.cols % G == 0 && lora::aligned(p.W.packed, G / 2); };
  const bool vecw_large = vecw(8);
  const bool vecw_decode = fwd ? vecw(16) : vecw(4);

  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    a.xvec = lora::aligned(p.X, 16) && R % (16 / static_cast<int64_t>(sizeof(T))) == 0;
    if (fwd) launch_matmul<T, LoraMatmulMode::Forward>(a, vecw_large, vecw_decode, stream);
    else launch_matmul<T, LoraMatmulMode::GradInput>(a, vecw_large, vecw_decode, stream);
  });
}

}  // namespace ftk
