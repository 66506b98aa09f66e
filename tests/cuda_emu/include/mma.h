// nvcuda::wmma for the shapes the kernels use (16 x 16 x 16, fp16/bf16 inputs, fp32
// accumulators), with a reference matrix multiply.
//
// A fragment holds its whole tile in every lane (as fp32: 16-bit inputs convert exactly), and
// each lane owns 8 of the 256 accumulator elements (element e = lane + 32 * i, row-major):
// mma_sync computes the owned elements, store_matrix_sync writes them, so the warp as a whole
// writes the tile once, as on the GPU. Every *_sync call is a warp collective over all 32 lanes,
// and the lanes must pass the same pointer, lead dimension and layout. Loads and stores check
// what the hardware needs: a 32-byte aligned pointer and a lead dimension that is a multiple of
// 16 bytes. mma_sync is an fp32 sum in k order: the tensor cores' own rounding of the sum is
// not reproduced, so results agree to fp32 accumulation error, not bit for bit.
// There is no x[] / num_elements: the element-to-lane map is not CUDA's, and a kernel that
// indexed it would compile here with a meaning it does not have on the GPU.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "ftk_emu.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
inline float widen(float v) { return v; }
inline float widen(__half v) { return __half2float(v); }
inline float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Use, int M, int N, int K> struct Dims;
template <int M, int N, int K> struct Dims<matrix_a, M, N, K> { static constexpr int R = M, C = K; };
template <int M, int N, int K> struct Dims<matrix_b, M, N, K> { static constexpr int R = K, C = N; };
template <int M, int N, int K> struct Dims<accumulator, M, N, K> { static constexpr int R = M, C = N; };

// The warp collective every *_sync call is, with the arguments each lane must agree on.
inline void collective(const char* what, const void* p, unsigned ldm, int layout) {
  ftk_emu::warp_collective(0xFFFFFFFFu, what, "", 0, reinterpret_cast<uintptr_t>(p),
                           (uint64_t{ldm} << 1) | static_cast<uint64_t>(layout));
  for (int l = 0; l < 32; ++l)
    if (ftk_emu::word_of(l) != reinterpret_cast<uintptr_t>(p) ||
        ftk_emu::word2_of(l) != ((uint64_t{ldm} << 1) | static_cast<uint64_t>(layout)))
      ftk_emu::fail("%s: lanes pass different pointers, lead dimensions or layouts (lane %d differs)", what, l);
}

template <typename T>
void check_memory(const char* what, const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32)
    ftk_emu::fail("%s: pointer %p is not 32-byte aligned", what, static_cast<const void*>(p));
  if ((ldm * sizeof(T)) % 16)
    ftk_emu::fail("%s: lead dimension %u elements (%zu bytes) is not a multiple of 16 bytes", what, ldm,
                  ldm * sizeof(T));
}

inline int lane() { return ftk_emu::lane_of(ftk_emu::tls.tid); }
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation has the 16 x 16 x 16 shape only");
  static constexpr int kRows = detail::Dims<Use, M, N, K>::R, kCols = detail::Dims<Use, M, N, K>::C;
  float v[kRows * kCols];  // row-major tile
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float value) {
  for (float& e : f.v) e = value;
}

// matrix_a / matrix_b: the layout is the fragment's.
template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  constexpr bool kRowMajor = std::is_same<Layout, row_major>::value;
  static_assert(kRowMajor || std::is_same<Layout, col_major>::value, "matrix_a / matrix_b need a layout");
  detail::check_memory("wmma::load_matrix_sync", p, ldm);
  detail::collective("wmma::load_matrix_sync", p, ldm, kRowMajor ? 0 : 1);
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::kRows; ++r)
    for (int c = 0; c < F::kCols; ++c)
      f.v[r * F::kCols + c] = detail::widen(kRowMajor ? p[r * ldm + c] : p[c * ldm + r]);
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t layout) {
  detail::check_memory("wmma::load_matrix_sync", p, ldm);
  detail::collective("wmma::load_matrix_sync", p, ldm, layout == mem_row_major ? 0 : 1);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.v[r * N + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  detail::collective("wmma::mma_sync", nullptr, 0, 0);
  const int lane = detail::lane();
  float out[8];
  for (int i = 0; i < 8; ++i) {
    const int e = lane + 32 * i, r = e / N, col = e % N;
    float acc = c.v[e];
    for (int k = 0; k < K; ++k) acc += a.v[r * K + k] * b.v[k * N + col];
    out[i] = acc;
  }
  for (int i = 0; i < 8; ++i) d.v[lane + 32 * i] = out[i];  // d may alias c
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  detail::check_memory("wmma::store_matrix_sync", p, ldm);
  detail::collective("wmma::store_matrix_sync", p, ldm, layout == mem_row_major ? 0 : 1);
  const int lane = detail::lane();
  for (int i = 0; i < 8; ++i) {
    const int e = lane + 32 * i, r = e / N, c = e % N;
    (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[e];
  }
}

}  // namespace wmma
}  // namespace nvcuda
