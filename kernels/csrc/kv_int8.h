// The int8 KV cache's row format, shared by its writer (layer_ops_cpu.cpp) and readers (the
// attention kernels). Plain C++, no vector code: the writer is built without FMA contraction.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// The int8 KV cache (`kv_cache_dtype = "int8"`): a cache row is one token of one KV head, D int8
// codes and then its float32 scale in 4 bytes, so the cache is [num_blocks, Hkv, block_size, D + 4]
// int8 and a value is code * scale. Symmetric, per token and head: scale = max|x| / 127 and
// code = round-half-even(x * (127 / max|x|)), all in float32, as kernels/paged_attention_ref.py
// `quantize_kv` does, so both paths write the same bytes. Why the scale inside the row: the
// kernels' block addressing and prefetch stay one contiguous run per (block, head), and the
// layer-loop ABI needs no extra tensors.
constexpr int64_t kKvScaleBytes = 4;

static inline float kv_row_scale(const int8_t* row, int64_t head_dim) {
  float s;
  std::memcpy(&s, row + head_dim, sizeof s);
  return s;
}

// A row's D values in float32 (code * scale): the readers' scalar paths. One multiply each, so the
// no-contraction rule above does not matter here.
static inline void kv_dequantize_row(const int8_t* row, int64_t head_dim, float* out) {
  const float s = kv_row_scale(row, head_dim);
  for (int64_t d = 0; d < head_dim; ++d) out[d] = static_cast<float>(row[d]) * s;
}

// x[0 .. D) (the rotated key or the value, already rounded to the model dtype) -> row's codes and scale.
static inline void kv_quantize_row(const float* x, int64_t head_dim, int8_t* row) {
  float amax = 0.f;
  for (int64_t d = 0; d < head_dim; ++d) amax = std::max(amax, std::abs(x[d]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  for (int64_t d = 0; d < head_dim; ++d) {
    // |x * inv| <= 127 up to one rounding; the clamp keeps it a code. nearbyint: half to even.
    const float c = std::nearbyint(x[d] * inv);
    row[d] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, c)));
  }
  const float scale = amax / 127.f;
  std::memcpy(row + head_dim, &scale, sizeof scale);
}
