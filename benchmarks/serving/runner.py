"""Drive a list of requests at a server: warm-ups first, then the measured run, paced by a Poisson
(or gamma) arrival process and capped by a concurrency limit."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from serving.client import RequestResult, RequestSettings, make_client, send_request
from serving.datasets import SampleRequest


@dataclass(frozen=True)
class LoadConfig:
    request_rate: float = math.inf  # requests per second; inf: all are sent at once
    burstiness: float = 1.0  # gamma shape of the gaps: 1 is Poisson, < 1 burstier, > 1 more even
    max_concurrency: int | None = None  # requests in flight at most; None: no limit
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError("--request-rate must be > 0 (inf: send everything at once)")
        if not self.burstiness > 0:
            raise ValueError("--burstiness must be > 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be >= 1")


def arrival_times(n: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """When each request becomes due, in seconds since the start. The gaps are gamma-distributed with
    mean 1 / rate (shape `burstiness`, scale 1 / (rate * burstiness)); the first request is due at 0."""
    if math.isinf(request_rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (request_rate * burstiness), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


async def run_load(
    settings: RequestSettings, samples: list[SampleRequest], warmups: list[SampleRequest], load: LoadConfig
) -> tuple[list[RequestResult], float, list[RequestResult]]:
    """Returns the measured results (in the samples' order), the run's duration in seconds (first
    send to last completion), and the warm-up results."""
    limit = load.max_concurrency or max(len(samples), len(warmups), 1)
    semaphore = asyncio.Semaphore(limit)
    async with make_client(limit) as client:

        async def one(sample: SampleRequest, t0: float, due: float, bar: tqdm | None) -> RequestResult:
            delay = t0 + due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            # Latencies start when the request is sent, not when it became due: time spent waiting
            # for a concurrency slot is the client's queue, not the server's.
            async with semaphore:
                result = await send_request(client, settings, sample, t0)
            if bar is not None:
                bar.update(1)
            return result

        warm_t0 = time.perf_counter()
        warm = await asyncio.gather(*(one(s, warm_t0, 0.0, None) for s in warmups))
        due = arrival_times(len(samples), load.request_rate, load.burstiness, load.seed)
        bar = tqdm(total=len(samples), desc="requests", unit="req", disable=not load.show_progress)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(s, t0, d, bar) for s, d in zip(samples, due, strict=True)))
        duration = time.perf_counter() - t0
        bar.close()
    return list(results), duration, list(warm)
