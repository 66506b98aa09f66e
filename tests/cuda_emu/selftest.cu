// The emulation's own test (tests/test_cuda_emulated.py builds it with build.py's flags): CUDA
// programs whose results are known, then one planted bug per check the emulation makes.
//   selftest ok        every positive check; exit 0, or 1 naming the first that failed
//   selftest <bug>     a kernel with that bug; the emulation must abort naming it
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

int failures = 0;
void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL %s\n", what);
    ++failures;
  }
}

// A block sum through shared memory; threads past n return before the barrier.
__global__ void block_sum(const int* x, int n, int* out) {
  __shared__ int s[128];
  const int t = threadIdx.x;
  s[t] = 0;
  if (blockIdx.x * blockDim.x + t >= static_cast<unsigned>(n)) return;
  s[t] = x[blockIdx.x * blockDim.x + t];
  __syncthreads();
  if (t == 0) {
    int sum = 0;
    for (int i = 0; i < 128; ++i) sum += s[i];
    out[blockIdx.x] = sum;
  }
}

__global__ void warp_ops(int* out) {
  const int lane = threadIdx.x;
  int v = lane + 1;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
  out[lane] = v;                                                        // 528 everywhere
  out[32 + lane] = __shfl_sync(0xFFFFFFFFu, lane * 10, 3);               // 30
  out[64 + lane] = __shfl_up_sync(0xFFFFFFFFu, lane, 1, 8);              // lane - 1, own at segment starts
  out[96 + lane] = __shfl_down_sync(0xFFFFFFFFu, lane, 2, 8);            // lane + 2 inside each 8
  out[128 + lane] = static_cast<int>(__ballot_sync(0xFFFFFFFFu, lane % 3 == 0));
  out[160 + lane] = __any_sync(0xFFFFFFFFu, lane == 31) + 2 * __all_sync(0xFFFFFFFFu, lane < 31);
  if (lane < 16) out[192 + lane] = __shfl_xor_sync(0x0000FFFFu, lane, 1);  // a half-warp mask
  __syncwarp();
}

__global__ void wmma_tile(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 1.0f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

__global__ void grid_stride(int* out, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) out[i] = i * 2;
}

// ---- planted bugs ---------------------------------------------------------------------------

__global__ void divergent_barrier() {
  if (threadIdx.x % 2) __syncthreads();
  else __syncthreads();
}

__global__ void deadlock_in_a_branch() {
  if (threadIdx.x == 0) {
    __syncwarp();  // lane 0 waits for 31 lanes that are at the barrier below
  }
  __syncthreads();
}

__global__ void mask_names_a_returned_lane(int* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, static_cast<int>(threadIdx.x), 1);
}

__global__ void wmma_misaligned(const __nv_bfloat16* a) {
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::row_major> fa;
  nvcuda::wmma::load_matrix_sync(fa, a + 1, 16);
}

__global__ void wmma_bad_lead_dimension(const __nv_bfloat16* a) {
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::row_major> fa;
  nvcuda::wmma::load_matrix_sync(fa, a, 20);
}

__global__ void misaligned_vector(const float* x, float* out) {
  *reinterpret_cast<float4*>(out) = *reinterpret_cast<const float4*>(x + 1);
}

__global__ void out_of_bounds(float* x, int n) { x[n + threadIdx.x] = 1.0f; }

int positive() {
  std::vector<int> x(300), sums(3, -1);
  for (int i = 0; i < 300; ++i) x[i] = i;
  block_sum<<<3, 128, 0, nullptr>>>(x.data(), 300, sums.data());
  expect(cudaGetLastError() == cudaSuccess, "block_sum launch");
  expect(sums[0] == 8128 && sums[1] == 24512 && sums[2] == 12210, "block sums");

  std::vector<int> w(224, -1);
  warp_ops<<<1, 32, 0, nullptr>>>(w.data());
  bool ok = true;
  uint32_t every3 = 0;
  for (int l = 0; l < 32; l += 3) every3 |= 1u << l;
  for (int l = 0; l < 32; ++l) {
    ok &= w[l] == 528 && w[32 + l] == 30;
    ok &= w[64 + l] == (l % 8 == 0 ? l : l - 1);
    ok &= w[96 + l] == (l % 8 < 6 ? l + 2 : l);
    ok &= static_cast<uint32_t>(w[128 + l]) == every3 && w[160 + l] == 1;
    if (l < 16) ok &= w[192 + l] == (l ^ 1);
  }
  expect(ok, "shuffles and votes");

  std::vector<__nv_bfloat16> a(256), b(256);
  std::vector<float> c(256, -1.0f);
  for (int i = 0; i < 256; ++i) {
    a[i] = __float2bfloat16_rn(std::sin(0.1f * i));
    b[i] = __float2bfloat16_rn(std::cos(0.07f * i));
  }
  alignas(32) static __nv_bfloat16 as[256], bs[256];
  alignas(32) static float cs[256];
  std::memcpy(as, a.data(), sizeof as);
  std::memcpy(bs, b.data(), sizeof bs);
  wmma_tile<<<1, 32, 0, nullptr>>>(as, bs, cs);
  double worst = 0;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      double ref = 1.0;  // col_major B: B(k, j) = b[j * 16 + k]
      for (int k = 0; k < 16; ++k) ref += double(__bfloat162float(as[i * 16 + k])) * __bfloat162float(bs[j * 16 + k]);
      worst = std::fmax(worst, std::fabs(ref - cs[i * 16 + j]));
    }
  expect(worst < 1e-5, "wmma against an fp64 product");

  std::vector<int> g(1000, -1);
  grid_stride<<<3, 64, 0, nullptr>>>(g.data(), 1000);
  ok = true;
  for (int i = 0; i < 1000; ++i) ok &= g[i] == 2 * i;
  expect(ok, "grid-stride loop");

  grid_stride<<<1, 2048, 0, nullptr>>>(g.data(), 1);
  expect(cudaGetLastError() == cudaErrorInvalidConfiguration, "2048 threads: invalid configuration");
  expect(cudaGetLastError() == cudaSuccess, "the error is cleared once read");

  expect(__float2half_rn(65520.0f).bits_ == 0x7C00 && __float2bfloat16_rn(1.00390625f).bits_ == 0x3F80 &&
             __float2bfloat16_rn(1.01171875f).bits_ == 0x3F82,
         "round to nearest even");
  return failures ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "ok";
  alignas(32) static __nv_bfloat16 tile[512];
  alignas(16) static float buf[64];
  std::vector<int> out(32);
  if (!std::strcmp(mode, "ok")) return positive();
  if (!std::strcmp(mode, "divergent-barrier")) divergent_barrier<<<1, 64, 0, nullptr>>>();
  else if (!std::strcmp(mode, "deadlock")) deadlock_in_a_branch<<<1, 32, 0, nullptr>>>();
  else if (!std::strcmp(mode, "returned-lane")) mask_names_a_returned_lane<<<1, 32, 0, nullptr>>>(out.data());
  else if (!std::strcmp(mode, "wmma-misaligned")) wmma_misaligned<<<1, 32, 0, nullptr>>>(tile);
  else if (!std::strcmp(mode, "wmma-lead-dimension")) wmma_bad_lead_dimension<<<1, 32, 0, nullptr>>>(tile);
  else if (!std::strcmp(mode, "misaligned-vector")) misaligned_vector<<<1, 1, 0, nullptr>>>(buf, buf + 8);
  else if (!std::strcmp(mode, "out-of-bounds")) {
    std::vector<float> x(100);
    out_of_bounds<<<1, 4, 0, nullptr>>>(x.data(), 100);
  } else {
    std::printf("unknown mode %s\n", mode);
    return 2;
  }
  std::printf("the planted bug %s was not reported\n", mode);
  return 0;
}
