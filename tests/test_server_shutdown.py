"""Admission control and SIGTERM, on a server of their own: one sequence at a time, no waiting
room beyond one request, a short shutdown grace period."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_helpers import MODEL, ServerProcess, auth_headers, chat_body, sse_events, wait_for

pytestmark = pytest.mark.slow

GRACE_S = 3.0


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = Path(tmp_path_factory.mktemp("small-server")) / "server.log"
    proc = ServerProcess(
        log, "--max-num-seqs", "1", "--max-waiting-requests", "0", "--shutdown-grace-s", str(GRACE_S)
    )
    try:
        proc.wait_healthy()
        yield proc
    finally:
        proc.terminate()


def _stream_in_thread(url: str, body: dict[str, Any], out: dict[str, Any]) -> threading.Thread:
    """POST a streaming request in the background; `out` gets the status, the body, and 'first' once a
    token has arrived. Setting `out["hang_up"]` makes the client disconnect."""

    def run() -> None:
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=auth_headers(), timeout=120
        ) as r:
            out["status"] = r.status_code
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if out.get("hang_up"):
                    break
                if line.startswith("data:") and '"content":"' in line and '"content":""' not in line:
                    out.setdefault("first", time.monotonic())
            out["text"] = "\n".join(lines)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _accepts(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=2)
    except httpx.TransportError:
        return False
    return True


def test_over_the_waiting_limit_is_429_with_retry_after(small_server: ServerProcess) -> None:
    running: dict[str, Any] = {}
    waiting: dict[str, Any] = {}
    long_body = chat_body(stream=True, max_tokens=400, ignore_eos=True)
    t1 = _stream_in_thread(small_server.url, long_body, running)
    assert wait_for(lambda: "first" in running, timeout_s=30)
    t2 = _stream_in_thread(small_server.url, chat_body(stream=True, max_tokens=2), waiting)
    assert wait_for(lambda: small_server.metrics()["llmserve:num_requests_waiting"] == 1, timeout_s=30)

    resp = httpx.post(f"{small_server.url}/v1/chat/completions", json=chat_body(), headers=auth_headers())
    assert resp.status_code == 429, resp.text
    assert int(resp.headers["Retry-After"]) >= 1
    error = resp.json()["error"]
    assert error["type"] == "rate_limit_error" and "waiting" in error["message"]

    # Once the long request's client hangs up, the waiting one is served.
    running["hang_up"] = True
    t1.join(120)
    t2.join(120)
    assert running["status"] == waiting["status"] == 200
    assert sse_events(waiting["text"])[-1] == "[DONE]"
    assert (
        httpx.post(
            f"{small_server.url}/v1/chat/completions", json=chat_body(max_tokens=2), headers=auth_headers()
        ).status_code
        == 200
    )


def test_sigterm_lets_streams_finish_aborts_stragglers_and_exits_0(small_server: ServerProcess) -> None:
    # One sequence runs at a time: the short request runs first, the long one waits behind it.
    short: dict[str, Any] = {}
    long: dict[str, Any] = {}
    t_short = _stream_in_thread(
        small_server.url, chat_body(stream=True, max_tokens=12, ignore_eos=True), short
    )
    assert wait_for(lambda: "first" in short, timeout_s=30)
    t_long = _stream_in_thread(
        small_server.url, chat_body(stream=True, max_tokens=4000, ignore_eos=True), long
    )
    assert wait_for(lambda: small_server.metrics()["llmserve:num_requests_waiting"] == 1, timeout_s=30)

    sent = time.monotonic()
    small_server.proc.send_signal(15)
    assert wait_for(lambda: not _accepts(small_server.url), timeout_s=5), "still accepting after SIGTERM"
    t_short.join(30)
    t_long.join(30)
    code = small_server.proc.wait(30)
    elapsed = time.monotonic() - sent

    assert code == 0, small_server.log()
    assert elapsed < GRACE_S + 10
    finished = sse_events(short["text"])
    assert finished[-1] == "[DONE]"
    assert finished[-2]["choices"][0]["finish_reason"] == "length"
    aborted = sse_events(long["text"])
    assert aborted[-1] == "[DONE]"
    assert "shutting down" in aborted[-2]["error"]["message"], aborted[-2:]
    assert json.dumps(aborted).count('"finish_reason": "length"') == 0
    assert MODEL in small_server.log()
