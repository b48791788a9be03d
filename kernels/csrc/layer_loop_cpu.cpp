// The decoder's layer loop in C++, for bf16 models whose every linear runs one of our kernels.
//
// Why: one stream of SmolLM2-135M in int4 reads ~95 MB a token, ~4 ms at this machine's bandwidth,
// yet a step took ~13 ms, and ~4 ms of it was Python between the kernels: per layer 9 kernel calls,
// each through an nn.Module, argument parsing and a pybind dispatch (7-16 us a linear above its
// kernel, ~2 ms of layer code besides). Here the same kernels run in the same order from C++ (a
// function-pointer call and an at::empty each), so the output is bit for bit the Python loop's
// (llmserve/models/llama.py, LlamaLayer.forward with FusedCpuLayerOps). The GIL is released for
// the whole loop: the server's event loop runs beside the forward instead of waiting for a gap.
//
// Per layer, T tokens:  h = rms(x + residual)  ->  qkv  ->  rope + KV write  ->  attention
//   -> o_proj  ->  h = rms(x + residual)  ->  down(silu(gate) * up)
// Linears: AMX bf16 tiles; int8 / int4 kernels up to their row threshold, beyond it the AMX GEMM
// over the dense copy (plus int8's scale epilogue), as Int8Linear / Int4Linear choose; w8a8's
// int8 tiles at every size.
#include <torch/extension.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "kernel_abi.h"

namespace {

using namespace llmserve_abi;

enum class Kind : int64_t { kAmx = 0, kInt8 = 1, kInt4 = 2, kW8A8 = 3 };

struct Linear {
  Kind kind;
  int64_t out_features;
  int64_t max_kernel_rows;  // int8 / int4: rows up to which the kernel runs, beyond: the AMX GEMM
  Tensor weight;            // AMX tiles (kAmx), else the kernel's packed layout
  OptTensor scales;         // int8, w8a8: per output row
  OptTensor bias;           // the kernel's bias (float32 for int8 / int4 / w8a8, bf16 for AMX)
  OptTensor gemm_tiles;     // int8 / int4: the dense copy in AMX tiles
  OptTensor gemm_bias;
};

struct Layer {
  Tensor input_norm, post_attn_norm;
  Linear qkv, o, gate_up, down;
  Tensor k_cache, v_cache;  // [num_blocks, Hkv, block_size, D]
};

// The step's attention metadata (llmserve/attention.py): one-token rows first, then the chunks.
struct Step {
  int64_t num_decode_rows;
  OptTensor decode_tables, decode_lens;
  OptTensor prefill_tables, prefill_cu, prefill_lens;
  int64_t prefill_row_start, max_query_len;
};

class LayerLoop {
 public:
  LayerLoop(const Addresses& fns, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps,
            double scale, Tensor final_norm)
      : amx_(function<PackedLinearFn>(fns, "amx_linear")),
        int4_(optional_function<PackedLinearFn>(fns, "int4_linear")),
        int8_(optional_function<Int8LinearFn>(fns, "int8_linear")),
        w8a8_(optional_function<Int8LinearFn>(fns, "w8a8_linear")),
        scale_bias_(optional_function<ScaleBiasFn>(fns, "int8_scale_bias_")),
        norm_(function<NormFn>(fns, "rms_norm")),
        add_norm_(function<AddNormFn>(fns, "add_rms_norm_")),
        rope_(function<RopeFn>(fns, "rope_write_kv")),
        silu_mul_(function<SiluMulFn>(fns, "silu_mul")),
        decode_(function<DecodeAttnFn>(fns, "paged_attention_decode")),
        prefill_(optional_function<PrefillAttnFn>(fns, "paged_attention_prefill_varlen")),
        num_heads_(num_heads),
        num_kv_heads_(num_kv_heads),
        head_dim_(head_dim),
        eps_(eps),
        scale_(scale),
        final_norm_(std::move(final_norm)) {}

  void add_layer(Tensor input_norm, Tensor post_attn_norm, Linear qkv, Linear o, Linear gate_up, Linear down,
                 Tensor k_cache, Tensor v_cache) {
    for (const Linear* l : {&qkv, &o, &gate_up, &down}) {
      TORCH_CHECK(l->kind == Kind::kAmx || l->kind == Kind::kW8A8 || l->gemm_tiles.has_value(),
                  "layer loop: an int8 / int4 linear needs its GEMM tiles");
      TORCH_CHECK(l->kind != Kind::kW8A8 || (w8a8_ && l->scales.has_value()),
                  "layer loop: w8a8 linear without the w8a8 kernel or its scales");
      TORCH_CHECK(l->kind != Kind::kInt4 || int4_, "layer loop: int4 linear without the int4 kernel");
      TORCH_CHECK(l->kind != Kind::kInt8 || (int8_ && scale_bias_ && l->scales.has_value()),
                  "layer loop: int8 linear without the int8 kernel or its scales");
    }
    layers_.push_back(Layer{std::move(input_norm), std::move(post_attn_norm), std::move(qkv), std::move(o),
                            std::move(gate_up), std::move(down), std::move(k_cache), std::move(v_cache)});
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x: [T, hidden] embeddings -> [T, hidden] final-normed hidden states.
  Tensor forward(Tensor x, const Tensor& cos, const Tensor& sin, const Tensor& slots, Step step) {
    TORCH_CHECK(step.num_decode_rows == 0 || (step.decode_tables && step.decode_lens), "decode rows need tables");
    TORCH_CHECK(!step.prefill_tables || prefill_, "layer loop built without the prefill kernel");
    TORCH_CHECK(!step.prefill_tables || (step.prefill_cu && step.prefill_lens), "chunks need cu_seqlens and lens");
    TORCH_CHECK(step.num_decode_rows <= x.size(0), "more decode rows than tokens");
    const int64_t num_tokens = x.size(0);
    Tensor residual;
    for (Layer& l : layers_) {
      Tensor h = residual.defined() ? add_norm_(x, residual, l.input_norm, eps_) : norm_(x, l.input_norm, eps_);
      if (!residual.defined()) residual = x;  // layer 0: the embeddings are the residual stream
      Tensor qkv = linear(l.qkv, h);          // [T, (H + 2 Hkv) D]
      Tensor q = rope_(qkv, cos, sin, slots, l.k_cache, l.v_cache, num_heads_, num_kv_heads_);  // [T, H, D]
      Tensor attn = attention(q, l, step);                                                       // [T, H, D]
      x = linear(l.o, attn.view({num_tokens, num_heads_ * head_dim_}));                          // [T, hidden]
      h = add_norm_(x, residual, l.post_attn_norm, eps_);
      x = linear(l.down, silu_mul_(linear(l.gate_up, h)));  // [T, 2I] -> [T, I] -> [T, hidden]
    }
    TORCH_CHECK(residual.defined(), "a model has at least one layer");
    return add_norm_(x, residual, final_norm_, eps_);
  }

 private:
  Tensor linear(const Linear& l, const Tensor& x) {
    const bool kernel = x.size(0) <= l.max_kernel_rows;
    switch (l.kind) {
      case Kind::kAmx:
        return amx_(x, l.weight, l.out_features, l.bias);
      case Kind::kInt4:
        return kernel ? int4_(x, l.weight, l.out_features, l.bias)
                      : amx_(x, *l.gemm_tiles, l.out_features, l.gemm_bias);
      case Kind::kW8A8:
        return w8a8_(x, l.weight, *l.scales, l.bias);
      case Kind::kInt8: {
        if (kernel) return int8_(x, l.weight, *l.scales, l.bias);
        Tensor y = amx_(x, *l.gemm_tiles, l.out_features, c10::nullopt);
        return scale_bias_(y, *l.scales, l.bias);
      }
    }
    TORCH_CHECK(false, "layer loop: unknown linear kind");
  }

  // As llmserve.attention.paged_attention: the one-token rows through the decode kernel, the
  // chunks after them through the varlen prefill kernel; a copy into one output only when both.
  Tensor attention(const Tensor& q, Layer& l, const Step& s) {
    const int64_t nd = s.num_decode_rows, num_tokens = q.size(0);
    if (!s.prefill_tables) return decode_(q, l.k_cache, l.v_cache, *s.decode_tables, *s.decode_lens, scale_);
    auto prefill = [&](const Tensor& rows) {
      return prefill_(rows, l.k_cache, l.v_cache, *s.prefill_tables, *s.prefill_cu, *s.prefill_lens, scale_,
                      s.max_query_len);
    };
    if (s.prefill_row_start == 0) return prefill(q);
    TORCH_CHECK(s.prefill_row_start == nd, "chunks must follow the one-token rows");
    Tensor out = torch::empty_like(q);
    out.narrow(0, 0, nd).copy_(decode_(q.narrow(0, 0, nd), l.k_cache, l.v_cache, *s.decode_tables, *s.decode_lens, scale_));
    out.narrow(0, nd, num_tokens - nd).copy_(prefill(q.narrow(0, nd, num_tokens - nd)));
    return out;
  }

  PackedLinearFn amx_, int4_;
  Int8LinearFn int8_, w8a8_;
  ScaleBiasFn scale_bias_;
  NormFn norm_;
  AddNormFn add_norm_;
  RopeFn rope_;
  SiluMulFn silu_mul_;
  DecodeAttnFn decode_;
  PrefillAttnFn prefill_;
  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_, scale_;
  Tensor final_norm_;
  std::vector<Layer> layers_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Linear>(m, "Linear")
      .def(py::init([](int64_t kind, int64_t out_features, int64_t max_kernel_rows, Tensor weight,
                       OptTensor scales, OptTensor bias, OptTensor gemm_tiles, OptTensor gemm_bias) {
             TORCH_CHECK(kind >= 0 && kind <= 3, "kind: 0 AMX, 1 int8, 2 int4, 3 w8a8");
             return Linear{static_cast<Kind>(kind), out_features, max_kernel_rows, std::move(weight),
                           std::move(scales), std::move(bias), std::move(gemm_tiles), std::move(gemm_bias)};
           }),
           py::arg("kind"), py::arg("out_features"), py::arg("max_kernel_rows"), py::arg("weight"),
           py::arg("scales") = py::none(), py::arg("bias") = py::none(), py::arg("gemm_tiles") = py::none(),
           py::arg("gemm_bias") = py::none());
  py::class_<LayerLoop>(m, "LayerLoop")
      .def(py::init<const Addresses&, int64_t, int64_t, int64_t, double, double, Tensor>(), py::arg("addresses"),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("eps"), py::arg("scale"),
           py::arg("final_norm"))
      .def("add_layer", &LayerLoop::add_layer)
      .def("num_layers", &LayerLoop::num_layers)
      .def(
          "forward",
          [](LayerLoop& self, Tensor x, const Tensor& cos, const Tensor& sin, const Tensor& slots,
             int64_t num_decode_rows, OptTensor decode_tables, OptTensor decode_lens, OptTensor prefill_tables,
             OptTensor prefill_cu, OptTensor prefill_lens, int64_t prefill_row_start, int64_t max_query_len) {
            return self.forward(std::move(x), cos, sin, slots,
                                Step{num_decode_rows, std::move(decode_tables), std::move(decode_lens),
                                     std::move(prefill_tables), std::move(prefill_cu), std::move(prefill_lens),
                                     prefill_row_start, max_query_len});
          },
          py::call_guard<py::gil_scoped_release>(), "the layers and the final norm over [T, hidden] embeddings");
}
