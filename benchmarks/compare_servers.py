"""llmserve, `transformers serve --continuous-batching` and llama.cpp's `llama-server` side by side: the
same model (the built-in SmolLM2-135M-Instruct), the same seeded workload, the same client
(bench_serving.py), at several concurrencies. One server runs at a time: each is stopped before the
next starts, so none shares the cores with another.

    python benchmarks/compare_servers.py                               # 1, 16, 64 concurrent; 128-token answers
    python benchmarks/compare_servers.py --concurrencies 1 4 --output-len 32 --servers llmserve transformers
    python benchmarks/compare_servers.py --llama-server ~/llama.cpp/build/bin/llama-server

Prints one table (server x concurrency), writes runs.json (every run: config, metrics, per-request
arrays) and throughput.png / latency.png to --out-dir. Nothing is downloaded: transformers loads the
folder llmserve converted the built-in GGUF into, and llama-server the GGUF itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_serving and the serving package

import bench_serving
from serving.launchers import (
    RunningServer,
    ServerSpec,
    find_llama_server,
    llama_spec,
    llmserve_spec,
    transformers_spec,
)
from serving.plots import plot_latency, plot_throughput
from serving.roofline import Ceilings, print_roofline, weight_bytes

SERVERS = ("llmserve", "transformers", "llama.cpp")
# Room a llama-server slot needs beyond the prompt and answer: the chat template's own tokens.
CHAT_TEMPLATE_MARGIN = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    p.add_argument("--concurrencies", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument(
        "--prompts-per-concurrency", type=int, default=4, help="requests per run = this x concurrency"
    )
    p.add_argument("--min-prompts", type=int, default=16, help="... but at least this many")
    p.add_argument("--dataset", choices=("random", "prefix", "chat"), default="random")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.0)
    p.add_argument("--num-warmups", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        default="bfloat16",
        help="llmserve's and transformers' dtype (bfloat16: fastest with AVX-512 BF16 or AMX; "
        "float32 on an AVX2-only CPU)",
    )
    p.add_argument("--llama-server", help="llama-server binary (default: from PATH)")
    p.add_argument("--llama-threads", type=int, default=2)
    p.add_argument("--llmserve-args", default="", help="extra flags for llmserve serve, one string")
    p.add_argument("--transformers-args", default="", help="extra flags for transformers serve, one string")
    p.add_argument("--out-dir", type=Path, default=None, help="default: ./compare-servers-<UTC time>")
    p.add_argument("--disable-tqdm", action="store_true")
    args = p.parse_args(argv)
    if min(args.concurrencies) < 1:
        p.error("--concurrencies must be >= 1")
    if args.out_dir is None:
        args.out_dir = Path(f"compare-servers-{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}")
    return args


def built_in_model() -> tuple[Path, Path]:
    """(the converted HF folder llmserve caches, the GGUF it came from); converts on a first run."""
    from llmserve.model_loader import builtin_gguf_path, resolve_model

    return resolve_model(None).path, builtin_gguf_path()


def server_specs(
    args: argparse.Namespace, model_dir: Path, gguf: Path
) -> tuple[list[ServerSpec], dict[str, str]]:
    """The servers to run on the built-in model (its converted folder and its GGUF), and for each
    one left out, why."""
    slot, parallel = slot_tokens(args), max(args.concurrencies)
    specs, skipped = [], {}
    for name in args.servers:
        if name == "llmserve":
            specs.append(llmserve_spec(args.dtype, shlex.split(args.llmserve_args)))
        elif name == "transformers":
            extra = shlex.split(args.transformers_args)
            specs.append(transformers_spec(model_dir, args.dtype, parallel, slot, extra))
        else:
            binary, why = find_llama_server(args.llama_server)
            if binary is None:
                skipped[name] = why
                continue
            specs.append(llama_spec(binary, gguf, args.llama_threads, parallel, slot))
    return specs, skipped


def slot_tokens(args: argparse.Namespace) -> int:
    """The most tokens one request can hold: its longest prompt and answer, and the chat template."""
    longest = round((args.input_len + args.output_len) * (1 + args.range_ratio)) + CHAT_TEMPLATE_MARGIN
    if args.dataset == "prefix":
        longest += 256  # bench_serving's default --prefix-len
    elif args.dataset == "chat":
        longest += 512  # a templated conversation of up to 4 earlier turns
    return longest


def num_prompts(args: argparse.Namespace, concurrency: int) -> int:
    return max(args.min_prompts, args.prompts_per_concurrency * concurrency)


def bench_argv(args: argparse.Namespace, spec: ServerSpec, url: str, concurrency: int) -> list[str]:
    """bench_serving's command line for one run. Each concurrency gets its own seed, the same for
    every server: the same prompts everywhere, and no run can reuse another run's prefix cache."""
    argv = [
        "--base-url", url, "--endpoint", "chat", "--dataset", args.dataset,
        "--num-prompts", str(num_prompts(args, concurrency)), "--max-concurrency", str(concurrency),
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--random-range-ratio", str(args.range_ratio), "--num-warmups", str(args.num_warmups),
        "--seed", str(args.seed + concurrency), "--temperature", "0",
    ]  # fmt: skip
    if spec.model:
        argv += ["--model", spec.model]
    if spec.ignore_eos_field:
        argv.append("--ignore-eos")
    if spec.extra_body:
        argv += ["--extra-body", json.dumps(spec.extra_body)]
    if args.disable_tqdm:
        argv.append("--disable-tqdm")
    return argv


def run_server(args: argparse.Namespace, spec: ServerSpec) -> list[dict[str, Any]]:
    print(f"\n==== {spec.name}: {spec.description}")
    print(f"  command: {shlex.join(spec.command)}")
    server = RunningServer(spec, args.out_dir / f"{spec.name}.log")
    runs: list[dict[str, Any]] = []
    try:
        server.wait_ready()
        for concurrency in args.concurrencies:
            print(f"\n---- {spec.name}, concurrency {concurrency}")
            record = bench_serving.run_benchmark(
                bench_serving.parse_args(bench_argv(args, spec, server.url, concurrency))
            )
            runs.append({"server": spec.name, "concurrency": concurrency, **record})
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"  {spec.name} failed: {e}")
        runs.append({"server": spec.name, "error": str(e)})
    finally:
        code = server.stop()
        print(f"  {spec.name} stopped (exit code {code}); log: {server.log_path}")
    return runs


def print_table(rows: list[dict[str, Any]]) -> None:
    base = {
        r["concurrency"]: r["metrics"]["output_throughput"] for r in rows if r["server"] == "transformers"
    }
    head = ("server", "conc", "out tok/s", "vs transformers", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
            "TPOT p50", "failed")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for r in rows:
        m = r["metrics"]
        ratio = (
            f"{m['output_throughput'] / base[r['concurrency']]:.2f}x" if base.get(r["concurrency"]) else "-"
        )
        cells = [r["server"], str(r["concurrency"]), f"{m['output_throughput']:.1f}", ratio]
        cells += [f"{m[k]:.1f}" for k in ("median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms")]
        cells += [f"{m['median_tpot_ms']:.1f}", f"{m['failed']}/{m['completed'] + m['failed']}"]
        print("| " + " | ".join(cells) + " |")
    print("(latencies in ms; TTFT, ITL and TPOT as vLLM defines them: see benchmarks/serving/metrics.py)")


def machine() -> dict[str, Any]:
    import torch
    import transformers

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return {
        "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "git_commit": commit.stdout.strip() or None,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_start": os.getloadavg(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    model_dir, gguf = built_in_model()
    specs, skipped = server_specs(args, model_dir, gguf)
    print("== serving comparison ==")
    print(f"  {json.dumps(info)}")
    print(f"  workload: {args.dataset}, input {args.input_len} tokens, output {args.output_len} (ignore EOS), "
          f"range ratio {args.range_ratio}, concurrencies {args.concurrencies}, "
          f"{args.prompts_per_concurrency} x concurrency requests (at least {args.min_prompts}), greedy, chat endpoint")  # fmt: skip
    for name, why in skipped.items():
        print(f"  {name} skipped: {why}")
    # Probed before any server starts, so the ceilings are this machine's and not a busy one's.
    ceilings = Ceilings.probe(model_dir, args.dtype)
    print(f"  {ceilings.describe()}")
    extra = {"llmserve": shlex.split(args.llmserve_args), "transformers": shlex.split(args.transformers_args)}
    weights = {
        s.name: weight_bytes(s.name, args.dtype, extra.get(s.name, []), gguf, ceilings.size)
        for s in specs
    }
    runs = [run for spec in specs for run in run_server(args, spec)]
    info["load_average_end"] = os.getloadavg()
    rows = [r for r in runs if "metrics" in r]
    print()
    print_table(rows)
    roofline = print_roofline(rows, ceilings, weights) if rows else []
    report = {
        "machine": info, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "servers": {s.name: {"command": s.command, "description": s.description} for s in specs},
        "skipped": skipped, "runs": runs,
        "roofline": {"ceilings": {"read_gb_per_s": ceilings.read_gb_per_s,
                                  "matmul_gflop_per_s": ceilings.matmul_gflop_per_s, "dtype": ceilings.dtype},
                     "weight_bytes": weights, "rows": roofline},
    }  # fmt: skip
    (args.out_dir / "runs.json").write_text(json.dumps(report, indent=1) + "\n")
    if rows:
        title = f"SmolLM2-135M-Instruct, {args.input_len} in / {args.output_len} out, {os.cpu_count()} cores"
        plot_throughput(rows, title, args.out_dir / "throughput.png")
        plot_latency(rows, title, args.out_dir / "latency.png")
    print(f"  load average at end: {' '.join(f'{x:.2f}' for x in info['load_average_end'])}")
    print(f"  written to {args.out_dir}/: runs.json, throughput.png, latency.png, one log per server")
    return 0 if rows and all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
