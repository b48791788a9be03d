"""What the chat and completions endpoints share: the per-app state, model and admission checks,
handing a request to the engine, SSE responses, and waiting for a non-stream result while
watching for the client to leave."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.types import Message, Send

from llmserve.config import ServerConfig
from llmserve.outputs import RequestOutput
from llmserve.sampling_params import SamplingParams
from llmserve.server.async_engine import AsyncEngine, EngineDeadError, EngineDrainingError, OutputStream
from llmserve.server.errors import APIError, error_body
from llmserve.server.metrics import ServerMetrics
from llmserve.server.responses import TokenText
from llmserve.server.sse_events import dumps, event

T = TypeVar("T")
_RETRY_AFTER_S = "1"


@dataclass
class ServerState:
    client: AsyncEngine
    config: ServerConfig
    model_id: str
    metrics: ServerMetrics
    tokens: TokenText
    created: int = field(default_factory=lambda: int(time.time()))


def check_model(state: ServerState, model: str) -> None:
    if model != state.model_id:
        raise APIError(
            404,
            f"The model `{model}` does not exist. This server serves `{state.model_id}`.",
            param="model",
            code="model_not_found",
        )


def check_admission(state: ServerState) -> None:
    """429 when the waiting queue is over its limit; 503 while shutting down or when the engine is dead."""
    client = state.client
    if client.draining:
        raise APIError(503, "The server is shutting down.", headers={"Retry-After": _RETRY_AFTER_S})
    if (problem := client.health()) is not None:
        raise APIError(503, f"The engine is unavailable: {problem}", headers={"Retry-After": _RETRY_AFTER_S})
    waiting = client.num_waiting()
    if waiting > state.config.max_waiting_requests:
        raise APIError(
            429,
            f"The server is overloaded: {waiting} requests are waiting "
            f"(limit {state.config.max_waiting_requests}). Retry later.",
            code="rate_limit_exceeded",
            headers={"Retry-After": _RETRY_AFTER_S},
        )


async def submit(
    state: ServerState,
    stream: OutputStream,
    request_id: str,
    prompt_token_ids: list[int],
    params: SamplingParams,
    prompt_param: str,
) -> None:
    """Hand one prompt to the engine, turning its refusals into HTTP errors."""
    try:
        await state.client.add_request(stream, request_id, prompt_token_ids, params)
    except ValueError as e:  # the engine's own validation: context window, token ids
        message = str(e)
        param = "logit_bias" if "logit_bias" in message else prompt_param
        code = "context_length_exceeded" if "context window" in message else None
        raise APIError(400, message, param=param, code=code) from e
    except EngineDrainingError as e:
        raise APIError(503, "The server is shutting down.", headers={"Retry-After": _RETRY_AFTER_S}) from e
    except EngineDeadError as e:
        raise APIError(503, f"The engine is unavailable: {e}") from e


def failure(out: RequestOutput) -> APIError | None:
    """The error to report for an output that ended in failure rather than stop/length."""
    if out.finish_reason == "error":
        return APIError(500, f"The engine failed while generating: {out.error or 'unknown error'}")
    if out.finish_reason == "abort":  # only the server aborts a request whose client is still there
        return APIError(503, f"The request was aborted: {out.error or 'server is shutting down'}")
    return None


def sse_error(error: APIError) -> bytes:
    return event(dumps(error_body(error.message, error.type, error.param, error.code)))


class TokenEventStream(EventSourceResponse):
    """sse-starlette's response, without its per-event cancel scope when no send timeout is set.

    Why: sse-starlette wraps every send in `anyio.move_on_after(send_timeout)`, which builds a
    cancel scope even for a timeout of None. At one event per token that was 10-19 us of the
    server's 59-78 us of CPU per streamed chunk (fake engine, 64 streams, 2026-12-03), CPU the
    engine's kernel threads share on a small machine. With a timeout set, sse-starlette's own send
    runs. (`_send_with_timeout` and `_send_interrupted` are sse-starlette 3's; where a version lacks
    the method, this override is never called and its own path runs.)"""

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is not None:
            await super()._send_with_timeout(send, message)
            return
        try:
            await send(message)
        except BaseException:
            self._send_interrupted = True  # as sse-starlette marks it: no further sends are tried
            raise


def sse_response(
    state: ServerState, events: AsyncIterator[bytes], stream: OutputStream
) -> EventSourceResponse:
    # The generator aborts in its `finally`; the background task covers a response that never
    # started iterating (client gone before the first byte).
    return TokenEventStream(
        events,
        sep="\n",  # OpenAI frames events with "\n\n"
        ping=15,
        background=BackgroundTask(stream.abort),
        # Our own drain aborts stragglers at shutdown_grace_s with an error event; this is the backstop.
        shutdown_grace_period=state.config.shutdown_grace_s + 5.0,
    )


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it if the client disconnects first (non-stream requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    # Nobody will read this; 499 is nginx's "client closed request", for the access log.
    raise APIError(499, "client disconnected")


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(stream: OutputStream) -> list[RequestOutput]:
    """Every output of a stream; raises the APIError of the first failed sequence."""
    outputs = []
    async for out in stream:
        if (error := failure(out)) is not None:
            raise error
        outputs.append(out)
    return outputs
