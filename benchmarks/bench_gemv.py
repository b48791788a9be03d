"""Our quantized CPU matmuls (int8, int4 and w8a8 kernels) against bf16, for decode steps and beyond.

    python benchmarks/bench_gemv.py                    # matmuls (cold and model-sized) + decode tokens/s
    python benchmarks/bench_gemv.py --skip-decode --rows 1,8,16 --reps 20

Matmuls: every matmul of one SmolLM2-135M step (30 layers x qkv [960, 576], o [576, 576],
gate_up [3072, 576], down [576, 1536], plus the LM head [49152, 576]: 134M weights) on M rows, with
these implementations: our int4 and int8 kernels, our int8 x int8 kernel (`w8a8`, 1 byte, AMX tiles or AVX-512 VNNI,
activations quantized per row; left out without either), our AMX-tile bf16 linear the runner uses for bf16
on a CPU with AMX (`AmxLinear`, 2 bytes; left out elsewhere), the oneDNN-packed bf16 linear it uses
otherwise (`PackedLinear`) and plain `F.linear` in bf16. Two working sets:

- cold: `--copies` distinct copies of those weights (default 4: 537 MB int8, 1.07 GB bf16), run
  one after the other, so every byte comes from DRAM. This host's L3 is large (lscpu: 480 MB,
  shared with its neighbours): a set of ~100 MB ran at ~40 GB/s, one of 500 MB+ at ~20-24 GB/s.
- model: one copy, as a decode step streams it; partly L3-resident here, so faster and noisier.

Bandwidth arithmetic: at M rows a step reads each weight once, so GB/s = weight bytes / time
(int8: 134 MB, bf16: 269 MB per step; x and the outputs are < 1 MB). At the ~20-24 GB/s these 2
cores get from DRAM, the floors are ~6 ms (int8) and ~12 ms (bf16) per step, at any M until the
arithmetic catches up: the int8 kernel does 1 conversion + M FMAs per 16 weights, so it turns
compute-bound near M = 8, where oneDNN's AMX bf16 GEMM still streams at full speed.

Decode: one stream (one prompt, `--decode-tokens` greedy tokens with ignore_eos) through
`LLM(dtype="bfloat16")` and `LLM(dtype="bfloat16", quantization=...)` for int8, int4 and w8a8; tokens/s of the best of
`--decode-runs` runs, which includes the prompt's prefill and everything else in a step
(attention, norms, sampling, Python), not only the matmuls.

The machine is shared: the load average is printed first, and figures taken while it is above ~0.5
are unreliable (another process on the 2 cores can make OpenMP steps 10-100x slower).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

# llmserve sets its OpenMP default (a short spin, then sleep) before torch loads, as the engine runs.
importlib.import_module("llmserve")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llmserve import LLM, SamplingParams  # noqa: E402
from llmserve.int4_linear import GROUP, pack_groups, quantize_groups  # noqa: E402
from llmserve.int8_linear import quantize_rows  # noqa: E402
from llmserve.models.packed_linear import AmxLinear, PackedLinear, amx_ops  # noqa: E402
from llmserve_kernels import cpu_ops  # noqa: E402

HIDDEN, INTERMEDIATE, QKV, VOCAB, LAYERS = 576, 1536, 960, 49152, 30  # SmolLM2-135M
LAYER_SHAPES = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]  # [N, K]

Step = Callable[[dict[int, torch.Tensor]], None]  # runs every matmul of a working set on x by K


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,2,4,8,16", help="comma-separated M values")
    parser.add_argument("--copies", type=int, default=4, help="copies of the step's weights in the cold set")
    parser.add_argument("--reps", type=int, default=10, help="timed passes per implementation and M")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--decode-runs", type=int, default=3)
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-matmuls", action="store_true")
    return parser.parse_args()


def step_shapes() -> list[tuple[int, int]]:
    return LAYER_SHAPES * LAYERS + [(VOCAB, HIDDEN)]


def build(copies: int) -> tuple[dict[str, Step], dict[str, int]]:
    """The implementations over `copies` distinct copies of one step's weights."""
    ops, ops4 = cpu_ops.load_int8_ops(), cpu_ops.load_int4_ops()
    if ops is None or ops4 is None:
        sys.exit("the C++ int8 or int4 kernel did not build (see the log)")
    gen = torch.Generator().manual_seed(0)
    int8: list[tuple[torch.Tensor, torch.Tensor]] = []
    int4: list[tuple[int, torch.Tensor]] = []  # (N, packed groups); the LM head stays int8 (as in the engine)
    heads: list[tuple[torch.Tensor, torch.Tensor]] = []  # the int8 LM heads, for the int4 step
    int4_bytes = 0
    plain: list[torch.Tensor] = []
    packed: list[PackedLinear] = []
    amx_kernel = amx_ops()
    amx: list[AmxLinear] = []
    w8_kernel = cpu_ops.load_w8a8()
    w8_kernel = w8_kernel if w8_kernel is not None and w8_kernel.backend() != "none" else None
    w8a8: list[tuple[torch.Tensor, torch.Tensor]] = []
    for n, k in step_shapes() * copies:
        weight = (torch.randn(n, k, generator=gen) * k**-0.5).bfloat16()
        codes, scales = quantize_rows(weight)
        int8.append((ops.int8_pack(codes), scales))
        if w8_kernel is not None:
            w8a8.append((w8_kernel.w8a8_pack(codes), scales))
        if n != VOCAB:
            int4.append((n, pack_groups(*quantize_groups(weight))))
            int4_bytes += int4[-1][1].numel()
        else:
            heads.append(int8[-1])
            int4_bytes += n * k
        plain.append(weight)
        packed.append(PackedLinear(weight))
        if amx_kernel is not None:
            amx.append(AmxLinear(weight, None, amx_kernel))

    def run_int8(xs: dict[int, torch.Tensor]) -> None:
        for w, s in int8:
            ops.int8_linear(xs[w.shape[1]], w, s, None)

    def run_int4(xs: dict[int, torch.Tensor]) -> None:
        for n, w in int4:
            ops4.int4_linear(xs[w.shape[1] * GROUP], w, n, None)
        for w, s in heads:
            ops.int8_linear(xs[w.shape[1]], w, s, None)

    def run_w8a8(xs: dict[int, torch.Tensor]) -> None:
        assert w8_kernel is not None
        for w, s in w8a8:
            w8_kernel.w8a8_linear(xs[w.shape[1]], w, s, None)

    def run_packed(xs: dict[int, torch.Tensor]) -> None:
        for p in packed:
            p(xs[p.in_features])

    def run_amx(xs: dict[int, torch.Tensor]) -> None:
        for a in amx:
            a(xs[a.in_features])

    def run_plain(xs: dict[int, torch.Tensor]) -> None:
        for w in plain:
            F.linear(xs[w.shape[1]], w)

    weights = sum(n * k for n, k in step_shapes()) * copies
    steps = {"int4 kernel": run_int4, "int8 kernel": run_int8}
    if w8a8:
        steps["w8a8 kernel"] = run_w8a8
    if amx:
        steps["bf16 AMX tiles"] = run_amx
    steps |= {"bf16 packed": run_packed, "bf16 F.linear": run_plain}
    nbytes = {"int4 kernel": int4_bytes, "int8 kernel": weights, "w8a8 kernel": weights}
    return steps, nbytes | {name: 2 * weights for name in steps if name.startswith("bf16")}


def time_matmuls(label: str, copies: int, rows: list[int], reps: int) -> None:
    steps, nbytes = build(copies)
    print(f"\n{label}: {copies} cop{'y' if copies == 1 else 'ies'} of the step's "
          f"{len(step_shapes())} matmuls "
          f"({nbytes['int4 kernel'] / 1e6:.0f} MB int4 + int8 head, {nbytes['int8 kernel'] / 1e6:.0f} MB int8, "
          f"{nbytes['bf16 packed'] / 1e6:.0f} MB bf16); "
          f"ms per step = best of {reps} / {copies}, GB/s = weight bytes / time")  # fmt: skip
    print(f"{'M':>3}  " + "  ".join(f"{name:>22}" for name in steps))
    for m in rows:
        xs = {k: torch.randn(m, k).bfloat16() for k in (HIDDEN, INTERMEDIATE)}
        times: dict[str, list[float]] = {name: [] for name in steps}
        for step in steps.values():
            step(xs)  # warm-up: oneDNN picks and JIT-compiles its kernels per shape
        for _ in range(reps):  # interleaved, so a noisy moment hits all of them alike
            for name, step in steps.items():
                start = time.perf_counter()
                step(xs)
                times[name].append(time.perf_counter() - start)
        cells = []
        for name in steps:
            best = min(times[name])
            cells.append(f"{best / copies * 1e3:7.2f} ms {nbytes[name] / best / 1e9:5.1f} GB/s")
        print(f"{m:>3}  " + "  ".join(f"{c:>22}" for c in cells))


def time_decode(tokens: int, runs: int) -> None:
    prompt = "Write a long story about a lighthouse keeper and the storm that changed her life."
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    print(f"\ndecode: one stream, {tokens} greedy tokens (ignore_eos), best of {runs} runs")
    results = {}
    for name, kwargs in [
        ("bf16", {}),
        ("bf16 + int8", {"quantization": "int8"}),
        ("bf16 + int4", {"quantization": "int4"}),
        ("bf16 + w8a8", {"quantization": "w8a8"}),
    ]:
        llm = LLM(dtype="bfloat16", **kwargs)
        llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
        seconds = []
        for _ in range(runs):
            start = time.perf_counter()
            [result] = llm.generate(prompt, params)
            seconds.append(time.perf_counter() - start)
            assert len(result.token_ids) == tokens
        best = min(seconds)
        results[name] = tokens / best
        print(f"  {name:12s} {tokens / best:6.1f} tok/s  ({best / tokens * 1e3:.2f} ms/token, "
              f"median run {statistics.median(seconds):.2f} s)")  # fmt: skip
        del llm
    print(
        f"  speed-up over bf16: int8 {results['bf16 + int8'] / results['bf16']:.2f}x, "
        f"int4 {results['bf16 + int4'] / results['bf16']:.2f}x, w8a8 {results['bf16 + w8a8'] / results['bf16']:.2f}x"
    )


def main() -> None:
    args = parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    load = os.getloadavg()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
          + ("  (busy: figures unreliable)" if load[0] > 0.5 else ""))  # fmt: skip
    if not args.skip_matmuls:
        time_matmuls("cold (DRAM)", args.copies, rows, args.reps)
        time_matmuls("model-sized (partly in L3)", 1, rows, args.reps * 2)
    if not args.skip_decode:
        time_decode(args.decode_tokens, args.decode_runs)


if __name__ == "__main__":
    main()
