"""float32 linear layers on CPU through MKL's packed sgemm: the weight is packed into MKL's panel
layout once at load instead of on every call.

Why: `F.linear` on float32 CPU tensors is MKL's sgemm, and sgemm copies the whole weight into its
panels on every call (`mkl_blas_avx512_sgemm_scopy_right48` in a profile). At M = 64 rows that
copy cost about as much as the multiply itself: a float32 decode step at 64 sequences spent ~16%
of its time in it, against ~22% in the sgemm kernels. The copy does not depend on the input, so it
is done once here (`cblas_sgemm_pack`, which torch exposes as `mkl::_mkl_reorder_linear_weight`)
and each call runs only the multiply (`cblas_sgemm_compute`, `mkl::_mkl_linear`). All 120 body
matmuls of a step at SmolLM2-135M sizes, 2 threads, median of 5, the two interleaved in one
process (2026-12-02 01:30 UTC):

    rows in the step (M)     1      16      64     256     512
    F.linear, ms           56.9   111.9   183.4   481.1   865.4
    packed, ms             54.2    85.1   118.3   441.2   842.9

(the copy is a fixed cost per call, so it weighs most at a few dozen rows: decode steps.) The
cost is one more copy of the weights: +519 MiB resident for the built-in model's float32 linears
and head (513 MiB).

Numerics: the same MKL kernels on the same panels. The products agree with `F.linear` to float32
rounding, bit for bit at most shapes and row counts (tests/test_mkl_linear.py). At the built-in
model's shapes each row also comes out the same whatever other rows share the call, which plain
sgemm does not do (its rows at M <= 7 differ from the same rows at M = 600). On AMD Zen 4 MKL's
kernels for M < 12 rows that are not a multiple of 4 also round differently, packed or not, so
small calls are padded with zero rows up to the next multiple the CPU needs (`row_multiple`, probed
once: 1 on the Intel Xeons measured, 4 on Zen 4). That is not free on Zen 4: one row alone runs
MKL's fast matrix-vector kernel, the very path whose rounding differs, and padded it runs the GEMM
kernel. Measured there (2026-12-03 09:20 UTC, 2 threads, best of 7, interleaved), the 120 body
matmuls at one row: 10.6 ms unpadded, 27.8 ms padded (3 rows: 28.2 and 28.9; 8 rows: 31.7 and
32.1); one float32 stream of the built-in model decodes at 14 tok/s instead of 26. The engine
keeps the padding: batching must not change a sequence's output, and float32 runs for exactness
(bfloat16 or a quantization is the fast choice). The float32 greedy
parity with transformers stays tested token for token (tests/test_parity.py).

`_mkl_linear(x, packed, weight, bias, n)` takes the packed path when x has n rows and falls back to
`F.linear` on `weight` otherwise; the pack is made for 64 rows and called with the real row count,
because the B panels do not depend on it (checked at load by `mkl_packing_works`, at 1..600 rows).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.models.packed_linear import replace_linears

logger = logging.getLogger("llmserve.models")

PACK_ROWS = 64  # the row count the panels are packed for (any count runs on them, see above)
PAD_BELOW = 16  # calls with fewer rows are padded to `row_multiple()` rows; larger ones run as they are


class MklPackedLinear(nn.Module):
    """float32 `x @ W.T + bias`, W packed once into MKL's sgemm panels."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:  # weight [out, in]
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # MKL's call takes the plain weight too, for its fallback at other row counts; not copied.
        self.weight = weight.detach()
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, PACK_ROWS)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        rows = x.reshape(-1, self.in_features)  # [T, in]
        out = _padded(self, rows, row_multiple() if rows.shape[0] < PAD_BELOW else 1)  # [T, out]
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_pack_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkl.is_available()
        and hasattr(torch.ops.mkl, "_mkl_linear")
    )


@functools.cache
def mkl_packing_works() -> bool:
    """Whether packed products equal F.linear's to float32 rounding at row counts other than the
    pack's, on this torch build: if MKL's panels ever depended on the row count, they would not."""
    try:
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(96, 128, generator=gen)
        bias = torch.randn(96, generator=gen)
        probe = MklPackedLinear(weight, bias)
        for rows in (1, 3, PACK_ROWS, 100, 600):
            x = torch.randn(rows, 128, generator=gen)
            torch.testing.assert_close(probe(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
        return True
    except Exception as exc:  # a build without MKL's packed GEMM: F.linear still works
        logger.warning("MKL's packed sgemm unavailable (%s); float32 linears stay on F.linear", exc)
        return False


@functools.cache
def row_multiple() -> int:
    """The smallest row count (1, 2, 4 or 8) that calls below PAD_BELOW rows must be padded to so
    that each row comes out with the bits it has in a 600-row call, on this CPU; 1 when none does,
    which leaves small calls as they are."""
    gen = torch.Generator().manual_seed(0)
    probe = MklPackedLinear(torch.randn(96, 128, generator=gen))
    x = torch.randn(600, 128, generator=gen)
    with torch.no_grad():
        full = _padded(probe, x, 1)
        for multiple in (1, 2, 4, 8):
            if all(torch.equal(_padded(probe, x[:count], multiple), full[:count]) for count in range(1, 2 * PAD_BELOW)):
                return multiple
    logger.warning("MKL's sgemm rows depend on the call's row count on this CPU at any padding")
    return 1


def _padded(linear: MklPackedLinear, x: torch.Tensor, multiple: int) -> torch.Tensor:  # [T, in] -> [T, out]
    count = x.shape[0]
    rows = F.pad(x, (0, 0, 0, -count % multiple)) if count % multiple else x  # [T', in], zero rows appended
    return torch.ops.mkl._mkl_linear(rows, linear.packed, linear.weight, linear.bias, rows.shape[0])[:count]


def pack_fp32_linears(model: nn.Module) -> list[nn.Linear]:
    """Every nn.Linear in `model` as an MklPackedLinear; returns the replaced modules (none, model
    untouched, where the packed GEMM does not work)."""
    return replace_linears(model, MklPackedLinear, lambda weight: mkl_packing_works())
