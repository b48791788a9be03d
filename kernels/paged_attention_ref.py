"""Paged attention in plain torch: the reference the Triton kernels are checked against, and
the CPU path of the engine.

Cache layout, per layer: k_cache, v_cache: [num_blocks, Hkv, block_size, D]. Token t of a
sequence lives in block `block_table[t // block_size]`, row `t % block_size`.

Head-major blocks let one index op gather a batch's context straight into the [B, Hkv, L, D]
layout attention wants: viewing the cache as [num_blocks * Hkv, block_size, D], entry
`block * Hkv + h` is one head's block, a contiguous block_size * D run (4 KB in fp32 at D=64).

The int8 KV cache (`kv_cache_dtype = "int8"`) is [num_blocks, Hkv, block_size, D + 4] int8: a
row holds one token's D codes of one head, then their float32 scale in its 4 bytes (`quantize_kv`).
`gather_context` dequantizes, so every function here takes either cache.

Cost (decode, per layer): each sequence's context is read once by the gather and once more by
the matmuls, 2 * L * Hkv * D * bytes each for K and V; at SmolLM2-135M sizes (Hkv=3, D=64)
that is 1.5 KB per context token per layer in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KV_SCALE_BYTES = 4  # the float32 scale at the end of an int8 cache row


def quantize_kv(x: torch.Tensor) -> torch.Tensor:
    """[..., D] model-dtype rows -> [..., D + 4] int8 cache rows: symmetric per row (one token, one
    head), scale = max|x| / 127, code = round-half-even(x * (127 / max|x|)), in float32. The C++
    writer (kernels/csrc/kv_int8.h kv_quantize_row) does the same float32 operations, so both
    write the same bytes."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True)  # [..., 1]
    # Tensor by tensor: torch turns `127.0 / t` into 127 * (1 / t), two roundings, not the C++ one.
    c127 = torch.full_like(amax, 127.0)
    inv = torch.where(amax > 0, c127 / amax, torch.zeros_like(amax))
    codes = (x32 * inv).round().clamp_(-127, 127).to(torch.int8)
    scale = (amax / c127).contiguous().view(torch.int8)  # [..., 4]: the float32's bytes
    return torch.cat([codes, scale], dim=-1)


def dequantize_kv(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., D + 4] int8 cache rows -> [..., D] values code * scale (float32, then `dtype`)."""
    head_dim = rows.shape[-1] - KV_SCALE_BYTES
    scale = rows[..., head_dim:].contiguous().view(torch.float32)  # [..., 1]
    return (rows[..., :head_dim].float() * scale).to(dtype)


def write_kv_cache(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64: block * block_size + offset
) -> None:
    block_size = k_cache.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    if k_cache.dtype == torch.int8:
        k, v = quantize_kv(k), quantize_kv(v)  # [T, Hkv, D + 4]
    # Two advanced indices around a slice: the indexed view is [T, Hkv, D], like k.
    k_cache[blocks, :, offsets] = k
    v_cache[blocks, :, offsets] = v


def gather_index(block_tables: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, nblk] block ids -> [B, Hkv, nblk] rows of the cache viewed as [num_blocks * Hkv, bs, D]."""
    heads = torch.arange(num_kv_heads, device=block_tables.device)
    return block_tables[:, None, :] * num_kv_heads + heads[None, :, None]


def gather_context(cache: torch.Tensor, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Contiguous context of each sequence: [B, Hkv, nblk * block_size, D]; an int8 cache comes
    back dequantized to `dtype`."""
    num_blocks, num_kv_heads, block_size, row = cache.shape
    # index_select runs 2-2.5x faster than advanced indexing here (measured, fp32 and bf16).
    rows = cache.view(num_blocks * num_kv_heads, block_size, row).index_select(0, index.flatten())
    rows = rows.view(index.shape[0], num_kv_heads, -1, row)  # [B, Hkv, nblk * bs, row]
    if cache.dtype == torch.int8:
        assert dtype is not None, "an int8 cache needs the dtype to dequantize to"
        return dequantize_kv(rows, dtype)  # [B, Hkv, nblk * bs, D]
    return rows


def decode_mask(context_lens: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, 1, width]: 0 inside each context, -inf in the padding."""
    pad = torch.arange(width, device=context_lens.device)[None, :] >= context_lens[:, None]  # [B, width]
    mask = torch.zeros(pad.shape, dtype=dtype, device=context_lens.device).masked_fill_(pad, float("-inf"))
    return mask[:, None, None, :]


def paged_attention_decode(
    q: torch.Tensor,  # [B, H, D]: one query per sequence, at position context_len - 1
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    index: torch.Tensor,  # [B, Hkv, nblk] from gather_index
    mask: torch.Tensor,  # [B, 1, 1, nblk * block_size] from decode_mask
    scale: float,
) -> torch.Tensor:  # [B, H, D]
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    k = gather_context(k_cache, index, q.dtype)  # [B, Hkv, L, D]
    v = gather_context(v_cache, index, q.dtype)
    # Grouped-query attention as plain matmuls: the g query heads sharing a KV head form the
    # rows of one [g, D] x [D, L] product, so K/V are never repeated per query head.
    qg = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, Hkv, g, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale + mask  # [B, Hkv, g, L]
    probs = scores.softmax(dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)  # [B, Hkv, g, D]
    return out.view(batch, num_heads, head_dim)


def paged_attention_prefill(
    q: torch.Tensor,  # [n, H, D]: query tokens at positions start .. start + n - 1
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    index: torch.Tensor,  # [1, Hkv, nblk] covering the whole context, new tokens included
    start: int,
    scale: float,
) -> torch.Tensor:  # [n, H, D]
    n = q.shape[0]
    ctx = start + n
    k = gather_context(k_cache, index, q.dtype)[:, :, :ctx]  # [1, Hkv, ctx, D]
    v = gather_context(v_cache, index, q.dtype)[:, :, :ctx]
    if start == 0:
        mask, causal = None, True
    else:
        # query i sits at position start + i and sees keys 0 .. start + i
        q_pos = torch.arange(start, ctx, device=q.device)[:, None]  # [n, 1]
        k_pos = torch.arange(ctx, device=q.device)[None, :]  # [1, ctx]
        mask, causal = k_pos <= q_pos, False
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),  # [1, H, n, D]
        k,
        v,
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(0).transpose(0, 1)  # [n, H, D]
