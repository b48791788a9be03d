// Weight-only 4-bit matmul for a few rows of activations (decode steps), on CPU, with the weights
// in groups of 32 along K, each group with its own scale d and offset m (GGUF's Q4_1 scheme):
//
//   w[n, k] = d[n, g] * q[n, k] + m[n, g]        q in 0..15, g = k / 32, d and m float16
//
// The activations of each row are quantized per group of 32 as well, to int8 with one float32
// scale sx (round to nearest, |code| <= 127), as llama.cpp pairs Q4_1 weights with Q8_1
// activations; the offset term uses the exact float32 sum of x:
//
//   out[m, n] = T(sum_g (d[n, g] * sx[m, g] * sum_{k in g} q[n, k] * xq[m, k] + m[n, g] * sum_{k in g} x[m, k]) + bias[n])
//
// The inner sums are exact int32 (AVX-512 VNNI `vpdpbusd`: 4 products of u8 code x s8 activation
// per lane); the per-group steps are float32 in g order (T: x's dtype).
//
// Why 4 bits: one decode stream reads every weight once per token, so its step is bound by memory
// bandwidth. SmolLM2-135M's body is 106M weights: 106 MB in int8, 66 MB here (5 bits a weight: 4
// for the code, 1 for the two float16 per 32), ~5.3 vs ~3.3 ms at the ~20 GB/s these 2 cores get
// from DRAM. The built-in model's GGUF file stores its body in exactly this scheme (Q4_1), so its
// codes, scales and offsets come back from the dequantized weights (llmserve/int4_linear.py).
//
// Why int8 activations: with float activations each 4-bit code needs its own conversion to float
// and an FMA (~7 vector ops per 32 weights, measured no faster than the int8 kernel: compute-bound).
// With VNNI, 512 weights of one block and group cost 4 loads, 12 mask/shift ops and 8 `vpdpbusd`
// per row of x, plus 4 float ops per group and row: ~1.5 cycles per 32 weights, so the loop is
// memory-bound with room for several rows (each further row adds 8 `vpdpbusd` + 4 per 512 weights).
//
// Layout (built by int4_linear.pack_groups): [ceil(N / 16), K / 32, 320] bytes. Block b holds output
// rows 16b..16b+15; for each group, 16 float16 d, 16 float16 m, then 4 chunks of 64 bytes: in chunk
// c, row i's 4 bytes at 4i hold k = 8c + b (low nibble) and k = 8c + 4 + b (high nibble), b = 0..3.
// One 64-byte load is 8 k for 16 rows: two `vpdpbusd` after a mask and a shift, no horizontal
// reduction, and each block is one sequential stream (rows past N are zero padding: d = m = 0).
//
// Compiled WITHOUT -ffast-math and with -ffp-contract=off: the scalar fallback must give the same
// bits as the vector path (same operations in the same order).
#include <torch/extension.h>
#include "kernel_abi.h"
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 16;                          // output rows per block (one zmm of sums)
constexpr int64_t kGroup = 32;                          // weights of one row sharing d and m
constexpr int64_t kScaleBytes = 2 * kLanes * 2;         // 16 float16 d, then 16 float16 m
constexpr int64_t kGroupBytes = kScaleBytes + kLanes * kGroup / 2;  // + 4 chunks x 64 bytes = 320
constexpr int64_t kChunks = kGroup / 8;                 // 64-byte loads of codes per group
constexpr int64_t kBlockRows = 4;                       // rows of x per pass over the weights
constexpr int kMaxTile = 8;                             // blocks streamed side by side
// Software prefetch distance in each stream; 1 to 8 groups ahead measured within noise (15-18 GB/s).
constexpr int64_t kPrefetchGroups = 2;
constexpr int64_t kMinBytesPerThread = 32 * 1024;       // as in int8_gemv_cpu.cpp

inline float bf16_to_f32(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as c10::BFloat16(float)
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline void store(float* out, float v) { *out = v; }
inline void store(c10::BFloat16* out, float v) { out->x = f32_to_bf16(v); }

// MB rows of quantized x (row stride K), their group scales and sums (row stride G) times J
// consecutive blocks starting at w; writes the raw sums to sums[(m * J + j) * 16 + lane].
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))

// Group g + kPrefetchGroups of each of the J block streams into L1, stopping at this thread's last
// block: the hardware prefetcher alone does not keep J interleaved streams busy (see the int8 kernel).
template <int J>
inline void prefetch_group(const uint8_t* w, int64_t stride, int64_t g, const uint8_t* w_end) {
  const char* end = reinterpret_cast<const char*>(w_end);
  for (int j = 0; j < J; ++j) {
    const char* ahead = reinterpret_cast<const char*>(w + j * stride + (g + kPrefetchGroups) * kGroupBytes);
    for (int64_t line = 0; line < kGroupBytes; line += 64)
      if (ahead + line < end) _mm_prefetch(ahead + line, _MM_HINT_T0);
  }
}

#endif

#if defined(__AVX512F__) && defined(__AVX512VNNI__)

template <int MB, int J>
void tile_sums(const int8_t* xq, const float* xscale, const float* xsum, int64_t K, int64_t G,
               const uint8_t* w, const uint8_t* w_end, float* sums) {
  const int64_t stride = G * kGroupBytes;
  const __m512i low4 = _mm512_set1_epi8(15);
  __m512 acc[MB][J];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < J; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    prefetch_group<J>(w, stride, g, w_end);
    __m512i s[MB][J];
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < J; ++j) s[m][j] = _mm512_setzero_si512();
    const int8_t* xg = xq + g * kGroup;
    for (int64_t c = 0; c < kChunks; ++c) {
      for (int j = 0; j < J; ++j) {
        const __m512i codes = _mm512_loadu_si512(w + j * stride + g * kGroupBytes + kScaleBytes + c * 64);
        const __m512i lo = _mm512_and_si512(codes, low4);  // k = 8c .. 8c + 3, 4 bytes per row
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(codes, 4), low4);  // k = 8c + 4 .. 8c + 7
        for (int m = 0; m < MB; ++m) {
          int32_t x_lo, x_hi;  // 4 int8 activations each, broadcast to the 16 rows
          std::memcpy(&x_lo, xg + m * K + 8 * c, 4);
          std::memcpy(&x_hi, xg + m * K + 8 * c + 4, 4);
          s[m][j] = _mm512_dpbusd_epi32(s[m][j], lo, _mm512_set1_epi32(x_lo));
          s[m][j] = _mm512_dpbusd_epi32(s[m][j], hi, _mm512_set1_epi32(x_hi));
        }
      }
    }
    for (int j = 0; j < J; ++j) {
      const uint8_t* scales = w + j * stride + g * kGroupBytes;
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales)));
      const __m512 off = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + 32)));
      for (int m = 0; m < MB; ++m) {
        const __m512 ds = _mm512_mul_ps(d, _mm512_set1_ps(xscale[m * G + g]));
        acc[m][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[m][j]), ds, acc[m][j]);
        acc[m][j] = _mm512_fmadd_ps(_mm512_set1_ps(xsum[m * G + g]), off, acc[m][j]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < J; ++j) _mm512_storeu_ps(sums + (m * J + j) * kLanes, acc[m][j]);
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// AVX2 (AMD Zen 1-3, Intel Haswell to Alder Lake): a block's 16 rows as two 8-row halves, and
// vpdpbusd emulated by vpmaddubsw (u8 code x s8 activation, summed in pairs: at most 2 x 15 x 127,
// so it never saturates) then vpmaddwd with ones (pairs of int16 -> int32): the same exact int32
// sums, and the float steps below in the same order, so the same bits as the VNNI path. Per 32
// bytes of codes and row of x: 2 and, 1 shift, 2 x (maddubs + madd + add).

inline __m256i dot4(__m256i acc, __m256i codes, __m256i x) {
  const __m256i pairs = _mm256_maddubs_epi16(codes, x);  // [16] int16
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));  // [8] int32
}

template <int MB, int J>
void tile_sums(const int8_t* xq, const float* xscale, const float* xsum, int64_t K, int64_t G,
               const uint8_t* w, const uint8_t* w_end, float* sums) {
  const int64_t stride = G * kGroupBytes;
  const __m256i low4 = _mm256_set1_epi8(15);
  __m256 acc[MB][J][2];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < J; ++j) acc[m][j][0] = acc[m][j][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    prefetch_group<J>(w, stride, g, w_end);
    __m256i s[MB][J][2];
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < J; ++j) s[m][j][0] = s[m][j][1] = _mm256_setzero_si256();
    const int8_t* xg = xq + g * kGroup;
    for (int64_t c = 0; c < kChunks; ++c) {
      for (int j = 0; j < J; ++j)
        for (int h = 0; h < 2; ++h) {
          const __m256i codes = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(w + j * stride + g * kGroupBytes + kScaleBytes + c * 64 + 32 * h));
          const __m256i lo = _mm256_and_si256(codes, low4);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(codes, 4), low4);
          for (int m = 0; m < MB; ++m) {
            int32_t x_lo, x_hi;
            std::memcpy(&x_lo, xg + m * K + 8 * c, 4);
            std::memcpy(&x_hi, xg + m * K + 8 * c + 4, 4);
            s[m][j][h] = dot4(dot4(s[m][j][h], lo, _mm256_set1_epi32(x_lo)), hi, _mm256_set1_epi32(x_hi));
          }
        }
    }
    for (int j = 0; j < J; ++j)
      for (int h = 0; h < 2; ++h) {
        const uint8_t* scales = w + j * stride + g * kGroupBytes;
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + 16 * h)));
        const __m256 off = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + 32 + 16 * h)));
        for (int m = 0; m < MB; ++m) {
          const __m256 ds = _mm256_mul_ps(d, _mm256_set1_ps(xscale[m * G + g]));
          acc[m][j][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[m][j][h]), ds, acc[m][j][h]);
          acc[m][j][h] = _mm256_fmadd_ps(_mm256_set1_ps(xsum[m * G + g]), off, acc[m][j][h]);
        }
      }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < J; ++j)
      for (int h = 0; h < 2; ++h) _mm256_storeu_ps(sums + (m * J + j) * kLanes + 8 * h, acc[m][j][h]);
}

#else  // portable fallback: the same integer sums (exact in any order) and the same float steps

inline float half_at(const uint8_t* p, int64_t lane) {
  c10::Half h;
  std::memcpy(&h.x, p + 2 * lane, 2);
  return static_cast<float>(h);  // exact, as vcvtph2ps
}

template <int MB, int J>
void tile_sums(const int8_t* xq, const float* xscale, const float* xsum, int64_t K, int64_t G,
               const uint8_t* w, const uint8_t*, float* sums) {
  const int64_t stride = G * kGroupBytes;
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < J; ++j)
      for (int64_t lane = 0; lane < kLanes; ++lane) {
        float acc = 0.f;
        for (int64_t g = 0; g < G; ++g) {
          const uint8_t* group = w + j * stride + g * kGroupBytes;
          const int8_t* xg = xq + m * K + g * kGroup;
          int32_t s = 0;
          for (int64_t c = 0; c < kChunks; ++c)
            for (int64_t b = 0; b < 4; ++b) {
              const uint8_t code = group[kScaleBytes + c * 64 + lane * 4 + b];
              s += (code & 15) * xg[8 * c + b] + (code >> 4) * xg[8 * c + 4 + b];
            }
          const float ds = half_at(group, lane) * xscale[m * G + g];
          acc = std::fma(static_cast<float>(s), ds, acc);
          acc = std::fma(xsum[m * G + g], half_at(group + 32, lane), acc);
        }
        sums[(m * J + j) * kLanes + lane] = acc;
      }
}

#endif

using TileFn = void (*)(const int8_t*, const float*, const float*, int64_t, int64_t, const uint8_t*, const uint8_t*,
                       float*);

template <int MB, int... Js>
constexpr std::array<TileFn, sizeof...(Js)> tiles_for_rows(std::integer_sequence<int, Js...>) {
  return {&tile_sums<MB, Js + 1>...};
}

template <int... MBs>
constexpr std::array<std::array<TileFn, kMaxTile>, sizeof...(MBs)> tile_table(std::integer_sequence<int, MBs...>) {
  return {tiles_for_rows<MBs + 1>(std::make_integer_sequence<int, kMaxTile>{})...};
}

constexpr auto kTiles = tile_table(std::make_integer_sequence<int, kBlockRows>{});  // [mb - 1][j - 1]

// Blocks side by side for mb rows: 2 * MB * J accumulators (the group's sums and the total) plus a
// few temporaries must fit the 32 zmm registers.
// AVX2: 2 * 2 * MB * J halves in 16 ymm.
#if defined(__AVX512F__) || !defined(__AVX2__)
constexpr int tile_blocks(int64_t mb) { return mb <= 1 ? 8 : mb <= 2 ? 5 : mb <= 3 ? 4 : 3; }
#else
constexpr int tile_blocks(int64_t mb) { return mb <= 1 ? 2 : 1; }
#endif

// The activations of each row, group by group: int8 codes xq = round(x * 127 / max|x|), the scale
// max|x| / 127, and the exact float32 sum of x (in k order), which multiplies the offsets m.
struct QuantizedRows {
  torch::Tensor codes, scales, sums;  // [M, K] int8, [M, G] float32, [M, G] float32
};

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K) {
  const int64_t G = K / kGroup;
  QuantizedRows q{torch::empty({M, K}, torch::kInt8), torch::empty({M, G}, torch::kFloat32),
                  torch::empty({M, G}, torch::kFloat32)};
  int8_t* codes = q.codes.data_ptr<int8_t>();
  float* scales = q.scales.data_ptr<float>();
  float* sums = q.sums.data_ptr<float>();
  for (int64_t i = 0; i < M * G; ++i) {
    const float* xg = x + i * kGroup;
    float amax = 0.f, sum = 0.f;
    for (int64_t k = 0; k < kGroup; ++k) {
      amax = std::max(amax, std::fabs(xg[k]));
      sum += xg[k];
    }
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t k = 0; k < kGroup; ++k)
      codes[i * kGroup + k] = static_cast<int8_t>(std::clamp(std::nearbyint(xg[k] * inv), -127.f, 127.f));
    scales[i] = amax / 127.f;
    sums[i] = sum;
  }
  return q;
}

template <typename T>
void linear_impl(const QuantizedRows& q, int64_t M, int64_t K, const uint8_t* w, const float* bias, T* out,
                 int64_t N) {
  const int64_t G = K / kGroup, blocks = (N + kLanes - 1) / kLanes;
  const int tile = tile_blocks(std::min(M, kBlockRows));
  const int8_t* xq = q.codes.data_ptr<int8_t>();
  const float* xscale = q.scales.data_ptr<float>();
  const float* xsum = q.sums.data_ptr<float>();
  auto body = [&](int64_t begin, int64_t end) {
    float sums[kBlockRows * kMaxTile * kLanes];
    const uint8_t* w_end = w + end * G * kGroupBytes;  // prefetches stop at this chunk's last block
    for (int64_t b = begin; b < end; b += tile) {
      const int64_t j = std::min<int64_t>(tile, end - b);
      const uint8_t* wb = w + b * G * kGroupBytes;
      for (int64_t m0 = 0; m0 < M; m0 += kBlockRows) {  // further row blocks find the tile in L2
        const int64_t mb = std::min(kBlockRows, M - m0);
        kTiles[mb - 1][j - 1](xq + m0 * K, xscale + m0 * G, xsum + m0 * G, K, G, wb, w_end, sums);
        for (int64_t m = 0; m < mb; ++m) {
          T* row = out + (m0 + m) * N;
          for (int64_t i = 0; i < j * kLanes; ++i) {
            const int64_t n = b * kLanes + i;
            if (n >= N) break;  // padding rows of the last block
            store(row + n, sums[m * j * kLanes + i] + (bias ? bias[n] : 0.f));
          }
        }
      }
    }
  };
  // Chunks handed out dynamically, ~4 per thread, not an even static split: in the server the
  // event loop and the client share these 2 cores, and a thread descheduled for a moment would
  // otherwise hold up the whole region. One stream served, two interleaved rounds (2026-12-01):
  // engine step p50 16.2 / 15.8 / 19.5 / 17.5 ms dynamic against 17.1 / 19.1 / 19.1 / 21.8 static,
  // ITL p50 16.2-18.7 against 17.6-21.4 ms.
  const int threads = at::get_num_threads();
  const int64_t step = std::max<int64_t>(1, std::min<int64_t>(tile, blocks / (4 * threads)));
  const int64_t chunks = (blocks + step - 1) / step;
  const bool parallel = threads > 1 && blocks * G * kGroupBytes >= 2 * kMinBytesPerThread;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (parallel)
  for (int64_t c = 0; c < chunks; ++c) body(c * step, std::min(blocks, (c + 1) * step));
}

// x [M, K] float32 or bfloat16; packed [ceil(N / 16), K / 32, 320] uint8 (see the layout above);
// bias [N] float32 or None. Returns [M, N] in x's dtype.
torch::Tensor int4_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t N,
                          const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "int4_linear runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] tensor, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % kGroup == 0, "x has K = ", K, " columns, not a multiple of ", kGroup);
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kGroupBytes && packed.is_contiguous() &&
                  packed.scalar_type() == torch::kUInt8,
              "w must be the uint8 [ceil(N / 16), K / 32, 320] layout from pack_groups, got ", packed.sizes());
  TORCH_CHECK(packed.size(1) == K / kGroup, "x has K = ", K, " columns but w has ", packed.size(1), " groups of 32");
  TORCH_CHECK(N >= 0 && packed.size(0) == (N + kLanes - 1) / kLanes, "w has ", packed.size(0),
              " blocks of 16 rows, not enough or too many for N = ", N);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == torch::kFloat32 &&
                    bias->is_contiguous() && bias->device().is_cpu(),
                "bias must be a contiguous float32 [", N, "] CPU tensor");
  }
  auto out = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const torch::Tensor xf = x.scalar_type() == torch::kFloat32 ? x : x.to(torch::kFloat32);  // exact, a few KB
  const QuantizedRows q = quantize_rows(xf.data_ptr<float>(), M, K);
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const uint8_t* w = packed.data_ptr<uint8_t>();
  if (x.scalar_type() == torch::kFloat32) {
    linear_impl<float>(q, M, K, w, bp, out.data_ptr<float>(), N);
  } else {
    linear_impl<c10::BFloat16>(q, M, K, w, bp, out.data_ptr<c10::BFloat16>(), N);
  }
  return out;
}

// The activation quantization alone, for tests: (codes [M, K] int8, scales [M, K / 32], sums [M, K / 32]).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> int4_quantize_activations(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % kGroup == 0, "x must be [M, K] with K a multiple of ", kGroup);
  const torch::Tensor xf = x.to(torch::kFloat32).contiguous();
  QuantizedRows q = quantize_rows(xf.data_ptr<float>(), x.size(0), x.size(1));
  return {q.codes, q.scales, q.sums};
}

const char* inner_loop() {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  return "avx2";
#else
  return "portable";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Pure tensor work: the server's event loop may run meanwhile (as it may beside torch's own ops).
  const py::call_guard<py::gil_scoped_release> nogil;
  m.def("int4_linear", &int4_linear, nogil, "T(x @ W.T + bias) for 4-bit group-quantized W (see the layout)",
        py::arg("x"), py::arg("w"), py::arg("n"), py::arg("bias") = py::none());
  m.def("int4_quantize_activations", &int4_quantize_activations, nogil,
        "the kernel's int8 activations: (codes, scales, sums) per group of 32", py::arg("x"));
  m.def("addresses", [] {
    using namespace llmserve_abi;
    return Addresses{{"int4_linear", address<PackedLinearFn>(&int4_linear)}};
  }, "{name: address} of the kernels the C++ layer loop calls (kernel_abi.h)");
  m.def("inner_loop", &inner_loop, "the inner loop this build uses: avx512, avx2 or portable");
}
