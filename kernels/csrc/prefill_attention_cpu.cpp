// Varlen prefill attention for CPU over the paged KV cache: every multi-token chunk of a step in
// one call, reading K and V straight from the cache pages (no gather copy), fp32 accumulation
// whatever the cache dtype.
//
// Why: the torch path gathers each chunk's whole context into a contiguous tensor and calls SDPA,
// once per chunk per layer. That measured ~55 GFLOP/s in float32 (~18% of a 512-token prefill step
// of SmolLM2-135M, ~23% in bf16), and with many short chunks in a step (8 x 62 tokens) the per-call
// cost (gather, mask, SDPA set-up) is most of it.
//
// Semantics (those of kernels/paged_attention_ref.py `paged_attention_prefill`, chunk by chunk):
// chunk s is query rows cu[s] .. cu[s + 1] - 1, len_s = cu[s + 1] - cu[s] tokens at positions
// start_s = context_lens[s] - len_s .. context_lens[s] - 1; the query at position p sees keys
// 0 .. p (the cached prefix and the chunk's own keys up to itself), which the cache already holds.
//
// Arithmetic, per layer, SmolLM2-135M (H = 9, Hkv = 3, D = 64), one 512-token chunk from 0:
// 512 * 513 / 2 = 131k (query, key) pairs, 4 * H * D FLOP each (QK^T and PV, 2 FLOP per
// multiply-add) = 303 MFLOP, against 2 * 512 * Hkv * D * 4 B = 0.79 MB of K/V in fp32: ~380 FLOP
// per byte of DRAM traffic, so this is compute-bound, and the work is in the two inner products.
//
// Work split (flash-attention style): a task is (chunk, KV head, tile of M query tokens). Its rows
// are the M tokens x g query heads of that KV head (row r = token r / g, head r % g), so every K
// and V element loaded is used by M * g rows: at M * g = 64 rows a task does 64 * 4 = 256 FLOP
// per K/V element it reads (from L2 after the first task of a head touched it). Keys come in
// tiles of 32 (64 on the AMX path) across pages; per tile: S = Q K^T, an online-softmax update in
// fp32, and O += P V. Key tiles past the tile's last query position are skipped (causality), and
// only tiles that cross the diagonal pay for the mask. Tasks are sorted longest first and handed
// out dynamically.
//
// Layouts inside a task, chosen so that the softmax needs no horizontal reduction:
//   Q^T  [D][R]   the tile's queries transposed once per task (R = rows padded to 16), by 16 x 16
//                 blocks of 32-bit words (element by element it cost ~11% of the fp32 kernel);
//   S^T  [kt][R]  scores, lanes = 16 rows: the row max and row sum are lane-wise over the keys;
//   O    [R][D]   fp32 accumulators; the online-softmax rescale is folded into O's load in PV.
//
// Two inner-product engines (measured on this machine's Xeon, 2 GHz, one core):
//  * AVX-512 FMA (float32, float16; bfloat16 without AMX): QK^T is FMAs of a Q^T row vector with a
//    K element broadcast from the page, PV FMAs of a broadcast P element with a V row from the page
//    (each page's run of rows in place), in register blocks of 16-24 zmm accumulators. vfmadd231ps
//    zmm issues 2 a cycle (131 GFLOP/s peak); the kernel reaches ~60 GFLOP/s of useful work per core
//    (profile at 512 tokens: PV 36%, QK^T 35%, softmax and packing the rest; diagonal waste ~7%).
//    float16 and bfloat16 tiles are widened to fp32 in L1 first.
//    vdpbf16ps (AVX512-BF16, 32 bf16 multiply-adds an instruction) was tried for bfloat16 and
//    dropped: it issues once per 2 cycles here, half the multiply-add rate of fp32 FMAs (the whole
//    kernel ran 1.4x slower than with widened tiles).
//  * AMX (bfloat16, head_dim a multiple of 32): tdpbf16ps does a 16x16 += 16x32 . 32x16 product,
//    ~1 TFLOP/s per core here, 8x the FMAs. S^T = K Q^T takes 16 K rows straight from the page as
//    the A tile and Q^T packed as bf16 pairs (q[r][d], q[r][d + 1]) as the B tile; O = P V takes P
//    (rounded to bf16, as torch's own CPU flash attention does for reduced types: 2^-9 relative per
//    weight, the sums in fp32) as A and V rows interleaved in pairs of keys as B. Profile at 512
//    tokens: the tile products ~47% (near the rate tdpbf16ps issues at here, one per ~32 cycles),
//    the softmax ~25%; 1.8x the FMA path on bf16. Linux grants AMX per process (arch_prctl); where
//    it is refused, the FMA path runs.
//
// The int8 KV cache ([num_blocks, Hkv, block_size, D + 4], kv_int8.h) is read by the FMA and portable
// paths: each key and value row is dequantized (code * its row's scale, in fp32) where the bf16
// ones are widened. Prefill is compute-bound, so the halved bytes matter less here than in decode.
//
// Without AVX-512 (or with -DLLMSERVE_PREFILL_VECTOR=0) the portable loops below run instead: per
// query token, the scores of its g heads, a plain softmax and PV (as the decode kernel's loops).
// Every path can be called by name (`paged_attention_prefill_varlen_path`) so the tests check all.
#include <torch/extension.h>
#include "kernel_abi.h"
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_vec.h"

#ifndef LLMSERVE_PREFILL_VECTOR
#define LLMSERVE_PREFILL_VECTOR 1
#endif

#if LLMSERVE_PREFILL_VECTOR && defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define PF_AVX512 1
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define PF_AMX 1
#include "amx_tiles.h"
#endif
#endif

namespace {

constexpr int64_t KEY_TILE = 32;  // keys per tile on the FMA path: S^T is KEY_TILE x R fp32 (8 KB at R = 64)
constexpr int64_t AMX_KEYS = 64;  // on the AMX path: two K = 32 products per load and store of O

// Rows of a task: M tokens x g heads. 64 rows keep Q^T and O at 16 KB each (L1) for D <= 128; at
// D = 256, 32 rows. More rows would reuse each K/V element more, but cost more masked work on the
// diagonal and give fewer tasks to balance.
static inline int64_t tile_tokens(int64_t group, int64_t head_dim) {
  const int64_t rows = head_dim > 128 ? 32 : 64;
  return std::max<int64_t>(1, rows / group);
}

enum class Path { kAmx, kAvx512, kScalar };  // the inner-product engines, fastest first

struct Task {
  int32_t seq, kv_head, t0, t1;  // query tokens t0 .. t1 - 1 of chunk seq
  int64_t cost;                  // rows x keys: longest first, so the last tasks are the short ones
};

template <typename T>
struct Args {
  const T* q;
  const T* k_cache;
  const T* v_cache;
  T* out;
  int64_t q_stride_t, q_stride_h;  // elements; q's last dim is contiguous
  int64_t num_heads, num_kv_heads, group, block_size, max_blocks;
  const int64_t* tables;  // [S, max_blocks]
  const int64_t* starts;  // [S] position of each chunk's first query
  const int64_t* row0;    // [S] its first row in q / out
  float scale;
  // The int8 cache instead of k_cache / v_cache (which are then null): [blocks * Hkv * bs, D + 4] rows.
  const int8_t* k_q = nullptr;
  const int8_t* v_q = nullptr;
};

// Cache row `r` (of the [blocks * Hkv * bs, row] view) as D float32 values: widened, or dequantized
// from the int8 cache when `codes` is given.
template <typename T, int D>
static inline void widen_cache_row(const T* cache, const int8_t* codes, int64_t r, float* out) {
  if (codes) {
    kv_dequantize_row(codes + r * (D + kKvScaleBytes), D, out);
    return;
  }
#pragma omp simd
  for (int d = 0; d < D; ++d) out[d] = to_f32(cache[r * D + d]);
}

// ---------------------------------------------------------------------------------------------
// Portable loops: one query token at a time, its g heads together (each K/V row widened once).
template <typename T, int D>
static void scalar_task(const Args<T>& a, const Task& task, std::vector<float>& qf, std::vector<float>& scores,
                        std::vector<float>& acc, float* row) {
  const int64_t g = a.group, kvh = task.kv_head, bs = a.block_size;
  const int64_t* table = a.tables + task.seq * a.max_blocks;
  for (int64_t t = task.t0; t < task.t1; ++t) {
    const int64_t len = a.starts[task.seq] + t + 1;  // keys 0 .. its position
    const int64_t qrow = a.row0[task.seq] + t;
    for (int64_t j = 0; j < g; ++j) {
      const T* src = a.q + qrow * a.q_stride_t + (kvh * g + j) * a.q_stride_h;
      for (int d = 0; d < D; ++d) qf[j * D + d] = to_f32(src[d]) * a.scale;
    }
    scores.resize(g * len);
    for (int64_t t0 = 0; t0 < len; t0 += bs) {
      const int64_t first = (table[t0 / bs] * a.num_kv_heads + kvh) * bs;  // the block's first cache row
      const int64_t n = std::min(bs, len - t0);
      for (int64_t i = 0; i < n; ++i) {
        widen_cache_row<T, D>(a.k_cache, a.k_q, first + i, row);
        for (int64_t j = 0; j < g; ++j) {
          const float* qj = qf.data() + j * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int d = 0; d < D; ++d) s += qj[d] * row[d];
          scores[j * len + t0 + i] = s;
        }
      }
    }
    for (int64_t j = 0; j < g; ++j) {
      float* sj = scores.data() + j * len;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < len; ++i) m = std::max(m, sj[i]);
      float sum = 0.f;
      for (int64_t i = 0; i < len; ++i) {
        sj[i] = std::exp(sj[i] - m);
        sum += sj[i];
      }
      const float inv = 1.f / sum;
      for (int64_t i = 0; i < len; ++i) sj[i] *= inv;
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t t0 = 0; t0 < len; t0 += bs) {
      const int64_t first = (table[t0 / bs] * a.num_kv_heads + kvh) * bs;
      const int64_t n = std::min(bs, len - t0);
      for (int64_t i = 0; i < n; ++i) {
        widen_cache_row<T, D>(a.v_cache, a.v_q, first + i, row);
        for (int64_t j = 0; j < g; ++j) {
          const float p = scores[j * len + t0 + i];
          float* aj = acc.data() + j * D;
#pragma omp simd
          for (int d = 0; d < D; ++d) aj[d] += p * row[d];
        }
      }
    }
    for (int64_t j = 0; j < g; ++j) {
      T* dst = a.out + (qrow * a.num_heads + kvh * g + j) * D;
      for (int d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[j * D + d]);
    }
  }
}

#if defined(PF_AVX512)
// ---------------------------------------------------------------------------------------------
// AVX-512 helpers.

static inline void store_f32x16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
static inline void store_f32x16(c10::Half* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
static inline void store_f32x16(c10::BFloat16* p, __m512 x) {
  // Round to nearest even, as c10's float -> bf16 does (NaN kept a NaN).
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}

// 2^x for x <= 0, 16 lanes: 2^x = 2^k * 2^f, k = round(x), |f| <= 1/2, 2^f = e^(f ln 2) by its Taylor
// polynomial to degree 7 (truncation (ln 2 / 2)^8 / 8! < 6e-9 relative, under fp32's 6e-8). The
// scores are kept in log2 units (scale * log2 e folded into one multiply), which saves the
// multiply by 1 / ln 2 of a natural exp. x is clamped at -126 so that 2^x stays a normal number
// (no denormal slow path): masked entries are zeroed explicitly after.
static inline __m512 exp2_16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
  const __m512 k = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, k);
  __m512 p = _mm512_set1_ps(1.525273380405984e-05f);      // ln2^7 / 7!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));  // ln2^6 / 6!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));  // ln2^5 / 5!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));   // ln2^4 / 4!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));   // ln2^3 / 3!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));   // ln2^2 / 2!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));   // ln2
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, k);
}

// S^T[k][v0 .. v0 + RV) = (Q K^T) for NK keys and RV vectors of 16 rows: per d, RV loads of Q^T,
// NK broadcasts of K[k][d] from the cache page, NK * RV FMAs into NK * RV accumulators (16-24).
template <int D, int RV, int NK>
static inline void qk_f32(const float* qt, int64_t R, int64_t v0, const float* k, float* st) {
  __m512 acc[NK][RV];
  for (int i = 0; i < NK; ++i)
    for (int v = 0; v < RV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int d = 0; d < D; ++d) {
    __m512 qv[RV];
    for (int v = 0; v < RV; ++v) qv[v] = _mm512_loadu_ps(qt + d * R + (v0 + v) * 16);
    for (int i = 0; i < NK; ++i) {
      const __m512 b = _mm512_set1_ps(k[i * D + d]);
      for (int v = 0; v < RV; ++v) acc[i][v] = _mm512_fmadd_ps(qv[v], b, acc[i][v]);
    }
  }
  for (int i = 0; i < NK; ++i)
    for (int v = 0; v < RV; ++v) _mm512_storeu_ps(st + i * R + (v0 + v) * 16, acc[i][v]);
}

// NK keys per pass, for 16-24 accumulators (FMA latency x 2 ports needs >= 8 in flight). Key
// counts that are not a multiple (the last page of a context) finish one key at a time: never
// reading past the tile, which may be the end of the cache.
template <int RV>
constexpr int keys_per_pass() {
  return RV == 1 ? 16 : RV == 4 ? 4 : 8;
}

template <int D, int RV>
static inline void qk_rows_f32(const float* qt, int64_t R, int64_t v0, const float* k, int64_t n, float* st) {
  constexpr int NK = keys_per_pass<RV>();
  int64_t i = 0;
  for (; i + NK <= n; i += NK) qk_f32<D, RV, NK>(qt, R, v0, k + i * D, st + i * R);
  for (; i < n; ++i) qk_f32<D, RV, 1>(qt, R, v0, k + i * D, st + i * R);
}

template <int D>
static void qk_f32_all(const float* qt, int64_t R, const float* k, int64_t n, float* st) {
  const int64_t vectors = R / 16;
  for (int64_t v0 = 0; v0 < vectors; v0 += 4) {
    switch (std::min<int64_t>(4, vectors - v0)) {
      case 1: qk_rows_f32<D, 1>(qt, R, v0, k, n, st); break;
      case 2: qk_rows_f32<D, 2>(qt, R, v0, k, n, st); break;
      case 3: qk_rows_f32<D, 3>(qt, R, v0, k, n, st); break;
      default: qk_rows_f32<D, 4>(qt, R, v0, k, n, st); break;
    }
  }
}

// Rows per PV pass: RR * C accumulators plus RR broadcasts in at most ~30 of the 32 zmm registers.
template <int C>
constexpr int rows_per_pass() {
  return C == 1 ? 8 : (8 * (C + 1) <= 30 ? 8 : 4 * (C + 1) <= 30 ? 4 : 2 * (C + 1) <= 30 ? 2 : 1);
}

// O[r] = O[r] * alpha[r] + sum_k P^T[k][r] * V[k] for all R rows (RR at a time), V rows from the page;
// alpha null: no rescale.
template <int D>
static void pv_f32(float* o, const float* alpha, const float* st, int64_t R, const float* v, int64_t n) {
  constexpr int C = D / 16, RR = rows_per_pass<C>();
  for (int64_t r0 = 0; r0 < R; r0 += RR) {
    __m512 acc[RR][C];
    for (int i = 0; i < RR; ++i) {
      const __m512 a = _mm512_set1_ps(alpha ? alpha[r0 + i] : 1.f);
      for (int c = 0; c < C; ++c) acc[i][c] = _mm512_mul_ps(_mm512_loadu_ps(o + (r0 + i) * D + c * 16), a);
    }
    for (int64_t k = 0; k < n; ++k) {
      __m512 p[RR];
      for (int i = 0; i < RR; ++i) p[i] = _mm512_set1_ps(st[k * R + r0 + i]);
      for (int c = 0; c < C; ++c) {
        const __m512 vv = _mm512_loadu_ps(v + k * D + c * 16);
        for (int i = 0; i < RR; ++i) acc[i][c] = _mm512_fmadd_ps(p[i], vv, acc[i][c]);
      }
    }
    for (int i = 0; i < RR; ++i)
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(o + (r0 + i) * D + c * 16, acc[i][c]);
  }
}

// In place: r[i][j] <- r[j][i] for a 16 x 16 matrix of 32-bit words, one row a vector.
static inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {  // lane L of t[2i]: r2i[4L], r2i+1[4L], r2i[4L+1], r2i+1[4L+1]
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // lane L of r[4i + j]: column 4L + j, rows 4i .. 4i + 3
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // a 4 x 4 transpose of 128-bit lanes across r[j], r[4 + j], ...
    const __m512i x0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44), x1 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xEE);
    const __m512i y0 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44);
    const __m512i y1 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xEE);
    t[j] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    t[4 + j] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    t[8 + j] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    t[12 + j] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

#if defined(PF_AMX)
// AMX tiles, all configured 16 rows x 64 bytes (in QK tmm0-3 accumulate, tmm4 is A, tmm5-7 B).
using llmserve_amx::amx_usable;

// S^T[16 kb + i][r] = k_i . q_r for the tile's n keys (rows from `keys`, one pointer a key). A: 16
// K rows (read in place when they are 16 consecutive rows of one page, else copied into `stage`
// with zero rows after the last key: never reading past the tile); B: Q^T pairs for 16 rows.
template <int D>
static void qk_amx(const uint32_t* qp, int64_t R, const c10::BFloat16* const* keys, int64_t n,
                   c10::BFloat16* stage, float* st) {
  for (int64_t kb = 0; kb * 16 < n; ++kb) {
    const int64_t nb = std::min<int64_t>(16, n - kb * 16);
    const c10::BFloat16* a = keys[kb * 16];
    bool in_place = nb == 16;
    for (int64_t i = 1; in_place && i < 16; ++i) in_place = keys[kb * 16 + i] == a + i * D;
    if (!in_place) {
      for (int64_t i = 0; i < 16; ++i) {
        if (i < nb)
          std::memcpy(stage + i * D, keys[kb * 16 + i], D * sizeof(c10::BFloat16));
        else
          std::memset(stage + i * D, 0, D * sizeof(c10::BFloat16));
      }
      a = stage;
    }
    for (int64_t rb0 = 0; rb0 < R / 16; rb0 += 4) {
      const int64_t nrb = std::min<int64_t>(4, R / 16 - rb0);
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int dc = 0; dc < D / 32; ++dc) {
        _tile_loadd(4, a + dc * 32, D * sizeof(c10::BFloat16));
        const uint32_t* b = qp + dc * 16 * R + rb0 * 16;  // 16 d-pairs x 16 rows
        _tile_loadd(5, b, R * 4);
        _tile_dpbf16ps(0, 4, 5);
        if (nrb > 1) {
          _tile_loadd(6, b + 16, R * 4);
          _tile_dpbf16ps(1, 4, 6);
        }
        if (nrb > 2) {
          _tile_loadd(7, b + 32, R * 4);
          _tile_dpbf16ps(2, 4, 7);
        }
        if (nrb > 3) {
          _tile_loadd(5, b + 48, R * 4);
          _tile_dpbf16ps(3, 4, 5);
        }
      }
      float* c = st + kb * 16 * R + rb0 * 16;
      _tile_stored(0, c, R * 4);
      if (nrb > 1) _tile_stored(1, c + 16, R * 4);
      if (nrb > 2) _tile_stored(2, c + 32, R * 4);
      if (nrb > 3) _tile_stored(3, c + 48, R * 4);
    }
  }
}

// vp[kp][d] = (v[2kp][d], v[2kp + 1][d]) words for the key pairs of a tile, zero from key n to the end
// of its last half: the B tiles of O = P V (16 key pairs x 16 dims each).
template <int D>
static inline void pack_v_amx(const c10::BFloat16* const* values, int64_t n, uint32_t* vp, __m512i lo_idx,
                              __m512i hi_idx) {
  for (int64_t kp = 0; kp < (n + 31) / 32 * 16; ++kp) {
    uint32_t* dst = vp + kp * D;
    if (2 * kp >= n) {
      std::memset(dst, 0, D * sizeof(uint32_t));
      continue;
    }
    const c10::BFloat16* a = values[2 * kp];
    const c10::BFloat16* b = 2 * kp + 1 < n ? values[2 * kp + 1] : nullptr;
    for (int d = 0; d < D; d += 32) {
      const __m512i va = _mm512_loadu_si512(a + d);
      const __m512i vb = b ? _mm512_loadu_si512(b + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + d, _mm512_permutex2var_epi16(va, lo_idx, vb));
      _mm512_storeu_si512(dst + d + 16, _mm512_permutex2var_epi16(va, hi_idx, vb));
    }
  }
}

// O[r][:] += P[r][:] . V for all R rows over a tile of up to 64 keys (`halves` of 32). A: 16 rows of P
// as bf16 pairs of keys (pt: [R / 16][16][32] words, one A tile a half); B: 16 dims of the V pairs of
// a half (vp: [32][D] words); C: a 16 x 16 block of O, loaded and stored around its products.
template <int D>
static void pv_amx(float* o, const uint32_t* pt, int64_t R, const uint32_t* vp, int64_t halves) {
  for (int64_t rb = 0; rb < R / 16; ++rb) {
    _tile_loadd(2, pt + rb * 512, 128);
    if (halves > 1) _tile_loadd(3, pt + rb * 512 + 16, 128);
    float* block = o + rb * 16 * D;
    for (int db = 0; db < D / 16; db += 2) {  // D % 32 == 0: two blocks of O at a time
      _tile_loadd(0, block + db * 16, D * 4);
      _tile_loadd(1, block + (db + 1) * 16, D * 4);
      _tile_loadd(5, vp + db * 16, D * 4);
      _tile_loadd(6, vp + (db + 1) * 16, D * 4);
      _tile_dpbf16ps(0, 2, 5);
      _tile_dpbf16ps(1, 2, 6);
      if (halves > 1) {
        _tile_loadd(7, vp + 16 * D + db * 16, D * 4);
        _tile_loadd(4, vp + 16 * D + (db + 1) * 16, D * 4);
        _tile_dpbf16ps(0, 3, 7);
        _tile_dpbf16ps(1, 3, 4);
      }
      _tile_stored(0, block + db * 16, D * 4);
      _tile_stored(1, block + (db + 1) * 16, D * 4);
    }
  }
}
#endif  // PF_AMX

struct Scratch {
  std::vector<float> qt;      // [D][R] Q^T in fp32 (FMA path), or [D / 2][R] bf16 pairs (AMX path)
  std::vector<float> o;       // [R][D]
  std::vector<float> st;      // [AMX_KEYS][R] scores, then probabilities
  std::vector<float> m, l, alpha;  // [R] running max (log2 units), running sum, this tile's rescale
  std::vector<int32_t> pos;   // [R] each row's query position
  std::vector<float> kf, vf;  // [KEY_TILE][D] a K/V tile widened to fp32 (float16, bfloat16)
  std::vector<uint32_t> pt;   // [R / 16][16][32] P as bf16 pairs of keys, row-major (AMX A tiles)
  std::vector<uint32_t> vp;   // [32][D] V as bf16 pairs of keys (AMX B tiles)
  std::vector<c10::BFloat16> stage;  // [16][D] a partial block of K rows
  std::vector<const void*> keys, values;  // [AMX_KEYS] row pointers of the tile

  Scratch(int64_t rows, int64_t d)
      : qt(rows * d), o(rows * d), st(AMX_KEYS * rows), m(rows), l(rows), alpha(rows), pos(rows),
        kf(KEY_TILE * d), vf(KEY_TILE * d), pt(rows * 32), vp(32 * d), stage(16 * d),
        keys(AMX_KEYS), values(AMX_KEYS) {}
};

template <typename T, int D>
static void vector_task(const Args<T>& a, const Task& task, Scratch& sc, bool amx) {
  constexpr int C = D / 16;
#if defined(PF_AMX)
  constexpr bool kAmxable = std::is_same_v<T, c10::BFloat16> && D % 32 == 0;
#else
  constexpr bool kAmxable = false;
#endif
  if constexpr (!kAmxable) amx = false;
  const bool quant = a.k_q != nullptr;  // the int8 cache: dequantized into L1 on the FMA path
  if (quant) amx = false;
  const bool direct = std::is_same_v<T, float> && !quant;  // FMA path: K/V rows read in place as fp32
  const int64_t g = a.group, kvh = task.kv_head, bs = a.block_size;
  const int64_t start = a.starts[task.seq], row0 = a.row0[task.seq];
  const int64_t t0 = task.t0, t1 = task.t1;
  const int64_t valid = (t1 - t0) * g;
  const int64_t R = (valid + 15) / 16 * 16;  // padding rows get q = 0 and are never written out
  const int64_t* table = a.tables + task.seq * a.max_blocks;
  float* qt = sc.qt.data();
  float* o = sc.o.data();
  float* st = sc.st.data();
  float* m = sc.m.data();
  float* l = sc.l.data();
  float* alpha = sc.alpha.data();
  int32_t* pos = sc.pos.data();

  // Q^T for this tile, 16 rows x 16 columns at a time: columns of fp32 (widened), or of bf16 pairs
  // (q[r][d], q[r][d + 1]) as 32-bit words for AMX. Padding rows are zero. (Written element by
  // element, this was ~11% of the fp32 kernel: tasks are many and, under causality, often short.)
  for (int64_t r0 = 0; r0 < R; r0 += 16) {
    const T* src[16];
    for (int64_t i = 0; i < 16; ++i) {
      const int64_t r = std::min(r0 + i, valid - 1);  // padding rows: the last real row's position
      pos[r0 + i] = static_cast<int32_t>(start + t0 + r / g);
      src[i] = a.q + (row0 + t0 + r / g) * a.q_stride_t + (kvh * g + r % g) * a.q_stride_h;
    }
    const int64_t live = std::min<int64_t>(16, valid - r0);
    for (int c = 0; c < (amx ? D / 32 : C); ++c) {
      __m512i block[16];
      for (int64_t i = 0; i < 16; ++i)
        block[i] = i >= live ? _mm512_setzero_si512()
                   : amx     ? _mm512_loadu_si512(src[i] + c * 32)
                             : _mm512_castps_si512(load_f32x16(src[i] + c * 16));
      transpose16x16(block);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(qt + (c * 16 + i) * R + r0, block[i]);
    }
  }
  std::fill(o, o + R * D, 0.f);
  std::fill(m, m + R, -std::numeric_limits<float>::infinity());
  std::fill(l, l + R, 0.f);

  const float scale_log2 = a.scale * 1.4426950408889634f;  // scores in log2 units for exp2_16
  const __m512 vscale = _mm512_set1_ps(scale_log2);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  alignas(64) static constexpr uint16_t kIdx[3][32] = {
      {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31},
      {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
       8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47},
      {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
       24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63}};
  [[maybe_unused]] const __m512i interleave = _mm512_load_si512(kIdx[0]);  // [x0..15 | y0..15] -> x0 y0 x1 y1 ..
  [[maybe_unused]] const __m512i pair_lo = _mm512_load_si512(kIdx[1]);     // (a, b) -> a0 b0 .. a15 b15
  [[maybe_unused]] const __m512i pair_hi = _mm512_load_si512(kIdx[2]);     // (a, b) -> a16 b16 .. a31 b31
  const int64_t first_pos = start + t0, num_keys = start + t1;  // the last row sees keys < num_keys
  bool o_zero = true;  // nothing accumulated yet: the AMX path's rescale of O can be skipped

  for (int64_t key0 = 0; key0 < num_keys;) {
    // 32 keys (FMA path) or 64 (AMX path: two K = 32 products), across pages.
    const int64_t n = std::min(amx ? AMX_KEYS : KEY_TILE, num_keys - key0);
    // f(i, count, row) for each run of the tile's keys inside one page: keys key0 + i .. + count - 1
    // are the contiguous cache rows row .. row + count - 1 (of the [blocks * Hkv * bs, D] view).
    const auto for_each_page = [&](auto&& f) {
      for (int64_t i = 0, blk = key0 / bs, off = key0 % bs; i < n; off = 0, ++blk) {
        const int64_t count = std::min(bs - off, n - i);
        f(i, count, (table[blk] * a.num_kv_heads + kvh) * bs + off);
        i += count;
      }
    };

    // S^T = Q K^T
    if (amx) {
#if defined(PF_AMX)
      if constexpr (kAmxable) {
        for_each_page([&](int64_t i, int64_t count, int64_t row) {
          for (int64_t j = 0; j < count; ++j) {
            sc.keys[i + j] = a.k_cache + (row + j) * D;
            sc.values[i + j] = a.v_cache + (row + j) * D;
          }
        });
        const auto* keys = reinterpret_cast<const c10::BFloat16* const*>(sc.keys.data());
        qk_amx<D>(reinterpret_cast<const uint32_t*>(qt), R, keys, n, sc.stage.data(), st);
      }
#endif
    } else if (direct) {  // fp32 rows read in place, one page's run at a time
      for_each_page([&](int64_t i, int64_t count, int64_t row) {
        qk_f32_all<D>(qt, R, reinterpret_cast<const float*>(a.k_cache) + row * D, count, st + i * R);
      });
    } else if (quant) {  // dequantized into L1 first
      for_each_page([&](int64_t i, int64_t count, int64_t row) {
        for (int64_t j = 0; j < count; ++j) {
          const int8_t* kr = a.k_q + (row + j) * (D + kKvScaleBytes);
          const int8_t* vr = a.v_q + (row + j) * (D + kKvScaleBytes);
          const __m512 ks = _mm512_set1_ps(kv_row_scale(kr, D)), vs = _mm512_set1_ps(kv_row_scale(vr, D));
          for (int c = 0; c < C; ++c) {
            _mm512_storeu_ps(sc.kf.data() + (i + j) * D + c * 16, _mm512_mul_ps(load_f32x16(kr + c * 16), ks));
            _mm512_storeu_ps(sc.vf.data() + (i + j) * D + c * 16, _mm512_mul_ps(load_f32x16(vr + c * 16), vs));
          }
        }
      });
      qk_f32_all<D>(qt, R, sc.kf.data(), n, st);
    } else {  // widened into L1 first
      for_each_page([&](int64_t i, int64_t count, int64_t row) {
        for (int64_t j = 0; j < count * C; ++j) {
          _mm512_storeu_ps(sc.kf.data() + i * D + j * 16, load_f32x16(a.k_cache + row * D + j * 16));
          _mm512_storeu_ps(sc.vf.data() + i * D + j * 16, load_f32x16(a.v_cache + row * D + j * 16));
        }
      });
      qk_f32_all<D>(qt, R, sc.kf.data(), n, st);
    }

    // Online softmax, 16 rows a vector. Only a tile crossing the diagonal (some key after the
    // tile's first query) needs the causal mask. Key 0 is in the first tile and every row sees
    // it, so m is finite from the first tile on (m - m_new is never -inf - -inf).
    const bool diagonal = key0 + n - 1 > first_pos;
    __mmask16 rescaled = 0;  // rows whose max moved this tile
    for (int64_t v = 0; v < R / 16; ++v) {
      const __m512i vpos = _mm512_loadu_si512(pos + v * 16);
      __m512 tile_max = neg_inf;
      for (int64_t i = 0; i < n; ++i) {
        __m512 s = _mm512_mul_ps(_mm512_loadu_ps(st + i * R + v * 16), vscale);
        if (diagonal) {
          const __mmask16 seen = _mm512_cmpge_epi32_mask(vpos, _mm512_set1_epi32(static_cast<int>(key0 + i)));
          s = _mm512_mask_mov_ps(neg_inf, seen, s);
        }
        _mm512_storeu_ps(st + i * R + v * 16, s);
        tile_max = _mm512_max_ps(tile_max, s);
      }
      const __m512 m_old = _mm512_loadu_ps(m + v * 16);
      const __m512 m_new = _mm512_max_ps(m_old, tile_max);
      rescaled |= _mm512_cmp_ps_mask(m_new, m_old, _CMP_NEQ_UQ);
      const __m512 rescale = exp2_16(_mm512_sub_ps(m_old, m_new));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t i = 0; i < n; ++i) {
        __m512 e = exp2_16(_mm512_sub_ps(_mm512_loadu_ps(st + i * R + v * 16), m_new));
        if (diagonal)
          e = _mm512_maskz_mov_ps(_mm512_cmpge_epi32_mask(vpos, _mm512_set1_epi32(static_cast<int>(key0 + i))), e);
        _mm512_storeu_ps(st + i * R + v * 16, e);
        sum = _mm512_add_ps(sum, e);
      }
      _mm512_storeu_ps(l + v * 16, _mm512_fmadd_ps(_mm512_loadu_ps(l + v * 16), rescale, sum));
      _mm512_storeu_ps(m + v * 16, m_new);
      _mm512_storeu_ps(alpha + v * 16, rescale);
#if defined(PF_AMX)
      if (amx) {
        // P for these 16 rows as bf16 pairs of keys: word (kp, r) = (p[2kp][r], p[2kp + 1][r]),
        // transposed to rows (the A tiles of O = P V), zero past key n.
        for (int64_t h = 0; h * 32 < n; ++h) {
          __m512i pairs[16];
          for (int64_t j = 0; j < 16; ++j) {
            const int64_t k = h * 32 + 2 * j;
            const __m512 p0 = k < n ? _mm512_loadu_ps(st + k * R + v * 16) : _mm512_setzero_ps();
            const __m512 p1 = k + 1 < n ? _mm512_loadu_ps(st + (k + 1) * R + v * 16) : _mm512_setzero_ps();
            pairs[j] = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
          }
          transpose16x16(pairs);
          for (int r = 0; r < 16; ++r) _mm512_storeu_si512(sc.pt.data() + v * 512 + r * 32 + h * 16, pairs[r]);
        }
      }
#endif
    }

    // O = O * alpha + P V
    if (amx) {
#if defined(PF_AMX)
      if constexpr (kAmxable) {
        if (rescaled && !o_zero)  // AMX accumulates into O in memory: rescale it first, when needed
          for (int64_t r = 0; r < R; ++r) {
            const __m512 s = _mm512_set1_ps(alpha[r]);
            for (int c = 0; c < C; ++c)
              _mm512_storeu_ps(o + r * D + c * 16, _mm512_mul_ps(_mm512_loadu_ps(o + r * D + c * 16), s));
          }
        pack_v_amx<D>(reinterpret_cast<const c10::BFloat16* const*>(sc.values.data()), n, sc.vp.data(), pair_lo,
                      pair_hi);
        pv_amx<D>(o, sc.pt.data(), R, sc.vp.data(), (n + 31) / 32);
      }
#endif
    } else if (direct) {  // the rescale by alpha rides on the first run's load of O
      for_each_page([&](int64_t i, int64_t count, int64_t row) {
        const float* v_rows = reinterpret_cast<const float*>(a.v_cache) + row * D;
        pv_f32<D>(o, i == 0 ? alpha : nullptr, st + i * R, R, v_rows, count);
      });
    } else {
      pv_f32<D>(o, alpha, st, R, sc.vf.data(), n);
    }
    o_zero = false;
    key0 += n;
  }

  for (int64_t r = 0; r < valid; ++r) {
    const __m512 inv = _mm512_set1_ps(1.f / l[r]);
    T* dst = a.out + ((row0 + t0 + r / g) * a.num_heads + kvh * g + r % g) * D;
    for (int c = 0; c < C; ++c) store_f32x16(dst + c * 16, _mm512_mul_ps(_mm512_loadu_ps(o + r * D + c * 16), inv));
  }
}
#endif  // PF_AVX512

template <typename T, int D>
static void run_tasks(const Args<T>& a, const std::vector<Task>& tasks, [[maybe_unused]] int64_t max_rows, Path path) {
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), tasks.size()));
  // Dynamic schedule over tasks sorted longest first: under causality a tile near the end of a
  // chunk sees many more keys than one near its start, so a static split would leave a thread idle.
#pragma omp parallel num_threads(threads)
  {
#if defined(PF_AVX512)
    std::unique_ptr<Scratch> sc;
    if (path != Path::kScalar) sc = std::make_unique<Scratch>(max_rows, D);
#if defined(PF_AMX)
    std::optional<llmserve_amx::TileScope> tiles;  // restores the thread's previous tile configuration
    if (path == Path::kAmx) tiles.emplace();
#endif
#endif
    std::vector<float> qf, scores, acc;
    alignas(64) float row[D];
    if (path == Path::kScalar) {
      qf.resize(a.group * D);
      acc.resize(a.group * D);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < static_cast<int64_t>(tasks.size()); ++i) {
#if defined(PF_AVX512)
      if (path != Path::kScalar) {
        vector_task<T, D>(a, tasks[i], *sc, path == Path::kAmx);
        continue;
      }
#endif
      scalar_task<T, D>(a, tasks[i], qf, scores, acc, row);
    }
  }
}

template <typename T>
static void dispatch_head_dim(int64_t head_dim, const Args<T>& a, const std::vector<Task>& tasks, int64_t max_rows,
                              Path path) {
  switch (head_dim) {
    case 16: return run_tasks<T, 16>(a, tasks, max_rows, path);
    case 32: return run_tasks<T, 32>(a, tasks, max_rows, path);
    case 64: return run_tasks<T, 64>(a, tasks, max_rows, path);
    case 80: return run_tasks<T, 80>(a, tasks, max_rows, path);
    case 96: return run_tasks<T, 96>(a, tasks, max_rows, path);
    case 128: return run_tasks<T, 128>(a, tasks, max_rows, path);
    case 256: return run_tasks<T, 256>(a, tasks, max_rows, path);
    default: TORCH_CHECK(false, "paged_attention_prefill_varlen: head_dim ", head_dim,
                         " not compiled in (16, 32, 64, 80, 96, 128, 256)");
  }
}

// The paths this build and this process can take for a dtype and head size, fastest first.
std::vector<std::string> paths_for([[maybe_unused]] at::ScalarType dtype, [[maybe_unused]] int64_t head_dim) {
  std::vector<std::string> paths;
#if defined(PF_AMX)
  if (dtype == at::kBFloat16 && head_dim % 32 == 0 && amx_usable()) paths.push_back("amx");
#endif
#if defined(PF_AVX512)
  paths.push_back("avx512");
#endif
  paths.push_back("scalar");
  return paths;
}

torch::Tensor prefill_impl(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& block_tables, const torch::Tensor& cu_seqlens,
                           const torch::Tensor& context_lens, double scale, int64_t max_query_len,
                           const std::string& path_name) {
  const char* fn = "paged_attention_prefill_varlen: ";
  for (const auto* t : {&q, &k_cache, &v_cache, &block_tables, &cu_seqlens, &context_lens})
    TORCH_CHECK(t->device().is_cpu(), fn, "every tensor must be on the CPU, got one on ", t->device());
  TORCH_CHECK(q.dim() == 3, fn, "q must be [tokens, heads, head_dim], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4, fn, "k_cache must be [num_blocks, kv_heads, block_size, head_dim], got ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), fn, "v_cache ", v_cache.sizes(), " must match k_cache ",
              k_cache.sizes());
  const bool quant = k_cache.scalar_type() == at::kChar;  // the int8 cache (kv_int8.h)
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type() && (quant || k_cache.scalar_type() == q.scalar_type()),
              fn, "q, k_cache and v_cache must share a dtype (or the caches be int8), got ", q.scalar_type(), ", ",
              k_cache.scalar_type(), ", ", v_cache.scalar_type());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, fn,
              "dtype must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), fn, "k_cache and v_cache must be contiguous");
  TORCH_CHECK(q.stride(2) == 1, fn, "q's last dimension must be contiguous");
  const int64_t num_tokens = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_blocks = k_cache.size(0), num_kv_heads = k_cache.size(1), block_size = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim + (quant ? kKvScaleBytes : 0), fn, "q's head_dim ", head_dim,
              quant ? " + 4 (an int8 row's scale) != the cache row's " : " != the cache's ", k_cache.size(3));
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, fn, "query heads (", num_heads,
              ") must be a multiple of kv heads (", num_kv_heads, ")");
  TORCH_CHECK(block_size > 0, fn, "block_size must be positive");
  TORCH_CHECK(block_tables.dim() == 2, fn, "block_tables must be [num_seqs, max_blocks], got ", block_tables.sizes());
  TORCH_CHECK(cu_seqlens.dim() == 1 && context_lens.dim() == 1, fn, "cu_seqlens and context_lens must be 1-D");
  const int64_t num_seqs = context_lens.size(0);
  TORCH_CHECK(cu_seqlens.size(0) == num_seqs + 1, fn, "cu_seqlens must have num_seqs + 1 = ", num_seqs + 1,
              " entries, got ", cu_seqlens.size(0));
  TORCH_CHECK(block_tables.size(0) == num_seqs, fn, "block_tables has ", block_tables.size(0), " rows for ", num_seqs,
              " sequences");
  for (const auto* t : {&block_tables, &cu_seqlens, &context_lens})
    TORCH_CHECK(t->scalar_type() == at::kInt || t->scalar_type() == at::kLong, fn,
                "block_tables, cu_seqlens and context_lens must be int32 or int64, got ", t->scalar_type());
  auto available = paths_for(dtype, head_dim);
  if (quant) available.erase(std::remove(available.begin(), available.end(), "amx"), available.end());
  Path path;
  if (path_name == "auto") {
    path = available.front() == "amx" ? Path::kAmx : available.front() == "avx512" ? Path::kAvx512 : Path::kScalar;
  } else {
    TORCH_CHECK(std::find(available.begin(), available.end(), path_name) != available.end(), fn, "path '", path_name,
                "' is not available for this dtype, head_dim, build or process");
    path = path_name == "amx" ? Path::kAmx : path_name == "avx512" ? Path::kAvx512 : Path::kScalar;
  }

  // Small: made contiguous int64 once (no copy when they already are).
  const auto tables = block_tables.to(at::kLong).contiguous();
  const auto cu = cu_seqlens.to(at::kLong).contiguous();
  const auto lens = context_lens.to(at::kLong).contiguous();
  const int64_t* cu_p = cu.data_ptr<int64_t>();
  const int64_t* lens_p = lens.data_ptr<int64_t>();
  const int64_t* tables_p = tables.data_ptr<int64_t>();
  const int64_t max_blocks = tables.size(1);
  TORCH_CHECK(cu_p[0] == 0, fn, "cu_seqlens[0] must be 0, got ", cu_p[0]);
  TORCH_CHECK(cu_p[num_seqs] == num_tokens, fn, "cu_seqlens[-1] = ", cu_p[num_seqs], " but q has ", num_tokens,
              " tokens");
  std::vector<int64_t> starts(num_seqs), row0(num_seqs);
  int64_t longest = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t n = cu_p[s + 1] - cu_p[s], ctx = lens_p[s];
    TORCH_CHECK(n >= 0, fn, "cu_seqlens must be non-decreasing (chunk ", s, ")");
    TORCH_CHECK(ctx >= n, fn, "context_lens[", s, "] = ", ctx, " is shorter than its chunk of ", n, " tokens");
    TORCH_CHECK(ctx < std::numeric_limits<int32_t>::max(), fn, "context_lens[", s, "] = ", ctx,
                " does not fit the kernel's 32-bit positions");
    const int64_t used = (ctx + block_size - 1) / block_size;
    TORCH_CHECK(used <= max_blocks, fn, "chunk ", s, " has ", ctx, " tokens of context: ", used,
                " blocks, but block_tables has ", max_blocks, " columns");
    if (n > 0)
      for (int64_t b = 0; b < used; ++b) {
        const int64_t id = tables_p[s * max_blocks + b];
        TORCH_CHECK(id >= 0 && id < num_blocks, fn, "block_tables[", s, ", ", b, "] = ", id,
                    " is outside the cache (", num_blocks, " blocks)");
      }
    starts[s] = ctx - n;
    row0[s] = cu_p[s];
    longest = std::max(longest, n);
  }
  TORCH_CHECK(max_query_len >= longest, fn, "max_query_len ", max_query_len, " is shorter than the longest chunk (",
              longest, ")");
  TORCH_CHECK(num_tokens < std::numeric_limits<int32_t>::max(), fn, "too many query tokens for 32-bit tasks");

  auto out = torch::empty({num_tokens, num_heads, head_dim}, q.options());
  const int64_t group = num_heads / num_kv_heads;
  const int64_t tokens_per_tile = tile_tokens(group, head_dim);
  std::vector<Task> tasks;
  int64_t max_rows = 16;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t n = cu_p[s + 1] - cu_p[s];
    for (int64_t t0 = 0; t0 < n; t0 += tokens_per_tile) {
      const int64_t t1 = std::min(n, t0 + tokens_per_tile);
      max_rows = std::max(max_rows, ((t1 - t0) * group + 15) / 16 * 16);
      for (int64_t h = 0; h < num_kv_heads; ++h)
        tasks.push_back({static_cast<int32_t>(s), static_cast<int32_t>(h), static_cast<int32_t>(t0),
                         static_cast<int32_t>(t1), (t1 - t0) * (starts[s] + t1)});
    }
  }
  if (tasks.empty()) return out;
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& x, const Task& y) { return x.cost > y.cost; });

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "paged_attention_prefill_varlen", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      Args<scalar_t> args{q.data_ptr<scalar_t>(), nullptr, nullptr, out.data_ptr<scalar_t>(), q.stride(0),
                          q.stride(1), num_heads, num_kv_heads, group, block_size, max_blocks, tables_p,
                          starts.data(), row0.data(), static_cast<float>(scale)};
      if (quant) {
        args.k_q = k_cache.data_ptr<int8_t>();
        args.v_q = v_cache.data_ptr<int8_t>();
      } else {
        args.k_cache = k_cache.data_ptr<scalar_t>();
        args.v_cache = v_cache.data_ptr<scalar_t>();
      }
      dispatch_head_dim<scalar_t>(head_dim, args, tasks, max_rows, path);
    }
  });
  return out;
}

}  // namespace

torch::Tensor paged_attention_prefill_varlen(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                             torch::Tensor block_tables, torch::Tensor cu_seqlens,
                                             torch::Tensor context_lens, double scale, int64_t max_query_len) {
  return prefill_impl(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, scale, max_query_len, "auto");
}

torch::Tensor paged_attention_prefill_varlen_path(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                                  torch::Tensor block_tables, torch::Tensor cu_seqlens,
                                                  torch::Tensor context_lens, double scale, int64_t max_query_len,
                                                  std::string path) {
  return prefill_impl(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, scale, max_query_len, path);
}

std::vector<std::string> paths(torch::Tensor q) { return paths_for(q.scalar_type(), q.size(-1)); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Pure tensor work: the server's event loop may run meanwhile (as it may beside torch's own ops).
  const py::call_guard<py::gil_scoped_release> nogil;
  m.def("paged_attention_prefill_varlen", &paged_attention_prefill_varlen, nogil,
        "varlen causal prefill attention over the paged KV cache (CPU), on the fastest path available");
  m.def("paged_attention_prefill_varlen_path", &paged_attention_prefill_varlen_path, nogil,
        "the same on a named path: 'amx', 'avx512' or 'scalar' (the portable loops), for tests");
  m.def("addresses", [] {
    using namespace llmserve_abi;
    return Addresses{{"paged_attention_prefill_varlen", address<PrefillAttnFn>(&paged_attention_prefill_varlen)}};
  }, "{name: address} of the kernels the C++ layer loop calls (kernel_abi.h)");
  m.def("paths", &paths, "the paths available for q's dtype and head size, fastest first");
}
