"""Every refusal is an OpenAI error object with the right status and `param`; none is a 500."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from server_helpers import API_KEY, MODEL, ServerProcess, chat_body

pytestmark = pytest.mark.slow


def _assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL}, "messages"),
        ({**chat_body(), "messages": []}, "messages"),
        ({**chat_body(), "messages": "hi"}, "messages"),
        ({**chat_body(), "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({**chat_body(), "messages": [{"role": "user"}]}, "messages[0].content"),
        (
            {
                **chat_body(),
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            },
            "messages[0].content[0].type",
        ),
        ({**chat_body(), "messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name"),
        ({**chat_body(), "temperature": "hot"}, "temperature"),
        ({**chat_body(), "temperature": 2.5}, "temperature"),
        ({**chat_body(), "top_p": 0}, "top_p"),
        ({**chat_body(), "n": 0}, "n"),
        ({**chat_body(), "n": True}, "n"),
        ({**chat_body(), "max_tokens": 0}, "max_tokens"),
        ({**chat_body(), "max_tokens": "8"}, "max_tokens"),
        ({**chat_body(), "presence_penalty": 3}, "presence_penalty"),
        ({**chat_body(), "stop": [""]}, "stop"),
        ({**chat_body(), "stop": 5}, "stop"),
        ({**chat_body(), "seed": 1.5}, "seed"),
        ({**chat_body(), "logit_bias": {"abc": 1}}, "logit_bias"),
        ({**chat_body(), "logit_bias": {"5": 500}}, "logit_bias"),
        ({**chat_body(), "logit_bias": {"99999999": 1}}, "logit_bias"),
        ({**chat_body(), "logprobs": 2}, "logprobs"),
        ({**chat_body(), "top_logprobs": 2}, "top_logprobs"),
        ({**chat_body(), "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({**chat_body(), "stream_options": {"include_usage": True}}, "stream_options"),
        (
            {**chat_body(), "stream": True, "stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
        ),
        ({**chat_body(), "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({**chat_body(), "response_format": {"type": "json_object"}}, "response_format"),
        ({**chat_body(), "store": True}, "store"),
        ({**chat_body(), "reasoning_effort": "high"}, "reasoning_effort"),
        ({**chat_body(), "frobnicate": 1}, "frobnicate"),
        ({**chat_body(), "top_k": -2}, "top_k"),
        ({**chat_body(), "min_p": 1.5}, "min_p"),
        ({**chat_body(), "repetition_penalty": 0}, "repetition_penalty"),
        ({**chat_body(), "min_tokens": 20}, "min_tokens"),
        ({**chat_body(), "ignore_eos": "yes"}, "ignore_eos"),
        ({**chat_body(), "max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
        ({**chat_body(), "model": 7}, "model"),
    ],
)
def test_chat_bad_input_is_400_naming_the_param(http: httpx.Client, body: dict[str, Any], param: str) -> None:
    _assert_error(http.post("/v1/chat/completions", json=body), 400, param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL}, "prompt"),
        ({"model": MODEL, "prompt": ""}, "prompt"),
        ({"model": MODEL, "prompt": []}, "prompt"),
        ({"model": MODEL, "prompt": ["a", 1]}, "prompt"),
        ({"model": MODEL, "prompt": [1, 10**9]}, "prompt"),
        ({"model": MODEL, "prompt": "hi", "logprobs": 50}, "logprobs"),
        ({"model": MODEL, "prompt": "hi", "suffix": "end"}, "suffix"),
        ({"model": MODEL, "prompt": "hi", "best_of": 3}, "best_of"),
        ({"model": MODEL, "prompt": "hi", "echo": 1}, "echo"),
        ({"model": MODEL, "prompt": "hi", "messages": []}, "messages"),
    ],
)
def test_completions_bad_input_is_400_naming_the_param(
    http: httpx.Client, body: dict[str, Any], param: str
) -> None:
    _assert_error(http.post("/v1/completions", json=body), 400, param)


@pytest.mark.parametrize("raw", [b"{bad json", b"", b"[1, 2]", b"\xff\xfe\x00", b'"a string"', b"[" * 100000])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_malformed_body_is_400(http: httpx.Client, path: str, raw: bytes) -> None:
    _assert_error(http.post(path, content=raw, headers={"Content-Type": "application/json"}), 400)


def test_lone_surrogate_is_400_but_an_escaped_pair_is_text(http: httpx.Client) -> None:
    lone = b'{"model": "%s", "prompt": "a\\ud800b", "max_tokens": 1}' % MODEL.encode()
    error = _assert_error(http.post("/v1/completions", content=lone), 400)
    assert "surrogate" in error["message"]
    pair = b'{"model": "%s", "prompt": "\\ud83d\\ude00", "max_tokens": 1, "echo": true}' % MODEL.encode()
    resp = http.post("/v1/completions", content=pair)
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"].startswith("\U0001f600")


def test_prompt_beyond_the_context_window_is_400_with_both_numbers(http: httpx.Client) -> None:
    error = _assert_error(
        http.post("/v1/chat/completions", json={**chat_body(), "max_tokens": 100_000}), 400, "messages"
    )
    assert "100000" in error["message"] and "8192" in error["message"], error
    assert error["code"] == "context_length_exceeded"
    long_prompt = "hello " * 9000
    error = _assert_error(
        http.post("/v1/completions", json={"model": MODEL, "prompt": long_prompt}), 400, "prompt"
    )
    assert "8192" in error["message"]


def test_unknown_model_is_404(http: httpx.Client, client: openai.OpenAI) -> None:
    error = _assert_error(
        http.post("/v1/chat/completions", json={**chat_body(), "model": "gpt-9"}), 404, "model"
    )
    assert error["code"] == "model_not_found"
    _assert_error(http.get("/v1/models/gpt-9"), 404, "model")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=1)


def test_body_over_the_limit_is_413(http: httpx.Client) -> None:
    big = {**chat_body(), "messages": [{"role": "user", "content": "x" * (4 * 1024 * 1024 + 10)}]}
    _assert_error(http.post("/v1/chat/completions", json=big), 413)


def test_missing_or_wrong_key_is_401_and_probes_need_none(server: ServerProcess) -> None:
    url = server.url
    _assert_error(httpx.post(f"{url}/v1/chat/completions", json=chat_body()), 401)
    error = _assert_error(
        httpx.post(f"{url}/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer nope"}),
        401,
    )
    assert error["code"] == "invalid_api_key"
    _assert_error(httpx.get(f"{url}/v1/models", headers={"Authorization": f"Basic {API_KEY}"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200


def test_unknown_route_and_wrong_method_are_json(http: httpx.Client) -> None:
    _assert_error(http.get("/v1/nothing"), 404)
    _assert_error(http.get("/v1/chat/completions"), 405)


def test_sdk_raises_bad_request_with_the_param(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=1)
    assert info.value.body["param"] == "messages"  # type: ignore[index]


def test_cors_is_off_by_default(http: httpx.Client) -> None:
    resp = http.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert resp.status_code == 200 and "access-control-allow-origin" not in resp.headers
