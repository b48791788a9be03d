"""Client disconnects, concurrency and metrics on the live server."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from server_helpers import MODEL, ServerProcess, chat_body, wait_for

pytestmark = pytest.mark.slow

LONG = {"max_tokens": 2000, "ignore_eos": True}
IDLE = "llmserve:num_requests_running"
KV = "llmserve:kv_cache_usage_perc"
ABORTS = 'llmserve:request_finished_total{finished_reason="abort"}'


def _idle(server: ServerProcess) -> dict[str, float]:
    return wait_for(
        lambda: (m := server.metrics())[IDLE] == 0 and m["llmserve:num_requests_waiting"] == 0 and m
    )


def test_disconnect_mid_stream_aborts_and_frees_kv(server: ServerProcess, http: httpx.Client) -> None:
    before = _idle(server)
    with http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True, **LONG)) as resp:
        assert resp.status_code == 200
        events = []
        # Hold the iterator: a `for ... break` would let it be collected at once, which closes the
        # response, i.e. disconnects before we look at the metrics.
        lines = resp.iter_lines()
        while len(events) < 4:
            line = next(lines)
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
        during = server.metrics()
        assert during[IDLE] == 1 and during[KV] > before[KV], (events, during, before)
    request_id = events[0]["id"]

    after = wait_for(lambda: (m := server.metrics())[IDLE] == 0 and m, timeout_s=10)
    assert after, "the aborted request is still running"
    assert after[KV] == before[KV]
    assert after[ABORTS] == before[ABORTS] + 1
    assert wait_for(
        lambda: f"aborting request {request_id} (client disconnected)" in server.log(), timeout_s=5
    )
    # Nothing keeps generating for the gone client.
    assert server.metrics()["llmserve:generation_tokens_total"] == after["llmserve:generation_tokens_total"]


def test_disconnect_while_waiting_for_a_non_stream_response_aborts(server: ServerProcess) -> None:
    before = _idle(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/v1/chat/completions",
            json=chat_body(**LONG),
            timeout=1.5,
            headers={"Authorization": "Bearer test-key"},
        )
    after = wait_for(lambda: (m := server.metrics())[IDLE] == 0 and m, timeout_s=10)
    assert after and after[KV] == before[KV]
    assert after[ABORTS] == before[ABORTS] + 1


def test_32_concurrent_greedy_streams_match_their_solo_runs(
    client: openai.OpenAI, async_client: openai.AsyncOpenAI
) -> None:
    topics = ["cats", "the sea", "winter", "coffee", "robots", "music", "mountains", "rain"]
    prompts = [f"Write one sentence about {t}." for t in topics]
    params = {"max_tokens": 12, "temperature": 0}
    solo = {
        p: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], **params)
        .choices[0]
        .message.content
        for p in prompts
    }

    async def stream(prompt: str) -> str:
        chunks = await async_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True, **params
        )
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    async def all_streams() -> list[str]:
        return await asyncio.gather(*(stream(p) for p in prompts * 4))

    texts = asyncio.run(all_streams())
    assert len(texts) == 32
    assert [solo[p] for p in prompts * 4] == texts


def test_metrics_page_has_the_vllm_style_families(server: ServerProcess, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    page = httpx.get(f"{server.url}/metrics").text
    for name in (
        "llmserve:time_to_first_token_seconds_bucket",
        "llmserve:inter_token_latency_seconds_bucket",
        "llmserve:e2e_request_latency_seconds_bucket",
        "llmserve:request_queue_time_seconds_bucket",
        "llmserve:num_requests_running",
        "llmserve:num_requests_waiting",
        "llmserve:kv_cache_usage_perc",
        "llmserve:prefix_cache_queries_total",
        "llmserve:prefix_cache_hits_total",
        "llmserve:prompt_tokens_total",
        "llmserve:generation_tokens_total",
        "llmserve:num_preemptions_total",
        'llmserve:request_finished_total{finished_reason="stop"}',
        'llmserve:request_finished_total{finished_reason="error"}',
    ):
        assert name in page, name
    metrics = server.metrics()
    assert metrics["llmserve:time_to_first_token_seconds_count"] >= 1
    assert metrics["llmserve:generation_tokens_total"] >= 3
    assert metrics["llmserve:prefix_cache_hits_total"] > 0  # the chat template's system prompt is shared
