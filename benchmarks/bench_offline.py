"""Offline throughput: llmserve's `LLM.generate` against transformers' `generate` on one seeded workload.

Both engines get exactly the same prompts (token ids, so no tokenizer differences), greedy decoding,
and a fixed number of output tokens per request (ignore_eos), at the same dtype. transformers runs the
requests in static, left-padded batches; a batch decodes until its longest request is done, and only
each request's own requested tokens are counted as useful output.

    python benchmarks/bench_offline.py                 # the full default workload, float32 and bfloat16
    python benchmarks/bench_offline.py --quick         # a smoke run of a minute or two
    python benchmarks/bench_offline.py --dtypes bfloat16 --skip-hf --json out.json

Timings exclude model loading; each engine does a short warm-up first.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import json
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Importing llmserve before torch sets its process-wide OpenMP default (a short spin, then sleep,
# unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is already set). Both engines share this process, so transformers runs under the
# same setting: the comparison is of the engines, not of OpenMP configurations.
importlib.import_module("llmserve")

import torch  # noqa: E402

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The fastest of 8, 16, 32 and 64 for transformers on the default workload (benchmarks/README.md).
DEFAULT_HF_BATCH_SIZE = 32


# ---- workload --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    output_len: int


@dataclass
class Workload:
    requests: list[Request]

    @property
    def input_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)


def make_workload(
    num: int, in_min: int, in_max: int, out_min: int, out_max: int, seed: int, vocab: range
) -> Workload:
    """Uniform random lengths and token ids from one seeded generator: the same seed gives the
    same prompts on every run and for every engine."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num):
        in_len, out_len = rng.randint(in_min, in_max), rng.randint(out_min, out_max)
        requests.append(Request([rng.choice(vocab) for _ in range(in_len)], out_len))
    return Workload(requests)


def normal_vocab(tokenizer: Any, model_vocab_size: int) -> range:
    """Token ids above every special token: SmolLM2's specials sit at the bottom of its vocab, so
    random prompts drawn from here never contain an EOS, a chat marker or a pad id."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return range(max(special) + 1, model_vocab_size)


# ---- results ---------------------------------------------------------------------------------


@dataclass
class Result:
    engine: str
    dtype: str
    wall_s: float
    cpu_s: float  # this process's CPU time over the run; cpu_s / (wall_s * threads) < 1: contention
    num_requests: int
    input_tokens: int
    output_tokens: int  # useful: what the requests asked for
    forward_passes: int  # model forwards, each one reading every weight once
    generated_tokens: int  # everything the engine decoded, padding and overrun included
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.wall_s

    @property
    def output_tok_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def total_tok_per_s(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.wall_s


# ---- llmserve --------------------------------------------------------------------------------


def run_llmserve(
    workload: Workload, warmup: Workload, dtype: str, engine_args: dict[str, Any]
) -> tuple[Result, list[list[int]]]:
    from llmserve import LLM, SamplingParams

    llm = LLM(dtype=dtype, **engine_args)

    def params(w: Workload) -> list[SamplingParams]:
        return [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in w.requests]

    llm.generate([r.prompt for r in warmup.requests], params(warmup))
    # Count forward passes by wrapping the engine's step on the instance, for the roofline figures.
    steps = [0]
    engine_step = llm.engine.step

    def counting_step() -> Any:
        steps[0] += 1
        return engine_step()

    llm.engine.step = counting_step  # type: ignore[method-assign]
    before = llm.engine.stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    results = llm.generate([r.prompt for r in workload.requests], params(workload))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    after = llm.engine.stats()

    outputs = [res.outputs[0].token_ids for res in results]
    for req, out in zip(workload.requests, outputs, strict=True):
        if len(out) != req.output_len:
            raise RuntimeError(f"llmserve returned {len(out)} tokens for a request of {req.output_len}")
    result = Result(
        engine="llmserve", dtype=dtype, wall_s=wall, cpu_s=cpu, num_requests=len(workload.requests),
        input_tokens=workload.input_tokens, output_tokens=workload.output_tokens,
        forward_passes=steps[0], generated_tokens=sum(map(len, outputs)),
        extra={
            "preemptions": after.num_preemptions - before.num_preemptions,
            "prefix_cache_hit_tokens": after.prefix_cache_hits - before.prefix_cache_hits,
            "num_kv_blocks": after.num_blocks,
            "engine_args": engine_args,
        },
    )  # fmt: skip
    del llm
    gc.collect()
    return result, outputs


# ---- transformers ----------------------------------------------------------------------------


def hf_batches(workload: Workload, batch_size: int, order: str) -> list[list[int]]:
    """Request indices per static batch. Sorting puts similar lengths together, which cuts the
    padding (by input length) or the decode overrun (by output length) that a static batch pays."""
    idx = list(range(len(workload.requests)))
    if order == "input":
        idx.sort(key=lambda i: len(workload.requests[i].prompt), reverse=True)
    elif order == "output":
        idx.sort(key=lambda i: workload.requests[i].output_len, reverse=True)
    return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]


def hf_generate_batch(model: Any, requests: list[Request], pad_id: int) -> tuple[list[list[int]], int]:
    """One static batch, left-padded; returns each request's own output tokens and the batch's
    decode length (the longest output asked for: every row decodes that many)."""
    width = max(len(r.prompt) for r in requests)
    new_tokens = max(r.output_len for r in requests)
    input_ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for row, r in enumerate(requests):
        input_ids[row, width - len(r.prompt) :] = torch.tensor(r.prompt)
        mask[row, width - len(r.prompt) :] = 1
    # min_new_tokens == max_new_tokens masks EOS at every step: the equivalent of ignore_eos.
    out = model.generate(
        input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, pad_token_id=pad_id,
    )  # fmt: skip
    gen = out[:, width:]
    if gen.shape[1] != new_tokens:
        raise RuntimeError(f"transformers generated {gen.shape[1]} tokens, expected {new_tokens}")
    return [gen[row, : r.output_len].tolist() for row, r in enumerate(requests)], new_tokens


def run_hf(
    model_path: Path,
    workload: Workload,
    warmup: Workload,
    dtype: str,
    batch_size: int,
    order: str,
    pad_id: int,
) -> tuple[Result, list[list[int]]]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar would clutter the report
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_DTYPES[dtype], local_files_only=True)
    model.eval()
    # The folder's generation_config may carry sampling defaults; greedy is set per call, but clear
    # them so transformers does not warn about unused sampling flags on every batch.
    model.generation_config.temperature = None
    model.generation_config.top_p = None
    model.generation_config.top_k = None

    with torch.inference_mode():
        hf_generate_batch(model, warmup.requests[:batch_size], pad_id)
        outputs: list[list[int] | None] = [None] * len(workload.requests)
        passes = generated = 0
        start, cpu_start = time.perf_counter(), time.process_time()
        for batch in hf_batches(workload, batch_size, order):
            outs, new_tokens = hf_generate_batch(model, [workload.requests[i] for i in batch], pad_id)
            for i, out in zip(batch, outs, strict=True):
                outputs[i] = out
            passes += new_tokens  # one prefill forward, then new_tokens - 1 decode forwards
            generated += new_tokens * len(batch)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start

    result = Result(
        engine="transformers", dtype=dtype, wall_s=wall, cpu_s=cpu, num_requests=len(workload.requests),
        input_tokens=workload.input_tokens, output_tokens=workload.output_tokens,
        forward_passes=passes, generated_tokens=generated,
        extra={"batch_size": batch_size, "order": order,
               "attn_implementation": getattr(model.config, "_attn_implementation", None)},
    )  # fmt: skip
    del model
    gc.collect()
    return result, [o or [] for o in outputs]


# ---- roofline --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSize:
    params: int  # unique parameters (the tied lm_head counted once)
    embed_params: int  # the embedding matrix, also the lm_head when tied

    def weight_bytes(self, dtype: str) -> int:
        return self.params * torch.empty((), dtype=_DTYPES[dtype]).element_size()

    def flops(self, input_tokens: int, output_tokens: int) -> float:
        """Matmul FLOPs of the useful work: every token goes through the body; only sampled
        positions (one per output token) go through the lm_head. Attention scores are left out,
        and they are small next to the weights at these lengths."""
        body = self.params - self.embed_params
        return 2.0 * body * (input_tokens + output_tokens) + 2.0 * self.embed_params * output_tokens


def model_size(hf_config: Any) -> ModelSize:
    h, inter, layers = hf_config.hidden_size, hf_config.intermediate_size, hf_config.num_hidden_layers
    head_dim = getattr(hf_config, "head_dim", None) or h // hf_config.num_attention_heads
    q = hf_config.num_attention_heads * head_dim
    kv = hf_config.num_key_value_heads * head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter + 2 * h
    embed = hf_config.vocab_size * h
    lm_head = 0 if hf_config.tie_word_embeddings else embed
    return ModelSize(params=layers * per_layer + embed + lm_head + h, embed_params=embed)


def probe_machine(dtype: str) -> dict[str, float]:
    """What this machine can do at best, for scale: streaming read bandwidth over a buffer far
    larger than cache, and a large square matmul's FLOP/s at `dtype`."""
    x = torch.ones(2**28, dtype=torch.float32)  # 1 GiB: larger than any cache a VM may report
    x.sum()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    read_gbs = x.numel() * 4 / best / 1e9
    del x
    n = 2048
    a = torch.randn(n, n, dtype=_DTYPES[dtype])
    b = torch.randn(n, n, dtype=_DTYPES[dtype])
    a @ b
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return {"read_gb_per_s": read_gbs, "matmul_gflop_per_s": 2 * n**3 / best / 1e9}


# ---- reporting -------------------------------------------------------------------------------


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def git_commit() -> str:
    """HEAD, marked when the engine's sources differ from it: then HEAD alone does not say what ran."""
    root = Path(__file__).resolve().parent.parent

    def git(*cmd: str) -> str:
        return subprocess.run(
            ["git", *cmd], capture_output=True, text=True, check=True, cwd=root
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "llmserve", "kernels")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit} + uncommitted changes to llmserve/ or kernels/" if dirty else commit


def machine_info() -> dict[str, Any]:
    import transformers

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": git_commit(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "unset"),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def print_table(results: list[Result]) -> None:
    base = next((r for r in results if r.engine == "transformers"), None)
    # "cpu use" is this process's CPU time over wall time x threads. Under 100% means cores sat idle
    # for it: single-threaded stretches (Python, with OpenMP workers asleep), or other processes
    # holding the cores; a worker spinning between parallel regions counts as busy. With one thread
    # it reads ~100% unless another process took the core.
    threads = torch.get_num_threads()
    print(f"  {'engine':<13}{'wall s':>9}{'cpu use':>9}{'req/s':>8}{'out tok/s':>11}{'total tok/s':>13}"
          f"{'vs transformers':>17}")  # fmt: skip
    for r in results:
        ratio = f"{r.output_tok_per_s / base.output_tok_per_s:.2f}x" if base else "-"
        use = f"{100 * r.cpu_s / (r.wall_s * threads):.0f}%"
        print(
            f"  {r.engine:<13}{r.wall_s:>9.1f}{use:>9}{r.requests_per_s:>8.2f}{r.output_tok_per_s:>11.1f}"
            f"{r.total_tok_per_s:>13.1f}{ratio:>17}"
        )


def print_roofline(
    results: list[Result], size: ModelSize, dtype: str, probe: dict[str, float] | None
) -> None:
    wbytes = size.weight_bytes(dtype)
    print(f"  roofline: {size.params / 1e6:.1f}M params x {wbytes // size.params} B = {wbytes / 1e6:.0f} MB "
          "of weights read per forward pass")  # fmt: skip
    if probe:
        print(f"  machine (probed): {probe['read_gb_per_s']:.1f} GB/s streaming read, "
              f"{probe['matmul_gflop_per_s']:.3g} GFLOP/s {dtype} 2048^3 matmul")  # fmt: skip
    flops = size.flops(results[0].input_tokens, results[0].output_tokens) if results else 0.0
    print(f"  useful work: {flops / 1e12:.2f} TFLOP (2 x {(size.params - size.embed_params) / 1e6:.0f}M body "
          f"params x all tokens + 2 x {size.embed_params / 1e6:.0f}M lm_head params x output tokens)")  # fmt: skip
    for r in results:
        gbs = r.forward_passes * wbytes / r.wall_s / 1e9
        gflops = flops / r.wall_s / 1e9
        line = (f"    {r.engine:<13}{r.forward_passes:>6} forwards -> {gbs:6.1f} GB/s of weights, "
                f"{gflops:6.1f} GFLOP/s useful")  # fmt: skip
        if probe:
            line += (f"  ({100 * gbs / probe['read_gb_per_s']:.0f}% / "
                     f"{100 * gflops / probe['matmul_gflop_per_s']:.0f}% of probed)")  # fmt: skip
        print(line)
    if probe:
        # A loose floor: the useful FLOPs at the probed matmul rate, or the weight reads of the
        # fewest forwards any engine here needed at the probed bandwidth, whichever is longer.
        passes = min(r.forward_passes for r in results)
        floor = max(
            flops / (probe["matmul_gflop_per_s"] * 1e9), passes * wbytes / (probe["read_gb_per_s"] * 1e9)
        )
        print(f"  floor at the probed limits: {floor:.1f} s for this workload")


def agreement(a: list[list[int]], b: list[list[int]], prefix: int = 16) -> int:
    """Requests whose first `prefix` greedy tokens match: a check that both engines did the same
    computation (later tokens may legitimately diverge on rounding near-ties)."""
    return sum(x[:prefix] == y[:prefix] for x, y in zip(a, b, strict=True))


# ---- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len-min", type=int, default=64)
    p.add_argument("--input-len-max", type=int, default=512)
    p.add_argument("--output-len-min", type=int, default=64)
    p.add_argument("--output-len-max", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtypes", nargs="+", choices=sorted(_DTYPES), default=["float32", "bfloat16"])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 16 prompts, inputs 32-128, outputs 16-64 (overrides the length flags)",
    )
    p.add_argument("--model", default=None, help="llmserve model name or path (default: the built-in model)")
    p.add_argument(
        "--hf-batch-size",
        type=int,
        default=DEFAULT_HF_BATCH_SIZE,
        help="static batch size for transformers generate",
    )
    p.add_argument(
        "--hf-order",
        choices=["input", "output", "none"],
        default="input",
        help="how requests are grouped into transformers batches: sorted by input length "
        "(least padding), by output length (least decode overrun), or as generated",
    )
    p.add_argument("--max-num-seqs", type=int, default=None, help="llmserve (default: the engine's)")
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="llmserve (default: the engine's)"
    )
    p.add_argument(
        "--kv-cache-memory-gb",
        type=float,
        default=None,
        help="llmserve KV pool (default: enough for the whole workload at once, as "
        "transformers' growing cache effectively has, so no run is preempted)",
    )
    p.add_argument("--num-threads", type=int, default=None, help="torch threads for both engines")
    p.add_argument("--skip-hf", action="store_true", help="run llmserve only")
    p.add_argument("--skip-llmserve", action="store_true", help="run transformers only (to tune its batch)")
    p.add_argument("--skip-probe", action="store_true", help="skip the bandwidth / matmul probe")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.num_prompts = min(args.num_prompts, 16)
        args.input_len_min, args.input_len_max = 32, 128
        args.output_len_min, args.output_len_max = 16, 64
    if not (
        1 <= args.input_len_min <= args.input_len_max and 1 <= args.output_len_min <= args.output_len_max
    ):
        p.error("length ranges must satisfy 1 <= min <= max")
    return args


def kv_gb_for(workload: Workload, hf_config: Any, dtype: str, block_size: int = 16) -> float:
    """Bytes of K and V for every request at full length at once, rounded up to whole blocks, plus
    a little headroom for the warm-up's blocks still held by the prefix cache."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    per_token = 2 * hf_config.num_hidden_layers * hf_config.num_key_value_heads * head_dim
    per_token *= torch.empty((), dtype=_DTYPES[dtype]).element_size()
    blocks = sum(-(-(len(r.prompt) + r.output_len) // block_size) for r in workload.requests)
    return round(1.1 * blocks * block_size * per_token / 2**30 + 0.05, 2)


@dataclass
class Setup:
    """Everything both engines share for one benchmark invocation."""

    model_path: Path
    model_name: str
    hf_config: Any
    vocab: range
    pad_id: int
    size: ModelSize
    workload: Workload
    warmup: Workload


def prepare(args: argparse.Namespace) -> Setup:
    from transformers import AutoConfig, AutoTokenizer

    from llmserve.model_loader import resolve_model

    files = resolve_model(args.model)
    hf_config = AutoConfig.from_pretrained(files.path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(files.path, local_files_only=True)
    vocab = normal_vocab(tokenizer, hf_config.vocab_size)
    workload = make_workload(
        args.num_prompts, args.input_len_min, args.input_len_max, args.output_len_min, args.output_len_max,
        args.seed, vocab,
    )  # fmt: skip
    # Another seed: warm-up prompts must not seed llmserve's prefix cache for the measured run.
    warmup = make_workload(max(4, min(args.hf_batch_size, 8)), 16, 64, 8, 8, args.seed + 1_000_003, vocab)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else hf_config.eos_token_id
    return Setup(files.path, files.name, hf_config, vocab, pad_id, model_size(hf_config), workload, warmup)


def print_config(args: argparse.Namespace, setup: Setup, info: dict[str, Any]) -> None:
    w = setup.workload
    print("== offline throughput benchmark ==")
    for k, v in info.items():
        print(f"  {k}: {v}")
    print(f"  model: {setup.model_name} ({setup.model_path}), {setup.size.params / 1e6:.1f}M params")
    print(f"  workload: {args.num_prompts} prompts, seed {args.seed}, inputs {args.input_len_min}-"
          f"{args.input_len_max} (total {w.input_tokens}), outputs {args.output_len_min}-"
          f"{args.output_len_max} (total {w.output_tokens}), greedy, ignore_eos, random token ids "
          f"from [{setup.vocab.start}, {setup.vocab.stop})")  # fmt: skip
    print(f"  transformers: static batches of {args.hf_batch_size}, left-padded, ordered by "
          f"{args.hf_order}; each batch decodes its longest request's length, and only each request's "
          "own tokens count as output (the rest is waste a static batch pays)")  # fmt: skip


def run_dtype(args: argparse.Namespace, setup: Setup, dtype: str) -> dict[str, Any]:
    """Both engines at one dtype: print the table and the roofline, return the JSON record."""
    engine_args: dict[str, Any] = {
        "model": args.model,
        "kv_cache_memory_gb": args.kv_cache_memory_gb or kv_gb_for(setup.workload, setup.hf_config, dtype),
    }
    for name in ("max_num_seqs", "max_num_batched_tokens", "num_threads"):
        if getattr(args, name) is not None:
            engine_args[name] = getattr(args, name)
    print(f"\n-- {dtype} --")
    results: list[Result] = []
    ours = theirs = None
    if not args.skip_llmserve:
        ours, our_tokens = run_llmserve(setup.workload, setup.warmup, dtype, engine_args)
        print(f"  llmserve done in {ours.wall_s:.1f} s ({ours.extra['preemptions']} preemptions, "
              f"{ours.extra['prefix_cache_hit_tokens']} prefix-cache hit tokens)")  # fmt: skip
        results.append(ours)
    if not args.skip_hf:
        theirs, their_tokens = run_hf(
            setup.model_path, setup.workload, setup.warmup, dtype, args.hf_batch_size, args.hf_order, setup.pad_id
        )  # fmt: skip
        waste = theirs.generated_tokens - theirs.output_tokens
        print(f"  transformers done in {theirs.wall_s:.1f} s ({waste} of {theirs.generated_tokens} "
              "decoded tokens were static-batch overrun, not counted)")  # fmt: skip
        if ours is not None:
            print(f"  greedy agreement: {agreement(our_tokens, their_tokens)}/{len(setup.workload.requests)} "
                  "requests identical over their first 16 tokens")  # fmt: skip
        results.append(theirs)
    print()
    print_table(results)
    probe = None if args.skip_probe else probe_machine(dtype)
    print_roofline(results, setup.size, dtype, probe)
    record: dict[str, Any] = {
        "results": [dataclasses.asdict(r) | {
            "requests_per_s": r.requests_per_s, "output_tok_per_s": r.output_tok_per_s,
            "total_tok_per_s": r.total_tok_per_s} for r in results],
        "probe": probe,
    }  # fmt: skip
    if ours is not None and theirs is not None:
        record["ratio"] = ours.output_tok_per_s / theirs.output_tok_per_s
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    setup = prepare(args)
    info = machine_info()
    info["load_average_start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print_config(args, setup, info)
    report: dict[str, Any] = {
        "machine": info,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": {dtype: run_dtype(args, setup, dtype) for dtype in args.dtypes},
    }
    # Other processes can take cores mid-run; the load average at both ends shows whether they did.
    report["machine"]["load_average_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n  load average at end: {report['machine']['load_average_end']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"  results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
