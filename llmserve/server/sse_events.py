"""The bytes of a stream's SSE events, framed as OpenAI frames them: `data: <json>\\n\\n`.

Why not a dict per chunk through `json.dumps`, then a str through sse-starlette's encoder: at 64
streams the server sends ~1,200 chunks a second, and every microsecond per chunk is taken from
the engine's two cores (the event loop shares them with the kernel threads, and the GIL with the
engine thread). A chunk's fixed fields (id, object, created, model, system_fingerprint) are the
same for the whole stream, so they are serialized once; a token's chunk is that prefix, its choice
and the closing bytes. Measured on the 2-core Zen 4 (2026-12-03): dict + `json.dumps` 7.2 us,
sse-starlette's str framing 3.9 us; pre-serialized 0.2 us a chunk. sse-starlette passes bytes
through as they are.

Each event's JSON is byte for byte what `json.dumps` of the equivalent dict in `responses.py`
gives (tests/test_sse_events.py): same key order, same separators, strings escaped by the
encoder `json.dumps(..., ensure_ascii=False)` itself uses.
"""

from __future__ import annotations

import json
from typing import Any

# What json.dumps(s, ensure_ascii=False) uses for a str: the C encoder, quotes included.
_quote = json.encoder.encode_basestring  # type: ignore[attr-defined]

DONE = b"data: [DONE]\n\n"


def dumps(obj: Any) -> str:
    """Compact JSON, UTF-8 left as is (as api.openai.com sends it); NaN and infinities refused."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def event(data: str) -> bytes:
    """One SSE event carrying `data` (a single line: JSON never holds a raw line break)."""
    return b"data: " + data.encode() + b"\n\n"


class ChunkEvents:
    """The chunks of one streamed response (`chat.completion.chunk` or `text_completion`)."""

    def __init__(self, head: dict[str, Any], with_usage: bool) -> None:
        """head: the chunk's fields before `choices`, in order; with_usage: every chunk carries a
        `usage` key (null until the last), as with `stream_options.include_usage`."""
        self._prefix = "data: " + dumps(head)[:-1] + ',"choices":['
        self._suffix = "]" + (',"usage":null' if with_usage else "") + "}\n\n"
        self._with_usage = with_usage

    def choices(self, choices: list[dict[str, Any]]) -> bytes:
        """A chunk with these choices (any fields: role, finish_reason, logprobs)."""
        return self._chunk(dumps(choices)[1:-1])

    def chat_text(self, index: int, text: str) -> bytes:
        """A chat token's chunk: `{"index", "delta": {"content"}, "logprobs": null, "finish_reason": null}`."""
        return self._chunk(
            f'{{"index":{index},"delta":{{"content":{_quote(text)}}},"logprobs":null,"finish_reason":null}}'
        )

    def completion_text(self, index: int, text: str) -> bytes:
        """A completions token's chunk: `{"index", "text", "logprobs": null, "finish_reason": null}`."""
        return self._chunk(f'{{"index":{index},"text":{_quote(text)},"logprobs":null,"finish_reason":null}}')

    def usage(self, usage: dict[str, Any]) -> bytes:
        """The last chunk of an include_usage stream: no choices, the request's usage."""
        assert self._with_usage, "a usage chunk is only sent with stream_options.include_usage"
        return (self._prefix + '],"usage":' + dumps(usage) + "}\n\n").encode()

    def _chunk(self, choices_json: str) -> bytes:
        """choices_json: the choices' JSON objects, comma-separated, without the list's brackets."""
        return (self._prefix + choices_json + self._suffix).encode()
