// The quantization param structs built from what crosses the binding: pointers as uintptr_t,
// enum codes as int. Shared by bindings_cpu.cpp and bindings_cuda.cpp, whose functions take
// the same arguments and differ only in the last one (threads or a stream). A code outside
// its enum throws std::invalid_argument, which pybind11 raises as ValueError.
#pragma once

#include <cstdint>
#include <string>

#include "ftk/quant.h"

namespace ftk {
namespace args {

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

inline DType dtype(int d, const char* name) {
  FTK_CHECK_ARG(valid_dtype(d), std::string(name) + ": unknown dtype code " + std::to_string(d));
  return static_cast<DType>(d);
}

inline QuantType quant_type(int q) {
  FTK_CHECK_ARG(valid_quant_type(q), "quant_type: unknown code " + std::to_string(q));
  return static_cast<QuantType>(q);
}

inline Quantize4bitParams quantize_4bit(uintptr_t A, int64_t n, int dtype_code, int64_t blocksize,
                                        int quant_type_code, uintptr_t packed, uintptr_t absmax) {
  Quantize4bitParams p;
  p.A = ptr<const void>(A); p.n = n; p.dtype = dtype(dtype_code, "A");
  p.blocksize = blocksize; p.quant_type = quant_type(quant_type_code);
  p.packed = ptr<uint8_t>(packed); p.absmax = ptr<float>(absmax);
  return p;
}

inline Dequantize4bitParams dequantize_4bit(uintptr_t packed, int64_t n, int64_t blocksize, int quant_type_code,
                                            uintptr_t absmax, uintptr_t absmax_q, uintptr_t nested_absmax,
                                            uintptr_t nested_code, uintptr_t offset, int64_t nested_blocksize,
                                            int dtype_code, uintptr_t out) {
  Dequantize4bitParams p;
  p.packed = ptr<const uint8_t>(packed); p.n = n; p.blocksize = blocksize;
  p.quant_type = quant_type(quant_type_code);
  p.absmax = ptr<const float>(absmax); p.absmax_q = ptr<const uint8_t>(absmax_q);
  p.nested_absmax = ptr<const float>(nested_absmax); p.nested_code = ptr<const float>(nested_code);
  p.offset = ptr<const float>(offset); p.nested_blocksize = nested_blocksize;
  p.dtype = dtype(dtype_code, "dtype"); p.out = ptr<void>(out);
  return p;
}

inline QuantizeBlockwiseParams quantize_blockwise(uintptr_t A, int64_t n, int dtype_code, uintptr_t code,
                                                  int64_t blocksize, uintptr_t out, uintptr_t absmax) {
  QuantizeBlockwiseParams p;
  p.A = ptr<const void>(A); p.n = n; p.dtype = dtype(dtype_code, "A");
  p.code = ptr<const float>(code); p.blocksize = blocksize;
  p.out = ptr<uint8_t>(out); p.absmax = ptr<float>(absmax);
  return p;
}

inline DequantizeBlockwiseParams dequantize_blockwise(uintptr_t A, int64_t n, uintptr_t absmax, uintptr_t code,
                                                      int64_t blocksize, int dtype_code, uintptr_t out) {
  DequantizeBlockwiseParams p;
  p.A = ptr<const uint8_t>(A); p.n = n; p.absmax = ptr<const float>(absmax);
  p.code = ptr<const float>(code); p.blocksize = blocksize;
  p.dtype = dtype(dtype_code, "dtype"); p.out = ptr<void>(out);
  return p;
}

}  // namespace args
}  // namespace ftk
