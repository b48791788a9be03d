"""The clients/ examples and `llmserve chat`, run as subprocesses the way a user runs them.

The examples and the happy and 401 paths of the chat client go against the live server. What the
chat client sends (history, system prompt, /reset, the part of a reply kept after Ctrl-C) is
checked exactly against a recording stub server started here on a loopback port.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from server_helpers import API_KEY, MODEL, REPO, ServerProcess, sse_events, wait_for
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MAX_TOKENS = 8
STUB_MODELS = ["stub-model", "other-model"]
# The stub's slow reply: long enough (200 x 50 ms) that Ctrl-C always lands in the middle of it.
SLOW_PIECES = [f"w{i} " for i in range(200)]
SLOW_DELAY_S = 0.05


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMSERVE_", "OPENAI_"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _example_env(server: ServerProcess) -> dict[str, str]:
    return _env(
        LLMSERVE_BASE_URL=f"{server.url}/v1", LLMSERVE_API_KEY=API_KEY, LLMSERVE_MAX_TOKENS=str(MAX_TOKENS)
    )


def _run(command: list[str], env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=REPO, env=env, input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


def _chat_command(url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "llmserve.cli", "chat", "--url", url, *args]


def _usage(pattern: str, text: str) -> tuple[int, ...]:
    match = re.search(pattern, text)
    assert match is not None, f"no {pattern!r} in:\n{text}"
    return tuple(int(g) for g in match.groups())


# --- the clients/ examples against the live server -------------------------------------------------


@pytest.mark.slow
def test_sdk_sync_example_prints_chat_and_completion_with_usage(server: ServerProcess) -> None:
    result = _run([sys.executable, "clients/sdk_sync.py"], _example_env(server))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"model: {MODEL}" in out
    for kind in ("chat", "completion"):
        text = re.search(rf"^{kind}: (.*)$", out, re.MULTILINE)
        assert text is not None, out
        assert ast.literal_eval(text.group(1)).strip()
        prompt, completion = _usage(rf"{kind} usage: prompt=(\d+) completion=(\d+)", out)
        assert prompt > 0 and 0 < completion <= MAX_TOKENS


@pytest.mark.slow
def test_sdk_async_example_answers_every_concurrent_question(server: ServerProcess) -> None:
    result = _run([sys.executable, "clients/sdk_async.py"], _example_env(server))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"model: {MODEL}" in out
    answers = re.findall(r"^A: (.*)$", out, re.MULTILINE)
    assert len(answers) == len(re.findall(r"^Q: ", out, re.MULTILINE)) >= 2
    assert all(ast.literal_eval(a).strip() for a in answers)
    assert re.search(rf"^{len(answers)} concurrent requests in [\d.]+ s$", out, re.MULTILINE)


@pytest.mark.slow
def test_sdk_streaming_example_prints_pieces_then_usage(server: ServerProcess) -> None:
    result = _run([sys.executable, "clients/sdk_streaming.py"], _example_env(server))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"model: {MODEL}" in out
    (chunks,) = _usage(r"content chunks: (\d+)", out)
    prompt, completion, total = _usage(r"usage: prompt=(\d+) completion=(\d+) total=(\d+)", out)
    assert 0 < chunks <= completion <= MAX_TOKENS
    assert prompt > 0 and total == prompt + completion
    streamed = out.split(f"model: {MODEL}\n", 1)[1].split("\ncontent chunks:", 1)[0]
    assert streamed.strip()


@pytest.mark.slow
def test_curl_example_covers_models_chat_stream_and_completions(server: ServerProcess) -> None:
    result = _run(["bash", "clients/curl.sh"], _example_env(server))
    assert result.returncode == 0, result.stderr
    # "== TITLE" lines head the output of each request.
    parts = re.split(r"^== (.+)$", result.stdout, flags=re.MULTILINE)
    assert parts[0] == ""
    sections = dict(zip(parts[1::2], parts[2::2], strict=True))
    assert set(sections) == {
        "GET /models",
        "POST /chat/completions",
        "POST /chat/completions, streamed",
        "POST /completions",
    }
    models_json, model_line = sections["GET /models"].strip().splitlines()
    assert json.loads(models_json)["data"][0]["id"] == MODEL and model_line == f"model: {MODEL}"

    chat = json.loads(sections["POST /chat/completions"])
    assert chat["model"] == MODEL and chat["choices"][0]["message"]["content"].strip()
    assert 0 < chat["usage"]["completion_tokens"] <= MAX_TOKENS

    events = sse_events(sections["POST /chat/completions, streamed"])
    assert events[-1] == "[DONE]"
    pieces = [e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]]
    assert "".join(pieces).strip()
    assert events[-2]["choices"] == [] and 0 < events[-2]["usage"]["completion_tokens"] <= MAX_TOKENS

    completion = json.loads(sections["POST /completions"])
    assert completion["choices"][0]["text"].strip()
    assert 0 < completion["usage"]["completion_tokens"] <= MAX_TOKENS


# --- llmserve chat against the live server -----------------------------------------------------------


@pytest.mark.slow
def test_chat_streams_a_reply_from_the_live_server(server: ServerProcess) -> None:
    result = _run(
        _chat_command(f"{server.url}/v1/", "--max-tokens", str(MAX_TOKENS), "--temperature", "0"),
        _env(LLMSERVE_API_KEY=API_KEY),
        stdin="Say hello.\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and result.stdout.endswith("\n")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_chat_with_a_wrong_key_prints_one_line_at_start(server: ServerProcess) -> None:
    # No --model: the client asks /v1/models first, which is refused, and there is no session.
    result = _run(_chat_command(server.url, "--api-key", "wrong"), _env(), stdin="hi\n")
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("error: 401") and "invalid_api_key" in line


@pytest.mark.slow
def test_chat_with_a_wrong_key_prints_one_line_per_message_and_goes_on(server: ServerProcess) -> None:
    result = _run(
        _chat_command(server.url, "--model", MODEL), _env(OPENAI_API_KEY="wrong"), stdin="hi\nagain\n"
    )
    assert result.returncode == 0
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: 401") for line in lines), result.stderr


def test_chat_with_an_unreachable_url_prints_one_line() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _run(_chat_command(f"http://127.0.0.1:{port}"), _env(), stdin="hi\n")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: cannot reach http://127.0.0.1:{port}/v1")


# --- llmserve chat against a recording stub --------------------------------------------------------


@dataclass
class StubServer:
    """An OpenAI-compatible stub: records each chat request body and streams a canned reply.

    The reply to the n-th request is "reply n"; a last user message "slow" streams SLOW_PIECES
    slowly, "fail" gets a 400 error object, and "broken" a piece and then an error event."""

    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)

    async def models(self, request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": m, "object": "model", "owned_by": "stub"} for m in STUB_MODELS],
            }
        )

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.bodies.append(body)
        last = body["messages"][-1]["content"]
        if last == "fail":
            error = {
                "message": "stub refuses this",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
            return JSONResponse({"error": error}, status_code=400)
        if last == "broken":
            return StreamingResponse(self._broken_stream(), media_type="text/event-stream")
        if last == "slow":
            return StreamingResponse(self._stream(SLOW_PIECES, SLOW_DELAY_S), media_type="text/event-stream")
        pieces = ["reply", " ", str(len(self.bodies))]
        return StreamingResponse(self._stream(pieces, 0.0), media_type="text/event-stream")

    async def _stream(self, pieces: list[str], delay_s: float) -> AsyncIterator[str]:
        finished = False
        try:
            for piece in pieces:
                yield _chunk({"content": piece}, None)
                await asyncio.sleep(delay_s)
            yield _chunk({}, "stop")
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.disconnected.set()

    async def _broken_stream(self) -> AsyncIterator[str]:
        # What llmserve sends when the engine fails mid-stream; the message spans two lines.
        yield _chunk({"content": "half"}, None)
        error = {"message": "engine failed\nbadly", "type": "internal_error", "param": None, "code": None}
        yield f"data: {json.dumps({'error': error})}\n\n"
        yield "data: [DONE]\n\n"

    def messages(self, i: int) -> list[tuple[str, str]]:
        return [(m["role"], m["content"]) for m in self.bodies[i]["messages"]]


def _chunk(delta: dict[str, str], finish_reason: str | None) -> str:
    chunk = {
        "id": "chatcmpl-stub",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": STUB_MODELS[0],
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return f"data: {json.dumps(chunk)}\n\n"


@pytest.fixture
def stub() -> Iterator[StubServer]:
    stub = StubServer()
    app = Starlette(
        routes=[
            Route("/v1/models", stub.models),
            Route("/v1/chat/completions", stub.chat, methods=["POST"]),
        ]
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "stub server did not start"
        time.sleep(0.02)
    stub.url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    try:
        yield stub
    finally:
        server.should_exit = True
        thread.join(20)


def test_chat_sends_history_system_prompt_and_reset(stub: StubServer) -> None:
    script = "hi\n/system Be brief.\nsecond\n/reset\nthird\n/quit\nnever sent\n"
    result = _run(
        _chat_command(stub.url, "--system", "Start.", "--temperature", "0.5", "--max-tokens", "7"),
        _env(),
        stdin=script,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "reply 1\nreply 2\nreply 3\n"
    assert len(stub.bodies) == 3
    assert stub.messages(0) == [("system", "Start."), ("user", "hi")]
    assert stub.messages(1) == [
        ("system", "Be brief."),
        ("user", "hi"),
        ("assistant", "reply 1"),
        ("user", "second"),
    ]
    assert stub.messages(2) == [("system", "Be brief."), ("user", "third")]
    for body in stub.bodies:  # the first listed model, and the flags' sampling values
        assert body["model"] == STUB_MODELS[0] and body["stream"] is True
        assert body["temperature"] == 0.5 and body["max_tokens"] == 7


def test_chat_prints_error_objects_as_one_line_and_leaves_failed_turns_out(stub: StubServer) -> None:
    result = _run(
        _chat_command(f"{stub.url}/v1", "--model", "other-model"), _env(), stdin="hi\nfail\nbroken\nnext\n"
    )
    assert result.returncode == 0
    assert result.stderr.splitlines() == ["error: 400: stub refuses this", "error: engine failed badly"]
    assert result.stdout == "reply 1\nhalf\nreply 4\n"
    assert stub.messages(3) == [("user", "hi"), ("assistant", "reply 1"), ("user", "next")]
    assert all(body["model"] == "other-model" and "temperature" not in body for body in stub.bodies)


def test_ctrl_c_stops_the_reply_and_the_client_answers_the_next_message(stub: StubServer) -> None:
    proc = subprocess.Popen(
        _chat_command(stub.url),
        cwd=REPO,
        env=_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out = bytearray()

    def read_stdout() -> None:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(4096):
            out.extend(chunk)

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    try:
        proc.stdin.write(b"slow\n")
        proc.stdin.flush()
        assert wait_for(lambda: b"w2 " in out, timeout_s=30), f"no streamed pieces: {bytes(out)!r}"
        proc.send_signal(signal.SIGINT)
        assert stub.disconnected.wait(10), "the server never saw the stream closed"
        proc.stdin.write(b"after\n")
        proc.stdin.close()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    err = proc.stderr.read().decode()
    assert "Traceback" not in err and "(reply stopped)" in err

    # Kept in history: the part of the reply that was shown, cut short.
    assert len(stub.bodies) == 2
    (_, asked), (role, partial), last = stub.messages(1)
    assert (asked, role, last) == ("slow", "assistant", ("user", "after"))
    full = "".join(SLOW_PIECES)
    assert partial.startswith("w0 w1 w2 ") and full.startswith(partial) and len(partial) < len(full)
    assert out.decode() == f"{partial}\nreply 2\n"
