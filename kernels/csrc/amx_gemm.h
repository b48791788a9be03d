// The tile loop shared by the two AMX linear kernels: bf16 (amx_linear_cpu.cpp, `tdpbf16ps`) and
// int8 x int8 (w8a8_linear_cpu.cpp, `tdpbssd`). Both see a k step as 64 bytes of each A row and
// one 1 KB B tile per 16 output columns, and accumulate 32-bit C tiles (fp32 or int32); only the
// tile product and the epilogue differ. Include where AMX is compiled in (amx_tiles.h).
//
// Blocking: a task is two column blocks (32 outputs); for each pair of 16-row blocks of A it keeps
// a 2 x 2 grid of C tiles (tmm0-3) and, per k step, loads 2 A tiles (from L1/L2) and 2 B tiles:
// 4 tile products per 4 KB loaded. The first row pair reads the B tiles from DRAM, the others from
// L1/L2. Each row's result uses the same tile products in the same k order whatever M is, so the
// output of a row does not depend on its batch neighbours.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "amx_tiles.h"

namespace llmserve_amx {

enum class TileProduct { kBf16, kInt8 };

constexpr int64_t kKStepBytes = 64;    // of one A row per k step (32 bf16 or 64 int8)
constexpr int64_t kBTileBytes = 1024;  // one B tile: 16 columns x one k step
// B tiles prefetched this many k steps ahead: the first row pair reads them from DRAM. 1-4 ahead
// measured 9-16% faster than none at M = 16-256 (all of a step's bf16 matmuls, 2 threads); 2 was
// best. A prefetch past the end of a block only touches the next block (prefetches do not fault).
constexpr int64_t kPrefetchTiles = 2;

// The tile intrinsics take constant tile numbers, hence a macro rather than a function.
#define LLMSERVE_TILE_PRODUCT(P, C, A, B) \
  do {                                    \
    if constexpr (P == TileProduct::kBf16) \
      _tile_dpbf16ps(C, A, B);            \
    else                                  \
      LLMSERVE_TILE_INT8(C, A, B);        \
  } while (0)
#if defined(__AMX_INT8__)
#define LLMSERVE_TILE_INT8(C, A, B) _tile_dpbssd(C, A, B)
#else
#define LLMSERVE_TILE_INT8(C, A, B) static_assert(P != TileProduct::kInt8, "built without AMX-INT8")
#endif

// C tiles of rows [16 MB) x columns [16 NB) for one row block pair and column block pair, into c
// ([32][32] 32-bit values). a: this row block's A rows (a_stride bytes apart); b0, b1: the two
// column blocks' B tiles, k_steps of them each.
template <TileProduct P, int MB, int NB>
inline void tile_block(const char* a, int64_t a_stride, const char* b0, const char* b1, int64_t k_steps, void* c) {
  _tile_zero(0);
  if constexpr (NB == 2) _tile_zero(1);
  if constexpr (MB == 2) _tile_zero(2);
  if constexpr (MB == 2 && NB == 2) _tile_zero(3);
  for (int64_t kb = 0; kb < k_steps; ++kb) {
    for (int64_t line = 0; line < kBTileBytes; line += 64) {  // a prefetch per cache line of the B tiles
      _mm_prefetch(b0 + (kb + kPrefetchTiles) * kBTileBytes + line, _MM_HINT_T0);
      if constexpr (NB == 2) _mm_prefetch(b1 + (kb + kPrefetchTiles) * kBTileBytes + line, _MM_HINT_T0);
    }
    _tile_loadd(4, a + kb * kKStepBytes, a_stride);
    if constexpr (MB == 2) _tile_loadd(5, a + 16 * a_stride + kb * kKStepBytes, a_stride);
    _tile_loadd(6, b0 + kb * kBTileBytes, 64);
    if constexpr (NB == 2) _tile_loadd(7, b1 + kb * kBTileBytes, 64);
    LLMSERVE_TILE_PRODUCT(P, 0, 4, 6);
    if constexpr (NB == 2) LLMSERVE_TILE_PRODUCT(P, 1, 4, 7);
    if constexpr (MB == 2) LLMSERVE_TILE_PRODUCT(P, 2, 5, 6);
    if constexpr (MB == 2 && NB == 2) LLMSERVE_TILE_PRODUCT(P, 3, 5, 7);
  }
  auto* out = static_cast<char*>(c);
  constexpr int64_t ld = 32 * 4;  // bytes between rows of c
  _tile_stored(0, out, ld);
  if constexpr (NB == 2) _tile_stored(1, out + 16 * 4, ld);
  if constexpr (MB == 2) _tile_stored(2, out + 16 * ld, ld);
  if constexpr (MB == 2 && NB == 2) _tile_stored(3, out + 16 * ld + 16 * 4, ld);
}

// out = A[m_pad rows, a_stride bytes apart] x W (n_len / 16 column blocks of k_steps B tiles each),
// each 32 x 32 block of C handed to store(c, rows, column_blocks, m0, n0) as it is done. Dynamic
// tasks: a thread descheduled by the event loop or a client does not hold the others up.
template <TileProduct P, class C, class Store>
void tile_gemm(const char* a, int64_t a_stride, int64_t m_len, const char* w, int64_t n_len, int64_t k_steps,
               Store&& store) {
  const int64_t m_blocks = (m_len + 15) / 16, n_blocks = n_len / 16;
  const int64_t tasks = (n_blocks + 1) / 2;
  const int64_t block_bytes = k_steps * kBTileBytes;  // one column block's tiles
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), tasks));
#pragma omp parallel num_threads(threads)
  {
    const TileScope tiles;  // restores the thread's previous tile configuration
    alignas(64) C c[32 * 32];
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t nb0 = 2 * t;
      const bool two_n = nb0 + 1 < n_blocks;
      const char* b0 = w + nb0 * block_bytes;
      const char* b1 = b0 + block_bytes;
      for (int64_t mb = 0; mb < m_blocks; mb += 2) {
        const bool two_m = mb + 1 < m_blocks;
        const char* ap = a + mb * 16 * a_stride;
        if (two_m && two_n) tile_block<P, 2, 2>(ap, a_stride, b0, b1, k_steps, c);
        else if (two_m) tile_block<P, 2, 1>(ap, a_stride, b0, b1, k_steps, c);
        else if (two_n) tile_block<P, 1, 2>(ap, a_stride, b0, b1, k_steps, c);
        else tile_block<P, 1, 1>(ap, a_stride, b0, b1, k_steps, c);
        store(static_cast<const C*>(c), std::min<int64_t>(two_m ? 32 : 16, m_len - mb * 16), two_n ? 2 : 1, mb * 16,
              nb0 * 16);
      }
    }
  }
}

}  // namespace llmserve_amx
