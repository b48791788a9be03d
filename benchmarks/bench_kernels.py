"""Paged-attention kernels against the torch reference, time per call and bandwidth: the Triton kernels
on a GPU, the C++ kernels (kernels/csrc) on a CPU.

    python benchmarks/bench_kernels.py                  # on a CUDA GPU: Llama-3-8B-like heads, bf16
    python benchmarks/bench_kernels.py --dtype float16 --block-size 32
    python benchmarks/bench_kernels.py --threads 2      # on a CPU: SmolLM2-135M heads, the C++ kernels
    python benchmarks/bench_kernels.py --threads 2 --dtype bfloat16 --kv-cache-dtype int8 --layers 30
                                                        # the int8 KV cache, a whole decode step
    python benchmarks/bench_kernels.py --smoke          # tiny shapes, with Triton's interpreter on a CPU

Without a CUDA device the C++ kernels are timed against the torch path the engine would otherwise
take, at SmolLM2-135M's head shape (H=9, Hkv=3, D=64) and prefill steps of the CPU engine: one
512-token chunk, eight chunks of 62 tokens, 256 new tokens after a 256-token cached prefix. With
--smoke (tiny shapes) the Triton kernels run too, under Triton's CPU interpreter (TRITON_INTERPRET=1,
set here before triton is imported), when triton is installed: those figures only show that the
script and the kernels run and agree; interpreter timings say nothing about a GPU.

Bandwidth arithmetic. One call of each kernel needs every cached K and V row of its sequences once:

    kv_bytes = 2 (K and V) * sum(context lengths) * Hkv * D * bytes per element

(with the int8 cache, --kv-cache-dtype int8, a row is D codes + a 4-byte scale: D + 4 bytes)

and "GB/s" is kv_bytes / time per call, for both implementations. It is the useful traffic, not what
the hardware moved: the torch reference gathers each context into a contiguous copy first (it reads
K/V, writes the copy, reads it again: ~3x the bytes), so its GB/s here is what it achieves per byte of
real work, and the ratio of the two is the speed-up. Queries, outputs and block tables add
2 * B * H * D elements and B * nblk ints, under 1% of kv_bytes at these context lengths, and are left
out. Decode is memory-bound (<= 2 * g FLOP per K/V element, g query heads per KV head), so its GB/s
is the figure to hold against the GPU's HBM peak (A100 80GB: 2.0 TB/s, H100 SXM: 3.35 TB/s, H200:
4.8 TB/s). Prefill is compute-bound; its line also gives TFLOP/s:

    flops = 4 * H * D * sum over query tokens of the keys it sees (prefix + its own position + 1)

(QK^T and PV, 2 FLOP per multiply-add each), against the tensor-core peak (H100 SXM dense bf16:
~990 TFLOP/s). On a CPU the useful comparison is against the cores' FMA peak: 2 x 16 fp32 lanes x 2
FLOP per cycle per core with AVX-512 (~131 GFLOP/s a core at 2 GHz), or AMX tiles for bf16.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

# llmserve sets its OpenMP default (a short spin, then sleep) before torch loads, as the engine runs: the torch
# reference on CPU is timed as the engine would run it. Neither import loads triton, so main() can
# still set TRITON_INTERPRET.
importlib.import_module("llmserve")

import torch  # noqa: E402

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Heads:
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class DecodeShape:
    batch: int
    context: int  # every sequence's length; the blocks are scattered over the pool anyway


@dataclass(frozen=True)
class PrefillShape:
    chunks: tuple[tuple[int, int], ...]  # (cached prefix, new tokens) per sequence


GPU_HEADS = Heads(32, 8, 128)  # Llama-3-8B, Mistral-7B: g = 4
GPU_DECODE = [DecodeShape(1, 4096), DecodeShape(8, 4096), DecodeShape(32, 2048), DecodeShape(128, 1024),
              DecodeShape(256, 512)]  # fmt: skip
GPU_PREFILL = [PrefillShape(((0, 2048),)), PrefillShape(((0, 512),) * 4), PrefillShape(((1024, 512),) * 4)]
SMOKE_HEADS = Heads(4, 2, 64)
SMOKE_DECODE = [DecodeShape(2, 40), DecodeShape(4, 33)]
SMOKE_PREFILL = [PrefillShape(((0, 20),)), PrefillShape(((16, 8), (5, 11)))]
CPU_HEADS = Heads(9, 3, 64)  # SmolLM2-135M (the built-in model): g = 3
CPU_DECODE = [DecodeShape(64, 32), DecodeShape(64, 126), DecodeShape(16, 300), DecodeShape(64, 300)]
CPU_PREFILL = [PrefillShape(((0, 512),)), PrefillShape(((0, 62),) * 8), PrefillShape(((256, 256),))]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes; on a CPU with the Triton interpreter too"
    )
    parser.add_argument(
        "--dtype", choices=sorted(_DTYPES), default=None, help="default: bfloat16 on GPU, float32 else"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch (and C++ kernel) threads on CPU")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    parser.add_argument(
        "--reps", type=int, default=None, help="timed calls per measurement (CPU timing only)"
    )
    parser.add_argument(
        "--layers", type=int, default=1,
        help="decode: one call on each of this many separate caches per timing, as a decode step of that many "
        "layers runs (out of the CPU's caches, as in the engine; 1: the same cache every call, cache-hot on CPU)",
    )
    parser.add_argument(
        "--kv-cache-dtype", choices=["auto", "int8"], default="auto",
        help="auto: the cache in --dtype; int8: codes + a scale per row (CPU kernels and torch reference)",
    )
    return parser.parse_args()


KV_INT8 = False  # --kv-cache-dtype int8: make_cache quantizes (set in main)


def make_cache(lens: list[int], heads: Heads, block_size: int, dtype: torch.dtype, device: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """A pool holding the sequences' blocks in shuffled order, and their block tables [B, max_blocks]."""
    from llmserve_kernels.paged_attention_ref import quantize_kv

    torch.manual_seed(0)
    per_seq = [math.ceil(n / block_size) for n in lens]
    num_blocks = sum(per_seq) + 1
    shape = (num_blocks, heads.num_kv_heads, block_size, heads.head_dim)  # [num_blocks, Hkv, bs, D]
    k_cache = torch.randn(shape, device=device, dtype=dtype)
    v_cache = torch.randn(shape, device=device, dtype=dtype)
    if KV_INT8:  # [num_blocks, Hkv, bs, D + 4] int8
        k_cache, v_cache = quantize_kv(k_cache), quantize_kv(v_cache)
    order = torch.randperm(num_blocks).tolist()
    tables = torch.zeros(len(lens), max(per_seq), dtype=torch.int64)
    for i, nb in enumerate(per_seq):
        tables[i, :nb] = torch.tensor([order.pop() for _ in range(nb)])
    return k_cache, v_cache, tables.to(device)


def time_call(fn: Callable[[], torch.Tensor], device: str, reps: int) -> float:
    """Seconds per call: median of do_bench on CUDA (it flushes L2 between calls), else wall clock."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(
    name: str, seconds: dict[str, float], diffs: dict[str, float], kv_bytes: int, flops: int | None
) -> None:
    """One line per implementation; `seconds` has "torch", the baseline, and the kernels timed against it."""

    def line(label: str, t: float) -> str:
        text = f"{t * 1e6:10.1f} us  {kv_bytes / t / 1e9:8.3g} GB/s"
        if flops is not None:
            text += f"  {flops / t / 1e12:8.3g} TFLOP/s"
        if label != "torch":
            text += f"   {seconds['torch'] / t:5.3g}x torch, max |diff| {diffs[label]:.1e}"
        return f"  {label:<7}{text}"

    print(f"{name}  (K/V {kv_bytes / 2**20:.3g} MiB)")
    for label, t in seconds.items():
        print(line(label, t))


def run_all(fns: dict[str, Callable[[], torch.Tensor]], device: str, reps: int
            ) -> tuple[dict[str, float], dict[str, float]]:  # fmt: skip
    """Seconds per call of each, and each kernel's largest difference from the torch output."""
    expected = fns["torch"]().float()
    diffs = {k: (fn().float() - expected).abs().max().item() for k, fn in fns.items() if k != "torch"}
    return {k: time_call(fn, device, reps) for k, fn in fns.items()}, diffs


def bench_decode(kernels: dict[str, ModuleType], heads: Heads, shape: DecodeShape, block_size: int,
                 dtype: torch.dtype, device: str, reps: int, layers: int = 1) -> None:  # fmt: skip
    from llmserve_kernels.paged_attention_ref import decode_mask, gather_index, paged_attention_decode

    lens = [shape.context] * shape.batch
    caches = [make_cache(lens, heads, block_size, dtype, device) for _ in range(layers)]
    k_cache, _, tables = caches[0]  # the tables are the same for every layer (make_cache is seeded)
    q = torch.randn(shape.batch, heads.num_heads, heads.head_dim, device=device).to(dtype)  # [B, H, D]
    context_lens = torch.tensor(lens, device=device)
    scale = heads.head_dim**-0.5
    # The engine builds the reference's index and mask once per step for all layers: not timed.
    index = gather_index(tables, heads.num_kv_heads)  # [B, Hkv, nblk]
    mask = decode_mask(context_lens, tables.shape[1] * block_size, torch.float32)  # [B, 1, 1, nblk * bs]

    def every_layer(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], torch.Tensor]:
        # the last layer's output is what run_all compares; the tables are the same in every layer
        return lambda: [fn(k, v) for k, v, _ in caches][-1]

    fns: dict[str, Callable[[], torch.Tensor]] = {
        "torch": every_layer(lambda k, v: paged_attention_decode(q, k, v, index, mask, scale))
    }
    for label, module in kernels.items():  # both take the block tables and lengths as they are
        fns[label] = every_layer(functools.partial(_decode_call, module, q, tables, context_lens, scale))
    kv_bytes = layers * 2 * sum(lens) * heads.num_kv_heads * k_cache.shape[-1] * k_cache.element_size()
    where = f" x {layers} layers" if layers > 1 else ""
    report(
        f"decode  B={shape.batch:<4} context={shape.context:<5}{where}", *run_all(fns, device, reps), kv_bytes, None
    )


def _decode_call(module: ModuleType, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, scale: float,
                 k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:  # fmt: skip
    return module.paged_attention_decode(q, k_cache, v_cache, tables, lens, scale)


def bench_prefill(kernels: dict[str, ModuleType], heads: Heads, shape: PrefillShape, block_size: int,
                  dtype: torch.dtype, device: str, reps: int) -> None:  # fmt: skip
    from llmserve_kernels.paged_attention_ref import gather_index, paged_attention_prefill

    lens = [start + n for start, n in shape.chunks]
    k_cache, v_cache, tables = make_cache(lens, heads, block_size, dtype, device)
    total = sum(n for _, n in shape.chunks)
    q = torch.randn(total, heads.num_heads, heads.head_dim, device=device).to(dtype)  # [T, H, D]
    cu = [0]
    for _, n in shape.chunks:
        cu.append(cu[-1] + n)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)  # [S + 1]
    context_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    max_n = max(n for _, n in shape.chunks)
    scale = heads.head_dim**-0.5
    indexes = [
        gather_index(tables[i : i + 1, : math.ceil(c / block_size)], heads.num_kv_heads)
        for i, c in enumerate(lens)
    ]

    def run_torch() -> torch.Tensor:  # the engine's torch path: one SDPA call per chunk
        return torch.cat([
            paged_attention_prefill(q[cu[i] : cu[i + 1]], k_cache, v_cache, indexes[i], start, scale)
            for i, (start, _) in enumerate(shape.chunks)
        ])  # fmt: skip

    fns: dict[str, Callable[[], torch.Tensor]] = {"torch": run_torch}
    for label, module in kernels.items():  # one call for all the chunks
        fns[label] = functools.partial(
            module.paged_attention_prefill_varlen,
            q,
            k_cache,
            v_cache,
            tables,
            cu_seqlens,
            context_lens,
            scale,
            max_n,
        )
    kv_bytes = 2 * sum(lens) * heads.num_kv_heads * k_cache.shape[-1] * k_cache.element_size()
    # query i of a chunk sees prefix + i + 1 keys: n * prefix + n * (n + 1) / 2 (query, key) pairs
    pairs = sum(n * start + n * (n + 1) // 2 for start, n in shape.chunks)
    flops = 4 * heads.num_heads * heads.head_dim * pairs
    chunks = [f"{s}+{n}" for s, n in shape.chunks]
    if len(set(chunks)) == 1 and len(chunks) > 1:
        chunks = [f"{len(chunks)}x{chunks[0]}"]
    report("prefill chunks=" + ",".join(chunks), *run_all(fns, device, reps), kv_bytes, flops)


def load_kernels(
    on_gpu: bool, smoke: bool, heads: Heads
) -> tuple[dict[str, ModuleType], dict[str, ModuleType]]:
    """(decode kernels, prefill kernels) by label: Triton on a GPU (or interpreted, on CPU with --smoke),
    the C++ kernels on a CPU. Each module has the functions of triton_paged_attention's signatures."""
    decode: dict[str, ModuleType] = {}
    prefill: dict[str, ModuleType] = {}
    if on_gpu or smoke:
        if not on_gpu:
            # Must precede the first `import triton` (triton reads it when its own functions are jitted).
            os.environ["TRITON_INTERPRET"] = "1"
        from llmserve_kernels import triton_paged_attention as tpa

        if tpa.available():
            decode["triton"] = prefill["triton"] = tpa
        elif on_gpu:
            sys.exit("triton is not installed: pip install triton")
        else:
            print("(triton is not installed: the Triton kernels are left out)")
    if not on_gpu:
        from llmserve_kernels import cpu_ops

        if heads.head_dim in cpu_ops.HEAD_DIMS and (module := cpu_ops.load()) is not None:
            decode["cpp"] = module
        if heads.head_dim in cpu_ops.PREFILL_HEAD_DIMS and (module := cpu_ops.load_prefill()) is not None:
            prefill["cpp"] = module
    return decode, prefill


def main() -> None:
    global KV_INT8
    args = parse_args()
    on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    KV_INT8 = args.kv_cache_dtype == "int8"
    if KV_INT8 and (on_gpu or args.smoke):
        sys.exit("--kv-cache-dtype int8: the C++ kernels on a CPU only (the Triton kernels read a model-dtype cache)")
    if args.threads:
        torch.set_num_threads(args.threads)
    smoke = args.smoke
    device = "cuda" if on_gpu else "cpu"
    dtype = _DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")]
    heads = SMOKE_HEADS if smoke else GPU_HEADS if on_gpu else CPU_HEADS
    decode_kernels, prefill_kernels = load_kernels(on_gpu, smoke, heads)
    interpreted = not on_gpu and "triton" in decode_kernels
    reps = args.reps or (3 if interpreted else 20)
    if on_gpu:
        where = torch.cuda.get_device_name()
    else:
        where = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
        if interpreted:
            where += ", Triton interpreter"
    names = sorted(set(decode_kernels) | set(prefill_kernels), reverse=True)
    print(f"paged attention: {' and '.join(names) or 'no'} kernels vs the torch reference "
          f"(gather + matmul / SDPA), on {where}")  # fmt: skip
    versions = f"torch {torch.__version__}"
    if "triton" in decode_kernels:
        import triton

        versions += f", triton {triton.__version__}"
    if "cpp" in prefill_kernels:
        versions += f", C++ prefill paths {prefill_kernels['cpp'].paths(torch.empty(1, 1, heads.head_dim, dtype=dtype))}"
    print(f"{versions}, {str(dtype).removeprefix('torch.')}{', int8 KV cache' if KV_INT8 else ''}, "
          f"block_size {args.block_size}, H={heads.num_heads} Hkv={heads.num_kv_heads} D={heads.head_dim}"
          f"{', smoke shapes' if smoke else ''}, median of {reps} calls")  # fmt: skip
    print("GB/s = K/V bytes one call needs (2 * sum(context) * Hkv * row bytes) / time per call")
    if interpreted:
        print("(interpreter timings are not GPU figures: this run checks that everything runs and agrees)")
    for shape in SMOKE_DECODE if smoke else GPU_DECODE if on_gpu else CPU_DECODE:
        bench_decode(decode_kernels, heads, shape, args.block_size, dtype, device, reps, args.layers)
    for shape in SMOKE_PREFILL if smoke else GPU_PREFILL if on_gpu else CPU_PREFILL:
        bench_prefill(prefill_kernels, heads, shape, args.block_size, dtype, device, reps)


if __name__ == "__main__":
    main()
