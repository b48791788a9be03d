"""What the server does when the engine misbehaves: exceptions, failed requests, stalls, death.
Runs the real app on a fake engine (no model), so the failures can be switched on at will."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import openai
import pytest
from fake_engine import FAKE_MODEL, serve_fake
from server_helpers import parse_metrics, sse_events, wait_for


def _body(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": FAKE_MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 5, **extra}


def test_engine_exception_mid_stream_sends_error_then_done_and_serving_goes_on() -> None:
    with serve_fake() as srv:
        srv.engine.step_delay_s = 0.05
        events: list[Any] = []
        with httpx.stream(
            "POST", f"{srv.url}/v1/chat/completions", json=_body(stream=True, max_tokens=100)
        ) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if '"content":"a"' in line:
                    srv.engine.raise_next = RuntimeError("boom")
            events = sse_events("\n".join(lines))
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert "boom" in error["message"] and set(error) == {"message", "type", "param", "code"}

        # The SDK surfaces the error event as an APIError.
        srv.engine.step_delay_s = 0.01
        sdk = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
        stream = sdk.chat.completions.create(**_body(stream=True, max_tokens=50))
        next(iter(stream))
        srv.engine.raise_next = RuntimeError("boom again")
        with pytest.raises(openai.APIError, match="boom again"):
            list(stream)

        after = httpx.post(f"{srv.url}/v1/chat/completions", json=_body())
        assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == "abcde"
        assert httpx.get(f"{srv.url}/health").status_code == 200
        metrics = parse_metrics(httpx.get(f"{srv.url}/metrics").text)
        assert metrics['llmserve:request_finished_total{finished_reason="error"}'] == 2


def test_a_failed_request_fails_alone() -> None:
    with serve_fake() as srv:
        srv.engine.step_delay_s = 0.02
        results: dict[str, httpx.Response] = {}
        healthy = threading.Thread(
            target=lambda: results.update(
                ok=httpx.post(f"{srv.url}/v1/chat/completions", json=_body(max_tokens=30), timeout=30)
            )
        )
        healthy.start()
        bad = httpx.post(f"{srv.url}/v1/chat/completions", json=_body("poison"), timeout=30)
        assert bad.status_code == 500
        assert "poisoned batch" in bad.json()["error"]["message"]
        streamed = httpx.post(f"{srv.url}/v1/chat/completions", json=_body("poison", stream=True), timeout=30)
        events = sse_events(streamed.text)
        assert events[-1] == "[DONE]" and "poisoned batch" in events[-2]["error"]["message"]
        healthy.join(30)
        assert results["ok"].status_code == 200
        assert len(results["ok"].json()["choices"][0]["message"]["content"]) == 30


def test_health_is_503_while_the_engine_stalls_and_200_again_after() -> None:
    with serve_fake(health_stall_s=0.5) as srv:
        assert httpx.get(f"{srv.url}/health").status_code == 200
        srv.engine.step_delay_s = 1.5
        thread = threading.Thread(
            target=lambda: httpx.post(f"{srv.url}/v1/chat/completions", json=_body(max_tokens=2), timeout=30)
        )
        thread.start()
        stalled = wait_for(lambda: httpx.get(f"{srv.url}/health").status_code == 503, timeout_s=5)
        assert stalled
        body = httpx.get(f"{srv.url}/health").json()
        assert "no progress" in body["error"]["message"] or body["error"]
        srv.engine.step_delay_s = 0.01
        thread.join(30)
        assert wait_for(lambda: httpx.get(f"{srv.url}/health").status_code == 200, timeout_s=5)


def test_a_dead_engine_loop_turns_health_and_requests_to_503() -> None:
    with serve_fake() as srv:
        srv.engine.always_raise = True
        resp = httpx.post(f"{srv.url}/v1/chat/completions", json=_body(), timeout=30)
        assert resp.status_code == 500  # the request in the failing step is failed, not hung
        deadline = time.monotonic() + 10
        while srv.client.health() is None and time.monotonic() < deadline:
            httpx.post(f"{srv.url}/v1/chat/completions", json=_body(), timeout=30)
        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503 and "crashed" in health.json()["error"]["message"]
        refused = httpx.post(f"{srv.url}/v1/chat/completions", json=_body(), timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable_error"


def test_cors_headers_only_for_allowed_origins() -> None:
    with serve_fake(allowed_origins=["http://app.example"]) as srv:
        preflight = httpx.options(
            f"{srv.url}/v1/chat/completions",
            headers={
                "Origin": "http://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        other = httpx.get(f"{srv.url}/v1/models", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
