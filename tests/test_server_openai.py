"""The live server driven by the official `openai` SDK, as a client of api.openai.com would drive it."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from server_helpers import MODEL

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "What is the capital of France?"}]


def _chat(client: openai.OpenAI, messages: list[dict[str, Any]] = HELLO, **kwargs: Any) -> Any:
    kwargs = {"max_tokens": 12, "temperature": 0, **kwargs}
    return client.chat.completions.create(model=MODEL, messages=messages, **kwargs)


def _stream_chunks(client: openai.OpenAI, messages: list[dict[str, Any]] = HELLO, **kwargs: Any) -> list[Any]:
    return list(_chat(client, messages, stream=True, **kwargs))


def _stream_text(chunks: list[Any], index: int = 0) -> str:
    return "".join(
        c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index
    )


def test_models_lists_the_served_model_under_a_stable_id(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert client.models.list().data[0].created == models[0].created


def test_chat_non_stream_carries_message_finish_reason_and_usage(client: openai.OpenAI) -> None:
    resp = _chat(client)
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-") and resp.model == MODEL and isinstance(resp.created, int)
    choice = resp.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = resp.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_greedy_stream_text_equals_non_stream_text(client: openai.OpenAI) -> None:
    text = _chat(client).choices[0].message.content
    chunks = _stream_chunks(client)
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    assert len({c.id for c in chunks}) == 1
    first, last = chunks[0], chunks[-1]
    assert first.choices[0].delta.role == "assistant"
    assert last.choices[0].finish_reason in ("stop", "length") and not last.choices[0].delta.content
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert _stream_text(chunks) == text


def test_usage_chunk_only_when_asked(client: openai.OpenAI) -> None:
    plain = _stream_chunks(client, max_tokens=4)
    assert all(c.choices and c.usage is None for c in plain)

    chunks = _stream_chunks(client, max_tokens=4, stream_options={"include_usage": True})
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert all(c.choices and c.usage is None for c in chunks[:-1])
    expected = _chat(client, max_tokens=4).usage
    assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.total_tokens) == (
        expected.prompt_tokens,
        expected.completion_tokens,
        expected.total_tokens,
    )


def test_n_choices_are_indexed_in_both_modes(client: openai.OpenAI) -> None:
    resp = _chat(client, n=3, temperature=1.0, seed=7, max_tokens=6)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert 3 <= resp.usage.completion_tokens <= 18
    chunks = _stream_chunks(client, n=3, temperature=1.0, seed=7, max_tokens=6)
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(roles) == sorted(finished) == [0, 1, 2]
    assert [_stream_text(chunks, i) for i in range(3)] == [c.message.content for c in resp.choices]


def test_same_seed_gives_the_same_sample(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me a story."}]
    a = _chat(client, messages, temperature=1.0, seed=1234, max_tokens=12).choices[0].message.content
    b = _chat(client, messages, temperature=1.0, seed=1234, max_tokens=12).choices[0].message.content
    assert a == b


def test_stop_string_ends_the_text_in_both_modes(client: openai.OpenAI) -> None:
    full = _chat(client).choices[0].message.content
    assert " of " in full, full  # "The capital of France is Paris."
    resp = _chat(client, stop=[" of ", "zzz"])
    assert resp.choices[0].message.content == full[: full.index(" of ")]
    assert resp.choices[0].finish_reason == "stop"
    chunks = _stream_chunks(client, stop=" of ")
    assert _stream_text(chunks) == full[: full.index(" of ")]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_logprobs_have_token_logprob_bytes_and_top(client: openai.OpenAI) -> None:
    resp = _chat(client, logprobs=True, top_logprobs=3, max_tokens=6)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and isinstance(item.token, str) and isinstance(item.bytes, list)
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert item.token == item.top_logprobs[0].token  # greedy picks the most likely
    text = bytes(b for item in content for b in item.bytes).decode("utf-8", errors="replace")
    assert text.startswith(resp.choices[0].message.content)

    chunks = _stream_chunks(client, logprobs=True, top_logprobs=3, max_tokens=6)
    streamed = [
        item for c in chunks if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content
    ]
    assert [(i.token, round(i.logprob, 4)) for i in streamed] == [
        (i.token, round(i.logprob, 4)) for i in content
    ]
    assert _chat(client, max_tokens=2).choices[0].logprobs is None


def test_completions_endpoint_single_and_list_prompts(client: openai.OpenAI) -> None:
    resp = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert "Paris" in resp.choices[0].text
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens

    stream = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == resp.choices[0].text

    many = client.completions.create(
        model=MODEL, prompt=["The capital of France is", "1, 2, 3,"], max_tokens=4, temperature=0
    )
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == resp.choices[0].text[: len(many.choices[0].text)]


def test_completions_echo_with_logprobs_covers_prompt_and_completion(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    resp = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2
    )
    choice = resp.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(top) >= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert "".join(lp.tokens) == choice.text


def test_multi_turn_conversation(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    resp = _chat(client, messages, max_tokens=8)
    assert resp.choices[0].message.content
    assert resp.usage.prompt_tokens > _chat(client, max_tokens=1).usage.prompt_tokens
    # A message object from a response can be sent back as it is.
    follow = _chat(
        client,
        [*messages, resp.choices[0].message.model_dump(), {"role": "user", "content": "Thanks"}],
        max_tokens=2,
    )
    assert follow.choices[0].message.content is not None


def test_content_as_text_parts_equals_plain_string(client: openai.OpenAI) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    assert _chat(client, parts).choices[0].message.content == _chat(client).choices[0].message.content


@pytest.mark.parametrize(
    ("prompt", "max_tokens"), [("Say hi in Chinese", 16), ("Write three emoji that describe happiness.", 24)]
)
def test_cjk_and_emoji_stream_without_replacement_chars(
    client: openai.OpenAI, prompt: str, max_tokens: int
) -> None:
    messages = [{"role": "user", "content": prompt}]
    chunks = _stream_chunks(client, messages, max_tokens=max_tokens)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    text = "".join(deltas)
    assert any(ord(ch) > 0x2E80 for ch in text), text  # CJK or emoji really came through
    assert not any("\ufffd" in d for d in deltas), deltas
    assert text == _chat(client, messages, max_tokens=max_tokens).choices[0].message.content


def test_vllm_extras_and_penalties_are_honoured(client: openai.OpenAI) -> None:
    resp = _chat(
        client,
        max_tokens=None,
        max_completion_tokens=7,
        extra_body={
            "ignore_eos": True,
            "top_k": 5,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "min_tokens": 7,
        },
        presence_penalty=0.5,
        frequency_penalty=0.5,
        user="tester-1",
    )
    assert resp.usage.completion_tokens == 7 and resp.choices[0].finish_reason == "length"


def test_logit_bias_forces_a_token(client: openai.OpenAI) -> None:
    token_id = 33
    # A token-id prompt, echoed with logprobs, names that token's text.
    echoed = client.completions.create(model=MODEL, prompt=[token_id], max_tokens=1, echo=True, logprobs=0)
    token_text = echoed.choices[0].logprobs.tokens[0]
    resp = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=3, temperature=0, logit_bias={str(token_id): 100}
    )
    assert resp.choices[0].text == token_text * 3


def test_echo_logprobs_are_complete_on_a_prefix_cache_hit(client: openai.OpenAI) -> None:
    prompt = "The quick brown fox jumps over the lazy dog and then runs far away into the deep dark forest"
    for _ in range(2):  # the second run finds the prompt's first block(s) in the prefix cache
        resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, echo=True, logprobs=1)
        token_logprobs = resp.choices[0].logprobs.token_logprobs
        assert None not in token_logprobs[1 : resp.usage.prompt_tokens]
