"""Request bodies -> SamplingParams: every accepted parameter lands where it should (nothing is
dropped on the way), and the harmless OpenAI fields are accepted. Pure Python, no server."""

from __future__ import annotations

from typing import Any

import pytest

from llmserve.server.errors import APIError
from llmserve.server.protocol import parse_chat_request, parse_completion_request

VOCAB = 1000


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_every_chat_parameter_reaches_sampling_params() -> None:
    req = parse_chat_request(
        _chat(
            max_completion_tokens=33,
            temperature=0.7,
            top_p=0.9,
            n=2,
            stop=["x", "yz"],
            seed=5,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            logit_bias={"12": 3.5},
            logprobs=True,
            top_logprobs=4,
            top_k=40,
            min_p=0.1,
            repetition_penalty=1.2,
            ignore_eos=True,
            min_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
            stop_token_ids=[7],
            include_stop_str_in_output=True,
            skip_special_tokens=False,
        ),
        VOCAB,
    )
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.stop, p.seed) == (33, 0.7, 0.9, 2, ["x", "yz"], 5)
    assert (p.presence_penalty, p.frequency_penalty, p.logit_bias) == (0.5, -0.5, {12: 3.5})
    assert (p.logprobs, p.prompt_logprobs) == (4, None) and req.logprobs
    assert (p.top_k, p.min_p, p.repetition_penalty, p.ignore_eos, p.min_tokens) == (40, 0.1, 1.2, True, 3)
    assert (p.stop_token_ids, p.include_stop_str_in_output, p.skip_special_tokens) == ([7], True, False)
    assert req.stream.stream and req.stream.include_usage


def test_chat_defaults_follow_openai() -> None:
    req = parse_chat_request(_chat(), VOCAB)
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.logprobs) == (None, 1.0, 1.0, 1, None)
    assert not req.logprobs and not req.stream.stream
    assert parse_chat_request(_chat(logprobs=True), VOCAB).params.logprobs == 0
    assert parse_chat_request(_chat(max_tokens=9, temperature=None), VOCAB).params.max_tokens == 9


def test_messages_roles_and_text_parts() -> None:
    req = parse_chat_request(
        _chat(
            messages=[
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "ok", "refusal": None, "tool_calls": None},
            ]
        ),
        VOCAB,
    )
    assert req.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "ok"},
    ]


def test_harmless_openai_fields_are_accepted() -> None:
    parse_chat_request(
        _chat(
            user="u1",
            store=False,
            metadata={"k": "v"},
            service_tier="auto",
            tools=[],
            tool_choice="none",
            parallel_tool_calls=True,
            response_format={"type": "text"},
            modalities=["text"],
            safety_identifier="s",
            prompt_cache_key="c",
            stream=True,
            stream_options={"include_obfuscation": False},
        ),
        VOCAB,
    )


def test_completion_parameters_and_prompt_forms() -> None:
    req = parse_completion_request(
        {
            "model": "m",
            "prompt": ["a", "b"],
            "echo": True,
            "logprobs": 3,
            "n": 2,
            "best_of": 2,
            "suffix": None,
        },
        VOCAB,
    )
    assert [p.text for p in req.prompts] == ["a", "b"]
    assert (req.params.max_tokens, req.params.logprobs, req.params.prompt_logprobs, req.echo) == (
        16,
        3,
        3,
        True,
    )
    assert parse_completion_request({"model": "m", "prompt": [1, 2, 3]}, VOCAB).prompts[0].token_ids == [
        1,
        2,
        3,
    ]
    many = parse_completion_request({"model": "m", "prompt": [[1], [2, 3]], "max_tokens": None}, VOCAB)
    # null means "the default", as with OpenAI: 16 for completions
    assert [p.token_ids for p in many.prompts] == [[1], [2, 3]] and many.params.max_tokens == 16
    assert (
        parse_completion_request({"model": "m", "prompt": "a", "logprobs": 1}, VOCAB).params.prompt_logprobs
        is None
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 129}, "n"),
        ({"seed": 2**64}, "seed"),
        ({"stop_token_ids": [VOCAB]}, "stop_token_ids"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"modalities": ["audio"]}, "modalities"),
        ({"stream": True, "stream_options": {"chunk_size": 1}}, "stream_options.chunk_size"),
        ({"audio": {"voice": "x"}}, "audio"),
    ],
)
def test_unsupported_values_name_their_param(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as info:
        parse_chat_request(_chat(**fields), VOCAB)
    assert info.value.status == 400 and info.value.param == param


def test_integral_floats_count_as_integers_but_booleans_do_not() -> None:
    assert parse_chat_request(_chat(max_tokens=8.0), VOCAB).params.max_tokens == 8
    with pytest.raises(APIError):
        parse_chat_request(_chat(max_tokens=True), VOCAB)
