"""llmserve: continuous-batching LLM server over a paged KV cache, with an OpenAI-compatible API."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmserve.outputs import CompletionOutput, GenerationResult, RequestOutput, TokenLogprob
from llmserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llmserve.llm import LLM

__all__ = ["LLM", "CompletionOutput", "GenerationResult", "RequestOutput", "SamplingParams", "TokenLogprob"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # LLM pulls in torch and transformers; keep `import llmserve` light for the pure-Python parts.
    if name == "LLM":
        from llmserve.llm import LLM

        return LLM
    raise AttributeError(name)
