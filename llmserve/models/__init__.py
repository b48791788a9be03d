"""Model registry: Hugging Face architecture name -> our implementation."""

from __future__ import annotations

import torch

from llmserve.models.llama import LlamaArch, LlamaForCausalLM

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# Rope types whose frequencies do not depend on the sequence length at run time.
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def check_supported(hf_config: object) -> None:
    archs = getattr(hf_config, "architectures", None) or ["LlamaForCausalLM"]
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architecture {archs[0]!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def rope_frequencies(hf_config: object, arch: LlamaArch) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, via transformers' own RoPE table so that every
    scaling variant it knows (llama3, yarn, ...) is computed exactly as it does."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type not in _STATIC_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(_STATIC_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, arch.head_dim, 2, dtype=torch.float) / arch.head_dim))
        return inv_freq, 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config)
    return inv_freq, float(scaling)


def build_model(hf_config: object, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """An empty model of the right shape; fill it with `load_weights`."""
    check_supported(hf_config)
    arch = LlamaArch.from_hf(hf_config)
    inv_freq, scaling = rope_frequencies(hf_config, arch)
    with torch.device(device):
        model = LlamaForCausalLM(arch, inv_freq, scaling)
    model.to(dtype=dtype)
    model.inv_freq = model.inv_freq.float()  # RoPE tables stay float32 whatever the weights' dtype
    return model.eval().requires_grad_(False)


__all__ = ["SUPPORTED_ARCHITECTURES", "LlamaArch", "LlamaForCausalLM", "build_model", "check_supported"]
