"""OpenAI response objects: `chat.completion`, `chat.completion.chunk`, `text_completion`, usage and
the two logprobs formats. Plain dicts, built to the field order and nullability of api.openai.com."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from llmserve.outputs import TokenLogprob

# JSON has no -inf; vLLM's convention for "impossible" is the same number.
_MIN_LOGPROB = -9999.0


def chat_completion(
    rid: str, created: int, model: str, choices: list[dict[str, Any]], usage: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
        "system_fingerprint": None,
    }


def chat_choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def stream_head(rid: str, object_: str, created: int, model: str) -> dict[str, Any]:
    """The fields a chunk (or a completion) starts with, before its `choices`; a stream's are the
    same in every chunk, so the SSE layer serializes them once (sse_events.ChunkEvents)."""
    return {"id": rid, "object": object_, "created": created, "model": model, "system_fingerprint": None}


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    with_usage: bool = False,
) -> dict[str, Any]:
    chunk = {**stream_head(rid, "chat.completion.chunk", created, model), "choices": choices}
    if with_usage:  # with include_usage every chunk carries the key, null until the last
        chunk["usage"] = usage
    return chunk


def chat_chunk_choice(
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def completion(
    rid: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    with_usage: bool = True,
) -> dict[str, Any]:
    body = {**stream_head(rid, "text_completion", created, model), "choices": choices}
    if with_usage:
        body["usage"] = usage
    return body


def completion_choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


# ---- logprobs --------------------------------------------------------------------------------


class TokenText:
    """Per-token strings and bytes for logprobs, cached by token id.

    `bytes` are the token's own bytes (from the byte-level BPE alphabet), so a client can join the
    bytes of the tokens that split a CJK character or an emoji; the string is the token decoded
    alone, which for such a fragment is U+FFFD, as with OpenAI."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.text = lru_cache(maxsize=65536)(self._text)
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def _bytes(self, token_id: int) -> list[int]:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        decoder = _byte_decoder()
        if isinstance(piece, str) and piece and all(c in decoder for c in piece):
            return [decoder[c] for c in piece]
        return list(self.text(token_id).encode("utf-8"))


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte -> printable character map, inverted."""
    byte_values = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(byte_values)
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(byte_values, chars, strict=True)}


def _lp(value: float) -> float:
    return value if math.isfinite(value) else _MIN_LOGPROB


def chat_logprobs(items: list[TokenLogprob], tokens: TokenText) -> dict[str, Any]:
    """`{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": null}`."""
    content = [
        {
            "token": tokens.text(item.token_id),
            "logprob": _lp(item.logprob),
            "bytes": tokens.bytes(item.token_id),
            "top_logprobs": [
                {"token": tokens.text(t), "logprob": _lp(lp), "bytes": tokens.bytes(t)} for t, lp in item.top
            ],
        }
        for item in items
    ]
    return {"content": content, "refusal": None}


class CompletionLogprobs:
    """The legacy completions format, `{tokens, token_logprobs, top_logprobs, text_offset}`, built up
    one delta at a time: `text_offset` counts characters from the start of the choice's text."""

    def __init__(self, tokens: TokenText, offset: int = 0) -> None:
        self._tokens = tokens
        self.offset = offset

    def build(self, token_ids: list[int], items: list[TokenLogprob | None]) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, item in zip(token_ids, items, strict=True):
            text = self._tokens.text(token_id)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            if item is None:  # the first prompt token has nothing before it to be predicted from
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_lp(item.logprob))
            top = {self._tokens.text(t): _lp(lp) for t, lp in item.top}
            top.setdefault(text, _lp(item.logprob))  # like vLLM: the sampled token is always listed
            out["top_logprobs"].append(top)
        return out


def merge_completion_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not parts:
        return None
    merged: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for part in parts:
        for key in merged:
            merged[key].extend(part[key])
    return merged
