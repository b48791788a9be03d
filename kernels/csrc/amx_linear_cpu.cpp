// bf16 linear layer on AMX tiles: out[M, N] = bf16(x[M, K] @ W[N, K]^T + bias), fp32 accumulation.
//
// Why not oneDNN: on this model's shapes (K = 576 or 1536, N = 576..3072) oneDNN's packed AMX inner
// product took 31-53 ms (by the hour) for a step's 120 body matmuls at M = 64 on 2 threads: ~10-20%
// of what the tiles can do (one `tdpbf16ps`, 16 x 16 x 32 multiply-adds, every ~11 ns a core:
// ~1.4 TFLOP/s a core, measured), and at M = 1 it read the weights at ~8 GB/s. The floor at M = 64
// is ~11 ms of weight reads (212 MB at ~20 GB/s) with ~6 ms of tile work under them. This kernel
// takes 23-29 ms there and 14-16 ms at M = 1 (llmserve/models/packed_linear.py has the table).
//
// Layout (built by llmserve/models/amx_linear.py): W as [N / 16, K / 32, 16, 32] bf16, one 1 KB B
// tile per (16 output columns, 32 k): tile row r holds, for n = 0..15, the pair W[n][2r], W[n][2r+1]
// (AMX's VNNI order). The K tiles of one column block are contiguous, so each block is one
// sequential stream from memory, read once per call whatever M is.
//
// Blocking (amx_gemm.h, shared with the w8a8 kernel): a task is two column blocks (32 outputs);
// for each pair of 16-row blocks of x, a 2 x 2 grid of C tiles, and per 32 k 2 A tiles (x, from
// L1/L2) and 2 B tiles: 4 tile products (~44 ns) per 4 KB loaded. The first row pair reads the B
// tiles from DRAM, the others from L1/L2 (36 KB for K = 576, 96 KB for K = 1536). Rows of x are
// padded to a multiple of 16 with zeros in a copy (M x K x 2 bytes, < 1% of the weight reads) so no
// tile reads past x. Each row's result uses the same tile products in the same k order whatever M
// is, so the output of a row does not depend on its batch neighbours (oneDNN picks a blocking per M).
#include <torch/extension.h>
#include "kernel_abi.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define AL_AMX 1
#include "amx_gemm.h"
#endif

namespace {

constexpr int64_t kCols = 16;   // output columns of one B tile
constexpr int64_t kDepth = 32;  // k of one tile (16 pairs)

#if defined(AL_AMX)
using llmserve_amx::amx_usable;

// out rows [m0, m0 + rows) x columns [n0, n0 + 16 nb) = bf16(c + bias), rounding to nearest even.
inline void store_rows(const float* c, int64_t rows, int64_t nb, const float* bias, c10::BFloat16* out,
                       int64_t n_len, int64_t m0, int64_t n0) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < nb; ++j) {
      __m512 v = _mm512_loadu_ps(c + i * 32 + j * 16);
      if (bias != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + n0 + j * 16));
      const __m256bh h = _mm512_cvtneps_pbh(v);
      std::memcpy(out + (m0 + i) * n_len + n0 + j * 16, &h, 32);
    }
  }
}
#endif

torch::Tensor amx_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t n_len,
                         const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "x must be a contiguous 2-D bfloat16 tensor");
  const int64_t m_len = x.size(0), k_len = x.size(1);
  TORCH_CHECK(k_len % kDepth == 0 && n_len % kCols == 0, "K must be a multiple of 32 and N of 16");
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
                  packed.numel() == n_len * k_len,
              "packed must be the contiguous [N / 16, K / 32, 16, 32] bfloat16 layout of amx_pack");
  torch::Tensor bias_f;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == n_len, "bias must have N elements");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  auto out = torch::empty({m_len, n_len}, x.options());
  if (m_len == 0) return out;
#if defined(AL_AMX)
  TORCH_CHECK(amx_usable(), "this process may not use AMX tiles");
  const int64_t m_pad = (m_len + 15) / 16 * 16;
  torch::Tensor xp = x;
  if (m_pad != m_len) {  // zero rows up to a multiple of 16, so no tile reads past x
    xp = torch::zeros({m_pad, k_len}, x.options());
    xp.narrow(0, 0, m_len).copy_(x);
  }
  const auto* a = reinterpret_cast<const char*>(xp.data_ptr<c10::BFloat16>());
  const auto* w = reinterpret_cast<const char*>(packed.data_ptr<c10::BFloat16>());
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto* o = out.data_ptr<c10::BFloat16>();
  llmserve_amx::tile_gemm<llmserve_amx::TileProduct::kBf16, float>(
      a, k_len * 2, m_len, w, n_len, k_len / kDepth,
      [&](const float* c, int64_t rows, int64_t nb, int64_t m0, int64_t n0) {
        store_rows(c, rows, nb, bp, o, n_len, m0, n0);
      });
#else
  TORCH_CHECK(false, "this build has no AMX path (compiled without AMX-BF16)");
#endif
  return out;
}

bool has_amx() {
#if defined(AL_AMX)
  return amx_usable();
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Pure tensor work: the server's event loop may run meanwhile (as it may beside torch's own ops).
  const py::call_guard<py::gil_scoped_release> nogil;
  m.def("amx_linear", &amx_linear, nogil, "bf16(x @ W.T + bias) for W in the [N/16, K/32, 16, 32] tile layout",
        py::arg("x"), py::arg("packed"), py::arg("n"), py::arg("bias") = py::none());
  m.def("addresses", [] {
    using namespace llmserve_abi;
    return Addresses{{"amx_linear", address<PackedLinearFn>(&amx_linear)}};
  }, "{name: address} of the kernels the C++ layer loop calls (kernel_abi.h)");
  m.def("has_amx", &has_amx, "whether this build and process can run AMX tiles");
}
