"""bf16 linear layers on CPU with their weights pre-packed once at load: into AMX tiles for our own
kernel where the CPU has AMX (`AmxLinear`), else into oneDNN's blocked layout (`PackedLinear`).

`F.linear` on a bf16 CPU tensor hands oneDNN a plain row-major weight, which it reorders into
its AMX/AVX-512 blocked layout on every call: at SmolLM2-135M sizes (30 layers x 4 matmuls,
106M weights) that costs ~30% of each decode step. Packing once at load removes it. Measured on
this repo's 2-core Xeon (AMX), all 120 body matmuls of one step, 2 threads, cold weights:

    tokens in the step (M)    1      8      16     64     128
    F.linear, ms            18.6   19.2   18.7   27.0   32.4
    packed, ms              12.4   12.6   12.5   19.7   25.8

(at M <= 16 both are bound by reading 212 MB of weights: 12.4 ms is ~17 GB/s; at M = 64 the
packed kernel runs ~770 GFLOP/s.) float32 has its own packing, MKL's (llmserve/models/mkl_linear.py).

On a CPU with AMX-BF16 the kernel in kernels/csrc/amx_linear_cpu.cpp replaces oneDNN for every
shape it takes (K a multiple of 32, N of 16): the same tile products in the same order, so the
same bits as the packed oneDNN path (tests/test_amx_linear.py), at a fraction of its per-call
cost. All 120 body matmuls of a step, 2 threads, cold weights, median of 5, the two interleaved in
one process (2026-12-01 16:04 UTC, load average 1.2):

    tokens in the step (M)    1      16     64     256    512
    oneDNN packed, ms        31.8   30.6   46.3   103.6  215.6
    AMX tiles, ms            15.5   14.3   28.8    79.6  198.0

(at M <= 16 the tiles are bound by reading the 212 MB of weights: 14.3 ms is ~15 GB/s.)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("llmserve.models")


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:  # weight [out, in]
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # An opaque oneDNN tensor; the batch-size hint only picks the initial blocking.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class AmxLinear(nn.Module):
    """bf16 `x @ W.T + bias` on AMX tiles, W held in the kernel's tile layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, ops: ModuleType) -> None:  # weight [N, K]
        super().__init__()
        self.out_features, self.in_features = n, k = weight.shape
        assert self.fits(weight), f"AmxLinear needs bf16 [N, K] with N % 16 == 0 and K % 32 == 0, got {weight.shape}"
        # [N, K] -> [N/16, 16 n, K/32, 16 r, 2 j] -> [N/16, K/32, 16 r, 16 n, 2 j]: for each 16 output
        # columns and 32 k, one 1 KB B tile whose row r holds the pairs W[n, 2r], W[n, 2r + 1] (VNNI order).
        tiles = weight.detach().reshape(n // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4)
        self.tiles = tiles.contiguous()
        self.bias = None if bias is None else bias.detach()
        self.ops = ops

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        n, k = weight.shape
        return weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and n % 16 == 0 and k % 32 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        rows = x.reshape(-1, self.in_features).contiguous()  # [T, in]
        out = self.ops.amx_linear(rows, self.tiles, self.out_features, self.bias)  # [T, out]
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@functools.cache
def amx_ops() -> ModuleType | None:
    """The AMX linear kernel when this CPU, kernel build and process can run AMX tiles, else None."""
    from llmserve_kernels import cpu_ops

    ops = cpu_ops.load_amx_linear()
    if ops is None or not ops.has_amx():
        return None
    return ops


def bf16_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    """The fastest packed form of a bf16 CPU linear layer: AmxLinear where it fits, else PackedLinear."""
    ops = amx_ops() if AmxLinear.fits(weight) else None
    if ops is not None:
        return AmxLinear(weight, bias, ops)
    return PackedLinear(weight, bias)


def bf16_head(weight: torch.Tensor) -> nn.Module:  # weight [V, hidden]
    """The LM head: AmxLinear (one copy, faster than both oneDNN paths at every M) or PackedHead."""
    linear = bf16_linear(weight)
    return linear if isinstance(linear, AmxLinear) else PackedHead(weight)


class PackedHead(nn.Module):
    """The bf16 LM head [V, hidden]: packed for steps that sample a few rows, a row-major
    [hidden, V] copy for batches. With a 49152-token vocabulary oneDNN's packed inner product loses
    to its plain matmul as soon as there are a few rows (same machine, 2 threads, median of 21):

        rows (M)           1      8      16     64     256
        packed, ms        6.7    6.5    7.0   11.5   28.7
        x @ W^T, ms      10.4    5.7    6.2    8.8   24.2

    Holding both costs one more copy of the head (56 MB here)."""

    MIN_ROWS_PLAIN = 8

    def __init__(self, weight: torch.Tensor) -> None:  # weight [V, hidden]
        super().__init__()
        self.packed = PackedLinear(weight)
        self.weight_t = weight.detach().t().contiguous()  # [hidden, V]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [M, hidden] -> [M, V]
        if x.shape[0] < self.MIN_ROWS_PLAIN:
            return self.packed(x)
        return torch.mm(x, self.weight_t)


def native_bf16() -> bool:
    """Whether oneDNN runs bf16 on this CPU: AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT. Without it the
    weight reorder raises and torch's bf16 matmuls fall back to a slow generic loop (a 512^3 bf16
    matmul ran at 1.2 GFLOP/s on an AVX2-only EPYC where float32 ran at 127, 2026-12-07)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and native_bf16()


def pack_linears(model: nn.Module) -> list[nn.Linear]:
    """Replace every nn.Linear in `model` by its `bf16_linear`: the same product up to bf16 rounding
    (oneDNN picks other kernels for the packed layout at M >= 64). Returns the replaced modules;
    none (model untouched) if this torch build cannot pack."""
    return replace_linears(model, bf16_linear, packing_works)


def replace_linears(
    model: nn.Module,
    make: Callable[[torch.Tensor, torch.Tensor | None], nn.Module],
    works: Callable[[torch.Tensor], bool],
) -> list[nn.Linear]:
    """Every nn.Linear in `model` replaced by make(weight, bias), if works(a weight) says this
    build can; returns the replaced modules (none when it cannot: the model stays as it was)."""
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not targets or not works(targets[0][1].weight):
        return []
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, make(module.weight, module.bias))
    return [module for _, module in targets]


def packing_works(weight: torch.Tensor) -> bool:
    try:
        probe = PackedLinear(weight)
        x = torch.randn(3, probe.in_features, dtype=weight.dtype)
        torch.testing.assert_close(probe(x), F.linear(x, weight))
        return True
    except Exception as exc:  # an older torch or a build without these ops: plain F.linear still works
        logger.warning("oneDNN weight packing unavailable (%s); bf16 linears stay unpacked", exc)
        return False
