// Scalar and AVX-512 conversions to float32 shared by the CPU kernels (the attention kernels,
// the fused sampler, the w8a8 linear's activation quantization).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "kv_int8.h"

static inline float to_f32(float x) { return x; }
static inline float to_f32(c10::Half x) { return static_cast<float>(x); }
static inline float to_f32(c10::BFloat16 x) {
  // bf16 is the top half of an fp32: a shift the compiler vectorises, unlike c10's conversion.
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#if defined(__AVX512F__)
#include <immintrin.h>

// 16 int8 codes as float32 lanes (not scaled).
static inline __m512 load_f32x16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// 16 consecutive values as float32 lanes.
static inline __m512 load_f32x16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load_f32x16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
static inline __m512 load_f32x16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif
