"""A tiny random Llama with the built-in model's tokenizer, made on the spot: engine tests run
in seconds and never need a download."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from llmserve.model_loader import resolve_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def make_tiny_llama(folder: Path, *, seed: int = 0, architecture: str = "llama", bias: bool = False) -> Path:
    """`bias`: biases on the attention and MLP projections (llama only)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    builtin = resolve_model(None).path
    common = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    if architecture == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(attention_bias=bias, mlp_bias=bias, **common))
    # Random init gives near-uniform logits; sharpen them so greedy decoding is not a coin toss.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20.0)
        for module in model.modules():  # the init zeroes biases, which would test nothing
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (builtin / name).exists():
            shutil.copy(builtin / name, folder / name)
    return folder
