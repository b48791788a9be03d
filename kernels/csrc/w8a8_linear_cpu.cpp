// int8 x int8 linear layer on AMX tiles (`quantization = "w8a8"`):
//   out[M, N] = bf16((float(sum_k xq[m, k] * wq[n, k]) * sx[m]) * sw[n] + bias[n])
// with xq = round(x * 127 / max|x[m, :]|) per row, computed here on every call, and wq the per-row
// int8 weight codes packed at load (llmserve/w8a8_linear.py).
//
// Why: on this CPU the bf16 tile kernel (amx_linear_cpu.cpp) is bound by tile loads, not by the
// multiply unit: a 2 x 2 block of C tiles needs one 1 KB tile load per tile product, and a load
// costs about as long as two products (measured: ~43 ns a product with its loads against ~14 ns
// without, in and out of L1 alike). `tdpbssd` takes the same time as `tdpbf16ps` over 64 int8
// pairs instead of 32 bf16 ones, so each load carries twice the multiply-adds: half the tile time
// per FLOP, and half the weight bytes (SmolLM2-135M body: 106 MB instead of 212 MB a step).
//
// Layout: W as [N / 16, K / 64, 16, 16, 4] int8: one 1 KB B tile per (16 output columns, 64 k);
// tile row r holds, for n = 0..15, W[n][4r .. 4r + 3] (AMX's int8 VNNI order). A tiles are the
// quantized rows, 16 rows x 64 k, row-major with stride K. Blocking, padding and prefetch are those
// of amx_linear_cpu.cpp, through the same tile loop (amx_gemm.h).
//
// Where AMX is missing (or the process may not use it), AVX-512 VNNI does the products on the same
// packed weights (vnni_gemm.h) and gives the same bits; `backend()` says which runs.
//
// Each row's quantization and its products depend on that row alone, in the same k order at every
// M, so a row's output does not depend on its batch neighbours. Built without FMA contraction
// (kernels/cpu_ops.py): the epilogue rounds where the torch reference in tests/test_w8a8.py does.
#include <torch/extension.h>
#include "kernel_abi.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

// The vector pieces (quantization, epilogue) need AVX-512 BW and BF16; AMX-INT8 or AVX-512 VNNI
// does the products, whichever the CPU has (AMX first: twice the multiply-adds per instruction).
#if defined(__AVX512BW__) && defined(__AVX512BF16__) && defined(__linux__)
#define W8_VEC 1
#include "cpu_vec.h"
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define W8_AMX 1
#include "amx_gemm.h"
#endif
#if defined(__AVX512VNNI__)
#define W8_VNNI 1
#include "vnni_gemm.h"
#endif
#endif

namespace {

constexpr int64_t kCols = 16;   // output columns of one B tile
constexpr int64_t kDepth = 64;  // k of one tile (16 quads)

// [N, K] int8 codes -> the [N / 16, K / 64, 16, 16, 4] tile layout above.
torch::Tensor w8a8_pack(const torch::Tensor& codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar, "codes must be a 2-D int8 tensor");
  const int64_t n_len = codes.size(0), k_len = codes.size(1);
  TORCH_CHECK(n_len % kCols == 0 && k_len % kDepth == 0, "N must be a multiple of 16 and K of 64");
  // [N, K] -> [N/16, 16, K/64, 16, 4] -> [N/16, K/64, 16 (quad r), 16 (n), 4]
  return codes.contiguous()
      .view({n_len / kCols, kCols, k_len / kDepth, kDepth / 4, 4})
      .permute({0, 2, 3, 1, 4})
      .contiguous()
      .view({n_len, k_len});
}

#if defined(W8_VEC)
// Row m of x (bf16) -> int8 codes at q and its scale: q = round(x * (127 / amax)), scale = amax / 127.
inline float quantize_row(const c10::BFloat16* x, int64_t k_len, int8_t* q) {
  __m512 amax = _mm512_setzero_ps();
  __mmask16 nan = 0;  // max_ps drops NaNs, so they are looked for apart
  for (int64_t k = 0; k < k_len; k += 16) {
    const __m512 v = load_f32x16(x + k);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  const float m = nan ? NAN : _mm512_reduce_max_ps(amax);
  if (m == 0.f || !std::isfinite(m)) {  // codes 0; the scale 0 for an all-zero row, NaN (out: NaN) for inf / NaN
    std::memset(q, 0, k_len);
    return m == 0.f ? 0.f : NAN;
  }
  const __m512 inv = _mm512_set1_ps(127.f / m);
  for (int64_t k = 0; k < k_len; k += 16) {
    const __m512 v = load_f32x16(x + k);
    // round half to even (the MXCSR default), then saturate: |x * inv| <= 127 up to one rounding
    const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(r));
  }
  return m / 127.f;
}

// out rows [m0, m0 + rows) x columns [n0, n0 + 16 nb) = bf16((float(c) * sx) * sw + bias).
inline void store_rows(const int32_t* c, int64_t rows, int64_t nb, const float* sx, const float* sw,
                       const float* bias, c10::BFloat16* out, int64_t n_len, int64_t m0, int64_t n0) {
  for (int64_t i = 0; i < rows; ++i) {
    const __m512 row_scale = _mm512_set1_ps(sx[m0 + i]);
    for (int64_t j = 0; j < nb; ++j) {
      __m512 v = _mm512_cvtepi32_ps(_mm512_loadu_si512(c + i * 32 + j * 16));
      v = _mm512_mul_ps(_mm512_mul_ps(v, row_scale), _mm512_loadu_ps(sw + n0 + j * 16));
      if (bias != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + n0 + j * 16));
      const __m256bh h = _mm512_cvtneps_pbh(v);
      std::memcpy(out + (m0 + i) * n_len + n0 + j * 16, &h, 32);
    }
  }
}
#endif

enum class Backend { kNone, kAmx, kVnni };

#if defined(W8_VEC)
// AMX when this build has it and the kernel lets the process use it; else VNNI when built in.
inline Backend active_backend() {
#if defined(W8_AMX)
  if (llmserve_amx::amx_usable()) return Backend::kAmx;
#endif
#if defined(W8_VNNI)
  return Backend::kVnni;
#else
  return Backend::kNone;
#endif
}
#endif

torch::Tensor w8a8_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                          const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "x must be a contiguous 2-D bfloat16 tensor");
  const int64_t m_len = x.size(0), k_len = x.size(1), n_len = packed.size(0);
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous() && packed.dim() == 2 &&
                  packed.size(1) == k_len,
              "packed must be the [N, K] int8 tile layout of w8a8_pack, K matching x");
  TORCH_CHECK(k_len % kDepth == 0 && n_len % kCols == 0, "K must be a multiple of 64 and N of 16");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == n_len,
              "scales must be N contiguous float32 values");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n_len,
                "bias must be N contiguous float32 values");
    bp = bias->data_ptr<float>();
  }
  auto out = torch::empty({m_len, n_len}, x.options());
  if (m_len == 0) return out;
#if defined(W8_VEC)
  const Backend backend = active_backend();
  TORCH_CHECK(backend != Backend::kNone, "this CPU has neither AMX-INT8 tiles nor AVX-512 VNNI");
  const int64_t m_pad = backend == Backend::kAmx ? (m_len + 15) / 16 * 16 : m_len;  // AMX reads whole tiles
  auto xq = torch::empty({m_pad, k_len}, x.options().dtype(at::kChar));
  auto sx = torch::empty({m_len}, x.options().dtype(at::kFloat));
  auto* q = xq.data_ptr<int8_t>();
  auto* sxp = sx.data_ptr<float>();
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const auto quantize = [&](int64_t m) { sxp[m] = quantize_row(xp + m * k_len, k_len, q + m * k_len); };
  const auto* w = reinterpret_cast<const char*>(packed.data_ptr<int8_t>());
  const float* swp = scales.data_ptr<float>();
  auto* o = out.data_ptr<c10::BFloat16>();
#if defined(W8_AMX)
  if (backend == Backend::kAmx) {
    std::memset(q + m_len * k_len, 0, (m_pad - m_len) * k_len);  // zero rows: no tile reads past x
    at::parallel_for(0, m_len, 16, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) quantize(m);
    });
    llmserve_amx::tile_gemm<llmserve_amx::TileProduct::kInt8, int32_t>(
        reinterpret_cast<const char*>(q), k_len, m_len, w, n_len, k_len / kDepth,
        [&](const int32_t* c, int64_t rows, int64_t nb, int64_t m0, int64_t n0) {
          store_rows(c, rows, nb, sxp, swp, bp, o, n_len, m0, n0);
        });
    return out;
  }
#endif
#if defined(W8_VNNI)
  auto xsum = torch::empty({m_len}, x.options().dtype(at::kInt));
  auto grouped = torch::empty({m_len, k_len}, x.options().dtype(at::kChar));
  llmserve_vnni::vnni_gemm(m_len, k_len, quantize, q, xsum.data_ptr<int32_t>(), sxp, w, swp, bp, n_len, o,
                           grouped.data_ptr<int8_t>());
#endif
#else
  TORCH_CHECK(false, "this build has no int8 product path (it needs AVX-512 BW, BF16 and VNNI or AMX-INT8)");
#endif
  return out;
}

// Which instructions do the products: "amx" (AMX-INT8 tiles), "avx512-vnni" (vpdpbusd) or "none".
std::string backend_name() {
#if defined(W8_VEC)
  switch (active_backend()) {
    case Backend::kAmx: return "amx";
    case Backend::kVnni: return "avx512-vnni";
    case Backend::kNone: break;
  }
#endif
  return "none";
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const py::call_guard<py::gil_scoped_release> nogil;
  m.def("w8a8_linear", &w8a8_linear, nogil,
        "bf16 out of int8 x int8 tiles: x quantized per row, W the [N, K] tile layout of w8a8_pack",
        py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("bias") = py::none());
  m.def("w8a8_pack", &w8a8_pack, nogil, "[N, K] int8 codes -> the kernel's tile layout", py::arg("codes"));
  m.def("addresses", [] {
    using namespace llmserve_abi;
    return Addresses{{"w8a8_linear", address<Int8LinearFn>(&w8a8_linear)}};
  }, "{name: address} of the kernels the C++ layer loop calls (kernel_abi.h)");
  m.def("backend", &backend_name, "what does the int8 products here: 'amx', 'avx512-vnni' or 'none'");
}
