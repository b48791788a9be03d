// Fused per-layer elementwise ops for CPU: RMSNorm (with the residual add), rotary embedding with
// the KV-cache write, SiLU-and-multiply, and for the sampler the row argmax and the top_p threshold.
//
// Why: in a decode step of a small model the matmuls are a few hundred microseconds per layer,
// and the ~35 small torch ops around them (each a dispatch, an allocation and a pass over memory)
// cost as much again. One pass per op here, no temporaries.
//
// Rounding: every op rounds where transformers' eager code rounds (a bf16 result after each
// torch op), so a bf16 model gives the same values as the torch ops it replaces, except where the
// order of the RMSNorm's sum of squares differs by one float ulp before the bf16 rounding. The
// rotary embedding is exact in every dtype; the RMSNorm is used for half types only, float32
// keeps torch's, which matches transformers bit for bit. SiLU-and-multiply is exact in every dtype:
// it calls the same Sleef exp that torch's vectorised silu does (see silu_mul_row).
//
// Compiled WITHOUT -ffast-math: it would turn 1/sqrt into an approximation and contract a*b+c
// into FMAs, both of which change the rounding. The reduction uses `omp simd reduction`, which
// allows its reassociation (and so vectorisation) and nothing else.
#include <torch/extension.h>
#include "kernel_abi.h"
#include "kv_int8.h"
#include "nucleus.h"
#include <ATen/Parallel.h>
#include <cmath>
#if defined(__AVX512F__)
#include <immintrin.h>
#include <sleef.h>
#endif
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

namespace {

inline float to_f32(float x) { return x; }
inline float to_f32(c10::BFloat16 x) {
  // bf16 is the top half of an fp32: a shift the compiler vectorises, unlike c10's conversion.
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_f32(c10::Half x) { return static_cast<float>(x); }

template <typename T>
inline T from_f32(float f);
template <>
inline float from_f32<float>(float f) { return f; }
template <>
inline c10::BFloat16 from_f32<c10::BFloat16>(float f) {
  // Round to nearest even, as c10::BFloat16(float) does, written so that it vectorises.
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  c10::BFloat16 out;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    out.x = static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  } else {
    out.x = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return out;
}
template <>
inline c10::Half from_f32<c10::Half>(float f) { return c10::Half(f); }

// x rounded to T and back: the value a torch op on T tensors would have stored.
template <typename T>
inline float round_to(float x) { return to_f32(from_f32<T>(x)); }

// Grain sizes for at::parallel_for: below a few rows the second thread's wake-up costs more
// than the work (a 576-wide row is ~1 us).
constexpr int64_t kRowGrain = 8;

// transformers' LlamaRMSNorm: h = T(x32 * rsqrt(mean(x32^2) + eps)); out = T(w * h).
template <typename T>
void rms_norm_row(const T* x, const T* w, T* out, int64_t n, float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_f32(x[i]);
    sum += v * v;
  }
  const float r = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = from_f32<T>(to_f32(w[i]) * round_to<T>(to_f32(x[i]) * r));
}

template <typename T>
void rms_norm_impl(const torch::Tensor& x, const torch::Tensor& w, torch::Tensor& out, float eps) {
  const int64_t rows = x.size(0), n = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_norm_row(xp + r * n, wp, op + r * n, n, eps);
  });
}

// residual += x (rounded to T, as torch's add is); out = rms_norm(residual).
template <typename T>
void add_rms_norm_impl(const torch::Tensor& x, torch::Tensor& residual, const torch::Tensor& w,
                       torch::Tensor& out, float eps) {
  const int64_t rows = x.size(0), n = x.size(1);
  const T* xp = x.data_ptr<T>();
  T* rp = residual.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* res = rp + r * n;
      const T* xr = xp + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) res[i] = from_f32<T>(to_f32(res[i]) + to_f32(xr[i]));
      rms_norm_row(res, wp, op + r * n, n, eps);
    }
  });
}

// Rotary embedding of the q and k heads of a fused qkv row: q into its own contiguous output, k
// (rotated) and v straight into their cache slot; qkv itself is left as it was.
// rotate_half(x) = [-x2, x1]; out = T(T(x * cos) + T(rotate_half(x) * sin)).
// qkv [T, (H + 2 Hkv) D] (rows may be strided); cos, sin [T, D]; slots [T] int64;
// caches [num_blocks, Hkv, block_size, D]; q_out [T, H, D].
template <typename T>
inline void rope_head(const T* x_in, const T* c, const T* s, T* out, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = to_f32(x_in[i]), x2 = to_f32(x_in[i + half]);
    out[i] = from_f32<T>(round_to<T>(x1 * to_f32(c[i])) + round_to<T>(-x2 * to_f32(s[i])));
    out[i + half] = from_f32<T>(round_to<T>(x2 * to_f32(c[i + half])) + round_to<T>(x1 * to_f32(s[i + half])));
  }
}

// The int8 cache (kv_int8.h): k rotated and rounded to T as above, then both rows quantized.
template <typename T>
inline void write_int8_rows(const T* k_in, const T* v_in, const T* c, const T* s, int64_t d, int8_t* k_row,
                            int8_t* v_row, T* k_tmp /* [d] */, float* f /* [d] */) {
  rope_head(k_in, c, s, k_tmp, d / 2);
  for (int64_t i = 0; i < d; ++i) f[i] = to_f32(k_tmp[i]);
  kv_quantize_row(f, d, k_row);
  for (int64_t i = 0; i < d; ++i) f[i] = to_f32(v_in[i]);
  kv_quantize_row(f, d, v_row);
}

template <typename T>
void rope_write_kv_impl(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& slots, torch::Tensor& k_cache, torch::Tensor& v_cache,
                        torch::Tensor& q_out, int64_t num_heads, int64_t num_kv_heads) {
  const int64_t rows = qkv.size(0), row_stride = qkv.stride(0);
  const int64_t d = cos.size(1), half = d / 2, block_size = k_cache.size(2);
  const bool quant = k_cache.scalar_type() == torch::kChar;
  const int64_t cache_row = k_cache.size(3);  // d, or d codes + the scale's bytes
  const T* base = qkv.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const int64_t elem = static_cast<int64_t>(k_cache.element_size());
  T* qo = q_out.data_ptr<T>();
  at::parallel_for(0, rows, kRowGrain, [&, d, half](int64_t begin, int64_t end) {
    std::vector<T> k_tmp(quant ? d : 0);
    std::vector<float> f(quant ? d : 0);
    for (int64_t r = begin; r < end; ++r) {
      const T* row = base + r * row_stride;
      const T* c = cp + r * d;
      const T* s = sp + r * d;
      for (int64_t h = 0; h < num_heads; ++h) rope_head(row + h * d, c, s, qo + (r * num_heads + h) * d, half);
      const int64_t block = slot[r] / block_size, offset = slot[r] % block_size;
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        const int64_t dst = (((block * num_kv_heads + h) * block_size + offset) * cache_row) * elem;  // bytes
        const T* k_in = row + (num_heads + h) * d;
        const T* v_in = row + (num_heads + num_kv_heads + h) * d;
        if (quant) {
          write_int8_rows(k_in, v_in, c, s, d, reinterpret_cast<int8_t*>(kc + dst),
                          reinterpret_cast<int8_t*>(vc + dst), k_tmp.data(), f.data());
          continue;
        }
        rope_head(k_in, c, s, reinterpret_cast<T*>(kc + dst), half);
        std::memcpy(vc + dst, v_in, d * sizeof(T));
      }
    }
  });
}

// SiLU(gate) * up, rounded as torch's `F.silu(gate) * up` rounds. torch's silu is
// x / (1 + exp(-x)) in float32 (a half-type input widened first, the result rounded back); its
// vectorised loop takes each row in steps of two vectors (2 x 64 bytes of T) with Sleef's
// expf_u10, and the rest of the row one element at a time with std::exp. The same split here
// gives the same bits. Then the product: float32 once, rounded to T once (a half-type product of
// two half values is exact in float32).
template <typename T>
inline void silu_mul_row(const T* g, const T* u, T* out, int64_t n) {
  constexpr int64_t kStep = 2 * 64 / static_cast<int64_t>(sizeof(T));
  int64_t i = 0;
#if defined(__AVX512F__)
  float gs[kStep], us[kStep], os[kStep];
  const __m512 one = _mm512_set1_ps(1.f), sign = _mm512_set1_ps(-0.f);
  for (; i + kStep <= n; i += kStep) {
    for (int64_t j = 0; j < kStep; ++j) {
      gs[j] = to_f32(g[i + j]);
      us[j] = to_f32(u[i + j]);
    }
    for (int64_t j = 0; j < kStep; j += 16) {
      const __m512 x = _mm512_loadu_ps(gs + j);
      const __m512 e = Sleef_expf16_u10(_mm512_xor_ps(x, sign));
      _mm512_storeu_ps(os + j, _mm512_div_ps(x, _mm512_add_ps(one, e)));
    }
#pragma omp simd
    for (int64_t j = 0; j < kStep; ++j) out[i + j] = from_f32<T>(round_to<T>(os[j]) * us[j]);
  }
#endif
  for (; i < n; ++i) {
    const float x = to_f32(g[i]);
    out[i] = from_f32<T>(round_to<T>(x / (1.f + std::exp(-x))) * to_f32(u[i]));
  }
}

// gate_up [T, 2I] (rows may be strided): gate is its first half, up its second; out [T, I].
template <typename T>
void silu_mul_impl(const torch::Tensor& gate_up, torch::Tensor& out) {
  const int64_t rows = gate_up.size(0), n = out.size(1), stride = gate_up.stride(0);
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  // Two threads only pay off above ~64k elements (waking a sleeping OpenMP worker is ~20-50 us).
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) silu_mul_row(gp + r * stride, gp + r * stride + n, op + r * n, n);
  });
}

// The index of each row's maximum, the first one on ties, a NaN counting as the maximum: what
// torch's `x.max(dim=-1).indices` returns, at a fraction of its time for [64, 49152] rows (two
// passes over a row that sits in L2: a vector max, then the first index holding it).
#if defined(__AVX512F__)
inline __m512 load16_f32(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16_f32(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
#endif

template <typename T>
int64_t argmax_row(const T* row, int64_t n) {
  float m = -INFINITY;
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    __m512 vm = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512 v = load16_f32(row + i);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      vm = _mm512_max_ps(vm, v);
    }
    m = _mm512_reduce_max_ps(vm);
    for (int64_t j = i; j < n; ++j) {
      const float v = to_f32(row[j]);
      nan |= (v != v);
      m = std::max(m, v);
    }
    const __m512 target = _mm512_set1_ps(m);
    for (i = 0; i + 16 <= n; i += 16) {
      const __m512 v = load16_f32(row + i);
      const __mmask16 hit = nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(v, target, _CMP_EQ_OQ);
      if (hit) return i + __builtin_ctz(hit);
    }
    for (; i < n; ++i) {
      const float v = to_f32(row[i]);
      if (nan ? v != v : v == m) return i;
    }
    return 0;
  }
#endif
  for (; i < n; ++i) {
    const float v = to_f32(row[i]);
    if (v != v) return i;  // the first NaN wins
    m = std::max(m, v);
  }
  for (i = 0; i < n; ++i)
    if (to_f32(row[i]) == m) return i;
  return 0;  // an empty row
}

template <typename T>
void argmax_impl(const torch::Tensor& x, torch::Tensor& out) {
  const int64_t rows = x.size(0), n = x.size(1), stride = x.stride(0);
  const T* xp = x.data_ptr<T>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) op[r] = argmax_row(xp + r * stride, n);
  });
}

using llmserve_nucleus::kCutBins;
using llmserve_nucleus::top_p_cut_row;

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be 2-D with contiguous rows");
}

#define DISPATCH(dtype, fn, ...)                                                     \
  switch (dtype) {                                                                   \
    case torch::kFloat32: fn<float>(__VA_ARGS__); break;                             \
    case torch::kBFloat16: fn<c10::BFloat16>(__VA_ARGS__); break;                    \
    case torch::kFloat16: fn<c10::Half>(__VA_ARGS__); break;                         \
    default: TORCH_CHECK(false, "unsupported dtype ", dtype);                        \
  }

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.dim() == 2 && w.size(0) == x.size(1));
  auto out = torch::empty_like(x);
  DISPATCH(x.scalar_type(), rms_norm_impl, x, w, out, static_cast<float>(eps));
  return out;
}

torch::Tensor add_rms_norm_(const torch::Tensor& x, torch::Tensor& residual, const torch::Tensor& w,
                            double eps) {
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && x.sizes() == residual.sizes());
  TORCH_CHECK(x.scalar_type() == residual.scalar_type() && w.size(0) == x.size(1));
  auto out = torch::empty_like(x);
  DISPATCH(x.scalar_type(), add_rms_norm_impl, x, residual, w, out, static_cast<float>(eps));
  return out;
}

torch::Tensor rope_write_kv(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                            const torch::Tensor& slots, torch::Tensor& k_cache, torch::Tensor& v_cache,
                            int64_t num_heads, int64_t num_kv_heads) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && slots.is_contiguous());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous());
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.size(0) == qkv.size(0));
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * num_kv_heads) * cos.size(1), "qkv width");
  TORCH_CHECK(qkv.scalar_type() == cos.scalar_type());
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() && k_cache.sizes() == v_cache.sizes());
  if (k_cache.scalar_type() == torch::kChar) {  // the int8 cache: d codes and a float32 scale a row
    TORCH_CHECK(k_cache.size(3) == cos.size(1) + kKvScaleBytes, "int8 cache rows are head_dim + 4 bytes");
  } else {
    TORCH_CHECK(qkv.scalar_type() == k_cache.scalar_type() && k_cache.size(3) == cos.size(1));
  }
  auto q = torch::empty({qkv.size(0), num_heads, cos.size(1)}, qkv.options());
  DISPATCH(qkv.scalar_type(), rope_write_kv_impl, qkv, cos, sin, slots, k_cache, v_cache, q, num_heads,
           num_kv_heads);
  return q;
}

torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up width must be even");
  auto out = torch::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  DISPATCH(gate_up.scalar_type(), silu_mul_impl, gate_up, out);
  return out;
}

torch::Tensor argmax_rows(const torch::Tensor& x) {
  check_rows(x, "x");
  auto out = torch::empty({x.size(0)}, x.options().dtype(torch::kInt64));
  DISPATCH(x.scalar_type(), argmax_impl, x, out);
  return out;
}

torch::Tensor top_p_cut(const torch::Tensor& probs, const torch::Tensor& top_p) {
  check_rows(probs, "probs");
  TORCH_CHECK(probs.scalar_type() == torch::kFloat32, "probs must be float32");
  const auto p = top_p.to(torch::kFloat64).contiguous();
  TORCH_CHECK(p.numel() == probs.size(0), "top_p: one value per row");
  auto out = torch::empty({probs.size(0), 1}, probs.options());
  const float* pp = probs.data_ptr<float>();
  const double* tp = p.data_ptr<double>();
  float* op = out.data_ptr<float>();
  const int64_t n = probs.size(1), stride = probs.stride(0);
  at::parallel_for(0, probs.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<double> mass(kCutBins);
    std::vector<float> ties;
    for (int64_t r = begin; r < end; ++r) op[r] = top_p_cut_row(pp + r * stride, n, tp[r], mass, ties);
  });
  return out;
}

bool exact_silu() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Pure tensor work: the server's event loop may run meanwhile (as it may beside torch's own ops).
  const py::call_guard<py::gil_scoped_release> nogil;
  m.def("rms_norm", &rms_norm, nogil, "transformers-style RMSNorm of [T, n] rows");
  m.def("add_rms_norm_", &add_rms_norm_, nogil, "residual += x, then RMSNorm of residual");
  m.def("rope_write_kv", &rope_write_kv, nogil, "rotary embedding of fused qkv rows: q returned, k/v into the cache");
  m.def("silu_mul", &silu_mul, nogil, "SiLU(gate) * up of [T, 2I] gate_up rows, as torch rounds it");
  m.def("top_p_cut", &top_p_cut, nogil, "[R, V] float32 probabilities, [R] top_p -> [R, 1] nucleus threshold");
  m.def("argmax_rows", &argmax_rows, nogil, "index of each row's first maximum (NaN counts as the maximum)");
  m.def("addresses", [] {
    using namespace llmserve_abi;
    return Addresses{{"rms_norm", address<NormFn>(&rms_norm)}, {"add_rms_norm_", address<AddNormFn>(&add_rms_norm_)},
        {"rope_write_kv", address<RopeFn>(&rope_write_kv)}, {"silu_mul", address<SiluMulFn>(&silu_mul)}};
  }, "{name: address} of the kernels the C++ layer loop calls (kernel_abi.h)");
  m.def("exact_silu", &exact_silu, "whether silu_mul uses torch's vectorised exp (an AVX-512 build)");
}
