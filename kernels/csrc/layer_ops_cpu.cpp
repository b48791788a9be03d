// Fused per-layer elementwise ops for CPU: RMSNorm (with the residual add), and rotary embedding
// with the KV-cache write.
//
// Why: in a decode step of a small model the matmuls are a few hundred microseconds per layer,
// and the ~35 small torch ops around them (each a dispatch, an allocation and a pass over memory)
// cost as much again. One pass per op here, no temporaries.
//
// Rounding: every op rounds where transformers' eager code rounds (a bf16 result after each
// torch op), so a bf16 model gives the same values as the torch ops it replaces, except where the
// order of the RMSNorm's sum of squares differs by one float ulp before the bf16 rounding. The
// rotary embedding is exact in every dtype; the RMSNorm is used for half types only, float32
// keeps torch's, which matches transformers bit for bit. (A fused SiLU-and-multiply was tried and
// dropped: with a vectorised exp it was no faster than torch's two ops at batch 64.)
//
// Compiled WITHOUT -ffast-math: it would turn 1/sqrt into an approximation and contract a*b+c
// into FMAs, both of which change the rounding. The reduction uses `omp simd reduction`, which
// allows its reassociation (and so vectorisation) and nothing else.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
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

// Rotary embedding in place on the q and k heads of a fused qkv row, then the row's k and v into
// their cache slot. rotate_half(x) = [-x2, x1]; out = T(T(x * cos) + T(rotate_half(x) * sin)).
// qkv [T, (H + 2 Hkv) D] (rows may be strided); cos, sin [T, D]; slots [T] int64;
// caches [num_blocks, Hkv, block_size, D].
template <typename T>
void rope_write_kv_impl(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& slots, torch::Tensor& k_cache, torch::Tensor& v_cache,
                        int64_t num_heads, int64_t num_kv_heads) {
  const int64_t rows = qkv.size(0), row_stride = qkv.stride(0);
  const int64_t d = cos.size(1), half = d / 2, block_size = k_cache.size(2);
  T* base = qkv.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  at::parallel_for(0, rows, kRowGrain, [&, d, half](int64_t begin, int64_t end) {
    std::vector<float> x(d);
    for (int64_t r = begin; r < end; ++r) {
      T* row = base + r * row_stride;
      const T* c = cp + r * d;
      const T* s = sp + r * d;
      for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
        T* head = row + h * d;
        for (int64_t i = 0; i < d; ++i) x[i] = to_f32(head[i]);
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          head[i] = from_f32<T>(round_to<T>(x[i] * to_f32(c[i])) + round_to<T>(-x[i + half] * to_f32(s[i])));
          head[i + half] = from_f32<T>(round_to<T>(x[i + half] * to_f32(c[i + half])) +
                                       round_to<T>(x[i] * to_f32(s[i + half])));
        }
      }
      const int64_t block = slot[r] / block_size, offset = slot[r] % block_size;
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        const int64_t dst = ((block * num_kv_heads + h) * block_size + offset) * d;
        std::memcpy(kc + dst, row + (num_heads + h) * d, d * sizeof(T));
        std::memcpy(vc + dst, row + (num_heads + num_kv_heads + h) * d, d * sizeof(T));
      }
    }
  });
}

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

void rope_write_kv_(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                    const torch::Tensor& slots, torch::Tensor& k_cache, torch::Tensor& v_cache,
                    int64_t num_heads, int64_t num_kv_heads) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && slots.is_contiguous());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous());
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.size(0) == qkv.size(0));
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * num_kv_heads) * cos.size(1), "qkv width");
  TORCH_CHECK(qkv.scalar_type() == cos.scalar_type() && qkv.scalar_type() == k_cache.scalar_type());
  DISPATCH(qkv.scalar_type(), rope_write_kv_impl, qkv, cos, sin, slots, k_cache, v_cache, num_heads,
           num_kv_heads);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "transformers-style RMSNorm of [T, n] rows");
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x, then RMSNorm of residual");
  m.def("rope_write_kv_", &rope_write_kv_, "rotary embedding on fused qkv rows, then k/v into the cache");
}
