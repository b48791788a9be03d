"""`POST /v1/chat/completions`: messages -> chat template -> engine -> `chat.completion` or SSE chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llmserve.outputs import RequestOutput
from llmserve.server import responses as R
from llmserve.server.async_engine import OutputStream
from llmserve.server.errors import bad_request
from llmserve.server.protocol import ChatRequest, parse_chat_request
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


async def create_chat_completion(state: ServerState, request: Request, data: Any, arrival: float) -> Response:
    req = parse_chat_request(data, state.client.vocab_size)
    check_model(state, req.model)
    check_admission(state)
    prompt_ids = await run_in_threadpool(render_chat, state.client.tokenizer, req.messages)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    stream = state.client.open_stream(arrival)
    try:
        await submit(state, stream, request_id, prompt_ids, req.params, prompt_param="messages")
        if req.stream.stream:
            events = _chat_events(state, stream, req, request_id, created, len(prompt_ids))
            return sse_response(state, events, stream)
        outputs = await unless_disconnected(request, collect(stream))
    finally:
        if not req.stream.stream:
            stream.abort()
    return JSONResponse(_chat_completion(state, req, request_id, created, len(prompt_ids), outputs))


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Chat template -> token ids. Runs in a worker thread: templating and tokenizing are CPU work."""
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request("The served model has no chat template; use /v1/completions.", param="messages")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # a template's raise_exception(): the messages broke one of its rules
        raise bad_request(f"The chat template rejected the messages: {e}", param="messages") from e
    # The template already wrote the special tokens (BOS included, if any) as text.
    return tokenizer.encode(text, add_special_tokens=False)


def _chat_completion(
    state: ServerState,
    req: ChatRequest,
    request_id: str,
    created: int,
    num_prompt: int,
    outputs: list[RequestOutput],
) -> dict[str, Any]:
    n = req.params.n
    texts: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list[Any]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    completion_tokens = [0] * n
    cached = 0
    for out in outputs:
        texts[out.index].append(out.new_text)
        logprobs[out.index].extend(out.new_logprobs or [])
        completion_tokens[out.index] = out.num_output_tokens
        cached = max(cached, out.num_cached_tokens)
        if out.finished:
            finish[out.index] = out.finish_reason
    choices = [
        R.chat_choice(
            i,
            "".join(texts[i]),
            finish[i],
            R.chat_logprobs(logprobs[i], state.tokens) if req.logprobs else None,
        )
        for i in range(n)
    ]
    usage = R.usage(num_prompt, sum(completion_tokens), cached)
    return R.chat_completion(request_id, created, state.model_id, choices, usage)


async def _chat_events(
    state: ServerState, stream: OutputStream, req: ChatRequest, request_id: str, created: int, num_prompt: int
) -> AsyncIterator[bytes]:
    with_usage = req.stream.include_usage
    events = ChunkEvents(
        R.stream_head(request_id, "chat.completion.chunk", created, state.model_id), with_usage
    )
    completion_tokens: dict[int, int] = {}
    cached = 0
    try:
        for i in range(req.params.n):
            yield events.choices([R.chat_chunk_choice(i, {"role": "assistant", "content": ""})])
        async for out in stream:
            if (error := failure(out)) is not None:
                yield sse_error(error)
                break
            completion_tokens[out.index] = out.num_output_tokens
            cached = max(cached, out.num_cached_tokens)
            if req.logprobs and out.new_logprobs:
                logprobs = R.chat_logprobs(out.new_logprobs, state.tokens)
                yield events.choices(
                    [R.chat_chunk_choice(out.index, {"content": out.new_text}, None, logprobs)]
                )
            elif out.new_text:
                yield events.chat_text(out.index, out.new_text)
            if out.finished:
                yield events.choices([R.chat_chunk_choice(out.index, {}, out.finish_reason)])
        else:
            if with_usage:
                yield events.usage(R.usage(num_prompt, sum(completion_tokens.values()), cached))
        yield DONE
    finally:
        stream.abort()  # no-op when every choice finished; else the client left mid-stream
