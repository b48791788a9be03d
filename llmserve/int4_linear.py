"""Weight-only 4-bit linear layers for CPU (`quantization = "int4"`): the bytes of a decode step again
below int8's.

One decode stream is bound by reading the weights: SmolLM2-135M's body is 106M weights, 106 MB in
int8 and 66 MB in this format (5 bits a weight). The format is GGUF's Q4_1: along each row, groups
of 32 weights share a float16 scale d and offset m, w = d * q + m with q in 0..15. The built-in
model's file stores its body exactly so, and the dequantized weights the loader caches are those
values: quantizing them again finds the file's codes (`quantize_groups` sets m to the group's
minimum and d to its range / 15, as the Q4_1 quantizer did), so on that model int4 loses nothing
against the file, only the bf16 rounding of d and m's products the bf16 model has anyway. Other
models lose what Q4_1 loses. The LM head stays int8 (`Int8Linear`): the file keeps it in 8 bits
(Q8_0) too, and 4 bits would cost it quality.

Two paths, as for int8. Up to `KERNEL_MAX_ROWS` rows (decode steps of a few streams): the C++ kernel
(kernels/csrc/int4_gemv_cpu.cpp), float32 sums of x * (d * q + m) with the activations unquantized.
Beyond: a GEMM over the dequantized weights held in the model dtype (packed bf16: AMX tiles or oneDNN),
since large steps are compute-bound. In float32 the two paths compute one function and differ only
in the order of their float32 sums; in bf16 the GEMM's weights are those values rounded to bf16, so
the paths differ by that rounding as well (2^-9 relative per weight; the bf16 model's own weights
are rounded the same way). Within one path rows never interact, so a sequence's tokens do not
depend on its batch neighbours while the step stays on one side of the threshold.

Memory: the 4-bit groups plus the dense copy for the large-step path: ~1.3x the bf16 model's linear
weights. As with int8, speed, not memory, is what this method buys.
"""

from __future__ import annotations

from types import ModuleType

import torch

from llmserve.int8_linear import KernelLinear, check_cpu_kernel

GROUP = 32  # weights of one row sharing d and m
LANES = 16  # output rows side by side in the kernel's layout
# Rows up to which the int4 kernel beats the bf16 GEMM, measured over one SmolLM2-135M step
# (benchmarks/bench_gemv.py, model-sized weights, 2 threads): see the table in the README.
KERNEL_MAX_ROWS = 8
# Against a plain F.linear (float32, or bf16 on a CPU that cannot pack it) the kernel, with its int8
# activations, wins at every decode size measured: body matmuls of one step on the AVX2-only EPYC
# (float32, 2 threads, 2026-12-07) 17.1 vs 44.0 ms at 16 rows, 78.3 vs 142.6 at 64, 168.6 vs 215.0
# at 128, 208.9 vs 296.1 at 192. Prefill chunks past this take the GEMM.
UNPACKED_KERNEL_MAX_ROWS = 256


def check(device: torch.device, dtype: torch.dtype) -> ModuleType:
    """The compiled kernel, or ValueError when int4 cannot run on `device` in `dtype`."""
    from llmserve_kernels import cpu_ops

    return check_cpu_kernel("int4", device, dtype, cpu_ops.load_int4_ops, cuda_hint="bnb-4bit")


def quantize_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 groups of 32 along each row: (codes [N, K] uint8 in 0..15, d [N, K/32] float16,
    m [N, K/32] float16), weight ~= d * codes + m group by group."""
    n, k = weight.shape
    if k % GROUP:
        raise ValueError(f"quantization 'int4' needs in_features divisible by {GROUP}, got a {n}x{k} weight")
    w = weight.detach().float().view(n, k // GROUP, GROUP)  # [N, G, 32]
    if not torch.isfinite(w).all() or w.abs().max() > torch.finfo(torch.float16).max:
        raise ValueError("quantization 'int4' needs finite weights within float16's range")
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # [N, G]
    d, m = ((hi - lo) / 15).half(), lo.half()
    # Codes against the stored (float16) d and m, so that d * q + m is as close as they allow.
    inv = torch.where(d > 0, 1 / d.float(), torch.zeros_like(lo))
    codes = torch.round((w - m.float()[..., None]) * inv[..., None]).clamp_(0, 15).to(torch.uint8)
    return codes.view(n, k), d, m


def dequantize_groups(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """d * codes + m in float32, [N, K]."""
    n, k = codes.shape
    groups = codes.view(n, k // GROUP, GROUP).float()  # [N, G, 32]
    return (groups * d.float()[..., None] + m.float()[..., None]).view(n, k)


def pack_groups(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The kernel's layout, [ceil(N / 16), K / 32, 320] uint8: per block of 16 rows and group, the
    16 d (float16), the 16 m, then 4 chunks of 64 bytes, in which row i's 4 bytes hold k = 8c + b
    (low nibble) and k = 8c + 4 + b (high nibble), b = 0..3. Rows past N are zero (d = m = 0)."""
    n, k = codes.shape
    blocks, groups = -(-n // LANES), k // GROUP
    rows = blocks * LANES
    q = torch.zeros(rows, k, dtype=torch.uint8)
    q[:n] = codes
    scales = torch.zeros(2, rows, groups, dtype=torch.float16)
    scales[0, :n], scales[1, :n] = d, m
    halves = q.view(blocks, LANES, groups, GROUP // 8, 2, 4)  # [B, 16 rows, G, 4 chunks, lo/hi, 4]
    nibbles = halves[..., 0, :] | (halves[..., 1, :] << 4)  # [B, 16 rows, G, 4 chunks, 4]
    code_bytes = nibbles.permute(0, 2, 3, 1, 4).reshape(blocks, groups, GROUP // 2 * LANES)  # [B, G, 256]
    # [2, B * 16, G] -> [B, G, 2, 16] float16 -> [B, G, 64] bytes
    scale_bytes = scales.view(2, blocks, LANES, groups).permute(1, 3, 0, 2).contiguous().view(torch.uint8)
    return torch.cat([scale_bytes.view(blocks, groups, 4 * LANES), code_bytes], dim=-1).contiguous()


class Int4Linear(KernelLinear):
    """`x @ weight.T + bias` from Q4_1 groups: the int4 kernel up to `max_kernel_rows` rows, a GEMM
    over the dequantized weights in the model dtype beyond (see the module docstring)."""

    default_max_kernel_rows = KERNEL_MAX_ROWS
    unpacked_max_kernel_rows = UNPACKED_KERNEL_MAX_ROWS
    load_ops = staticmethod(check)

    def _quantize(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool | None) -> None:
        codes, d, m = quantize_groups(weight)
        self.register_buffer("packed", pack_groups(codes, d, m))  # [ceil(out / 16), in / 32, 320] uint8
        dense = dequantize_groups(codes, d, m).to(weight.dtype)  # [out, in]
        self._set_dense(dense, None if bias is None else bias.detach().to(weight.dtype), pack)

    def kernel(self, rows: torch.Tensor) -> torch.Tensor:
        return self.ops.int4_linear(rows, self.packed, self.out_features, self.bias32)
