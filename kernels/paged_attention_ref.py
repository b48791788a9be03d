"""Paged attention in plain torch: the reference the Triton kernels are checked against, and
the CPU path of the engine.

Cache layout, per layer: k_cache, v_cache: [num_blocks, block_size, Hkv, D]. Token t of a
sequence lives in slot `block_table[t // block_size] * block_size + t % block_size` of the
flattened view [num_blocks * block_size, Hkv, D].

Cost (decode, per layer): each sequence reads its whole context once, 2 * L * Hkv * D * bytes;
the gather below copies it into a padded batch first, so it moves about three times that. At
SmolLM2-135M sizes (Hkv=3, D=64, fp32) that is 1.5 KB per context token per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_cache(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)  # [slots, Hkv, D]
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def gather_slots(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Slot index of every context token, padded with slot 0: [B, max(context_lens)].

    block_tables: [B, max_blocks] int64 (padded with anything), context_lens: [B] int64."""
    max_len = int(context_lens.max())
    pos = torch.arange(max_len, device=block_tables.device)  # [Lmax]
    block_idx = (pos // block_size).clamp(max=block_tables.shape[1] - 1)
    slots = block_tables[:, block_idx] * block_size + pos % block_size  # [B, Lmax]
    return slots.masked_fill(pos[None, :] >= context_lens[:, None], 0)


def paged_attention_decode(
    q: torch.Tensor,  # [B, H, D]: one query token per sequence, at position context_len - 1
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [B, Lmax] from gather_slots
    context_lens: torch.Tensor,  # [B]
    scale: float,
) -> torch.Tensor:  # [B, H, D]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k = k_cache.view(-1, num_kv_heads, head_dim)[slots]  # [B, Lmax, Hkv, D]
    v = v_cache.view(-1, num_kv_heads, head_dim)[slots]
    pad = torch.arange(slots.shape[1], device=q.device)[None, :] >= context_lens[:, None]  # [B, Lmax]
    mask = torch.zeros(pad.shape, dtype=q.dtype, device=q.device).masked_fill_(pad, float("-inf"))
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [B, H, 1, D]
        k.transpose(1, 2),  # [B, Hkv, Lmax, D]
        v.transpose(1, 2),
        attn_mask=mask[:, None, None, :],  # [B, 1, 1, Lmax]
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(2)  # [B, H, D]


def paged_attention_prefill(
    q: torch.Tensor,  # [n, H, D]: query tokens at positions start .. start + n - 1
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [start + n]: slots of the whole context, the new tokens included
    start: int,
    scale: float,
) -> torch.Tensor:  # [n, H, D]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    n = q.shape[0]
    k = k_cache.view(-1, num_kv_heads, head_dim)[slots].transpose(0, 1)  # [Hkv, ctx, D]
    v = v_cache.view(-1, num_kv_heads, head_dim)[slots].transpose(0, 1)
    if start == 0:
        mask, causal = None, True
    else:
        # query i sits at position start + i and sees keys 0 .. start + i
        q_pos = torch.arange(start, start + n, device=q.device)[:, None]  # [n, 1]
        k_pos = torch.arange(start + n, device=q.device)[None, :]  # [1, ctx]
        mask, causal = k_pos <= q_pos, False
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),  # [1, H, n, D]
        k.unsqueeze(0),  # [1, Hkv, ctx, D]
        v.unsqueeze(0),
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(0).transpose(0, 1)  # [n, H, D]
