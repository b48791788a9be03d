// The sampler's random rows in one C++ pass per row: temperature, top_k, top_p, min_p and the draw
// (llmserve/sampler.py, `Sampler(sample_rows=...)`).
//
// Why: the torch path makes ~8 passes over [R, V] with a temporary each (divide, softmax, the
// threshold, a compare, a fill, softmax again, block sums, ...). At 64 rows of this 49152-token
// vocabulary that was ~40 ms a step with temperature + top_p, against a ~60 ms forward. Here a
// row stays in one thread's L2 (192 KB of float32) from the first pass to the draw.
//
// Semantics are the torch path's, in its order (the tests run every sampler test on both):
//   x = logits / T;  top_k keeps x >= the k-th largest (ties kept);  p = softmax over the kept;
//   top_p keeps p >= the nucleus threshold (nucleus.h);  min_p keeps p >= min_p * max p;
//   the token: the first whose cumulative mass exceeds u * total, u the row's uniform in [0, 1).
// The probabilities stay unnormalised (exp(x - max)) where only ratios matter (min_p compares
// with the kept maximum, the draw with the total), and the running sums are float32 within
// blocks of 256 tokens and float64 across blocks, as in the torch draw. Compiled without FMA
// contraction or -ffast-math (kernels/cpu_ops.py), like the layer ops.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#include <sleef.h>
#endif

#include "cpu_vec.h"
#include "nucleus.h"

namespace {

constexpr int64_t kBlock = 256;  // tokens per block of the two-level CDF (sampler.py: _CDF_BLOCK)
constexpr int kKeyShift = 20;    // top_k's histogram: the top 12 bits of an order-preserving key
constexpr int kKeyBins = 1 << (32 - kKeyShift);

// Unsigned keys that order like the floats (negatives flipped whole, positives above them).
inline uint32_t order_key(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

// The k-th largest of x[0 .. n) (1 <= k <= n): counts per key bin from the top down to the bin
// holding it, then a selection inside that bin alone.
float kth_largest(const float* x, int64_t n, int64_t k, std::vector<int64_t>& counts, std::vector<float>& bin) {
  std::fill(counts.begin(), counts.end(), 0);
  for (int64_t i = 0; i < n; ++i) ++counts[order_key(x[i]) >> kKeyShift];
  int64_t above = 0;
  int b = kKeyBins - 1;
  for (; above + counts[b] < k; --b) above += counts[b];
  bin.clear();
  for (int64_t i = 0; i < n; ++i)
    if (static_cast<int>(order_key(x[i]) >> kKeyShift) == b) bin.push_back(x[i]);
  const int64_t rank = k - above - 1;  // 0-based, largest first, inside the bin
  std::nth_element(bin.begin(), bin.begin() + rank, bin.end(), std::greater<float>());
  return bin[rank];
}

// x[i] = in[i] / t (float32, as torch divides), and the row's maximum.
template <typename T>
float divide_and_max(const T* in, int64_t n, float t, float* x) {
  float m = -INFINITY;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vt = _mm512_set1_ps(t);
  __m512 vm = _mm512_set1_ps(-INFINITY);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_div_ps(load_f32x16(in + i), vt);
    _mm512_storeu_ps(x + i, v);
    vm = _mm512_max_ps(vm, v);
  }
  m = _mm512_reduce_max_ps(vm);
#endif
  for (; i < n; ++i) {
    x[i] = to_f32(in[i]) / t;
    m = std::max(m, x[i]);
  }
  return m;
}

// exp(x - m) for x >= floor (else 0).
void exp_shifted(float* x, int64_t n, float m, float floor) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vm = _mm512_set1_ps(m), vf = _mm512_set1_ps(floor);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __mmask16 keep = _mm512_cmp_ps_mask(v, vf, _CMP_GE_OQ);
    _mm512_storeu_ps(x + i, _mm512_maskz_mov_ps(keep, Sleef_expf16_u10(_mm512_sub_ps(v, vm))));
  }
#endif
  for (; i < n; ++i) x[i] = x[i] >= floor ? std::exp(x[i] - m) : 0.f;
}

// What update_and_sum does to each value before summing it.
enum class Update { kNone, kScale, kMaskBelow };

// v[i] *= a (kScale), or v[i] = 0 where v[i] < a (kMaskBelow); then each block's sum, float32
// inside a block and float64 across blocks. Returns the row's total.
template <Update U>
double update_and_sum(float* v, int64_t n, float a, double* block_sums) {
  double total = 0.0;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    int64_t i = b0;
    float s = 0.f;
#if defined(__AVX512F__)
    const __m512 va = _mm512_set1_ps(a);
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= b1; i += 16) {
      __m512 w = _mm512_loadu_ps(v + i);
      if constexpr (U == Update::kScale) w = _mm512_mul_ps(w, va);
      if constexpr (U == Update::kMaskBelow) w = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(w, va, _CMP_GE_OQ), w);
      if constexpr (U != Update::kNone) _mm512_storeu_ps(v + i, w);
      acc = _mm512_add_ps(acc, w);
    }
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; i < b1; ++i) {
      if constexpr (U == Update::kScale) v[i] *= a;
      if constexpr (U == Update::kMaskBelow) v[i] = v[i] < a ? 0.f : v[i];
      s += v[i];
    }
    block_sums[b0 / kBlock] = s;
    total += s;
  }
  return total;
}

float row_max(const float* v, int64_t n) {
  float m = 0.f;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 vm = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(v + i));
  m = _mm512_reduce_max_ps(vm);
#endif
  for (; i < n; ++i) m = std::max(m, v[i]);
  return m;
}

// The first index whose running sum exceeds `target`, searched in the block sums then inside the
// block, each clamped to the last block / token with mass (rounding can put the target at the end).
int64_t draw(const float* v, int64_t n, const double* block_sums, double target) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  int64_t last = blocks - 1;
  while (last > 0 && !(block_sums[last] > 0.0)) --last;
  double before = 0.0;
  int64_t b = 0;
  for (; b < last && before + block_sums[b] <= target; ++b) before += block_sums[b];
  const int64_t b0 = b * kBlock, b1 = std::min(n, b0 + kBlock);
  int64_t last_token = b1 - 1;
  while (last_token > b0 && !(v[last_token] > 0.f)) --last_token;
  double cum = before;
  for (int64_t i = b0; i < last_token; ++i) {
    cum += v[i];
    if (cum > target && v[i] > 0.f) return i;
  }
  return last_token;
}

template <typename T>
int64_t sample_row(const T* in, int64_t n, float temperature, int64_t top_k, double top_p, float min_p,
                   double uniform, std::vector<float>& v, std::vector<double>& block_sums,
                   std::vector<int64_t>& counts, std::vector<double>& mass, std::vector<float>& scratch) {
  float* x = v.data();
  const float m = divide_and_max(in, n, temperature, x);
  const float floor = top_k > 0 && top_k < n ? kth_largest(x, n, top_k, counts, scratch) : -INFINITY;
  exp_shifted(x, n, m, floor);  // unnormalised probabilities; the maximum is exp(0) = 1
  double* sums = block_sums.data();
  double total = update_and_sum<Update::kNone>(x, n, 0.f, sums);
  if (top_p < 1.0) {
    update_and_sum<Update::kScale>(x, n, static_cast<float>(1.0 / total), sums);  // p, as softmax normalises
    const float cut = llmserve_nucleus::top_p_cut_row(x, n, top_p, mass, scratch);
    total = update_and_sum<Update::kMaskBelow>(x, n, cut, sums);
  }
  if (min_p > 0.f) total = update_and_sum<Update::kMaskBelow>(x, n, min_p * row_max(x, n), sums);
  return draw(x, n, block_sums.data(), uniform * total);
}

template <typename T>
void sample_impl(const torch::Tensor& logits, const float* t, const int64_t* k, const double* p, const float* mp,
                 const double* u, int64_t* out) {
  const int64_t rows = logits.size(0), n = logits.size(1), stride = logits.stride(0);
  const T* base = logits.data_ptr<T>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> v(n), scratch;
    std::vector<double> block_sums((n + kBlock - 1) / kBlock), mass(llmserve_nucleus::kCutBins);
    std::vector<int64_t> counts(kKeyBins);
    for (int64_t r = begin; r < end; ++r)
      out[r] = sample_row(base + r * stride, n, t[r], k[r], p[r], mp[r], u[r], v, block_sums, counts, mass, scratch);
  });
}

torch::Tensor sample_rows(const torch::Tensor& logits, const torch::Tensor& temperature, const torch::Tensor& top_k,
                          const torch::Tensor& top_p, const torch::Tensor& min_p, const torch::Tensor& uniforms) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 && logits.size(1) > 0,
              "logits must be a 2-D tensor with contiguous, non-empty rows");
  const int64_t rows = logits.size(0);
  auto per_row = [rows](const torch::Tensor& t, at::ScalarType type, const char* name) {
    TORCH_CHECK(t.numel() == rows, name, ": one value per row of logits (", rows, "), got ", t.numel());
    return t.to(type).contiguous();
  };
  const auto t = per_row(temperature, at::kFloat, "temperature");
  const auto k = per_row(top_k, at::kLong, "top_k");
  const auto p = per_row(top_p, at::kDouble, "top_p");
  const auto mp = per_row(min_p, at::kFloat, "min_p");
  const auto u = per_row(uniforms, at::kDouble, "uniforms");
  auto out = torch::empty({rows}, logits.options().dtype(at::kLong));
  const float* tp = t.data_ptr<float>();
  const int64_t* kp = k.data_ptr<int64_t>();
  const double* pp = p.data_ptr<double>();
  const float* mpp = mp.data_ptr<float>();
  const double* up = u.data_ptr<double>();
  int64_t* op = out.data_ptr<int64_t>();
  switch (logits.scalar_type()) {
    case at::kFloat: sample_impl<float>(logits, tp, kp, pp, mpp, up, op); break;
    case at::kBFloat16: sample_impl<c10::BFloat16>(logits, tp, kp, pp, mpp, up, op); break;
    default: TORCH_CHECK(false, "logits must be float32 or bfloat16, got ", logits.scalar_type());
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sample_rows", &sample_rows, py::call_guard<py::gil_scoped_release>(),
        "one token per row of [R, V] logits: temperature, top_k (0: off), top_p, min_p, then the draw at "
        "each row's uniform",
        py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"),
        py::arg("uniforms"));
}
