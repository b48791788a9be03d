"""The pre-serialized SSE chunks are byte for byte `data: ` + json.dumps(the response dict) + `\\n\\n`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from llmserve.server import responses as R
from llmserve.server.sse_events import DONE, ChunkEvents, dumps, event

TEXTS = [
    "",
    " hello",
    'a "quoted" word',
    "back\\slash and /slash",
    "line\nbreak\r\ttab",
    "\x00\x01\x1f control",
    "\u2028\u2029 separators",
    "日本語のテキスト",
    "emoji 🦙 and é",
    "\ufffd replacement",
    "</script>",
]


def framed(obj: object) -> bytes:
    return ("data: " + dumps(obj) + "\n\n").encode()


def chat_events(with_usage: bool) -> ChunkEvents:
    return ChunkEvents(R.stream_head("chatcmpl-1", "chat.completion.chunk", 1733000000, "smol"), with_usage)


def completion_events(with_usage: bool) -> ChunkEvents:
    return ChunkEvents(R.stream_head("cmpl-1", "text_completion", 1733000000, "smol"), with_usage)


@pytest.mark.parametrize("with_usage", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_chat_text_chunk_is_the_dumped_dict(text: str, with_usage: bool) -> None:
    expected = R.chat_chunk(
        "chatcmpl-1", 1733000000, "smol", [R.chat_chunk_choice(3, {"content": text})], None, with_usage
    )
    assert chat_events(with_usage).chat_text(3, text) == framed(expected)


@pytest.mark.parametrize("with_usage", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_completion_text_chunk_is_the_dumped_dict(text: str, with_usage: bool) -> None:
    expected = R.completion(
        "cmpl-1", 1733000000, "smol", [R.completion_choice(2, text, None, None)], None, with_usage
    )
    assert completion_events(with_usage).completion_text(2, text) == framed(expected)


@pytest.mark.parametrize("with_usage", [False, True])
def test_any_choice_and_the_usage_chunk(with_usage: bool) -> None:
    events = chat_events(with_usage)
    role = R.chat_chunk_choice(0, {"role": "assistant", "content": ""})
    finish = R.chat_chunk_choice(1, {}, "length")
    expected = R.chat_chunk("chatcmpl-1", 1733000000, "smol", [role, finish], None, with_usage)
    assert events.choices([role, finish]) == framed(expected)
    usage = R.usage(12, 7, 4)
    if with_usage:
        assert events.usage(usage) == framed(R.chat_chunk("chatcmpl-1", 1733000000, "smol", [], usage, True))
    else:
        with pytest.raises(AssertionError):
            events.usage(usage)


def test_every_event_is_one_sse_data_line() -> None:
    events = chat_events(True)
    for text in TEXTS:
        body = events.chat_text(0, text)
        assert body.startswith(b"data: ") and body.endswith(b"\n\n")
        line = body[len(b"data: ") : -2]
        assert b"\n" not in line and b"\r" not in line  # a raw break would split the event
        assert json.loads(line)["choices"][0]["delta"]["content"] == text
    assert DONE == b"data: [DONE]\n\n"
    assert event('{"error":{}}') == b'data: {"error":{}}\n\n'


# ---- TokenEventStream: sse-starlette's response without the per-event cancel scope ----------------


async def _no_events() -> AsyncIterator[bytes]:
    return
    yield b""  # an async generator that yields nothing


BODY = {"type": "http.response.body", "body": b"data: x\n\n", "more_body": True}


def test_token_event_stream_sends_each_event_without_a_cancel_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    import sse_starlette.sse

    from llmserve.server.serving import TokenEventStream

    def no_scope(*args: object) -> None:
        raise AssertionError("a cancel scope was built for a send without a timeout")

    monkeypatch.setattr(sse_starlette.sse.anyio, "move_on_after", no_scope)
    response = TokenEventStream(_no_events(), sep="\n")
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(response._send_with_timeout(send, BODY))
    assert sent == [BODY] and not response._send_interrupted

    async def gone(message: dict) -> None:
        raise OSError("client gone")

    with pytest.raises(OSError, match="client gone"):
        asyncio.run(response._send_with_timeout(gone, BODY))
    assert response._send_interrupted  # as sse-starlette marks it: nothing more is sent

    # With a timeout set, sse-starlette's own send (and its scope) runs.
    timed = TokenEventStream(_no_events(), sep="\n", send_timeout=5.0)
    with pytest.raises(AssertionError, match="cancel scope"):
        asyncio.run(timed._send_with_timeout(send, BODY))
