"""`POST /v1/completions`: prompt(s) -> engine -> `text_completion`, streamed or not.

A list of prompts becomes one engine request per prompt, all feeding one output stream; choice
`index` is `prompt_index * n + choice`, as OpenAI numbers them."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llmserve.outputs import RequestOutput, TokenLogprob
from llmserve.server import responses as R
from llmserve.server.async_engine import OutputStream
from llmserve.server.protocol import CompletionRequest, Prompt, parse_completion_request
from llmserve.server.serving import (
    ServerState,
    check_admission,
    check_model,
    collect,
    failure,
    sse_error,
    sse_response,
    submit,
    unless_disconnected,
)
from llmserve.server.sse_events import DONE, ChunkEvents

logger = logging.getLogger("llmserve.server")


async def create_completion(state: ServerState, request: Request, data: Any, arrival: float) -> Response:
    req = parse_completion_request(data, state.client.vocab_size)
    check_model(state, req.model)
    check_admission(state)
    await run_in_threadpool(tokenize_prompts, state.client.tokenizer, req.prompts)
    base_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    stream = state.client.open_stream(arrival)
    choices = _Choices(state, req)
    try:
        for p, prompt in enumerate(req.prompts):
            assert prompt.token_ids is not None
            engine_id = base_id if len(req.prompts) == 1 else f"{base_id}-{p}"
            choices.request_index[engine_id] = p
            await submit(state, stream, engine_id, prompt.token_ids, req.params, prompt_param="prompt")
        if req.stream.stream:
            return sse_response(
                state, _completion_events(state, stream, req, choices, base_id, created), stream
            )
        outputs = await unless_disconnected(request, collect(stream))
    except BaseException:
        stream.abort()  # a later prompt was refused: the earlier ones must not run on
        raise
    finally:
        if not req.stream.stream:
            stream.abort()
    for out in outputs:
        choices.add(out)
    body = R.completion(base_id, created, state.model_id, choices.finished_choices(), choices.usage())
    return JSONResponse(body)


def tokenize_prompts(tokenizer: Any, prompts: list[Prompt]) -> None:
    """Fill in token ids (text prompts) or text (token prompts, for `echo`). Runs in a worker thread."""
    for prompt in prompts:
        if prompt.token_ids is None:
            assert prompt.text is not None
            prompt.token_ids = tokenizer.encode(prompt.text)
        else:
            prompt.text = tokenizer.decode(prompt.token_ids, skip_special_tokens=False)


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    num_output_tokens: int = 0
    started: bool = False
    offsets: R.CompletionLogprobs | None = None


class _Choices:
    """Per-choice accumulation; handles echo (prompt text and prompt logprobs on a choice's first output)."""

    def __init__(self, state: ServerState, req: CompletionRequest) -> None:
        self.state = state
        self.req = req
        self.request_index: dict[str, int] = {}  # engine request id -> prompt index
        self.choices = [_Choice() for _ in range(len(req.prompts) * req.params.n)]
        self.prompt_logprobs: dict[str, list[TokenLogprob | None]] = {}
        self.cached_tokens: dict[str, int] = {}

    def add(self, out: RequestOutput) -> tuple[int, str, dict[str, Any] | None]:
        """Record an output; returns (choice index, text delta, logprobs delta)."""
        p = self.request_index[out.request_id]
        index = p * self.req.params.n + out.index
        choice = self.choices[index]
        self.cached_tokens[out.request_id] = max(
            self.cached_tokens.get(out.request_id, 0), out.num_cached_tokens
        )
        if out.prompt_logprobs is not None and out.request_id not in self.prompt_logprobs:
            self.prompt_logprobs[out.request_id] = out.prompt_logprobs
        text, logprobs = out.new_text, None
        if self.req.logprobs is not None:
            choice.offsets = choice.offsets or R.CompletionLogprobs(self.state.tokens)
        if not choice.started:
            choice.started = True
            if self.req.echo:
                text, logprobs = (self.req.prompts[p].text or "") + text, self._echo_logprobs(out, p, choice)
        if choice.offsets is not None and out.new_logprobs:
            generated = choice.offsets.build(out.new_token_ids, list(out.new_logprobs))
            logprobs = R.merge_completion_logprobs([part for part in (logprobs, generated) if part])
        choice.text.append(text)
        if logprobs is not None:
            choice.logprobs.append(logprobs)
        choice.num_output_tokens = out.num_output_tokens
        if out.finished:
            choice.finish_reason = out.finish_reason
        return index, text, logprobs

    def _echo_logprobs(self, out: RequestOutput, p: int, choice: _Choice) -> dict[str, Any] | None:
        if choice.offsets is None:
            return None
        prompt_ids = self.req.prompts[p].token_ids or []
        items = list(self.prompt_logprobs.get(out.request_id) or [])
        if len(items) != len(prompt_ids):
            logger.warning(
                "request %s: %d prompt logprobs for %d prompt tokens",
                out.request_id,
                len(items),
                len(prompt_ids),
            )
            items = ([None] * len(prompt_ids) + items)[-len(prompt_ids) :]
        return choice.offsets.build(prompt_ids, items)

    def finished_choices(self) -> list[dict[str, Any]]:
        return [
            R.completion_choice(
                i,
                "".join(c.text),
                c.finish_reason,
                R.merge_completion_logprobs(c.logprobs) if self.req.logprobs is not None else None,
            )
            for i, c in enumerate(self.choices)
        ]

    def usage(self) -> dict[str, Any]:
        num_prompt = sum(len(p.token_ids or []) for p in self.req.prompts)
        completion_tokens = sum(c.num_output_tokens for c in self.choices)
        return R.usage(num_prompt, completion_tokens, sum(self.cached_tokens.values()))


async def _completion_events(
    state: ServerState,
    stream: OutputStream,
    req: CompletionRequest,
    choices: _Choices,
    request_id: str,
    created: int,
) -> AsyncIterator[bytes]:
    with_usage = req.stream.include_usage
    events = ChunkEvents(R.stream_head(request_id, "text_completion", created, state.model_id), with_usage)
    try:
        async for out in stream:
            if (error := failure(out)) is not None:
                yield sse_error(error)
                break
            index, text, logprobs = choices.add(out)
            if logprobs is not None:
                yield events.choices([R.completion_choice(index, text, None, logprobs)])
            elif text:
                yield events.completion_text(index, text)
            if out.finished:
                yield events.choices([R.completion_choice(index, "", out.finish_reason, None)])
        else:
            if with_usage:
                yield events.usage(choices.usage())
        yield DONE
    finally:
        stream.abort()
