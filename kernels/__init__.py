"""Attention kernels, imported as `llmserve_kernels` (see pyproject.toml: a top-level `kernels`
package would shadow the PyPI package of that name).

`paged_attention_ref` is the torch reference, and the path the engine takes on CPU."""

from __future__ import annotations

from llmserve_kernels.paged_attention_ref import (
    KV_SCALE_BYTES,
    decode_mask,
    dequantize_kv,
    gather_context,
    gather_index,
    paged_attention_decode,
    paged_attention_prefill,
    quantize_kv,
    write_kv_cache,
)

__all__ = [
    "KV_SCALE_BYTES",
    "decode_mask",
    "dequantize_kv",
    "gather_context",
    "gather_index",
    "paged_attention_decode",
    "paged_attention_prefill",
    "quantize_kv",
    "write_kv_cache",
]
