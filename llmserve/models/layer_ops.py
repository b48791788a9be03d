"""The elementwise work around a layer's matmuls: RMSNorm (with the residual add), the rotary
embedding with the KV-cache write, and SiLU-and-multiply; plus the sampler's row argmax and top_p threshold.

`TorchLayerOps` is the reference: transformers' arithmetic, op for op, so float32 greedy output
matches it token for token. `FusedCpuLayerOps` does the same work in one C++ pass per op
(kernels/csrc/layer_ops_cpu.cpp) where that gives the same values: the rotary embedding and
KV write and SiLU-and-multiply in every dtype (exact), the RMSNorm in half types only (its sum of
squares is ordered differently from torch's, which in float32 would differ in the last bit), and
the argmax (exact: an index).

Why it matters: at SmolLM2-135M sizes a decode step's matmuls take ~0.5 ms per layer at batch
64 in bf16, and the ~25 small torch ops these replace cost ~0.3 ms more (dispatch, an
allocation and a memory pass each). SiLU-and-multiply on a strided half of gate_up is two torch
ops and a temporary: at 512 prefill tokens ~0.76 ms a layer in bf16, several times the fused pass.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F

from llmserve_kernels import cpu_ops
from llmserve_kernels.paged_attention_ref import write_kv_cache


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as transformers (normalise in float32, scale in the input dtype), so
    # greedy outputs match it token for token.
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TorchLayerOps:
    def norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """residual += x (in place); returns rms_norm(residual)."""
        residual.add_(x)
        return rms_norm(residual, weight, eps)

    def rope_write_kv(
        self,
        qkv: torch.Tensor,  # [T, (H + 2 Hkv) D], rotated in place
        cos: torch.Tensor,  # [T, D]
        sin: torch.Tensor,  # [T, D]
        slot_mapping: torch.Tensor,  # [T] int64
        k_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D]
        v_cache: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
    ) -> torch.Tensor:  # q [T, H, D], rotated
        num_tokens, head_dim = qkv.shape[0], cos.shape[-1]
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, num_heads, head_dim)  # [T, H, D]
        k = k.view(num_tokens, num_kv_heads, head_dim)  # [T, Hkv, D]
        v = v.view(num_tokens, num_kv_heads, head_dim)
        cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, D]: one angle per position, all heads
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
        return q

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
        gate, up = gate_up.chunk(2, dim=-1)  # [T, I] each, strided views
        return F.silu(gate) * up

    # A faster greedy argmax for the sampler ([B, V] rows -> [B] long, first maximum on ties, NaN
    # counting as the maximum), or None: the sampler's own torch one.
    argmax: Callable[[torch.Tensor], torch.Tensor] | None = None
    # A faster nucleus threshold for the sampler (probs [R, V] float32, top_p [R, 1] -> [R, 1]; see
    # sampler.sorted_top_p_cut), or None: the sampler's torch one, which sorts every row.
    top_p_cut: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # The sampler's random rows in one fused pass (see sampler.Sampler's `sample_rows`), or None.
    sample_rows: Callable[..., torch.Tensor] | None = None


class FusedCpuLayerOps(TorchLayerOps):
    def __init__(self, module: ModuleType, dtype: torch.dtype) -> None:
        self._ops = module
        self._fused_norm = dtype != torch.float32
        # Exact only with the exp torch's own silu uses: its AVX-512 kernels' Sleef expf_u10.
        self._fused_silu = module.exact_silu() and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
        # CPU rows with a contiguous last dimension, which the sampler's logits always are: 0.3 ms
        # for [64, 49152] bf16 where torch's max() takes 3.1 ms and argmax() more.
        self.argmax = module.argmax_rows
        # No sort: 64 rows of 49152 took ~0.18 s to sort on this CPU.
        self.top_p_cut = module.top_p_cut
        # temperature, top_k, top_p, min_p and the draw in one pass a row: ~8 torch passes over
        # [64, 49152] before (kernels/csrc/sampler_cpu.cpp).
        sampler = cpu_ops.load_sampler()
        self.sample_rows = None if sampler is None else sampler.sample_rows

    @property
    def all_fused(self) -> bool:
        """Whether every op here is the C++ one (not float32's torch norm, nor torch's silu on a
        CPU without AVX-512): what the C++ layer loop (models/layer_loop.py) calls."""
        return self._fused_norm and self._fused_silu

    def norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if self._fused_norm:
            return self._ops.rms_norm(x, weight, eps)
        return rms_norm(x, weight, eps)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if self._fused_norm:
            return self._ops.add_rms_norm_(x, residual, weight, eps)
        return super().add_norm(x, residual, weight, eps)

    def rope_write_kv(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slot_mapping: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
    ) -> torch.Tensor:
        # q comes back as its own contiguous [T, H, D] (what the attention kernels want); qkv is untouched
        return self._ops.rope_write_kv(qkv, cos, sin, slot_mapping, k_cache, v_cache, num_heads, num_kv_heads)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self._fused_silu:
            return self._ops.silu_mul(gate_up)
        return super().silu_mul(gate_up)


LayerOps = TorchLayerOps
