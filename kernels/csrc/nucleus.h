// The nucleus (top_p) threshold of one row, shared by the layer ops' `top_p_cut` (the sampler's
// threshold helper) and the fused sampling pass (sampler_cpu.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

namespace llmserve_nucleus {

// The nucleus (top_p) threshold of one row of probabilities, without sorting the row: the row's
// mass in a histogram over the top bits of the float32 bit pattern (non-negative floats order
// like their bit patterns; 4096 bins, 16 a binade), scanned from the top down to the bin where
// the mass reaches top_p, and only that bin's values sorted. Returns x*, the smallest p_t whose
// strictly-more-likely mass is below top_p (llmserve/sampler.py, top_p_cut); 0 when the whole
// row's mass stays below top_p. Sums in double. Why: sorting a 49152-token row took ~2.8 ms here.
constexpr int kCutShift = 19;           // bits dropped from a float32 pattern for its bin
constexpr int kCutBins = 1 << (31 - kCutShift);

inline float top_p_cut_row(const float* p, int64_t n, double top_p, std::vector<double>& mass, std::vector<float>& ties) {
  std::fill(mass.begin(), mass.end(), 0.0);
  auto bin_of = [](float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    return static_cast<int>(bits >> kCutShift);
  };
  for (int64_t i = 0; i < n; ++i)
    if (p[i] > 0.f) mass[bin_of(p[i])] += p[i];  // NaN and zeros hold no mass
  double above = 0.0;
  int bin = kCutBins - 1;
  for (; bin >= 0 && above + mass[bin] < top_p; --bin) above += mass[bin];
  if (bin < 0) return 0.f;
  ties.clear();
  for (int64_t i = 0; i < n; ++i)
    if (p[i] > 0.f && bin_of(p[i]) == bin) ties.push_back(p[i]);
  std::sort(ties.begin(), ties.end(), std::greater<float>());
  float cut = ties.front();  // `above` < top_p: the bin's largest value is in
  for (size_t j = 0; j < ties.size() && above < top_p;) {
    const float v = ties[j];
    cut = v;
    for (; j < ties.size() && ties[j] == v; ++j) above += v;  // a tie group comes in whole
  }
  return cut;
}

}  // namespace llmserve_nucleus
