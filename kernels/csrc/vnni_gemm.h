// The int8 x int8 products of the w8a8 linear (w8a8_linear_cpu.cpp) with AVX-512 VNNI, for CPUs
// without AMX tiles but with AVX-512 BF16 for the epilogue (AMD Zen 4 and later, Intel Cooper Lake;
// Ice Lake and Cascade Lake lack BF16 and are refused). Same packed weights as the AMX
// path, same exact int32 sums, same epilogue: the two give the same bits.
//
// The tile layout [N / 16, K / 64, 16 (quad r), 16 (n), 4] is also VNNI's: quad r of a column
// block is one 64-byte vector holding W[n][4r .. 4r + 3] for its 16 columns, and a column block's
// quads follow each other (quad r at byte 64 r). `vpdpbusd acc, w, x` adds, per int32 lane n,
// the four products w[n][4r + i] * x[4r + i], with w unsigned and x signed. The weights are signed,
// so each loaded vector is flipped to w + 128 (an xor of the sign bit) and the exact correction
// 128 * sum_k x[m, k] is taken off the row's sums at the end:
//     sum_k (w + 128) x = sum_k w x + 128 sum_k x,
// every term an exact int32 (|sum| <= 255 * 127 * K, far inside int32 for K < 65,000).
//
// Blocking: a block is up to 12 rows x 2 column blocks (32 outputs) = 24 zmm accumulators, with
// the 2 weight vectors of the current quad in registers; each x quad is a 4-byte broadcast folded
// into vpdpbusd ({1to16}). Per quad: 2 weight loads feed 24 multiply-instructions (64 MACs each),
// which keeps Zen 4's one 512-bit vpdpbusd per cycle fed from L1. A task is one 32-column panel:
// its weights (32 x K bytes, 18 KB at K = 576) stay in L1/L2 while the row groups pass over them.
// Arithmetic for a 64-row decode step of SmolLM2-135M: 64 x 134 M = 8.6 G MAC; at 64 MAC a cycle
// and ~3.5 GHz on 2 cores that is ~19 ms of multiply-instructions, the step's floor on this path.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

namespace llmserve_vnni {

// Rows x column blocks of a block: 12 x 2 accumulators + 2 weight vectors of the 32 zmm registers.
// Measured against 8 x 3 and 6 x 4 (all of a step's matmuls, 2 threads, best of 7, 2026-12-03):
// 25.5 / 26.2 / 30.8 ms at 64 rows, 108 / 117 / 118 ms at 256. Dropping the xor (pre-flipped
// weights) measured no faster, so the AMX layout is kept as is.
constexpr int kMaxRows = 12;
constexpr int kPanelBlocks = 2;  // column blocks (of 16) per task
constexpr int64_t kPrefetchQuads = 16;  // weight prefetch distance, in quads (1 KB per block ahead)

// The sum of a row's codes (x signed, ones unsigned), subtracted as above. k_len: a multiple of 64.
inline int32_t code_sum(const int8_t* q, int64_t k_len) {
  __m512i acc = _mm512_setzero_si512();
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t k = 0; k < k_len; k += 64) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512(q + k));
  return _mm512_reduce_add_epi32(acc);
}

struct Args {
  const int8_t* grouped;  // [M, K] activation codes, each row group as [K / 4, its rows, 4]
  const int32_t* xsum;    // [M] their row sums
  const float* sx;        // [M] row scales
  int64_t k_len;
  const char* w;          // the packed weights
  int64_t block_bytes;    // of one column block: 16 K
  const float* sw;        // [N] weight row scales
  const float* bias;      // [N] or nullptr
  c10::BFloat16* out;     // [M, N]
  int64_t n_len;
};

// out rows [m0, m0 + MR) x columns [16 nb0, 16 (nb0 + NB)) = bf16((float(c) * sx) * sw + bias),
// c the exact int32 sums. No FMA: the file is built with -ffp-contract=off, as the AMX epilogue.
template <int MR, int NB>
void block(const Args& a, int64_t m0, int64_t nb0) {
  __m512i acc[MR][NB];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const char* b = a.w + nb0 * a.block_bytes;
  const int8_t* q = a.grouped + m0 * a.k_len;  // this group's codes, [K / 4, MR, 4]
  const int64_t quads = a.k_len / 4;
  for (int64_t r = 0; r < quads; ++r, q += 4 * MR) {
    __m512i w[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      const char* p = b + j * a.block_bytes + r * 64;
      _mm_prefetch(p + kPrefetchQuads * 64, _MM_HINT_T0);  // past the block's end: only a hint
      w[j] = _mm512_xor_si512(_mm512_loadu_si512(p), flip);
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      int32_t quad;
      std::memcpy(&quad, q + 4 * i, 4);
      const __m512i x = _mm512_set1_epi32(quad);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], w[j], x);
    }
  }
  // Out of registers first, in a loop the compiler unrolls whole: a use of acc at a run-time
  // index would keep the accumulators in memory through the k loop.
  alignas(64) int32_t c[MR][NB * 16];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) _mm512_store_si512(c[i] + 16 * j, acc[i][j]);
  for (int i = 0; i < MR; ++i) {
    const int64_t m = m0 + i;
    const __m512i correction = _mm512_set1_epi32(128 * a.xsum[m]);
    const __m512 row_scale = _mm512_set1_ps(a.sx[m]);
    for (int j = 0; j < NB; ++j) {
      const int64_t n = (nb0 + j) * 16;
      __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(c[i] + 16 * j), correction));
      v = _mm512_mul_ps(_mm512_mul_ps(v, row_scale), _mm512_loadu_ps(a.sw + n));
      if (a.bias != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(a.bias + n));
      const __m256bh h = _mm512_cvtneps_pbh(v);
      std::memcpy(a.out + m * a.n_len + n, &h, 32);
    }
  }
}

using BlockFn = void (*)(const Args&, int64_t, int64_t);

template <int NB, std::size_t... R>
constexpr std::array<BlockFn, sizeof...(R)> block_table(std::index_sequence<R...>) {
  return {&block<static_cast<int>(R) + 1, NB>...};
}

// tables[NB - 1][MR - 1] = block<MR, NB>
template <std::size_t... N>
constexpr auto all_tables(std::index_sequence<N...>) {
  return std::array<std::array<BlockFn, kMaxRows>, sizeof...(N)>{
      block_table<static_cast<int>(N) + 1>(std::make_index_sequence<kMaxRows>{})...};
}

// out[M, N] = the w8a8 product of M activation rows and the packed weights w; see Args. One
// parallel region does it all (a fork and a join per linear, not two):
//   1. the rows in equal groups of at most 12 (64 rows: 11, 11, 11, 11, 10, 10), a group per
//      task: `quantize(m)` writes row m's codes to q + m K (with sx[m]), its code sum goes to
//      xsum[m], and the group's codes are interleaved quad by quad into `grouped` ([K / 4, rows,
//      4]), so the block reads a quad's rows from one pointer at constant offsets instead of
//      holding 12 row pointers in registers;
//   2. one task per 32-column panel, dynamically scheduled (a thread descheduled by the event loop
//      does not hold the others up), each passing over all the row groups.
template <class Quantize>
void vnni_gemm(int64_t m_len, int64_t k_len, Quantize&& quantize, int8_t* q, int32_t* xsum, const float* sx,
               const char* w, const float* sw, const float* bias, int64_t n_len, c10::BFloat16* out,
               int8_t* grouped) {
  static constexpr auto tables = all_tables(std::make_index_sequence<kPanelBlocks>{});
  const int64_t groups = (m_len + kMaxRows - 1) / kMaxRows;
  const int64_t base = m_len / groups, extra = m_len % groups;  // group g: base + (g < extra) rows
  const auto group_start = [&](int64_t g) { return g * base + std::min(g, extra); };
  const int64_t quads = k_len / 4;
  const Args a{grouped, xsum, sx, k_len, w, 16 * k_len, sw, bias, out, n_len};
  const int64_t n_blocks = n_len / 16;
  const int64_t tasks = (n_blocks + kPanelBlocks - 1) / kPanelBlocks;
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), tasks));
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t m0 = group_start(g), rows = group_start(g + 1) - m0;
      auto* dst = reinterpret_cast<int32_t*>(grouped + m0 * k_len);  // [K / 4, rows] quads
      for (int64_t i = 0; i < rows; ++i) {
        quantize(m0 + i);
        xsum[m0 + i] = code_sum(q + (m0 + i) * k_len, k_len);
        const auto* src = reinterpret_cast<const int32_t*>(q + (m0 + i) * k_len);
        for (int64_t r = 0; r < quads; ++r) dst[r * rows + i] = src[r];
      }
    }  // the implicit barrier: every group is ready before any panel starts
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t nb0 = t * kPanelBlocks;
      const auto& table = tables[std::min<int64_t>(kPanelBlocks, n_blocks - nb0) - 1];
      for (int64_t g = 0; g < groups; ++g) table[group_start(g + 1) - group_start(g) - 1](a, group_start(g), nb0);
    }
  }
}

}  // namespace llmserve_vnni
