"""Paged attention in Triton: decode (one query per sequence) and varlen prefill/extend, reading
K and V straight from the paged cache, with online softmax and fp32 accumulation.

Same cache layout as the torch reference (`paged_attention_ref.py`): k_cache, v_cache are
[num_blocks, Hkv, block_size, D], token t of a sequence lives in block `block_tables[s, t // block_size]`,
row `t % block_size`. The new tokens of a step are already written to the cache (the engine writes
first, then attends), so a query at position p attends to cache rows 0..p of its sequence.

Entry points (all take and return torch tensors; `scale` is the softmax scale, usually D**-0.5):

- `paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale)`: the engine's
  `DecodeKernel` contract, the one the C++ CPU kernel has. The torch reference
  `paged_attention_ref.paged_attention_decode` takes the same two inputs in their padded-gather form
  (`gather_index(block_tables)`, `decode_mask(context_lens)`); the answers are the same.
- `paged_attention_prefill_varlen(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, scale,
  max_query_len)`: every prefill chunk of a step in one launch (packed queries, cu_seqlens style).
- `paged_attention_prefill(q, k_cache, v_cache, index, start, scale)`: the torch reference's exact
  signature (one chunk), on top of the varlen kernel.

`import triton` is guarded: this module imports where triton is absent (`available()` says so) and
the wrappers raise there. Whether the kernels run compiled (CUDA) or under Triton's CPU interpreter
is fixed by `TRITON_INTERPRET=1` in the environment when `triton.language` is first imported (it jits
its own `tl.max`, `tl.sum` then) and when this module is: set it before either, or not at all.
`interpreted()` reports which.

Cost, decode, per layer: each (sequence, KV head) program reads its context's K and V once,
2 * L * D * bytes per KV head, and its g query heads reuse them from registers — the same K/V bytes
as one query head, where the torch reference reads them twice (gather, then matmul). The FLOPs are
4 * g * L * D per KV head, so at g <= 8 and 2-byte K/V that is <= 8 FLOP per byte: memory-bound on
any GPU (an H100 needs ~300 FLOP/byte to be compute-bound), and the figure to watch is achieved
bandwidth against HBM peak (`benchmarks/bench_kernels.py` prints it).
"""

from __future__ import annotations

import functools
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU paths of the engine do not need triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e)), and exp2 is one instruction
MIN_SPLIT_TOKENS = 256  # a decode split shorter than this spends more on the merge than it saves
MAX_SPLITS = 64


def available() -> bool:
    return triton is not None


def interpreted() -> bool:
    """True when the kernels were built for Triton's interpreter (they then run on CPU tensors)."""
    return triton is not None and not isinstance(_decode_kernel, triton.runtime.JITFunction)


if triton is not None:

    @triton.jit
    def _decode_kernel(
        q_ptr,  # [B, H, D]
        k_cache_ptr,  # [num_blocks, Hkv, block_size, D]
        v_cache_ptr,
        tables_ptr,  # [B, max_blocks]
        lens_ptr,  # [B]
        out_ptr,  # SPLIT: [B, H, num_splits, D] fp32 unnormalised; else [B, H, D] in q's dtype
        m_ptr,  # SPLIT: [B, H, num_splits] fp32 running max (base-2 logits); unused otherwise
        l_ptr,  # SPLIT: [B, H, num_splits] fp32 softmax denominator; unused otherwise
        scale_log2e,
        tokens_per_split,
        stride_qb,
        stride_qh,
        stride_cb,  # cache strides, the same for K and V (checked by the wrapper)
        stride_ch,
        stride_ct,
        stride_tb,
        stride_ob,
        stride_oh,
        stride_os,
        NUM_HEADS: tl.constexpr,
        GROUP: tl.constexpr,  # query heads per KV head
        GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two >= 16 (tl.dot's minimum)
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,  # tokens per cache block
        BLOCK_N: tl.constexpr,  # context tokens per loop step
        SPLIT: tl.constexpr,
        DOT_FP32: tl.constexpr,  # interpreter + bf16 only, see _dot_in_fp32
    ):
        # One program: the GROUP query heads of one KV head of one sequence, over one split of its
        # context. K/V rows are loaded once and used by every query head of the group.
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        context_len = tl.load(lens_ptr + seq).to(tl.int32)
        lo = split * tokens_per_split
        hi = tl.minimum(context_len, lo + tokens_per_split)

        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        heads = kv_head * GROUP + offs_g
        g_mask = offs_g < GROUP
        d_mask = offs_d < HEAD_DIM
        q = tl.load(
            q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=g_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # [GROUP_PAD, HEAD_DIM_PAD]
        if DOT_FP32:
            q = q.to(tl.float32)

        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
        table_row = tables_ptr + seq.to(tl.int64) * stride_tb
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_mask = offs_n < hi
            # Token t is row t % BLOCK_SIZE of block table[t // BLOCK_SIZE]: a per-row gather, so
            # BLOCK_N need not equal the cache's block size. int64: block * stride overflows int32
            # past 2**31 cache elements (a few GB).
            blocks = tl.load(table_row + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
            kv_offs = (
                blocks[:, None] * stride_cb + kv_head * stride_ch + (offs_n % BLOCK_SIZE)[:, None] * stride_ct
            ) + offs_d[None, :]  # [BLOCK_N, HEAD_DIM_PAD]
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
            # ieee: fp32 caches must not be rounded to tf32 (10-bit mantissa); halves ignore it.
            if DOT_FP32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2e  # [GROUP_PAD, BLOCK_N]
            s = tl.where(n_mask[None, :], s, float("-inf"))
            # Every step holds >= 1 valid token (start < hi), so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            # P is rounded to the cache dtype for the second product, as the reference rounds probs.
            p = p.to(v_cache_ptr.dtype.element_ty)
            if DOT_FP32:
                p = p.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m_i = m_new

        out_mask = g_mask[:, None] & d_mask[None, :]
        out_offs = seq * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
        if SPLIT:
            tl.store(out_ptr + out_offs, acc, mask=out_mask)
            ml_offs = (seq * NUM_HEADS + heads) * tl.num_programs(2) + split
            tl.store(m_ptr + ml_offs, m_i, mask=g_mask)
            tl.store(l_ptr + ml_offs, l_i, mask=g_mask)
        else:
            # An empty context (length 0) gives zeros rather than 0/0.
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _decode_merge_kernel(
        part_ptr,  # [B, H, num_splits, D] fp32
        m_ptr,  # [B, H, num_splits] fp32
        l_ptr,
        out_ptr,  # [B, H, D]
        num_splits,
        stride_ob,
        stride_oh,
        NUM_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
    ):
        # Softmax over the union of the splits: rescale each split's sums to the common max.
        seq = tl.program_id(0)
        head = tl.program_id(1)
        offs_s = tl.arange(0, SPLITS_PAD)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        s_mask = offs_s < num_splits
        row = (seq * NUM_HEADS + head) * num_splits
        m = tl.load(m_ptr + row + offs_s, mask=s_mask, other=float("-inf"))
        denom = tl.load(l_ptr + row + offs_s, mask=s_mask, other=0.0)
        m_max = tl.max(m, axis=0)
        # Splits past a short sequence's end are empty (m = -inf): weight 0, not exp2(nan).
        w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)  # [SPLITS_PAD]
        total = tl.sum(w * denom, axis=0)
        part = tl.load(
            part_ptr + (row + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=s_mask[:, None] & (offs_d < HEAD_DIM)[None, :],
            other=0.0,
        )  # [SPLITS_PAD, HEAD_DIM_PAD]
        out = tl.sum(w[:, None] * part, axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(
            out_ptr + seq * stride_ob + head * stride_oh + offs_d,
            out.to(out_ptr.dtype.element_ty),
            mask=offs_d < HEAD_DIM,
        )

    @triton.jit
    def _prefill_kernel(
        q_ptr,  # [T, H, D] packed queries of all chunks
        k_cache_ptr,
        v_cache_ptr,
        tables_ptr,  # [S, max_blocks]
        cu_seqlens_ptr,  # [S + 1]: chunk s is rows cu[s] .. cu[s + 1] - 1 of q
        lens_ptr,  # [S]: context length after the chunk (tokens before it + its own)
        out_ptr,  # [T, H, D]
        scale_log2e,
        stride_qt,
        stride_qh,
        stride_cb,
        stride_ch,
        stride_ct,
        stride_tb,
        stride_ot,
        stride_oh,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr,  # query tokens per program
        BLOCK_N: tl.constexpr,  # context tokens per loop step
        DOT_FP32: tl.constexpr,
    ):
        # One program: BLOCK_M consecutive query tokens of one chunk, one query head. Query i of a
        # chunk of n tokens sits at position context_len - n + i and sees positions 0 ..= its own.
        tile = tl.program_id(0)
        seq = tl.program_id(1)
        head = tl.program_id(2)
        kv_head = head // GROUP
        q_start = tl.load(cu_seqlens_ptr + seq).to(tl.int32)
        n = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int32) - q_start
        context_len = tl.load(lens_ptr + seq).to(tl.int32)
        prefix = context_len - n

        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        m_mask = offs_m < n  # all false on the grid's spare tiles of short chunks: nothing loaded or stored
        d_mask = offs_d < HEAD_DIM
        q_rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
            mask=m_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # [BLOCK_M, HEAD_DIM_PAD]
        if DOT_FP32:
            q = q.to(tl.float32)
        q_pos = prefix + offs_m

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
        # The tile's last query sees up to its own position; nothing past it is read.
        hi = tl.minimum(context_len, prefix + (tile + 1) * BLOCK_M)
        hi = tl.where(tile * BLOCK_M < n, hi, 0)
        table_row = tables_ptr + seq.to(tl.int64) * stride_tb
        for start in range(0, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_valid = offs_n < hi
            blocks = tl.load(table_row + offs_n // BLOCK_SIZE, mask=n_valid, other=0).to(tl.int64)
            kv_offs = (
                blocks[:, None] * stride_cb + kv_head * stride_ch + (offs_n % BLOCK_SIZE)[:, None] * stride_ct
            ) + offs_d[None, :]  # [BLOCK_N, HEAD_DIM_PAD]
            kv_mask = n_valid[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2e  # [BLOCK_M, BLOCK_N]
            visible = n_valid[None, :] & (offs_n[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
            # Position 0 is visible to every query and lies in the first step, so m_new is finite
            # from there on (padding rows past n have q_pos >= context_len and see everything).
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            # P is rounded to the cache dtype for the second product, as the reference rounds probs.
            p = p.to(v_cache_ptr.dtype.element_ty)
            if DOT_FP32:
                p = p.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m_i = m_new

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=m_mask[:, None] & d_mask[None, :],
        )


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton attention kernels need the `triton` package (pip install triton)")


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, q: torch.Tensor) -> None:
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.dim() != 4:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, Hkv, block_size, D] with the same "
                         f"strides, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")  # fmt: skip
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache must be contiguous in the head dimension")
    if q.shape[-1] != k_cache.shape[-1] or q.shape[-2] % k_cache.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)}: same head_dim, "
                         "and query heads a multiple of KV heads")  # fmt: skip


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    """Under the interpreter, bf16 operands go to tl.dot as fp32: the interpreter keeps bf16 as uint16
    and multiplies the bit patterns (triton issue #11584; its docs: no bf16 arithmetic). The answer is
    the GPU's: a bf16 x bf16 product is exact in fp32, and both accumulate in fp32."""
    return interpreted() and dtype == torch.bfloat16


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _decode_splits(batch: int, num_kv_heads: int, max_tokens: int, device: torch.device) -> int:
    """How many pieces each sequence's context is cut into, so the grid covers the GPU.

    One program per (sequence, KV head) streams its K/V through one SM. With fewer programs than
    SMs (a few long sequences, or few KV heads), most SMs, and so most of HBM's bandwidth, sit idle:
    an H100 needs ~3.35 TB/s / 132 SMs ≈ 25 GB/s from every SM at once to reach peak. Splitting the
    context into pieces, merged by a second small kernel, aims at ~2 programs per SM. Each split
    writes and the merge reads back (D + 2) fp32 per query head: at g = 4, D = 128 that is ~4 KB
    against the 128 KB of bf16 K/V in a 256-token split, ~3% more traffic."""
    if device.type != "cuda" or interpreted():
        return 1
    programs = batch * num_kv_heads
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    return max(1, min(MAX_SPLITS, math.ceil(2 * sms / programs), max_tokens // MIN_SPLIT_TOKENS))


def paged_attention_decode(
    q: torch.Tensor,  # [B, H, D]: one query per sequence, at position context_lens - 1
    k_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32/int64; entries past a context are never read
    context_lens: torch.Tensor,  # [B] int32/int64, >= 1 (0 gives zeros)
    scale: float,
    num_splits: int | None = None,  # None: chosen for the GPU (1 under the interpreter)
    block_n: int | None = None,  # context tokens per loop step; None: from the tile budget
) -> torch.Tensor:  # [B, H, D] in q's dtype
    _require_triton()
    _check_cache(k_cache, v_cache, q)
    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if batch == 0:
        return out
    head_dim_pad = _pow2_at_least(head_dim)
    block_n = block_n or _tiles(head_dim_pad, q.element_size())[1]
    # The table's width bounds every context without reading context_lens back (no GPU sync).
    max_tokens = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = _decode_splits(batch, num_kv_heads, max_tokens, q.device)
    tokens_per_split = math.ceil(max_tokens / num_splits / block_n) * block_n
    num_splits = math.ceil(max_tokens / tokens_per_split)
    common = dict(
        NUM_HEADS=num_heads, GROUP=group, GROUP_PAD=_pow2_at_least(group), HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size, BLOCK_N=block_n, DOT_FP32=_dot_in_fp32(q.dtype),
        num_warps=4,
    )  # fmt: skip
    args = (
        scale * LOG2E,
        tokens_per_split,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        block_tables.stride(0),
    )
    grid = (batch, num_kv_heads, num_splits)
    if num_splits == 1:
        _decode_kernel[grid](q, k_cache, v_cache, block_tables, context_lens, out, out, out, *args,
                             out.stride(0), out.stride(1), 0, SPLIT=False, **common)  # fmt: skip
        return out
    part = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    m = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    denom = torch.empty_like(m)
    _decode_kernel[grid](q, k_cache, v_cache, block_tables, context_lens, part, m, denom, *args,
                         part.stride(0), part.stride(1), part.stride(2), SPLIT=True, **common)  # fmt: skip
    _decode_merge_kernel[(batch, num_heads)](
        part, m, denom, out, num_splits, out.stride(0), out.stride(1), NUM_HEADS=num_heads, HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad, SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4,
    )  # fmt: skip
    return out


def _tiles(head_dim_pad: int, element_size: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): query rows and context tokens per tile, so the tiles fit shared memory.

    At 64 x 64, D = 128 and 2-byte elements a Q tile is 16 KB and a K or V tile 16 KB: the prefill
    kernel compiles to 40 KB of shared memory on sm_80 and 48 KB on sm_90 (checked by compiling, see
    tests/test_triton_kernels.py), inside every CUDA GPU's 64-228 KB per SM. fp32 or D = 256 doubles
    the bytes per row, so the tiles halve."""
    if head_dim_pad * element_size > 256:
        return 32, 32
    return 64, 64


def paged_attention_prefill_varlen(
    q: torch.Tensor,  # [T, H, D]: the chunks' query tokens, packed
    k_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D], the chunks' own K/V already written
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks] int32/int64
    cu_seqlens: torch.Tensor,  # [S + 1] int32/int64: chunk s is rows cu[s] .. cu[s + 1] - 1
    context_lens: torch.Tensor,  # [S]: tokens before chunk s + its own
    scale: float,
    max_query_len: int,  # the longest chunk: sizes the grid without a GPU sync
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:  # [T, H, D]
    _require_triton()
    _check_cache(k_cache, v_cache, q)
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    out = torch.empty_like(q)
    num_seqs = cu_seqlens.shape[0] - 1
    if num_tokens == 0 or num_seqs == 0:
        return out
    head_dim_pad = _pow2_at_least(head_dim)
    tile_m, tile_n = _tiles(head_dim_pad, q.element_size())
    block_m, block_n = block_m or tile_m, block_n or tile_n
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, out, scale * LOG2E,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, DOT_FP32=_dot_in_fp32(q.dtype), num_warps=4,
    )  # fmt: skip
    return out


def paged_attention_prefill(
    q: torch.Tensor,  # [n, H, D]: query tokens at positions start .. start + n - 1
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    index: torch.Tensor,  # [1, Hkv, nblk] from gather_index, covering the whole context
    start: int,
    scale: float,
) -> torch.Tensor:  # [n, H, D]
    """The torch reference's signature, for one chunk. The engine calls the varlen kernel instead,
    with the step's tables built once: this wrapper makes two tiny tensors per call."""
    num_kv_heads = k_cache.shape[1]
    n = q.shape[0]
    # gather_index row h of block b is b * Hkv + h: head 0's row gives the block ids back.
    block_table = index[:, 0, :] // num_kv_heads  # [1, nblk]
    cu_seqlens = torch.tensor([0, n], dtype=torch.int32, device=q.device)
    context_lens = torch.tensor([start + n], dtype=torch.int32, device=q.device)
    return paged_attention_prefill_varlen(
        q, k_cache, v_cache, block_table, cu_seqlens, context_lens, scale, n
    )
