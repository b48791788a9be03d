"""Serving metrics, with vLLM's names and definitions (`vllm bench serve`), computed from per-request
timings. Latency metrics are in milliseconds; per-request arrays elsewhere stay in seconds.

- TTFT: send to first text chunk. E2EL: send to end of stream.
- TPOT, per request with more than one output token: (E2EL - TTFT) / (output tokens - 1).
- ITL: every gap between consecutive text chunks, all requests pooled.
- Throughputs divide by the benchmark's duration (first send to last completion); only successful
  requests count, and their token counts are the server's `usage` when it reports one.
- Goodput: successful requests per second that meet every SLO given (TTFT, TPOT, E2EL, each <=);
  a request with one output token has TPOT 0 here, as in vLLM.
- Peak output tokens/s (`max_output_tokens_per_s`): tokens arriving in each one-second bucket since
  the first send, the busiest bucket. A chunk counts as output_tokens / chunks of its request, so
  a server that packs several tokens per chunk is not undercounted (one per chunk otherwise, as in vLLM).
- `max_concurrent_requests`: vLLM's per-bucket figure, requests active at any time in a one-second
  bucket. `peak_concurrency` is the exact most in flight at one instant, and `mean_concurrency` the
  time-average (total request time / duration, Little's law); these two count failed requests too,
  since they held a connection.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from serving.client import RequestResult

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (90, 99)  # with mean, median, std and max
SLO_NAMES = ("ttft", "tpot", "e2el")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default, as vLLM uses); 0 when empty."""
    return float(np.percentile(values, q)) if len(values) else 0.0


def tpot(result: RequestResult) -> float | None:
    """Seconds per output token after the first; None with fewer than two output tokens."""
    if result.output_len < 2:
        return None
    return (result.e2el - result.ttft) / (result.output_len - 1)


def parse_goodput(specs: Iterable[str]) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> `{"ttft": 500.0, "tpot": 50.0}` (milliseconds)."""
    slos: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition(":")
        if not sep or name not in SLO_NAMES:
            raise ValueError(
                f"bad --goodput {spec!r}: expected NAME:MS with NAME one of {', '.join(SLO_NAMES)}"
            )
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"bad --goodput {spec!r}: {value!r} is not a number of milliseconds") from None
        if slos[name] <= 0:
            raise ValueError(f"bad --goodput {spec!r}: an SLO must be > 0 ms")
    return slos


def meets_slos(result: RequestResult, slos: dict[str, float]) -> bool:
    measured = {"ttft": result.ttft, "tpot": tpot(result) or 0.0, "e2el": result.e2el}
    return all(measured[name] * 1000.0 <= limit for name, limit in slos.items())


def token_times(result: RequestResult) -> list[float]:
    """Arrival time of each text chunk, in seconds since the benchmark started."""
    t = result.start_time + result.ttft
    times = [t]
    for gap in result.itl:
        t += gap
        times.append(t)
    return times


def max_output_tokens_per_s(results: Sequence[RequestResult]) -> float:
    ok = [r for r in results if r.success]
    if not ok:
        return 0.0
    origin = min(r.start_time for r in ok)
    buckets: dict[int, float] = {}
    for r in ok:
        weight = r.output_len / max(r.chunks, 1)
        for t in token_times(r):
            second = int(t - origin)
            buckets[second] = buckets.get(second, 0.0) + weight
    return max(buckets.values())


def max_concurrent_requests(results: Sequence[RequestResult]) -> int:
    ok = [r for r in results if r.success]
    if not ok:
        return 0
    origin = min(r.start_time for r in ok)
    active: dict[int, int] = {}
    for r in ok:
        for second in range(int(r.start_time - origin), int(r.start_time + r.e2el - origin) + 1):
            active[second] = active.get(second, 0) + 1
    return max(active.values())


def peak_concurrency(results: Sequence[RequestResult]) -> int:
    # At equal times an end sorts before a start (-1 < +1): back-to-back requests never overlap.
    events = sorted([(r.start_time, 1) for r in results] + [(r.start_time + r.e2el, -1) for r in results])
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def mean_concurrency(results: Sequence[RequestResult], duration: float) -> float:
    return sum(r.e2el for r in results) / duration if duration > 0 else 0.0


def _stats(name: str, values_s: Sequence[float]) -> dict[str, float]:
    ms = [v * 1000.0 for v in values_s]
    stats = {
        f"mean_{name}_ms": float(np.mean(ms)) if ms else 0.0,
        f"median_{name}_ms": percentile(ms, 50),
        f"std_{name}_ms": float(np.std(ms)) if ms else 0.0,
    }
    stats.update({f"p{q}_{name}_ms": percentile(ms, q) for q in PERCENTILES})
    stats[f"max_{name}_ms"] = max(ms) if ms else 0.0
    return stats


def summarize(
    results: Sequence[RequestResult], duration: float, slos: dict[str, float] | None = None
) -> dict[str, Any]:
    """The run's summary: vLLM's metric names, plus our concurrency and token cross-check figures."""
    ok = [r for r in results if r.success]
    total_in = sum(r.input_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    summary: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": per_s(len(ok)),
        "request_goodput": per_s(sum(meets_slos(r, slos) for r in ok)) if slos else None,
        "output_throughput": per_s(total_out),
        "total_token_throughput": per_s(total_in + total_out),
        "max_output_tokens_per_s": max_output_tokens_per_s(results),
        "max_concurrent_requests": max_concurrent_requests(results),
        "peak_concurrency": peak_concurrency(results),
        "mean_concurrency": mean_concurrency(results, duration),
    }
    tpots = [t for t in map(tpot, ok) if t is not None]
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": tpots,
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.e2el for r in ok],
    }
    for name in LATENCY_METRICS:
        summary.update(_stats(name, series[name]))
    summary.update(token_crosscheck(ok))
    return summary


def token_crosscheck(ok: Sequence[RequestResult]) -> dict[str, Any]:
    """How far the server's usage counts are from re-tokenizing its text."""
    with_usage = [r for r in ok if r.usage_completion_tokens is not None]
    checked = [r for r in with_usage if r.retokenized_output_len is not None]
    usage = sum(r.usage_completion_tokens or 0 for r in checked)
    retok = sum(r.retokenized_output_len or 0 for r in checked)
    return {
        "requests_with_usage": len(with_usage),
        "retokenized_output_tokens": sum(r.retokenized_output_len or 0 for r in ok),
        "usage_vs_retokenized_requests_differing": sum(
            r.usage_completion_tokens != r.retokenized_output_len for r in checked
        ),
        "usage_vs_retokenized_token_diff_pct": 100.0 * (retok - usage) / usage if usage else None,
    }
