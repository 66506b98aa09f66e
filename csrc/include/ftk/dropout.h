// The hashed dropout mask shared by the fused ops (lora.h, reft.h): a hash of (seed, row,
// column), so a backward pass regenerates the mask instead of storing a bit per element. Every
// backend (reference.py, the CPU and CUDA kernels, Triton) computes exactly this, so a seed
// gives one mask everywhere:
//   key      = mix32(lo32(seed) ^ mix32(hi32(seed)))
//   row_key  = mix32(key ^ lo32(row))
//   keep     = (mix32(row_key ^ mix32(lo32(col))) >> 8) >= threshold,  threshold = floor(p·2^24)
//   drop(v)  = keep ? v · scale : 0,  scale = fp32(1 / (1 - p)), the product rounded to fp32.
// mix32 is the "lowbias32" finaliser (bias ~0.17 against 0.21 for murmur3's fmix32): each
// output bit flips with probability ~1/2 when one input bit does, which is all dropout needs.
#pragma once

#include <cstdint>

#include "ftk/common.h"

namespace ftk {

FTK_HD uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x846CA68Bu;
  h ^= h >> 16;
  return h;
}

FTK_HD uint32_t dropout_key(uint64_t seed) {
  return mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(seed >> 32)));
}

FTK_HD uint32_t dropout_row_key(uint32_t key, int64_t row) { return mix32(key ^ static_cast<uint32_t>(row)); }

FTK_HD bool dropout_keep(uint32_t row_key, int64_t col, uint32_t threshold) {
  return (mix32(row_key ^ mix32(static_cast<uint32_t>(col))) >> 8) >= threshold;
}

// p in [0, 1) -> the 24-bit threshold (Python: int(p * 2**24)).
inline uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(p * 16777216.0); }

struct Dropout {
  bool enabled = false;  // false: drop(v) = v
  uint64_t seed = 0;
  uint32_t threshold = 0;
  float scale = 1.0f;
};

}  // namespace ftk
