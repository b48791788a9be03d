"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM) over a packed token batch.

No padding and no batch dimension: a step is T tokens from many sequences, each with its own
position, and attention reads and writes the paged KV cache. Weights come from the Hugging
Face state dict; q/k/v and gate/up are fused into one matmul each at load time, which halves
the number of GEMM launches per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.attention import AttentionMetadata, paged_attention
from llmserve.models.layer_ops import LayerOps, TorchLayerOps


@dataclass(frozen=True, slots=True)
class LlamaArch:
    """The part of a Hugging Face config this code uses."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before RoPE

    @classmethod
    def from_hf(cls, config: object) -> LlamaArch:
        arch = (getattr(config, "architectures", None) or ["LlamaForCausalLM"])[0]
        num_heads = config.num_attention_heads  # type: ignore[attr-defined]
        hidden = config.hidden_size  # type: ignore[attr-defined]
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only silu)")
        is_qwen2 = arch == "Qwen2ForCausalLM"
        bias = bool(getattr(config, "attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=config.vocab_size,  # type: ignore[attr-defined]
            hidden_size=hidden,
            intermediate_size=config.intermediate_size,  # type: ignore[attr-defined]
            num_layers=config.num_hidden_layers,  # type: ignore[attr-defined]
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or hidden // num_heads,
            rms_norm_eps=config.rms_norm_eps,  # type: ignore[attr-defined]
            max_position_embeddings=config.max_position_embeddings,  # type: ignore[attr-defined]
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or bias,
            o_bias=bias and not is_qwen2,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
        )


class LlamaLayer(nn.Module):
    def __init__(self, arch: LlamaArch) -> None:
        super().__init__()
        self.arch = arch
        h, d = arch.hidden_size, arch.head_dim
        self.q_size, self.kv_size = arch.num_heads * d, arch.num_kv_heads * d
        self.input_norm = nn.Parameter(torch.ones(h))
        self.post_attn_norm = nn.Parameter(torch.ones(h))
        # nn.Linear so that quantization can swap them for its own modules (llmserve/quantization.py).
        self.qkv_proj = nn.Linear(h, self.q_size + 2 * self.kv_size, bias=arch.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, h, bias=arch.o_bias)
        self.q_norm = nn.Parameter(torch.ones(d)) if arch.qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(d)) if arch.qk_norm else None
        i = arch.intermediate_size
        self.gate_up_proj = nn.Linear(h, 2 * i, bias=arch.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=arch.mlp_bias)
        self.scale = d**-0.5

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]: the previous layer's output (the embeddings for layer 0)
        residual: torch.Tensor | None,  # [T, hidden]: the residual stream before x is added; None at layer 0
        cos: torch.Tensor,  # [T, D]
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        ops: LayerOps,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (output, residual), to be summed by the next layer
        arch, num_tokens, eps = self.arch, x.shape[0], self.arch.rms_norm_eps
        # The residual add is deferred into the next norm (one fused pass on CPU); the sum is
        # the same as transformers' `x = residual + x` before its norm.
        if residual is None:
            residual, h = x, ops.norm(x, self.input_norm, eps)
        else:
            h = ops.add_norm(x, residual, self.input_norm, eps)
        qkv = self.qkv_proj(h)  # [T, (H + 2 Hkv) D]
        if self.q_norm is not None and self.k_norm is not None:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = ops.norm(q.reshape(-1, arch.head_dim), self.q_norm, eps)  # [T * H, D]: per-head norm
            k = ops.norm(k.reshape(-1, arch.head_dim), self.k_norm, eps)  # [T * Hkv, D]
            qkv = torch.cat([q.view(num_tokens, -1), k.view(num_tokens, -1), v], dim=-1)  # [T, (H + 2 Hkv) D]
        q = ops.rope_write_kv(
            qkv, cos, sin, meta.slot_mapping, kv_cache[0], kv_cache[1], arch.num_heads, arch.num_kv_heads
        )  # [T, H, D]; K and V are in the cache now
        attn = paged_attention(q, kv_cache[0], kv_cache[1], meta, self.scale)  # [T, H, D]
        x = self.o_proj(attn.reshape(num_tokens, self.q_size))  # [T, hidden]
        h = ops.add_norm(x, residual, self.post_attn_norm, eps)
        return self.down_proj(ops.silu_mul(self.gate_up_proj(h))), residual  # gate_up [T, 2I] -> [T, I]


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: LlamaArch, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> None:
        super().__init__()
        self.arch = arch
        self.embed = nn.Parameter(torch.empty(arch.vocab_size, arch.hidden_size))
        self.layers = nn.ModuleList(LlamaLayer(arch) for _ in range(arch.num_layers))
        self.norm = nn.Parameter(torch.ones(arch.hidden_size))
        self.lm_head = None if arch.tie_word_embeddings else nn.Parameter(torch.empty(arch.vocab_size, arch.hidden_size))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = attention_scaling
        self.ops: LayerOps = TorchLayerOps()  # the runner may swap in fused ones
        self.packed_head: nn.Module | None = None  # the LM head as a module: PackedHead (bf16 on CPU) or a quantizer's (int8)
        # The layers in one C++ call (llmserve/models/layer_loop.py), set by the runner when every
        # piece is one of our CPU kernels; it returns None for a step it cannot take.
        self.layer_loop: Callable[..., torch.Tensor | None] | None = None

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Computed per step from positions, in float32 exactly as transformers does it.
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        cos = (emb.cos() * self.attention_scaling).to(dtype)  # [T, D]
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos, sin

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden], final-normed
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.rope(positions, x.dtype)
        if self.layer_loop is not None and (hidden := self.layer_loop(x, cos, sin, kv_caches, meta)) is not None:
            return hidden
        return self.run_layers(x, cos, sin, kv_caches, meta)

    def run_layers(
        self,
        x: torch.Tensor,  # [T, hidden] embeddings; the residual stream is summed into it in place
        cos: torch.Tensor,  # [T, D]
        sin: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden], final-normed
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, cos, sin, kv_cache, meta, self.ops)
        assert residual is not None, "a model has at least one layer"
        return self.ops.add_norm(x, residual, self.norm, self.arch.rms_norm_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, V] in the model dtype
        # Not widened to float32 here: the sampler does it only when it needs to.
        if self.packed_head is not None:
            return self.packed_head(hidden)
        return F.linear(hidden, self.head_weight)

    @property
    def head_weight(self) -> torch.Tensor:  # [V, hidden]
        return self.embed if self.lm_head is None else self.lm_head

    # ---- weights --------------------------------------------------------------------------

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy a Hugging Face state dict in, fusing q/k/v and gate/up."""
        pending: dict[str, torch.Tensor] = {}
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if self.lm_head is None and name == "lm_head.weight":
                continue  # tied: the embedding serves as the head
            pending[name] = tensor
        direct = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        if self.lm_head is not None:
            direct["lm_head.weight"] = self.lm_head
        for name, param in direct.items():
            param.copy_(self._take(pending, name))
            loaded.add(name)
        for i, layer in enumerate(self.layers):
            self._load_layer(layer, f"model.layers.{i}.", pending)
        if pending:
            raise ValueError(f"unexpected weights in checkpoint: {sorted(pending)[:8]}")

    @staticmethod
    def _take(pending: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        if name not in pending:
            raise ValueError(f"checkpoint is missing weight {name!r}")
        return pending.pop(name)

    def _load_layer(self, layer: LlamaLayer, prefix: str, pending: dict[str, torch.Tensor]) -> None:
        take = lambda suffix: self._take(pending, prefix + suffix)  # noqa: E731

        def linear(module: nn.Linear, names: list[str]) -> None:
            # HF keeps q/k/v (and gate/up) apart; we run each group as one GEMM, rows concatenated.
            module.weight.copy_(torch.cat([take(f"{name}.weight") for name in names]))
            if module.bias is not None:
                module.bias.copy_(torch.cat([take(f"{name}.bias") for name in names]))

        attn, mlp = "self_attn.", "mlp."
        layer.input_norm.copy_(take("input_layernorm.weight"))
        layer.post_attn_norm.copy_(take("post_attention_layernorm.weight"))
        linear(layer.qkv_proj, [f"{attn}{p}_proj" for p in "qkv"])
        linear(layer.o_proj, [f"{attn}o_proj"])
        if layer.q_norm is not None and layer.k_norm is not None:
            layer.q_norm.copy_(take(f"{attn}q_norm.weight"))
            layer.k_norm.copy_(take(f"{attn}k_norm.weight"))
        linear(layer.gate_up_proj, [f"{mlp}gate_proj", f"{mlp}up_proj"])
        linear(layer.down_proj, [f"{mlp}down_proj"])
