"""The bf16 linear layer on AMX tiles (kernels/csrc/amx_linear_cpu.cpp, llmserve/models/packed_linear.py).

It replaces oneDNN for bf16 linears on CPUs with AMX, so it is checked against float64, against
oneDNN's packed path bit for bit (why swapping it in changes no output), for batch invariance,
and for leaving oneDNN's own AMX kernels working on the same threads."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmserve.models.packed_linear import (
    AmxLinear,
    PackedLinear,
    amx_ops,
    bf16_head,
    bf16_linear,
    pack_linears,
)

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (48, 64), (16, 32)]  # (N, K): SmolLM2's and odd blocks


@pytest.fixture(scope="module")
def ops() -> ModuleType:
    module = amx_ops()
    if module is None:
        pytest.skip("no AMX-BF16 here (CPU flags, kernel build or arch_prctl permission): bf16 linears use oneDNN")
    return module


def make(n: int, k: int, rows: int, seed: int, bias: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, k, generator=gen) / k**0.5).bfloat16()
    x = torch.randn(rows, k, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    return weight, x, b


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 33, 64, 100])
def test_matches_float64_and_onednn_bit_for_bit(ops: ModuleType, n: int, k: int, rows: int) -> None:
    weight, x, bias = make(n, k, rows, seed=n + k + rows)
    out = AmxLinear(weight, bias, ops)(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    exact = x.double() @ weight.double().t() + bias.double()
    # fp32 accumulation of exact bf16 products, one bf16 rounding: within ~2 bf16 ulps of the exact sum
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-2).all()
    assert torch.equal(out, PackedLinear(weight, bias)(x))  # oneDNN's packed AMX path: same tile products


@pytest.mark.parametrize("bias", [True, False])
def test_rows_do_not_depend_on_their_batch(ops: ModuleType, bias: bool) -> None:
    weight, x, b = make(576, 1536, 70, seed=3, bias=bias)
    layer = AmxLinear(weight, b, ops)
    full = layer(x)
    for start, stop in [(0, 1), (3, 4), (5, 21), (16, 48), (69, 70)]:
        assert torch.equal(layer(x[start:stop]), full[start:stop])


def test_leading_dims_and_strided_input(ops: ModuleType) -> None:
    weight, x, bias = make(64, 128, 24, seed=5)
    layer = AmxLinear(weight, bias, ops)
    assert torch.equal(layer(x.view(2, 12, 128)), layer(x).view(2, 12, 64))
    wide = torch.randn(24, 256).bfloat16()
    assert torch.equal(layer(wide[:, ::2]), layer(wide[:, ::2].contiguous()))
    assert layer(x[:0]).shape == (0, 64)


def test_factory_picks_amx_only_where_it_fits(ops: ModuleType) -> None:
    assert isinstance(bf16_linear(torch.randn(64, 128).bfloat16()), AmxLinear)
    assert isinstance(bf16_linear(torch.randn(60, 128).bfloat16()), PackedLinear)  # N not a multiple of 16
    assert isinstance(bf16_linear(torch.randn(64, 100).bfloat16()), PackedLinear)  # K not a multiple of 32
    assert isinstance(bf16_head(torch.randn(1024, 576).bfloat16()), AmxLinear)
    model = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 30)).bfloat16()
    x = torch.randn(4, 64).bfloat16()
    expected = model(x)
    pack_linears(model)
    assert [type(m) for m in model] == [AmxLinear, nn.SiLU, PackedLinear]
    torch.testing.assert_close(model(x), expected, rtol=2e-2, atol=2e-2)


def test_bad_inputs_say_what_is_wrong(ops: ModuleType) -> None:
    weight, x, _ = make(64, 128, 4, seed=6)
    layer = AmxLinear(weight, None, ops)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.amx_linear(x.float(), layer.tiles, 64, None)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops.amx_linear(torch.randn(4, 100).bfloat16(), layer.tiles, 64, None)
    with pytest.raises(RuntimeError, match="packed"):
        ops.amx_linear(x, layer.tiles[:2], 64, None)
    with pytest.raises(RuntimeError, match="bias"):
        ops.amx_linear(x, layer.tiles, 64, torch.zeros(63).bfloat16())
    with pytest.raises(AssertionError, match="N % 16"):
        AmxLinear(torch.randn(60, 128).bfloat16(), None, ops)


def test_onednn_amx_users_keep_working_around_it(ops: ModuleType) -> None:
    """bf16 matmul and SDPA (oneDNN / ATen brgemm, which skip reconfiguring tiles when they believe
    their palette is still loaded) interleaved with the kernel on the same threads."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 9, 200, 64, generator=gen).bfloat16()  # [1, H, L, D]
    a, w = torch.randn(200, 576, generator=gen).bfloat16(), torch.randn(576, 576, generator=gen).bfloat16()
    weight, x, bias = make(960, 576, 40, seed=8)
    layer = AmxLinear(weight, bias, ops)
    sdpa, matmul, ours = F.scaled_dot_product_attention(q, q, q, is_causal=True), a @ w, layer(x)
    for _ in range(20):
        assert torch.equal(layer(x), ours)
        assert torch.equal(a @ w, matmul)
        assert torch.equal(F.scaled_dot_product_attention(q, q, q, is_causal=True), sdpa)
