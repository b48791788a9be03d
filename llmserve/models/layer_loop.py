"""The decoder's layers run from one C++ call (kernels/csrc/layer_loop_cpu.cpp), where every piece
of a layer is one of our CPU kernels: bf16 on a CPU with AMX, with or without int8 / int4 / w8a8 weights.

The kernels, their order and their arguments are those of `LlamaLayer.forward` with
`FusedCpuLayerOps`, so the hidden states are bit for bit the Python loop's (tests/test_layer_loop.py);
what goes is the Python between them. Measured on this repo's 2-core Xeon, one int4 stream, a
decode step's 30 layers: each linear cost 7-16 us in its nn.Module above its kernel, and the layer
code ~2 ms more. The loop releases the GIL while it runs, so the HTTP server's event loop works
beside a forward instead of in the gaps between its kernels.

`build_layer_loop` returns None, and the model keeps its Python loop, when any piece is not ours:
float32 (MKL linears, models/mkl_linear.py), no AMX, Qwen3's q/k norm, a bitsandbytes or oneDNN
linear, the torch attention reference. A step whose attention metadata needs the torch path
(`meta.chunks`, `meta.decode_groups`) runs the Python loop too.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch
from torch import nn

from llmserve.attention import AttentionMetadata
from llmserve.int4_linear import Int4Linear
from llmserve.int8_linear import Int8Linear, KernelLinear
from llmserve.models.layer_ops import FusedCpuLayerOps
from llmserve.models.packed_linear import AmxLinear
from llmserve.w8a8_linear import W8A8Linear

logger = logging.getLogger("llmserve.models")

KIND_AMX, KIND_INT8, KIND_INT4, KIND_W8A8 = 0, 1, 2, 3
LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # a layer's, in LayerLoop.add_layer's order


class LayerLoop:
    """Callable like the Python layer loop: (embeddings, cos, sin, kv_caches, meta) -> final-normed
    hidden states, or None when this step's metadata needs the torch attention path."""

    def __init__(self, loop: object, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._loop = loop
        self._kv_caches = kv_caches

    def __call__(
        self,
        x: torch.Tensor,  # [T, hidden] embeddings
        cos: torch.Tensor,  # [T, D]
        sin: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor | None:  # [T, hidden]
        if meta.chunks or meta.decode_groups or kv_caches is not self._kv_caches:
            return None
        decode, prefill = meta.decode_batch, meta.prefill_batch
        return self._loop.forward(  # type: ignore[attr-defined]
            x, cos, sin, meta.slot_mapping,
            0 if decode is None else decode.num_rows,
            None if decode is None else decode.block_tables,
            None if decode is None else decode.context_lens,
            None if prefill is None else prefill.block_tables,
            None if prefill is None else prefill.cu_seqlens,
            None if prefill is None else prefill.context_lens,
            0 if prefill is None else prefill.row_start,
            0 if prefill is None else prefill.max_query_len,
        )  # fmt: skip


def build_layer_loop(
    model: nn.Module,
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    decode_kernel: object,
    prefill_kernel: object,
) -> LayerLoop | None:
    """The C++ layer loop over `model` (a LlamaForCausalLM after quantization and packing) and the
    runner's KV caches, or None (logged) when a piece of the model is not one of our kernels."""
    from llmserve_kernels import cpu_ops

    why = _unsupported(model, decode_kernel, prefill_kernel)
    module = None if why else cpu_ops.load_layer_loop()
    if module is None:
        logger.info("layers run from Python: %s", why or "the C++ layer loop did not build")
        return None
    kernels: list[ModuleType | None] = [cpu_ops.load(), cpu_ops.load_layer_ops(), cpu_ops.load_amx_linear()]
    if prefill_kernel is not None:
        kernels.append(cpu_ops.load_prefill())
    for linear in _linears(model):
        if isinstance(linear, KernelLinear | W8A8Linear):
            kernels.append(linear.ops)
    addresses: dict[str, int] = {}
    for kernel in kernels:
        assert kernel is not None, "every kernel the model uses is loaded"
        addresses.update(kernel.addresses())
    arch = model.arch  # type: ignore[attr-defined]
    loop = module.LayerLoop(
        addresses, arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.rms_norm_eps, arch.head_dim**-0.5,
        model.norm.detach(),  # type: ignore[attr-defined]
    )  # fmt: skip
    for layer, (k_cache, v_cache) in zip(model.layers, kv_caches, strict=True):  # type: ignore[attr-defined]
        loop.add_layer(
            layer.input_norm.detach(), layer.post_attn_norm.detach(),
            *(_describe(module, getattr(layer, name)) for name in LINEARS),
            k_cache, v_cache,
        )  # fmt: skip
    logger.info("layers run from C++ (%d layers, one call a step)", loop.num_layers())
    return LayerLoop(loop, kv_caches)


def _linears(model: nn.Module) -> list[nn.Module]:
    return [getattr(layer, name) for layer in model.layers for name in LINEARS]  # type: ignore[attr-defined]


def _unsupported(model: nn.Module, decode_kernel: object, prefill_kernel: object) -> str:
    """Why the C++ loop cannot run this model, or '' when it can."""
    from llmserve_kernels import cpu_ops

    ops = model.ops  # type: ignore[attr-defined]
    if not isinstance(ops, FusedCpuLayerOps) or not ops.all_fused:
        return "the layer ops are not all fused C++ ones (float32, or a CPU without AVX-512)"
    if model.arch.qk_norm:  # type: ignore[attr-defined]
        return "q/k norm (Qwen3) is not in the C++ loop"
    attention = cpu_ops.load()
    if attention is None or decode_kernel is not attention.paged_attention_decode:
        return "decode attention is not the C++ kernel"
    prefill = cpu_ops.load_prefill() if prefill_kernel is not None else None
    if prefill_kernel is not None and (prefill is None or prefill_kernel is not prefill.paged_attention_prefill_varlen):
        return "prefill attention is not the C++ kernel"
    for linear in _linears(model):
        if _kind(linear) is None:
            return f"a linear is {type(linear).__name__} (needs bf16 / int8 / int4 on AMX tiles, or w8a8)"
    return ""


def _kind(linear: nn.Module) -> int | None:
    if isinstance(linear, AmxLinear):
        return KIND_AMX
    if isinstance(linear, W8A8Linear):
        return KIND_W8A8
    if isinstance(linear, Int8Linear | Int4Linear) and isinstance(linear.gemm, AmxLinear):
        return KIND_INT8 if isinstance(linear, Int8Linear) else KIND_INT4
    return None


def _describe(module: ModuleType, linear: nn.Module) -> object:
    """The C++ loop's Linear for `linear`: the tensors its forward passes to its kernels."""
    kind = _kind(linear)
    if kind == KIND_AMX:
        assert isinstance(linear, AmxLinear)
        return module.Linear(KIND_AMX, linear.out_features, 0, linear.tiles, bias=linear.bias)
    if kind == KIND_W8A8:
        assert isinstance(linear, W8A8Linear)
        return module.Linear(kind, linear.out_features, 0, linear.packed, scales=linear.scales, bias=linear.bias32)
    assert isinstance(linear, Int8Linear | Int4Linear) and isinstance(linear.gemm, AmxLinear)
    return module.Linear(
        kind, linear.out_features, linear.max_kernel_rows, linear.packed,
        scales=linear.scales if kind == KIND_INT8 else None, bias=linear.bias32,
        gemm_tiles=linear.gemm.tiles, gemm_bias=linear.gemm.bias,
    )  # fmt: skip
