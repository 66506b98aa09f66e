// Blockwise quantization: NF4/FP4 (4-bit, two per byte) and 8-bit with a 256-entry code.
//
// Format (the bitsandbytes CUDA contract; see README "Formats"):
//   * the input is flattened row-major; block b holds elements [b*bs, min((b+1)*bs, n));
//     absmax[b] = max |x| over the valid elements of the block (a partial last block too).
//   * xn = x * (1/absmax) in fp32; the 4-bit index is the number of fp32 midpoints of the
//     code that xn is strictly greater than (NaN is greater than none: index 0).
//   * packing: byte i = (q[2i] << 4) | q[2i+1]; an odd n pads the last low nibble with the
//     index of 0.0 scaled by its block (7 for NF4, 0 for FP4).
//   * dequantize: code[q] * absmax in fp32, then rounded once to the output dtype.
//   * double quantization stores absmax as 8-bit codes: absmax = code8[q] * nested_absmax
//     [b / nested_blocksize] + offset, the product and the sum each rounded to fp32.
// Non-finite input is defined, not an error: a block holding a NaN gets absmax NaN and a
// block holding an infinity gets absmax inf; either dequantizes to non-finite values.
#pragma once

#include "ftk/common.h"

namespace ftk {

enum class QuantType : int { NF4 = 0, FP4 = 1 };

inline bool valid_quant_type(int q) { return q == 0 || q == 1; }

inline bool valid_blocksize_4bit(int64_t bs) {
  return bs == 32 || bs == 64 || bs == 128 || bs == 256 || bs == 512 || bs == 1024 ||
         bs == 2048 || bs == 4096;
}

// 8-bit blockwise takes any power of two from 32 to 4096 (the nested absmax uses 256).
inline bool valid_blocksize_8bit(int64_t bs) { return valid_blocksize_4bit(bs); }

// The blocksize of double quantization: 256 fp32 absmax share one fp32 scale (bitsandbytes').
constexpr int64_t kNestedBlocksize = 256;

struct Quantize4bitParams {
  const void* A = nullptr;   // n elements of dtype
  int64_t n = 0;
  DType dtype = DType::Float32;
  int64_t blocksize = 64;
  QuantType quant_type = QuantType::NF4;
  uint8_t* packed = nullptr;  // (n + 1) / 2 bytes
  float* absmax = nullptr;    // ceil(n / blocksize) floats
};

// A 4-bit tensor (NF4/FP4) as the kernels read it. Any shape is viewed as rows x cols: cols its
// last dimension, rows the product of the others (1 x n for a 0-d or 1-d tensor); the elements
// are flattened row-major into quantization blocks as above, numel = rows * cols. The fused
// LoRA matmul reads it as the weight W (N x K = rows x cols).
struct Weight4bit {
  const uint8_t* packed = nullptr;  // (numel + 1) / 2 bytes
  int64_t rows = 0, cols = 0;
  int64_t blocksize = 64;
  QuantType quant_type = QuantType::NF4;
  // Plain: absmax (fp32, one per block). Double-quantized: absmax is null and absmax_q
  // (one 8-bit code per block), nested_absmax (one fp32 per nested block), nested_code
  // (256 fp32) and offset (one fp32, on the device) are set.
  const float* absmax = nullptr;
  const uint8_t* absmax_q = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  const float* offset = nullptr;
  int64_t nested_blocksize = kNestedBlocksize;

  int64_t numel() const { return rows * cols; }
};

struct Dequantize4bitParams {
  Weight4bit w;
  DType dtype = DType::Float32;
  void* out = nullptr;  // w.numel() elements of dtype
};

struct QuantizeBlockwiseParams {
  const void* A = nullptr;
  int64_t n = 0;
  DType dtype = DType::Float32;
  const float* code = nullptr;  // 256 fp32, sorted ascending
  int64_t blocksize = 256;
  uint8_t* out = nullptr;  // n bytes
  float* absmax = nullptr; // ceil(n / blocksize)
};

struct DequantizeBlockwiseParams {
  const uint8_t* A = nullptr;
  int64_t n = 0;
  const float* absmax = nullptr;
  const float* code = nullptr;
  int64_t blocksize = 256;
  DType dtype = DType::Float32;
  void* out = nullptr;
};

// Host-side checks shared by the CPU and CUDA launchers (Python checked first; this is the
// second line, so that nothing reachable from Python reads out of bounds).
inline void check(const Quantize4bitParams& p) {
  FTK_CHECK_ARG(p.n >= 0, "n must be >= 0");
  FTK_CHECK_ARG(valid_blocksize_4bit(p.blocksize), "blocksize must be one of 32, 64, ..., 4096");
  FTK_CHECK_ARG(valid_quant_type(static_cast<int>(p.quant_type)), "quant_type must be nf4 or fp4");
  FTK_CHECK_ARG(valid_dtype(static_cast<int>(p.dtype)), "A: dtype must be float32, float16 or bfloat16");
  if (p.n > 0) FTK_CHECK_ARG(p.A && p.packed && p.absmax, "A, packed and absmax must not be null");
}

inline void check(const Weight4bit& w) {
  FTK_CHECK_ARG(w.rows >= 0 && w.cols >= 0, "rows and cols must be >= 0");
  FTK_CHECK_ARG(valid_blocksize_4bit(w.blocksize), "blocksize must be one of 32, 64, ..., 4096");
  FTK_CHECK_ARG(valid_quant_type(static_cast<int>(w.quant_type)), "quant_type must be nf4 or fp4");
  if (w.numel() == 0) return;
  FTK_CHECK_ARG(w.packed != nullptr, "packed must not be null");
  if (w.absmax == nullptr) {
    FTK_CHECK_ARG(w.absmax_q && w.nested_absmax && w.nested_code && w.offset,
                  "absmax: either fp32 absmax or all of the double-quantization tensors");
    FTK_CHECK_ARG(valid_blocksize_8bit(w.nested_blocksize), "nested_blocksize must be one of 32, ..., 4096");
  }
}

inline void check(const Dequantize4bitParams& p) {
  check(p.w);
  FTK_CHECK_ARG(valid_dtype(static_cast<int>(p.dtype)), "dtype must be float32, float16 or bfloat16");
  if (p.w.numel() > 0) FTK_CHECK_ARG(p.out != nullptr, "out must not be null");
}

inline void check(const QuantizeBlockwiseParams& p) {
  FTK_CHECK_ARG(p.n >= 0, "n must be >= 0");
  FTK_CHECK_ARG(valid_blocksize_8bit(p.blocksize), "blocksize must be one of 32, 64, ..., 4096");
  FTK_CHECK_ARG(valid_dtype(static_cast<int>(p.dtype)), "A: dtype must be float32, float16 or bfloat16");
  if (p.n > 0) FTK_CHECK_ARG(p.A && p.code && p.out && p.absmax, "A, code, out and absmax must not be null");
}

inline void check(const DequantizeBlockwiseParams& p) {
  FTK_CHECK_ARG(p.n >= 0, "n must be >= 0");
  FTK_CHECK_ARG(valid_blocksize_8bit(p.blocksize), "blocksize must be one of 32, 64, ..., 4096");
  FTK_CHECK_ARG(valid_dtype(static_cast<int>(p.dtype)), "dtype must be float32, float16 or bfloat16");
  if (p.n > 0) FTK_CHECK_ARG(p.A && p.absmax && p.code && p.out, "A, absmax, code and out must not be null");
}

// ---- per-element math, identical on host and device ---------------------------------------

// NF4 index: the count of code midpoints that x is strictly above. The midpoints are the
// fp32 values (c[i] + c[i+1]) / 2, equal to the literals of bitsandbytes' dQuantizeNF4.
// Branch-free, so the CPU loop vectorises; NaN compares false everywhere and gives 0.
FTK_HD uint32_t quantize_nf4(float x) {
  return (uint32_t)(x > -0.8480963706970215f) + (uint32_t)(x > -0.6106328964233398f) +
         (uint32_t)(x > -0.4599952697753906f) + (uint32_t)(x > -0.33967941999435425f) +
         (uint32_t)(x > -0.23460739850997925f) + (uint32_t)(x > -0.13791173696517944f) +
         (uint32_t)(x > -0.045525018125772476f) + (uint32_t)(x > 0.03979014977812767f) +
         (uint32_t)(x > 0.120255246758461f) + (uint32_t)(x > 0.2035212516784668f) +
         (uint32_t)(x > 0.2920137643814087f) + (uint32_t)(x > 0.3893125355243683f) +
         (uint32_t)(x > 0.5016634464263916f) + (uint32_t)(x > 0.6427869200706482f) +
         (uint32_t)(x > 0.8614784479141235f);
}

// FP4 (1 sign, 2 exponent, 1 mantissa bits; code = value / 12): sign bit 8 for x < 0, then
// the magnitude rank k (thresholds are bitsandbytes' dQuantizeFP4 literals, which are not
// exact fp32 midpoints) mapped to the bit pattern by the nibble table 0x32547610.
FTK_HD uint32_t quantize_fp4(float x) {
  const uint32_t sign = x < 0.0f ? 8u : 0u;
  const float a = x < 0.0f ? -x : x;  // NaN stays NaN and ranks 0
  const uint32_t k = (uint32_t)(a > 0.00260417f) + (uint32_t)(a > 0.0859375f) +
                     (uint32_t)(a > 0.20833333f) + (uint32_t)(a > 0.29166667f) +
                     (uint32_t)(a > 0.4166667f) + (uint32_t)(a > 0.583333f) +
                     (uint32_t)(a > 0.8333333f);
  return sign | ((0x32547610u >> (4u * k)) & 0xFu);
}

// The 8-bit code search of bitsandbytes' dQuantize<0>: a 7-step binary search over the
// sorted 256-entry code, then the nearer of the bracketing entries, ties towards the pivot.
FTK_HD uint32_t quantize_8bit(const float* code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) {
    const float midpoint = (upper + val) * 0.5f;
    return x > midpoint ? (uint32_t)upper_pivot : (uint32_t)pivot;
  }
  const float midpoint = (lower + val) * 0.5f;
  return x < midpoint ? (uint32_t)lower_pivot : (uint32_t)pivot;
}

// Code tables for dequantization, indexed by the 4-bit pattern. FP4 index 8 is -0.0, as
// the sign-times-magnitude of bitsandbytes' dDequantizeFP4Tree gives.
#define FTK_NF4_CODE                                                                       \
  {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,               \
   -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,              \
   0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f, \
   0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f}
#define FTK_FP4_CODE                                                                       \
  {0.0f, 0.005208333333f, 0.6666666667f, 1.0f, 0.3333333333f, 0.5f, 0.1666666667f, 0.25f, \
   -0.0f, -0.005208333333f, -0.6666666667f, -1.0f, -0.3333333333f, -0.5f, -0.1666666667f,  \
   -0.25f}

// ---- launchers -----------------------------------------------------------------------------
// CPU: num_threads workers (the caller passes torch.get_num_threads()), each kernel at the
// instruction-set level of cpu_isa.h.
void quantize_4bit_cpu(const Quantize4bitParams& p, int num_threads);
void dequantize_4bit_cpu(const Dequantize4bitParams& p, int num_threads);
// Elements [begin, end) only, into p.out (holding element begin at index 0); p.w.numel() is
// the whole tensor's size, which places the last, partial block.
void dequantize_4bit_range_cpu(const Dequantize4bitParams& p, int64_t begin, int64_t end, int num_threads);
// Columns [col0, col1) of the rows x cols weight into p.out as a rows x (col1 - col0) matrix:
// a column tile, for the fused LoRA's 16-bit grad-input product (dY·W tile by tile over K).
void dequantize_4bit_cols_cpu(const Dequantize4bitParams& p, int64_t col0, int64_t col1, int num_threads);
void quantize_blockwise_cpu(const QuantizeBlockwiseParams& p, int num_threads);
void dequantize_blockwise_cpu(const DequantizeBlockwiseParams& p, int num_threads);

}  // namespace ftk
