"""Prometheus metrics, vLLM-style names with an `llmserve:` prefix, in a registry of the app's own
(never prometheus_client's global one, so two apps in one process, as in tests, do not collide).

Latencies are observed by the bridge as outputs reach the event loop, i.e. as the client would
see them. Engine-wide numbers (running, waiting, KV usage, cumulative token counts) are read at
scrape time from the engine thread's latest `EngineStats` snapshot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmserve.outputs import FinishReason

PREFIX = "llmserve:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FINISH_REASONS: tuple[FinishReason, ...] = ("stop", "length", "abort", "error")

# CPU decode steps are tens of ms, a GPU's a few; queues and long generations reach minutes.
_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
)
_ITL_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)


class ServerMetrics:
    """Implements the bridge's `RequestObserver`, and renders the `/metrics` page."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            f"{PREFIX}time_to_first_token_seconds",
            "Time to first token: request arrival to its first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            f"{PREFIX}inter_token_latency_seconds",
            "Time between two consecutive outputs of one sequence.",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{PREFIX}e2e_request_latency_seconds",
            "Request arrival to the end of a sequence (any reason).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            f"{PREFIX}request_queue_time_seconds",
            "Request arrival to its first scheduling by the engine.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.finished = Counter(
            f"{PREFIX}request_finished",
            "Finished sequences (one per choice) by reason.",
            ["finished_reason"],
            registry=r,
        )
        for reason in FINISH_REASONS:
            self.finished.labels(reason)  # export zeros, so rate() works from the first scrape
        self.rejected = Counter(
            f"{PREFIX}request_rejected",
            "Requests refused before reaching the engine, by HTTP status.",
            ["status"],
            registry=r,
        )
        r.register(_EngineStatsCollector(stats))

    # RequestObserver
    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_inter_token(self, itl_s: float) -> None:
        self.itl.observe(itl_s)

    def on_queue_time(self, queue_s: float) -> None:
        self.queue_time.observe(queue_s)

    def on_finished(self, reason: FinishReason, e2e_s: float) -> None:
        self.finished.labels(reason).inc()
        self.e2e.observe(e2e_s)

    def on_rejected(self, status: int) -> None:
        self.rejected.labels(str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineStatsCollector(Collector):
    """Gauges and cumulative counters straight from the engine's latest stats snapshot."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        if s is None:
            return
        yield _gauge("num_requests_running", "Sequences in the running batch.", s.num_running)
        yield _gauge("num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting)
        yield _gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).", s.kv_cache_usage)
        yield _counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries
        )
        yield _counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        yield _counter(
            "prompt_tokens", "Prompt tokens prefilled (prefix-cache hits excluded).", s.prompt_tokens
        )
        yield _counter("generation_tokens", "Tokens generated.", s.generation_tokens)
        yield _counter("num_preemptions", "Sequences preempted for lack of KV blocks.", s.num_preemptions)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)
