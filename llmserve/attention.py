"""Attention over the paged KV cache for one packed batch.

The runner lays a step out as [single-query seqs | multi-query seqs]: every sequence fed one
token (decodes, and one-token prefill chunks) comes first, sorted by context length and cut into
a few groups, each attended to in one batched call; each longer prefill chunk gets its own call. The metadata is built once per step and
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
class DecodeGroup:
    """One-token sequences of similar context length, attended to in one batched call."""

    row_start: int
    num_rows: int
    index: torch.Tensor  # [num_rows, Hkv, nblk] cache rows (gather_index), padded to the longest
    mask: torch.Tensor  # [num_rows, 1, 1, nblk * block_size] additive, -inf on the padding


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes
    decode_groups: list[DecodeGroup]  # cover rows [0, num_single)
    chunks: list[PrefillChunk]  # the rows after


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
    if not meta.chunks and len(meta.decode_groups) == 1:
        group = meta.decode_groups[0]
        return paged_attention_decode(q, k_cache, v_cache, group.index, group.mask, scale)
    out = torch.empty_like(q)
    for group in meta.decode_groups:
        rows = slice(group.row_start, group.row_start + group.num_rows)
        out[rows] = paged_attention_decode(q[rows], k_cache, v_cache, group.index, group.mask, scale)
    for chunk in meta.chunks:
        rows = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
        out[rows] = paged_attention_prefill(q[rows], k_cache, v_cache, chunk.index, chunk.start, scale)
    return out
