// Paged decode attention for CPU: one query token per sequence, reading K and V straight from
// the paged cache (no gather copy), fp32 accumulation whatever the cache dtype.
//
// Why: the torch reference gathers each sequence's context into a padded contiguous batch and
// then runs two matmuls, so every cached byte crosses memory three times (read, write, read)
// and padding is read too. Here each K and V byte is read once. Decode attention is bound by
// memory bandwidth: at SmolLM2-135M sizes (3 KV heads x 64 dims, bf16) a 64-sequence batch
// with 450-token contexts reads 22 MB of K/V per layer.
//
// Layout: cache [num_blocks, Hkv, block_size, D] of q's dtype, or [num_blocks, Hkv, block_size, D + 4]
// int8 (the int8 KV cache: D codes and a float32 scale a row, kv_int8.h); block_tables
// [B, max_blocks] (int64); context_lens [B] (int64); q [B, H, D]; out [B, H, D]. One task per
// (sequence, KV head): its g = H / Hkv query heads share every K/V row they read.
//
// The int8 cache halves the bytes this kernel reads (64 + 4 against 128 a row at D = 64), and the
// kernel is bound by them. Its scales are applied outside the inner products: to each block's 16
// scores (K) and to each softmax weight (V), so the codes are only widened, never multiplied.
#include <torch/extension.h>
#include "kernel_abi.h"
#include <ATen/Parallel.h>
#include <omp.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_vec.h"

#ifndef LLMSERVE_BLOCKED
#define LLMSERVE_BLOCKED 1  // -DLLMSERVE_BLOCKED=0 builds the plain loops only, for comparison
#endif

// Elements of one cache row: D, or D codes and the 4 bytes of their scale.
template <typename KV, int D>
constexpr int64_t row_stride() {
  return std::is_same_v<KV, int8_t> ? D + kKvScaleBytes : D;
}

#if defined(__AVX512F__)
#include <immintrin.h>
// AVX-512 paths for head sizes that are a multiple of 16, on a block of up to 16 cached tokens:
// each K/V row is read once and reused by all g query heads. Why: the plain loops below reduce
// every (token, head) dot product horizontally, ~10 instructions each, which made this kernel
// compute-bound (bf16 read K/V at ~14 GB/s, below the ~25 GB/s memory can do). Here 16 dot
// products are reduced together by a transpose-add tree (45 instructions for 16), bf16 K rows go
// straight into `vdpbf16ps`, the softmax uses a vector exp, and the P.V accumulators stay in
// registers. Measured on one core at 64 sequences x 300 tokens, 30 layers, bf16 (2026-12-01):
// 106 ms -> 56 ms of CPU time, of which QK ~60%, softmax ~7%, P.V ~33%; what is left is mostly
// waiting on memory (one core pulls ~10 GB/s).

// r[i] = sum of the 16 lanes of v[i], i = 0..15.
static inline __m512 reduce16(const __m512* v) {
  __m512 w[8], x[4], y[2];
  for (int k = 0; k < 8; ++k)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    w[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {  // per 128-bit lane: tokens 4k..4k+3, partial over that lane
    const __m512d c = _mm512_castps_pd(w[2 * k]), d = _mm512_castps_pd(w[2 * k + 1]);
    x[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)), _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
  }
  for (int k = 0; k < 2; ++k)  // lanes [x0.L0+L1, x0.L2+L3, x1.L0+L1, x1.L2+L3]
    y[k] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
}

// exp for the softmax, 16 lanes: exp(x) = 2^k * exp(r), k = round(x / ln 2), |r| <= ln 2 / 2, exp(r)
// by its Taylor polynomial to degree 6 (truncation error r^7 / 7! < 7e-8 relative, below fp32's
// 6e-8 ulp plus one rounding). Why our own: glibc's vector expf is only used when gcc vectorises
// the loop, which it did not here, and the scalar expf made the softmax cost as much as QK.
static inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  // exp(-104) is 0 in fp32; avoids inf - inf below
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x);  // ln 2 in two parts:
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187e-06f), r);     // k * hi is exact
  __m512 y = _mm512_set1_ps(1.f / 720.f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f / 120.f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f / 24.f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f / 6.f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.5f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(y, k);  // y * 2^k, flushing to 0 far below the normal range
}

// s[0 .. len) = softmax(s[0 .. len)) in place.
static inline void softmax16(float* s, int64_t len) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 16 <= len; t += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + t));
  const __mmask16 tail = static_cast<__mmask16>((1u << (len - t)) - 1u);
  m = _mm512_mask_max_ps(m, tail, m, _mm512_maskz_loadu_ps(tail, s + t));
  const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  __m512 sum = _mm512_setzero_ps();
  for (t = 0; t + 16 <= len; t += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), vmax));
    _mm512_storeu_ps(s + t, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (tail) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + t), vmax));
    _mm512_mask_storeu_ps(s + t, tail, e);
    sum = _mm512_mask_add_ps(sum, tail, sum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
  for (t = 0; t + 16 <= len; t += 16) _mm512_storeu_ps(s + t, _mm512_mul_ps(_mm512_loadu_ps(s + t), inv));
  if (tail) _mm512_mask_storeu_ps(s + t, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, s + t), inv));
}

// Block tables scatter a context over the pool, so the hardware prefetcher loses the stream at
// every block boundary: ask for blocks ahead while this one is computed. Into L2 (T1), not L1:
// a 16-token block of one KV head is 32 lines, and requests into L1 stall on its few miss
// buffers, so T0 could not keep more than ~2 blocks in flight. Measured on a Zen 4 core pair,
// 64 sequences x 126 tokens, 30 layers of bf16 (186 MB; 2026-12-03, best of 5): T0 two blocks
// ahead (before) 16.4-17.2 ms = 11 GB/s; T1 three or four ahead 11.0-11.5 ms = 17 GB/s; T2 as T1;
// NTA as T0. At 40 and 400 tokens likewise 5.0 -> 3.3 and 50.9 -> 37.7 ms.
constexpr int64_t kPrefetchBlocks = 4;  // blocks of bf16 (or fp32) rows; int8 rows: see prefetch_blocks

// Blocks to prefetch ahead, and to look ahead into the next sequence (kLookaheadBlocks times this
// over kPrefetchBlocks): the bf16 distances in bytes, twice the blocks for the int8 cache's
// half-size rows. Alone, with the kernel timed in a loop, more measured faster: 64 sequences x 126
// tokens x 30 layers, median of 9 (2026-12-03), these distances 9.15 ms; no lookahead and 16
// blocks ahead, so a (sequence, head) of up to 256 tokens is asked for whole when its pass starts,
// 7.43 ms. But served at 64 streams, with the event loop and the client on the same two cores,
// that version made the whole layer loop slower (37.4-46.5 against 34.6-37.7 ms a step with the
// bf16 cache, 3 pairs), and these distances did not (32.3 / 36.7 against 33.4 / 36.5 ms).
// Prefetching the next (sequence, head) paced over the current one's blocks measured worse
// alone (12.7 against 9.4 ms).
template <typename KV>
constexpr int64_t prefetch_blocks() {
  return sizeof(KV) == 1 ? 2 * kPrefetchBlocks : kPrefetchBlocks;
}

// The block_size x RS rows of KV head `kvh` in pool block `block` ([num_blocks, Hkv, block_size, RS]).
template <typename KV, int64_t RS>
static inline void prefetch_block(const KV* cache, int64_t block, int64_t num_kv_heads, int64_t kvh,
                                  int64_t block_size) {
  const char* p = reinterpret_cast<const char*>(cache + (block * num_kv_heads + kvh) * block_size * RS);
  for (int64_t off = 0; off < block_size * RS * static_cast<int64_t>(sizeof(KV)); off += 64)
    _mm_prefetch(p + off, _MM_HINT_T1);
}

// The first `blocks` pool blocks of sequence `table`, every KV head, K and V: what a thread asks
// for while it still works on the sequence before (see kLookaheadBlocks).
template <typename KV, int64_t RS>
static inline void prefetch_sequence(const KV* k_cache, const KV* v_cache, const int64_t* table, int64_t blocks,
                                     int64_t num_kv_heads, int64_t block_size) {
  const int64_t bytes = num_kv_heads * block_size * RS * static_cast<int64_t>(sizeof(KV));  // a block, all heads
  for (int64_t i = 0; i < blocks; ++i) {
    const char* k = reinterpret_cast<const char*>(k_cache + table[i] * num_kv_heads * block_size * RS);
    const char* v = reinterpret_cast<const char*>(v_cache + table[i] * num_kv_heads * block_size * RS);
    for (int64_t off = 0; off < bytes; off += 64) {
      _mm_prefetch(k + off, _MM_HINT_T1);
      _mm_prefetch(v + off, _MM_HINT_T1);
    }
  }
}

// A thread claims its next sequence when it starts one, and prefetches that sequence's first
// blocks (all KV heads) while it computes the current one, so a sequence's first blocks are no
// longer demand misses. Measured on the Zen 4 core pair, 64 sequences x 30 layers, bf16, best of
// 5 (2026-12-03): 126 tokens 10.2-10.7 -> 8.5 ms (4 blocks ahead: 9.0-9.6, 16: 8.4); 400 tokens
// 35.8 -> 34.0 ms.
constexpr int64_t kLookaheadBlocks = 8;  // bf16 blocks; int8: twice as many (prefetch_blocks)

// scores[j * len + t0 + i] = qf_j . k_i for the block's n <= 16 rows, every head j of the group.
// float32 rows are read in place; other dtypes are widened once into `kf` for all g heads; int8
// codes too, and their row scales then multiply the 16 sums at once.
template <typename KV, int D>
static inline void qk_block(const float* qf, int64_t group, const KV* k_block, int64_t n, float* scores,
                            int64_t len, int64_t t0, float* kf /* [16 * D] scratch */) {
  constexpr int C = D / 16;
  constexpr bool kQuant = std::is_same_v<KV, int8_t>;
  constexpr int64_t RS = row_stride<KV, D>();
  const float* rows = reinterpret_cast<const float*>(k_block);
  alignas(64) float row_scale[16] = {};
  if constexpr (!std::is_same_v<KV, float>) {
    for (int64_t i = 0; i < n; ++i) {
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(kf + i * D + c * 16, load_f32x16(k_block + i * RS + c * 16));
      if constexpr (kQuant) row_scale[i] = kv_row_scale(k_block + i * RS, D);
    }
    rows = kf;
  }
  const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
  for (int64_t j = 0; j < group; ++j) {
    __m512 qv[C];
    for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(qf + j * D + c * 16);
    __m512 part[16];
    for (int i = 0; i < 16; ++i) {
      __m512 acc = _mm512_setzero_ps();
      if (i < n)
        for (int c = 0; c < C; ++c) acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(rows + i * D + c * 16), acc);
      part[i] = acc;
    }
    __m512 sums = reduce16(part);
    if constexpr (kQuant) sums = _mm512_mul_ps(sums, _mm512_load_ps(row_scale));
    _mm512_mask_storeu_ps(scores + j * len + t0, mask, sums);
  }
}

#if defined(__AVX512BF16__)
// scores[j * len + t0 + i] = (q_j . row_i) * mul[i] for n <= 16 bf16 rows (stride D), every head j.
template <int D>
static inline void dot_rows_bf16(const __m512bh* qb, int64_t group, const c10::BFloat16* rows, int64_t n,
                                 float* scores, int64_t len, int64_t t0, __m512 mul) {
  constexpr int C2 = D / 32;
  const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
  for (int64_t j = 0; j < group; ++j) {
    __m512 part[16];
    for (int i = 0; i < 16; ++i) {
      __m512 acc = _mm512_setzero_ps();
      if (i < n)
        for (int c = 0; c < C2; ++c)
          acc = _mm512_dpbf16_ps(acc, qb[j * C2 + c],
                                 (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(rows + i * D + c * 32)));
      part[i] = acc;
    }
    _mm512_mask_storeu_ps(scores + j * len + t0, mask, _mm512_mul_ps(reduce16(part), mul));
  }
}

// The bf16 cache with AVX512-BF16: `vdpbf16ps` multiplies 32 bf16 pairs straight from the cache
// and adds them into 16 fp32 lanes, so K rows need no widening pass (which cost more instructions
// than the dot products themselves). Each bf16 x bf16 product is exact in fp32; q is the model's
// bf16 q, and the softmax scale is applied to the fp32 sums.
template <int D>
static inline void qk_block_bf16(const __m512bh* qb, int64_t group, const c10::BFloat16* k_block, int64_t n,
                                 float* scores, int64_t len, int64_t t0, float scale) {
  dot_rows_bf16<D>(qb, group, k_block, n, scores, len, t0, _mm512_set1_ps(scale));
}

// The int8 cache with AVX512-BF16: each K row's codes are converted to bf16 once (exact: |code| <= 127
// fits bf16's 8 bits of precision) into `kb`, then `vdpbf16ps` against the bf16 q as above, and the
// row scales (times the softmax scale) multiply the 16 sums. Why: widening the codes to fp32 and
// doing fp32 FMAs made the int8 cache slower than bf16 here (compute-bound, 10-12 ms at 126 tokens
// against bf16's 10.7), though it reads ~half the bytes.
template <int D>
static inline void qk_block_i8_bf16(const __m512bh* qb, int64_t group, const int8_t* k_block, int64_t n,
                                    float* scores, int64_t len, int64_t t0, float scale, __m512bh* kb) {
  constexpr int C2 = D / 32;
  constexpr int64_t RS = row_stride<int8_t, D>();
  alignas(64) float row_scale[16] = {};
  for (int64_t i = 0; i < n; ++i) {
    const int8_t* r = k_block + i * RS;
    for (int c = 0; c < C2; ++c)  // [lo 16 | hi 16]: the row's 32 values in order, as q's bf16 are
      kb[i * C2 + c] = _mm512_cvtne2ps_pbh(load_f32x16(r + c * 32 + 16), load_f32x16(r + c * 32));
    row_scale[i] = kv_row_scale(r, D) * scale;
  }
  dot_rows_bf16<D>(qb, group, reinterpret_cast<const c10::BFloat16*>(kb), n, scores, len, t0,
                   _mm512_load_ps(row_scale));
}
#endif

// out_j = sum_t p[j][t] * v_t for heads j0 .. j0 + HP - 1, over the whole context. The HP x D fp32
// accumulators stay in registers (HP * D / 16 <= 16 zmm) and each V row is widened once into
// registers and used by all HP heads: ~1.5 instructions per multiply-add instead of the ~3 of a
// widen-to-memory pass plus accumulators loaded and stored per block.
template <typename KV, int D, int HP>
static inline void pv_heads(const float* scores, int64_t j0, const KV* v_cache, const int64_t* table,
                            int64_t num_kv_heads, int64_t kvh, int64_t block_size, int64_t len, float* acc) {
  constexpr int C = D / 16;
  constexpr bool kQuant = std::is_same_v<KV, int8_t>;
  constexpr int64_t RS = row_stride<KV, D>();
  __m512 a[HP][C];
  for (int h = 0; h < HP; ++h)
    for (int c = 0; c < C; ++c) a[h][c] = _mm512_setzero_ps();
  for (int64_t t0 = 0; t0 < len; t0 += block_size) {
    const int64_t blk = t0 / block_size;
    const KV* v_block = v_cache + (table[blk] * num_kv_heads + kvh) * block_size * RS;
    if (t0 + prefetch_blocks<KV>() * block_size < len)
      prefetch_block<KV, RS>(v_cache, table[blk + prefetch_blocks<KV>()], num_kv_heads, kvh, block_size);
    const int64_t n = std::min(block_size, len - t0);
    for (int64_t i = 0; i < n; ++i) {
      __m512 v[C];
      for (int c = 0; c < C; ++c) v[c] = load_f32x16(v_block + i * RS + c * 16);
      float row_scale = 1.f;  // p * (code * s) as (p * s) * code: one multiply a row, not D
      if constexpr (kQuant) row_scale = kv_row_scale(v_block + i * RS, D);
      for (int h = 0; h < HP; ++h) {
        const __m512 p = _mm512_set1_ps(scores[(j0 + h) * len + t0 + i] * row_scale);
        for (int c = 0; c < C; ++c) a[h][c] = _mm512_fmadd_ps(p, v[c], a[h][c]);
      }
    }
  }
  for (int h = 0; h < HP; ++h)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + (j0 + h) * D + c * 16, a[h][c]);
}

// All g heads in passes of at most 16 / (D / 16) heads (4 at D = 64, 2 at D = 128, 1 at D = 256).
template <typename T, int D>
static inline void pv_all(const float* scores, int64_t group, const T* v_cache, const int64_t* table,
                          int64_t num_kv_heads, int64_t kvh, int64_t block_size, int64_t len, float* acc) {
  constexpr int MAX_HP = std::min(4, std::max(1, 16 / (D / 16)));
  for (int64_t j0 = 0; j0 < group;) {
    const int64_t hp = std::min<int64_t>(MAX_HP, group - j0);
    switch (hp) {
      case 1: pv_heads<T, D, 1>(scores, j0, v_cache, table, num_kv_heads, kvh, block_size, len, acc); break;
      case 2: if constexpr (MAX_HP >= 2) pv_heads<T, D, 2>(scores, j0, v_cache, table, num_kv_heads, kvh, block_size, len, acc); break;
      case 3: if constexpr (MAX_HP >= 3) pv_heads<T, D, 3>(scores, j0, v_cache, table, num_kv_heads, kvh, block_size, len, acc); break;
      default: if constexpr (MAX_HP >= 4) pv_heads<T, D, 4>(scores, j0, v_cache, table, num_kv_heads, kvh, block_size, len, acc); break;
    }
    j0 += hp;
  }
}
#define LLMSERVE_AVX512 1
#endif

// Row i of a block as float32 values into row[0 .. D): widened, and for int8 codes scaled.
template <typename KV, int D>
static inline void widen_row(const KV* block, int64_t i, float* row) {
  if constexpr (std::is_same_v<KV, int8_t>) {
    kv_dequantize_row(block + i * row_stride<KV, D>(), D, row);
  } else {
#pragma omp simd
    for (int d = 0; d < D; ++d) row[d] = to_f32(block[i * D + d]);
  }
}

// The plain loops' P.V (double, head sizes not a multiple of 16, builds without AVX-512).
template <typename KV, int D>
static void plain_pv(const float* scores, int64_t group, const KV* v_cache, const int64_t* table, int64_t num_kv_heads,
                     int64_t kvh, int64_t block_size, int64_t len, float* acc, float* row /* [D] scratch */) {
  std::fill(acc, acc + group * D, 0.f);
  for (int64_t t0 = 0; t0 < len; t0 += block_size) {
    const KV* v_block = v_cache + (table[t0 / block_size] * num_kv_heads + kvh) * block_size * row_stride<KV, D>();
    const int64_t n = std::min(block_size, len - t0);
    for (int64_t i = 0; i < n; ++i) {
      widen_row<KV, D>(v_block, i, row);
      for (int64_t j = 0; j < group; ++j) {
        const float p = scores[j * len + t0 + i];
        float* aj = acc + j * D;
#pragma omp simd
        for (int d = 0; d < D; ++d) aj[d] += p * row[d];
      }
    }
  }
}

// D is a template parameter so the per-row loops are fixed-length and fully vectorised. KV is the
// cache's element type: T, or int8_t for the int8 cache.
template <typename T, typename KV, int D>
static void decode_kernel(const T* q, const KV* k_cache, const KV* v_cache, const int64_t* tables,
                          const int64_t* lens, T* out, int64_t batch, int64_t num_heads,
                          int64_t num_kv_heads, int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t group = num_heads / num_kv_heads;
  constexpr int64_t RS = row_stride<KV, D>();
#if defined(LLMSERVE_AVX512)
  // The vector paths; double (and head sizes that are not a multiple of 16) take the plain loops.
  constexpr bool kVector = LLMSERVE_BLOCKED && D % 16 == 0 && !std::is_same_v<T, double>;
#if defined(__AVX512BF16__)
  // QK from the raw bf16 q, against a bf16 cache or int8 codes converted to bf16.
  constexpr bool kDpbf16 = kVector && std::is_same_v<T, c10::BFloat16> && D % 32 == 0;
#else
  constexpr bool kDpbf16 = false;
#endif
#else
  constexpr bool kDpbf16 = false;
#endif
  // Dynamic scheduling: context lengths differ a lot between sequences (and the runner sorts
  // them), so equal static chunks would leave one thread idle while another does the long ones.
  // A chunk is one sequence's KV heads, so two threads never share a sequence's blocks: measured
  // at 64 sequences of 55-110 tokens, 2 threads, 30 layers, 15.4 -> ~11 ms with the prefetch below.
  std::atomic<int64_t> next_seq{0};
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> qf(group * D), acc(group * D), scores;
    [[maybe_unused]] std::vector<float> scratch(16 * D);
#if defined(LLMSERVE_AVX512) && defined(__AVX512BF16__)
    std::vector<__m512bh> qb(std::max<int64_t>(1, group * D / 32));  // q rows as 32 bf16 a vector
    [[maybe_unused]] std::vector<__m512bh> kb(std::max<int64_t>(1, 16 * D / 32));  // int8 K rows as bf16
#endif
    [[maybe_unused]] alignas(64) float row[D];
    const auto run = [&](int64_t b, int64_t kvh) {
      const int64_t len = lens[b];
      const int64_t* table = tables + b * max_blocks;
      const T* q_rows = q + (b * num_heads + kvh * group) * D;
#if defined(LLMSERVE_AVX512)
      if constexpr (kVector) {
        // The passes below prefetch kPrefetchBlocks ahead, so the first ones of K and of V would
        // be demand misses, one after another: ask for them now, V's while QK runs (7-9% at
        // ~100-token contexts). The sequence lookahead below does not make this redundant:
        // without it (and with the thread's first sequence prefetched at claim instead) the
        // 126-token case measured 15.9 against 11.0 ms, as if most of the lookahead's burst of
        // ~1,500 prefetches were dropped once the miss queue is full.
        for (int64_t i = 0; i < std::min<int64_t>(prefetch_blocks<KV>(), (len + block_size - 1) / block_size); ++i) {
          prefetch_block<KV, RS>(k_cache, table[i], num_kv_heads, kvh, block_size);
          prefetch_block<KV, RS>(v_cache, table[i], num_kv_heads, kvh, block_size);
        }
      }
#endif
#if defined(LLMSERVE_AVX512) && defined(__AVX512BF16__)
      if constexpr (kDpbf16)
        for (int64_t c = 0; c < group * D / 32; ++c)
          qb[c] = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(q_rows + c * 32));
#endif
      if constexpr (!kDpbf16)
        for (int64_t i = 0; i < group * D; ++i) qf[i] = to_f32(q_rows[i]) * scale;
      scores.resize(group * len);
      // pass 1: scores[j][t] = q_j . k_t, each K row read once for all g query heads
      // Walk block by block: no integer division per token, and each block is one contiguous run.
      for (int64_t t0 = 0; t0 < len; t0 += block_size) {
        const KV* k_block = k_cache + (table[t0 / block_size] * num_kv_heads + kvh) * block_size * RS;
        const int64_t n = std::min(block_size, len - t0);
#if defined(LLMSERVE_AVX512)
        if constexpr (kVector) {
          if (t0 + prefetch_blocks<KV>() * block_size < len)
            prefetch_block<KV, RS>(k_cache, table[t0 / block_size + prefetch_blocks<KV>()], num_kv_heads, kvh,
                                   block_size);
          for (int64_t s0 = 0; s0 < n; s0 += 16) {  // blocks of 32 and more: 16 rows at a time
            const int64_t rows = std::min<int64_t>(16, n - s0);
#if defined(__AVX512BF16__)
            if constexpr (kDpbf16 && std::is_same_v<KV, int8_t>)
              qk_block_i8_bf16<D>(qb.data(), group, k_block + s0 * RS, rows, scores.data(), len, t0 + s0, scale,
                                  kb.data());
            else if constexpr (kDpbf16)
              qk_block_bf16<D>(qb.data(), group, reinterpret_cast<const T*>(k_block) + s0 * D, rows, scores.data(),
                               len, t0 + s0, scale);
            else
#endif
              qk_block<KV, D>(qf.data(), group, k_block + s0 * RS, rows, scores.data(), len, t0 + s0, scratch.data());
          }
          continue;
        }
#endif
        for (int64_t i = 0; i < n; ++i) {
          widen_row<KV, D>(k_block, i, row);
          for (int64_t j = 0; j < group; ++j) {
            const float* qj = qf.data() + j * D;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int d = 0; d < D; ++d) s += qj[d] * row[d];
            scores[j * len + t0 + i] = s;
          }
        }
      }
      // pass 2: softmax per query head
      for (int64_t j = 0; j < group; ++j) {
        float* sj = scores.data() + j * len;
#if defined(LLMSERVE_AVX512)
        if constexpr (kVector) {
          softmax16(sj, len);
          continue;
        }
#endif
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t t = 0; t < len; ++t) m = std::max(m, sj[t]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
          sj[t] = std::exp(sj[t] - m);
          sum += sj[t];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) sj[t] *= inv;
      }
      // pass 3: out_j = sum_t p[j][t] * v_t, each V row read once
#if defined(LLMSERVE_AVX512)
      if constexpr (kVector)
        pv_all<KV, D>(scores.data(), group, v_cache, table, num_kv_heads, kvh, block_size, len, acc.data());
      else
#endif
        plain_pv<KV, D>(scores.data(), group, v_cache, table, num_kv_heads, kvh, block_size, len, acc.data(), row);
      T* out_rows = out + (b * num_heads + kvh * group) * D;
      for (int64_t i = 0; i < group * D; ++i) out_rows[i] = static_cast<T>(acc[i]);
    };
    // Sequences handed out one at a time from a shared counter (dynamic scheduling, as `omp for
    // schedule(dynamic)`), each claimed one sequence early for the prefetch above.
    int64_t b = next_seq.fetch_add(1, std::memory_order_relaxed);
    while (b < batch) {
      const int64_t ahead = next_seq.fetch_add(1, std::memory_order_relaxed);
#if defined(LLMSERVE_AVX512)
      if constexpr (kVector)
        if (ahead < batch)
          prefetch_sequence<KV, RS>(k_cache, v_cache, tables + ahead * max_blocks,
                                    std::min(kLookaheadBlocks * prefetch_blocks<KV>() / kPrefetchBlocks,
                                             (lens[ahead] + block_size - 1) / block_size),
                                    num_kv_heads, block_size);
#endif
      for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) run(b, kvh);
      b = ahead;
    }
  }
}

template <typename T, typename KV>
static void dispatch_head_dim(int64_t head_dim, const T* q, const KV* k, const KV* v, const int64_t* tables,
                              const int64_t* lens, T* out, int64_t batch, int64_t heads, int64_t kv_heads,
                              int64_t block_size, int64_t max_blocks, float scale) {
#define LLMSERVE_DECODE_CASE(d) \
  case d: return decode_kernel<T, KV, d>(q, k, v, tables, lens, out, batch, heads, kv_heads, block_size, max_blocks, scale);
  switch (head_dim) {
    LLMSERVE_DECODE_CASE(16)
    LLMSERVE_DECODE_CASE(32)
    LLMSERVE_DECODE_CASE(64)
    LLMSERVE_DECODE_CASE(80)
    LLMSERVE_DECODE_CASE(96)
    LLMSERVE_DECODE_CASE(128)
    LLMSERVE_DECODE_CASE(256)
    default: TORCH_CHECK(false, "head_dim ", head_dim, " not compiled in (16, 32, 64, 80, 96, 128, 256)");
  }
#undef LLMSERVE_DECODE_CASE
}

torch::Tensor paged_attention_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(block_tables.is_contiguous() && block_tables.scalar_type() == at::kLong, "block_tables: contiguous int64");
  TORCH_CHECK(context_lens.scalar_type() == at::kLong, "context_lens must be int64");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [B, H, D], cache [blocks, Hkv, bs, D]");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(),
              "k_cache and v_cache must match");
  const bool quant = k_cache.scalar_type() == at::kChar;
  const int64_t head_dim = q.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim + (quant ? kKvScaleBytes : 0),
              quant ? "an int8 cache row is head_dim codes + 4 scale bytes" : "cache head_dim must match q's");
  TORCH_CHECK(quant || k_cache.scalar_type() == q.scalar_type(), "q and the cache must share a dtype (or int8 cache)");
  auto out = torch::empty_like(q);
  const auto lens = context_lens.contiguous();
  const auto run = [&](auto* qp, auto* kp, auto* vp, auto* op) {
    dispatch_head_dim(head_dim, qp, kp, vp, block_tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), op,
                      q.size(0), q.size(1), k_cache.size(1), k_cache.size(2), block_tables.size(1),
                      static_cast<float>(scale));
  };
  if (quant) {
    const auto* k = k_cache.data_ptr<int8_t>();
    const auto* v = v_cache.data_ptr<int8_t>();
    switch (q.scalar_type()) {
      case at::kFloat: run(q.data_ptr<float>(), k, v, out.data_ptr<float>()); break;
      case at::kBFloat16: run(q.data_ptr<c10::BFloat16>(), k, v, out.data_ptr<c10::BFloat16>()); break;
      case at::kHalf: run(q.data_ptr<c10::Half>(), k, v, out.data_ptr<c10::Half>()); break;
      default: TORCH_CHECK(false, "the int8 cache takes float32, bfloat16 or float16 queries, got ", q.scalar_type());
    }
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention_decode", [&] {
    run(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Pure tensor work: the server's event loop may run meanwhile (as it may beside torch's own ops).
  const py::call_guard<py::gil_scoped_release> nogil;
  m.def("addresses", [] {
    using namespace llmserve_abi;
    return Addresses{{"paged_attention_decode", address<DecodeAttnFn>(&paged_attention_decode)}};
  }, "{name: address} of the kernels the C++ layer loop calls (kernel_abi.h)");
  m.def("paged_attention_decode", &paged_attention_decode, nogil, "paged decode attention (CPU)");
}
