"""Online serving benchmark against any OpenAI-compatible server: streamed requests from a seeded
dataset, sent at a Poisson (or gamma) rate under an optional concurrency cap, measured chunk by chunk.
Metric names and definitions follow vLLM's `bench serve` (see serving/metrics.py).

    python benchmarks/bench_serving.py --base-url http://127.0.0.1:8000 --num-prompts 64 \\
        --max-concurrency 16 --random-input-len 256 --random-output-len 128 --ignore-eos
    python benchmarks/bench_serving.py --dataset prefix --prefix-len 512 --num-prefix-groups 4
    python benchmarks/bench_serving.py --dataset chat --request-rate 2 --goodput ttft:1000 tpot:100

Requests always stream with `stream_options.include_usage`; output token counts are the server's
`usage`, cross-checked by re-tokenizing the streamed text (with the served model's tokenizer when it
is found locally, else tiktoken's cl100k_base). Only loopback or other servers you name are contacted;
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

# Runnable from a checkout: the `serving` package sits next to this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving.client import ENDPOINTS, RequestResult, RequestSettings, first_model
from serving.datasets import DATASETS, DatasetConfig, sample_requests
from serving.metrics import LATENCY_METRICS, PERCENTILES, parse_goodput, summarize
from serving.runner import LoadConfig, run_load
from serving.tokenizer import load_counter

# Warm-up prompts come from another seed, so they cannot warm the prefix cache for the measured ones.
WARMUP_SEED_OFFSET = 1_000_003
ERRORS_SHOWN = 5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    server = p.add_argument_group("server")
    server.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, without /v1")
    server.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="chat")
    server.add_argument("--model", help="model id to request (default: the first of GET /v1/models)")
    server.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    server.add_argument(
        "--tokenizer",
        help="local tokenizer folder of the served model (default: found from --model, else cl100k_base)",
    )
    data = p.add_argument_group("dataset (generated offline from --seed)")
    data.add_argument("--dataset", choices=sorted(DATASETS), default="random")
    data.add_argument("--num-prompts", type=int, default=100)
    data.add_argument(
        "--random-input-len", type=int, default=256, help="prompt tokens (the suffix for prefix)"
    )
    data.add_argument("--random-output-len", type=int, default=128, help="max_tokens of each request")
    data.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in len*(1 +- r)")
    data.add_argument("--prefix-len", type=int, default=256, help="prefix dataset: shared prefix tokens")
    data.add_argument("--num-prefix-groups", type=int, default=4, help="prefix dataset: distinct prefixes")
    data.add_argument(
        "--chat-max-turns", type=int, default=4, help="chat dataset: earlier exchanges, at most"
    )
    load = p.add_argument_group("load")
    load.add_argument(
        "--request-rate", type=float, default=math.inf, help="requests/s (default inf: all at once)"
    )
    load.add_argument(
        "--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps; 1.0 = Poisson"
    )
    load.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    load.add_argument("--num-warmups", type=int, default=1, help="unmeasured requests sent first")
    load.add_argument("--seed", type=int, default=0)
    sampling = p.add_argument_group("sampling")
    sampling.add_argument(
        "--ignore-eos", action="store_true", help="send vLLM's ignore_eos: exact output lengths"
    )
    sampling.add_argument("--temperature", type=float, default=0.0)
    sampling.add_argument(
        "--extra-body", type=json.loads, default={}, help="JSON object merged into every request body"
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--goodput", nargs="+", default=[], metavar="NAME:MS", help="SLOs: ttft:MS tpot:MS e2el:MS"
    )
    out.add_argument("--save-result", type=Path, help="write config, metrics and per-request arrays as JSON")
    out.add_argument("--disable-tqdm", action="store_true")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.slos = parse_goodput(args.goodput)
    except ValueError as e:
        parser.error(str(e))
    if not isinstance(args.extra_body, dict):
        parser.error("--extra-body must be a JSON object")
    return args


def dataset_config(args: argparse.Namespace, num_prompts: int, seed: int) -> DatasetConfig:
    return DatasetConfig(
        name=args.dataset, num_prompts=num_prompts, seed=seed, input_len=args.random_input_len,
        output_len=args.random_output_len, range_ratio=args.random_range_ratio, prefix_len=args.prefix_len,
        num_prefix_groups=args.num_prefix_groups, chat_max_turns=args.chat_max_turns,
    )  # fmt: skip


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run one benchmark; return (and with --save-result write) its record."""
    model = args.model or asyncio.run(first_model(args.base_url, args.api_key))
    counter = load_counter(args.tokenizer, model)
    samples = sample_requests(dataset_config(args, args.num_prompts, args.seed), counter)
    warmups = (
        sample_requests(dataset_config(args, args.num_warmups, args.seed + WARMUP_SEED_OFFSET), counter)
        if args.num_warmups > 0
        else []
    )
    settings = RequestSettings(
        base_url=args.base_url, model=model, endpoint=args.endpoint, api_key=args.api_key,
        temperature=args.temperature, ignore_eos=args.ignore_eos, extra_body=args.extra_body,
    )  # fmt: skip
    load = LoadConfig(
        args.request_rate, args.burstiness, args.max_concurrency, args.seed, not args.disable_tqdm
    )
    config = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "base_url": args.base_url, "endpoint": args.endpoint, "model": model, "tokenizer": counter.name,
        "dataset": vars(dataset_config(args, args.num_prompts, args.seed)),
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,  # JSON has no inf
        "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
        "num_warmups": args.num_warmups, "ignore_eos": args.ignore_eos, "temperature": args.temperature,
        "extra_body": args.extra_body, "goodput_slos_ms": args.slos, "load_average_start": os.getloadavg(),
    }  # fmt: skip
    print_config(config, samples)

    results, duration, warm = asyncio.run(run_load(settings, samples, warmups, load))
    config["load_average_end"] = os.getloadavg()
    warm_failed = [w.error for w in warm if not w.success]
    if warm_failed:
        print(f"  {len(warm_failed)} of {len(warm)} warm-up requests failed; first: {warm_failed[0]}")
    for r in results:
        if r.success:
            r.retokenized_output_len = counter.count(r.text)
    summary = summarize(results, duration, args.slos)
    print_summary(summary, results, counter.exact, args.slos)
    record = {"config": config, "metrics": summary, "requests": per_request(results)}
    if args.save_result:
        args.save_result.parent.mkdir(parents=True, exist_ok=True)
        args.save_result.write_text(json.dumps(record, indent=1) + "\n")
        print(f"  results written to {args.save_result}")
    return record


def per_request(results: list[RequestResult]) -> dict[str, list[Any]]:
    """Per-request arrays, in the dataset's order; times in seconds."""
    return {
        "success": [r.success for r in results],
        "errors": [r.error for r in results],
        "input_lens": [r.input_len for r in results],
        "prompt_lens": [r.prompt_len for r in results],
        "requested_output_lens": [r.requested_output_len for r in results],
        "output_lens": [r.output_len if r.success else 0 for r in results],
        "usage_output_lens": [r.usage_completion_tokens for r in results],
        "retokenized_output_lens": [r.retokenized_output_len for r in results],
        "output_chunks": [r.chunks for r in results],
        "finish_reasons": [r.finish_reason for r in results],
        "start_times": [r.start_time for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "e2els": [r.e2el for r in results],
        "generated_texts": [r.text for r in results],
    }


def print_config(config: dict[str, Any], samples: list[Any]) -> None:
    d = config["dataset"]
    prompt_tokens = sum(s.prompt_len for s in samples)
    output_tokens = sum(s.output_len for s in samples)
    print("== online serving benchmark ==")
    print(f"  server: {config['base_url']} ({config['endpoint']}), model {config['model']}")
    print(f"  token counter: {config['tokenizer']}")
    print(f"  dataset: {d['name']}, {d['num_prompts']} prompts, seed {d['seed']}: {prompt_tokens} prompt tokens, "
          f"{output_tokens} max_tokens in all")  # fmt: skip
    rate = "inf (all at once)" if config["request_rate"] == "inf" else f"{config['request_rate']} req/s"
    print(f"  load: rate {rate}, burstiness {config['burstiness']}, max concurrency "
          f"{config['max_concurrency'] or 'unlimited'}, {config['num_warmups']} warm-up(s)")  # fmt: skip
    print(f"  sampling: temperature {config['temperature']}, ignore_eos {config['ignore_eos']}"
          + (f", extra body {json.dumps(config['extra_body'])}" if config["extra_body"] else ""))  # fmt: skip
    print(f"  load average at start: {' '.join(f'{x:.2f}' for x in config['load_average_start'])}")


def print_summary(
    s: dict[str, Any], results: list[RequestResult], exact: bool, slos: dict[str, float]
) -> None:
    def row(label: str, value: Any, fmt: str = ".2f") -> None:
        print(f"  {label:<44}{value:>14{fmt}}" if value is not None else f"  {label:<44}{'-':>14}")

    print("-- results --")
    row("Successful requests:", s["completed"], "d")
    row("Failed requests:", s["failed"], "d")
    row("Benchmark duration (s):", s["duration"])
    row("Total input tokens:", s["total_input_tokens"], "d")
    row("Total generated tokens:", s["total_output_tokens"], "d")
    row("Request throughput (req/s):", s["request_throughput"])
    if slos:
        row("Request goodput (req/s):", s["request_goodput"])
        print(f"    (requests meeting {', '.join(f'{k.upper()} <= {v:g} ms' for k, v in slos.items())})")
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    row("Peak output token throughput (tok/s):", s["max_output_tokens_per_s"])
    row("Peak concurrent requests (1-s buckets):", s["max_concurrent_requests"], "d")
    row("Peak in-flight requests (exact):", s["peak_concurrency"], "d")
    row("Mean in-flight requests:", s["mean_concurrency"])
    for name, title in zip(LATENCY_METRICS, ("Time to First Token", "Time per Output Token (excl. 1st token)",
                                            "Inter-token Latency", "End-to-end Latency"), strict=True):  # fmt: skip
        print(f"  {title} ({name.upper()}, ms): mean {s[f'mean_{name}_ms']:.2f}, median "
              f"{s[f'median_{name}_ms']:.2f}, " + ", ".join(f"p{q} {s[f'p{q}_{name}_ms']:.2f}" for q in PERCENTILES)
              + f", max {s[f'max_{name}_ms']:.2f}")  # fmt: skip
    kind = "the served model's tokenizer" if exact else "cl100k_base, an approximation"
    if s["requests_with_usage"] < s["completed"]:
        print(f"  usage was missing on {s['completed'] - s['requests_with_usage']} requests: their output "
              f"lengths are re-tokenized counts ({kind})")  # fmt: skip
    if s["usage_vs_retokenized_token_diff_pct"] is not None:
        print(f"  usage vs re-tokenized text ({kind}): {s['total_output_tokens']} vs "
              f"{s['retokenized_output_tokens']} tokens ({s['usage_vs_retokenized_token_diff_pct']:+.1f}%), "
              f"{s['usage_vs_retokenized_requests_differing']} of {s['requests_with_usage']} requests differ")  # fmt: skip
    errors = [r.error for r in results if not r.success]
    for error in errors[:ERRORS_SHOWN]:
        print(f"  error: {error}")
    if len(errors) > ERRORS_SHOWN:
        print(f"  ... and {len(errors) - ERRORS_SHOWN} more failed requests")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        record = run_benchmark(args)
    except (OSError, RuntimeError) as e:  # no server, no /v1/models, no tokenizer: say so, no traceback
        print(f"bench_serving: {e}", file=sys.stderr)
        return 2
    return 0 if record["metrics"]["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
