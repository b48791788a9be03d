"""Attention over the paged KV cache for one packed batch.

The runner lays a step out as [single-query seqs | multi-query seqs]: every sequence fed one
token (decodes, and one-token prefill chunks) comes first and is attended to in one batched
call; each longer prefill chunk gets its own call. The metadata is built once per step and
shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from llmserve_kernels import paged_attention_decode, paged_attention_prefill, write_kv_cache


@dataclass(slots=True)
class PrefillChunk:
    token_start: int  # first row of this chunk in the packed batch
    num_tokens: int
    start: int  # position of its first token in the sequence (= tokens already cached)
    index: torch.Tensor  # [1, Hkv, nblk] cache rows of the whole context (gather_index)


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes
    num_single: int  # rows [0, num_single) are one-token sequences
    single_index: torch.Tensor | None  # [num_single, Hkv, nblk] cache rows (gather_index), padded
    single_mask: torch.Tensor | None  # [num_single, 1, 1, nblk * block_size] additive, -inf on padding
    chunks: list[PrefillChunk]


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, H, D]
    # Write first, then read: every query reads its own new keys back from the cache.
    write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
    if not meta.chunks:
        assert meta.single_index is not None and meta.single_mask is not None
        return paged_attention_decode(q, k_cache, v_cache, meta.single_index, meta.single_mask, scale)
    out = torch.empty_like(q)
    if meta.num_single:
        assert meta.single_index is not None and meta.single_mask is not None
        out[: meta.num_single] = paged_attention_decode(
            q[: meta.num_single], k_cache, v_cache, meta.single_index, meta.single_mask, scale
        )
    for chunk in meta.chunks:
        rows = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
        out[rows] = paged_attention_prefill(q[rows], k_cache, v_cache, chunk.index, chunk.start, scale)
    return out
