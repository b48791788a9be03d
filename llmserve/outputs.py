"""What the engine hands up to its callers: per-step deltas, and whole results for the offline API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """Log-probability of one chosen token under the model, with the top alternatives."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), most likely first


@dataclass(slots=True)
class RequestOutput:
    """One step's news about one sequence (`index` of the request's n choices).

    Everything is a delta since the previous output for the same (request_id, index),
    so streaming costs O(new tokens) per step. `finished` is set exactly once.
    """

    request_id: str
    index: int
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0  # cumulative
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first output only, if asked
    error: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    """A finished choice, as the offline API returns it."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class GenerationResult:
    """One prompt's result from `LLM.generate` / `LLM.chat`: `n` choices, the first also as `.text`."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids
