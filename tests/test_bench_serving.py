"""benchmarks/bench_serving.py: a short run against the live server, checked through its saved JSON;
the metrics on hand-made timings whose numbers are worked out in the comments; the SSE client on
canned streams; the arrival process and the datasets."""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import sys
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from server_helpers import API_KEY, REPO, ServerProcess

sys.path.insert(0, str(REPO / "benchmarks"))

import bench_serving
from serving import metrics
from serving.client import RequestResult, RequestSettings, make_client, send_request
from serving.datasets import DatasetConfig, SampleRequest, sample_requests
from serving.runner import arrival_times
from serving.tokenizer import TokenCounter, tiktoken_counter

SUMMARY_NAMES = [
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
    "request_goodput", "output_throughput", "total_token_throughput", "max_output_tokens_per_s",
    "max_concurrent_requests", "peak_concurrency", "mean_concurrency",
] + [f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2el")
     for stat in ("mean", "median", "std", "p90", "p99", "max")]  # fmt: skip


# ---- against the live server -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_bench_serving_run_saves_consistent_per_request_results(
    server: ServerProcess, tmp_path: Path, endpoint: str
) -> None:
    out = tmp_path / "result.json"
    code = bench_serving.main([
        "--base-url", server.url, "--api-key", API_KEY, "--endpoint", endpoint, "--num-prompts", "5",
        "--max-concurrency", "3", "--random-input-len", "24", "--random-output-len", "10",
        "--random-range-ratio", "0.3", "--ignore-eos", "--num-warmups", "1", "--seed", "7",
        "--goodput", "ttft:600000", "e2el:600000", "--save-result", str(out), "--disable-tqdm",
    ])  # fmt: skip
    assert code == 0
    record = json.loads(out.read_text())
    req, m = record["requests"], record["metrics"]

    assert all(req["success"]), req["errors"]
    assert m["completed"] == 5 and m["failed"] == 0
    # ignore_eos: every request produced exactly its max_tokens, as the usage chunk reports.
    assert req["output_lens"] == req["usage_output_lens"] == req["requested_output_lens"]
    assert m["total_output_tokens"] == sum(req["requested_output_lens"])
    timings = zip(
        req["ttfts"], req["itls"], req["e2els"], req["output_chunks"], req["output_lens"], strict=True
    )
    for ttft, itls, e2el, chunks, tokens in timings:
        assert 0 < ttft <= e2el
        assert len(itls) == chunks - 1
        assert ttft + sum(itls) <= e2el + 1e-6
        assert 1 <= chunks <= tokens
    assert all(name in m for name in SUMMARY_NAMES)
    assert m["mean_ttft_ms"] <= m["mean_e2el_ms"] and m["peak_concurrency"] <= 3
    # SLOs of ten minutes: every request is good.
    assert m["request_goodput"] == pytest.approx(m["request_throughput"])
    assert record["config"]["model"] == "SmolLM2-135M-Instruct" and record["config"]["endpoint"] == endpoint
    assert "cl100k" not in record["config"]["tokenizer"]  # the served model's own tokenizer was found


# ---- metrics on hand-made timings --------------------------------------------------------------


def result(
    start: float, ttft: float, itl: list[float], e2el: float, tokens: int, prompt: int
) -> RequestResult:
    r = RequestResult(prompt_len=prompt, requested_output_len=tokens, success=True, start_time=start)
    r.ttft, r.itl, r.e2el, r.chunks = ttft, itl, e2el, len(itl) + 1
    r.usage_prompt_tokens, r.usage_completion_tokens, r.finish_reason = prompt, tokens, "length"
    return r


def workload() -> list[RequestResult]:
    # A: sent at 0, chunks at 0.5, 0.75, 1.0, 1.5 (4 chunks, 4 tokens), done at 1.5.
    a = result(0.0, 0.5, [0.25, 0.25, 0.5], 1.5, tokens=4, prompt=10)
    # B: sent at 0.5, chunks at 1.5 and 2.0 (2 chunks carrying 3 tokens), done at 2.5.
    b = result(0.5, 1.0, [0.5], 2.0, tokens=3, prompt=20)
    # C: failed after 0.25 s, from 1.0 to 1.25.
    c = RequestResult(
        prompt_len=30, requested_output_len=5, error="HTTP 500: boom", start_time=1.0, e2el=0.25
    )
    return [a, b, c]


def test_percentile_interpolates_linearly_between_ranks() -> None:
    # ranks 0..3; p90 sits at rank 2.7: 30 + 0.7 * 10; p99 at 2.97.
    assert metrics.percentile([40, 10, 30, 20], 50) == pytest.approx(25.0)
    assert metrics.percentile([40, 10, 30, 20], 90) == pytest.approx(37.0)
    assert metrics.percentile([40, 10, 30, 20], 99) == pytest.approx(39.7)
    assert metrics.percentile([], 99) == 0.0


def test_tpot_excludes_the_first_token() -> None:
    a, b, _ = workload()
    assert metrics.tpot(a) == pytest.approx((1.5 - 0.5) / 3)
    assert metrics.tpot(b) == pytest.approx((2.0 - 1.0) / 2)
    assert metrics.tpot(result(0.0, 0.3, [], 0.3, tokens=1, prompt=5)) is None


def test_summary_counts_only_successful_requests_in_throughput_and_latency() -> None:
    s = metrics.summarize(workload(), duration=2.5)
    assert (s["completed"], s["failed"]) == (2, 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (30, 7)
    assert s["request_throughput"] == pytest.approx(2 / 2.5)
    assert s["output_throughput"] == pytest.approx(7 / 2.5)
    assert s["total_token_throughput"] == pytest.approx(37 / 2.5)
    assert s["request_goodput"] is None  # no SLOs given
    # TTFT 500, 1000 ms: p90 = 500 + 0.9 * 500.
    assert (s["mean_ttft_ms"], s["median_ttft_ms"], s["p90_ttft_ms"], s["max_ttft_ms"]) == pytest.approx(
        (750.0, 750.0, 950.0, 1000.0)
    )
    # TPOT 333.3 and 500 ms.
    assert s["mean_tpot_ms"] == pytest.approx((1000 / 3 + 500) / 2)
    # ITL pooled over requests: 250, 250, 500, 500 ms.
    assert (s["mean_itl_ms"], s["median_itl_ms"], s["p99_itl_ms"], s["max_itl_ms"]) == pytest.approx(
        (375.0, 375.0, 500.0, 500.0)
    )
    assert s["mean_e2el_ms"] == pytest.approx(1750.0)


def test_goodput_needs_every_given_slo_and_is_inclusive() -> None:
    runs = workload()

    def goodput(slos: dict[str, float]) -> float:
        return metrics.summarize(runs, 2.5, slos)["request_goodput"]

    # A: TTFT 500, TPOT 333.3, E2EL 1500 ms; B: TTFT 1000, TPOT 500, E2EL 2000 ms.
    assert goodput({"ttft": 600}) == pytest.approx(1 / 2.5)
    assert goodput({"tpot": 500}) == pytest.approx(2 / 2.5)  # B exactly at its SLO still counts
    assert goodput({"tpot": 400, "e2el": 1600}) == pytest.approx(1 / 2.5)
    assert goodput({"ttft": 2000, "e2el": 1000}) == 0.0
    assert metrics.parse_goodput(["ttft:500", "e2el:2000"]) == {"ttft": 500.0, "e2el": 2000.0}
    for bad in (["itl:5"], ["ttft"], ["ttft:fast"], ["tpot:0"]):
        with pytest.raises(ValueError):
            metrics.parse_goodput(bad)


def test_peak_output_tokens_per_second_buckets_chunk_arrivals() -> None:
    # Second 0: A's 2 chunks. Second 1: A's 2 + B's first chunk, worth 1.5 tokens (3 tokens in 2
    # chunks). Second 2: B's second chunk, 1.5.
    assert metrics.max_output_tokens_per_s(workload()) == pytest.approx(3.5)
    assert metrics.max_output_tokens_per_s([]) == 0.0


def test_concurrency_figures() -> None:
    runs = workload()
    # vLLM's per-second buckets, successful requests: A spans seconds 0-1, B 0-2.
    assert metrics.max_concurrent_requests(runs) == 2
    # Exactly: A, B and the failed C all in flight between 1.0 and 1.25.
    assert metrics.peak_concurrency(runs) == 3
    assert metrics.mean_concurrency(runs, 2.5) == pytest.approx((1.5 + 2.0 + 0.25) / 2.5)
    back_to_back = [result(0.0, 0.1, [], 1.0, 1, 1), result(1.0, 0.1, [], 1.0, 1, 1)]
    assert metrics.peak_concurrency(back_to_back) == 1


# ---- the client on canned streams --------------------------------------------------------------


def stream_once(body: str, status: int = 200, piece: int = 7) -> RequestResult:
    """`body` served on a loopback port in `piece`-byte writes, so SSE lines span network reads."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        data = body.encode()
        for i in range(0, len(data), piece):
            await response.write(data[i : i + piece])
        await response.write_eof()
        return response

    async def go() -> RequestResult:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        async with TestServer(app, host="127.0.0.1") as server, make_client(1) as client:
            settings = RequestSettings(base_url=str(server.make_url("")), model="m")
            return await send_request(client, settings, SampleRequest("hi", 1, 3), 0.0)

    return asyncio.run(go())


def sse(*events: object) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


def test_client_counts_text_chunks_and_reads_usage() -> None:
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    text = [{"choices": [{"index": 0, "delta": {"content": t}}]} for t in ("Hel", "lo", "!")]
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}
    r = stream_once(sse(role, *text, finish, usage, "[DONE]"))
    assert r.success and r.text == "Hello!" and r.chunks == 3 and len(r.itl) == 2
    assert (r.usage_prompt_tokens, r.output_len, r.finish_reason) == (4, 3, "length")
    assert 0 < r.ttft <= r.e2el


def test_request_body_streams_with_usage_and_carries_the_load_settings() -> None:
    sample = SampleRequest("Say hi", 2, 7)
    chat = RequestSettings("http://127.0.0.1:1/", "m", "chat", ignore_eos=True, extra_body={"top_k": 5})
    body = chat.body(sample)
    assert chat.url == "http://127.0.0.1:1/v1/chat/completions"
    assert body["messages"] == [{"role": "user", "content": "Say hi"}] and "prompt" not in body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["ignore_eos"], body["top_k"], body["temperature"]) == (7, True, 5, 0.0)
    plain = RequestSettings("http://127.0.0.1:1", "m", "completions").body(sample)
    assert plain["prompt"] == "Say hi" and "messages" not in plain and "ignore_eos" not in plain
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat.body(SampleRequest("System: ...", 5, 3, turns))["messages"] == turns


def test_client_records_failures_instead_of_raising() -> None:
    assert stream_once('{"error": "no"}', status=400).error.startswith("HTTP 400")
    empty = stream_once(sse({"choices": [{"delta": {}, "finish_reason": "stop"}]}, "[DONE]"))
    assert not empty.success and "no text" in empty.error
    assert not stream_once(sse({"error": {"message": "engine died"}})).success


def test_client_opens_a_connection_per_request() -> None:
    """A server that closes each connection shortly after its response, without saying so (as
    llama-server does with kept-alive connections): back-to-back requests must all succeed."""
    body = sse({"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}]}, "[DONE]")
    response = (
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        f"content-length: {len(body.encode())}\r\n\r\n{body}"
    ).encode()
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        length = next(int(h.split(b":")[1]) for h in lines if h.startswith(b"content-length"))
        await reader.readexactly(length)
        writer.write(response)
        await writer.drain()
        await asyncio.sleep(0.05)  # the client may send its next request on this connection meanwhile
        writer.close()

    async def go() -> list[RequestResult]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        settings = RequestSettings(base_url=f"http://127.0.0.1:{port}", model="m")
        async with server, make_client(1) as client:
            return [await send_request(client, settings, SampleRequest("hi", 1, 3), 0.0) for _ in range(4)]

    results = asyncio.run(go())
    assert [r.error for r in results] == [""] * 4 and all(r.text == "x" for r in results)
    assert connections == 4


# ---- arrivals and datasets ---------------------------------------------------------------------


def gap_stats(times: list[float]) -> tuple[float, float]:
    """Mean gap and its coefficient of variation."""
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return statistics.mean(gaps), statistics.stdev(gaps) / statistics.mean(gaps)


def test_arrivals_are_seeded_with_the_requested_mean_rate_and_burstiness() -> None:
    assert arrival_times(3, float("inf"), 1.0, 0) == [0.0, 0.0, 0.0]
    times = arrival_times(4000, 4.0, 1.0, seed=1)
    assert times == arrival_times(4000, 4.0, 1.0, seed=1) and times[0] == 0.0
    mean, cv = gap_stats(times)
    assert mean == pytest.approx(0.25, rel=0.05)
    # The coefficient of variation of gamma gaps is 1/sqrt(shape): 1 for Poisson, 0.5 at burstiness 4.
    assert cv == pytest.approx(1.0, rel=0.1)
    mean, cv = gap_stats(arrival_times(4000, 4.0, 4.0, seed=1))
    assert mean == pytest.approx(0.25, rel=0.05) and cv == pytest.approx(0.5, rel=0.1)


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return tiktoken_counter()


def test_random_prompts_tokenize_to_their_target_length(counter: TokenCounter) -> None:
    cfg = DatasetConfig(name="random", num_prompts=8, seed=3, input_len=40, output_len=20, range_ratio=0.5)
    samples = sample_requests(cfg, counter)
    assert [s.prompt for s in samples] == [s.prompt for s in sample_requests(cfg, counter)]
    assert all(20 <= s.prompt_len <= 60 and counter.count(s.prompt) == s.prompt_len for s in samples)
    assert all(10 <= s.output_len <= 30 for s in samples)
    assert len({s.prompt_len for s in samples}) > 1


def test_prefix_groups_share_their_prefix(counter: TokenCounter) -> None:
    cfg = DatasetConfig(
        name="prefix", num_prompts=6, seed=0, input_len=10, prefix_len=30, num_prefix_groups=2
    )
    samples = sample_requests(cfg, counter)
    assert all(s.prompt_len == 40 for s in samples)
    heads = [s.prompt[:100] for s in samples]  # 30 words of 4+ characters: inside the prefix
    assert heads[0] == heads[2] == heads[4] != heads[1] == heads[3] == heads[5]
    assert len({s.prompt for s in samples}) == 6


def test_chat_conversations_end_with_a_user_question(counter: TokenCounter) -> None:
    samples = sample_requests(DatasetConfig(name="chat", num_prompts=10, seed=0, chat_max_turns=3), counter)
    for s in samples:
        roles = [m["role"] for m in s.messages]
        assert roles[0] == "system" and roles[-1] == "user" and len(roles) <= 2 + 2 * 3
        assert s.prompt_len == counter.count(s.prompt) > 0
    assert max(len(s.messages) for s in samples) > 2  # some have earlier turns


# ---- compare_servers' roofline ---------------------------------------------------------------


def test_roofline_figures_from_token_counts(tmp_path: Path) -> None:
    from bench_offline import ModelSize
    from serving.roofline import Ceilings, roofline_rows, weight_bytes

    # 100M params, 20M of them the (tied) embedding: 2 * 80M FLOPs per token through the body,
    # 2 * 20M more per answer token through the head.
    size = ModelSize(params=100_000_000, embed_params=20_000_000)
    ceilings = Ceilings(size, read_gb_per_s=20.0, matmul_gflop_per_s=1000.0, dtype="bfloat16")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"\0" * 1234)
    weights = {
        "llmserve": weight_bytes("llmserve", "bfloat16", [], gguf, size),
        "int8": weight_bytes("llmserve", "bfloat16", ["--quantization", "int8"], gguf, size),
        "int4": weight_bytes("llmserve", "bfloat16", ["--quantization", "int4"], gguf, size),
        "w8a8": weight_bytes("llmserve", "bfloat16", ["--quantization", "w8a8"], gguf, size),
        "llama.cpp": weight_bytes("llama.cpp", "bfloat16", [], gguf, size),
    }
    # int4: the 80M body weights at 20 bytes per 32, the 20M head in int8.
    assert weights == {
        "llmserve": 200_000_000, "int8": 100_000_000, "int4": 70_000_000, "w8a8": 100_000_000, "llama.cpp": 1234,
    }  # fmt: skip

    # 1000 prompt + 500 answer tokens in 2 s: (2 * 80M * 1500 + 2 * 20M * 500) / 2 s = 130 GFLOP/s.
    metrics_1 = {"total_input_tokens": 1000, "total_output_tokens": 500, "duration": 2.0, "output_throughput": 250.0}
    rows = [
        {"server": "llmserve", "concurrency": 1, "metrics": metrics_1},
        {"server": "llmserve", "concurrency": 16, "metrics": metrics_1},
    ]
    one, many = roofline_rows(rows, ceilings, weights)
    assert one["useful_gflop_per_s"] == pytest.approx(130.0)
    assert one["pct_of_matmul"] == pytest.approx(13.0)
    # one stream: 250 forwards/s x 200 MB = 50 GB/s, 250% of a 20 GB/s read (a cache would do that)
    assert one["weight_gb_per_s"] == pytest.approx(50.0)
    assert one["pct_of_read"] == pytest.approx(250.0)
    assert "weight_gb_per_s" not in many  # shared forwards: not countable from the client
