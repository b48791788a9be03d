// Weight-only int8 matmul for a few rows of activations (decode steps), on CPU:
//
//   out[m, n] = T(T(sum_k x[m, k] * q[n, k]) * scale[n] + bias[n])    (T: x's dtype)
//
// with q the int8 codes [N, K] and one float32 scale per output row, summed in float32 by fused
// multiply-adds in k order (for bf16 x every product is exact in float32: 8 x 7 significant bits).
// The activations are never quantized.
//
// Why the scale comes after a rounding to T: the engine's large-batch path is a bf16 GEMM over the
// codes (exact in bf16) that stores T(sum) and then applies `int8_scale_bias_` below. This kernel
// rounds at the same place and shares that epilogue, so the two paths compute one function and
// differ only in the order of the float32 sums. (For float32 the inner rounding is the identity.)
//
// Layout (`int8_pack`): q [N, K] becomes [ceil(N / 16), K, 16]: block b holds output rows
// 16b..16b+15, and for each k their 16 codes side by side. One 16-byte load is then one k for 16
// outputs: a vector of 16 sums per block, no horizontal reduction at the end, and every block is
// one sequential stream of 16 K bytes (rows past N are zero padding).
//
// Bandwidth: a decode step reads every weight once; at M = 1 the work per weight is one int8 ->
// fp32 conversion and one FMA (16 lanes at a time), ~1.5 cycles per 16 weights, so one core could
// consume ~35 GB/s and the loop runs at memory speed: measured 20.5 GB/s from DRAM on this 2-core
// Xeon, 6.6 ms for one SmolLM2-135M step (134M weights) vs 14.8 ms for oneDNN's packed bf16. All M
// rows (kBlockRows at a time) are served from one pass over the weights, but each converted vector
// then feeds M FMAs: from M ~ 4 the loop is compute-bound (8.0 ms at M = 4, 11.5 at 8, 19.5 at 16),
// which is why Int8Linear hands steps of more than 10 rows to a bf16 GEMM.
//
// Compiled WITHOUT -ffast-math and with -ffp-contract=off: the epilogue's multiply and add must
// round exactly as `int8_scale_bias_` does.
#include <torch/extension.h>
#include "kernel_abi.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 16;     // output rows per packed block (one zmm of fp32 sums)
constexpr int64_t kBlockRows = 8;  // rows of x per pass over the weights (register budget)
constexpr int kMaxTile = 8;        // packed blocks streamed side by side
constexpr int64_t kPrefetchBytes = 512;  // software prefetch distance in each block's stream
// Below this many weight bytes per thread, waking the second thread costs more than it saves
// (a few us of wake-up vs ~1.5 us to stream 32 KB).
constexpr int64_t kMinBytesPerThread = 32 * 1024;

inline float bf16_to_f32(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, as c10::BFloat16(float) does (NaN kept quiet).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// The epilogue of both paths, one output element: the sum as T stored it, scaled, biased, rounded.
template <typename T>
inline T finish(float sum, float scale, float bias);

template <>
inline float finish<float>(float sum, float scale, float bias) {
  const float scaled = sum * scale;
  return scaled + bias;
}

template <>
inline c10::BFloat16 finish<c10::BFloat16>(float sum, float scale, float bias) {
  const float scaled = bf16_to_f32(f32_to_bf16(sum)) * scale;
  c10::BFloat16 out;
  out.x = f32_to_bf16(scaled + bias);
  return out;
}

// MB rows of x (float32, row stride ldx) times J consecutive packed blocks starting at w (block
// stride 16 K bytes); writes the raw sums to sums[m * J * 16 + j * 16 + lane].
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))

// Calls step(k) for k = 0 .. K-1 while prefetching each of the J block streams 512 bytes (32 steps)
// ahead of its loads, stopping at this thread's last block. The hardware prefetcher alone, with J
// interleaved streams, reached ~13 GB/s from DRAM; this reaches ~24 (M = 1, AVX-512 Xeon). Farther
// (1-8 KB) or a whole tile ahead measured slower.
template <int J, typename Step>
inline void stream_blocks(const int8_t* w, int64_t K, const int8_t* w_end, Step&& step) {
  const int64_t stride = K * kLanes;
  const char* end = reinterpret_cast<const char*>(w_end);
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    for (int j = 0; j < J; ++j) {
      const char* ahead = reinterpret_cast<const char*>(w + j * stride + k * kLanes) + kPrefetchBytes;
      if (ahead < end) _mm_prefetch(ahead, _MM_HINT_T0);
    }
    step(k);
    step(k + 1);
    step(k + 2);
    step(k + 3);
  }
  for (; k < K; ++k) step(k);
}

#endif

#ifdef __AVX512F__

template <int MB, int J>
void tile_sums(const float* x, int64_t ldx, const int8_t* w, int64_t K, const int8_t* w_end, float* sums) {
  const int64_t stride = K * kLanes;
  __m512 acc[MB][J];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < J; ++j) acc[m][j] = _mm512_setzero_ps();
  stream_blocks<J>(w, K, w_end, [&](int64_t k) {
    __m512 wv[J];
    for (int j = 0; j < J; ++j) {
      const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * stride + k * kLanes));
      wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
    }
    for (int m = 0; m < MB; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * ldx + k]);
      for (int j = 0; j < J; ++j) acc[m][j] = _mm512_fmadd_ps(xb, wv[j], acc[m][j]);
    }
  });
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < J; ++j) _mm512_storeu_ps(sums + (m * J + j) * kLanes, acc[m][j]);
}

#elif defined(__AVX2__) && defined(__FMA__)
// AVX2 with FMA (AMD Zen 1-3, Intel Haswell to Alder Lake): a block's 16 lanes as two 8-lane
// halves. Each lane still sums its k in order with one FMA a step, so the bits are the AVX-512
// path's and the portable one's.

template <int MB, int J>
void tile_sums(const float* x, int64_t ldx, const int8_t* w, int64_t K, const int8_t* w_end, float* sums) {
  const int64_t stride = K * kLanes;
  __m256 acc[MB][J][2];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < J; ++j) acc[m][j][0] = acc[m][j][1] = _mm256_setzero_ps();
  stream_blocks<J>(w, K, w_end, [&](int64_t k) {
    __m256 wv[J][2];
    for (int j = 0; j < J; ++j)
      for (int h = 0; h < 2; ++h) {
        const __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + j * stride + k * kLanes + 8 * h));
        wv[j][h] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
      }
    for (int m = 0; m < MB; ++m) {
      const __m256 xb = _mm256_set1_ps(x[m * ldx + k]);
      for (int j = 0; j < J; ++j)
        for (int h = 0; h < 2; ++h) acc[m][j][h] = _mm256_fmadd_ps(xb, wv[j][h], acc[m][j][h]);
    }
  });
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < J; ++j)
      for (int h = 0; h < 2; ++h) _mm256_storeu_ps(sums + (m * J + j) * kLanes + 8 * h, acc[m][j][h]);
}

#else  // portable fallback: the same sums, bit for bit (same k order, same roundings), without vectors

template <int MB, int J>
void tile_sums(const float* x, int64_t ldx, const int8_t* w, int64_t K, const int8_t*, float* sums) {
  const int64_t stride = K * kLanes;
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < J; ++j)
      for (int64_t lane = 0; lane < kLanes; ++lane) {
        float s = 0.f;  // fused multiply-adds, one rounding per step as in the vector FMA chain
        for (int64_t k = 0; k < K; ++k)
          s = std::fma(x[m * ldx + k], static_cast<float>(w[j * stride + k * kLanes + lane]), s);
        sums[(m * J + j) * kLanes + lane] = s;
      }
}

#endif

using TileFn = void (*)(const float*, int64_t, const int8_t*, int64_t, const int8_t*, float*);

template <int MB, int... Js>
constexpr std::array<TileFn, sizeof...(Js)> tiles_for_rows(std::integer_sequence<int, Js...>) {
  return {&tile_sums<MB, Js + 1>...};
}

template <int... MBs>
constexpr std::array<std::array<TileFn, kMaxTile>, sizeof...(MBs)> tile_table(
    std::integer_sequence<int, MBs...>) {
  return {tiles_for_rows<MBs + 1>(std::make_integer_sequence<int, kMaxTile>{})...};
}

// kTiles[mb - 1][j - 1]: the tile for mb rows of x and j blocks.
constexpr auto kTiles = tile_table(std::make_integer_sequence<int, kBlockRows>{});

// Blocks streamed side by side for mb rows of x: MB * J accumulators + J weight vectors must fit in
// the 32 zmm registers (AVX2: twice as many halves in 16 ymm), and more streams keep more memory
// requests in flight.
#if defined(__AVX512F__) || !defined(__AVX2__)
constexpr int tile_blocks(int64_t mb) { return mb <= 2 ? 8 : mb <= 4 ? 6 : mb <= 6 ? 4 : 3; }
#else
constexpr int tile_blocks(int64_t mb) { return mb <= 1 ? 4 : mb <= 2 ? 2 : 1; }
#endif

template <typename T>
void linear_impl(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scales,
                 const float* bias, T* out, int64_t N) {
  const int64_t blocks = (N + kLanes - 1) / kLanes;
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / std::max<int64_t>(1, K * kLanes));
  const int tile = tile_blocks(std::min(M, kBlockRows));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    float sums[kBlockRows * kMaxTile * kLanes];
    const int8_t* w_end = w + end * K * kLanes;  // prefetches stop at this thread's last block
    for (int64_t b = begin; b < end; b += tile) {
      const int64_t j = std::min<int64_t>(tile, end - b);
      const int8_t* wb = w + b * K * kLanes;
      for (int64_t m0 = 0; m0 < M; m0 += kBlockRows) {  // further row blocks find the tile in L2
        const int64_t mb = std::min(kBlockRows, M - m0);
        kTiles[mb - 1][j - 1](x + m0 * K, K, wb, K, w_end, sums);
        for (int64_t m = 0; m < mb; ++m) {
          T* row = out + (m0 + m) * N;
          for (int64_t i = 0; i < j * kLanes; ++i) {
            const int64_t n = b * kLanes + i;
            if (n >= N) break;  // padding rows of the last block
            row[n] = finish<T>(sums[m * j * kLanes + i], scales[n], bias ? bias[n] : 0.f);
          }
        }
      }
    }
  });
}

void check_vector(const torch::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name, " must be contiguous float32");
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

// q [N, K] int8 -> [ceil(N / 16), K, 16], rows past N zero.
torch::Tensor int8_pack(const torch::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 2 && q.scalar_type() == torch::kInt8,
              "q must be an int8 [N, K] CPU tensor");
  const int64_t N = q.size(0), K = q.size(1), blocks = (N + kLanes - 1) / kLanes;
  auto padded = torch::zeros({blocks * kLanes, K}, q.options());
  padded.narrow(0, 0, N).copy_(q);
  return padded.view({blocks, kLanes, K}).transpose(1, 2).contiguous();
}

// x [M, K] float32 or bfloat16; packed [ceil(N / 16), K, 16] int8 from int8_pack; scales [N] and
// bias [N] float32 (N is the length of scales). Returns [M, N] in x's dtype.
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                          const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "int8_linear runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] tensor, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kLanes && packed.is_contiguous() &&
                  packed.scalar_type() == torch::kInt8,
              "w must be the int8 [ceil(N / 16), K, 16] layout from int8_pack, got ", packed.sizes());
  TORCH_CHECK(packed.size(1) == x.size(1), "x has ", x.size(1), " columns but w has K = ", packed.size(1));
  TORCH_CHECK(scales.dim() == 1, "scales must be 1-D");
  const int64_t M = x.size(0), K = x.size(1), N = scales.size(0);
  TORCH_CHECK(packed.size(0) == (N + kLanes - 1) / kLanes, "w has ", packed.size(0), " blocks of 16 rows, ",
              "but scales has ", N, " rows");
  check_vector(scales, N, "scales");
  if (bias) check_vector(*bias, N, "bias");
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  auto out = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const int8_t* w = packed.data_ptr<int8_t>();
  if (x.scalar_type() == torch::kFloat32) {
    linear_impl<float>(x.data_ptr<float>(), M, K, w, scales.data_ptr<float>(), bp, out.data_ptr<float>(), N);
  } else {
    // bf16 -> fp32 once per call (M * K values, a few KB), so the inner loop broadcasts fp32.
    auto xf = torch::empty({M, K}, x.options().dtype(torch::kFloat32));
    const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
    float* dst = xf.data_ptr<float>();
    for (int64_t i = 0; i < M * K; ++i) dst[i] = bf16_to_f32(src[i]);
    linear_impl<c10::BFloat16>(dst, M, K, w, scales.data_ptr<float>(), bp, out.data_ptr<c10::BFloat16>(), N);
  }
  return out;
}

// y[m, n] = T(y[m, n] * scale[n] + bias[n]) in place: the large-batch path's epilogue after its
// GEMM over the codes, the same `finish` as the kernel's (y already holds T(sum)).
template <typename T>
void scale_bias_impl(T* y, int64_t M, int64_t N, const float* scales, const float* bias) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, N));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      T* row = y + m * N;
      for (int64_t n = 0; n < N; ++n) {
        float sum;
        if constexpr (std::is_same_v<T, float>) {
          sum = row[n];
        } else {
          sum = bf16_to_f32(row[n].x);
        }
        row[n] = finish<T>(sum, scales[n], bias ? bias[n] : 0.f);
      }
    }
  });
}

torch::Tensor int8_scale_bias_(torch::Tensor& y, const torch::Tensor& scales,
                               const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(y.device().is_cpu() && y.dim() == 2 && y.is_contiguous(),
              "y must be a contiguous [M, N] CPU tensor");
  const int64_t M = y.size(0), N = y.size(1);
  check_vector(scales, N, "scales");
  if (bias) check_vector(*bias, N, "bias");
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  if (y.scalar_type() == torch::kFloat32) {
    scale_bias_impl<float>(y.data_ptr<float>(), M, N, scales.data_ptr<float>(), bp);
  } else {
    TORCH_CHECK(y.scalar_type() == torch::kBFloat16, "y must be float32 or bfloat16, got ", y.scalar_type());
    scale_bias_impl<c10::BFloat16>(y.data_ptr<c10::BFloat16>(), M, N, scales.data_ptr<float>(), bp);
  }
  return y;
}

const char* inner_loop() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "portable";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Pure tensor work: the server's event loop may run meanwhile (as it may beside torch's own ops).
  const py::call_guard<py::gil_scoped_release> nogil;
  m.def("int8_pack", &int8_pack, nogil, "int8 codes [N, K] -> the kernel's [ceil(N / 16), K, 16] layout",
        py::arg("q"));
  m.def("int8_linear", &int8_linear, nogil, "T(T(x @ q.T) * scales + bias) for packed int8 codes", py::arg("x"),
        py::arg("w"), py::arg("scales"), py::arg("bias") = py::none());
  m.def("int8_scale_bias_", &int8_scale_bias_, nogil, "y = T(y * scales + bias) in place (the GEMM path's epilogue)",
        py::arg("y"), py::arg("scales"), py::arg("bias") = py::none());
  m.def("addresses", [] {
    using namespace llmserve_abi;
    return Addresses{{"int8_linear", address<Int8LinearFn>(&int8_linear)}, {"int8_scale_bias_", address<ScaleBiasFn>(&int8_scale_bias_)}};
  }, "{name: address} of the kernels the C++ layer loop calls (kernel_abi.h)");
  m.def("inner_loop", &inner_loop, "the inner loop this build uses: avx512, avx2 or portable");
}
