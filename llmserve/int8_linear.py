"""Weight-only int8 linear layers for CPU (`quantization = "int8"`): half the bytes a decode step reads.

A decode step of one stream multiplies one activation row by every weight: it is bound by memory
bandwidth, not arithmetic. SmolLM2-135M reads ~270 MB of bf16 weights per token (body + LM head),
~13.5 ms at the ~20 GB/s these 2 cores get; int8 codes are half that. torch's own
`_weight_int8pack_mm` is no faster than packed bf16 at one row here and collapses from 16 rows on,
so the decode path is our kernel (kernels/csrc/int8_gemv_cpu.cpp).

Quantization: per output row, symmetric: scale = max|w_row| / 127, code = round(w / scale) in
[-127, 127]. Activations stay in the model dtype (never quantized).

Two paths, one function. A step with few rows (M <= `KERNEL_MAX_ROWS`: decode steps of a few
streams) runs the int8 kernel; a bigger step (prefill chunks, large decode batches) is compute-bound
and runs a GEMM over the same codes held in the model dtype (exact: |code| <= 127 fits bf16's 8-bit
significand), packed (`bf16_linear`: AMX tiles or oneDNN) in bf16. Both compute

    out = T(T(sum_k x[k] * code[n, k]) * scale[n] + bias[n])        (T: the model dtype)

with float32 sums (in bf16 each product x * code is exact in float32), so they differ only in the
order of the float32 additions. (The other choice, a dense copy holding T(code * scale), would
make the kernel round every weight to bf16 before its FMA: an extra conversion per weight on the
hot path, for the same order-only difference.)

What that means for batching. Within a path rows never interact: the kernel sums each output in
one float32 chain in k order at any M, and oneDNN's GEMM gives a row the same values at any M (as
for the bf16 model), so a sequence's tokens do not depend on its neighbours while the step stays on
one side of the threshold. Across it (a stream alone vs in a batch of 12) the order differs, and on
the built-in model ~3 in 10^5 outputs land one bf16 ulp apart; with bf16 logits, exact top-2 ties
are common, and greedy text can part at such a near-tie (it did at token 4-5 on 2 of 3 prompts).
Bit-equality across the threshold would need our own GEMM with the kernel's summation order.

Memory: the int8 codes (1 byte per weight) plus the dense copy of the codes (2 bytes in bf16,
4 in float32) for the large-step path: 1.5x the bf16 model's linear weights, not 0.5x. Speed, not
memory, is what this method buys.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.models.packed_linear import bf16_linear, can_pack, packing_works

# Rows up to which the int8 kernel beats the bf16 GEMM. Measured over one SmolLM2-135M step (120
# body matmuls + LM head, 134M weights), cold weights, 2 threads (benchmarks/bench_gemv.py): int8
# 6.6 ms at M = 1, 8.0 at 4, 11.4 at 8, 14.2 at 10, 16.1 at 12 (compute-bound from ~M = 4: M FMAs
# per converted weight vector), while packed bf16 holds ~15 ms at any M up to 16.
KERNEL_MAX_ROWS = 10
# The same where the large step is a plain F.linear (float32, or bf16 on a CPU that cannot pack it):
# that GEMM is much slower, so the kernel wins further. Body matmuls of one step on the AVX2-only
# EPYC (AVX2 kernel, float32, 2 threads, 2026-12-07): 27.7 vs 41.9 ms at 12 rows, 49.7 vs 53.6 at
# 24, 66.8 vs 67.7 at 32, 152.6 vs 142.6 at 64.
UNPACKED_KERNEL_MAX_ROWS = 24
DTYPES = (torch.float32, torch.bfloat16)


def check(device: torch.device, dtype: torch.dtype) -> ModuleType:
    """The compiled kernels, or ValueError when int8 cannot run on `device` in `dtype`."""
    from llmserve_kernels import cpu_ops

    return check_cpu_kernel("int8", device, dtype, cpu_ops.load_int8_ops, cuda_hint="bnb-8bit")


def check_cpu_kernel(
    method: str,
    device: torch.device,
    dtype: torch.dtype,
    load: Callable[[], ModuleType | None],
    cuda_hint: str,
) -> ModuleType:
    """`load()`'s compiled kernel for quantization `method`, or ValueError naming why it cannot run."""
    if device.type != "cpu":
        raise ValueError(
            f"quantization {method!r} runs on the CPU only, not on {device} (use {cuda_hint} on CUDA)"
        )
    if dtype not in DTYPES:
        raise ValueError(f"quantization {method!r} needs dtype float32 or bfloat16, not {dtype}")
    ops = load()
    if ops is None:
        raise ValueError(
            f"quantization {method!r} needs the C++ {method} kernel, which could not be built (see the log)"
        )
    return ops


def can_pack_codes(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the large-step GEMM can use oneDNN's packed bf16 weights (probed on a small layer)."""
    return can_pack(device, dtype) and packing_works(torch.randint(-127, 128, (32, 64)).to(dtype))


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: (codes [N, K] int8, scales [N] float32), weight ~= codes * scales[:, None]."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # an all-zero row: codes 0, any scale
    codes = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scales.contiguous()


class KernelLinear(nn.Module):
    """Base of the weight-only quantized linears (int8 here, int4 in int4_linear.py): their C++
    kernel for steps of up to `max_kernel_rows` rows, a GEMM over a dense copy of the weights in
    the model dtype beyond. A subclass names its kernel loader and row threshold, and its
    `_quantize` registers the kernel's buffers and calls `_set_dense`; `large_step` may add an
    epilogue."""

    default_max_kernel_rows: int  # where the large step is a packed bf16 GEMM
    unpacked_max_kernel_rows: int  # where it is a plain F.linear

    def __init__(
        self,
        weight: torch.Tensor,  # [out, in], in the model dtype
        bias: torch.Tensor | None = None,
        *,
        ops: ModuleType | None = None,
        pack: bool | None = None,  # the large-step GEMM packed (bf16_linear); None: when this torch can
        max_kernel_rows: int | None = None,  # None: the class's measured default
    ) -> None:
        super().__init__()
        self.ops = ops if ops is not None else self.load_ops(weight.device, weight.dtype)
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.register_buffer("bias32", None if bias is None else bias.detach().float().contiguous())
        self.gemm: nn.Module | None = None
        self.dense: torch.Tensor | None = None
        self.dense_bias: torch.Tensor | None = None
        self._quantize(weight, bias, pack)
        if max_kernel_rows is None:  # the measured crossover against the large step this module got
            max_kernel_rows = self.default_max_kernel_rows if self.gemm is not None else self.unpacked_max_kernel_rows
        self.max_kernel_rows = max_kernel_rows

    @staticmethod
    def load_ops(device: torch.device, dtype: torch.dtype) -> ModuleType:
        raise NotImplementedError

    def _quantize(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool | None) -> None:
        raise NotImplementedError

    def _set_dense(self, dense: torch.Tensor, dense_bias: torch.Tensor | None, pack: bool | None) -> None:
        """The large-step path: packed bf16 (our AMX kernel or oneDNN), else a plain F.linear."""
        if pack is None:
            pack = can_pack_codes(dense.device, dense.dtype)
        if pack:
            self.gemm = bf16_linear(dense, dense_bias)
        else:
            self.dense, self.dense_bias = dense, dense_bias

    def kernel(self, rows: torch.Tensor) -> torch.Tensor:  # [M <= max_kernel_rows, in] contiguous -> [M, out]
        raise NotImplementedError

    def large_step(self, rows: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out]
        if self.gemm is not None:
            return self.gemm(rows)
        assert self.dense is not None
        return F.linear(rows, self.dense, self.dense_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        rows = x.reshape(-1, self.in_features)  # [T, in]
        out = self.kernel(rows.contiguous()) if rows.shape[0] <= self.max_kernel_rows else self.large_step(rows)
        return out.view(*x.shape[:-1], self.out_features)

    def weight_bytes(self) -> int:
        """Bytes held for the weights: the kernel's buffers, the bias, and the dense copy."""
        held = sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))
        return held + self.out_features * self.in_features * torch.empty((), dtype=self.dtype).element_size()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias32 is not None}, max_kernel_rows={self.max_kernel_rows}, "
            f"large_step={type(self.gemm).__name__ if self.gemm is not None else 'F.linear'}"
        )


class Int8Linear(KernelLinear):
    """`x @ weight.T + bias` from per-row int8 codes: the int8 kernel up to `max_kernel_rows` rows,
    a GEMM over the codes in the model dtype beyond (see the module docstring)."""

    default_max_kernel_rows = KERNEL_MAX_ROWS
    unpacked_max_kernel_rows = UNPACKED_KERNEL_MAX_ROWS
    load_ops = staticmethod(check)

    def _quantize(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool | None) -> None:
        codes, scales = quantize_rows(weight)
        self.register_buffer("packed", self.ops.int8_pack(codes))  # [ceil(out / 16), in, 16] int8
        self.register_buffer("scales", scales)  # [out] float32
        self._set_dense(codes.to(weight.dtype), None, pack)  # the codes, exact in either dtype

    def kernel(self, rows: torch.Tensor) -> torch.Tensor:
        return self.ops.int8_linear(rows, self.packed, self.scales, self.bias32)

    def large_step(self, rows: torch.Tensor) -> torch.Tensor:
        return self.ops.int8_scale_bias_(super().large_step(rows).contiguous(), self.scales, self.bias32)
