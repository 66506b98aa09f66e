// For the .cu files only: the device storage type of each ftk::DType.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ftk/common.h"

namespace ftk {

// Calls fn(T{}) with T the device storage type of dtype (float, __half, __nv_bfloat16).
template <typename Fn>
void with_dtype(DType d, Fn&& fn) {
  switch (d) {
    case DType::Float32: fn(float{}); break;
    case DType::Float16: fn(__half{}); break;
    case DType::BFloat16: fn(__nv_bfloat16{}); break;
  }
}

}  // namespace ftk
