"""One streamed request to an OpenAI-compatible server, timed chunk by chunk.

Times are `time.perf_counter()` seconds. TTFT runs from just before the request is sent to the first
chunk that carries text; each later text chunk adds one inter-token latency (ITL) gap, so a request
with k text chunks has k - 1 ITLs. A chunk with an empty delta (the role chunk, the finish chunk,
the usage chunk) is not a token.

The HTTP client is aiohttp, as in vLLM's benchmark client: the benchmark shares the machine with the
server it measures, so its own CPU per streamed chunk is taken from the server. Measured on the
2-core Zen 4 (2026-12-03), 64 streams: httpx ~210 us a chunk, aiohttp ~80 us (benchmarks/README.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from serving.datasets import SampleRequest

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
_MAX_ERROR_CHARS = 300
_READ_BUFFER = 4 << 20


@dataclass
class RequestResult:
    prompt_len: int  # by the benchmark's token counter
    requested_output_len: int  # max_tokens
    success: bool = False
    error: str = ""
    start_time: float = 0.0  # seconds since the benchmark started
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2el: float = 0.0  # send to last byte of the stream
    text: str = ""
    chunks: int = 0  # chunks that carried text
    finish_reason: str | None = None
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    retokenized_output_len: int | None = None  # filled in after the run

    @property
    def output_len(self) -> int:
        """Output tokens: the server's usage count, else the re-tokenized count."""
        if self.usage_completion_tokens is not None:
            return self.usage_completion_tokens
        return self.retokenized_output_len if self.retokenized_output_len is not None else self.chunks

    @property
    def input_len(self) -> int:
        return self.usage_prompt_tokens if self.usage_prompt_tokens is not None else self.prompt_len


@dataclass(frozen=True)
class RequestSettings:
    """What every request of a run shares."""

    base_url: str
    model: str
    endpoint: str = "chat"
    api_key: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + ENDPOINTS[self.endpoint]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, sample: SampleRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": sample.output_len,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.endpoint == "chat":
            body["messages"] = sample.messages or [{"role": "user", "content": sample.prompt}]
        else:
            body["prompt"] = sample.prompt
        if self.ignore_eos:
            body["ignore_eos"] = True  # vLLM's extra field; llmserve and llama-server read it too
        return body | self.extra_body


async def send_request(
    client: aiohttp.ClientSession, settings: RequestSettings, sample: SampleRequest, t0: float
) -> RequestResult:
    """Stream one request; never raises: a failure is recorded on the result."""
    result = RequestResult(prompt_len=sample.prompt_len, requested_output_len=sample.output_len)
    start = time.perf_counter()
    result.start_time = start - t0
    try:
        async with client.post(settings.url, json=settings.body(sample), headers=settings.headers()) as r:
            if r.status != 200:
                body = (await r.read()).decode(errors="replace")
                result.error = f"HTTP {r.status}: {body[:_MAX_ERROR_CHARS]}"
            else:
                await _read_stream(r.content, result, start, settings.endpoint)
    # ValueError: a data line that is not JSON, or longer than the read buffer
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"[:_MAX_ERROR_CHARS]
    result.e2el = time.perf_counter() - start
    if not result.error:
        if result.chunks == 0:
            result.error = "the stream carried no text, so there is no TTFT"
        elif result.finish_reason is None:
            result.error = "the stream ended without a finish_reason"
    result.success = not result.error
    return result


async def _read_stream(
    content: aiohttp.StreamReader, result: RequestResult, start: float, endpoint: str
) -> None:
    pieces: list[str] = []
    last = start
    async for raw in content:  # one line a step, with its line break
        if not raw.startswith(b"data:"):
            continue  # blank separators, comments, `event:` lines
        payload = raw[len(b"data:") :].strip()
        if payload == b"[DONE]":
            break
        now = time.perf_counter()
        event = json.loads(payload)
        if "error" in event:
            result.error = f"error event: {json.dumps(event['error'])[:_MAX_ERROR_CHARS]}"
            return
        usage = event.get("usage")
        if usage:
            result.usage_prompt_tokens = usage.get("prompt_tokens")
            result.usage_completion_tokens = usage.get("completion_tokens")
        for choice in event.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") if endpoint == "chat" else choice.get("text")
            if text:
                if result.chunks == 0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                result.chunks += 1
                pieces.append(text)
            if choice.get("finish_reason"):
                result.finish_reason = choice["finish_reason"]
    result.text = "".join(pieces)


def make_client(concurrency: int) -> aiohttp.ClientSession:
    # trust_env=False: a proxy set in the environment must not carry loopback traffic. No total or
    # read timeout: a long queue at high load is what is being measured, not an error. A 4 MiB read
    # buffer: one SSE line (a chunk with logprobs) must fit in it whole. force_close: a connection
    # per request, as vLLM's client (a session per request): llama-server closes kept-alive
    # connections on its own schedule, and a POST sent on one it is closing fails ("Server
    # disconnected") where it should not count as the server's failure.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency, force_close=True),
        timeout=aiohttp.ClientTimeout(total=None, connect=30.0, sock_connect=30.0),
        trust_env=False,
        read_bufsize=_READ_BUFFER,
    )


async def first_model(base_url: str, api_key: str | None) -> str:
    """The first id that GET /v1/models lists."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/models"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30.0), trust_env=False) as client,
            client.get(url, headers=headers) as r,
        ):
            status, text = r.status, await r.text()
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        raise RuntimeError(f"cannot reach {url}: {type(e).__name__}: {e}") from e
    if status != 200:
        raise RuntimeError(f"GET /v1/models answered {status} ({text[:200]}); pass --model")
    models = json.loads(text).get("data") or []
    if not models:
        raise RuntimeError("GET /v1/models lists no model; pass --model")
    return str(models[0]["id"])
