// The C++ signatures of the kernels that the layer loop (layer_loop_cpu.cpp) calls directly.
//
// Each kernel is its own torch extension, built with its own flags (some must not contract FMAs,
// one needs -ffast-math), so they cannot be one translation unit. Instead every kernel module
// exports `addresses()`: {name: function address}, each address taken through `address<Fn>()`, so a
// kernel whose signature drifts from the type named here fails to compile, not at run time. The
// modules share one libtorch, so at::Tensor crosses between them as it does inside one.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <map>
#include <string>

namespace llmserve_abi {

using Tensor = torch::Tensor;
using OptTensor = c10::optional<torch::Tensor>;

// amx_linear(x, tiles, n, bias) and int4_linear(x, packed, n, bias)
using PackedLinearFn = Tensor (*)(const Tensor&, const Tensor&, int64_t, const OptTensor&);
// int8_linear(x, packed, scales, bias)
using Int8LinearFn = Tensor (*)(const Tensor&, const Tensor&, const Tensor&, const OptTensor&);
// int8_scale_bias_(y, scales, bias): y = T(y * scales + bias) in place
using ScaleBiasFn = Tensor (*)(Tensor&, const Tensor&, const OptTensor&);
using NormFn = Tensor (*)(const Tensor&, const Tensor&, double);               // rms_norm(x, w, eps)
using AddNormFn = Tensor (*)(const Tensor&, Tensor&, const Tensor&, double);   // add_rms_norm_(x, residual, w, eps)
// rope_write_kv(qkv, cos, sin, slots, k_cache, v_cache, num_heads, num_kv_heads) -> q
using RopeFn = Tensor (*)(const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor&, Tensor&, int64_t,
                          int64_t);
using SiluMulFn = Tensor (*)(const Tensor&);  // silu_mul(gate_up)
// paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale)
using DecodeAttnFn = Tensor (*)(Tensor, Tensor, Tensor, Tensor, Tensor, double);
// paged_attention_prefill_varlen(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, scale, max_query_len)
using PrefillAttnFn = Tensor (*)(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, double, int64_t);

using Addresses = std::map<std::string, std::uintptr_t>;

template <class Fn>
std::uintptr_t address(Fn fn) {
  return reinterpret_cast<std::uintptr_t>(fn);
}

// A kernel the model may not use (int8, int4, prefill attention): nullptr when its module was not given.
template <class Fn>
Fn optional_function(const Addresses& table, const std::string& name) {
  auto it = table.find(name);
  return it == table.end() ? nullptr : reinterpret_cast<Fn>(it->second);
}

template <class Fn>
Fn function(const Addresses& table, const std::string& name) {
  auto it = table.find(name);
  TORCH_CHECK(it != table.end() && it->second != 0, "layer loop: no address for kernel '", name, "'");
  return reinterpret_cast<Fn>(it->second);
}

}  // namespace llmserve_abi
