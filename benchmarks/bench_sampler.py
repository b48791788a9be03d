"""The sampler's time per step on CPU, for a batch of logit rows the size of the built-in model's
vocabulary, in the same process: as the engine runs it on CPU (the C++ argmax and the fused C++
pass for random rows, kernels/csrc/sampler_cpu.cpp), with the C++ argmax and top_p threshold under
the torch filters (before the fused pass), and the pure torch reference (a sort of every row for
top_p).

    python benchmarks/bench_sampler.py                  # 1 and 64 rows, greedy / temperature / top_p / top_k
    python benchmarks/bench_sampler.py --rows 16 --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmserve.request import Request
from llmserve.sampler import Sampler
from llmserve.sampling_params import SamplingParams
from llmserve_kernels import cpu_ops

SETTINGS = {
    "greedy": {"temperature": 0.0},
    "temperature 1.0": {"temperature": 1.0},
    "temperature 0.7, top_p 0.9": {"temperature": 0.7, "top_p": 0.9},
    "top_k 50, top_p 0.95": {"temperature": 0.7, "top_k": 50, "top_p": 0.95},
}


def time_sampler(sampler: Sampler, logits: torch.Tensor, params: dict[str, float], repeats: int) -> float:
    """Median ms of one `sample` call over `repeats`, after two warm-ups."""
    requests = [
        Request(request_id=f"r{i}", prompt_token_ids=[1, 2, 3], sampling_params=SamplingParams(**params))  # type: ignore[arg-type]
        for i in range(logits.shape[0])
    ]
    for _ in range(2):
        sampler.sample(logits, requests)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sampler.sample(logits, requests)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 64], help="logit rows per step (streams)")
    p.add_argument("--vocab", type=int, default=49152, help="the built-in model's vocabulary")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    ops, fused = cpu_ops.load_layer_ops(), cpu_ops.load_sampler()
    if ops is None or fused is None:
        raise SystemExit("the C++ layer ops or sampler could not be built here (see the log)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, vocab {args.vocab}, bf16 logits")
    print("| rows | setting | fused pass (engine), ms | C++ threshold + torch filters, ms | torch reference, ms |")
    print("|---:|---|---:|---:|---:|")
    for rows in args.rows:
        logits = (torch.randn(rows, args.vocab, generator=torch.Generator().manual_seed(rows)) * 3).bfloat16()
        for name, params in SETTINGS.items():
            engine = Sampler(args.vocab, argmax=ops.argmax_rows, sample_rows=fused.sample_rows)
            helpers = Sampler(args.vocab, argmax=ops.argmax_rows, top_p_cut=ops.top_p_cut)
            times = [time_sampler(s, logits, params, args.repeats) for s in (engine, helpers, Sampler(args.vocab))]
            print(f"| {rows} | {name} | " + " | ".join(f"{t:.2f}" for t in times) + " |", flush=True)


if __name__ == "__main__":
    main()
