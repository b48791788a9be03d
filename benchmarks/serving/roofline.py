"""The machine's ceilings next to each server's tok/s, for compare_servers.py.

Two figures per run, both from the client's token counts:
- useful GFLOP/s: 2 x body params x every token (prompt and answer) + 2 x lm_head params x answer
  tokens, over the run's duration (bench_offline.py's definition). The ceiling is the probed
  2048^3 matmul rate at the server's dtype: ~270 MFLOP a token for SmolLM2-135M, so 2 TFLOP/s
  would be ~7,000 tok/s of prefill or decode if matmuls were all there is.
- GB/s of weights, one stream only: with one request in flight every answer token is one forward
  pass that reads every weight once, so tok/s x weight bytes is the bandwidth the server reached.
  (With more streams the forwards are shared and the client cannot count them.) The ceiling is the
  probed streaming-read bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_offline

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Ceilings:
    size: bench_offline.ModelSize
    read_gb_per_s: float
    matmul_gflop_per_s: float  # at the comparison's dtype
    dtype: str

    @classmethod
    def probe(cls, model_dir: Path, dtype: str) -> Ceilings:
        from transformers import AutoConfig

        size = bench_offline.model_size(AutoConfig.from_pretrained(model_dir))
        probed = bench_offline.probe_machine(dtype)
        return cls(size, probed["read_gb_per_s"], probed["matmul_gflop_per_s"], dtype)

    def describe(self) -> str:
        return (f"{self.size.params / 1e6:.1f}M params; machine (probed): {self.read_gb_per_s:.1f} GB/s "
                f"streaming read, {self.matmul_gflop_per_s:.0f} GFLOP/s {self.dtype} 2048^3 matmul")  # fmt: skip


def weight_bytes(server: str, dtype: str, extra_args: list[str], gguf: Path, size: bench_offline.ModelSize) -> int:
    """Bytes of weights one forward pass reads, by what each server holds.

    llmserve and transformers hold every weight in `dtype`; llmserve's `--quantization int8` and
    `w8a8` hold one byte per weight (the per-row scales are noise), and `int4` the body in Q4_1 (20 bytes per
    32 weights) with the LM head in int8. llama.cpp runs the GGUF's own blocks (Q4_1 here): the
    file's size is what it reads."""
    if server == "llama.cpp":
        return gguf.stat().st_size
    quantization = (
        extra_args[extra_args.index("--quantization") + 1] if "--quantization" in extra_args else None
    )
    if quantization == "int4":
        return (size.params - size.embed_params) * 20 // 32 + size.embed_params
    per_param = 1 if quantization in ("int8", "w8a8") else _DTYPE_BYTES.get(dtype, 2)
    return size.params * per_param


def roofline_rows(
    rows: list[dict[str, Any]], ceilings: Ceilings, weights: dict[str, int]
) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        m = r["metrics"]
        flops = ceilings.size.flops(m["total_input_tokens"], m["total_output_tokens"])
        gflops = flops / m["duration"] / 1e9
        row = {"server": r["server"], "concurrency": r["concurrency"], "useful_gflop_per_s": gflops,
               "pct_of_matmul": 100 * gflops / ceilings.matmul_gflop_per_s}  # fmt: skip
        if r["concurrency"] == 1 and r["server"] in weights:
            gbs = m["output_throughput"] * weights[r["server"]] / 1e9
            row |= {"weight_gb_per_s": gbs, "pct_of_read": 100 * gbs / ceilings.read_gb_per_s}
        out.append(row)
    return out


def print_roofline(
    rows: list[dict[str, Any]], ceilings: Ceilings, weights: dict[str, int]
) -> list[dict[str, Any]]:
    print(f"\nroofline: {ceilings.describe()}")
    print("  weights read per forward: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in weights.items()))
    table = roofline_rows(rows, ceilings, weights)
    print("| server | conc | useful GFLOP/s | % of matmul | GB/s of weights (1 stream) | % of read |")
    print("|---|---:|---:|---:|---:|---:|")
    for t in table:
        gbs = f"{t['weight_gb_per_s']:.1f} | {t['pct_of_read']:.0f}%" if "weight_gb_per_s" in t else "- | -"
        print(
            f"| {t['server']} | {t['concurrency']} | {t['useful_gflop_per_s']:.1f} | {t['pct_of_matmul']:.0f}% | {gbs} |"
        )
    return table
