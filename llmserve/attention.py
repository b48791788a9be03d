"""Attention over the paged KV cache for one packed batch.

The runner lays a step out as [single-query seqs | multi-query seqs]: every sequence fed one
token (decodes, and one-token prefill chunks) comes first, sorted by context length and cut into
a few groups, each attended to in one batched call; each longer prefill chunk gets its own call. The metadata is built once per step and
shared by all layers. With a kernel that reads the paged cache itself (C++ or Triton), the one-token
seqs are one call (`DecodeBatch`); with a varlen prefill kernel (C++ on CPU, Triton on CUDA), so are
all the chunks (`PrefillBatch`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmserve_kernels.paged_attention_ref import paged_attention_decode, paged_attention_prefill


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


# (q [B, H, D], k_cache, v_cache, block_tables [B, nblk] int64, context_lens [B] int64, scale) -> [B, H, D]
DecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass(slots=True)
class DecodeBatch:
    """All one-token sequences, for a kernel that reads the paged cache itself (no padding)."""

    kernel: DecodeKernel
    num_rows: int
    block_tables: torch.Tensor  # [num_rows, max_blocks] int64, padded with 0
    context_lens: torch.Tensor  # [num_rows] int64


# (q [n, H, D], k_cache, v_cache, block_tables [S, nblk], cu_seqlens [S + 1], context_lens [S], scale,
#  max_query_len) -> [n, H, D]
PrefillKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, int],
    torch.Tensor,
]


@dataclass(slots=True)
class PrefillBatch:
    """All multi-token chunks (the rows after the one-token seqs), for a varlen kernel: one call."""

    kernel: PrefillKernel
    row_start: int
    block_tables: torch.Tensor  # [S, max_blocks] int64, padded with 0
    cu_seqlens: torch.Tensor  # [S + 1] int32: chunk s is rows row_start + cu[s] .. row_start + cu[s + 1] - 1
    context_lens: torch.Tensor  # [S] int32: tokens before the chunk + its own
    max_query_len: int

    def __call__(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
    ) -> torch.Tensor:
        table, cu, lens = self.block_tables, self.cu_seqlens, self.context_lens
        return self.kernel(q, k_cache, v_cache, table, cu, lens, scale, self.max_query_len)


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes
    decode_groups: list[DecodeGroup]  # cover the one-token rows (first in the batch) on the torch path
    chunks: list[PrefillChunk]  # the rows after
    decode_batch: DecodeBatch | None = None  # replaces decode_groups when a kernel is in use
    prefill_batch: PrefillBatch | None = None  # replaces chunks when a kernel is in use


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, H, D]
    """Attention of the step's queries over the cache, which already holds the step's own K and V
    (the layer writes them first, fused with the rotary embedding): every query reads its own
    new keys back from the cache."""
    batch, groups, prefill = meta.decode_batch, meta.decode_groups, meta.prefill_batch
    if prefill is not None and prefill.row_start == 0:  # pure prefill step: no copy either
        return prefill(q, k_cache, v_cache, scale)
    if not meta.chunks and prefill is None:  # pure decode step: no copy into a shared output
        if batch is not None:
            return batch.kernel(q, k_cache, v_cache, batch.block_tables, batch.context_lens, scale)
        if len(groups) == 1:
            return paged_attention_decode(q, k_cache, v_cache, groups[0].index, groups[0].mask, scale)
    out = torch.empty_like(q)
    if batch is not None:
        rows = slice(0, batch.num_rows)
        out[rows] = batch.kernel(q[rows], k_cache, v_cache, batch.block_tables, batch.context_lens, scale)
    else:
        for group in groups:
            rows = slice(group.row_start, group.row_start + group.num_rows)
            out[rows] = paged_attention_decode(q[rows], k_cache, v_cache, group.index, group.mask, scale)
    if prefill is not None:
        out[prefill.row_start :] = prefill(q[prefill.row_start :], k_cache, v_cache, scale)
    for chunk in meta.chunks:
        rows = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
        out[rows] = paged_attention_prefill(q[rows], k_cache, v_cache, chunk.index, chunk.start, scale)
    return out
