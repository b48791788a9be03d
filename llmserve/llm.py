"""Offline API: `LLM(...).generate(prompts, SamplingParams(...))` and `LLM(...).chat(messages)`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from llmserve.config import EngineConfig
from llmserve.engine import LLMEngine
from llmserve.outputs import CompletionOutput, GenerationResult
from llmserve.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    """Runs the engine to completion on a batch of prompts.

    Keyword arguments name config fields of any section (`max_num_seqs=8`, `num_blocks=64`,
    `block_size=32`, ...); `config` gives a whole EngineConfig to start from."""

    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        config: EngineConfig | None = None,
        **overrides: Any,
    ) -> None:
        config = config or EngineConfig()
        data = config.to_dict()
        overrides.update(model=model, dtype=dtype, device=device)
        for name, value in overrides.items():
            sections = [s for s, fields in data.items() if name in fields]
            if not sections:
                raise ValueError(f"unknown config field {name!r}")
            data[sections[0]][name] = value
        self.engine = LLMEngine(EngineConfig.from_dict(data))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """One result per prompt, in order. A prompt is text or a list of token ids."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        params = _per_prompt(sampling_params, len(prompts))
        results: dict[str, GenerationResult] = {}
        for prompt, p in zip(prompts, params, strict=True):
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            request_id = f"offline-{next(self._ids)}"
            self.engine.add_request(request_id, token_ids, p)
            results[request_id] = GenerationResult(
                request_id, prompt if isinstance(prompt, str) else None, token_ids,
                [CompletionOutput(i, "", [], None) for i in range(p.n)],
            )  # fmt: skip
        for out in self.engine.run_to_completion():
            result = results[out.request_id]
            choice = result.outputs[out.index]
            choice.text += out.new_text
            choice.token_ids.extend(out.new_token_ids)
            if out.new_logprobs is not None:
                choice.logprobs = (choice.logprobs or []) + out.new_logprobs
            if out.prompt_logprobs is not None:
                result.prompt_logprobs = out.prompt_logprobs
            if out.finished:
                choice.finish_reason, choice.stop_reason = out.finish_reason, out.stop_reason
                if out.error:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
        return list(results.values())

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """Apply the model's chat template (with the assistant turn opened) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[Prompt] = [
            list(self.tokenizer.apply_chat_template(list(conv), add_generation_prompt=True, tokenize=True, return_dict=False))
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params)


def _per_prompt(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(params, SamplingParams):
        return [dataclasses.replace(params) for _ in range(count)]
    params = list(params)
    if len(params) != count:
        raise ValueError(f"sampling_params has {len(params)} entries for {count} prompts")
    return params
