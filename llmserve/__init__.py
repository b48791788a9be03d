"""llmserve: continuous-batching LLM server over a paged KV cache, with an OpenAI-compatible API."""

from __future__ import annotations

import os

# OpenMP threads that spin without bound while waiting make every small torch op tens of times
# slower as soon as another thread wants a core (the HTTP loop, a tokenizer thread, a second
# process): measured here, an RMSNorm of [512, 576] went from 0.9 ms to 25 ms on a busy 2-core
# machine, and OMP_WAIT_POLICY=ACTIVE cut the server's throughput at 64 streams by a third.
# Sleeping at once (PASSIVE) pays a futex wake-up at each of the hundreds of parallel regions of a step
# instead. A short spin (GNU OpenMP's GOMP_SPINCOUNT, ~a few hundred microseconds) covers the gaps
# inside a step and still sleeps between steps. Measured on this 2-core machine, PASSIVE against
# the short spin: one int8 decode step offline 16.3 vs 12.2-13.1 ms; serving one stream
# 44 vs 56 tok/s (ITL p99 83 vs 33 ms); 64 streams (bf16) ~545 vs 625 tok/s. Only effective
# before torch is imported; any OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"

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
