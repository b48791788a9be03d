"""int8 weights and int8 activations on AMX tiles or AVX-512 VNNI (`quantization = "w8a8"`): for
throughput.

`int8` and `int4` keep activations in bf16 and win where a step is bound by reading weights (a few
streams). A large step (64 decode streams, a prefill chunk) is bound by the bf16 tile kernel's tile
loads instead, and neither helps there: both run the same bf16 GEMM beyond a few rows. Here every
step multiplies int8 by int8 (`tdpbssd`, 64 multiply-adds a pair of bytes where bf16 tiles do 32),
so the tile work per FLOP halves and the weight bytes too. Measured on this repo's 2-core Xeon, all
120 body matmuls of a SmolLM2-135M step, 2 threads, median of 5, the two interleaved in one process
(2026-12-01 22:05 UTC):

    tokens in the step (M)    1      16     64     128    512
    bf16 AMX tiles, ms      18.5   16.8   34.1   44.7   209.9
    w8a8 AMX tiles, ms       8.8    9.8   20.6   28.2   105.9

Quantization, symmetric: weights per output row (scale = max|w_row| / 127, as `int8`); activations
per token, at run time, over the whole row (scale = max|x_row| / 127). One scale per row keeps
the int32 sums of a row in one tile accumulator across K; per-group activation scales (llama.cpp's
Q8 blocks of 32) would need a float epilogue per 32 k. The output is

    out = bf16((float(sum_k xq[m, k] * wq[n, k]) * sx[m]) * sw[n] + bias[n])

with exact int32 sums, one kernel at every M. Without AMX, AVX-512 VNNI does the same products
(`vpdpbusd`, kernels/csrc/vnni_gemm.h) on the same packed weights and gives the same bits; on the
2-core AMD EPYC (Zen 4) this repo now runs on, bench_gemv.py --copies 2, 2026-12-03 07:50 UTC, all
121 matmuls of a step: 27.2 ms at 64 rows and 99.8 ms at 256 against oneDNN's packed bf16 61.8
and 198.7 ms (8.2 against 16.2 ms at one row).

Exact sums: a row's tokens never depend on its batch neighbours
(unlike `int8`, whose two paths meet at a row threshold). The LM head is w8a8 too. The quality cost
(tests/test_w8a8.py) is larger than weight-only int8's, from the per-token activation scale: one
outlier in a row coarsens the whole row's codes.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from llmserve.int8_linear import check_cpu_kernel, quantize_rows

COLS, DEPTH = 16, 64  # out_features and in_features must be multiples of these (one int8 tile)


def check(device: torch.device, dtype: torch.dtype) -> ModuleType:
    """The compiled kernel, or ValueError when w8a8 cannot run on `device` in `dtype`."""
    from llmserve_kernels import cpu_ops

    if dtype != torch.bfloat16:
        raise ValueError(f"quantization 'w8a8' needs dtype bfloat16, not {dtype}")
    ops = check_cpu_kernel("w8a8", device, dtype, cpu_ops.load_w8a8, cuda_hint="bnb-8bit")
    if ops.backend() == "none":
        raise ValueError("quantization 'w8a8' needs a CPU with AMX-INT8 tiles or AVX-512 VNNI and BF16")
    return ops


class W8A8Linear(nn.Module):
    """`x @ weight.T + bias` from per-row int8 weight codes, the activations quantized per row."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, ops: ModuleType | None = None
    ) -> None:  # weight [out, in], bf16
        super().__init__()
        self.ops = ops if ops is not None else check(weight.device, weight.dtype)
        self.out_features, self.in_features = weight.shape
        if self.out_features % COLS or self.in_features % DEPTH:
            raise ValueError(
                f"quantization 'w8a8' needs out_features divisible by {COLS} and in_features by {DEPTH}, "
                f"got a {self.out_features}x{self.in_features} weight"
            )
        codes, scales = quantize_rows(weight)
        self.register_buffer("packed", self.ops.w8a8_pack(codes))  # [out, in] int8 in the tile layout
        self.register_buffer("scales", scales)  # [out] float32
        self.register_buffer("bias32", None if bias is None else bias.detach().float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        rows = x.reshape(-1, self.in_features).contiguous()  # [T, in]
        out = self.ops.w8a8_linear(rows, self.packed, self.scales, self.bias32)  # [T, out]
        return out.view(*x.shape[:-1], self.out_features)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias32 is not None}"
